"""How the segment graph's bookkeeping scales with the number of cached nodes (issue 15).

The scheduler runs every lookup, insert, lock, unlock and eviction inline, so their cost must not grow
with the cache: a GPU server caches millions of tokens. The graph is filled with requests of 32
segments of 16 tokens each (one node per segment), then, at each size, timed:

- ``insert``: a new request's 32 pieces as a root path;
- ``lookup``: a request of 32 segments, half cached (found at other positions: non-prefix hits) and half
  new;
- ``lock_unlock``: lock and unlock that plan's nodes, reading ``protected_tokens`` as SGLang does;
- ``evict_10pct``: evict 10% of the cached tokens (least recently used leaves first).

Slots come from a counting allocator (no KV tensors: this measures the graph alone). Prints a Markdown
table and writes JSON to ``--out``::

    python bench/graph_scale.py --sizes 10000 100000 1000000 --out bench/results/graph-scale
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from sparsex_sgl.core.graph import SegmentGraph
from sparsex_sgl.core.segments import Piece, make_piece, namespace_key

SEGMENT = 16
PER_REQUEST = 32
NAMESPACE = namespace_key(None, None, "bench")


class CountingAllocator:
    """Endless slot ids; frees are only counted."""

    def __init__(self) -> None:
        self.next = 1
        self.freed = 0

    def alloc(self, n: int) -> list[int]:
        slots = list(range(self.next, self.next + n))
        self.next += n
        return slots

    def free(self, slots: Sequence[int]) -> None:
        self.freed += len(slots)


def request(segments: Sequence[tuple[int, ...]]) -> list[Piece]:
    """A prompt made of ``segments`` (each reusable), as pieces."""
    ids = [t for seg in segments for t in seg]
    return [make_piece(ids, i * SEGMENT, (i + 1) * SEGMENT, NAMESPACE, reusable=True) for i in range(len(segments))]


def new_segments(rng: random.Random, n: int) -> list[tuple[int, ...]]:
    return [tuple(rng.randrange(1, 50_000) for _ in range(SEGMENT)) for _ in range(n)]


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(nodes: int, seed: int, repeats: int) -> dict[str, float | int]:
    rng = random.Random(seed)
    allocator = CountingAllocator()
    graph = SegmentGraph(allocator, max_tokens=10 * nodes * SEGMENT)
    cached: list[tuple[int, ...]] = []
    start = time.perf_counter()
    while len(graph) < nodes:
        segments = new_segments(rng, PER_REQUEST)
        pieces = request(segments)
        graph.insert(pieces, allocator.alloc(pieces[-1].end))
        cached += segments
    fill_s = time.perf_counter() - start

    def insert() -> None:
        pieces = request(new_segments(rng, PER_REQUEST))
        graph.insert(pieces, allocator.alloc(pieces[-1].end))

    def mixed() -> list[Piece]:
        half = rng.sample(cached, PER_REQUEST // 2) + new_segments(rng, PER_REQUEST // 2)
        rng.shuffle(half)
        return request(half)

    lookups = [mixed() for _ in range(repeats)]
    plan = graph.lookup(lookups[0])

    def lookup() -> None:
        graph.lookup(lookups[rng.randrange(len(lookups))])

    def lock_unlock() -> None:
        before = graph.protected_tokens
        graph.lock(plan.node_ids)
        graph.unlock(plan.node_ids)
        assert graph.protected_tokens == before

    row: dict[str, float | int] = {"nodes": len(graph), "cached_tokens": graph.total_tokens, "fill_s": fill_s,
                                   "insert_ms": 1e3 * timed(insert, repeats), "lookup_ms": 1e3 * timed(lookup, repeats),
                                   "lock_unlock_ms": 1e3 * timed(lock_unlock, repeats)}
    tokens = graph.total_tokens // 10
    start = time.perf_counter()
    freed = graph.evict(tokens)
    row["evict_10pct_ms"] = 1e3 * (time.perf_counter() - start)
    assert freed >= tokens
    if len(graph) <= 20_000:  # a full scan: only where it is quick
        graph.check_invariants()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("results/graph-scale"))
    args = ap.parse_args()
    rows = []
    for size in args.sizes:
        rows.append(measure(size, args.seed, args.repeats))
        print(json.dumps(rows[-1]), flush=True)
    header = "| nodes | cached tokens | insert (ms/request) | lookup (ms/request) | lock+unlock (ms) | evict 10% (ms) |"
    lines = [header, "|---|---|---|---|---|---|"]
    lines += [f"| {r['nodes']:,} | {r['cached_tokens']:,} | {r['insert_ms']:.3f} | {r['lookup_ms']:.3f} | "
              f"{r['lock_unlock_ms']:.3f} | {r['evict_10pct_ms']:.1f} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "machine": platform.platform(), "rows": rows}, indent=1))
    (args.out / "results.md").write_text(
        f"Segment graph at scale: {PER_REQUEST} segments of {SEGMENT} tokens per request; median of "
        f"{args.repeats} runs; one CPU core, Python.\n\n{table}\n")


if __name__ == "__main__":
    main()
