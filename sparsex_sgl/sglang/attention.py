"""The ``sparsex`` prefill attention backend: SGLang's own backend, with SparseX's sparse layers beside it.

It wraps the prefill backend SGLang would have picked (``--prefill-attention-backend``, else
``--attention-backend``, else SGLang's default for the device: fa3 / flashinfer / triton on CUDA,
torch_native on the CPU) and forwards everything to it: ``init_forward_metadata``, CUDA-graph state,
every batch without reuse, and the full layers of a SparseX batch. Decode never reaches it (SGLang's
``HybridAttnBackend`` sends decode to the decode backend). In the sparse layers of a SparseX batch (the
model hook puts the ``SparseLayers`` on the forward batch for them) it only attends: the selected rows'
fresh K/V go to their slots and ``SparseExtendPlan.run`` attends them over the pool. Selection happens in
the model hook, never here.

The wrapper is a proxy, not a subclass: attributes it does not define are the inner backend's, so
whatever SGLang asks of its backend (metadata, graph buffers, capability flags) gets the stock answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from sparsex_sgl.core.agreement import RankGuard
from sparsex_sgl.core.sparse_extend import SparseExtendPlan, SparseRows
from sparsex_sgl.sglang import compat

if TYPE_CHECKING:
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch
    from sglang.srt.model_executor.model_runner import ModelRunner


@dataclass(frozen=True)
class SparseLayers:
    """What the sparse layers of one batch attend: the batch's plan and the rows ``select`` chose."""

    plan: SparseExtendPlan
    rows: SparseRows
    guard: RankGuard
    """Where a failure of this rank's attention is kept until the batch's next vote (tensor parallelism)."""


class SparseXAttnBackend:
    """Forwards to ``inner`` except in the sparse layers of a SparseX batch."""

    def __init__(self, inner: Any, model_runner: ModelRunner) -> None:
        self.inner = inner
        _, self.pool, _, _ = compat.runner_parts(model_runner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: RadixAttention,
                forward_batch: ForwardBatch, save_kv_cache: bool = True, **kwargs: Any) -> torch.Tensor:
        step: SparseLayers | None = compat.sparse_step(forward_batch)
        if step is None:
            return self.inner.forward(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs)
        return self._sparse_layer(q, k, v, layer, step)

    forward_extend = forward  # SGLang calls one or the other, depending on the caller

    def _sparse_layer(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: RadixAttention,
                      step: SparseLayers) -> torch.Tensor:
        """Attention of the selected rows only: their fresh K/V overwrite the re-aligned copies, then each row
        attends to its request's keys up to its own position."""
        layer_id, q_heads, _, head_dim, v_head_dim, scale = compat.attention_shape(layer)
        q_rows = q.view(-1, q_heads, head_dim)
        out = q.new_empty(q_rows.shape[0], q_heads * v_head_dim)

        def attend() -> bool:
            compat.write_kv(self.pool, layer, step.rows.slots, k, v)
            keys, values = compat.layer_buffers(self.pool, layer_id)
            step.plan.run(step.rows, q_rows, keys, values, scale, out=out.view(-1, q_heads, v_head_dim))
            return True

        if not step.guard.attempt(attend, False):
            out.zero_()  # a placeholder: the rank's failure is kept and the batch falls back at its next vote
        return out
