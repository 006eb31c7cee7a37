"""The state of one SparseX extend batch, shared by the model hook and the attention backend.

It rides on the ``ForwardBatch`` as ``forward_batch.sparsex`` for the duration of one model forward: the
batch's ``SparseExtendPlan`` (built once by the model hook, read by the backend in every layer), the
layer whose attention scores the reused tokens, and which phase the decoder loop is in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sparsex_sgl.sparse_extend import SparseExtendPlan


@dataclass
class SparseBatch:
    """``phase`` is "full" before the first sparse layer and "sparse" from it on; ``signal_layer`` is the
    last full layer when the selection reads a signal there (None otherwise)."""

    plan: SparseExtendPlan
    signal_layer: int | None
    phase: Literal["full", "sparse"] = "full"
