"""Crashes with real worker processes (docs/operations.md §3): ``kill -9`` between steps, a stale
worker fenced after its lease was handed over, a poison pill that crashes every worker, and a
PostgreSQL server that dies mid-run (a private cluster, stopped with ``-m immediate``).

The workers are ``tests/workers/crash_worker.py`` subprocesses; side effects are counted in a
table, so "ran once" means once in the database, whatever happened to the processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
from tests.processes import WorkerProcesses

import iterflow
from iterflow import Code, RunFailed


async def rows(dsn: str, query: str, *args: Any) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(query, args or None)
        return await cur.fetchall() if cur.description else []


class Workers:
    """``crash_worker.py`` subprocesses (tests/processes.py): a mode per worker (see the
    script), its lease and poison limit."""

    def __init__(self, dsn: str, schema: str, core: str, logs: Path) -> None:
        self.processes = WorkerProcesses("crash_worker.py", dsn, schema, core, logs)
        self.procs = self.processes.procs
        self.output = self.processes.output
        self.cleanup = self.processes.cleanup

    def start(
        self, label: str, mode: str, *, lease: str = "1s", max_run_attempts: int = 100,
        extra: Sequence[str] = (),
    ) -> subprocess.Popen[bytes]:
        return self.processes.start(label, "--mode", mode, "--lease", lease,
                                    "--max-run-attempts", str(max_run_attempts), *extra)


@pytest.fixture
def workers(dsn: str, schema_name: str, core: str, tmp_path: Path) -> Iterator[Workers]:
    w = Workers(dsn, schema_name, core, tmp_path)
    yield w
    w.cleanup()


@pytest.fixture
async def client(make_engine: Any, dsn: str, schema_name: str) -> Any:
    """A client-only engine on a migrated schema, plus the side-effect and flag tables."""
    engine = await make_engine(listen=False, poll_interval=0.1)
    await rows(dsn, f'CREATE TABLE "{schema_name}".effects (id serial, run_id text, what text, worker text)')
    await rows(dsn, f'CREATE TABLE "{schema_name}".flags (name text)')
    return engine


async def effects(dsn: str, schema: str, what: str | None = None) -> list[tuple[str, str]]:
    found = await rows(dsn, f'SELECT what, worker FROM "{schema}".effects ORDER BY id')
    return [(w, by) for w, by in found if what is None or w == what]


async def wait_for(predicate: Any, workers: Workers, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s\n{workers.output()}")
        await asyncio.sleep(0.05)


async def step_rows(dsn: str, schema: str, run_id: str) -> dict[str, tuple[Any, ...]]:
    found = await rows(
        dsn,
        f'SELECT key, status, result, attempts, finished_at FROM "{schema}".steps WHERE run_id = %s',
        run_id,
    )
    return {r[0]: r[1:] for r in found}


async def test_memo_exactly_once_across_kill_9(
    client: Any, workers: Workers, dsn: str, schema_name: str
) -> None:
    started = await client.handle("memo").start()
    a = workers.start("A", "block")
    await wait_for(lambda: _has(dsn, schema_name, "two"), workers, what="worker A inside step two")
    a.send_signal(signal.SIGKILL)
    assert a.wait(timeout=10) == -signal.SIGKILL

    workers.start("B", "finish")
    try:
        out = await client.handle("memo").result(started.run_id, timeout=30)
    except TimeoutError:
        raise AssertionError(f"run did not finish\n{workers.output()}") from None
    assert out == {"one": "one by A", "two": {"by": "B"}, "finisher": "B"}

    assert await effects(dsn, schema_name, "one") == [("one", "A")], "a completed step never re-runs"
    assert await effects(dsn, schema_name, "two") == [("two", "A"), ("two", "B")], (
        "a crashed step re-runs once"
    )
    recorded = await step_rows(dsn, schema_name, started.run_id)
    assert set(recorded) == {"one", "two"}
    assert recorded["one"][:3] == ("done", "one by A", 1)
    assert recorded["two"][:3] == ("done", {"by": "B"}, 1)
    ((attempts, status),) = await rows(
        dsn, f'SELECT attempts, status FROM "{schema_name}".runs WHERE id = %s', started.run_id
    )
    assert (attempts, status) == (2, "done")
    assert await rows(dsn, f'SELECT count(*) FROM "{schema_name}".queue') == [(0,)]


async def test_lease_expiry_hands_over_and_fences_the_stale_worker(
    client: Any, workers: Workers, dsn: str, schema_name: str
) -> None:
    started = await client.handle("memo").start()
    a = workers.start("A", "stall")
    await wait_for(lambda: _has(dsn, schema_name, "two"), workers, what="worker A stalled in step two")

    # A's event loop is blocked: its lease expires and B takes the run over and finishes it
    workers.start("B", "finish")
    try:
        out = await client.handle("memo").result(started.run_id, timeout=30)
    except TimeoutError:
        raise AssertionError(f"run was not handed over\n{workers.output()}") from None
    assert out == {"one": "one by A", "two": {"by": "B"}, "finisher": "B"}
    before = await rows(
        dsn, f'SELECT status, output, error, updated_at, finished_at FROM "{schema_name}".runs'
    )
    steps_before = await step_rows(dsn, schema_name, started.run_id)

    # now let the stale worker finish its step and try to record it and complete the run
    await release(dsn, schema_name, "A")
    await wait_for(lambda: _has(dsn, schema_name, "late"), workers, what="worker A's late return")
    await asyncio.sleep(0.5)
    a.send_signal(signal.SIGTERM)
    assert a.wait(timeout=15) == 0, workers.output()
    assert "stopped" in workers.output()

    after = await rows(
        dsn, f'SELECT status, output, error, updated_at, finished_at FROM "{schema_name}".runs'
    )
    assert after == before, "the stale worker's late writes must lose"
    assert await step_rows(dsn, schema_name, started.run_id) == steps_before
    assert steps_before["two"][:3] == ("done", {"by": "B"}, 1)
    assert await effects(dsn, schema_name, "one") == [("one", "A")]
    assert await effects(dsn, schema_name, "late") == [("late", "A")]
    assert await rows(dsn, f'SELECT count(*) FROM "{schema_name}".queue') == [(0,)]


async def test_stale_worker_loses_to_the_lease_holder_mid_run(
    client: Any, workers: Workers, dsn: str, schema_name: str
) -> None:
    """The stale worker comes back while the new holder is still inside the same step: its step
    record is the first writer (and so wins), but its completion of the run is fenced; the new
    holder then gets the stored record, not its own result, and finishes the run."""
    started = await client.handle("memo").start()
    a = workers.start("A", "stall")
    await wait_for(lambda: _has(dsn, schema_name, "two"), workers, what="worker A stalled in step two")
    workers.start("B", "gate")

    async def b_inside_step_two() -> bool:
        return ("two", "B") in await effects(dsn, schema_name, "two")

    await wait_for(b_inside_step_two, workers, what="worker B inside step two")
    await release(dsn, schema_name, "A")
    await wait_for(lambda: _has(dsn, schema_name, "late"), workers, what="worker A's late return")
    a.send_signal(signal.SIGTERM)
    assert a.wait(timeout=15) == 0, workers.output()

    ((status, output, waiting),) = await rows(
        dsn, f'SELECT status, output, waiting FROM "{schema_name}".runs WHERE id = %s', started.run_id
    )
    assert (status, output) == ("running", None), "the stale worker must not complete or release the run"
    b_pid = workers.procs[1].pid
    assert f":{b_pid}:" in waiting["worker"], waiting
    ((holder,),) = await rows(
        dsn, f'SELECT lease_owner FROM "{schema_name}".queue WHERE run_id = %s', started.run_id
    )
    assert f":{b_pid}:" in holder, "B still holds the lease"
    recorded = await step_rows(dsn, schema_name, started.run_id)
    assert recorded["two"][:2] == ("done", {"by": "A"}), "first writer of the step record wins"

    await release(dsn, schema_name, "B")
    out = await client.handle("memo").result(started.run_id, timeout=30)
    assert out == {"one": "one by A", "two": {"by": "A"}, "finisher": "B"}
    assert await step_rows(dsn, schema_name, started.run_id) == recorded, "the record is written once"
    assert [w for _, w in await effects(dsn, schema_name, "late")] == ["A", "B"]


async def test_stale_lease_token_is_fenced_at_the_core(make_engine: Any, dsn: str, schema_name: str) -> None:
    """The fencing the worker relies on, without timing luck: a holder whose lease expired and
    was re-claimed can neither complete, suspend, nor renew the run."""
    engine = await make_engine(listen=False)
    core = await engine.client()
    run_id = (await engine.handle("memo").start()).run_id
    (old,) = await core.claim(["memo"], 1, "old-worker", 500)
    await asyncio.sleep(0.7)
    assert await core.expire_leases(10) == 1
    (new,) = await core.claim(["memo"], 1, "new-worker", 30_000)
    assert new.run_id == run_id and new.lease_token != old.lease_token and new.attempts == 2

    assert not await core.finish(run_id, old.lease_token, "done", '"stale"', None)
    assert not await core.suspend(run_id, old.lease_token, "sleeping", '{"kind": "sleep"}', None, None)
    (state,) = await core.heartbeat([(run_id, old.lease_token)], 30_000)
    assert not state.held
    ((status, output),) = await rows(
        dsn, f'SELECT status, output FROM "{schema_name}".runs WHERE id = %s', run_id
    )
    assert (status, output) == ("running", None)
    ((owner,),) = await rows(dsn, f'SELECT lease_owner FROM "{schema_name}".queue WHERE run_id = %s', run_id)
    assert owner == "new-worker"

    (state,) = await core.heartbeat([(run_id, new.lease_token)], 30_000)
    assert state.held
    assert await core.finish(run_id, new.lease_token, "done", '"fresh"', None)
    assert not await core.finish(run_id, new.lease_token, "failed", None, None), "terminal never changes"
    assert await rows(dsn, f'SELECT status, output FROM "{schema_name}".runs') == [("done", "fresh")]


async def test_poison_pill_fails_without_executing(
    client: Any, workers: Workers, dsn: str, schema_name: str
) -> None:
    started = await client.handle("poison").start()
    for label in ("W1", "W2"):
        proc = workers.start(label, "die", max_run_attempts=2)
        try:
            code = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{label} did not crash\n{workers.output()}") from None
        assert code == 3, workers.output()
    assert [w for _, w in await effects(dsn, schema_name, "poison")] == ["W1", "W2"]

    last = workers.start("W3", "die", max_run_attempts=2)
    with pytest.raises(RunFailed) as info:
        await client.handle("poison").result(started.run_id, timeout=30)
    assert info.value.code == Code.RUN_ATTEMPTS_EXHAUSTED
    assert last.poll() is None, "the last worker must not have executed the step"
    assert [w for _, w in await effects(dsn, schema_name, "poison")] == ["W1", "W2"]
    assert await step_rows(dsn, schema_name, started.run_id) == {}
    ((attempts, status),) = await rows(
        dsn, f'SELECT attempts, status FROM "{schema_name}".runs WHERE id = %s', started.run_id
    )
    assert (attempts, status) == (3, "failed")


async def test_a_worker_killed_inside_continue_as_new_leaves_exactly_one_successor(
    client: Any, workers: Workers, dsn: str, schema_name: str
) -> None:
    # docs/guide.md, "Loops that run forever": the end of a run and its successor's start are one
    # transaction. Worker A is killed while that transaction waits for a row lock; whether its
    # orphaned backend then commits or not, and whatever worker B does next, there is one successor.
    started = await client.handle("relay").start(0)
    a = workers.start("A", "gate")
    await wait_for(lambda: _has(dsn, schema_name, "relay-0"), workers, what="worker A inside the step")
    async with await psycopg.AsyncConnection.connect(dsn) as blocker:
        await blocker.execute(f'SELECT 1 FROM "{schema_name}".runs WHERE id = %s FOR NO KEY UPDATE',
                              (started.run_id,))
        await release(dsn, schema_name, "A")

        async def continuing() -> bool:
            return bool(await rows(
                dsn, "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s",
                f"%{schema_name}%continue_run%",
            ))

        await wait_for(continuing, workers, what="worker A's continuation waiting for the row lock")
        a.send_signal(signal.SIGKILL)
        assert a.wait(timeout=10) == -signal.SIGKILL
        workers.start("B", "finish")
        await blocker.rollback()
    try:
        out = await client.handle("relay").result(started.run_id, timeout=30)
    except TimeoutError:
        raise AssertionError(f"the chain did not finish\n{workers.output()}") from None
    assert out == {"n": 1, "by": "B"}
    chain = await rows(dsn, f'SELECT id::text, continued_from::text, continued_to::text, status'
                            f' FROM "{schema_name}".runs ORDER BY created_at')
    assert len(chain) == 2, chain
    (first, second) = chain
    assert first == (started.run_id, None, second[0], "done")
    assert second[1:] == (started.run_id, None, "done")
    assert await effects(dsn, schema_name, "relay-0") == [("relay-0", "A")], "the recorded step never re-runs"


async def release(dsn: str, schema: str, label: str) -> None:
    await rows(dsn, f'INSERT INTO "{schema}".flags VALUES (%s)', f"release-{label}")


async def _has(dsn: str, schema: str, what: str) -> bool:
    return bool(await effects(dsn, schema, what))


# -- the database server crashes -----------------------------------------------------------------
def _server_bindir() -> Path | None:
    """Where ``initdb`` and ``pg_ctl`` live (Debian's layout, else ``pg_config --bindir``)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if found:
        return found[-1].parent
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        bindir = Path(subprocess.run([pg_config, "--bindir"], capture_output=True, text=True).stdout.strip())
        if (bindir / "initdb").exists() and (bindir / "pg_ctl").exists():
            return bindir
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateServer:
    """A throwaway PostgreSQL cluster a test may crash. PostgreSQL refuses to run as root, so
    under root its commands run as user ``postgres`` (``runuser``)."""

    def __init__(self, bindir: Path, root: Path, as_user: str | None) -> None:
        self.bindir, self.data, self.as_user = bindir, root / "data", as_user
        self.port = _free_port()
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        cmd = [str(self.bindir / tool), *args]
        if self.as_user is not None:
            cmd = ["runuser", "-u", self.as_user, "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise AssertionError(f"{tool} {args[:2]} failed: {done.stdout}{done.stderr}")

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync")

    def start(self) -> None:
        # durable commits as in production; the WAL writer waits 10 s, so WAL that only an
        # asynchronous commit wrote is still unflushed when the test crashes the server
        options = (f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=on "
                   "-c synchronous_commit=on -c wal_writer_delay=10000 -c max_connections=40")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.data / "server.log"), "-w", "-o", options, "start")

    def crash(self) -> None:
        """Stop without a checkpoint or a WAL flush, as a power cut would (on this host's page cache)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "stop")

    def stop(self, mode: str = "fast") -> None:
        """Stop and wait until the server is down (``fast``: every session is terminated)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")



@pytest.fixture
def private_server() -> Iterator[PrivateServer]:
    bindir = _server_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) on this machine")
    as_user = None
    if os.geteuid() == 0:
        if shutil.which("runuser") is None or not _user_exists("postgres"):
            pytest.skip("running as root without a `postgres` user to run a private server as")
        as_user = "postgres"
    root = Path(tempfile.mkdtemp(prefix="iterflow-pg-"))
    if as_user is not None:
        shutil.chown(root, as_user)
    server = PrivateServer(bindir, root, as_user)
    try:
        server.init()
        server.start()
        yield server
    finally:
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):  # (already down)
            server.crash()
        shutil.rmtree(root, ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


async def test_a_recorded_step_survives_a_database_crash(
    private_server: PrivateServer, core: str, tmp_path: Path
) -> None:
    """The server dies (no checkpoint, unflushed WAL lost) while a worker is inside a run's
    second step, and the worker is killed too. After a restart the first step's record is still
    there, so only the second step runs again: a step's record is acknowledged only once its
    commit is flushed, whatever the claims beside it skipped (a claim commits without waiting
    for the flush; one lost in a crash leaves its run claimable). The side effects go to a file:
    a durable INSERT of them would flush the WAL, and with it any write acknowledged early."""
    dsn, schema = private_server.dsn, "crash"
    await iterflow.migrate(dsn, schema)
    effects_file = tmp_path / "effects.txt"
    effects_file.touch()
    extra = ["--effects-file", str(effects_file)]
    starter = iterflow.create_engine(dsn, schema=schema, core=core)
    started = await starter.handle("filed").start()
    await starter.stop()
    workers = Workers(dsn, schema, core, tmp_path)
    try:
        a = workers.start("A", "block", extra=extra)
        deadline = time.monotonic() + 30
        while "two A" not in effects_file.read_text():
            assert time.monotonic() < deadline, f"worker A never reached step two\n{workers.output()}"
            await asyncio.sleep(0.05)
        private_server.crash()
        a.kill()
        a.wait(timeout=10)
        private_server.start()
        workers.start("B", "finish", extra=extra)
        reader = iterflow.create_engine(dsn, schema=schema, core=core)
        try:
            out = await reader.handle("filed").result(started.run_id, timeout=30)
        except TimeoutError:
            raise AssertionError(f"run did not finish after the restart\n{workers.output()}") from None
        finally:
            await reader.stop()
    finally:
        workers.cleanup()
    assert out == {"one": "one by A", "two": "two by B"}
    assert effects_file.read_text().splitlines() == ["one A", "two A", "two B"], "a recorded step never re-runs"
