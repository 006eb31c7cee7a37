"""The ``sparsex`` prefill attention backend.

Outside a SparseX batch, and in the full layers of one, it is SGLang's torch-native backend. In the
last full layer it also scores the reused tokens (the selection signal). In the sparse layers it
computes attention for the reduced rows only: queries at scattered positions, each against the
request's keys up to its own position (causal by explicit position, not by row index), over the KV
that the request row in ``req_to_token`` points at: prefix slots, re-aligned reused KV, and the KV
the recomputed rows just wrote.
"""

from __future__ import annotations

import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from sparsex_sgl.hybrid import HybridConfig
from sparsex_sgl.kernels import scattered_query_attention_ref, selection_scores_ref
from sparsex_sgl.select import sparse_q_signal
from sparsex_sgl.sglang.batch import RequestRows, SparseBatch


class SparseXAttnBackend(TorchNativeAttnBackend):
    """Torch-native extend attention plus the selected-query path of SparseX's sparse layers."""

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):  # type: ignore[no-untyped-def]
        state: SparseBatch | None = getattr(forward_batch, "sparsex", None)
        if state is None or state.phase == "full":
            out = super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)
            if state is not None and layer.layer_id == state.signal_layer:
                self._score(q, layer, state)
            return out
        return self._sparse_extend(q, k, v, layer, forward_batch, state)

    def _sparse_extend(self, q, k, v, layer, forward_batch, state: SparseBatch):  # type: ignore[no-untyped-def]
        pool = self.token_to_kv_pool
        assert state.out_cache_loc is not None
        pool.set_kv_buffer(layer, KVWriteLoc(state.out_cache_loc), k, v)
        keys, values = pool.get_key_buffer(layer.layer_id), pool.get_value_buffer(layer.layer_id)
        q_ = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
        o = q.new_empty(q_.shape[0], layer.tp_q_head_num * layer.v_head_dim)
        o_ = o.view(-1, layer.tp_q_head_num, layer.v_head_dim)
        gqa = layer.tp_q_head_num != layer.tp_k_head_num
        req_to_token = self.req_to_token_pool.req_to_token
        for req, a, b in zip(state.requests, state.offsets, state.offsets[1:]):
            slots = req_to_token[req.pool_idx, : req.n_tokens]
            out = torch.nn.functional.scaled_dot_product_attention(
                q_[a:b].transpose(0, 1), keys[slots].transpose(0, 1), values[slots].transpose(0, 1),
                attn_mask=req.visible, scale=layer.scaling, enable_gqa=gqa,
            )
            o_[a:b] = out.transpose(0, 1)
        return o

    def _score(self, q, layer, state: SparseBatch) -> None:  # type: ignore[no-untyped-def]
        """Selection signal per reused token, as in the reference executor (``select.py`` explains it)."""
        pool = self.token_to_kv_pool
        keys, values = pool.get_key_buffer(layer.layer_id), pool.get_value_buffer(layer.layer_id)
        q_ = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
        for req in state.requests:
            if req.has_reuse:
                req.signal = self._request_signal(q_, keys, values, layer.scaling, req, state.config)

    def _request_signal(self, q_: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
                        req: RequestRows, config: HybridConfig) -> torch.Tensor:
        deviation = (values[req.dst].float() - values[req.src].float()).norm(dim=(-2, -1))
        if config.selection != "sparse_q":
            return deviation.cpu()
        device = q_.device
        new = req.new_rows.to(device)
        q_new = q_[req.start + new - req.prefix_len]
        slots = self.req_to_token_pool.req_to_token[req.pool_idx, : req.n_tokens]
        k_all, v_all = keys[slots], values[slots]
        _, lse = scattered_query_attention_ref(q_new, k_all, v_all, new, scale)
        mass = selection_scores_ref(q_new, k_all, new, lse, req.reused.positions.to(device), scale)
        return sparse_q_signal(mass, deviation, config.mass_prior).cpu()


def create(model_runner: object) -> SparseXAttnBackend:
    return SparseXAttnBackend(model_runner)
