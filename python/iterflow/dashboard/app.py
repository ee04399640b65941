"""The dashboard's ASGI app: its routes, the pages they render and the actions they take.

Reads go through the engine's client calls (``status``, ``list_crons``) and the bounded
dashboard reads of ``reads.py``; actions are the engine's client calls (``cancel``, ``retry``,
``signal``, ``cancel_many``, ``retry_many``), so the dashboard does nothing a program using the
engine could not. Every request passes the auth hook; every action also the read-only switch
and the CSRF check (``guard.py``). Pages are server-rendered (Jinja2, autoescaped) with one
small script for live refresh; nothing is loaded from another site.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import UTC, datetime
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl, urlencode

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from .. import validate
from ..engine import Engine, create_engine
from ..errors import Code, InvalidArgument, IterflowError
from ..types import STATUSES, TERMINAL, Explanation
from . import guard, reads, timeline

STATIC = {"dashboard.css": "text/css; charset=utf-8", "dashboard.js": "text/javascript; charset=utf-8"}
ERROR_STATUS = {Code.INVALID_ARGUMENT: 400, Code.RUN_NOT_FOUND: 404, Code.SIGNAL_PAYLOAD_INVALID: 400,
                Code.SIGNAL_PAYLOAD_TOO_LARGE: 400, Code.DATABASE_UNAVAILABLE: 503}
BULK_LIMIT = 1000

Handler = Callable[[Request], Awaitable[Response]]


class Dashboard:
    """The state behind one app: the engine, who may do what, and the templates."""

    def __init__(self, engine: Engine, *, owned: bool, read_only: bool, auth: guard.Auth | None,
                 refresh: float) -> None:
        self.engine = engine
        self.owned = owned
        self.read_only = read_only
        self.auth = auth
        self.refresh = refresh
        self.env = Environment(loader=PackageLoader("iterflow.dashboard", "templates"),
                               autoescape=select_autoescape(default=True, default_for_string=True))
        self.env.filters["pretty"] = _pretty
        self.env.filters["when"] = _when

    # -- plumbing ----------------------------------------------------------------------------
    def page(self, handler: Handler) -> Handler:
        """A GET handler behind the auth hook; the response carries the CSRF cookie."""
        async def run(request: Request) -> Response:
            refused = await guard.admit(self.auth, request)
            if refused is not None:
                return refused
            token, new = guard.token_of(request)
            request.state.csrf = token
            response = await handler(request)
            if new:
                guard.set_token(response, request, token)
            return response
        return run

    def action(self, handler: Callable[[Request, dict[str, str]], Awaitable[Response]]) -> Handler:
        """A POST handler behind the auth hook, the read-only switch and the CSRF check."""
        async def run(request: Request) -> Response:
            refused = await guard.admit(self.auth, request)
            if refused is not None:
                return refused
            if self.read_only:
                return guard.forbidden("the dashboard is read-only")
            form = dict(parse_qsl((await request.body()).decode("utf-8", "replace"), keep_blank_values=True))
            refused = guard.check_token(request, form)
            if refused is not None:
                return refused
            return await handler(request, form)
        return run

    def render(self, request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        base = request.scope.get("root_path", "").rstrip("/")
        html = self.env.get_template(template).render(
            base=base, csrf=getattr(request.state, "csrf", ""), read_only=self.read_only,
            refresh_ms=int(self.refresh * 1000), notice=request.query_params.get("notice"),
            path=request.url.path, **context,
        )
        return HTMLResponse(html, status_code=status_code)

    def back(self, request: Request, path: str, notice: str, params: Mapping[str, str] | None = None) -> Response:
        """After an action: back to a page (303, so a reload does not post again), with a notice."""
        base = request.scope.get("root_path", "").rstrip("/")
        query = urlencode({**(params or {}), "notice": notice})
        return RedirectResponse(f"{base}{path}?{query}", status_code=303)

    # -- pages -------------------------------------------------------------------------------
    async def runs(self, request: Request) -> Response:
        return await self._runs(request, "runs.html")

    async def runs_rows(self, request: Request) -> Response:
        return await self._runs(request, "runs_body.html")

    async def _runs(self, request: Request, template: str) -> Response:
        try:
            query = reads.RunsQuery.parse(request.query_params)
        except InvalidArgument as exc:
            return self.render(request, template, 400, query=reads.RunsQuery(), error=exc.message, page=None,
                               counts=[], statuses=STATUSES, bulk=None, qs="")
        core = await self.engine.client()
        page = await reads.runs_page(core, query)
        counts = await reads.status_counts(core, query)
        return self.render(request, template, query=query, page=page, counts=counts, statuses=STATUSES,
                           bulk=query.bulk_filter(), qs=urlencode(query.params()), error=None,
                           next_qs=urlencode(query.params(cursor=page.next_cursor)) if page.next_cursor else None,
                           status_qs={s: urlencode(query.params(status=s, cursor=None)) for s in STATUSES},
                           all_qs=urlencode(query.params(status=None, cursor=None)))

    async def run(self, request: Request) -> Response:
        return await self._run(request, "run.html")

    async def run_live(self, request: Request) -> Response:
        return await self._run(request, "run_body.html")

    async def _run(self, request: Request, template: str) -> Response:
        run_id = request.path_params["run_id"]
        detail = await self.engine.status(run_id)
        if detail is None:
            return self.render(request, "error.html", 404, title="No such run",
                               message=f"no run {run_id!r} (a malformed id names no run)")
        run = detail.run
        live = run.status not in TERMINAL
        end = datetime.now(UTC) if live else run.updated_at
        flow = self.engine.flows.get((run.name, run.version))
        return self.render(
            request, template, detail=detail, run=run, live=live, explanation=await self._explain(run_id),
            timeline=timeline.build(run.created_at, end, detail.steps, detail.signals, detail.children),
            attempts=[s for s in detail.steps if s["error"] or (s["attempts"] or 0) > 1],
            signal_names=sorted(flow.signal_schemas) if flow is not None else [],
            registered=flow is not None,
        )

    async def _explain(self, run_id: str) -> Explanation | None:
        """Why the run is where it is (engine.explain); a page still renders without it (the
        run was purged between the two reads, or the database failed on this one)."""
        try:
            return await self.engine.explain(run_id)
        except IterflowError:
            return None

    async def flows(self, request: Request) -> Response:
        rows = await reads.flows(await self.engine.client())
        live = [s for s in STATUSES if s not in TERMINAL]
        return self.render(request, "flows.html", flows=rows, live_statuses=live, terminal=TERMINAL)

    async def crons(self, request: Request) -> Response:
        return self.render(request, "crons.html", crons=await self.engine.list_crons())

    async def workers(self, request: Request) -> Response:
        leases = await reads.workers(await self.engine.client())
        return self.render(request, "workers.html", registry=await self.engine.list_workers(), workers=leases)

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC:
            return Response("not found", status_code=404, media_type="text/plain")
        body = (resources.files("iterflow.dashboard") / "static" / name).read_bytes()
        return Response(body, media_type=STATIC[name], headers={"Cache-Control": "max-age=300"})

    # -- actions -----------------------------------------------------------------------------
    async def cancel(self, request: Request, form: dict[str, str]) -> Response:
        run_id = request.path_params["run_id"]
        await self.engine.cancel(run_id, form.get("reason") or "canceled from the dashboard")
        return self.back(request, f"/runs/{run_id}", "cancel requested")

    async def retry(self, request: Request, form: dict[str, str]) -> Response:
        run_id = request.path_params["run_id"]
        result = await self.engine.retry(run_id)
        notices = {"queued": "retry queued", "not_failed": "not retried: the run has not failed",
                   "missing": "not retried: no such run"}
        return self.back(request, f"/runs/{run_id}", notices.get(result.kind, result.kind))

    async def signal(self, request: Request, form: dict[str, str]) -> Response:
        run_id = request.path_params["run_id"]
        text = form.get("payload", "").strip()
        try:
            payload = json.loads(text) if text else None
        except json.JSONDecodeError as exc:
            return self.render(request, "error.html", 400, title="Signal not sent",
                               message=f"payload: not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})",
                               back=f"/runs/{run_id}")
        result = await self.engine.signal(run_id, form.get("name", ""), payload,
                                          idempotency_key=form.get("idempotency_key") or None)
        if result.kind == "invalid_payload":
            issues = "; ".join(f"{i.get('path') or '(payload)'}: {i.get('message')}" for i in result.issues)
            return self.render(request, "error.html", 400, title="Signal not sent",
                               message=f"payload does not fit the flow's signal schema: {issues}",
                               back=f"/runs/{run_id}")
        return self.back(request, f"/runs/{run_id}", f"signal {result.kind}")

    async def bulk(self, request: Request, form: dict[str, str]) -> Response:
        query = reads.RunsQuery.parse(form)
        flt = query.bulk_filter()
        if flt is None:
            raise InvalidArgument("filter", "bulk actions need a flow, status, tag or date filter, "
                                            "and no version or id search")
        action = form.get("action")
        if action == "cancel":
            count = await self.engine.cancel_many(flt, BULK_LIMIT, form.get("reason") or "canceled from the dashboard")
            notice = f"canceled {count} run(s)"
        elif action == "retry":
            notice = f"queued {await self.engine.retry_many(flt, BULK_LIMIT)} run(s) for retry"
        else:
            raise InvalidArgument("action", "must be 'cancel' or 'retry'")
        return self.back(request, "/", notice, query.params(cursor=None))

    async def failed(self, request: Request, exc: Exception) -> Response:
        """An engine error while serving a request: its code decides the status."""
        assert isinstance(exc, IterflowError)
        return self.render(request, "error.html", ERROR_STATUS.get(exc.code, 500), title=exc.code,
                           message=exc.message)


def create_app(target: str | Engine, *, schema: str | None = None, read_only: bool = False,
               auth: guard.Auth | None = None, refresh: float = 5.0) -> Starlette:
    """The dashboard as an ASGI app (docs/operations.md, "Dashboard").

    ``target`` is an ``Engine`` (its flows' signal schemas then validate signals sent from the
    dashboard) or a DSN, for which the app creates a client-only engine on ``schema`` (default
    ``"workflow"``) and stops it when the app shuts down. ``read_only`` hides and refuses every
    action; ``auth(request)`` (may be async) admits a request by returning True, or answers it
    with a Starlette ``Response`` of its own (a redirect to a login page); anything else is 403.
    ``refresh`` is the live refresh interval in seconds.
    """
    read_only = validate.flag(read_only, "read_only")
    if auth is not None and not callable(auth):
        raise InvalidArgument("auth", f"must be a callable auth(request) -> bool, got {validate.show(auth)}")
    if isinstance(refresh, bool) or not isinstance(refresh, int | float) or not 0.5 <= refresh <= 3600:
        raise InvalidArgument("refresh", f"must be seconds from 0.5 to 3600, got {validate.show(refresh)}")
    if isinstance(target, Engine):
        if schema is not None and schema != target.schema:
            raise InvalidArgument("schema", f"the engine's schema is {target.schema!r}, got {schema!r}")
        engine, owned = target, False
    elif isinstance(target, str):
        engine, owned = create_engine(target, schema=schema or "workflow", max_connections=4), True
    else:
        raise InvalidArgument("target", f"must be a DSN or an Engine, got {validate.show(target)}")
    d = Dashboard(engine, owned=owned, read_only=read_only, auth=auth, refresh=float(refresh))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        if d.owned:
            await d.engine.stop()

    routes = [
        Route("/", d.page(d.runs), name="runs"),
        Route("/runs/rows", d.page(d.runs_rows), name="runs_rows"),
        Route("/runs/bulk", d.action(d.bulk), methods=["POST"], name="bulk"),
        Route("/runs/{run_id}", d.page(d.run), name="run"),
        Route("/runs/{run_id}/live", d.page(d.run_live), name="run_live"),
        Route("/runs/{run_id}/cancel", d.action(d.cancel), methods=["POST"], name="cancel"),
        Route("/runs/{run_id}/retry", d.action(d.retry), methods=["POST"], name="retry"),
        Route("/runs/{run_id}/signal", d.action(d.signal), methods=["POST"], name="signal"),
        Route("/flows", d.page(d.flows), name="flows"),
        Route("/crons", d.page(d.crons), name="crons"),
        Route("/workers", d.page(d.workers), name="workers"),
        Route("/static/{name}", d.page(d.static), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={IterflowError: d.failed})
    app.state.engine = engine
    return app


def _pretty(value: Any) -> str:
    """A JSON value indented for reading (escaped by the template like any text)."""
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=str)


def _when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if value is not None else "—"
