"""SparseX's counters on SGLang's Prometheus endpoint (``--enable-metrics``, ``GET /metrics``).

SGLang serves ``/metrics`` from the HTTP process in prometheus_client's multiprocess mode: every process
writes its metrics to files under ``PROMETHEUS_MULTIPROC_DIR`` and the endpoint merges them. The
counters live in the scheduler process (``request.Counters``), so this exporter runs there and mirrors
them into prometheus_client metrics: counters grow by the difference since the last sync, gauges take
the graph's size. It syncs when a request's outcome is recorded and after an eviction, so once requests
have finished ``/metrics`` and ``/sparsex/stats`` agree.
"""

from __future__ import annotations

from typing import Any

from sparsex_sgl.core.request import Counters

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


class PrometheusExport:
    """The scheduler's SparseX metrics, prefixed ``sparsex_``, labelled like SGLang's own (``labels``)."""

    def __init__(self, labels: dict[str, str]) -> None:
        # Imported here, in the scheduler, after SGLang set PROMETHEUS_MULTIPROC_DIR: prometheus_client
        # picks its multiprocess mode at import.
        from prometheus_client import Counter, Gauge

        self.labels = labels
        names = list(labels)
        self._counters = {key: Counter(f"sparsex_{key}", text, names) for key, text in COUNTERS.items()}
        self._fallbacks = Counter("sparsex_fallbacks", "Requests that fell back to exact full prefill, by reason",
                                  [*names, "reason"])
        self._graph_nodes = Gauge("sparsex_graph_nodes", "Nodes in the segment graph", names,
                                  multiprocess_mode="livemax")
        self._graph_tokens = Gauge("sparsex_graph_tokens", "Tokens held by the segment graph", names,
                                   multiprocess_mode="livemax")
        self._exported: dict[str, Any] = {"fallbacks": {}}

    def sync(self, counters: Counters, graph_nodes: int, graph_tokens: int) -> None:
        """Bring the metrics up to ``counters`` and the graph's size."""
        now: dict[str, Any] = {key: getattr(counters, key) for key in self._counters}
        now["fallbacks"] = dict(counters.fallbacks)  # not asdict: it rebuilds a Counter from its items
        for key, metric in self._counters.items():
            delta = now[key] - self._exported.get(key, 0)
            if delta > 0:
                metric.labels(**self.labels).inc(delta)
        for reason, count in now["fallbacks"].items():
            delta = count - self._exported["fallbacks"].get(reason, 0)
            if delta > 0:
                self._fallbacks.labels(**self.labels, reason=reason).inc(delta)
        self._exported = now
        self._graph_nodes.labels(**self.labels).set(graph_nodes)
        self._graph_tokens.labels(**self.labels).set(graph_tokens)
