"""Soak a real ``--enable-sparsex`` server with mixed, hostile traffic and check that nothing leaks.

One server (SmolLM2 on the CPU by default) with a KV pool small enough that eviction runs all the time.
``--requests`` requests go out from ``--concurrency`` client threads, drawn at random (seeded) from:

- RAG: a HotpotQA question with its paragraphs as segments, in a new order, under one of several
  namespaces (some with a ``cache_salt``);
- chat: a follow-up round that resends an earlier prompt plus the server's reply and a new question;
- plain: a prompt without segment data;
- invalid: malformed ``custom_params``, an empty prompt, ids outside the vocabulary (each must get 400);
- aborted: a streaming request whose client hangs up after 0-3 events.

Before and after the soak the same probe requests (greedy, on a flushed cache) must give the same
tokens. Afterwards the server must be idle and whole: every pool slot free or cached, nothing locked, no
request state left, a flush returning every slot, and the scheduler process's resident memory flat after
warm-up (last sample within ``--rss-slack`` of the one taken after the first tenth). Every valid request
must have been answered 200. Prints a summary and writes JSON to ``--out``::

    python bench/soak.py --requests 2000 --out bench/results/soak-cpu
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

from sparsex_sgl.assets import hotpotqa_path, resolve_model
from sparsex_sgl.core.protocol import flatten_spans
from sparsex_sgl.eval.hotpotqa import SegmentedPrompt, build_prompt, load_examples
from sparsex_sgl.testing import Server, flush_cache, launch, wait_ready

INVALID: list[dict[str, Any]] = [
    {"text": ""},
    {"input_ids": [1, 2, 10**9]},
    {"text": "hi", "sampling_params": {"custom_params": "x"}},
    {"input_ids": [5, 6, 7], "sampling_params": {"custom_params": {"tool": [[1]]}}},
    {"input_ids": [5, 6, 7], "sampling_params": {"custom_params": {"sparsex_spans": [0, 99]}}},
    {"text": "hi", "sampling_params": {"custom_params": {"sparsex_recompute_ratio": 3}}},
]
NAMESPACES: list[dict[str, Any]] = [{}, {"ns": "a"}, {"ns": "b"}, {"salt": "s1"}, {"salt": "s1", "ns": "a"}]


class Soak:
    def __init__(self, server: Server, prompts: list[SegmentedPrompt], seed: int) -> None:
        self.server = server
        self.prompts = prompts
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.failures: list[str] = []
        self.replies: list[tuple[SegmentedPrompt, list[int]]] = []

    def _body(self, kind: str) -> dict[str, Any]:
        rng = self.rng
        with self.lock:
            prompt = rng.choice(self.prompts)
            tenant = rng.choice(NAMESPACES)
            earlier = rng.choice(self.replies) if self.replies else None
            invalid = rng.choice(INVALID)
        params: dict[str, Any] = {"temperature": 0, "max_new_tokens": rng.randint(1, 12)}
        body: dict[str, Any] = {"sampling_params": params}
        custom: dict[str, Any] = {"sparsex_namespace": tenant["ns"]} if "ns" in tenant else {}
        if "salt" in tenant:
            body["cache_salt"] = tenant["salt"]
        if kind == "invalid":
            return {**invalid, "sampling_params": {"max_new_tokens": 1, **invalid.get("sampling_params", {})}}
        if kind == "chat" and earlier is not None:
            first, reply = earlier
            body["input_ids"] = [*first.input_ids, *reply, *first.input_ids[-24:]]
            custom["sparsex_spans"] = flatten_spans(first.spans)
        else:
            body["input_ids"] = list(prompt.input_ids)
            if kind != "plain":
                custom["sparsex_spans"] = flatten_spans(prompt.spans)
        if custom:
            params["custom_params"] = custom
        return body

    def one(self, kind: str) -> None:
        body = self._body(kind)
        try:
            if kind == "aborted":
                self.server.hang_up_after(body, self.rng.randint(0, 3))
                status = 0
            else:
                status, reply = self.server.post("/generate", body, timeout=600)
        except Exception as exc:  # noqa: BLE001 - a transport error is a failure to report
            with self.lock:
                self.failures.append(f"{kind}: {exc!r}")
            return
        expected = 400 if kind == "invalid" else 200
        with self.lock:
            self.counts[kind] += 1
            if kind != "aborted" and status != expected:
                self.failures.append(f"{kind}: HTTP {status}: {str(reply)[:200]}")
            elif kind in ("rag", "plain") and len(self.replies) < 64:
                self.replies.append((self._as_prompt(body), list(reply["output_ids"])))

    @staticmethod
    def _as_prompt(body: dict[str, Any]) -> SegmentedPrompt:
        custom = body["sampling_params"].get("custom_params") or {}
        flat = custom.get("sparsex_spans") or []
        return SegmentedPrompt(tuple(body["input_ids"]), tuple(zip(flat[::2], flat[1::2])), 0)


def scheduler_rss(server: Server) -> int:
    """Resident memory of the server's scheduler process (the child that holds the model and the cache)."""
    children = psutil.Process(server.process.pid).children(recursive=True)
    return max(p.memory_info().rss for p in children) if children else 0


def probe(server: Server, prompts: list[SegmentedPrompt]) -> list[list[int]]:
    assert flush_cache(server.url)
    out = []
    for prompt in prompts:
        status, reply = server.post("/generate", {"input_ids": list(prompt.input_ids), "sampling_params": {
            "temperature": 0, "max_new_tokens": 8, "custom_params": {"sparsex_spans": flatten_spans(prompt.spans)}}})
        assert status == 200, reply
        out.append(reply["output_ids"])
    return out


def idle_stats(server: Server, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        s: dict[str, Any] = server.get("/sparsex/stats")["schedulers"][0]
        whole = s["allocator_free"] + s["graph_tokens"] == s["allocator_size"]
        if (s["tracked_requests"] == 0 and s["graph_protected_tokens"] == 0 and whole) or time.monotonic() > deadline:
            return s


def run(requests: int, concurrency: int, pool: int, seed: int, log: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2"))
    prompts = []
    for example in load_examples(hotpotqa_path(), 24, offset=300):
        example = type(example)(**{**example.__dict__, "paragraphs": example.paragraphs[:5]})
        prompts += [build_prompt(tok, example, s) for s in range(2)]
    prompts = [p for p in prompts if len(p.input_ids) < pool // 3]
    server = launch(resolve_model("smollm2"), ["--enable-sparsex", "--max-running-requests", str(concurrency)],
                    log, pool)
    try:
        wait_ready(server)
        known = probe(server, prompts[:3])
        soak = Soak(server, prompts, seed)
        kinds = ["rag"] * 5 + ["chat"] * 2 + ["plain"] * 2 + ["invalid", "aborted"]
        draw = random.Random(seed + 1)
        plan = [draw.choice(kinds) for _ in range(requests)]
        rss: list[tuple[int, int]] = []
        cursor = iter(range(requests))
        cursor_lock = threading.Lock()

        def worker() -> None:
            while True:
                with cursor_lock:
                    i = next(cursor, None)
                if i is None:
                    return
                soak.one(plan[i])
                if i % max(1, requests // 50) == 0:
                    with cursor_lock:
                        rss.append((i, scheduler_rss(server)))

        start = time.monotonic()
        threads = [threading.Thread(target=worker) for _ in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - start
        after = idle_stats(server)
        again = probe(server, prompts[:3])
        flush_ok = flush_cache(server.url)
        flushed = idle_stats(server)
        rss.sort()
        warm = next((r for i, r in rss if i >= requests // 10), rss[0][1] if rss else 0)
        report = {
            "requests": requests, "concurrency": concurrency, "pool_tokens": pool, "seconds": elapsed,
            "kinds": dict(soak.counts), "failures": soak.failures[:20], "n_failures": len(soak.failures),
            "evicted_tokens": after["evicted_tokens"], "fallbacks": after["fallbacks"],
            "reused_tokens": after["reused_tokens"], "deferred_admissions": after["deferred_admissions"],
            "idle": {k: after[k] for k in ("tracked_requests", "graph_protected_tokens", "graph_tokens",
                                           "allocator_free", "allocator_size")},
            "leaked_slots": after["allocator_size"] - after["allocator_free"] - after["graph_tokens"],
            "flush_returns_every_slot": flush_ok and flushed["allocator_free"] == flushed["allocator_size"]
            and flushed["graph_tokens"] == 0,
            "probe_outputs_unchanged": known == again,
            "rss_mb_after_warmup": warm / 2**20, "rss_mb_end": (rss[-1][1] if rss else 0) / 2**20,
            "server_alive": server.process.poll() is None,
        }
        return report
    finally:
        server.stop()


def verdict(report: dict[str, Any], rss_slack: float) -> list[str]:
    """What went wrong, if anything."""
    problems = []
    if report["n_failures"]:
        problems.append(f"{report['n_failures']} requests failed: {report['failures'][:3]}")
    if report["leaked_slots"] or report["idle"]["tracked_requests"] or report["idle"]["graph_protected_tokens"]:
        problems.append(f"not whole when idle: {report['idle']}")
    if not report["flush_returns_every_slot"]:
        problems.append("a flush did not return every slot")
    if not report["probe_outputs_unchanged"]:
        problems.append("greedy probe outputs changed")
    if report["rss_mb_end"] > report["rss_mb_after_warmup"] * (1 + rss_slack):
        problems.append(f"scheduler memory grew from {report['rss_mb_after_warmup']:.0f} to {report['rss_mb_end']:.0f} MB")
    if not report["server_alive"]:
        problems.append("the server died")
    return problems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--pool", type=int, default=3072, help="--max-total-tokens of the server")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rss-slack", type=float, default=0.05)
    ap.add_argument("--out", type=Path, default=Path("results/soak"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report = run(args.requests, args.concurrency, args.pool, args.seed, args.out / "server.log")
    report["problems"] = verdict(report, args.rss_slack)
    report["machine"] = platform.platform()
    (args.out / "results.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    if report["problems"]:
        raise SystemExit("soak failed: " + "; ".join(report["problems"]))


if __name__ == "__main__":
    main()
