"""The sparse extend path: SparseX's decoder loop around an SGLang Llama/Qwen2/Qwen3 model.

Installed on the *instance* of the decoder stack (``model.model``) by the cache factory, after model
load. A batch without a SparseX plan runs the original forward, at the cost of one dictionary lookup
per request. Otherwise the batch's ``SparseExtendPlan`` (``sparse_extend.py``, the pipeline the reference
executor runs too) is built once, and: layers below ``L_full`` run over every extend row on SGLang's own
attention backend; at the last of them the backend scores the reused tokens and the plan lays out the
recompute rows (new tokens plus the reused tokens that score highest); the re-aligned cached K/V of every
reused token is written into the request's own slots for the remaining layers; the residual stream is
cut down to the recompute rows; the sparse layers compute those rows only (their K/V overwrite the
re-aligned copies); and the final hidden states are scattered back to SGLang's full row layout, where the
logits processor reads each request's last row (always computed).

A failure anywhere falls back to the original forward for the whole batch, which rewrites every
extend row's K/V and is therefore exact.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch
from sglang.srt.layers.layer_boundary.residual import batch as residual_batch
from sglang.srt.model_executor.forward_batch_info import ForwardMode

from sparsex_sgl.request import RequestOutcome, SparseXRequest
from sparsex_sgl.select import SIGNAL_SELECTIONS
from sparsex_sgl.sglang.batch import SparseBatch
from sparsex_sgl.sglang.runtime import SparseXRuntime
from sparsex_sgl.sparse_extend import ExtendRequest, SparseExtendPlan

logger = logging.getLogger("sparsex_sgl")

SUPPORTED_MODELS = ("LlamaModel", "Qwen2Model", "Qwen3Model")
FOLLOWED_SOURCES: dict[str, str] = {
    "sglang.srt.models.llama.LlamaModel.forward": "d02b894a8afcbf3f4945a3bf062bbe297cd8d8c96cfaef66d5415db1e87d981b",
    "sglang.srt.models.llama.LlamaDecoderLayer.forward": "6d3680dbd7256ed245ecc69eddd62d9ab58ed482626175dfa1d327eeb1876606",
    "sglang.srt.models.llama.LlamaAttention.forward": "232b19ff50081952b7cc1893b5333b1864b0bf210ff13adb75031199261ac45e",
    "sglang.srt.models.qwen2.Qwen2Model.forward": "2a5dfe1535ad52ee1110334aa5ef62d5d42017d0fb88b636e4ba1c59532e5afa",
    "sglang.srt.models.qwen2.Qwen2DecoderLayer.forward": "6d3680dbd7256ed245ecc69eddd62d9ab58ed482626175dfa1d327eeb1876606",
    "sglang.srt.models.qwen2.Qwen2Attention.forward": "41849402eca609941200beb43178d201496da72bdd368f335bb4d42bb9252746",
    "sglang.srt.models.qwen3.Qwen3Model.forward": "38b8b1b6d5ce0768ffeca9b2d2a8d2b75dee7643bdeee690b6f7695a14b86c45",
    "sglang.srt.models.qwen3.Qwen3DecoderLayer.forward": "7f3747f9e5dde0a80a4c1939525fc34c4aafaa2735d722eb8d624779e27f79bb",
    "sglang.srt.models.qwen3.Qwen3Attention.forward": "51db2ef32c3cff344af91602c74b3db46711198dc477933673e3cb57408325bd",
    "sglang.srt.layers.layer_boundary.residual.batch.start": "2b3296ab96cf6e0257bb49d5022254e8316fca087752fee6f0f2f93246e955d4",
    "sglang.srt.layers.layer_boundary.residual.batch.complete_output": "07e9db3b0a9bb92fe1b31a315e190d2b8accd43ef38b3e0e4b699523ccde2868",
    "sglang.srt.layers.layer_boundary.residual.batch.export_replay_handoff": "02406ff2a28532b7c1ec209d86ebe041b4b850b492581e27b4ee7426039c11a5",
    "sglang.srt.layers.layer_boundary.residual.batch.import_replay_handoff": "b20e16d76a55fc053d595de81b6e3a450b78c140115a64cb46246d4a252d24fd",
    "sglang.srt.layers.layer_boundary.residual.batch.final_norm": "242e96d61e14bc1e007884f04539fae84d55661d77cdd6277df66c9d46bbab1a",
    "sglang.srt.layers.layer_boundary.residual.batch.clear": "93007b19dfba7c8481e848fdfc01348176b75d6e57c9cd78ed8dc9fd79c66814",
}
"""SHA-256 of the source of every SGLang function whose behaviour ``SparseXForward`` copies or relies on, as
of sglang 0.5.23: the decoder loops it replaces (embedding, layer calls, residual stream, final norm), the
decoder layers and attention modules it calls row-selectively, and the residual-stream helpers. If any of
them changes, the copied loop may no longer be SGLang's: ``install`` then leaves SparseX off for the model
(exact serving, the reason logged), and ``tests/test_model_hook_guard.py`` fails until the hook is re-read
against the new source and the pins are updated."""


class SparseXForward:
    """Replaces ``decoder.forward`` on one model instance."""

    def __init__(self, decoder: torch.nn.Module, model_runner: Any, runtime: SparseXRuntime,
                 heads: tuple[int, int]) -> None:
        self.decoder = decoder
        self.original: Callable[..., Any] = decoder.forward
        self.runtime = runtime
        self.pool = model_runner.token_to_kv_pool
        self.req_to_token = model_runner.req_to_token_pool.req_to_token
        self.heads = heads
        """Query and KV heads of this rank's attention layers (the Triton tiles pack a GQA group)."""

    def __call__(self, input_ids, positions, forward_batch, input_embeds=None, pp_proxy_tensors=None, **kwargs):  # type: ignore[no-untyped-def]
        if (
            forward_batch.forward_mode != ForwardMode.EXTEND
            or input_embeds is not None
            or pp_proxy_tensors is not None
            or kwargs
        ):
            return self.original(input_ids, positions, forward_batch, input_embeds, pp_proxy_tensors, **kwargs)
        outcomes: list[tuple[int, RequestOutcome]] = []
        try:
            state = self._batch_state(forward_batch, outcomes)
            if state is None:
                return self.original(input_ids, positions, forward_batch, input_embeds, pp_proxy_tensors)
            out = self._sparse_forward(input_ids, positions, forward_batch, state, outcomes)
        except Exception as exc:
            logger.exception("SparseX sparse forward failed; recomputing the batch with full prefill")
            residual_batch.clear(forward_batch)
            for _, outcome in outcomes:
                self.runtime.fallback("sparse_forward_error", repr(exc))
                outcome.mark_exact("sparse_forward_error")
            return self.original(input_ids, positions, forward_batch, input_embeds, pp_proxy_tensors)
        finally:
            forward_batch.sparsex = None
        self.runtime.counters.sparse_batches += 1
        return out

    def _batch_state(self, fb: Any, outcomes: list[tuple[int, RequestOutcome]]) -> SparseBatch | None:
        """The batch's plan, or None when no request in it reuses a segment (then nothing else is done).
        The requests' SparseX state comes with the batch (``ForwardBatch.sparsex_requests``, carried from
        each ``Req.sparsex`` by the plugin). ``outcomes`` receives (index in the batch, outcome) of every
        request that will run sparse."""
        states: list[SparseXRequest | None] = getattr(fb, "sparsex_requests", None) or []
        prefix_lens, extend_lens = fb.extend_prefix_lens_cpu, fb.extend_seq_lens_cpu
        if not any(s is not None and s.reuses for s in states) or prefix_lens is None or extend_lens is None:
            return None
        pool_indices = (fb.req_pool_indices_cpu if fb.req_pool_indices_cpu is not None else fb.req_pool_indices).tolist()
        requests: list[ExtendRequest] = []
        start = 0
        for request, pool_index, p, e in zip(states, pool_indices, prefix_lens, extend_lens, strict=True):
            p, e = int(p), int(e)
            matched = request.matched if request is not None and request.reuses else None
            lookup = None if matched is None else matched.plan
            if lookup is not None and (lookup.prefix_len != p or lookup.n_tokens != p + e):
                self.runtime.fallback("plan_mismatch", f"request {request.rid}: planned prefix "  # type: ignore[union-attr]
                                      f"{lookup.prefix_len} of {lookup.n_tokens}, scheduled prefix {p} + {e}")
                lookup = None
            if lookup is None or matched is None:
                requests.append(ExtendRequest(pool_index, start, p, p + e, range(p, p + e), (), 0.0))
            else:
                requests.append(ExtendRequest(pool_index, start, p, p + e, lookup.new_rows, lookup.reused,
                                              matched.recompute_ratio))
                if request is not None and request.outcome is not None:
                    outcomes.append((len(requests) - 1, request.outcome))
            start += e
        if not any(r.reused for r in requests):
            return None
        config, rope = self.runtime.config, self.runtime.rope
        assert rope is not None, "the hook is installed only for a model with a supported rope"
        plan = SparseExtendPlan(requests, config, rope, self.req_to_token, *self.heads, self.runtime.kernels)
        signal_layer = self.runtime.threshold - 1 if config.selection in SIGNAL_SELECTIONS else None
        return SparseBatch(plan, signal_layer)

    def _sparse_forward(self, input_ids: torch.Tensor, positions: torch.Tensor, fb: Any, state: SparseBatch,
                        outcomes: list[tuple[int, RequestOutcome]]) -> torch.Tensor:
        model, plan = self.decoder, state.plan
        threshold = max(self.runtime.threshold, model.start_layer)
        fb.sparsex = state
        hidden = model.embed_tokens(input_ids)
        residual_batch.start(fb)
        for i in range(model.start_layer, threshold):
            hidden = model.layers[i](positions, hidden, fb, capture_output=None)
        if state.signal_layer is None:
            plan.select()  # the backend selected at the signal layer otherwise
        assert plan.rows is not None and plan.rows_index is not None, "no selection at the signal layer"
        self._record(plan, outcomes)
        plan.fill_reused((self.pool.get_key_buffer(j), self.pool.get_value_buffer(j),
                          self.pool.get_key_buffer(j), self.pool.get_value_buffer(j))
                         for j in range(threshold, model.end_layer))
        rows = plan.rows_index
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
        row_positions = plan.rows.positions.to(positions.dtype)
        for i in range(threshold, model.end_layer):
            hidden = model.layers[i](row_positions, hidden, fb, capture_output=None)
        hidden = residual_batch.final_norm(hidden, fb, model.norm)
        full = hidden.new_zeros(input_ids.shape[0], hidden.shape[-1])
        full[rows] = hidden
        return full

    @staticmethod
    def _record(plan: SparseExtendPlan, outcomes: list[tuple[int, RequestOutcome]]) -> None:
        """What each reusing request computes; its exact length and rows stay on the device until the
        checkpoint reads them (``RequestOutcome.settle``), so recording costs no host sync."""
        assert plan.exact_len is not None and plan.rows is not None
        offsets = plan.rows.offsets
        for i, outcome in outcomes:
            outcome.pending_rows = plan.rows.positions[offsets[i] : offsets[i + 1]]
            outcome.reused = plan.n_reused[i]
            outcome.recomputed = plan.budgets[i]
            outcome.computed = plan.computed[i]
            outcome.pending_exact_len = plan.exact_len[i]


def unfollowed_changes(pins: dict[str, str] = FOLLOWED_SOURCES) -> list[str]:
    """The pinned SGLang functions whose installed source differs from the pin (or that are gone)."""
    changed = []
    for name, digest in pins.items():
        try:
            source = inspect.getsource(_resolve(name))
        except (ImportError, AttributeError, OSError, TypeError):
            changed.append(name)
            continue
        if hashlib.sha256(source.encode()).hexdigest() != digest:
            changed.append(name)
    return changed


def _resolve(dotted: str) -> Any:
    """The object at ``package.module.Class.attr``: the longest importable prefix, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            target: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            target = getattr(target, attr)
        return target
    raise ImportError(dotted)


def install(model: torch.nn.Module, model_runner: Any, runtime: SparseXRuntime) -> str:
    """Hook the decoder stack of ``model`` (a ``*ForCausalLM``); returns why not, or "" on success."""
    decoder = getattr(model, "model", None)
    name = type(decoder).__name__
    if decoder is None or name not in SUPPORTED_MODELS:
        return f"model {type(model).__name__} (decoder {name}) is not one of {SUPPORTED_MODELS}"
    changed = unfollowed_changes()
    if changed:
        return (f"this SGLang's {', '.join(changed)} differ from the sglang 0.5.23 source the SparseX decoder loop "
                "follows (model_hook.FOLLOWED_SOURCES)")
    if not decoder.pp_group.is_first_rank or not decoder.pp_group.is_last_rank:
        return "pipeline parallelism is not supported"
    if decoder.layers_to_capture:
        return "auxiliary hidden-state capture (speculative decoding) is not supported"
    attn = getattr(getattr(decoder.layers[decoder.start_layer], "self_attn", None), "attn", None)
    if attn is None:
        return f"decoder {name} has no RadixAttention at layers[i].self_attn.attn"
    decoder.forward = SparseXForward(decoder, model_runner, runtime, (attn.tp_q_head_num, attn.tp_k_head_num))
    return ""
