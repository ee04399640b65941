"""The benchmark runner at --quick sizes on the pure-Python core: every workload runs and
reports numbers (no thresholds), so ``python -m benches`` never rots."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_bench_reports_every_workload(dsn: str, tmp_path: Path) -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benches.__main__ import main
    from benches.registry import WORKLOADS

    out = tmp_path / "bench.json"
    started = time.monotonic()
    code = main(["--quick", "--cores", "python", "--reps", "1", "--json", str(out), "--dsn", dsn])
    elapsed = time.monotonic() - started

    report = json.loads(out.read_text())
    errors = {wid: e["errors"] for wid, e in report["workloads"].items() if any(e["errors"].values())}
    assert code == 0, f"benchmark runs failed: {errors}"
    assert set(report["workloads"]) == {w.id for w in WORKLOADS}
    for wid, entry in report["workloads"].items():
        assert entry["metrics"], wid
        for metric in entry["metrics"]:
            value = entry["medians"]["python"][metric["key"]]
            if value is None and metric["optional"]:
                continue
            assert isinstance(value, (int, float)) and math.isfinite(value), (wid, metric["key"], value)
        assert len(entry["reps"]["python"]) == 1, wid
        if entry["source"] is None:  # each run measured the host's commit + NOTIFY floor first
            floor = entry["reps"]["python"][0]["host_floor"]
            assert floor["samples"] == 100, wid
            assert 0 < floor["commit_p50_ms"] <= floor["commit_p99_ms"], (wid, floor)
            assert 0 < floor["notify_p50_ms"] <= floor["notify_p99_ms"], (wid, floor)
    assert report["machine"]["nproc"] and report["machine"]["postgres"] and report["machine"]["python"]
    assert report["cores"]["python"]["available"] is True
    assert elapsed < 60, f"the quick benchmark took {elapsed:.0f}s; keep it under a minute"


def test_fan_in_every_result_is_right(dsn: str, core: str, tmp_path: Path) -> None:
    """w8 at a tiny N on each core, every shape: every ``result()`` returns its run's output
    (not timed: the numbers are benches/fanin.py's business, correctness is CI's)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benches.fanin import main

    out = tmp_path / "fanin.json"
    n = 60
    code = main(["--n", str(n), "--concurrency", "4", "--core", core, "--cap", "60", "--dsn", dsn,
                 "--json", str(out)])

    cells = json.loads(out.read_text())["cells"]
    assert [c.get("shape") for c in cells] == ["inproc", "subproc", "none"]
    assert all(c["vs_none"] > 0 for c in cells[:2]), "the waiting cells are set against the baseline"
    for cell in cells:
        assert "error" not in cell, cell["error"]
        assert cell["complete"] and cell["correct"], (cell["done_line"], cell["errors"], cell["error_samples"],
                                                      cell["wrong_samples"], cell["db_statuses"])
        assert cell["returned"] == n and cell["wrong"] == 0 and cell["db_statuses"] == {"done": n}
        assert cell["connections_by_role"].get("worker", 0) >= 1, cell["connections_by_role"]
    assert cells[1]["connections_by_role"].get("client", 0) >= 1, cells[1]["connections_by_role"]
    assert code == 0
