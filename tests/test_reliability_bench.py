"""Short versions of the reliability benchmarks (their full runs' figures are in the README): the graph
at scale (``bench/graph_scale.py``) and the soak of a real server (``bench/soak.py``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_graph_scale_short(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(BENCH / "graph_scale.py"), "--sizes", "2000", "8000", "--repeats", "5",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["nodes"] >= n for r, n in zip(rows, (2000, 8000))] == [True, True]
    assert all(r["evict_10pct_ms"] > 0 and r["lookup_ms"] > 0 for r in rows)


@pytest.mark.slow
def test_soak_short(tmp_path: Path) -> None:
    """80 mixed requests (RAG, chat, plain, invalid, aborted; several tenants) on a 3,072-token pool: the
    script exits non-zero on a failed request, a leak, changed outputs, memory growth or a dead server."""
    done = subprocess.run([sys.executable, str(BENCH / "soak.py"), "--requests", "80", "--concurrency", "4",
                           "--rss-slack", "0.25", "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=1200, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["evicted_tokens"] > 0 and report["kinds"].get("invalid", 0) > 0
