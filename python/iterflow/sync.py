"""The blocking API: every client call usable from plain threads (Django, Flask, scripts).

Async pools and listeners belong to the event loop that opened them, so the blocking facade
owns a private client-only engine (same configuration, never listens) on a private loop in a
daemon thread, and each call waits for its coroutine there.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Mapping, Sequence
from concurrent.futures import Future
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from .handle import FlowHandle, SyncHandle

if TYPE_CHECKING:
    from .cores.base import RunFilter
    from .types import Explanation, RetryResult, RunDetail, RunPage, SignalResult, WorkerInfo

T = TypeVar("T")


class Client(Protocol):
    """The client calls of ``Engine`` the blocking facade forwards (engine.py implements it).

    A protocol, not the class: the engine builds its facade, so this module names only what it
    calls (docs/architecture.md §1)."""

    def handle(self, name: str, version: int = 1, input_schema: Any = None) -> FlowHandle: ...

    async def signal(self, run_id: str, name: str, payload: Any = None, *,
                     idempotency_key: str | None = None) -> SignalResult: ...

    async def cancel(self, run_id: str, reason: str | None = None) -> None: ...

    async def retry(self, run_id: str) -> RetryResult: ...

    async def status(self, run_id: str) -> RunDetail | None: ...

    async def explain(self, run_id: str) -> Explanation: ...

    async def list_workers(self) -> list[WorkerInfo]: ...

    async def list_runs(self, *, name: str | None = None, status: str | Sequence[str] | None = None,
                        tag: str | None = None, since: datetime | None = None, until: datetime | None = None,
                        limit: int = 50, cursor: str | None = None) -> RunPage: ...

    async def cancel_many(self, filter: Mapping[str, Any] | RunFilter, limit: int = 1000,
                          reason: str | None = None) -> int: ...

    async def retry_many(self, filter: Mapping[str, Any] | RunFilter, limit: int = 1000) -> int: ...

    async def stop(self) -> None: ...


class _LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="iterflow-sync", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self._thread:
            raise RuntimeError("iterflow: the blocking API cannot be called from its own loop thread")
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)


class SyncEngine:
    """``engine.sync``: the client calls of ``Engine``, blocking."""

    def __init__(self, client: Client) -> None:
        """``client`` is the engine's private clone (``Engine.clone_client``): its pool belongs to this loop."""
        self._thread = _LoopThread()
        self._client = client

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._thread.run(coro)

    def handle(self, name: str, version: int = 1, input_schema: Any = None) -> SyncHandle:
        return SyncHandle(self._thread, self._client.handle(name, version, input_schema))

    def signal(self, run_id: str, name: str, payload: Any = None, *,
               idempotency_key: str | None = None) -> SignalResult:
        return self._run(self._client.signal(run_id, name, payload, idempotency_key=idempotency_key))

    def cancel(self, run_id: str, reason: str | None = None) -> None:
        self._run(self._client.cancel(run_id, reason))

    def retry(self, run_id: str) -> RetryResult:
        return self._run(self._client.retry(run_id))

    def status(self, run_id: str) -> RunDetail | None:
        return self._run(self._client.status(run_id))

    def explain(self, run_id: str) -> Explanation:
        return self._run(self._client.explain(run_id))

    def list_workers(self) -> list[WorkerInfo]:
        return self._run(self._client.list_workers())

    def list_runs(self, *, name: str | None = None, status: str | Sequence[str] | None = None,
                  tag: str | None = None, since: datetime | None = None, until: datetime | None = None,
                  limit: int = 50, cursor: str | None = None) -> RunPage:
        return self._run(self._client.list_runs(name=name, status=status, tag=tag, since=since, until=until,
                                                limit=limit, cursor=cursor))

    def cancel_many(self, filter: Mapping[str, Any] | RunFilter, limit: int = 1000) -> int:
        return self._run(self._client.cancel_many(filter, limit))

    def retry_many(self, filter: Mapping[str, Any] | RunFilter, limit: int = 1000) -> int:
        return self._run(self._client.retry_many(filter, limit))

    def close(self) -> None:
        """Close the private client and its thread (also done at interpreter exit)."""
        self._run(self._client.stop())
        self._thread.close()
