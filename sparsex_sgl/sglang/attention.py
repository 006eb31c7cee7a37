"""The ``sparsex`` prefill attention backend: SGLang's own backend, with SparseX's sparse layers beside it.

It wraps the prefill backend SGLang would have picked (``--prefill-attention-backend``, else
``--attention-backend``, else SGLang's default for the device: fa3 / flashinfer / triton on CUDA,
torch_native on the CPU) and forwards everything to it: ``init_forward_metadata``, CUDA-graph state,
every batch without a SparseX plan, and the full layers of a SparseX batch. Decode never reaches it
(SGLang's ``HybridAttnBackend`` sends decode to the decode backend). Only two things are SparseX's:

- after the last full layer's attention, ``SparseExtendPlan.select`` scores the reused tokens from that
  layer's queries and KV (and, for a signal summed over the full layers, ``observe`` reads the earlier
  ones);
- in the sparse layers, the computed rows' K/V go to their slots and ``SparseExtendPlan.attend`` runs
  their attention (Triton scattered-query kernel on CUDA, the torch references on the CPU).

The wrapper is a proxy, not a subclass: attributes it does not define are the inner backend's, so
whatever SGLang asks of its backend (metadata, graph buffers, capability flags) gets the stock answer.
"""

from __future__ import annotations

from typing import Any

from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from sparsex_sgl.sglang.batch import SparseBatch


class SparseXAttnBackend:
    """Forwards to ``inner`` except in the threshold and sparse layers of a SparseX batch."""

    def __init__(self, inner: Any, model_runner: Any) -> None:
        self.inner = inner
        self.pool = model_runner.token_to_kv_pool

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def forward(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):  # type: ignore[no-untyped-def]
        state: SparseBatch | None = getattr(forward_batch, "sparsex", None)
        if state is None:
            return self.inner.forward(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs)
        if state.phase == "sparse":
            return self._sparse_extend(q, k, v, layer, state)
        out = self.inner.forward(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs)
        if state.signal_layer is None or layer.layer_id > state.signal_layer:
            return out
        keys, values = self.pool.get_key_buffer(layer.layer_id), self.pool.get_value_buffer(layer.layer_id)
        q_rows = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
        if layer.layer_id == state.signal_layer:
            state.plan.select(q_rows, keys, values, values, layer.scaling)
        elif state.plan.observes_full_layers:
            state.plan.observe(q_rows, keys, values, layer.scaling)
        return out

    forward_extend = forward  # SGLang calls one or the other, depending on the caller

    def _sparse_extend(self, q, k, v, layer, state: SparseBatch):  # type: ignore[no-untyped-def]
        """Attention of the computed rows only: their fresh K/V overwrite the re-aligned copies, then each
        row attends to its request's keys up to its own position."""
        plan = state.plan
        assert plan.rows_slot is not None
        self.pool.set_kv_buffer(layer, KVWriteLoc(plan.rows_slot), k, v)
        q_rows = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
        out = q.new_empty(q_rows.shape[0], layer.tp_q_head_num * layer.v_head_dim)
        plan.attend(q_rows, self.pool.get_key_buffer(layer.layer_id), self.pool.get_value_buffer(layer.layer_id),
                    layer.scaling, out=out.view(-1, layer.tp_q_head_num, layer.v_head_dim))
        return out
