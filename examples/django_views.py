"""Django (or Flask): the blocking API in plain synchronous views, no event loop needed.

``engine.sync`` / ``handle.sync`` run each call on iterflow's own background loop, so a
WSGI view can start a run, deliver a webhook signal or show a run's status in one line.
Passing ``conn=`` (a psycopg connection in the view's transaction) would make the start
commit or roll back with the view's own writes.
"""

from __future__ import annotations

import json
import os
from typing import Any

from django.http import HttpRequest, JsonResponse

from iterflow import RunNotFound, create_engine

engine = create_engine(os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"),
                       schema=os.environ.get("ITERFLOW_SCHEMA", "workflow"))
reports = engine.handle("build-report", 1)


def start_report(request: HttpRequest) -> JsonResponse:
    params = json.loads(request.body or b"{}")
    started = reports.sync.start(params, idempotency_key=request.headers.get("Idempotency-Key"))
    return JsonResponse({"run_id": started.run_id, "created": started.created}, status=201)


def approve_report(request: HttpRequest, run_id: str) -> JsonResponse:
    try:
        result = engine.sync.signal(run_id, "approval", json.loads(request.body or b"null"))
    except RunNotFound:
        return JsonResponse({"error": "no such run"}, status=404)
    status = 202 if result.kind in ("delivered", "buffered", "duplicate") else 409
    return JsonResponse({"kind": result.kind}, status=status)


def report_status(_request: HttpRequest, run_id: str) -> JsonResponse:
    detail = engine.sync.status(run_id)
    if detail is None:
        return JsonResponse({"error": "no such run"}, status=404)
    body: dict[str, Any] = {"status": detail.run.status, "waiting": str(detail.run.waiting or "")}
    return JsonResponse(body)
