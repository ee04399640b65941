"""The Rust extension ``iterflow._core`` loads, matches the package version and reaches Postgres
(``check_connection`` answers through the pump, like every call of the extension)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from iterflow import _core
from iterflow.cores.rust import check_connection

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_version_matches_pyproject() -> None:
    expected = tomllib.loads(PYPROJECT.read_text())["project"]["version"]
    assert isinstance(_core.__version__, str) and _core.__version__
    assert _core.__version__ == expected


async def test_check_connection_returns_server_version(dsn: str) -> None:
    version = await check_connection(dsn)
    assert isinstance(version, str)
    assert version[:1].isdigit(), version


async def test_unreachable_server_raises_database_error() -> None:
    with pytest.raises(_core.CoreError) as info:
        await check_connection("host=127.0.0.1 port=1 user=postgres connect_timeout=5")
    assert info.value.code == "DATABASE_ERROR"
    assert str(info.value).startswith("DATABASE_ERROR: ")


async def test_malformed_dsn_raises_invalid_argument() -> None:
    with pytest.raises(_core.CoreError) as info:
        await check_connection("postgresql://[::1")
    assert info.value.code == "INVALID_ARGUMENT"


async def test_concurrent_calls_share_one_runtime(dsn: str) -> None:
    versions = await asyncio.gather(*(check_connection(dsn) for _ in range(8)))
    assert len(set(versions)) == 1


_FORK_SCRIPT = textwrap.dedent(
    """
    import asyncio, os, sys
    from iterflow.cores.rust import check_connection

    async def check(dsn):
        return await check_connection(dsn)  # needs a running loop

    dsn, use_before_fork = sys.argv[1], sys.argv[2] == "1"
    if use_before_fork:
        asyncio.run(check(dsn))  # creates the runtime in the parent
    pid = os.fork()
    if pid == 0:
        try:
            asyncio.run(check(dsn))
        except RuntimeError as e:
            os._exit(10 if "fork" in str(e) else 11)
        except BaseException:
            os._exit(12)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    sys.exit(os.waitstatus_to_exitcode(status))
    """
)


@pytest.mark.parametrize(("use_before_fork", "expected"), [(True, 10), (False, 0)])
def test_runtime_is_refused_after_fork(dsn: str, use_before_fork: bool, expected: int) -> None:
    """A child forked after the runtime exists gets RuntimeError; one forked before may use it."""
    proc = subprocess.run(
        [sys.executable, "-c", _FORK_SCRIPT, dsn, "1" if use_before_fork else "0"],
        check=False,
        timeout=60,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == expected, proc.stderr
