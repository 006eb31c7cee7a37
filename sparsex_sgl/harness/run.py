"""``sparsex-sgl bench run``: the same workloads against stock SGLang, SparseX and full prefill, side by side.

Systems (same model, same flags otherwise):
- ``stock``: SGLang with its radix cache (prefix reuse only);
- ``sparsex``: SGLang with ``--enable-sparsex`` (plus ``--sparsex-args``);
- ``full``: SGLang with ``--disable-radix-cache``: exact full prefill, the quality reference.

The harness starts each server in turn (or targets a running one with ``--url SYSTEM=URL``), runs every
workload at every offered load with the cache flushed in between, stops the server, and goes on to the
next. ``results.json`` (every request, every summary, the command line and the workload files' hashes)
and ``results.md`` are rewritten after each (system, workload, load) run, so an interrupted or failed
run keeps what it measured; a server that does not start is reported as such and the others still run.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import os
import platform
import shlex
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from sparsex_sgl.harness import quality, report
from sparsex_sgl.harness.driver import PreparedRequest, RequestResult, run_load
from sparsex_sgl.harness.render import render
from sparsex_sgl.harness.workloads import Workload

SYSTEM_FLAGS: dict[str, tuple[str, ...]] = {
    "stock": (),
    "sparsex": ("--enable-sparsex",),
    "full": ("--disable-radix-cache",),
}


def percentiles(values: list[float], prefix: str) -> dict[str, float | None]:
    if not values:
        return {f"{prefix}_p50": None, f"{prefix}_p90": None, f"{prefix}_p99": None, f"{prefix}_mean": None}
    arr = np.asarray(values)
    return {f"{prefix}_p50": float(np.percentile(arr, 50)), f"{prefix}_p90": float(np.percentile(arr, 90)),
            f"{prefix}_p99": float(np.percentile(arr, 99)), f"{prefix}_mean": float(arr.mean())}


def summarize(results: list[RequestResult], makespan: float, workload: Workload) -> dict[str, Any]:
    """Latency, throughput, reuse counts and gold-answer quality of one (system, workload, load) run."""
    tags = {r.id: r.tags for r in workload.requests}
    answers = {r.id: r.answers for r in workload.requests}
    ok = [r for r in results if r.ok]
    summary: dict[str, Any] = {"requests": len(results), "completed": len(ok), "errors": len(results) - len(ok),
                               "error_samples": sorted({r.error for r in results if not r.ok})[:3]}
    summary.update(percentiles([r.ttft for r in ok if r.ttft is not None], "ttft"))
    summary.update(percentiles([g for r in ok for g in r.token_gaps], "itl"))
    for kind in ("novel", "reuse"):
        subset = [r.ttft for r in ok if r.ttft is not None and (tags[r.id].get("reuse") == "novel") == (kind == "novel")]
        summary[f"ttft_p50_{kind}"] = float(np.percentile(subset, 50)) if subset else None
        summary[f"{kind}_requests"] = len(subset)
    summary["req_per_s"] = len(ok) / makespan if makespan > 0 else None
    summary["output_tok_per_s"] = sum(r.output_tokens for r in ok) / makespan if makespan > 0 else None
    summary["makespan_s"] = makespan
    n = max(1, len(ok))
    summary["prompt_tokens_mean"] = sum(r.prompt_tokens for r in ok) / n
    summary["prefix_hit_tokens_mean"] = sum(r.cached_tokens for r in ok) / n
    for key in ("prefix", "blended_prefix", "reused", "recomputed", "computed"):
        summary[f"sparsex_{key}_mean"] = sum(int(r.reuse.get(key, 0)) for r in ok) / n
    summary["fallbacks"] = sum(bool(r.reuse.get("fallback")) for r in ok)
    graded = [quality.gold_scores(r.text, answers[r.id]) for r in ok if answers[r.id]]
    if graded:
        summary["em"] = sum(em for em, _ in graded) / len(graded)
        summary["f1"] = sum(f1 for _, f1 in graded) / len(graded)
    return summary


def distinct_names(workloads: list[Workload], paths: list[Path]) -> list[Workload]:
    """Workloads keyed by name in the report: two of one kind (say RAG at two reuse rates) are told apart
    by their file names, ``rag:rag-n30-r80``; otherwise the second would replace the first."""
    counts = Counter(w.name for w in workloads)
    named = [dataclasses.replace(w, name=f"{w.name}:{p.stem}") if counts[w.name] > 1 else w
             for w, p in zip(workloads, paths, strict=True)]
    clashes = sorted(name for name, n in Counter(w.name for w in named).items() if n > 1)
    if clashes:
        raise SystemExit(f"bench run: workloads {clashes} appear twice; give each file its own name")
    return named


class Harness:
    """One invocation: prepares the workloads, runs the systems in turn, keeps ``results.json`` current."""

    def __init__(self, args: argparse.Namespace) -> None:
        from transformers import AutoTokenizer

        from sparsex_sgl.assets import resolve_model

        self.args = args
        self.model = resolve_model(args.model)
        tokenizer = AutoTokenizer.from_pretrained(self.model)
        self.workloads = distinct_names([Workload.read(path) for path in args.workload], args.workload)
        self.prepared = {w.name: [_prepare(r.id, *render(r, tokenizer), r.max_new_tokens, plain=args.plain)
                                  for r in w.requests] for w in self.workloads}
        self.out: Path = args.out
        self.out.mkdir(parents=True, exist_ok=True)
        self.runs: list[dict[str, Any]] = []
        self.report: dict[str, Any] = {
            "command": " ".join(shlex.quote(a) for a in ["sparsex-sgl", *sys.argv[1:]]),
            "machine": {"platform": platform.platform(), "python": platform.python_version(),
                        "cpus": _cpu_count(), "device": args.device},
            "model": str(self.model),
            "workloads": {w.name: {"file": str(p), "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
                                   "params": w.params, "requests": len(w.requests)}
                          for w, p in zip(self.workloads, args.workload)},
            "runs": self.runs,
        }

    def loads(self) -> list[dict[str, Any]]:
        if self.args.rate:
            return [{"rate": rate, "concurrency": None} for rate in self.args.rate]
        return [{"rate": None, "concurrency": self.args.concurrency}]

    def run_system(self, system: str) -> None:
        from sparsex_sgl.testing import CPU_FLAGS, launch, wait_ready

        server = None
        url = self.args.url.get(system)
        base: dict[str, Any] = {"system": system, "flags": []}
        if url is None:
            flags = [*SYSTEM_FLAGS[system], *shlex.split(self.args.server_args)]
            if system == "sparsex":
                flags += shlex.split(self.args.sparsex_args)
            base["flags"] = flags
            server = launch(self.model, flags, self.out / f"server-{system}.log", self.args.max_total_tokens,
                            base_flags=CPU_FLAGS if self.args.device == "cpu" else ())
            try:
                wait_ready(server, timeout=self.args.start_timeout)
            except (RuntimeError, TimeoutError) as exc:
                server.stop()
                self.runs.append({**base, "server_error": _shorten(str(exc))})
                self.write()
                print(f"[bench] {system}: server did not start; see {server.log}", file=sys.stderr)
                return
            url = server.url
        try:
            for workload in self.workloads:
                for load in self.loads():
                    self._run_one(system, url, workload, load, base)
        finally:
            if server is not None:
                server.stop()

    def _run_one(self, system: str, url: str, workload: Workload, load: dict[str, Any], base: dict[str, Any]) -> None:
        from sparsex_sgl.testing import flush_cache

        if not flush_cache(url):
            print(f"[bench] {url}: /flush_cache refused or unreachable; this run starts from a warm cache",
                  file=sys.stderr)
        results: list[RequestResult] = []
        run: dict[str, Any] = {**base, "workload": workload.name, **load, "url": url}
        self.runs.append(run)
        label = f"{system}/{workload.name}" + (f"@{load['rate']}/s" if load["rate"] else f" c={load['concurrency']}")
        started = time.perf_counter()
        try:
            makespan = asyncio.run(run_load(url, self.prepared[workload.name], results, rate=load["rate"],
                                            concurrency=load["concurrency"], seed=self.args.seed,
                                            timeout=self.args.timeout, label=label))
        except KeyboardInterrupt:
            run["interrupted"] = True
            makespan = time.perf_counter() - started
            raise
        finally:
            tags = {r.id: r.tags for r in workload.requests}
            run["requests"] = [{**asdict(r), "tags": tags[r.id]} for r in results]
            run["summary"] = summarize(results, makespan, workload)
            if system == "sparsex":
                run["sparsex_stats"] = _get_json(url + "/sparsex/stats")
            self.write()

    def write(self) -> None:
        """Fill agreement with the full-prefill run, then rewrite ``results.json`` and ``results.md``."""
        for run in self.runs:
            reference = next((r for r in self.runs if r["system"] == "full" and r.get("workload") == run.get("workload")
                              and r.get("requests")), None)
            if reference is not None and run.get("requests") is not None:
                texts = {q["id"]: q["text"] for q in run["requests"] if q["ok"]}
                ref_texts = {q["id"]: q["text"] for q in reference["requests"] if q["ok"]}
                run["summary"].update(quality.agreement(texts, ref_texts))
        (self.out / "results.json").write_text(json.dumps(self.report, indent=1))
        (self.out / "results.md").write_text(report.markdown(self.report))


def _shorten(message: str, tail: int = 1500) -> str:
    """The first line (what happened) and the end (the log's last lines, where the cause is) of a long message."""
    if len(message) <= tail + 200:
        return message
    return message.splitlines()[0] + "\n...\n" + message[-tail:]


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0))


def _get_json(url: str) -> Any:
    try:
        response = httpx.get(url, timeout=60)
        response.raise_for_status()
        return response.json()
    except (httpx.HTTPError, ValueError) as exc:
        return {"error": str(exc)}


def _url(text: str) -> tuple[str, str]:
    system, _, url = text.partition("=")
    if system not in SYSTEM_FLAGS or not url:
        raise argparse.ArgumentTypeError(f"--url wants SYSTEM=URL with SYSTEM in {sorted(SYSTEM_FLAGS)}, got {text!r}")
    return system, url.rstrip("/")


def _prepare(rid: str, input_ids: list[int], spans: list[tuple[int, int]], max_new_tokens: int,
             plain: bool) -> PreparedRequest:
    """The request as sent; ``plain`` drops its segment spans (same token ids)."""
    return PreparedRequest(rid, input_ids, [] if plain else spans, max_new_tokens)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", type=Path, nargs="+", required=True, help="workload JSONL file(s)")
    parser.add_argument("--model", default="smollm2", help="alias or HF folder (also the tokenizer)")
    parser.add_argument("--systems", default="full,stock,sparsex", help="subset of full,stock,sparsex, run in order")
    load = parser.add_mutually_exclusive_group()
    load.add_argument("--rate", type=lambda s: [float(x) for x in s.split(",")], default=None,
                      help="open-loop Poisson arrival rate(s), requests/s, comma-separated")
    load.add_argument("--concurrency", type=int, default=1, help="requests in flight (closed loop)")
    parser.add_argument("--url", type=_url, action="append", default=[], help="SYSTEM=URL: target a running server")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cpu adds the CPU server flags")
    parser.add_argument("--server-args", default="", help="extra flags for every server")
    parser.add_argument("--sparsex-args", default="", help="extra flags for the SparseX server")
    parser.add_argument("--max-total-tokens", type=int, default=32768)
    parser.add_argument("--timeout", type=float, default=900.0, help="per-request timeout (s)")
    parser.add_argument("--start-timeout", type=float, default=600.0, help="server start timeout (s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the arrival times")
    parser.add_argument("--plain", action="store_true",
                        help="send no segment data, as a client that marks none (pair with --sparsex-args "
                             "'--sparsex-auto-segment 32')")
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json, results.md, server logs")
    parser.set_defaults(run=main)


def main(args: argparse.Namespace) -> None:
    args.url = dict(args.url)
    systems = args.systems.split(",")
    unknown = set(systems) - set(SYSTEM_FLAGS)
    if unknown:
        raise SystemExit(f"unknown systems {sorted(unknown)}; choose from {sorted(SYSTEM_FLAGS)}")
    harness = Harness(args)
    try:
        for system in systems:
            harness.run_system(system)
    except KeyboardInterrupt:
        harness.write()
        print(f"[bench] interrupted; partial results in {args.out / 'results.json'}", file=sys.stderr)
        raise SystemExit(130) from None
    print((args.out / "results.md").read_text())
    print(report.run_summary(json.loads((args.out / "results.json").read_text()), args.out))
