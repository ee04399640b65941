"""The ``iterflow`` command line (also ``python -m iterflow``).

Exit codes: 0 the operation succeeded; 1 it failed (an iterflow error prints
``error [CODE]: message``, a database fault or error ``error: ...``); 2 the command line was
wrong. A database fault (the server down or restarting) is retried for ``--retry-timeout``
(5 s: a command line should not hang for the engine's 30 s default) before it fails.

Client commands (``runs ...``, ``signal``) open an engine that never calls ``listen()``: they
read and write rows, they never execute flows. The DSN comes from ``--dsn``, else
``$DATABASE_URL``, else the embedded Postgres of :mod:`iterflow.embedded`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib
import inspect
import json
import logging
import os
import re
import signal as signals
import sys
import uuid
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime
from typing import Any

from .embedded import database_url
from .errors import DatabaseError, DatabaseUnavailable, EmbeddedUnavailable, IterflowError, RunNotFound
from .sql import validate_schema_name
from .types import STATUSES, TERMINAL, require_run_id

MAX_CELL = 60
# How long a command retries a database fault before it fails (the engine default is 30s).
CLI_RETRY_TIMEOUT = "5s"
# The logger of the client commands' engine (quiet: a command prints its own outcome).
CLIENT_LOGGER = "iterflow.cli"


class UsageError(Exception):
    """A command line that cannot be acted on (exit code 2)."""


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------
def _schema_type(value: str) -> str:
    try:
        return validate_schema_name(value)
    except IterflowError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _limit_type(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if not 1 <= n <= 500:
        raise argparse.ArgumentTypeError(f"{n} is out of range (1 to 500)")
    return n


def _redact(dsn: str) -> str:
    """Hide a password in a DSN before printing it."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", dsn)


def _resolve_dsn(explicit: str | None) -> str:
    """``--dsn``, else ``embedded.database_url``; no database at all is a usage error (exit 2)."""
    try:
        return database_url(explicit, announce=lambda line: print(line, file=sys.stderr))
    except EmbeddedUnavailable as exc:
        raise UsageError(exc.message) from None


def _check_run_id(run_id: str) -> str:
    """A run id that is not a UUID cannot exist: report it as not found (exit 1), not a DB error."""
    require_run_id(run_id)
    return run_id


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if type(value).__name__ == "Waiting":
            out["text"] = str(value)
        return out
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "total_seconds"):
        return value.total_seconds()
    return value


def _compact(value: Any, width: int | None = MAX_CELL) -> str:
    if value is None:
        return "-"
    text = value if isinstance(value, str) else json.dumps(_jsonable(value), separators=(",", ":"),
                                                          ensure_ascii=False)
    if width is not None and len(text) > width:
        return text[: width - 3] + "..."
    return text


def _when(value: Any) -> str:
    if not isinstance(value, datetime):
        return "-"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _offset(value: Any, origin: datetime) -> str:
    if not isinstance(value, datetime):
        return "-"
    seconds = (value - origin).total_seconds()
    return f"+{seconds:.3f}s" if seconds < 3600 else f"+{seconds / 3600:.2f}h"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def _error_text(error: Any) -> str:
    if not error:
        return "-"
    return f"{error.get('code')}: {error.get('message')}"


# ---------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------
def _client(args: argparse.Namespace) -> Any:
    from .engine import create_engine

    dsn = _resolve_dsn(args.dsn)
    # notify=False: a one-shot client needs no LISTEN connection (signal, cancel and retry
    # notify workers from SQL either way). core defaults to "python": a single client call
    # gains nothing from starting the Rust core's runtime (see --core).
    return create_engine(dsn, schema=args.schema, notify=False, core=args.core,
                         database_retry_timeout=args.retry_timeout, logger=logging.getLogger(CLIENT_LOGGER))


async def _with_client(args: argparse.Namespace, body: Callable[[Any], Coroutine[Any, Any, int]]) -> int:
    engine = _client(args)
    try:
        return await body(engine)
    finally:
        await engine.stop()
        # Engine.client() opens the core before checking the schema; when that check fails
        # (SCHEMA_MISMATCH) the engine is not marked open and stop() leaves the core's pool
        # running, which can hang or abort interpreter exit. Closing it again is harmless.
        await engine.core.close()


async def cmd_migrate(args: argparse.Namespace) -> int:
    from .migrate import migrate

    dsn = _resolve_dsn(args.dsn)
    print(f"applying migrations to schema {args.schema!r} on {_redact(dsn)} ...", flush=True)
    version = await migrate(dsn, args.schema, database_retry_timeout=args.retry_timeout)
    print(f"schema {args.schema!r} is at version {version}")
    return 0


async def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return await run_demo(args.dsn)


async def cmd_runs_list(args: argparse.Namespace) -> int:
    async def body(engine: Any) -> int:
        page = await engine.list_runs(name=args.name, status=args.status, tag=args.tag, limit=args.limit,
                                      cursor=args.cursor)
        if args.json:
            print(json.dumps({"runs": _jsonable(page.runs), "next": page.next}, indent=2, ensure_ascii=False))
            return 0
        if not page.runs:
            print("no runs match")
            return 0
        rows = []
        for r in page.runs:
            detail = _error_text(r.error) if r.status in ("failed", "canceled") else (
                str(r.waiting) if r.waiting is not None else "")
            rows.append((r.run_id, f"{r.name}@{r.version}", r.status, r.attempts, _when(r.created_at),
                         ",".join(r.tags) or "-", _compact(detail or "-", 70)))
        print(_table(("RUN ID", "FLOW", "STATUS", "TRIES", "CREATED (UTC)", "TAGS", "WAITING / ERROR"), rows))
        if page.next:
            print(f"\nmore runs: add --cursor {page.next}")
        return 0

    return await _with_client(args, body)


def _show_text(detail: Any) -> str:
    run = detail.run
    origin = run.created_at
    out = [
        f"run       {run.run_id}",
        f"flow      {run.name}@{run.version}",
        f"status    {run.status}" + (f" - {run.waiting}" if run.waiting is not None else ""),
        f"attempts  {run.attempts}",
        f"tags      {', '.join(run.tags) or '-'}",
        f"created   {_when(run.created_at)} UTC",
        f"updated   {_when(run.updated_at)} UTC",
        f"input     {_compact(run.input, None)}",
    ]
    if run.continued_from:
        out.append(f"continues {run.continued_from}")
    if run.continued_to:
        out.append(f"continued as new: {run.continued_to}")
    elif run.status == "done":
        out.append(f"output    {_compact(run.output, None)}")
    if run.error:
        out.append(f"error     {_error_text(run.error)}")
        if run.error.get("cause"):
            out.append(f"cause     {_compact(run.error['cause'], None)}")
    out.append("")
    out.append("steps (times relative to the run's creation):")
    rows: list[tuple[Any, ...]]
    if detail.steps:
        rows = []
        for s in detail.steps:
            if s.get("error"):
                note = _error_text(s["error"])
            elif s["kind"] == "sleep" and s.get("deadline") is not None:
                note = f"until {_offset(s['deadline'], origin)}"
            elif s["kind"] == "signal" and s["status"] == "waiting":
                note = f"timeout at {_offset(s.get('deadline'), origin)}"
            elif s["kind"] == "invoke" and s.get("child_id"):
                note = f"child {s['child_id']}" + (f" -> {_compact(s['result'], 40)}" if s["status"] == "done" else "")
            else:
                note = _compact(s.get("result"), 50)
            rows.append((s["seq"], s["key"], s["kind"], s["status"], s["attempts"] or "",
                         _offset(s.get("created_at"), origin), _offset(s.get("finished_at"), origin), note))
        out.append(_indent(_table(("#", "KEY", "KIND", "STATUS", "TRIES", "RECORDED", "FINISHED", "RESULT / NOTE"),
                                  rows)))
    else:
        out.append("  (none yet)")
    if detail.signals:
        out.append("")
        out.append("signals:")
        rows = [(s["id"], s["name"], _offset(s["received_at"], origin), _offset(s.get("consumed_at"), origin),
                 s.get("consumed_by") or "-", s.get("idempotency_key") or "-", _compact(s.get("payload"), 40))
                for s in detail.signals]
        out.append(_indent(_table(("ID", "NAME", "RECEIVED", "CONSUMED", "BY", "KEY", "PAYLOAD"), rows)))
    if detail.children:
        out.append("")
        out.append("children:")
        rows = [(c["id"], f"{c['name']}@{c['version']}", c["status"], c.get("parent_key") or "-",
                 _offset(c.get("created_at"), origin), _offset(c.get("finished_at"), origin))
                for c in detail.children]
        out.append(_indent(_table(("RUN ID", "FLOW", "STATUS", "KEY", "CREATED", "FINISHED"), rows)))
    if detail.timers and run.status not in TERMINAL:
        out.append("")
        out.append("timers:")
        rows = []
        for t in detail.timers:
            if t.get("kind") == "queue":
                lease = f"leased by {t['lease_owner']} until {_when(t['lease_until'])}" if t.get("lease_owner") else ""
                rows.append(("queue", "-", _when(t.get("ready_at")), lease))
            else:
                rows.append((t.get("kind"), t.get("key"), _when(t.get("deadline")), ""))
        out.append(_indent(_table(("KIND", "KEY", "DUE (UTC)", "NOTE"), rows)))
    if detail.events:
        out.append("")
        out.append("events:")
        rows = [(_offset(e["at"], origin), e["kind"], _compact(e.get("data"), 70)) for e in detail.events]
        out.append(_indent(_table(("AT", "KIND", "DATA"), rows)))
    return "\n".join(out)


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


async def cmd_runs_show(args: argparse.Namespace) -> int:
    run_id = _check_run_id(args.run_id)

    async def body(engine: Any) -> int:
        detail = await engine.status(run_id)
        if detail is None:
            raise RunNotFound(run_id)
        if args.json:
            print(json.dumps(_jsonable(detail), indent=2, ensure_ascii=False))
        else:
            print(_show_text(detail))
        return 0

    return await _with_client(args, body)


async def cmd_runs_explain(args: argparse.Namespace) -> int:
    run_id = _check_run_id(args.run_id)

    async def body(engine: Any) -> int:
        explanation = await engine.explain(run_id)
        if args.json:
            print(json.dumps(explanation.to_dict(), indent=2, ensure_ascii=False))
        else:
            print(explanation)
        return 0

    return await _with_client(args, body)


async def cmd_runs_cancel(args: argparse.Namespace) -> int:
    run_id = _check_run_id(args.run_id)

    async def body(engine: Any) -> int:
        before = await engine.status(run_id)
        if before is None:
            raise RunNotFound(run_id)
        if before.run.status in TERMINAL:
            print(f"run {run_id} is already {before.run.status}; nothing to cancel")
            return 0
        await engine.cancel(run_id, args.reason)
        after = await engine.status(run_id)
        if after is not None and after.run.status == "canceled":
            print(f"canceled run {run_id} (and any live descendants)")
        else:
            print(f"cancel requested for run {run_id}: it is running on a worker, which cancels it at its "
                  "next lease renewal or write")
        return 0

    return await _with_client(args, body)


async def cmd_runs_retry(args: argparse.Namespace) -> int:
    run_id = _check_run_id(args.run_id)

    async def body(engine: Any) -> int:
        res = await engine.retry(run_id)
        if res.kind == "missing":
            raise RunNotFound(run_id)
        if res.kind == "not_failed":
            detail = await engine.status(run_id)
            status = detail.run.status if detail is not None else "unknown"
            print(f"error: run {run_id} is {status}; only failed runs can be retried", file=sys.stderr)
            return 1
        print(f"run {run_id} queued again (failed step records dropped, completed ones kept)")
        return 0

    return await _with_client(args, body)


SIGNAL_TEXT = {
    "delivered": "the run was waiting for it and resumes",
    "buffered": "the run is not waiting for it yet; queued for its next wait on that name",
    "duplicate": "this idempotency key was already accepted for the run; nothing new stored",
    "expired": "the wait this signal would satisfy already timed out; nothing stored",
    "invalid_payload": "the declared schema rejected the payload; nothing stored",
    "closed": "the run is finished; nothing stored",
}


async def cmd_signal(args: argparse.Namespace) -> int:
    run_id = _check_run_id(args.run_id)
    raw = sys.stdin.read() if args.payload == "-" else args.payload
    try:
        payload = json.loads(raw)
    except ValueError as exc:
        raise UsageError(f"JSON: not valid JSON ({exc}); quote it for the shell, e.g. '{{\"ok\": true}}'") from None

    async def body(engine: Any) -> int:
        res = await engine.signal(run_id, args.name, payload, idempotency_key=args.key)
        line = f"{res.kind}: {SIGNAL_TEXT.get(res.kind, '')}"
        if res.kind in ("delivered", "buffered", "duplicate"):
            print(line)
            return 0
        print(line, file=sys.stderr)
        for issue in res.issues:
            print(f"  {issue.get('path') or '(root)'}: {issue.get('message')}", file=sys.stderr)
        return 1

    return await _with_client(args, body)


def _load_engine(spec: str, app_dir: str) -> Any:
    from .engine import Engine

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"APP:ENGINE must look like 'myapp.workers:engine', got {spec!r}")
    path = os.path.abspath(app_dir)
    if path not in sys.path:
        sys.path.insert(0, path)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise _Failed(f"cannot import {module_name!r}: {exc}") from exc
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise _Failed(f"module {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not isinstance(target, Engine) and callable(target):
        target = target()  # a factory: def make_engine() -> Engine
    if not isinstance(target, Engine):
        raise _Failed(f"{spec} is {type(target).__name__}, not an iterflow Engine (or a function returning one)")
    return target


class _Failed(Exception):
    """An operation failed for a reason that is not an IterflowError (exit code 1)."""


async def cmd_worker(args: argparse.Namespace) -> int:
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = _load_engine(args.app, args.app_dir)
    if inspect.isawaitable(engine):
        engine = await engine
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    received: list[str] = []

    def on_signal(name: str) -> None:
        received.append(name)
        if len(received) == 1:
            print(f"iterflow worker: {name} received; stopping gracefully (again to force)", flush=True)
            stop.set()
        else:
            print(f"iterflow worker: {name} received again; exiting now", flush=True)
            os._exit(1)

    for sig in (signals.SIGTERM, signals.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)
    try:
        await engine.listen()
        health = engine.health()
        print(f"iterflow worker: listening on schema {engine.schema!r} ({health['core']} core, "
              f"concurrency {engine.settings.concurrency}); flows: {', '.join(health['flows']) or '(none)'}",
              flush=True)
        await stop.wait()
    finally:
        await engine.stop()
        for sig in (signals.SIGTERM, signals.SIGINT):
            loop.remove_signal_handler(sig)
    print("iterflow worker: stopped", flush=True)
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    """Serve the dashboard (docs/operations.md, "Dashboard") until Ctrl-C / SIGTERM."""
    import socket

    try:
        import uvicorn

        from .dashboard import create_app
    except ImportError as exc:
        raise _Failed(f"the dashboard needs its extra: pip install 'iterflow[dashboard]' ({exc})") from None
    if args.app is not None:
        engine = _load_engine(args.app, args.app_dir)
        if inspect.isawaitable(engine):
            raise UsageError("dashboard --app: ENGINE must be an Engine or a function returning one synchronously")
        app = create_app(engine, read_only=args.read_only)
        where = f"schema {engine.schema!r} of {args.app}"
    else:
        dsn = _resolve_dsn(args.dsn)
        app = create_app(dsn, schema=args.schema, read_only=args.read_only)
        where = f"schema {args.schema!r} on {_redact(dsn)}"
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as exc:
        raise _Failed(f"cannot listen on {args.host}:{args.port}: {exc.strerror}") from None
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    mode = ", read-only" if args.read_only else ""
    print(f"iterflow dashboard: http://{shown}:{port}/ ({where}{mode}); Ctrl-C to stop", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, lifespan="on"))
    server.run(sockets=[sock])
    return 0


async def cmd_check(args: argparse.Namespace) -> int:
    engine = _load_engine(args.app, args.app_dir)
    if inspect.isawaitable(engine):
        engine = await engine
    try:
        stranded = await engine.check(limit=args.limit)
    finally:
        await engine.stop()
        await engine.core.close()  # see _with_client: harmless when already closed
    if args.json:
        print(json.dumps(stranded, indent=2, ensure_ascii=False))
    elif not stranded:
        print(f"ok: no live run in schema {engine.schema!r} would be stranded by this code")
    else:
        rows = [(r["run_id"], f"{r['flow']}@{r['version']}", r["status"], r["code"], _compact(r["message"], 80))
                for r in stranded]
        print(_table(("RUN ID", "FLOW", "STATUS", "CODE", "WHY"), rows))
        print(f"\n{len(stranded)} live run(s) would park with this code: keep their flow version registered "
              "(register v1 and v2 side by side) until they drain, or bump the version instead of editing it")
    return 1 if stranded else 0


def cmd_generate_schema(args: argparse.Namespace) -> int:
    from .schema_export import sql_script, sqlalchemy_module

    text = sql_script(args.schema) if args.sql else sqlalchemy_module(args.schema, _version())
    if args.output in (None, "-"):
        sys.stdout.write(text)
        return 0
    if os.path.exists(args.output) and not args.force:
        raise _Failed(f"{args.output} exists; pass --force to overwrite it")
    with open(args.output, "w", encoding="utf-8") as fh:
        fh.write(text)
    what = "SQL script" if args.sql else "SQLAlchemy Core module"
    print(f"wrote the {what} for schema {args.schema!r} to {args.output}", file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module("benches.__main__")
    except ImportError as exc:
        print("error: `iterflow bench` runs the benchmark suite in benches/, which ships only with a source "
              f"checkout; run it from the repository root ({exc})", file=sys.stderr)
        return 1
    entry = getattr(module, "main", None)
    if not callable(entry):
        print("error: benches/__main__.py has no main(argv) to call; run `python -m benches` instead",
              file=sys.stderr)
        return 1
    forwarded = list(args.bench_args)
    while forwarded[:1] == ["--"]:
        forwarded = forwarded[1:]
    try:
        result = entry(forwarded)
        if inspect.iscoroutine(result):
            result = asyncio.run(result)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return int(result or 0)


# ---------------------------------------------------------------------------------------------
# the parser
# ---------------------------------------------------------------------------------------------
def _version() -> str:
    try:
        from importlib.metadata import version

        return version("iterflow")
    except Exception:  # noqa: BLE001 - running from a source tree without metadata
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="iterflow", formatter_class=fmt,
        description="Durable workflows on your own PostgreSQL: schema, workers and run inspection.",
        epilog="exit codes: 0 ok, 1 the operation failed, 2 bad usage\n"
               "database: --dsn, else $DATABASE_URL, else an embedded Postgres (iterflow.embedded)",
    )
    parser.add_argument("--version", action="version", version=f"iterflow {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    db = argparse.ArgumentParser(add_help=False)
    db.add_argument("--dsn", help="PostgreSQL DSN (default: $DATABASE_URL, else the embedded Postgres)")
    db.add_argument("--schema", type=_schema_type, default="workflow",
                    help="the iterflow schema (default: workflow)")
    db.add_argument("--retry-timeout", default=CLI_RETRY_TIMEOUT, metavar="DURATION",
                    help="how long a database fault (server down or restarting) is retried before the "
                         f"command fails (default: {CLI_RETRY_TIMEOUT})")
    client = argparse.ArgumentParser(add_help=False, parents=[db])
    client.add_argument("--core", choices=("python", "rust", "auto"), default="python",
                        help="engine core for this client call (default: python; results are identical)")

    p = sub.add_parser("migrate", parents=[db], formatter_class=fmt, help="create or upgrade the iterflow schema",
                       description="Apply every migration (idempotent, under an advisory lock).",
                       epilog="example: iterflow migrate --schema workflow")
    p.set_defaults(run=cmd_migrate)

    p = sub.add_parser("generate-schema", formatter_class=fmt,
                       help="write iterflow's tables as a SQLAlchemy Core module (or --sql)",
                       description="Print (or write with -o) a SQLAlchemy Core module describing iterflow's "
                                   "tables, for Alembic autogenerate; with --sql, the migrations rendered for "
                                   "the schema. Needs no database.",
                       epilog="example: iterflow generate-schema -o myapp/iterflow_tables.py")
    p.add_argument("--schema", type=_schema_type, default="workflow", help="the iterflow schema (default: workflow)")
    p.add_argument("--sql", action="store_true", help="the raw SQL of the migrations instead")
    p.add_argument("-o", "--output", help="write to this file instead of stdout")
    p.add_argument("--force", action="store_true", help="overwrite an existing --output file")
    p.set_defaults(run=cmd_generate_schema)

    p = sub.add_parser("demo", formatter_class=fmt, help="run a real multi-step flow and narrate it",
                       description="Run an order-fulfilment flow (steps, a retry, a durable sleep, a child flow "
                                   "and a signal) in schema 'iterflow_demo', printing each step as it happens.")
    p.add_argument("--dsn", help="PostgreSQL DSN (default: $DATABASE_URL, else the embedded Postgres)")
    p.set_defaults(run=cmd_demo)

    runs = sub.add_parser("runs", formatter_class=fmt, help="list, show, explain, cancel or retry runs",
                          description="Inspect and manage runs (client calls only; nothing is executed).")
    runs_sub = runs.add_subparsers(dest="runs_command", metavar="SUBCOMMAND")
    runs.set_defaults(run=None, parser=runs)

    p = runs_sub.add_parser("list", parents=[client], formatter_class=fmt, help="list runs, newest first",
                            epilog="example: iterflow runs list --status failed --name checkout --limit 20")
    p.add_argument("--name", help="only runs of this flow name")
    p.add_argument("--status", action="append", choices=STATUSES, metavar="STATUS",
                   help=f"only runs in this status (repeatable): {', '.join(STATUSES)}")
    p.add_argument("--tag", help="only runs carrying this tag")
    p.add_argument("--limit", type=_limit_type, default=25, help="page size, 1-500 (default 25)")
    p.add_argument("--cursor", help="continue after a previous page (printed at the end of a full page)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=cmd_runs_list)

    p = runs_sub.add_parser("show", parents=[client], formatter_class=fmt,
                            help="a run with its step timeline, signals, children, timers and events")
    p.add_argument("run_id", metavar="RUN_ID")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(run=cmd_runs_show)

    p = runs_sub.add_parser("explain", parents=[client], formatter_class=fmt,
                            help="why a run is where it is, and what would move it",
                            description="Say what holds a run (a signal, a sleep, a retry backoff, a child, "
                                        "the queue, a lease, parking) with the action that would move it; "
                                        "a parent's child is explained too, a few levels down.",
                            epilog="example: iterflow runs explain 01a2...d1 --json")
    p.add_argument("run_id", metavar="RUN_ID")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(run=cmd_runs_explain)

    p = runs_sub.add_parser("cancel", parents=[client], formatter_class=fmt,
                            help="cancel a run and its live descendants")
    p.add_argument("run_id", metavar="RUN_ID")
    p.add_argument("--reason", default="canceled from the iterflow CLI", help="stored as the run's error message")
    p.set_defaults(run=cmd_runs_cancel)

    p = runs_sub.add_parser("retry", parents=[client], formatter_class=fmt,
                            help="re-queue a failed run (completed steps are kept)")
    p.add_argument("run_id", metavar="RUN_ID")
    p.set_defaults(run=cmd_runs_retry)

    p = sub.add_parser("signal", parents=[client], formatter_class=fmt, help="deliver a signal to a run",
                       description="Deliver signal NAME with a JSON payload to a run. Prints the result kind: "
                                   "delivered, buffered, duplicate (exit 0) or expired, closed, invalid_payload "
                                   "(exit 1).",
                       epilog="example: iterflow signal 01a2...d1 shipped '{\"carrier\": \"DHL\"}' --key dhl:123")
    p.add_argument("run_id", metavar="RUN_ID")
    p.add_argument("name", metavar="NAME", help="the signal name")
    p.add_argument("payload", metavar="JSON", help="the payload as JSON text ('-' reads it from stdin)")
    p.add_argument("--key", help="idempotency key: a repeat with the same key is reported as duplicate")
    p.set_defaults(run=cmd_signal)

    p = sub.add_parser("worker", formatter_class=fmt, help="run a worker process for APP:ENGINE",
                       description="Import module APP, take its attribute ENGINE (an iterflow Engine with "
                                   "its flows registered, or a function returning one), call listen() and "
                                   "work until SIGTERM/SIGINT, then stop gracefully (in-flight steps finish "
                                   "or are aborted at the engine's shutdown_timeout).",
                       epilog="example: iterflow worker myapp.workflows:engine")
    p.add_argument("app", metavar="APP:ENGINE")
    p.add_argument("--app-dir", default=".", help="directory put first on sys.path to import APP (default .)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(run=cmd_worker)

    p = sub.add_parser("check", formatter_class=fmt, help="list live runs that APP:ENGINE's code would strand",
                       description="Before a deploy: load APP:ENGINE (as `worker` does, without listening) and "
                                   "report every live run whose name@version the engine does not register, or "
                                   "whose recorded history no longer fits a builder flow's shape. Exit 1 when "
                                   "any run would be stranded.",
                       epilog="example: iterflow check myapp.workflows:engine")
    p.add_argument("app", metavar="APP:ENGINE")
    p.add_argument("--app-dir", default=".", help="directory put first on sys.path to import APP (default .)")
    p.add_argument("--limit", type=int, default=10_000, help="examine at most this many live runs")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=cmd_check)

    p = sub.add_parser("dashboard", formatter_class=fmt, help="serve the web dashboard",
                       description="Serve the dashboard (runs, flows, crons, workers; cancel, retry, signals) "
                                   "over HTTP until Ctrl-C. It binds 127.0.0.1 unless told otherwise: put it "
                                   "behind your login before exposing it (docs/operations.md, \"Dashboard\"). "
                                   "Needs the dashboard extra: pip install 'iterflow[dashboard]'.",
                       epilog="example: iterflow dashboard --port 8080 --read-only")
    p.add_argument("--dsn", help="PostgreSQL DSN (default: $DATABASE_URL, else the embedded Postgres)")
    p.add_argument("--schema", type=_schema_type, default="workflow", help="the iterflow schema (default: workflow)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port to bind (default: 8080; 0 picks a free one)")
    p.add_argument("--read-only", action="store_true", help="hide and refuse every action")
    p.add_argument("--app", metavar="APP:ENGINE", default=None,
                   help="use this engine (as `worker` loads it) instead of --dsn/--schema: signals sent from "
                        "the dashboard are then checked against its flows' signal schemas")
    p.add_argument("--app-dir", default=".", help="directory put first on sys.path to import APP (default .)")
    p.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
    p.set_defaults(run=cmd_dashboard)

    p = sub.add_parser("bench", formatter_class=fmt, help="run the benchmark suite (source checkout)",
                       description="Delegate to the benchmark runner (benches/__main__.py main(argv)) of a "
                                   "source checkout; run it from the repository root. Every argument after "
                                   "`bench` is passed through; `iterflow bench -- --help` shows the runner's.",
                       epilog="example: iterflow bench --quick --cores python,rust")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, metavar="ARGS")
    p.set_defaults(run=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"] and argv[1:2] not in (["-h"], ["--help"]):
        # everything after `bench` belongs to the benchmark runner (argparse's REMAINDER
        # cannot take leading options, so do not let it try)
        argv = ["bench", "--", *argv[1:]] if argv[1:2] != ["--"] else argv
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else 2
    # the pool's reconnect attempts and the client engine's retries are faults being retried:
    # the one line that matters is the command's own error, once the retries ran out
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    logging.getLogger(CLIENT_LOGGER).setLevel(logging.ERROR)
    run = getattr(args, "run", None)
    if run is None:
        (getattr(args, "parser", None) or parser).print_help(sys.stderr)
        return 2
    try:
        result = run(args)
        if inspect.iscoroutine(result):
            result = asyncio.run(result)
        return int(result)
    except UsageError as exc:
        print(f"iterflow: error: {exc}", file=sys.stderr)
        return 2
    except DatabaseUnavailable as exc:
        print(f"error: cannot reach PostgreSQL: {exc.message}", file=sys.stderr)
        return 1
    except DatabaseError as exc:
        print(f"error: database error: {exc.message}", file=sys.stderr)
        return 1
    except IterflowError as exc:
        print(f"error [{exc.code}]: {exc.message}", file=sys.stderr)
        return 1
    except _Failed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `iterflow runs show ... --json | head`
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
