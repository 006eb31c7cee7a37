"""SparseX's counters on SGLang's Prometheus endpoint (``--enable-metrics``, ``GET /metrics``).

SGLang serves ``/metrics`` from the HTTP process in prometheus_client's multiprocess mode: every process
writes its metrics to files under ``PROMETHEUS_MULTIPROC_DIR`` and the endpoint merges them. The
counters live in the scheduler process (``request.Counters``), so this exporter runs there and mirrors
them into prometheus_client metrics: counters grow by the difference since the last sync, gauges take
the graph's size. It syncs when a request's outcome is recorded and after an eviction, so once requests
have finished ``/metrics`` and ``/sparsex/stats`` agree.

With tensor parallelism every rank counts every request (they take the same decisions), so request, token
and graph figures come from rank 0 alone, while what each rank does on its own share of the heads (bytes
and seconds moved between the tiers, store misses, writes and faults) is exported by every rank and summed by
the multiprocess merge; tier hits, equal on every rank, come from rank 0. ``/sparsex/stats`` lists each rank's own counters.
"""

from __future__ import annotations

from typing import Any

from sparsex_sgl.core.request import Counters
from sparsex_sgl.core.tiers import TierCounters

COUNTERS: dict[str, str] = {
    "requests": "Requests recorded by the SparseX cache",
    "requests_with_segments": "Requests that carried segment data (spans, segments or markers)",
    "requests_auto_segmented": "Requests whose segments were found by auto-segmentation",
    "requests_with_reuse": "Requests that reused at least one cached segment",
    "prompt_tokens": "Prompt tokens of recorded requests",
    "prefix_tokens": "Prompt tokens served from the prefix hit",
    "blended_prefix_tokens": "Prefix-hit tokens served from blended (approximate) nodes",
    "reused_tokens": "Prompt tokens whose KV was reused from a segment at another position",
    "recomputed_tokens": "Reused tokens recomputed in the sparse layers",
    "computed_tokens": "Tokens computed in the sparse layers (new plus recomputed)",
    "sparse_batches": "Prefill batches that ran the sparse layers",
    "evicted_tokens": "Tokens evicted from the segment graph",
    "deferred_admissions": "Admissions deferred to wait for a segment another request computes",
    "uncached_collisions": "Pieces left uncached because their hash names other cached tokens",
}
TIER_COUNTERS: dict[str, str] = {
    "host_hits": "Segments loaded back from the host tier",
    "host_hit_tokens": "Tokens of segments loaded back from the host tier",
    "store_hits": "Segments loaded from the shared store",
    "store_hit_tokens": "Tokens of segments loaded from the shared store",
    "loaded_bytes": "Bytes of KV copied into the pool from the tiers",
    "load_seconds": "Seconds spent loading segments from the tiers",
    "spilled_segments": "Segments the pool evicted into the host tier",
    "spilled_tokens": "Tokens of segments the pool evicted into the host tier",
    "host_evictions": "Segments the host tier dropped to stay within its size",
    "store_misses": "Store reads that found no object",
    "store_writes": "Segments written to the shared store",
    "store_write_failures": "Segment writes the store refused or failed",
    "store_write_drops": "Segment writes dropped because the writer was behind",
}


PER_RANK = frozenset({"loaded_bytes", "load_seconds", "store_misses", "store_writes", "store_write_failures",
                      "store_write_drops"})
"""Tier counters of a rank's own share of the KV, summed over tensor-parallel ranks (with the store faults)."""


class PrometheusExport:
    """The scheduler's SparseX metrics, prefixed ``sparsex_``, labelled like SGLang's own (``labels``); a
    tensor-parallel rank other than 0 (``rank``) exports only the ``PER_RANK`` sums."""

    def __init__(self, labels: dict[str, str], rank: int = 0) -> None:
        # Imported here, in the scheduler, after SGLang set PROMETHEUS_MULTIPROC_DIR: prometheus_client
        # picks its multiprocess mode at import.
        from prometheus_client import Counter, Gauge

        self.labels = labels
        self.rank = rank
        names = list(labels)
        self._counters = {key: Counter(f"sparsex_{key}", text, names) for key, text in COUNTERS.items()}
        self._fallbacks = Counter("sparsex_fallbacks", "Requests that fell back to exact full prefill, by reason",
                                  [*names, "reason"])
        self._graph_nodes = Gauge("sparsex_graph_nodes", "Nodes in the segment graph", names,
                                  multiprocess_mode="livemax")
        self._graph_tokens = Gauge("sparsex_graph_tokens", "Tokens held by the segment graph", names,
                                   multiprocess_mode="livemax")
        self._tier_counters = {key: Counter(f"sparsex_tier_{key}", text, names) for key, text in TIER_COUNTERS.items()}
        self._store_faults = Counter("sparsex_tier_store_faults", "Store loads refused (recomputed), by reason",
                                     [*names, "reason"])
        self._exported: dict[str, Any] = {"fallbacks": {}, "store_faults": {}}

    def sync(self, counters: Counters, graph_nodes: int, graph_tokens: int, tiers: TierCounters | None = None) -> None:
        """Bring the metrics up to ``counters``, the tiers' counters and the graph's size."""
        now: dict[str, Any] = {key: getattr(counters, key) for key in self._counters}
        now["fallbacks"] = dict(counters.fallbacks)  # not asdict: it rebuilds a Counter from its items
        now["store_faults"] = {} if tiers is None else dict(tiers.store_faults)
        for key, metric in self._counters.items():
            if self.rank == 0:
                self._grow(metric, now[key], self._exported.get(key, 0))
        for key, metric in self._tier_counters.items():
            now["tier_" + key] = 0 if tiers is None else getattr(tiers, key)
            if self.rank == 0 or key in PER_RANK:
                self._grow(metric, now["tier_" + key], self._exported.get("tier_" + key, 0))
        for section, metric in (("fallbacks", self._fallbacks), ("store_faults", self._store_faults)):
            if self.rank != 0 and section == "fallbacks":
                continue
            for reason, count in now[section].items():
                delta = count - self._exported[section].get(reason, 0)
                if delta > 0:
                    metric.labels(**self.labels, reason=reason).inc(delta)
        self._exported = now
        if self.rank == 0:
            self._graph_nodes.labels(**self.labels).set(graph_nodes)
            self._graph_tokens.labels(**self.labels).set(graph_tokens)

    def _grow(self, metric: Any, value: float, exported: float) -> None:
        if value > exported:
            metric.labels(**self.labels).inc(value - exported)
