"""Replay: where a hybrid model's prefix cache should keep recurrent-state checkpoints (issue 36, arXiv 2605.05219).

A hybrid model resumes a prefix hit only from a stored recurrent state at or below the hit's depth, and recomputes
every token after it. This replays real token streams through an exact prefix cache that keeps all attention K/V
and recurrent states only where a policy puts them, and counts, per request, the prefix tokens recomputed (hit
depth minus the resume point) and the states kept. No model runs: the figures are token counts and state counts;
a state's bytes depend on the model (Qwen3.5-0.8B: one state weighs about 768 tokens of attention K/V).

Workloads (Qwen2.5 tokenizer, the data packages offline):
- ``document QA``: many questions over a few long documents (SQuAD articles, all their paragraphs), QuALITY-like;
- ``pool QA``: the same over HotpotQA pools as long shared prefixes (a pool's paragraphs whole, in one order);
- ``RAG pools``: retrieval over HotpotQA pools, a request taking the top 2-10 paragraphs of a pool in one
  relevance order (prefixes shared to varied depths);
- ``system prompts``: four long system prompts (SQuAD articles) in front of multi-turn ShareGPT conversations;
  each turn resends the conversation so far.

Policies: the dynamic program with M checkpoints per sequence over the online hit depths, one of them at the
sequence's end when hits continue sequences there (``core.checkpoints.HitDepths``, the placement the server's
``core.states`` keeps); a state every B
tokens (block); k states evenly spaced (balanced) or log-spaced towards the end; and SGLang 0.5.23's placement,
one state per radix node at request ends and chunked-prefill chunk ends (8,192 tokens).

    python bench/checkpoints.py --out bench/results/checkpoints
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparsex_sgl.assets import hotpotqa_path, resolve_model, sharegpt_path
from sparsex_sgl.core.checkpoints import BIN, HitDepths
from sparsex_sgl.eval.hotpotqa import load_examples
from sparsex_sgl.harness.report import save_bench
from sparsex_sgl.harness.workloads import sharegpt_conversations

MOD = (1 << 61) - 1
CHUNK = 8192
"""SGLang's default ``--chunked-prefill-size`` on a large GPU: its placement keeps a state at each chunk end."""


@dataclass(frozen=True)
class Request:
    prompt: tuple[int, ...]
    cached: tuple[int, ...]
    """What the cache holds after the request: its prompt, and the reply where the next turn resends it."""


def prefix_hashes(tokens: Sequence[int]) -> list[int]:
    """``h[i]``: a rolling hash of ``tokens[:i]`` (prefix identity at every offset in one pass)."""
    h = [0] * (len(tokens) + 1)
    for i, t in enumerate(tokens):
        h[i + 1] = (h[i] * 1_000_003 + t + 1) % MOD
    return h


Policy = Callable[[int, Request], list[int]]
"""(request index, request) -> the offsets of its cached sequence at which to keep a state."""


class Replay:
    """An exact prefix cache (all attention K/V kept) with recurrent states at the offsets a policy picks."""

    def __init__(self) -> None:
        self.bins: dict[tuple[int, int], tuple[int, ...]] = {}  # (k, hash of k bins) -> a sequence holding them
        self.states: set[tuple[int, int]] = set()  # (offset, prefix hash)
        self.offsets: set[int] = set()
        self.ends: dict[int, set[int]] = {}  # length -> prefix hashes of the cached sequences not continued since

    def depth(self, tokens: Sequence[int], h: list[int]) -> int:
        k = 0
        while (k + 1) * BIN <= len(tokens) and (k + 1, h[(k + 1) * BIN]) in self.bins:
            k += 1
        holder = self.bins.get((k, h[k * BIN])) if k else None
        extra = 0
        if holder is not None:
            for a, b in zip(holder[k * BIN:], tokens[k * BIN:]):
                if a != b:
                    break
                extra += 1
        return min(k * BIN + extra, len(tokens) - 1)  # the last token always runs (its logits start decoding)

    def at_end(self, depth: int, h: list[int]) -> bool:
        """Whether a hit of ``depth`` continues a cached sequence at its end."""
        return h[depth] in self.ends.get(depth, ())

    def resume(self, depth: int, h: list[int]) -> int:
        return max((o for o in self.offsets if o <= depth and (o, h[o]) in self.states), default=0)

    def add(self, tokens: Sequence[int], offsets: Sequence[int]) -> None:
        h = prefix_hashes(tokens)
        seq = tuple(tokens)
        for k in range(1, len(tokens) // BIN + 1):
            self.bins.setdefault((k, h[k * BIN]), seq)
        self.bins.setdefault((0, 0), seq)
        for length, ends in self.ends.items():
            if length < len(tokens):
                ends.discard(h[length])
        self.ends.setdefault(len(tokens), set()).add(h[len(tokens)])
        for o in offsets:
            if 0 < o <= len(tokens):
                self.states.add((o, h[o]))
                self.offsets.add(o)


def replay(requests: Sequence[Request], policy: Policy, learned: HitDepths | None = None) -> dict[str, float]:
    cache = Replay()
    recomputed, hits = [], 0
    for index, request in enumerate(requests):
        h = prefix_hashes(request.prompt)
        depth = cache.depth(request.prompt, h)
        recomputed.append(depth - cache.resume(depth, h))
        hits += depth
        if learned is not None:
            learned.observe(depth, cache.at_end(depth, h))
        cache.add(request.cached, policy(index, request))
    n, half = len(requests), len(requests) // 2
    return {"recomputed_per_request": sum(recomputed) / n, "hit_per_request": hits / n, "states": len(cache.states),
            "recomputed_second_half": sum(recomputed[half:]) / (n - half)}


def block(size: int) -> Policy:
    return lambda _, r: list(range(size, len(r.cached) + 1, size))


def balanced(k: int) -> Policy:
    return lambda _, r: [round(len(r.cached) * (i + 1) / (k + 1) / BIN) * BIN for i in range(k)]


def log_spaced(k: int) -> Policy:
    """k states at 1/2, 3/4, 7/8, ... of the sequence: dense near its end, where a next turn resumes."""
    return lambda _, r: [int(len(r.cached) * (1 - 0.5 ** (i + 1)) / BIN) * BIN for i in range(k)]


def sglang(_: int, r: Request) -> list[int]:
    return [len(r.prompt), len(r.cached), *range(CHUNK, len(r.prompt), CHUNK)]


def dynamic(learned: HitDepths) -> Policy:
    """The shipped placement (``core.checkpoints.HitDepths``, what ``core.states`` keeps): M states per sequence
    by the dynamic program over the learned hit depths, one of them at the sequence's end when hits continue
    sequences there."""
    return lambda _, r: list(learned.plan(len(r.cached)))


# ---------------------------------------------------------------------- workloads
def encode(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def squad_articles(n: int) -> list[tuple[str, list[str]]]:
    """The ``n`` longest SQuAD dev articles: (text, questions)."""
    data = json.loads((hotpotqa_path().parent / "squad.json").read_text())["data"]
    articles = []
    for article in data:
        text = f"Document: {article['title'].replace('_', ' ')}\n" + "\n".join(p["context"] for p in article["paragraphs"])
        questions = [qa["question"] for p in article["paragraphs"] for qa in p["qas"]]
        articles.append((text, questions))
    return sorted(articles, key=lambda a: -len(a[0]))[:n]


def document_qa(tok: Any, n: int, seed: int) -> list[Request]:
    rng = random.Random(seed)
    articles = [(encode(tok, "Answer from the document.\n\n" + text), qs) for text, qs in squad_articles(6)]
    out = []
    for _ in range(n):
        doc, questions = rng.choice(articles)
        prompt = tuple(doc + encode(tok, f"\n\nQuestion: {rng.choice(questions)}\nAnswer:"))
        out.append(Request(prompt, prompt))
    return out


def pool_qa(tok: Any, n: int, seed: int) -> list[Request]:
    """Questions over HotpotQA pools as long shared prefixes: each of 20 pools' paragraphs whole, in one order."""
    rng = random.Random(seed)
    examples = load_examples(hotpotqa_path(), 20, offset=1000)
    pools = [encode(tok, "Answer from the documents.\n\n" + "\n".join(e.paragraphs)) for e in examples]
    return [Request(prompt, prompt) for prompt in
            (tuple(rng.choice(pools) + encode(tok, f"\nQuestion: {rng.choice(examples).question}\nAnswer:"))
             for _ in range(n))]


def rag_pools(tok: Any, n: int, seed: int) -> list[Request]:
    """Retrieval over HotpotQA pools: each pool's paragraphs in one relevance order; a request takes its top
    2-10 and asks a question, so requests on one pool share their leading paragraphs to varied depths."""
    rng = random.Random(seed)
    examples = load_examples(hotpotqa_path(), 20, offset=1000)
    pools = [[encode(tok, p) for p in e.paragraphs] for e in examples]
    head = encode(tok, "Answer from the documents.\n\n")
    out = []
    for _ in range(n):
        pool = rng.randrange(len(pools))
        top = [t for paragraph in pools[pool][: rng.randint(2, 10)] for t in paragraph]
        question = encode(tok, f"\nQuestion: {rng.choice(examples).question}\nAnswer:")
        prompt = tuple(head + top + question)
        out.append(Request(prompt, prompt))
    return out


def system_prompts(tok: Any, n: int, seed: int) -> list[Request]:
    rng = random.Random(seed)
    systems = [encode(tok, f"You are the assistant of a help desk. Reference:\n{text[:6000]}\n\n")
               for text, _ in squad_articles(10)[6:10]]
    out: list[Request] = []
    for turns in sharegpt_conversations(sharegpt_path(), n, 2, 1200):
        history = list(rng.choice(systems))
        for user, reply in zip(turns[0::2], turns[1::2]):
            history += encode(tok, f"User: {user}\nAssistant:")
            prompt = tuple(history)
            history += encode(tok, f" {reply}\n")
            out.append(Request(prompt, tuple(history)))
    return out


def fixed(policy: Policy) -> Callable[[HitDepths], Policy]:
    return lambda _: policy


POLICIES: dict[str, tuple[int, Callable[[HitDepths], Policy]]] = {
    **{f"DP M={m}": (m, dynamic) for m in (1, 2, 4, 16, 64)},
    **{f"block {b}": (1, fixed(block(b))) for b in (64, 256, 512)},
    **{f"balanced {k}": (1, fixed(balanced(k))) for k in (1, 4)},
    **{f"log-spaced {k}": (1, fixed(log_spaced(k))) for k in (4, 8)},
    "SGLang 0.5.23": (1, fixed(sglang)),
}
"""Name -> (states per sequence the learned placement keeps, the policy)."""


REFERENCE: dict[str, Callable[[Request], Sequence[int]] | None] = {
    "no state": lambda r: (),
    "block 64": lambda r: range(BIN, len(r.prompt) + 1, BIN),
    "SGLang 0.5.23": lambda r: sglang(0, r),
    "DP M=4": None,  # core.states' own learned placement
}
"""The policies timed on the reference executor (None: ``HybridPrefixCache``'s learned placement)."""


def reference_prefills(requests: Sequence[Request], kind: str) -> dict[str, dict[str, float]]:
    """Prefill ``requests`` (token ids folded into the tiny vocabulary, so shared prefixes stay shared) through
    ``reference.hybrid.HybridPrefixCache`` on a tiny random hybrid, one thread, under each policy: the measured
    prefill time, the tokens computed, and the states kept."""
    import torch

    from sparsex_sgl.reference.hybrid import HybridPrefixCache, tiny_model

    torch.set_num_threads(1)
    model = tiny_model(kind)
    rows = {}
    for name, capture in REFERENCE.items():
        cache = HybridPrefixCache(model, num_slots=1 << 17, max_states=1 << 16, per_sequence=4)
        seconds, computed = 0.0, 0
        for r in requests:
            ids = [t % 256 for t in r.prompt]
            start = time.perf_counter()
            done = cache.prefill(ids, capture=None if capture is None else capture(r))
            seconds += time.perf_counter() - start
            computed += len(ids) - done.resumed_from
        n = len(requests)
        rows[name] = {"prefill_ms_per_request": 1000 * seconds / n, "computed_per_request": computed / n,
                      "states": len(cache.states),
                      "state_kib": sum(state.nbytes for state in cache.stored.values()) / 1024}
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model("qwen2.5-0.5b"))
    workloads = {"document QA": document_qa(tok, args.requests, args.seed),
                 "pool QA": pool_qa(tok, args.requests, args.seed),
                 "RAG pools": rag_pools(tok, args.requests, args.seed),
                 "system prompts": system_prompts(tok, max(args.requests // 4, 2), args.seed)}
    report: dict[str, Any] = {"workloads": {}}
    for name, requests in workloads.items():
        bins = max(len(r.cached) for r in requests) // BIN + 1
        rows = {}
        for policy, (m, make) in POLICIES.items():
            learned = HitDepths(bins, m)
            rows[policy] = replay(requests, make(learned), learned)
        report["workloads"][name] = {"requests": len(requests),
                                     "prompt_tokens": sum(len(r.prompt) for r in requests) / len(requests),
                                     "policies": rows}
    timed = workloads["pool QA"][: args.reference_requests]
    report["reference"] = {"workload": "pool QA", "requests": len(timed),
                           "models": {kind: reference_prefills(timed, kind) for kind in ("qwen3_5", "nemotron_h")}}
    return report


def table(report: dict[str, Any]) -> str:
    lines = []
    for name, w in report["workloads"].items():
        block64 = w["policies"]["block 64"]["states"]
        lines += [f"**{name}**: {w['requests']} requests, {w['prompt_tokens']:.0f} prompt tokens each on average.", "",
                  ("| policy | states kept | vs block 64 | prefix hit / request | recomputed / request | "
                   "recomputed, second half |"), "|---|---|---|---|---|---|"]
        for policy, row in w["policies"].items():
            lines.append(f"| {policy} | {row['states']} | {row['states'] / block64:.3f} | "
                         f"{row['hit_per_request']:.0f} | {row['recomputed_per_request']:.1f} | "
                         f"{row['recomputed_second_half']:.1f} |")
        lines.append("")
    ref = report["reference"]
    lines += [(f"**Prefill on the reference executor** (`reference.hybrid`, tiny random hybrids, one thread): "
               f"the first {ref['requests']} pool QA requests."), "",
              "| model | policy | prefill ms / request | tokens computed / request | states kept | state KiB |",
              "|---|---|---|---|---|---|"]
    for kind, rows in ref["models"].items():
        for policy, row in rows.items():
            lines.append(f"| {kind} | {policy} | {row['prefill_ms_per_request']:.1f} | "
                         f"{row['computed_per_request']:.0f} | {row['states']} | {row['state_kib']:.0f} |")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(report["workloads"]), figsize=(5 * len(report["workloads"]), 4))
    for ax, (name, w) in zip(axes, report["workloads"].items()):
        for policy, row in w["policies"].items():
            ax.scatter(max(row["states"], 1), row["recomputed_per_request"], label=policy,
                       marker="o" if policy.startswith("DP") else "x")
        ax.set_xscale("log")
        ax.set_title(name)
        ax.set_xlabel("states kept")
        ax.set_ylabel("recomputed prefix tokens / request")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reference-requests", type=int, default=200,
                    help="pool QA requests prefilled on the reference executor per model and policy")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    report = run(args)
    report["meta"] = {"args": vars(args) | {"out": str(args.out)}, "bin": BIN, "chunk": CHUNK}
    save_bench(args.out, report, table(report))
    plot(report, args.out / "pareto.png")


if __name__ == "__main__":
    main()
