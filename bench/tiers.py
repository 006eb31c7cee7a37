"""RAG over a corpus whose KV is many times the device pool: what the host tier and a shared store keep.

The workload (``harness.workloads.corpus_rag``): the paragraphs of ``--questions`` HotpotQA questions form the
corpus, each with a Zipf popularity; every request retrieves ``--per-request`` paragraphs by popularity and asks a
question. The same requests go, one at a time and interleaved (request i to every system before request i+1, so
drift on a shared machine hits all alike), to:

- ``stock``: SGLang's radix cache, pool ``--pool`` tokens;
- ``pool only``: ``--enable-sparsex``, the same pool, no tier below it (segments die on eviction);
- ``host tier``: the same pool plus ``--sparsex-host-tier-gb``;
- ``unbounded``: ``--enable-sparsex`` with a pool that holds every paragraph the run touches (the reuse ceiling);
- ``two instances``: two ``host tier`` servers sharing one ``file`` store, requests alternating between them.

Six SGLang CPU servers do not fit 24 GB beside each other (about 3.5 GB each), so the systems run in two
phases over the same requests, each with its own stock server: ``stock``, ``pool only``, ``host tier`` and
``unbounded``, then ``stock`` again and ``two instances``. Every TTFT ratio compares servers of one phase.

Per system: reused tokens per request (mean, and as a share of the unbounded pool's), requests that loaded a
tier, TTFT p50 (streamed first token) and its ratio to its phase's stock; for the requests the host tier
served, their TTFT against the unbounded pool's on the same requests (pool hit against host-tier load).
JSON, a Markdown table and a plot go to ``--out``.

    python bench/tiers.py --out bench/results/tiers-cpu
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import tempfile
from pathlib import Path
from typing import Any

from sparsex_sgl.assets import hotpotqa_path, resolve_model
from sparsex_sgl.eval.figures import pyplot
from sparsex_sgl.eval.hotpotqa import load_examples
from sparsex_sgl.harness.driver import PreparedRequest, RequestResult, run_load
from sparsex_sgl.harness.render import render
from sparsex_sgl.harness.report import save_bench
from sparsex_sgl.harness.workloads import corpus_rag
from sparsex_sgl.testing import Server, idle_stats, launch, wait_ready

KV_BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 4
"""SmolLM2-135M in float32: 30 layers, K and V, 3 KV heads of 64."""


def prepare(args: argparse.Namespace) -> tuple[list[PreparedRequest], int, int]:
    """The requests, the corpus's token count and the tokens of the distinct paragraphs the run touches."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2"))
    examples = load_examples(hotpotqa_path(), args.questions, offset=args.offset)
    workload = corpus_rag(examples, args.requests, args.per_request, args.zipf, args.seed, args.new_tokens)
    requests, touched = [], {}
    for request in workload.requests:
        ids, spans = render(request, tok)
        requests.append(PreparedRequest(request.id, ids, spans, request.max_new_tokens))
        for index, (start, end) in zip(request.tags["paragraphs"], spans):
            touched[index] = end - start
    corpus = sum(len(tok(p, add_special_tokens=False)["input_ids"])
                 for p in dict.fromkeys(p for e in examples for p in e.paragraphs))
    return requests, corpus, sum(touched.values())


PHASES = (("stock", "pool only", "host tier", "unbounded"), ("stock", "two instances"))


def start_systems(args: argparse.Namespace, work: Path, unbounded_pool: int, names: tuple[str, ...],
                  systems: dict[str, list[Server]]) -> None:
    """Start the servers of ``names`` into ``systems`` (the caller stops what started, whatever fails)."""
    model = resolve_model("smollm2")
    host = ["--enable-sparsex", "--sparsex-host-tier-gb", str(args.host_gb)]
    store = ["--sparsex-storage-backend", "file", "--sparsex-storage-backend-extra-config",
             json.dumps({"file_storage_path": str(work / "store")})]
    plan: dict[str, list[tuple[list[str], int]]] = {
        "stock": [([], args.pool)],
        "pool only": [(["--enable-sparsex"], args.pool)],
        "host tier": [(host, args.pool)],
        "unbounded": [(["--enable-sparsex"], unbounded_pool)],
        "two instances": [([*host, *store], args.pool), ([*host, *store], args.pool)],
    }
    for name in names:
        for i, (flags, pool) in enumerate(plan[name]):
            # One at a time: SGLang's CPU memory profile counts a neighbour's loading weights as its own. The
            # others' memory is taken already, so the static fraction is high; --max-total-tokens bounds the pool.
            server = launch(model, [*flags, "--mem-fraction-static", "0.95"], work / f"{name.replace(' ', '-')}-{i}.log",
                            pool)
            systems.setdefault(name, []).append(server)
            wait_ready(server)


def run_phase(args: argparse.Namespace, requests: list[PreparedRequest], unbounded_pool: int, work: Path,
              names: tuple[str, ...]) -> tuple[dict[str, list[RequestResult]], dict[str, list[Any]]]:
    """The requests through the systems of one phase, one at a time and interleaved; results and idle stats."""
    systems: dict[str, list[Server]] = {}
    try:
        start_systems(args, work, unbounded_pool, names, systems)
        results: dict[str, list[RequestResult]] = {name: [] for name in systems}
        for index, request in enumerate(requests):
            for name, servers in systems.items():
                server = servers[index % len(servers)]
                asyncio.run(run_load(server.url, [request], results[name], progress=False))
            if (index + 1) % 10 == 0:
                print(f"{'/'.join(names)}: {index + 1}/{len(requests)} requests", flush=True)
        stats = {name: [idle_stats(s) for s in servers] for name, servers in systems.items() if name != "stock"}
    finally:
        for servers in systems.values():
            for server in servers:
                server.stop()
    failed = {name: [r.error for r in rs if not r.ok] for name, rs in results.items() if any(not r.ok for r in rs)}
    if failed:
        raise RuntimeError(f"failed requests: {failed}")
    return results, stats


def run(args: argparse.Namespace) -> dict[str, Any]:
    requests, corpus_tokens, touched_tokens = prepare(args)
    unbounded_pool = touched_tokens + 200 * len(requests) + 8192
    phases = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, names in enumerate(PHASES):
            work = Path(tmp) / f"phase-{index}"
            work.mkdir()
            phases.append(run_phase(args, requests, unbounded_pool, work, names))
    return summarize(args, phases, corpus_tokens, touched_tokens)


def summarize(args: argparse.Namespace,
              phases: list[tuple[dict[str, list[RequestResult]], dict[str, list[Any]]]],
              corpus_tokens: int, touched_tokens: int) -> dict[str, Any]:
    first = phases[0][0]
    ceiling = statistics.fmean(int(r.reuse.get("reused", 0)) + int(r.reuse.get("prefix", 0))
                               for r in first["unbounded"])
    rows: dict[str, dict[str, Any]] = {}
    for phase, stats in phases:
        stock_ttft = statistics.median(r.ttft or 0.0 for r in phase["stock"])
        for name, rs in phase.items():
            if name == "stock" and rows:  # the second phase's stock: only its reference
                continue
            reused = statistics.fmean(int(r.reuse.get("reused", 0)) + int(r.reuse.get("prefix", r.cached_tokens))
                                      for r in rs)
            ttft = statistics.median(r.ttft or 0.0 for r in rs)
            tiers = [s.get("tiers", {}) for s in stats.get(name, [])]
            rows[name] = {
                "reused_per_request": reused, "reused_vs_unbounded": reused / ceiling if ceiling else None,
                "requests_loading_a_tier": sum(int(r.reuse.get("loaded", 0)) > 0 for r in rs),
                "ttft_p50_s": ttft, "ttft_vs_stock": ttft / stock_ttft, "phase_stock_ttft_p50_s": stock_ttft,
                "host_hit_tokens": sum(t.get("host_hit_tokens", 0) for t in tiers),
                "store_hit_tokens": sum(t.get("store_hit_tokens", 0) for t in tiers),
                "evicted_tokens": sum(s.get("evicted_tokens", 0) for s in stats.get(name, [])),
            }
    loaded = [i for i, r in enumerate(first["host tier"]) if int(r.reuse.get("loaded", 0)) > 0]
    host_vs_pool = ([(first["host tier"][i].ttft or 0.0) / (first["unbounded"][i].ttft or 1.0) for i in loaded]
                    if loaded else [])
    return {
        "meta": {"machine": platform.platform(), "cpus": __import__("os").cpu_count(), "model": "SmolLM2-135M float32",
                 "args": vars(args) | {"out": str(args.out)}, "corpus_tokens": corpus_tokens,
                 "touched_tokens": touched_tokens, "corpus_vs_pool": corpus_tokens / args.pool,
                 "touched_vs_pool": touched_tokens / args.pool,
                 "corpus_kv_gb": corpus_tokens * KV_BYTES_PER_TOKEN / 1e9},
        "systems": rows,
        "host_tier_loads": {"requests": len(loaded),
                            "ttft_ratio_to_pool_hit_p50": statistics.median(host_vs_pool) if host_vs_pool else None},
    }


def table(report: dict[str, Any]) -> str:
    meta, loads = report["meta"], report["host_tier_loads"]
    lines = [(f"Corpus {meta['corpus_tokens']} tokens ({meta['corpus_vs_pool']:.0f}x the {meta['args']['pool']}-token "
             f"pool), {meta['touched_tokens']} of them touched by the run ({meta['touched_vs_pool']:.1f}x); "
             f"{meta['args']['requests']} requests of {meta['args']['per_request']} paragraphs, Zipf "
             f"{meta['args']['zipf']}; {meta['model']}, {meta['cpus']} CPUs."), "",
             ("| system | reused tokens / request | vs unbounded pool | requests loading a tier | TTFT p50 (s) | "
             "TTFT vs its phase's stock |"), "|---|---|---|---|---|---|"]
    for name, row in report["systems"].items():
        share = "-" if row["reused_vs_unbounded"] is None else f"{row['reused_vs_unbounded']:.2f}"
        lines.append(f"| {name} | {row['reused_per_request']:.0f} | {share} | {row['requests_loading_a_tier']} | "
                     f"{row['ttft_p50_s']:.2f} | {row['ttft_vs_stock']:.2f} |")
    ratio = loads["ttft_ratio_to_pool_hit_p50"]
    lines += ["", (f"Requests the host tier served: {loads['requests']}; their TTFT against the unbounded pool's on "
              f"the same requests, p50: {'not measured' if ratio is None else f'{ratio:.2f}x'}.")]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    names = list(report["systems"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    axes[0].bar(names, [report["systems"][n]["reused_per_request"] for n in names])
    axes[0].set_title("reused tokens per request")
    axes[1].bar(names, [report["systems"][n]["ttft_p50_s"] for n in names])
    axes[1].set_title("TTFT p50 (s)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=300, help="HotpotQA questions whose paragraphs form the corpus")
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--requests", type=int, default=80)
    ap.add_argument("--per-request", type=int, default=6)
    ap.add_argument("--zipf", type=float, default=1.0)
    ap.add_argument("--pool", type=int, default=4096, help="device pool (tokens) of every server but the unbounded")
    ap.add_argument("--host-gb", type=float, default=1.0, help="host tier of each tiered server (three of them)")
    ap.add_argument("--new-tokens", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    report = run(args)
    save_bench(args.out, report, table(report))
    plot(report, args.out / "tiers.png")


if __name__ == "__main__":
    main()
