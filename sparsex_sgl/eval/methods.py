"""The recompute methods the evaluation compares, as settings of the one reference executor.

The baselines are SparseX's pipeline with other knobs: naive reuse (no full layers, nothing selected),
CacheBlend-style (value deviation after the full layers), EPIC-style (no full layers, the first tokens of
every moved segment). SparseX's candidate signals (``SPARSEX_SIGNALS``) are its query-mass variants and
the offline look-ahead pass; docs/results.md says how each fared.
"""

from __future__ import annotations

from typing import Any

from sparsex_sgl.core.config import SelectionConfig
from sparsex_sgl.reference.executor import ReuseSetting

METHODS: tuple[str, ...] = ("full", "naive", "cacheblend", "epic", "sparsex")
MASS_PRIOR = SelectionConfig().mass_prior
"""The shipped ``mass_prior``, the sweeps' default."""

SPARSEX_SIGNALS: dict[str, dict[str, Any]] = {
    "sparse_q": {},
    "mass": {"selection": "query_mass"},
    "mass_all": {"selection": "query_mass", "mass_layers": "all"},
    "mass_max": {"selection": "query_mass", "mass_heads": "max"},
    "mass_all_max": {"selection": "query_mass", "mass_layers": "all", "mass_heads": "max"},
    "answer_mass": {"selection": "query_mass", "mass_rows": "answer"},
    "lookahead": {"selection": "query_mass", "lookahead": True},
    "lookahead_q": {"lookahead": True},
}
"""SparseX's candidate signals by name, as settings over the shipped ``SelectionConfig``: ``sparse_q`` is the
shipped one, the others its query-mass variants; ``lookahead`` is the look-ahead pass's mass alone,
``lookahead_q`` weighs deviation by it as ``sparse_q`` weighs it by the threshold layer's mass."""


def method_config(method: str, ratio: float, full_layers: int, signal: str = "sparse_q",
                  coverage: float = 0.0) -> ReuseSetting | None:
    """The setting of a named method; None for full prefill (no reuse at all). ``signal`` (a key of
    ``SPARSEX_SIGNALS``) and ``coverage`` apply to SparseX only."""
    if method == "full":
        return None
    if method == "naive":
        return ReuseSetting(SelectionConfig(full_layers=0, recompute_ratio=0.0, selection="none",
                                            min_tokens_per_segment=0))
    if method == "cacheblend":
        return ReuseSetting(SelectionConfig(full_layers=full_layers, recompute_ratio=ratio, selection="kv_deviation",
                                            min_tokens_per_segment=0))
    if method == "epic":
        return ReuseSetting(SelectionConfig(full_layers=0, recompute_ratio=ratio, selection="first_k",
                                            min_tokens_per_segment=0))
    if method == "sparsex":
        if signal not in SPARSEX_SIGNALS:
            raise ValueError(f"unknown SparseX signal {signal!r}; choose one of {tuple(SPARSEX_SIGNALS)}")
        knobs = dict(SPARSEX_SIGNALS[signal])
        lookahead = bool(knobs.pop("lookahead", False))
        return ReuseSetting(SelectionConfig(full_layers=full_layers, recompute_ratio=ratio, coverage=coverage, **knobs),
                            lookahead)
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
