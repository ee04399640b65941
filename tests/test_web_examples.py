"""The FastAPI and Django examples work against a real database (skipped if not installed)."""

from __future__ import annotations

import asyncio
import importlib
import json

import pytest

import iterflow


async def test_fastapi_example(dsn, schema_name, core, monkeypatch):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    await iterflow.migrate(dsn, schema_name)
    monkeypatch.setenv("DATABASE_URL", dsn)
    monkeypatch.setenv("ITERFLOW_SCHEMA", schema_name)
    mod = importlib.reload(importlib.import_module("examples.fastapi_app"))
    worker = iterflow.create_engine(dsn, schema=schema_name, core=core, poll_interval=0.05)
    worker.register(mod.fulfil_order)
    await worker.listen()
    try:
        transport = httpx.ASGITransport(app=mod.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            made = (await client.post("/orders", json={"order_id": "o1", "amount_cents": 500})).json()
            again = (await client.post("/orders", json={"order_id": "o1", "amount_cents": 500})).json()
            assert made["created"] and again == {"run_id": made["run_id"], "created": False}
            bad = await client.post("/orders", json={"order_id": "o2"})
            assert bad.status_code == 422
            hook = f"/webhooks/payments/{made['run_id']}?event_id=evt_1"
            assert (await client.post(hook, json={"ok": True})).json()["kind"] in ("delivered", "buffered")
            assert (await client.post(hook, json={"ok": True})).json()["kind"] == "duplicate"
            for _ in range(200):
                status = (await client.get(f"/orders/{made['run_id']}")).json()
                if status["status"] == "done":
                    break
                await asyncio.sleep(0.02)
            assert status["output"] == {"payment": {"ok": True}, "label": "label-o1"}
            late = await client.post(f"/webhooks/payments/{made['run_id']}?event_id=evt_2", json={})
            assert late.status_code == 409
            missing = await client.post("/webhooks/payments/00000000-0000-0000-0000-000000000000?event_id=x", json={})
            assert missing.status_code == 404
    finally:
        await worker.stop()
        await mod.api_engine.stop()


def test_django_example(dsn, schema_name, monkeypatch):
    pytest.importorskip("django")
    from django.conf import settings

    if not settings.configured:
        settings.configure(DEBUG=True, ALLOWED_HOSTS=["*"], ROOT_URLCONF=__name__, SECRET_KEY="test")
    from django.test import RequestFactory

    asyncio.run(iterflow.migrate(dsn, schema_name))
    monkeypatch.setenv("DATABASE_URL", dsn)
    monkeypatch.setenv("ITERFLOW_SCHEMA", schema_name)
    views = importlib.reload(importlib.import_module("examples.django_views"))
    factory = RequestFactory()
    try:
        made = views.start_report(factory.post("/reports", data=json.dumps({"month": "2026-11"}),
                                               content_type="application/json", HTTP_IDEMPOTENCY_KEY="r-1"))
        assert made.status_code == 201
        run_id = json.loads(made.content)["run_id"]
        shown = views.report_status(factory.get("/"), run_id)
        assert json.loads(shown.content)["status"] == "pending"
        approved = views.approve_report(factory.post("/", data="true", content_type="application/json"), run_id)
        assert json.loads(approved.content) == {"kind": "buffered"}
        assert views.report_status(factory.get("/"), "00000000-0000-0000-0000-000000000000").status_code == 404
    finally:
        views.engine.sync.close()


urlpatterns: list[object] = []
