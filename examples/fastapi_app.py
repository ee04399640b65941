"""FastAPI: start flows from requests and turn webhooks into signals.

The API process only enqueues and reads (it never calls ``listen()``); workers started with
``iterflow worker examples.fastapi_app:worker_engine`` execute. The signal webhook maps every
``SignalResult`` kind to the status code docs/signals.md §1 suggests, so a payment provider's retries
are answered ``200`` (``duplicate``) instead of double-applying.
"""

from __future__ import annotations

import os
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from iterflow import RunNotFound, create_engine, define_flow

DSN = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
SCHEMA = os.environ.get("ITERFLOW_SCHEMA", "workflow")


class Order(BaseModel):
    order_id: str
    amount_cents: int


@define_flow("fulfil-order", input=Order, signals={"paid": dict})
async def fulfil_order(ctx: Any, order: Order) -> dict[str, Any]:
    payment = await ctx.signal("paid", timeout="1d")
    label = await ctx.step("ship", lambda: f"label-{order.order_id}")
    return {"payment": payment, "label": label}


api_engine = create_engine(DSN, schema=SCHEMA)          # client only: never listens
orders = api_engine.handle("fulfil-order", 1, input_schema=Order)
worker_engine = create_engine(DSN, schema=SCHEMA)       # for `iterflow worker`
worker_engine.register(fulfil_order)

STATUS_BY_KIND = {"delivered": 202, "buffered": 202, "duplicate": 200, "expired": 410,
                  "closed": 409, "invalid_payload": 422}


@asynccontextmanager
async def lifespan(_app: FastAPI) -> Any:
    yield
    await api_engine.stop()


app = FastAPI(lifespan=lifespan)


@app.post("/orders", status_code=201)
async def create_order(order: Order) -> dict[str, Any]:
    started = await orders.start(order, idempotency_key=f"order:{order.order_id}")
    return {"run_id": started.run_id, "created": started.created}


@app.post("/webhooks/payments/{run_id}")
async def payment_webhook(run_id: str, body: dict[str, Any], event_id: str) -> Any:
    try:
        result = await api_engine.signal(run_id, "paid", body, idempotency_key=event_id)
    except RunNotFound as exc:
        raise HTTPException(404, exc.message) from exc
    if STATUS_BY_KIND[result.kind] >= 400:
        raise HTTPException(STATUS_BY_KIND[result.kind], {"kind": result.kind, "issues": list(result.issues)})
    return {"kind": result.kind}


@app.get("/orders/{run_id}")
async def order_status(run_id: str) -> dict[str, Any]:
    detail = await api_engine.status(run_id)
    if detail is None:
        raise HTTPException(404, "no such order run")
    return {"status": detail.run.status, "waiting": str(detail.run.waiting or ""), "output": detail.run.output}
