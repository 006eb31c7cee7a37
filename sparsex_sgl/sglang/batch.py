"""The state of one SparseX extend batch, shared by the model hook and the attention backend.

It rides on the ``ForwardBatch`` as ``forward_batch.sparsex`` for the duration of one model forward.
Rows are indexed two ways: the *full* layout is SGLang's (every extend token of every request,
request after request), the *reduced* layout keeps only the rows the sparse layers compute.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sparsex_sgl.hybrid import HybridConfig
from sparsex_sgl.select import ReusedTokens
from sparsex_sgl.sglang.runtime import RequestOutcome


@dataclass
class RequestRows:
    """One request of the batch.

    ``start``: its first row in the full layout; ``prefix_len``/``n_tokens``: its cached prefix and
    prompt length, so its extend rows are positions ``[prefix_len, n_tokens)``. ``src``/``dst``: per
    reused token, the cached slot and the request's own slot. ``rows``: positions the sparse layers
    compute (sorted), and ``visible [rows, n_tokens]`` their causal mask by position; ``signal``: per
    reused token, the selection score from the last full layer.
    """

    rid: str
    recompute_ratio: float
    pool_idx: int
    start: int
    prefix_len: int
    n_tokens: int
    outcome: RequestOutcome | None
    reused: ReusedTokens
    new_rows: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor
    delta: torch.Tensor
    rows: torch.Tensor | None = None
    signal: torch.Tensor | None = None
    visible: torch.Tensor | None = None

    @property
    def has_reuse(self) -> bool:
        return len(self.reused) > 0


@dataclass
class SparseBatch:
    """``phase`` is "full" before the threshold layer and "sparse" after it; ``config`` is the server's plan."""

    requests: list[RequestRows]
    signal_layer: int | None
    config: HybridConfig
    phase: str = "full"
    positions: torch.Tensor | None = None
    out_cache_loc: torch.Tensor | None = None
    offsets: list[int] = field(default_factory=list)
