"""The dashboard in a real browser: headless Chromium driven over WebDriver (chromedriver), the
app served by uvicorn on a free port. Load the runs list, open a run, see its timeline, cancel
it (confirming the browser's dialog) and see the new status.

The WebDriver client is the few W3C endpoints this needs, over httpx (no Selenium). Skips
when Chromium or chromedriver is not installed (Debian: ``apt-get install chromium
chromium-driver``; .ci/run installs them). With ``ITERFLOW_SCREENSHOTS=1`` it also writes
``docs/img/dashboard-runs.png`` and ``docs/img/dashboard-run.png``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from iterflow import Engine, FlowRuntimeError, define_flow
from iterflow.dashboard import create_app

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C key of an element reference

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Chromium and chromedriver (Debian: apt-get install chromium chromium-driver)",
)


def work(seconds: float) -> Callable[[], Any]:
    """A step that takes ``seconds`` (so the timeline has something to draw)."""
    async def run() -> str:
        await asyncio.sleep(seconds)
        return "ok"
    return run


@define_flow("order")
async def order(ctx, inp):
    await ctx.step("reserve-stock", work(0.08))
    await ctx.step("charge-card", work(0.15))
    await ctx.sleep("120ms")
    await ctx.invoke(ship, {"order": inp})
    await ctx.step("send-receipt", work(0.05))
    return {"order": inp, "status": "complete"}


@define_flow("ship")
async def ship(ctx, inp):
    await ctx.step("label", lambda: "L-1")
    await ctx.sleep("60ms")
    return {"shipped": inp["order"]}


@define_flow("approval")
async def approval(ctx, _inp):
    await ctx.step("prepare", lambda: "ready")
    return await ctx.signal("approve")


@define_flow("refund")
async def refund(ctx, _inp):
    def declined() -> None:
        raise FlowRuntimeError("CARD_DECLINED", "the card was declined", non_retryable=True)

    await ctx.step("refund-card", declined)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Browser:
    """A WebDriver session: the calls this test makes, each one W3C endpoint."""

    def __init__(self, http: httpx.AsyncClient, session: str) -> None:
        self.http = http
        self.session = session

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        answer = await self.http.request(method, f"/session/{self.session}{path}", json=body)
        value = answer.json()["value"]
        if answer.status_code != 200:
            raise AssertionError(f"WebDriver {method} {path}: {value.get('error')}: {value.get('message')}")
        return value

    async def go(self, url: str) -> None:
        await self._call("POST", "/url", {"url": url})

    async def find(self, css: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            answer = await self.http.post(f"/session/{self.session}/elements",
                                          json={"using": "css selector", "value": css})
            found = answer.json()["value"]
            if found:
                return str(found[0][ELEMENT])
            assert time.monotonic() < deadline, f"no element {css!r} on the page"
            await asyncio.sleep(0.1)

    async def text(self, css: str) -> str:
        return str(await self._call("GET", f"/element/{await self.find(css)}/text"))

    async def click(self, css: str) -> None:
        await self._call("POST", f"/element/{await self.find(css)}/click", {})

    async def accept_dialog(self) -> str:
        message = str(await self._call("GET", "/alert/text"))
        await self._call("POST", "/alert/accept", {})
        return message

    async def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(await self._call("GET", "/screenshot")))


@contextlib.asynccontextmanager
async def browser() -> AsyncIterator[Browser]:
    port = _free_port()
    assert CHROMEDRIVER is not None and CHROMIUM is not None
    driver = subprocess.Popen([CHROMEDRIVER, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            deadline = time.monotonic() + 20
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get("/status")).json()["value"]["ready"]:
                        break
                assert time.monotonic() < deadline, "chromedriver did not start"
                await asyncio.sleep(0.1)
            options = {"binary": CHROMIUM, "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                                                    "--disable-dev-shm-usage", "--window-size=1360,1000"]}
            created = await http.post("/session", json={"capabilities": {"alwaysMatch": {
                "browserName": "chrome", "goog:chromeOptions": options}}})
            assert created.status_code == 200, created.text
            session = created.json()["value"]["sessionId"]
            try:
                yield Browser(http, session)
            finally:
                await http.delete(f"/session/{session}")
    finally:
        driver.terminate()
        driver.wait(10)


@contextlib.asynccontextmanager
async def served(engine: Engine) -> AsyncIterator[str]:
    """The dashboard over real HTTP (uvicorn) on this event loop, so it shares the engine."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(engine, refresh=1.0), log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            await asyncio.sleep(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task


async def _until(engine: Engine, run_id: str, status: str) -> None:
    deadline = time.monotonic() + 15
    while (await engine.status(run_id)).run.status != status:
        assert time.monotonic() < deadline, f"run {run_id} never became {status}"
        await asyncio.sleep(0.02)


async def test_list_open_cancel_in_a_browser(make_engine: Callable[..., Any]) -> None:
    engine = await make_engine(order, ship, approval, refund)
    done = [await engine.handle("order").start(f"A-{i}", tags=["shop"]) for i in range(3)]
    failed = await engine.handle("refund").start(None, tags=["shop"])
    waiting = [await engine.handle("approval").start(None, tags=["review"]) for _ in range(2)]
    for r in done:
        await _until(engine, r.run_id, "done")
    await _until(engine, failed.run_id, "failed")
    for r in waiting:
        await _until(engine, r.run_id, "awaiting_signal")
    shots = os.environ.get("ITERFLOW_SCREENSHOTS") == "1"

    async with served(engine) as url, browser() as web:
        await web.go(url + "/")
        assert "awaiting_signal" in await web.text(f'tr[data-run="{waiting[0].run_id}"]')
        if shots:
            await web.screenshot(ROOT / "docs" / "img" / "dashboard-runs.png")

        await web.go(f"{url}/runs/{done[0].run_id}")
        await web.find("svg.timeline g.k-child rect")
        if shots:
            await web.screenshot(ROOT / "docs" / "img" / "dashboard-run.png")

        # from the list to the waiting run, by its link
        await web.go(url + "/?status=awaiting_signal")
        await web.click(f'a[href="/runs/{waiting[0].run_id}"]')
        await web.find("svg.timeline")
        assert "awaiting_signal" in await web.text("h1 .status")
        await web.click("#cancel")
        assert "Cancel this run" in await web.accept_dialog()
        deadline = time.monotonic() + 15
        while "canceled" not in await web.text("h1 .status"):
            assert time.monotonic() < deadline, "the page never showed the run canceled"
            await asyncio.sleep(0.2)
        assert "cancel requested" in await web.text(".notice")
    assert (await engine.status(waiting[0].run_id)).run.status == "canceled"
    assert (await engine.status(waiting[1].run_id)).run.status == "awaiting_signal"
