"""The workers registry: which processes listen, what they serve, and when they were last seen.

A ``Worker`` announces itself when it starts and again once per heartbeat interval (one
statement per interval, whatever its load), and withdraws when it stops gracefully. A worker
that crashed simply stops announcing: its row is "gone" once unseen for a lease, and pruned a
day later. ``engine.list_workers()`` reads the registry (the dashboard's workers page), and
``engine.explain()`` uses it to say that no live worker serves a queued run's flow, or when
the holder of a lease last wrote. Statements: ``upsert_worker``, ``delete_worker``,
``list_workers`` (sql/queries.sql), through the cores' generic ``admin_query``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from .cores.base import Core
from .types import WorkerInfo

log = logging.getLogger("iterflow")
# Seconds a stopping worker waits to delete its row: a stop with the database down must not
# wait out the retry bound for it (the row then goes stale like a crashed worker's).
WITHDRAW_TIMEOUT = 2.0


@dataclass(frozen=True)
class Registration:
    """What one worker says about itself in the registry."""

    owner: str
    flows: tuple[str, ...]
    core: str
    concurrency: int
    lease_ms: int
    host: str
    pid: int

    @classmethod
    def of(cls, owner: str, flows: Iterable[tuple[str, int]], core: str, concurrency: int,
           lease_ms: int) -> Registration:
        served = tuple(sorted(f"{name}@{version}" for name, version in flows))
        return cls(owner=owner, flows=served, core=core, concurrency=concurrency, lease_ms=lease_ms,
                   host=socket.gethostname(), pid=os.getpid())

    async def announce(self, core: Core) -> None:
        """Write (or refresh) the row (``last_seen``: now). A failure is logged, never raised: the registry is for
        people and explanations, and must not stop a worker from working."""
        try:
            await core.admin_query("upsert_worker", self.owner, self.host, self.pid, list(self.flows),
                                   self.core, self.concurrency, self.lease_ms)
        except Exception as exc:  # noqa: BLE001 - the worker goes on; the next interval tries again
            log.warning("iterflow could not update the workers registry: %r", exc)

    async def withdraw(self, core: Core) -> None:
        """Delete the row at a graceful stop (a failure leaves it to go stale)."""
        try:
            await asyncio.wait_for(core.admin_query("delete_worker", self.owner), WITHDRAW_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - the row is then gone after a lease, pruned after a day
            log.warning("iterflow could not remove this worker from the registry: %r", exc)


async def list_workers(core: Core) -> list[WorkerInfo]:
    """Every worker in the registry, newest first, alive or not."""
    return [WorkerInfo.from_row(row) for row in await core.admin_query("list_workers")]
