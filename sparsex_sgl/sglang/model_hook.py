"""The sparse extend path: SparseX's decoder loop around an SGLang Llama / Qwen2 / Qwen3 model.

Installed on the *instance* of the decoder stack by the cache factory, after model load. A batch without
reuse runs the original forward, at the cost of reading the batch's layout and each request's state. Otherwise the batch's
``SparseExtendPlan`` (``core.sparse_extend``, the pipeline the reference executor runs too) is built once,
and this loop:

1. runs the layers below ``L_full`` over every extend row on SGLang's own attention backend, recording the
   rotated queries of the layers whose attention mass the policy reads;
2. computes what the policy reads (the last full layer's value deviation, the new rows' mass) and calls
   ``select``, which returns the rows the sparse layers compute (new tokens plus the reused tokens that
   score highest);
3. writes the re-aligned cached K/V of every reused token into the request's own slots for the remaining
   layers, and cuts the residual stream down to the selected rows;
4. runs the sparse layers on those rows only, the attention backend attending them (``attention.py``);
5. scatters the final hidden states back to SGLang's full row layout, where the logits processor reads
   each request's last row (always computed).

A failure anywhere falls back to the original forward for the whole batch, which rewrites every extend
row's K/V and is therefore exact. With tensor parallelism every rank falls back together: the ranks reduce
their signals before ``select`` and vote on the plan, the rows and the result (``core.agreement``), and a rank
whose SparseX code failed keeps joining the collectives until the next vote. SGLang's own layer code is not
guarded: with tensor parallelism a failure there is raised, as on stock SGLang (falling back alone would hang
the other ranks).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from sparsex_sgl.core.agreement import RankGuard, Verdict
from sparsex_sgl.core.request import RequestOutcome
from sparsex_sgl.core.sparse_extend import ExtendRequest, ShardReduce, SparseExtendPlan, SparseRows, select
from sparsex_sgl.sglang import compat
from sparsex_sgl.sglang.attention import SparseLayers
from sparsex_sgl.sglang.runtime import SchedulerRuntime

if TYPE_CHECKING:
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch
    from sglang.srt.model_executor.model_runner import ModelRunner

logger = logging.getLogger("sparsex_sgl")

SUPPORTED_MODELS = ("LlamaModel", "Qwen2Model", "Qwen3Model")


class SparseXForward:
    """Replaces ``decoder.forward`` on one model instance."""

    def __init__(self, decoder: torch.nn.Module, model_runner: ModelRunner, runtime: SchedulerRuntime,
                 heads: tuple[int, int], shards: ShardReduce | None) -> None:
        self.decoder = decoder
        self.shards = shards
        """The tensor-parallel group's signal reduce (None with one rank): every rank selects the same rows."""
        self.original: Callable[..., Any] = decoder.forward
        self.runtime = runtime
        _, self.pool, self.req_to_token, _ = compat.runner_parts(model_runner)
        self.heads = heads
        """Query and KV heads of this rank's attention layers (the Triton tiles pack a GQA group)."""

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: ForwardBatch,
                 input_embeds: torch.Tensor | None = None, pp_proxy_tensors: Any = None, **kwargs: Any) -> Any:
        if input_embeds is not None or pp_proxy_tensors is not None or kwargs:
            return self.original(input_ids, positions, forward_batch, input_embeds, pp_proxy_tensors, **kwargs)
        outcomes: list[tuple[int, RequestOutcome]] = []
        try:
            out = self._sparse_forward(input_ids, positions, forward_batch, outcomes)
        except Exception as exc:
            if self.runtime.gather is not None:
                # Outside the guarded steps (SGLang's own layer code): falling back alone would run other
                # collectives than the other ranks and hang them; stop as stock SGLang would.
                raise
            logger.exception("SparseX sparse forward failed; recomputing the batch with full prefill")
            self._fall_back(forward_batch, outcomes, Verdict("sparse_forward_error"), repr(exc))
            return self.original(input_ids, positions, forward_batch, input_embeds, pp_proxy_tensors)
        finally:
            compat.set_sparse_step(forward_batch, None)
        if out is None:
            return self.original(input_ids, positions, forward_batch, input_embeds, pp_proxy_tensors)
        self.runtime.counters.sparse_batches += 1
        return out

    def _fall_back(self, fb: ForwardBatch, outcomes: list[tuple[int, RequestOutcome]], verdict: Verdict,
                   detail: str) -> None:
        """The batch re-runs SGLang's own forward, which rewrites every extend row's K/V (exact)."""
        compat.set_sparse_step(fb, None)  # the re-run's layers are all SGLang's own
        compat.residual_stream().clear(fb)
        for _, outcome in outcomes:
            self.runtime.fallback(verdict.reason, detail)
            outcome.mark_exact(verdict.reason)

    def _agree(self, fb: ForwardBatch, outcomes: list[tuple[int, RequestOutcome]], guard: RankGuard, kind: str,
               value: object = None) -> bool:
        """One vote of the batch's ranks (always agreed with one rank: a failure there has raised); on a
        failure or a disagreement every rank falls back, counting the same reason."""
        verdict = guard.vote(kind, value)
        if verdict.agreed:
            return True
        if guard.error is not None:
            self.runtime.log_once("sparse forward", guard.error)
        detail = repr(guard.error) if guard.error is not None else (
            f"reported by tensor-parallel rank {verdict.rank}" if verdict.rank >= 0 else f"the ranks' {kind} differ")
        self._fall_back(fb, outcomes, verdict, detail)
        return False

    def _plan(self, fb: ForwardBatch, layout: tuple[list[int], list[int], list[int]],
              outcomes: list[tuple[int, RequestOutcome]]) -> SparseExtendPlan | None:
        """The batch's plan, or None when no request in it reuses a segment (then nothing else is done).
        ``outcomes`` receives (index in the batch, outcome) of every request that will run sparse."""
        states = compat.batch_states(fb)
        if not any(state is not None and state.reuses for state in states):
            return None
        requests: list[ExtendRequest] = []
        start = 0
        for state, p, e, pool_index in zip(states, *layout, strict=True):
            match = state.matched if state is not None and state.reuses else None
            lookup = None if match is None else match.lookup
            if state is not None and lookup is not None and (lookup.prefix_len != p or lookup.n_tokens != p + e):
                self.runtime.fallback("stale_match", f"request {state.rid}: matched prefix {lookup.prefix_len} of "
                                      f"{lookup.n_tokens}, scheduled prefix {p} + {e}")
                lookup = None
            if lookup is None or match is None:
                requests.append(ExtendRequest(pool_index, start, p, p + e, range(p, p + e), (), 0.0))
            else:
                requests.append(ExtendRequest(pool_index, start, p, p + e, lookup.new_rows, lookup.reused,
                                              match.recompute_ratio))
                if state is not None and state.outcome is not None:
                    outcomes.append((len(requests) - 1, state.outcome))
            start += e
        if not any(r.reused for r in requests):
            return None
        rope = self.runtime.rope
        assert rope is not None, "the hook is installed only for a model with a supported rope"
        return SparseExtendPlan.build(requests, self.runtime.config.selection, rope, self.req_to_token, *self.heads,
                                      self.runtime.ops, self.shards)

    def _sparse_forward(self, input_ids: torch.Tensor, positions: torch.Tensor, fb: ForwardBatch,
                        outcomes: list[tuple[int, RequestOutcome]]) -> torch.Tensor | None:
        """The batch's sparse forward, or None for SGLang's own (no request reuses a segment, or the ranks
        agreed to fall back: counted). With tensor parallelism the ranks vote three times, at the same points
        on every rank: on the plan, before the first layer; on the rows, before the sparse layers; on the
        whole, before the result is used. Between votes a rank whose SparseX code failed keeps joining the
        collectives with placeholders (``RankGuard``), so no rank waits for another."""
        layout = compat.extend_layout(fb)
        if layout is None or not any(state is not None and state.reuses for state in compat.batch_states(fb)):
            return None
        guard = RankGuard(self.runtime.gather)
        plan = guard.attempt(lambda: self._plan(fb, layout, outcomes), None)
        if guard.failure:  # the plan failed midway: every request that would reuse falls back, counted once
            outcomes[:] = [(i, s.outcome) for i, s in enumerate(compat.batch_states(fb))
                           if s is not None and s.reuses and s.outcome is not None]
        if not self._agree(fb, outcomes, guard, "plan", plan is not None) or plan is None:
            return None
        embed, layers, start, end, norm = compat.decoder_parts(self.decoder)
        residual = compat.residual_stream()
        threshold = max(self.runtime.threshold, start)
        queries: dict[int, torch.Tensor] = {}
        taps = [compat.tap_queries(compat.radix_attention(self.decoder, j), queries)
                for j in plan.config.mass_layers_of(threshold)]
        try:
            hidden = embed(input_ids)
            residual.start(fb)
            for i in range(start, threshold):
                hidden = layers[i](positions, hidden, fb, capture_output=None)
        finally:
            for tap in taps:
                tap.remove()
        signals = self._signals(plan, queries, threshold, guard)
        chosen = guard.attempt(lambda: self._choose_rows(plan, signals, threshold, end, outcomes), None)
        if not self._agree(fb, outcomes, guard, "rows", None if chosen is None else int(chosen.index.shape[0])):
            return None
        assert chosen is not None
        hidden = self._cut_to_rows(chosen, fb, hidden, threshold > start)
        compat.set_sparse_step(fb, SparseLayers(plan, chosen, guard))
        row_positions = chosen.layout.positions.to(positions.dtype)
        for i in range(threshold, end):
            hidden = layers[i](row_positions, hidden, fb, capture_output=None)
        hidden = residual.final_norm(hidden, fb, norm)
        full = guard.attempt(lambda: _scatter(hidden, chosen, input_ids.shape[0]), None)
        return full if self._agree(fb, outcomes, guard, "layers") else None

    def _choose_rows(self, plan: SparseExtendPlan, signals: tuple[torch.Tensor | None, torch.Tensor | None],
                     threshold: int, end: int, outcomes: list[tuple[int, RequestOutcome]]) -> SparseRows:
        """Select the rows, record them, and write the reused KV of the sparse layers (this rank's alone)."""
        rows = select(plan, *signals)
        _record(plan, rows, outcomes)
        plan.fill_reused((*compat.layer_buffers(self.pool, j), *compat.layer_buffers(self.pool, j))
                         for j in range(threshold, end))
        return rows

    @staticmethod
    def _cut_to_rows(rows: SparseRows, fb: ForwardBatch, hidden: torch.Tensor, after_full_layers: bool) -> torch.Tensor:
        """The residual stream cut down to the selected rows. SGLang's layer boundary may still owe the last
        full layer's reduction (its collectives run here), so every rank comes here after the rows vote."""
        residual = compat.residual_stream()
        if after_full_layers:
            hidden = residual.complete_output(hidden, fb)
            handoff = residual.export_replay_handoff(hidden, fb)
            handoff = handoff._replace(
                value=handoff.value.index_select(0, rows.index),
                residual=None if handoff.residual is None else handoff.residual.index_select(0, rows.index),
            )
            return residual.import_replay_handoff(handoff, fb)
        residual.start(fb)
        return hidden.index_select(0, rows.index)

    def _signals(self, plan: SparseExtendPlan, queries: dict[int, torch.Tensor], threshold: int,
                 guard: RankGuard) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """What the policy reads, from the full layers just run: the last one's value deviation (fresh V of
        every extend row in the requests' slots against the reused tokens' cached V, one buffer) and the
        new rows' attention mass summed over the layers the config names, in layer order. A sharded plan
        reduces each across the ranks; a rank that cannot compute its part reduces an absent one."""
        deviation = mass = None
        if plan.policy.reads_deviation and threshold > 0:
            _, values = compat.layer_buffers(self.pool, threshold - 1)
            deviation = guard.attempt(lambda: plan.deviation(values, values), None)
            if deviation is None:
                deviation = plan.absent("deviation")
        new_index = plan.new_index.long()
        for j in plan.config.mass_layers_of(threshold):
            layer_mass = guard.attempt(functools.partial(self._layer_mass, plan, queries, new_index, j), None)
            if layer_mass is None:
                layer_mass = plan.absent("mass")
            mass = layer_mass if mass is None else mass + layer_mass
        return deviation, mass

    def _layer_mass(self, plan: SparseExtendPlan, queries: dict[int, torch.Tensor], new_index: torch.Tensor,
                    j: int) -> torch.Tensor:
        layer = compat.radix_attention(self.decoder, j)
        _, q_heads, _, head_dim, _, scale = compat.attention_shape(layer)
        keys, values = compat.layer_buffers(self.pool, j)
        q_new = queries[j].view(-1, q_heads, head_dim)[new_index]
        return plan.mass(q_new, keys, values, scale)


def _scatter(hidden: torch.Tensor, rows: SparseRows, n_rows: int) -> torch.Tensor:
    """The selected rows' final hidden states in SGLang's full row layout (the others stay zero: the logits
    processor reads each request's last row, always selected)."""
    full = hidden.new_zeros(n_rows, hidden.shape[-1])
    full[rows.index] = hidden
    return full


def _record(plan: SparseExtendPlan, rows: SparseRows, outcomes: list[tuple[int, RequestOutcome]]) -> None:
    """What each reusing request computes; its exact length and rows stay on the device until the
    checkpoint reads them (``RequestOutcome.settle``), so recording costs no host sync."""
    indptr = rows.layout.indptr
    for i, outcome in outcomes:
        outcome.pending_rows = rows.layout.positions[indptr[i] : indptr[i + 1]]
        outcome.reused = plan.n_reused[i]
        outcome.recomputed = rows.recomputed[i]
        outcome.computed = rows.computed[i]
        outcome.pending_exact_len = rows.exact_len[i]


def install(model: torch.nn.Module, model_runner: ModelRunner, runtime: SchedulerRuntime,
            shards: ShardReduce | None = None) -> str:
    """Hook the decoder stack of ``model`` (a ``*ForCausalLM``); returns why not, or "" on success."""
    decoder = compat.decoder_of(model)
    name = type(decoder).__name__
    if decoder is None or name not in SUPPORTED_MODELS:
        return f"model {type(model).__name__} (decoder {name}) is not one of {SUPPORTED_MODELS}"
    limits = compat.decoder_limits(decoder)
    if limits:
        return limits
    _, _, start, _, _ = compat.decoder_parts(decoder)
    _, q_heads, kv_heads, _, _, _ = compat.attention_shape(compat.radix_attention(decoder, start))
    compat.replace_forward(decoder, SparseXForward(decoder, model_runner, runtime, (q_heads, kv_heads), shards))
    return ""
