"""The modeled cost of a prefill that computes some rows in some layers (the evaluation's FLOPs figures)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelDims:
    """The shapes that fix a decoder's FLOPs per token."""

    num_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    def linear_flops_per_token(self) -> int:
        """Multiply-adds x2 of one layer's projections and gated MLP for one token."""
        q_out = self.n_heads * self.head_dim
        kv_out = 2 * self.n_kv_heads * self.head_dim
        return 2 * (self.hidden * (q_out + kv_out) + q_out * self.hidden + 3 * self.hidden * self.intermediate)

    def attention_flops(self, query_positions: Sequence[int]) -> int:
        """QK^T and PV for queries at these positions, each seeing ``position + 1`` keys."""
        return 4 * self.n_heads * self.head_dim * sum(p + 1 for p in query_positions)


def modeled_prefill_flops(dims: ModelDims, rows_per_layer: Sequence[Sequence[int]]) -> int:
    """FLOPs of a prefill that computes ``rows_per_layer[i]`` (prompt positions) in layer i, plus one logits row.

    Layers usually share a few row sets (full layers, sparse layers): each distinct sequence object is
    summed once, so a 32k-token prefill's accounting costs two passes over its rows, not one per layer.
    """
    assert len(rows_per_layer) == dims.num_layers, (len(rows_per_layer), dims.num_layers)
    per_token = dims.linear_flops_per_token()
    per_rows: dict[int, int] = {}
    for rows in rows_per_layer:
        if id(rows) not in per_rows:
            per_rows[id(rows)] = len(rows) * per_token + dims.attention_flops(rows)
    total = sum(per_rows[id(rows)] for rows in rows_per_layer)
    return total + 2 * dims.hidden * dims.vocab
