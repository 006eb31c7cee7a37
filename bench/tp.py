"""Tensor parallelism on the CPU (issue 34): SparseX at TP 2 against SparseX at TP 1, and each against stock SGLang
at the same TP, side by side.

The RAG workload of the harness (``harness.workloads.rag``: HotpotQA questions, ``--reuse`` of the requests
revisit an earlier question's paragraphs in a new order), rendered for Qwen2.5-0.5B (14 query and 2 KV heads,
so one KV head per rank at TP 2). Four CPU servers of this model do not fit beside each other with other work,
so the systems run in two phases over the same requests: TP 1 (stock and SparseX), then TP 2 (stock and
SparseX, one core per rank). Within a phase the requests go one at a time and interleaved (request i to both
systems before request i+1), so drift on a shared machine hits both alike; each TTFT ratio compares the servers
of one phase.

Figures: the requests whose SparseX prefill ran sparse layers at TP 1, and the share of them whose rows at TP 2
were the same (``sparsex_rows_crc32``, with the reused and recomputed counts), the greedy outputs that agree,
TTFT p50 per system and SparseX's ratio to its phase's stock. JSON and a Markdown table go to ``--out``.

    python bench/tp.py --out bench/results/tp-cpu
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import tempfile
from pathlib import Path
from typing import Any

from sparsex_sgl.assets import hotpotqa_path, resolve_model
from sparsex_sgl.eval.hotpotqa import load_examples
from sparsex_sgl.harness.driver import PreparedRequest, RequestResult, run_load
from sparsex_sgl.harness.render import render
from sparsex_sgl.harness.report import save_bench
from sparsex_sgl.harness.workloads import rag
from sparsex_sgl.testing import Server, idle_stats, launch, wait_ready

MODEL = "qwen2.5-0.5b"
PHASES: dict[str, list[str]] = {"TP 1": [], "TP 2": ["--tp", "2"]}


def prepare(args: argparse.Namespace) -> list[PreparedRequest]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model(MODEL))
    examples = load_examples(hotpotqa_path(), args.requests, offset=args.offset)
    workload = rag(examples, args.requests, args.reuse, args.seed, args.new_tokens)
    return [PreparedRequest(r.id, *render(r, tok), r.max_new_tokens) for r in workload.requests]


def run_phase(args: argparse.Namespace, requests: list[PreparedRequest], work: Path,
              tp: list[str]) -> tuple[dict[str, list[RequestResult]], list[dict[str, Any]]]:
    """The requests through stock and SparseX at one TP size; results, and SparseX's per-rank stats."""
    env = {"SGLANG_CPU_OMP_THREADS_BIND": "0|1"} if tp else None
    servers: dict[str, Server] = {}
    try:
        for name, flags in (("stock", []), ("sparsex", ["--enable-sparsex"])):
            # One at a time: SGLang's CPU memory profile counts a neighbour's loading weights as its own.
            servers[name] = launch(resolve_model(MODEL), [*flags, *tp, "--mem-fraction-static", "0.9"],
                                   work / f"{name}.log", args.pool, env=env)
            wait_ready(servers[name])
        results: dict[str, list[RequestResult]] = {name: [] for name in servers}
        for index, request in enumerate(requests):
            for name, server in servers.items():
                asyncio.run(run_load(server.url, [request], results[name], progress=False))
            if (index + 1) % 10 == 0:
                print(f"{' '.join(tp) or 'TP 1'}: {index + 1}/{len(requests)} requests", flush=True)
        stats = idle_stats(servers["sparsex"])
    finally:
        for server in servers.values():
            server.stop()
    failed = {name: [r.error for r in rs if not r.ok] for name, rs in results.items() if any(not r.ok for r in rs)}
    if failed:
        raise RuntimeError(f"failed requests: {failed}")
    return results, stats.get("ranks", [stats])


def rows_of(result: RequestResult) -> tuple[int, int, int]:
    return int(result.reuse.get("rows_crc32", 0)), int(result.reuse.get("reused", 0)), int(result.reuse.get("recomputed", 0))


def summarize(args: argparse.Namespace, requests: list[PreparedRequest],
              phases: dict[str, tuple[dict[str, list[RequestResult]], list[dict[str, Any]]]]) -> dict[str, Any]:
    one, two = phases["TP 1"][0]["sparsex"], phases["TP 2"][0]["sparsex"]
    sparse = [i for i, r in enumerate(one) if rows_of(r)[0] != 0]
    differ = [requests[i].id for i in sparse if rows_of(one[i]) != rows_of(two[i])]
    systems = {}
    for phase, (results, ranks) in phases.items():
        stock = statistics.median(r.ttft or 0.0 for r in results["stock"])
        sparsex = statistics.median(r.ttft or 0.0 for r in results["sparsex"])
        systems[phase] = {"stock_ttft_p50_s": stock, "sparsex_ttft_p50_s": sparsex, "ttft_vs_stock": sparsex / stock,
                          "reused_tokens": [rank.get("reused_tokens", 0) for rank in ranks],
                          "fallbacks": [rank.get("fallbacks", {}) for rank in ranks]}
    return {
        "meta": {"machine": platform.platform(), "cpus": os.cpu_count(), "model": f"{MODEL} float32",
                 "args": vars(args) | {"out": str(args.out)}},
        "rows": {"sparse_requests": len(sparse), "same_rows": len(sparse) - len(differ),
                 "same_rows_share": (len(sparse) - len(differ)) / len(sparse) if sparse else None, "differ": differ,
                 "same_output": sum(a.text == b.text for a, b in zip(one, two, strict=True)), "requests": len(one)},
        "systems": systems,
    }


def table(report: dict[str, Any]) -> str:
    meta, rows = report["meta"], report["rows"]
    share = "not measured" if rows["same_rows_share"] is None else f"{rows['same_rows_share']:.2f}"
    lines = [(f"{meta['args']['requests']} RAG requests (HotpotQA, reuse {meta['args']['reuse']}), {meta['model']}, "
              f"{meta['cpus']} CPUs."), "",
             (f"Requests with sparse layers at TP 1: {rows['sparse_requests']}; the same rows at TP 2: "
             f"{rows['same_rows']} ({share}); the same greedy output: {rows['same_output']} of {rows['requests']}."), "",
             "| TP | stock TTFT p50 (s) | SparseX TTFT p50 (s) | SparseX vs stock | reused tokens per rank |",
             "|---|---|---|---|---|"]
    for phase, row in report["systems"].items():
        lines.append(f"| {phase} | {row['stock_ttft_p50_s']:.2f} | {row['sparsex_ttft_p50_s']:.2f} | "
                     f"{row['ttft_vs_stock']:.2f} | {', '.join(str(n) for n in row['reused_tokens'])} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--reuse", type=float, default=0.8, help="share of requests revisiting earlier paragraphs")
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--pool", type=int, default=16384)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    requests = prepare(args)
    phases = {}
    with tempfile.TemporaryDirectory() as tmp:
        for phase, tp in PHASES.items():
            work = Path(tmp) / phase.replace(" ", "")
            work.mkdir()
            phases[phase] = run_phase(args, requests, work, tp)
    report = summarize(args, requests, phases)
    save_bench(args.out, report, table(report))


if __name__ == "__main__":
    main()
