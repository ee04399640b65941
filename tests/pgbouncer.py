"""A real PgBouncer in transaction mode in front of the test database (docs/operations.md,
"Behind PgBouncer").

``start(dsn)`` writes a config to a temporary directory, starts ``pgbouncer`` on a free
127.0.0.1 port, waits until it accepts connections and returns a :class:`Bouncer`; the
session fixture in ``conftest.py`` stops it at the end. Where it cannot run (no binary, or a
root user whose server is only reachable through a socket directory pgbouncer's unprivileged
user cannot enter, as the embedded server's is), the tests that need it skip with the reason
``unusable`` gives.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

MISSING = "pgbouncer not installed: apt-get install pgbouncer"
# Debian installs it outside a normal user's PATH
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
POOL_SIZE = 20
START_TIMEOUT = 10.0


def binary() -> str | None:
    """The pgbouncer executable, or None when it is not installed."""
    return shutil.which("pgbouncer", path=SEARCH_PATH)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Bouncer:
    """A running pgbouncer: ``dsn`` reaches the test database through it."""

    process: subprocess.Popen[bytes]
    directory: Path
    dsn: str
    admin_dsn: str
    log: Path
    _closed: bool = field(default=False)

    def show(self, what: str) -> list[dict[str, Any]]:
        """``SHOW <what>`` on the admin console (simple protocol: the console knows no other)."""
        with psycopg.connect(self.admin_dsn, autocommit=True, prepare_threshold=None) as conn:
            cur = conn.cursor()
            cur.execute(f"SHOW {what}".encode(), prepare=False)
            names = [d.name for d in cur.description or ()]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def xact_count(self, database: str) -> int:
        """Transactions pgbouncer has relayed to ``database`` so far."""
        for row in self.show("STATS"):
            if row["database"] == database:
                return int(row["total_xact_count"])
        return 0

    def stop(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


def unusable(dsn: str) -> str | None:
    """Why pgbouncer cannot stand in front of the server of ``dsn`` here, or None."""
    if binary() is None:
        return MISSING
    host = str(conninfo_to_dict(dsn).get("host") or "/var/run/postgresql")
    if os.geteuid() == 0 and host.startswith("/") and not _enterable_by_others(Path(host)):
        return (f"pgbouncer refuses to run as root, and the user it drops to cannot reach the server's "
                f"socket directory {host}; point DATABASE_URL at a TCP address to test through pgbouncer")
    return None


def _enterable_by_others(path: Path) -> bool:
    """Whether a user other than the owner may pass through every directory down to ``path``."""
    return all(p.exists() and p.stat().st_mode & 0o001 for p in [path, *path.parents])


def start(dsn: str, *, pool_size: int = POOL_SIZE) -> Bouncer:
    """Start pgbouncer (transaction pooling, trust auth) in front of the server of ``dsn``."""
    reason = unusable(dsn)
    exe = binary()
    if reason is not None or exe is None:
        raise FileNotFoundError(reason or MISSING)
    target = conninfo_to_dict(dsn)
    user = str(target.get("user") or pwd.getpwuid(os.getuid()).pw_name)
    host = str(target.get("host") or "/var/run/postgresql")
    server = f"host={host} port={target.get('port') or 5432}"
    if target.get("password"):
        server += f" password={target['password']}"
    port = _free_port()
    directory = Path(tempfile.mkdtemp(prefix="iterflow-pgbouncer-"))
    (directory / "users.txt").write_text(f'"{user}" ""\n')
    (directory / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"* = {server}\n"
        "[pgbouncer]\n"
        "listen_addr = 127.0.0.1\n"
        f"listen_port = {port}\n"
        "unix_socket_dir =\n"
        "auth_type = trust\n"
        f"auth_file = {directory / 'users.txt'}\n"
        "pool_mode = transaction\n"
        "max_client_conn = 5000\n"
        f"default_pool_size = {pool_size}\n"
        f"admin_users = {user}\n"
        "server_check_delay = 0\n"
    )
    command = [exe]
    if os.geteuid() == 0:
        # pgbouncer refuses to run as root; it drops to this user after reading its config
        os.chmod(directory, 0o755)
        for child in directory.iterdir():
            os.chmod(child, 0o644)
        command += ["-u", _unprivileged_user()]
    log = directory / "pgbouncer.log"  # written through the inherited descriptor
    with log.open("wb") as out:
        process = subprocess.Popen([*command, str(directory / "pgbouncer.ini")], stdout=out, stderr=out)
    through = {k: v for k, v in target.items() if k not in ("host", "port", "hostaddr")}
    bouncer = Bouncer(
        process=process, directory=directory, log=log,
        dsn=make_conninfo(**{**through, "host": "127.0.0.1", "port": str(port)}),
        admin_dsn=make_conninfo(host="127.0.0.1", port=str(port), user=user, dbname="pgbouncer"),
    )
    _wait_until_up(bouncer)
    return bouncer


def _unprivileged_user() -> str:
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    raise RuntimeError("pgbouncer cannot run as root and there is no 'postgres' or 'nobody' user")


def _wait_until_up(bouncer: Bouncer) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if bouncer.process.poll() is not None:
            raise RuntimeError(f"pgbouncer exited at start:\n{bouncer.log.read_text()}")
        try:
            with psycopg.connect(bouncer.dsn, prepare_threshold=None, connect_timeout=2) as conn:
                conn.execute("SELECT 1", prepare=False)
            return
        except psycopg.OperationalError as exc:
            if time.monotonic() > deadline:
                log = bouncer.log.read_text()  # before stop(), which removes the directory
                bouncer.stop()
                raise RuntimeError(f"pgbouncer did not come up (last error: {exc}):\n{log}") from None
            time.sleep(0.05)
