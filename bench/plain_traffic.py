"""Traffic without segment data: does ``--enable-sparsex`` cost a server anything? SGLang's own benchmark.

Starts a stock server and an ``--enable-sparsex`` server on 127.0.0.1 (CPU flags, SmolLM2, the same
pool), one at a time so they never share the CPU, and runs ``python -m sglang.bench_serving --backend
sglang --dataset-name generated-shared-prefix`` against each: groups of requests that share a long
system prompt (SGLang's prefix-cache workload), no ``custom_params``. The systems alternate for
``--rounds`` rounds (stock, SparseX, stock, SparseX, ...) so drift on a shared machine hits both; the
table gives each system's median over rounds of TTFT p50 and throughput, and their ratios. JSON and a
Markdown table go to ``--out``.

    python bench/plain_traffic.py --out bench/results/plain-traffic-cpu
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from sparsex_sgl.assets import resolve_model
from sparsex_sgl.testing import launch, wait_ready

SYSTEMS = {"stock": [], "sparsex": ["--enable-sparsex"]}
METRICS = ("median_ttft_ms", "mean_ttft_ms", "request_throughput", "output_throughput", "median_e2e_latency_ms")


def run_once(system: str, args: argparse.Namespace, model: Path, work: Path, round_index: int) -> dict[str, Any]:
    server = launch(model, [*SYSTEMS[system], *args.server_args.split()], work / f"{system}-{round_index}.log",
                    args.max_total_tokens)
    try:
        wait_ready(server)
        out = work / f"{system}-{round_index}.jsonl"
        cmd = [sys.executable, "-m", "sglang.bench_serving", "--backend", "sglang", "--base-url", server.url,
               "--dataset-name", "generated-shared-prefix", "--model", str(model), "--tokenizer", str(model),
               "--gsp-num-groups", str(args.groups), "--gsp-prompts-per-group", str(args.per_group),
               "--gsp-system-prompt-len", str(args.system_len), "--gsp-question-len", str(args.question_len),
               "--gsp-output-len", str(args.output_len), "--num-prompts", str(args.groups * args.per_group),
               "--max-concurrency", str(args.concurrency), "--seed", "1", "--disable-tqdm",
               "--output-file", str(out)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        result = json.loads(out.read_text().splitlines()[-1])
        if result.get("completed") != args.groups * args.per_group:
            raise RuntimeError(f"{system}: {result.get('completed')} of {args.groups * args.per_group} completed")
        return {k: result[k] for k in (*METRICS, "completed")}
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--per-group", type=int, default=8)
    ap.add_argument("--system-len", type=int, default=768)
    ap.add_argument("--question-len", type=int, default=96)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-total-tokens", type=int, default=16384)
    ap.add_argument("--server-args", default="", help="extra flags for both servers")
    ap.add_argument("--out", type=Path, default=Path("results/plain-traffic"))
    args = ap.parse_args()
    model = resolve_model("smollm2")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in SYSTEMS}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            for system in SYSTEMS:
                runs[system].append(run_once(system, args, model, Path(tmp), round_index))
                print(system, round_index, json.dumps(runs[system][-1]), flush=True)
    median = {s: {k: statistics.median(r[k] for r in rs) for k in METRICS} for s, rs in runs.items()}
    ratios = {"ttft_p50_sparsex_over_stock": median["sparsex"]["median_ttft_ms"] / median["stock"]["median_ttft_ms"],
              "throughput_sparsex_over_stock": median["sparsex"]["request_throughput"] / median["stock"]["request_throughput"]}
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"args": {k: str(v) for k, v in vars(args).items()}, "machine": platform.platform(), "runs": runs,
              "median": median, "ratios": ratios}
    (args.out / "results.json").write_text(json.dumps(report, indent=1))
    lines = [(f"SGLang bench_serving, generated-shared-prefix: {args.groups} groups x {args.per_group} requests, "
              f"system prompt {args.system_len}, question {args.question_len}, output {args.output_len} tokens, "
              f"concurrency {args.concurrency}; median of {args.rounds} alternating rounds"), "",
             "| system | TTFT p50 (ms) | request throughput (req/s) | output throughput (tok/s) |", "|---|---|---|---|"]
    for system, m in median.items():
        lines.append(f"| {system} | {m['median_ttft_ms']:.0f} | {m['request_throughput']:.3f} | "
                     f"{m['output_throughput']:.1f} |")
    lines += ["", (f"SparseX / stock: TTFT p50 {ratios['ttft_p50_sparsex_over_stock']:.3f}, "
                   f"throughput {ratios['throughput_sparsex_over_stock']:.3f}")]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
