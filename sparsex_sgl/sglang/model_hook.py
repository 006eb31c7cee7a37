"""The sparse extend path: SparseX's decoder loop around an SGLang Llama/Qwen2/Qwen3 model.

Installed on the *instance* of the decoder stack (``model.model``) by the cache factory, after model
load. A batch with no SparseX plan runs the original forward. Otherwise: layers below ``L_full`` run
over every extend row; at the threshold each request's recompute set is chosen (new tokens plus the
reused tokens that score highest); the re-aligned cached K/V of every reused token is written into the
request's own slots for the remaining layers; the residual stream is cut down to the recompute rows;
the sparse layers compute those rows only (their K/V overwrite the re-aligned copies); and the final
hidden states are scattered back to SGLang's full row layout, where the logits processor reads each
request's last row (always computed).

A failure anywhere falls back to the original forward for the whole batch, which rewrites every
extend row's K/V and is therefore exact.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from sglang.srt.layers.layer_boundary.residual import batch as residual_batch
from sglang.srt.model_executor.forward_batch_info import ForwardMode

from sparsex_sgl.rope import realign_keys
from sparsex_sgl.select import (
    SIGNAL_SELECTIONS,
    exact_length,
    reused_sources,
    reused_tokens,
    select_tokens,
    selection_budget,
)
from sparsex_sgl.sglang.batch import RequestRows, SparseBatch
from sparsex_sgl.sglang.runtime import SparseXRuntime

logger = logging.getLogger("sparsex_sgl")

SUPPORTED_MODELS = ("LlamaModel", "Qwen2Model", "Qwen3Model")


class SparseXForward:
    """Replaces ``decoder.forward`` on one model instance."""

    def __init__(self, decoder: torch.nn.Module, model_runner: Any, runtime: SparseXRuntime) -> None:
        self.decoder = decoder
        self.original: Callable[..., Any] = decoder.forward
        self.runtime = runtime
        self.pool = model_runner.token_to_kv_pool
        self.req_to_token = model_runner.req_to_token_pool.req_to_token

    def __call__(self, input_ids, positions, forward_batch, input_embeds=None, pp_proxy_tensors=None, **kwargs):  # type: ignore[no-untyped-def]
        if (
            forward_batch.forward_mode != ForwardMode.EXTEND
            or input_embeds is not None
            or pp_proxy_tensors is not None
            or kwargs
        ):
            return self.original(input_ids, positions, forward_batch, input_embeds, pp_proxy_tensors, **kwargs)
        state = self._batch_state(forward_batch)
        if state is None:
            return self.original(input_ids, positions, forward_batch, input_embeds, pp_proxy_tensors)
        try:
            out = self._sparse_forward(input_ids, positions, forward_batch, state)
        except Exception as exc:
            logger.exception("SparseX sparse forward failed; recomputing the batch with full prefill")
            forward_batch.sparsex = None
            residual_batch.clear(forward_batch)
            for req in state.requests:
                if req.has_reuse:
                    self.runtime.fallback("sparse_forward_error", repr(exc))
                    self._mark_exact(req)
            return self.original(input_ids, positions, forward_batch, input_embeds, pp_proxy_tensors)
        finally:
            forward_batch.sparsex = None
        self.runtime.counters.sparse_batches += 1
        return out

    # ------------------------------------------------------------------ planning
    def _batch_state(self, fb: Any) -> SparseBatch | None:
        rids = fb.rids or []
        prefix_lens, extend_lens = fb.extend_prefix_lens_cpu, fb.extend_seq_lens_cpu
        if not rids or prefix_lens is None or extend_lens is None:
            return None
        requests: list[RequestRows] = []
        start = 0
        any_reuse = False
        pool_indices = fb.req_pool_indices.tolist()
        out_cache_loc = fb.out_cache_loc
        for i, rid in enumerate(rids):
            p, e = int(prefix_lens[i]), int(extend_lens[i])
            entry = self.runtime.plans.get(rid)
            plan = entry.plan if entry is not None else None
            if plan is not None and plan.reused and (plan.prefix_len != p or plan.n_tokens != p + e):
                self.runtime.fallback("plan_mismatch", f"request {rid}: planned prefix {plan.prefix_len} of "
                                      f"{plan.n_tokens}, scheduled prefix {p} + {e}")
                plan = None
            if plan is not None and not plan.reused:
                plan = None
            segments = plan.reused if plan is not None else ()
            any_reuse |= bool(segments)
            reused = reused_tokens(segments)
            src, delta = reused_sources(segments)
            dst = out_cache_loc[start + reused.positions.to(out_cache_loc.device) - p]
            new_rows = torch.tensor(plan.new_rows, dtype=torch.int64) if plan is not None else torch.arange(p, p + e)
            outcome = self.runtime.outcomes.get(rid)
            ratio = entry.recompute_ratio if entry is not None else self.runtime.config.recompute_ratio
            requests.append(RequestRows(rid, ratio, int(pool_indices[i]), start, p, p + e, outcome, reused,
                                        new_rows, src.to(out_cache_loc.device), dst, delta))
            start += e
        if not any_reuse:
            return None
        config = self.runtime.config
        signal_layer = self.runtime.threshold - 1 if config.selection in SIGNAL_SELECTIONS else None
        return SparseBatch(requests, signal_layer, config)

    def _select(self, state: SparseBatch) -> None:
        config = self.runtime.config
        for req in state.requests:
            if not req.has_reuse:
                req.rows = req.new_rows
                continue
            budget = selection_budget(len(req.reused), req.recompute_ratio)
            selected = select_tokens(req.reused, budget, config.selection, req.signal, config.min_tokens_per_segment)
            req.rows = torch.sort(torch.cat([req.new_rows, selected])).values
            if req.outcome is not None:
                req.outcome.reused = len(req.reused)
                req.outcome.recomputed = int(selected.numel())
                req.outcome.computed = int(req.rows.numel())
                req.outcome.exact_len = min(req.outcome.exact_bound, exact_length(req.reused, selected, req.n_tokens))

    def _mark_exact(self, req: RequestRows) -> None:
        if req.outcome is not None:
            req.outcome.reused = req.outcome.recomputed = 0
            req.outcome.computed = req.n_tokens - req.prefix_len
            req.outcome.exact_len = req.outcome.exact_bound
            req.outcome.fallback = "sparse_forward_error"

    # ------------------------------------------------------------------ KV
    def _fill_reused_kv(self, state: SparseBatch, first_layer: int, last_layer: int) -> None:
        """Write every reused token's re-aligned cached K and cached V into its own slot, per sparse layer."""
        reqs = [r for r in state.requests if r.has_reuse]
        src = torch.cat([r.src for r in reqs])
        dst = torch.cat([r.dst for r in reqs])
        delta = torch.cat([r.delta for r in reqs]).to(src.device)
        layers = range(first_layer, last_layer)
        k = torch.stack([self.pool.get_key_buffer(j)[src] for j in layers])  # [Ls, r, kvh, d]
        ls, r, kvh, d = k.shape
        flat = k.permute(1, 0, 2, 3).reshape(r, ls * kvh, d)
        rope = self.runtime.rope
        assert rope is not None
        k = realign_keys(flat, delta, rope).reshape(r, ls, kvh, d).permute(1, 0, 2, 3)
        for index, j in enumerate(layers):
            self.pool.get_key_buffer(j)[dst] = k[index]
            values = self.pool.get_value_buffer(j)
            values[dst] = values[src]

    # ------------------------------------------------------------------ the loop
    def _sparse_forward(self, input_ids: torch.Tensor, positions: torch.Tensor, fb: Any, state: SparseBatch) -> torch.Tensor:
        model = self.decoder
        threshold = max(self.runtime.threshold, model.start_layer)
        fb.sparsex = state
        hidden = model.embed_tokens(input_ids)
        residual_batch.start(fb)
        for i in range(model.start_layer, threshold):
            hidden = model.layers[i](positions, hidden, fb, capture_output=None)
        self._select(state)
        device = input_ids.device
        chosen = [r.rows.to(device) for r in state.requests if r.rows is not None]
        rows = torch.cat([r.start + pos - r.prefix_len for r, pos in zip(state.requests, chosen, strict=True)])
        state.positions = positions[rows]
        state.out_cache_loc = fb.out_cache_loc[rows]
        offsets = [0]
        for r, pos in zip(state.requests, chosen):
            offsets.append(offsets[-1] + int(pos.numel()))
            r.visible = torch.arange(r.n_tokens, device=device)[None, :] <= pos[:, None]
        state.offsets = offsets
        self._fill_reused_kv(state, threshold, model.end_layer)
        if threshold > model.start_layer:
            hidden = residual_batch.complete_output(hidden, fb)
            handoff = residual_batch.export_replay_handoff(hidden, fb)
            handoff = handoff._replace(
                value=handoff.value.index_select(0, rows),
                residual=None if handoff.residual is None else handoff.residual.index_select(0, rows),
            )
            hidden = residual_batch.import_replay_handoff(handoff, fb)
        else:
            hidden = hidden.index_select(0, rows)
            residual_batch.start(fb)
        state.phase = "sparse"
        for i in range(threshold, model.end_layer):
            hidden = model.layers[i](state.positions, hidden, fb, capture_output=None)
        hidden = residual_batch.final_norm(hidden, fb, model.norm)
        full = hidden.new_zeros(input_ids.shape[0], hidden.shape[-1])
        full[rows] = hidden
        return full


def install(model: torch.nn.Module, model_runner: Any, runtime: SparseXRuntime) -> str:
    """Hook the decoder stack of ``model`` (a ``*ForCausalLM``); returns why not, or "" on success."""
    decoder = getattr(model, "model", None)
    name = type(decoder).__name__
    if decoder is None or name not in SUPPORTED_MODELS:
        return f"model {type(model).__name__} (decoder {name}) is not one of {SUPPORTED_MODELS}"
    if not decoder.pp_group.is_first_rank or not decoder.pp_group.is_last_rank:
        return "pipeline parallelism is not supported"
    if decoder.layers_to_capture:
        return "auxiliary hidden-state capture (speculative decoding) is not supported"
    decoder.forward = SparseXForward(decoder, model_runner, runtime)
    return ""
