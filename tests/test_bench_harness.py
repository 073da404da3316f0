"""The benchmark harness end to end, in its quick mode.

Runs ``python -m bench --quick`` on the overhead-bound, busy-interpreter and
memory workloads with the real C loop (compiled here against the installed
libraries) and the real xybrid workers, then checks the report it wrote. No
figure is judged: speed is measured in bench/, never asserted in tests. What
is checked is that every contestant ran, produced the C loop's tokens, and
that the report holds the figures the README cites. llama-cpp-python is left
out (``--no-peer``): building it takes minutes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
XYBRID_VARIANTS = ["engine", "engine-stream", "backend", "backend-stream"]


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory: pytest.TempPathFactory) -> dict:  # type: ignore[type-arg]
    out = tmp_path_factory.mktemp("bench-quick")
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--no-peer", "--workloads", "overhead,busy,memory",
         "--quiet-wait", "0", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=900,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = sorted(out.glob("*.json"))
    assert [p.name for p in reports if p.name != "latest.json"], "no dated report written"
    md = reports[0].with_suffix(".md")
    assert md.is_file()
    return {"json": json.loads(reports[0].read_text()), "md": md.read_text()}


def rows_of(report: dict, case: str) -> dict[str, dict]:  # type: ignore[type-arg]
    cases = {c["name"]: c for c in report["json"]["cases"]}
    assert case in cases, sorted(cases)
    return {r["variant"]: r for r in cases[case]["rows"]}


def test_every_contestant_ran_and_matched_the_c_loop(quick_report: dict) -> None:  # type: ignore[type-arg]
    doc = quick_report["json"]
    assert doc["errors"] == []
    assert doc["skipped"] == {"peer": "--no-peer given"}
    rows = rows_of(quick_report, "overhead")
    assert set(rows) == {"native", *XYBRID_VARIANTS}
    for name in XYBRID_VARIANTS:
        row = rows[name]
        assert row["same_tokens_as_native"] == "1/1", (name, row)
        assert row["tps"]["median"] > 0 and row["vs_native"]["median"] > 0
        assert row["stop_reasons"] == ["length"]


def test_busy_workload_reports_the_loop_threads_usage(quick_report: dict) -> None:  # type: ignore[type-arg]
    rows = rows_of(quick_report, "busy")
    for name in ("native", "engine", "engine-stream"):
        usage, idle = rows[name]["usage"], rows[name]["idle_usage"]
        assert 0 < usage["cpu_share"]["median"] <= 1.001
        assert usage["cpu_us_per_token"]["median"] > 0 and idle["cpu_us_per_token"]["median"] > 0
    # Run inline with the GIL released, the engine's loop never waits, busy
    # thread or not: the property the busy-interpreter section rests on.
    assert rows["engine"]["usage"]["waits"]["median"] == 0
    assert "kept" in rows["backend-stream"] and "idle_tps" in rows["backend-stream"]


def test_memory_and_the_markdown_report(quick_report: dict) -> None:  # type: ignore[type-arg]
    rows = rows_of(quick_report, "memory")
    assert rows["engine"]["maxrss_mb"]["median"] > rows["engine"]["base_mb"]["median"] > 0
    md = quick_report["md"]
    for heading in ("## Overhead-bound", "## Busy interpreter", "## Memory", "## Targets", "## Environment"):
        assert heading in md, heading
    assert "What the OS gave the thread that runs the loop" in md
