"""Worker subprocesses for the tests that need real processes to kill, freeze or crash: one
script of ``tests/workers/``, on the test's database, schema and core, its output kept per
label for failure messages; any still alive are killed at teardown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "workers"


class WorkerProcesses:
    def __init__(self, script: str, dsn: str, schema: str, core: str, logs: Path) -> None:
        self.script = SCRIPTS / script
        self.dsn, self.schema, self.core, self.logs = dsn, schema, core, logs
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, label: str, *args: str) -> subprocess.Popen[bytes]:
        """``script --dsn --schema --core --label label *args``, its output in ``<label>.log``."""
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "python"), os.environ.get("PYTHONPATH", "")]))
        with open(self.logs / f"{label}.log", "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, str(self.script), "--dsn", self.dsn, "--schema", self.schema, "--core", self.core,
                 "--label", label, *args],
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
            )
        self.procs.append(proc)
        return proc

    def output(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.read_text(errors='replace')}" for p in sorted(self.logs.glob("*.log")))

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)  # a frozen one must wake to die
                proc.kill()
                proc.wait(timeout=10)
