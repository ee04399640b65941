"""A PostgreSQL to talk to when none was given: ``$DATABASE_URL``, else an embedded server.

Why: the demo, the test suite and ``scripts/test`` must work on a machine with no Postgres
set up. The ``pgserver`` wheel carries PostgreSQL binaries; we start one on a persistent data
directory (``$ITERFLOW_PGDATA`` or ``~/.cache/iterflow/pgdata``) and leave it running when the
process exits, so the next process (the next test run, the next demo) reuses it in
milliseconds instead of paying ``initdb`` + start again. The server listens on a Unix socket
inside the data directory only (no TCP port), with trust authentication.

This module prints and logs nothing itself: callers pass ``announce`` to say "using embedded
Postgres at ..." where their output goes (stderr for the CLI, the demo's own output).
``python -m iterflow.embedded`` prints the DSN, for scripts: ``export DATABASE_URL=$(...)``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

from .errors import EmbeddedUnavailable

__all__ = ["database_url", "embedded_url", "pgdata_dir"]


def pgdata_dir() -> Path:
    """The embedded server's data directory: ``$ITERFLOW_PGDATA`` or ``~/.cache/iterflow/pgdata``."""
    configured = os.environ.get("ITERFLOW_PGDATA")
    if configured:
        return Path(configured).expanduser().resolve()
    return Path("~/.cache/iterflow/pgdata").expanduser().resolve()


def embedded_url() -> str:
    """Start (or reuse) the embedded server on :func:`pgdata_dir` and return its DSN.

    The server is left running when this process exits (other processes reuse it).
    Raises ``ImportError`` if ``pgserver`` is not installed.
    """
    pgdata = pgdata_dir()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # platformdirs warns on import when XDG_RUNTIME_DIR is unset; we promise silence.
        warnings.simplefilter("ignore")
        from pgserver.postgres_server import get_server

        # cleanup_mode=None: never stop or delete the server at exit.
        server = get_server(pgdata, cleanup_mode=None)
    return str(server.get_uri())


def database_url(explicit: str | None = None, *, announce: Callable[[str], None] | None = None) -> str:
    """``explicit`` if given, else ``$DATABASE_URL`` if set (and non-empty), else the embedded
    server's DSN, which ``announce`` is told about. The one DSN resolution of the package (the
    CLI, the demo, the tests and the benchmarks use it).

    Raises ``EmbeddedUnavailable`` (an ``ImportError``) when the embedded server is needed and
    ``pgserver`` is not installed.
    """
    if explicit:
        return explicit
    url = os.environ.get("DATABASE_URL")
    if url:
        return url
    try:
        url = embedded_url()
    except ImportError as exc:
        raise EmbeddedUnavailable(
            f"no DSN given and no $DATABASE_URL, and the embedded Postgres is unavailable ({exc}); "
            "set DATABASE_URL or install iterflow[embedded]"
        ) from None
    if announce is not None:
        announce(f"using embedded Postgres at {url}")
    return url


def main() -> None:
    """Print the DSN (``python -m iterflow.embedded``)."""
    print(database_url())


if __name__ == "__main__":
    main()
