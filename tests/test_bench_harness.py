"""The benchmark harness end to end: ``sparsex-sgl bench workload / run / report`` against real SGLang servers.

One run starts full prefill (``--disable-radix-cache``), stock SGLang and ``--enable-sparsex`` on SmolLM2 in
turn, sends a small RAG workload (a new question, then repeats of its documents in new orders) and a
small chat workload through each, and checks what each server reports reusing. Failures of the
harness's surroundings (nothing listening, a server that cannot start) must be reported, not raised.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sparsex_sgl.testing import free_port

pytestmark = pytest.mark.slow


def sparsex_sgl(*args: str, timeout: float = 1500) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sparsex_sgl.cli", *args], capture_output=True, text=True, check=False,
                          timeout=timeout)


@pytest.fixture(scope="module")
def workload_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("workloads")
    rag, chat = folder / "rag.jsonl", folder / "chat.jsonl"
    # 4 requests, reuse 2/3: round(2/3 * 3) = 2 repeats, so 2 distinct questions (offset 3: short prompts)
    made = sparsex_sgl("bench", "workload", "rag", "--n", "4", "--reuse", "0.667", "--offset", "3", "--seed", "1",
                       "--out", str(rag))
    assert made.returncode == 0, made.stderr
    made = sparsex_sgl("bench", "workload", "chat", "--n", "2", "--rounds", "3", "--max-chars", "300", "--out", str(chat))
    assert made.returncode == 0, made.stderr
    return [rag, chat]


@pytest.fixture(scope="module")
def results(workload_files: list[Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("bench")
    done = sparsex_sgl("bench", "run", "--workload", *map(str, workload_files), "--systems", "full,stock,sparsex",
                       "--max-total-tokens", "16384", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text())


def _run(report: dict[str, Any], system: str, workload: str) -> dict[str, Any]:
    (run,) = [r for r in report["runs"] if r["system"] == system and r["workload"] == workload]
    return run


def test_every_system_completes_every_request(results: tuple[Path, dict[str, Any]]) -> None:
    _, report = results
    assert len(report["runs"]) == 6
    for run in report["runs"]:
        n = report["workloads"][run["workload"]]["requests"]
        assert run["summary"]["completed"] == n and run["summary"]["errors"] == 0, run["summary"]
        assert all(q["ttft"] > 0 and q["output_tokens"] >= 1 for q in run["requests"])
    assert report["workloads"]["rag"]["params"]["distinct_questions"] == 2


def test_reuse_counts_match_what_each_system_can_reuse(results: tuple[Path, dict[str, Any]]) -> None:
    _, report = results
    full = _run(report, "full", "rag")
    assert all(q["cached_tokens"] == 0 for q in full["requests"])  # no radix cache: nothing reused
    stock, ours = _run(report, "stock", "rag"), _run(report, "sparsex", "rag")
    for request in ours["requests"]:
        reused = request["reuse"]["reused"]
        if request["tags"]["reuse"] == "novel":
            assert reused == 0
        else:
            # every paragraph of a repeat was seen before; gap blocks aside, the 10 paragraphs are most of it
            assert reused > 0.7 * request["prompt_tokens"], request
    for request in stock["requests"]:
        # stock reuses the identical prefix only: never more than the instruction on a reordered repeat
        assert request["cached_tokens"] < 0.1 * request["prompt_tokens"]
    # chat: from round 2 on the history is resent, so both caches serve a prefix
    chat = _run(report, "stock", "chat")
    assert any(q["cached_tokens"] > 0 for q in chat["requests"] if q["tags"]["round"] >= 2)


def test_quality_against_full_prefill(results: tuple[Path, dict[str, Any]]) -> None:
    _, report = results
    for system in ("stock", "sparsex"):
        summary = _run(report, system, "rag")["summary"]
        assert summary["compared"] == 4 and "f1" in summary and "em" in summary
    # stock serves exact KV (an identical prefix), so its greedy answers equal full prefill's
    assert _run(report, "stock", "rag")["summary"]["equal_to_full"] == 1.0
    assert _run(report, "full", "rag")["summary"]["equal_to_full"] == 1.0


def test_report_renders_tables_and_plots(results: tuple[Path, dict[str, Any]]) -> None:
    out, _ = results
    again = out.parent / f"{out.name}-again"  # a second run of the same workloads: its plots must not overwrite
    again.mkdir(exist_ok=True)
    shutil.copy(out / "results.json", again / "results.json")
    done = sparsex_sgl("bench", "report", str(out), str(again), "--out", str(out / "report"))
    assert done.returncode == 0, done.stderr
    text = (out / "report" / "report.md").read_text()
    assert "### rag, concurrency 1" in text and "### chat, concurrency 1" in text and "SparseX vs stock" in text
    assert sorted(p.name for p in (out / "report").glob("*.png")) == sorted(
        f"ttft-cdf-{folder.name}-{workload}-concurrency.png" for folder in (out, again) for workload in ("chat", "rag"))


def test_unreachable_server_is_reported_per_request(workload_files: list[Path], tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    done = sparsex_sgl("bench", "run", "--workload", str(workload_files[0]), "--systems", "stock",
                       "--url", f"stock={url}", "--timeout", "10", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    (run,) = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert run["summary"]["errors"] == 4 and run["summary"]["completed"] == 0
    assert all(q["error"].startswith("ConnectError") for q in run["requests"])  # httpx: connection refused


def test_server_that_cannot_start_is_reported(workload_files: list[Path], tmp_path: Path) -> None:
    done = sparsex_sgl("bench", "run", "--workload", str(workload_files[0]), "--systems", "stock",
                       "--server-args=--no-such-flag", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    (run,) = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert "server exited" in run["server_error"]
    assert "did not start" in (tmp_path / "results.md").read_text()


def test_offline_sweep_and_its_report(tmp_path: Path) -> None:
    """``bench sweep`` runs every method on the reference executor (SmolLM2, one question), and ``bench
    report --sweep`` renders its quality tables (SparseX against CacheBlend-style and full) and F1 plot."""
    sweep = tmp_path / "sweep.json"
    done = sparsex_sgl("bench", "sweep", "--model", "smollm2", "--n", "1", "--offset", "3", "--ratio", "0.15",
                       "--full-layers", "2", "--out", str(sweep))
    assert done.returncode == 0, done.stderr
    report = json.loads(sweep.read_text())
    assert list(report["methods"]) == ["full", "naive", "cacheblend", "epic", "sparsex"] and report["meta"]["n"] == 1
    assert sweep.with_suffix(".png").exists()
    done = sparsex_sgl("bench", "report", "--sweep", str(sweep), "--out", str(tmp_path / "report"))
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| sparsex | cacheblend |" in text and "| sparsex | full |" in text
    assert "F1 significantly above CacheBlend-style" in text and "f1-vs-recompute.png" in text


def test_heldout_quality_script_runs_its_grid(tmp_path: Path) -> None:
    """``bench/quality_heldout.sh --smoke``: the held-out grid (15 settings, the look-ahead and the adaptive
    budget included) on SmolLM2, one held-out HotpotQA question, with its tables and target lines."""
    done = subprocess.run(["bash", str(Path(__file__).parents[1] / "bench" / "quality_heldout.sh"), "--smoke",
                           str(tmp_path)], capture_output=True, text=True, check=False, timeout=1500)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "quality-smoke-smollm2-hotpotqa.json").read_text())
    assert report["meta"]["split"] == "heldout" and report["meta"]["n"] == 1
    assert len(report["methods"]) == 15 and "sparsex:mass_all[r=0.15,L=4,cov=0.5]" in report["methods"]
    assert report["methods"]["sparsex:lookahead[r=0.15,L=2]"]["flops_frac"] > report["methods"][
        "sparsex[r=0.15,L=2]"]["flops_frac"]  # the look-ahead pass is counted
    assert "- F1 significantly above CacheBlend-style:" in done.stdout


def test_sink_quality_script_compares_the_two_caches_on_the_same_questions(tmp_path: Path) -> None:
    """``bench/quality_sink.sh --smoke``: paragraphs cached alone, then behind the sink prefix, on one SmolLM2
    question; the paired table (sink minus alone) per method, and the two reports agree on full prefill; then
    the chunk-start grid on the sink case."""
    done = subprocess.run(["bash", str(Path(__file__).parents[1] / "bench" / "quality_sink.sh"), "--smoke",
                           str(tmp_path)], capture_output=True, text=True, check=False, timeout=1500)
    assert done.returncode == 0, done.stderr
    alone, sink = (json.loads((tmp_path / f"quality-dev-smollm2-hotpotqa-{c}.json").read_text()) for c in ("alone", "sink"))
    assert (alone["meta"]["cached"], sink["meta"]["cached"]) == ("alone", "sink")
    assert alone["per_question"]["full"] == sink["per_question"]["full"]
    assert alone["per_question"]["naive"]["kl"] != sink["per_question"]["naive"]["kl"]  # other KV was reused
    for method in ("naive", "cacheblend", "sparsex"):
        assert f"| {method} | " in done.stdout.split("ΔF1 vs paragraphs cached alone")[1]
    knob = json.loads((tmp_path / "quality-dev-smollm2-hotpotqa-sink-chunk-start.json").read_text())
    assert set(knob["methods"]) == {"full", *(f"{m}[k={k}]" for m in ("cacheblend", "sparsex") for k in (0, 4, 16))}
    assert knob["per_question"]["full"] == sink["per_question"]["full"]
    assert "| sparsex[k=16] | cacheblend[k=16] |" in done.stdout  # each k paired with CacheBlend-style at that k


def test_tiers_benchmark_runs_every_system_on_a_small_corpus(tmp_path: Path) -> None:
    """``bench/tiers.py`` on a few requests: every system answers, the unbounded pool reuses at least what the
    pool alone does, and the report, table and plot are written."""
    done = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "bench" / "tiers.py"), "--questions", "20",
                           "--requests", "3", "--per-request", "4", "--pool", "2500", "--host-gb", "0.5",
                           "--out", str(tmp_path)], capture_output=True, text=True, check=False, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    systems = report["systems"]
    assert set(systems) == {"stock", "pool only", "host tier", "unbounded", "two instances"}
    assert systems["unbounded"]["reused_per_request"] >= systems["pool only"]["reused_per_request"]
    assert report["meta"]["corpus_vs_pool"] > 10
    assert (tmp_path / "tiers.png").stat().st_size > 0 and "| host tier |" in (tmp_path / "table.md").read_text()


def test_tp_benchmark_runs_both_phases_on_a_few_requests(tmp_path: Path) -> None:
    """``bench/tp.py`` on a few requests: stock and SparseX at TP 1 and TP 2 answer, every rank reports, the
    requests that ran sparse layers at TP 1 ran the same rows at TP 2, and the table is written."""
    done = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "bench" / "tp.py"), "--requests", "3",
                           "--reuse", "0.5", "--new-tokens", "2", "--pool", "8192", "--out", str(tmp_path)],
                          capture_output=True, text=True, check=False, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["systems"]) == {"TP 1", "TP 2"}
    assert len(report["systems"]["TP 2"]["reused_tokens"]) == 2  # one entry per rank
    rows = report["rows"]
    assert rows["sparse_requests"] >= 1 and rows["same_rows"] == rows["sparse_requests"], rows
    assert "| TP 2 |" in (tmp_path / "table.md").read_text()


def test_checkpoint_replay_runs_every_policy_on_every_workload(tmp_path: Path) -> None:
    """``bench/checkpoints.py`` on a few requests: every policy replays every workload; block 64 keeps the most
    states of the fixed policies and recomputes the least; the table and the plot are written."""
    done = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "bench" / "checkpoints.py"), "--requests",
                           "24", "--reference-requests", "12", "--out", str(tmp_path)],
                          capture_output=True, text=True, check=False, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["workloads"]) == {"document QA", "pool QA", "RAG pools", "system prompts"}
    for workload in report["workloads"].values():
        rows = workload["policies"]
        assert rows["block 64"]["states"] >= rows["block 512"]["states"]
        assert rows["block 64"]["recomputed_per_request"] <= rows["block 512"]["recomputed_per_request"]
        assert all(0 <= row["recomputed_per_request"] <= row["hit_per_request"] for row in rows.values())
    assert (tmp_path / "pareto.png").stat().st_size > 0 and "| DP M=4 |" in (tmp_path / "table.md").read_text()
    for rows in report["reference"]["models"].values():  # a state lets a prefill skip what it resumes from
        assert rows["no state"]["states"] == 0 and rows["block 64"]["states"] > rows["SGLang 0.5.23"]["states"]
        assert rows["block 64"]["computed_per_request"] < rows["no state"]["computed_per_request"]
