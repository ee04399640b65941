"""The dashboard (iterflow.dashboard) over HTTP against a real engine and database: every
page with real runs, every action, and what guards them (CSRF, read-only, the auth hook)."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pydantic
import pytest

import iterflow
from iterflow import Engine, FlowRuntimeError, define_flow
from iterflow.dashboard import create_app
from iterflow.errors import InvalidArgument


class Approval(pydantic.BaseModel):
    by: str


@define_flow("dash-greet")
async def greet(ctx, inp):
    await ctx.step("hello", lambda: f"hello {inp}")
    await ctx.sleep("10ms")
    return {"greeting": inp}


@define_flow("dash-wait", signals={"approve": Approval})
async def wait(ctx, _inp):
    approval = await ctx.signal("approve")
    return {"by": approval.by}


@define_flow("dash-fail")
async def fail(ctx, _inp):
    def bad():
        raise FlowRuntimeError("BAD", "<script>alert(1)</script>", non_retryable=True)

    await ctx.step("bad", bad)


@define_flow("dash-parent")
async def parent(ctx, _inp):
    return await ctx.invoke(greet, "child")


async def _until(engine: Engine, run_id: str, pred: Callable[[Any], bool], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        detail = await engine.status(run_id)
        if pred(detail) or time.monotonic() > deadline:
            assert pred(detail), f"condition not reached; run is {detail.run.status}"
            return detail
        await asyncio.sleep(0.02)


def _status(engine: Engine, status: str) -> Callable[[Any], bool]:
    return lambda d: d is not None and d.run.status == status


@pytest.fixture
async def engine(make_engine: Callable[..., Any]) -> Engine:
    return await make_engine(greet, wait, fail, parent)


async def _client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://dash.test")


@pytest.fixture
async def client(engine: Engine) -> AsyncIterator[httpx.AsyncClient]:
    async with await _client(create_app(engine)) as c:
        yield c


async def _token(client: httpx.AsyncClient, path: str) -> str:
    """The CSRF token of a page with a form (a live run's page), as a browser would get it."""
    page = await client.get(path)
    assert page.status_code == 200, page.text
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found, "no CSRF field on the page"
    assert client.cookies.get("iterflow_csrf") == found.group(1)
    return found.group(1)


async def test_pages_render_real_runs(engine: Engine, client: httpx.AsyncClient) -> None:
    done = await engine.handle("dash-greet").start("ada", tags=["team:a"])
    waiting = await engine.handle("dash-wait").start(None, tags=["team:b"])
    failed = await engine.handle("dash-fail").start(None)
    family = await engine.handle("dash-parent").start(None)
    await _until(engine, done.run_id, _status(engine, "done"))
    await _until(engine, waiting.run_id, _status(engine, "awaiting_signal"))
    await _until(engine, failed.run_id, _status(engine, "failed"))
    detail = await _until(engine, family.run_id, _status(engine, "done"))

    runs = await client.get("/")
    assert runs.status_code == 200
    for r in (done, waiting, failed, family):
        assert f"/runs/{r.run_id}" in runs.text
    # counts per status: the exact live count, and the terminal ones
    assert re.search(r'data-count="awaiting_signal">1<', runs.text)
    assert re.search(r'data-count="failed">(≈ )?1<', runs.text)

    # filters: flow, version, status, tag, created range, id search
    def listed(page: httpx.Response) -> set[str]:
        return set(re.findall(r'data-run="([0-9a-f-]{36})"', page.text))

    assert listed(await client.get("/", params={"flow": "dash-greet"})) == {done.run_id, str(detail.children[0]["id"])}
    assert listed(await client.get("/", params={"flow": "dash-greet", "version": "2"})) == set()
    assert listed(await client.get("/", params={"status": "failed"})) == {failed.run_id}
    assert listed(await client.get("/", params={"tag": "team:b"})) == {waiting.run_id}
    assert listed(await client.get("/", params={"until": "2000-01-01T00:00"})) == set()
    assert len(listed(await client.get("/", params={"since": "2000-01-01T00:00"}))) == 5
    assert listed(await client.get("/", params={"q": waiting.run_id})) == {waiting.run_id}
    assert waiting.run_id in listed(await client.get("/", params={"q": waiting.run_id[:13].upper()}))
    # a filtered count is exact
    filtered = await client.get("/", params={"flow": "dash-greet"})
    assert re.search(r'data-count="done">2<', filtered.text)
    bad = await client.get("/", params={"version": "x"})
    assert bad.status_code == 400 and "version" in bad.text
    assert (await client.get("/", params={"q": "not-hex!"})).status_code == 400

    # the live-refresh fragment is the list without the page around it
    rows = await client.get("/runs/rows", params={"status": "failed"})
    assert rows.status_code == 200 and "<html" not in rows.text and failed.run_id in rows.text

    # the run page: timeline, JSON (escaped), steps, children
    page = await client.get(f"/runs/{failed.run_id}")
    assert page.status_code == 200
    assert "<svg" in page.text and 'class="bar k-step s-failed"' in page.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text and "<script>alert(1)" not in page.text
    parent_page = await client.get(f"/runs/{family.run_id}")
    assert "k-invoke" in parent_page.text and "k-child" in parent_page.text
    assert f"/runs/{detail.children[0]['id']}" in parent_page.text
    greet_page = await client.get(f"/runs/{done.run_id}")
    assert "k-sleep" in greet_page.text and "&#34;greeting&#34;: &#34;ada&#34;" in greet_page.text
    # the explanation: what the waiting run waits for, and the command that moves it
    waiting_page = await client.get(f"/runs/{waiting.run_id}")
    assert 'id="explanation"' in waiting_page.text and 'data-reason="awaiting_signal"' in waiting_page.text
    assert f"iterflow signal {waiting.run_id} approve" in waiting_page.text
    assert 'data-reason="failed"' in page.text
    assert (await client.get("/runs/00000000-0000-0000-0000-000000000000")).status_code == 404
    assert (await client.get("/runs/nonsense")).status_code == 404

    flows = await client.get("/flows")
    assert flows.status_code == 200
    assert 'data-flow="dash-wait@1"' in flows.text and "awaiting_signal 1" in flows.text
    assert re.search(r'data-flow="dash-greet@1".*?done 2', flows.text, re.S)

    assert (await client.get("/static/dashboard.js")).status_code == 200
    assert (await client.get("/static/../app.py")).status_code == 404


async def test_keyset_pagination(engine: Engine, client: httpx.AsyncClient) -> None:
    started = await engine.handle("dash-wait").start_many([{"input": i} for i in range(120)])
    ids = {s.run_id for s in started}
    seen: list[str] = []
    params: dict[str, str] = {"flow": "dash-wait"}
    for _ in range(5):
        page = await client.get("/", params=params)
        seen += re.findall(r'data-run="([0-9a-f-]{36})"', page.text)
        nxt = re.search(r'rel="next" href="[^"]*\?([^"]+)"', page.text)
        if not nxt:
            break
        params = dict(httpx.QueryParams(nxt.group(1).replace("&amp;", "&")))
    assert len(seen) == 120 and set(seen) == ids, "every run once, across pages"
    assert (await client.get("/", params={"cursor": "garbage"})).status_code == 400


async def test_a_status_filter_searches_a_window(engine: Engine, client: httpx.AsyncClient,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """No index covers the status: a page looks for it among a bounded window of runs and
    offers to search on from where the window ended."""
    from iterflow.dashboard import reads

    monkeypatch.setattr(reads, "STATUS_WINDOW", 5)
    failed = await engine.handle("dash-fail").start(None)
    await _until(engine, failed.run_id, _status(engine, "failed"))
    newer = await engine.handle("dash-wait").start_many([{"input": i} for i in range(8)])
    for r in newer:
        await _until(engine, r.run_id, _status(engine, "awaiting_signal"))
    first = await client.get("/", params={"status": "failed"})
    assert 'data-searched="5"' in first.text and "data-run=" not in first.text
    nxt = re.search(r'rel="next" href="[^"]*\?([^"]+)"', first.text)
    assert nxt, "a window that found nothing offers to search on"
    second = await client.get("/?" + nxt.group(1).replace("&amp;", "&"))
    assert re.findall(r'data-run="([0-9a-f-]{36})"', second.text) == [failed.run_id]
    assert 'rel="next"' not in second.text, "the window reached the oldest run"
    # without a status filter the page is not windowed
    assert len(re.findall(r'data-run="', (await client.get("/")).text)) == 9


async def test_crons_and_workers_pages(make_engine: Callable[..., Any]) -> None:
    engine = await make_engine(wait, listen=False)
    engine.define_cron("nightly", "0 3 * * *", wait, timezone="Europe/Paris")
    await engine.listen()
    run = await engine.handle("dash-wait").start(None)
    await _until(engine, run.run_id, _status(engine, "awaiting_signal"))
    async with await _client(create_app(engine)) as client:
        crons = await client.get("/crons")
        assert crons.status_code == 200
        assert 'data-cron="nightly"' in crons.text and "Europe/Paris" in crons.text and "0 3 * * *" in crons.text
        # a run waiting for a signal holds no lease; a leased one shows its owner
        workers = await client.get("/workers")
        assert "No leases held" in workers.text
        # the registry: this listening engine, alive, with the flow it serves
        assert re.search(r'data-registered="[^"]+".*?dash-wait@1.*?alive', workers.text, re.S)
    other = await make_engine(greet)
    blocker = asyncio.Event()

    @define_flow("dash-hold")
    async def hold(ctx, _inp):
        await ctx.step("hold", blocker.wait)

    holder = await make_engine(hold)
    held = await holder.handle("dash-hold").start(None)
    await _until(holder, held.run_id, _status(holder, "running"))
    async with await _client(create_app(other)) as client:
        workers = await client.get("/workers")
        assert workers.status_code == 200
        assert re.search(r'data-worker="[^"]+".*?<td>1</td>\s*<td>dash-hold</td>', workers.text, re.S)
    blocker.set()
    await _until(holder, held.run_id, _status(holder, "done"))


async def test_actions(engine: Engine, client: httpx.AsyncClient) -> None:
    waiting = await engine.handle("dash-wait").start(None)
    await _until(engine, waiting.run_id, _status(engine, "awaiting_signal"))
    token = await _token(client, f"/runs/{waiting.run_id}")

    # a signal: bad JSON, then a payload the flow's schema refuses, then a good one
    url = f"/runs/{waiting.run_id}/signal"
    bad = await client.post(url, data={"csrf": token, "name": "approve", "payload": "{by: 1"})
    assert bad.status_code == 400 and "not JSON" in bad.text
    wrong = await client.post(url, data={"csrf": token, "name": "approve", "payload": '{"by": 5}'})
    assert wrong.status_code == 400 and "signal schema" in wrong.text
    assert (await engine.status(waiting.run_id)).signals == []
    good = await client.post(url, data={"csrf": token, "name": "approve", "payload": '{"by": "ops"}'})
    assert good.status_code == 303 and "signal+delivered" in good.headers["location"]
    detail = await _until(engine, waiting.run_id, _status(engine, "done"))
    assert detail.run.output == {"by": "ops"}
    unknown = await client.post("/runs/00000000-0000-0000-0000-000000000000/signal",
                                data={"csrf": token, "name": "approve", "payload": "{}"})
    assert unknown.status_code == 404

    # cancel, then retry of a failed run
    victim = await engine.handle("dash-wait").start(None)
    await _until(engine, victim.run_id, _status(engine, "awaiting_signal"))
    canceled = await client.post(f"/runs/{victim.run_id}/cancel", data={"csrf": token, "reason": "by hand"})
    assert canceled.status_code == 303
    assert (await _until(engine, victim.run_id, _status(engine, "canceled"))).run.status == "canceled"
    failed = await engine.handle("dash-fail").start(None)
    await _until(engine, failed.run_id, _status(engine, "failed"))
    retried = await client.post(f"/runs/{failed.run_id}/retry", data={"csrf": token})
    assert retried.status_code == 303 and "retry+queued" in retried.headers["location"]
    assert "retried" in [e["kind"] for e in (await engine.status(failed.run_id)).events]

    # bulk: the current filter, through the engine's bulk calls
    batch = [await engine.handle("dash-wait").start(None, tags=["bulk"]) for _ in range(3)]
    keep = await engine.handle("dash-wait").start(None, tags=["keep"])
    for r in (*batch, keep):
        await _until(engine, r.run_id, _status(engine, "awaiting_signal"))
    bulk = await client.post("/runs/bulk", data={"csrf": token, "action": "cancel", "tag": "bulk"})
    assert bulk.status_code == 303 and "canceled+3+run" in bulk.headers["location"]
    for r in batch:
        await _until(engine, r.run_id, _status(engine, "canceled"))
    assert (await engine.status(keep.run_id)).run.status == "awaiting_signal"
    refused = await client.post("/runs/bulk", data={"csrf": token, "action": "cancel"})
    assert refused.status_code == 400, "an empty filter would touch every run"
    refused = await client.post("/runs/bulk", data={"csrf": token, "action": "cancel", "flow": "dash-wait",
                                                    "version": "1"})
    assert refused.status_code == 400
    bulk_failed = [await engine.handle("dash-fail").start(None) for _ in range(2)]
    for r in bulk_failed:
        await _until(engine, r.run_id, _status(engine, "failed"))
    again = await client.post("/runs/bulk", data={"csrf": token, "action": "retry", "flow": "dash-fail",
                                                  "status": "failed"})
    assert again.status_code == 303 and "queued" in again.headers["location"]


async def test_csrf_is_required(engine: Engine, client: httpx.AsyncClient) -> None:
    run = await engine.handle("dash-wait").start(None, tags=["csrf"])
    await _until(engine, run.run_id, _status(engine, "awaiting_signal"))
    token = await _token(client, f"/runs/{run.run_id}")
    wrong = token[:-1] + ("B" if token.endswith("A") else "A")
    attempts = [
        (f"/runs/{run.run_id}/cancel", {}),
        (f"/runs/{run.run_id}/cancel", {"csrf": "x" * 43}),
        (f"/runs/{run.run_id}/signal", {"csrf": wrong, "name": "approve", "payload": '{"by": "x"}'}),
        ("/runs/bulk", {"action": "cancel", "tag": "csrf"}),
    ]
    for path, data in attempts:
        assert (await client.post(path, data=data)).status_code == 403, (path, data)
    # the right token in the form but no cookie: another site's form cannot send the cookie
    async with await _client(create_app(engine)) as fresh:
        assert (await fresh.post(f"/runs/{run.run_id}/cancel", data={"csrf": token})).status_code == 403
    detail = await engine.status(run.run_id)
    assert detail.run.status == "awaiting_signal" and detail.signals == []


async def test_read_only(engine: Engine) -> None:
    run = await engine.handle("dash-wait").start(None)
    await _until(engine, run.run_id, _status(engine, "awaiting_signal"))
    async with await _client(create_app(engine, read_only=True)) as client:
        page = await client.get(f"/runs/{run.run_id}")
        assert page.status_code == 200 and "read-only" in page.text
        assert "/cancel" not in page.text and "/signal" not in page.text
        assert "/runs/bulk" not in (await client.get("/", params={"flow": "dash-wait"})).text
        token = client.cookies.get("iterflow_csrf")
        for path in (f"/runs/{run.run_id}/cancel", f"/runs/{run.run_id}/retry", "/runs/bulk"):
            assert (await client.post(path, data={"csrf": token, "action": "cancel", "flow": "dash-wait"})
                    ).status_code == 403
    assert (await engine.status(run.run_id)).run.status == "awaiting_signal"


async def test_auth_hook(engine: Engine) -> None:
    seen: list[str] = []

    async def auth(request: Any) -> bool:
        seen.append(request.url.path)
        return request.headers.get("x-user") == "ops"

    run = await engine.handle("dash-wait").start(None)
    await _until(engine, run.run_id, _status(engine, "awaiting_signal"))
    async with await _client(create_app(engine, auth=auth)) as client:
        assert (await client.get("/")).status_code == 403
        assert (await client.get("/static/dashboard.css")).status_code == 403
        client.headers["x-user"] = "ops"
        token = await _token(client, f"/runs/{run.run_id}")
        client.headers["x-user"] = "mallory"
        assert (await client.post(f"/runs/{run.run_id}/cancel", data={"csrf": token})).status_code == 403
    assert "/" in seen and f"/runs/{run.run_id}/cancel" in seen
    assert (await engine.status(run.run_id)).run.status == "awaiting_signal"

    from starlette.responses import RedirectResponse

    def to_login(request: Any) -> Any:
        return RedirectResponse("/login?next=" + request.url.path, status_code=302)

    async with await _client(create_app(engine, auth=to_login)) as client:
        answer = await client.get("/flows")
        assert answer.status_code == 302 and answer.headers["location"] == "/login?next=/flows"


async def test_mounted_and_owned_engine(dsn: str, schema_name: str, make_engine: Callable[..., Any]) -> None:
    engine = await make_engine(wait)
    run = await engine.handle("dash-wait").start(None)
    from starlette.applications import Starlette
    from starlette.routing import Mount

    dashboard = create_app(dsn, schema=schema_name)
    host = Starlette(routes=[Mount("/ops/flows", app=dashboard)])
    async with await _client(host) as client:
        page = await client.get("/ops/flows/")
        assert page.status_code == 200
        assert f'href="/ops/flows/runs/{run.run_id}"' in page.text
        assert 'href="/ops/flows/static/dashboard.css"' in page.text
        token = await _token(client, f"/ops/flows/runs/{run.run_id}")
        answer = await client.post(f"/ops/flows/runs/{run.run_id}/cancel", data={"csrf": token})
        assert answer.status_code == 303 and answer.headers["location"].startswith(f"/ops/flows/runs/{run.run_id}")
    await dashboard.state.engine.stop()
    await _until(engine, run.run_id, _status(engine, "canceled"))


def test_create_app_checks_its_arguments(dsn: str) -> None:
    for kwargs, field in (({"read_only": "yes"}, "read_only"), ({"auth": 3}, "auth"), ({"refresh": 0}, "refresh")):
        with pytest.raises(InvalidArgument) as info:
            create_app(dsn, **kwargs)
        assert info.value.field == field if hasattr(info.value, "field") else field in str(info.value)
    with pytest.raises(InvalidArgument, match="target"):
        create_app(42)  # type: ignore[arg-type]


def test_cli_serves_the_dashboard(dsn: str, schema_name: str) -> None:
    """`iterflow dashboard --port 0` binds 127.0.0.1, prints its URL and serves the pages."""
    import subprocess
    import sys

    asyncio.run(iterflow.migrate(dsn, schema_name))
    proc = subprocess.Popen([sys.executable, "-m", "iterflow", "dashboard", "--dsn", dsn, "--schema", schema_name,
                             "--port", "0", "--read-only"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        found = re.match(r"iterflow dashboard: (http://127\.0\.0\.1:\d+/) .*read-only", line)
        assert found, line
        deadline = time.monotonic() + 10
        while True:
            try:
                page = httpx.get(found.group(1) + "flows", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the dashboard did not answer"
                time.sleep(0.1)
        assert page.status_code == 200 and "read-only" in page.text
    finally:
        proc.terminate()
        # uvicorn shuts down gracefully, then re-raises the signal it caught
        assert proc.wait(10) in (0, -15)
