"""Full prefill, SparseX prefill and the baselines over an HF decoder's own weights, on one code path.

The executor runs the HF modules (norms, projections, MLP, rotary embedding) itself, row by row, so it
can compute *some* token rows in a layer: every prefill here is "compute these positions in layer i",
with K/V written into a per-request dense cache indexed by position and attention of the computed
rows against all keys, causal by explicit position. Full prefill is the case where every layer
computes every row, and must equal the HF model's own forward.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sparsex_sgl.core.config import SelectionConfig
from sparsex_sgl.core.graph import Lookup
from sparsex_sgl.core.ops import OpSetName, RowLayout, op_set
from sparsex_sgl.core.selection import POLICIES
from sparsex_sgl.core.sparse_extend import ExtendRequest, SparseExtendPlan, SparseRows, select
from sparsex_sgl.kernels.dense import dense_causal_attention
from sparsex_sgl.reference.flops import modeled_prefill_flops
from sparsex_sgl.reference.model import ModelSpec
from sparsex_sgl.reference.pool import TensorKVPool

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
"""One layer's attention of some rows: ``(q [m, hq, d], k_layer, v_layer, scale) -> [m, hq, d]``."""


@dataclass(frozen=True)
class ReuseSetting:
    """A reuse prefill as the reference executor runs it: the selection, and whether the attention mass
    comes from a *look-ahead* pass instead of the full layers (an offline comparison point: the new rows
    first run alone through every layer over the stale re-aligned KV, and their mass summed over all layers
    scores the reused tokens; its cost is counted in the FLOPs). The server serves single-pass signals."""

    selection: SelectionConfig
    lookahead: bool = False

    def __post_init__(self) -> None:
        if self.lookahead and not POLICIES[self.selection.selection].reads_mass:
            raise ValueError(f"a look-ahead pass scores by mass; selection {self.selection.selection!r} reads none")


@dataclass
class RequestKV:
    """One request's K/V for every layer: ``k, v [layers, capacity, kv_heads, head_dim]``, by position."""

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def empty(cls, spec: ModelSpec, capacity: int, dtype: torch.dtype, device: torch.device) -> RequestKV:
        d = spec.dims
        k = torch.zeros(d.num_layers, capacity, d.n_kv_heads, d.head_dim, dtype=dtype, device=device)
        return cls(k, torch.zeros_like(k))

    def clone(self) -> RequestKV:
        return RequestKV(self.k.clone(), self.v.clone())


@dataclass(frozen=True)
class PrefillStats:
    """What a prefill computed.

    ``computed_rows``: positions computed in the last layer (all for full prefill; new tokens plus
    recomputed reused tokens otherwise). ``flops``: modeled prefill FLOPs.
    """

    n_tokens: int
    prefix_len: int
    n_reused: int
    n_selected: int
    computed_rows: int
    flops: int

    @property
    def recompute_frac(self) -> float:
        """Share of prompt tokens computed in the sparse layers."""
        return self.computed_rows / self.n_tokens


@dataclass
class PrefillResult:
    """Logits of the last prompt token, the request's KV (for decoding), and stats.

    ``exact`` is True when every position's KV was computed or taken from an exact prefix, so the KV
    may be cached as an exact path.
    """

    logits: torch.Tensor
    kv: RequestKV
    n_tokens: int
    stats: PrefillStats
    exact: bool
    rows: tuple[int, ...] = ()
    """Positions the last layer computed (all of them for full prefill; left empty there)."""


@dataclass(frozen=True)
class _Rows:
    """The rows one pass computes, with what every layer of that pass shares: their rotary cos/sin
    (``[m, 1, head_dim]``), whether they are every position ``0..end-1`` (plain causal attention, the dense
    path), and how attention reads the request's dense per-position KV as a pool (``slot_row [1, end]``,
    slot = position) for the op set's attention."""

    positions: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    every: bool
    slot_row: torch.Tensor
    layout: RowLayout


@dataclass(frozen=True)
class _Request:
    """One reuse prefill's inputs, shared by every config it runs under."""

    ids: torch.Tensor
    lookup: Lookup
    pool: TensorKVPool


@dataclass(frozen=True)
class _FullLayersState:
    """The full layers' output at a threshold: hidden rows, and the rotated queries (rows above the prefix)
    of every full layer so far, the threshold layer's last."""

    h: torch.Tensor
    qs: tuple[torch.Tensor, ...]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class ReferenceExecutor:
    """Runs a supported HF ``*ForCausalLM`` (Llama, Qwen2, Qwen3) row-selectively on the CPU or a GPU.

    ``kernels`` names the op set (``ops``) of scattered-row attention, selection scores and re-alignment:
    "torch" (the references) or "triton" (compiled on a GPU, interpreted on the CPU under
    ``TRITON_INTERPRET=1``), on the same code path. Whole-sequence causal attention always takes
    ``kernels.dense`` (FlashInfer when installed on CUDA, else SDPA).
    """

    def __init__(self, model: torch.nn.Module, kernels: OpSetName = "torch") -> None:
        self.ops = op_set(kernels)
        self.spec = ModelSpec.from_hf(model)
        self.model: Any = model.eval()  # an HF *ForCausalLM
        first = next(model.parameters())
        self.dtype, self.device = first.dtype, first.device
        self._decoder: Any = model.model  # an HF decoder stack (LlamaModel, Qwen2Model, ...)

    # ------------------------------------------------------------------ building blocks
    def _rows(self, positions: torch.Tensor) -> _Rows:
        """Per-pass row state, built once instead of once per layer."""
        positions = positions.to(self.device)
        probe = torch.empty(0, dtype=self.dtype, device=self.device)
        cos, sin = self._decoder.rotary_emb(probe, positions[None])
        end = int(positions.max()) + 1
        every = positions.numel() == end  # sorted and distinct, so these are all of 0..end-1
        slot_row = torch.arange(end, dtype=torch.int32, device=self.device)[None, :]
        layout = self._layout(positions, end)
        return _Rows(positions, cos[0][:, None, :], sin[0][:, None, :], every, slot_row, layout)

    def _layout(self, positions: torch.Tensor, end: int) -> RowLayout:
        """One request's rows over slot row 0 (slot = position), for the op set's attention."""
        indptr = [0, positions.numel()]
        host_tiles = self.ops.row_tiles(indptr, self.spec.dims.n_heads // self.spec.dims.n_kv_heads)
        tiles = None if host_tiles is None else torch.from_numpy(host_tiles).to(self.device)
        zero = torch.zeros(1, dtype=torch.int32, device=self.device)
        return RowLayout(positions.to(torch.int32), indptr, [0], [end], zero, zero + end,
                         torch.tensor(indptr, dtype=torch.int32, device=self.device), tiles)

    def _layer(
        self, i: int, h: torch.Tensor, rows: _Rows, kv: RequestKV, attend: Attend | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``i`` for one request's ``rows``; writes their K/V. Returns (hidden, rotated q). With
        ``attend`` (a sparse extend's sparse layer), the rows' attention is that."""
        return self._layer_many(i, h, [(rows, kv)], attend)

    def _layer_many(
        self, i: int, h: torch.Tensor, parts: Sequence[tuple[_Rows, RequestKV]], attend: Attend | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``i`` for the rows of several requests stacked in ``h`` (``parts`` in order, each its rows
        and its own K/V); writes their K/V. Returns (hidden, rotated q), rows in ``h``'s order.

        The norms, projections and MLP take every row at once: a decode step is one weight read per layer
        for all requests instead of one each, which is what decoding costs on the CPU. Attention runs per
        request over its own K/V.
        """
        layer = self._decoder.layers[i]
        attn = layer.self_attn
        dims = self.spec.dims
        m = h.shape[0]
        x = layer.input_layernorm(h)
        q = attn.q_proj(x).view(m, dims.n_heads, dims.head_dim)
        k = attn.k_proj(x).view(m, dims.n_kv_heads, dims.head_dim)
        v = attn.v_proj(x).view(m, dims.n_kv_heads, dims.head_dim)
        if self.spec.qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        if len(parts) == 1:
            cos, sin = parts[0][0].cos, parts[0][0].sin
        else:
            cos, sin = torch.cat([rows.cos for rows, _ in parts]), torch.cat([rows.sin for rows, _ in parts])
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        outs, start = [], 0
        for rows, kv in parts:
            end = start + rows.positions.numel()
            kv.k[i, rows.positions] = k[start:end]
            kv.v[i, rows.positions] = v[start:end]
            if attend is not None:
                outs.append(attend(q[start:end].contiguous(), kv.k[i], kv.v[i], attn.scaling))
            else:
                outs.append(self._attend(q[start:end], kv.k[i], kv.v[i], rows, attn.scaling))
            start = end
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        h = h + attn.o_proj(out.reshape(m, dims.n_heads * dims.head_dim))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        return h, q

    def _attend(self, q: torch.Tensor, k_layer: torch.Tensor, v_layer: torch.Tensor, rows: _Rows,
                scale: float) -> torch.Tensor:
        """Attention of ``rows`` over positions ``0..end-1`` of one layer's K/V ``[capacity, kv_heads, d]``.

        Rows that are a whole sequence (plain causal) take the dense path (FlashInfer where installed on
        CUDA, else SDPA), whatever ``kernels`` says: no scattered kernel beats dense attention when every
        row is computed. Other rows (a prefix hit, decoding) take the op set's scattered-row attention.
        """
        if rows.every:
            end = rows.slot_row.shape[1]
            return dense_causal_attention(q, k_layer[:end], v_layer[:end], scale)
        out, _ = self.ops.attend(q.contiguous(), k_layer, v_layer, rows.slot_row, rows.layout, scale)
        return out

    def _logits(self, h_rows: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self._decoder.norm(h_rows)).float()

    def full_flops(self, n_tokens: int) -> int:
        rows = range(n_tokens)
        return modeled_prefill_flops(self.spec.dims, [rows] * self.spec.dims.num_layers)

    # ------------------------------------------------------------------ prefills
    @torch.no_grad()
    def prefill_full(self, input_ids: Sequence[int], extra_capacity: int = 0) -> PrefillResult:
        """Exact prefill of every token at positions ``0..n-1``."""
        n = len(input_ids)
        kv = RequestKV.empty(self.spec, n + extra_capacity, self.dtype, self.device)
        all_rows = self._rows(torch.arange(n))
        h = self._decoder.embed_tokens(torch.as_tensor(list(input_ids), device=self.device))
        for i in range(self.spec.dims.num_layers):
            h, _ = self._layer(i, h, all_rows, kv)
        stats = PrefillStats(n, 0, 0, 0, n, self.full_flops(n))
        return PrefillResult(self._logits(h[-1]), kv, n, stats, exact=True)

    @torch.no_grad()
    def encode_segment(self, token_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V ``[layers, len, kv_heads, head_dim]`` of ``token_ids`` computed alone from position 0."""
        result = self.prefill_full(token_ids)
        return result.kv.k, result.kv.v

    @torch.no_grad()
    def prefill_reuse(
        self,
        input_ids: Sequence[int],
        lookup: Lookup,
        pool: TensorKVPool,
        setting: SelectionConfig | ReuseSetting,
        extra_capacity: int = 0,
    ) -> PrefillResult:
        """Prefill that takes the lookup's prefix and re-aligned segments from ``pool`` and recomputes per
        ``setting`` (a ``SelectionConfig`` is a setting without look-ahead)."""
        return self.prefill_reuse_many(input_ids, lookup, pool, [setting], extra_capacity)[0]

    @torch.no_grad()
    def prefill_reuse_many(
        self,
        input_ids: Sequence[int],
        lookup: Lookup,
        pool: TensorKVPool,
        settings: Sequence[SelectionConfig | ReuseSetting],
        extra_capacity: int = 0,
    ) -> list[PrefillResult]:
        """``prefill_reuse`` of one request under each of ``settings``, equal to running them one by one.

        The full layers do the same work under every setting (every row above the prefix, over the same
        re-aligned KV), so they run once, as deep as the deepest threshold; each setting goes on from its
        own threshold with a copy of the request's KV at that point. A quality sweep of many ratios and
        methods pays the full layers once per ``L_full`` instead of once per setting.
        """
        n = len(input_ids)
        if lookup.n_tokens != n:
            raise ValueError(f"lookup covers {lookup.n_tokens} tokens, the prompt has {n}")
        runs = [s if isinstance(s, ReuseSetting) else ReuseSetting(s) for s in settings]
        num_layers = self.spec.dims.num_layers
        kv = RequestKV.empty(self.spec, n + extra_capacity, self.dtype, self.device)
        if lookup.prefix_len:
            k, v = pool.read(lookup.prefix_slots)
            kv.k[:, : lookup.prefix_len], kv.v[:, : lookup.prefix_len] = k, v
        request = _Request(torch.as_tensor(list(input_ids), device=self.device), lookup, pool)
        by_threshold: dict[int, list[int]] = defaultdict(list)
        for index, run in enumerate(runs):
            by_threshold[run.selection.threshold(num_layers)].append(index)
        results: dict[int, PrefillResult] = {}
        at_zero = by_threshold.pop(0, [])
        for index in at_zero:
            last = not by_threshold and index == at_zero[-1]  # nothing runs on this KV after it
            results[index] = self._sparse_layers(request, runs[index], 0, None, kv if last else kv.clone())
        if by_threshold:
            deepest = max(by_threshold)
            full_rows = torch.arange(lookup.prefix_len, n)
            h = self._decoder.embed_tokens(request.ids[full_rows.to(self.device)])
            full_pass = self._rows(full_rows)
            qs: list[torch.Tensor] = []
            for i in range(deepest):
                at = by_threshold.get(i + 1, [])
                h, q = self._layer(i, h, full_pass, kv)
                qs.append(q)
                for index in at:
                    last = i + 1 == deepest and index == at[-1]  # nothing runs on this KV after it
                    results[index] = self._sparse_layers(request, runs[index], i + 1,
                                                         _FullLayersState(h, tuple(qs)), kv if last else kv.clone())
        return [results[index] for index in range(len(runs))]

    def _plan(self, extend: ExtendRequest, selection: SelectionConfig, kv: RequestKV) -> SparseExtendPlan:
        """The sparse extend of one request over its dense per-position KV (slot row 0: slot = position)."""
        dims = self.spec.dims
        slot_row = torch.arange(kv.k.shape[1], dtype=torch.int32, device=self.device)[None, :]
        return SparseExtendPlan.build([extend], selection, self.spec.rope, slot_row, dims.n_heads, dims.n_kv_heads,
                                      self.ops)

    def _sparse_layers(self, request: _Request, run: ReuseSetting, threshold: int, state: _FullLayersState | None,
                       kv: RequestKV) -> PrefillResult:
        """Select the reused tokens to recompute (by the signal at ``threshold`` where the policy has one)
        and run layers ``threshold..`` on the new and selected rows, through the batch's
        ``SparseExtendPlan`` (the same pipeline the SGLang adapter runs); ``state`` is the full layers'
        output (None when ``threshold`` is 0)."""
        lookup, pool, config = request.lookup, request.pool, run.selection
        n, num_layers, dims = lookup.n_tokens, self.spec.dims.num_layers, self.spec.dims
        extend = ExtendRequest(0, 0, lookup.prefix_len, n, lookup.new_rows, lookup.reused, config.recompute_ratio)
        plan = self._plan(extend, config, kv)
        extra_flops, deviation, mass = 0, None, None
        if run.lookahead:
            mass, extra_flops = self._look_ahead(request, plan, kv.clone())
        elif state is not None:
            new_index = plan.new_index.long()
            for j in config.mass_layers_of(threshold):
                layer_mass = plan.mass(state.qs[j][new_index], kv.k[j], kv.v[j], self._scale(j))
                mass = layer_mass if mass is None else mass + layer_mass
        if state is not None and plan.policy.reads_deviation:
            deviation = plan.deviation(kv.v[threshold - 1], pool.v[threshold - 1])
        rows = select(plan, deviation, mass)
        plan.fill_reused((pool.k[i], pool.v[i], kv.k[i], kv.v[i]) for i in range(threshold, num_layers))
        positions = rows.layout.positions.long()
        if state is None:
            h = self._decoder.embed_tokens(request.ids[positions])
        else:
            h = state.h[positions - lookup.prefix_len]
        sparse_pass = self._rows(positions)
        for i in range(threshold, num_layers):
            h, _ = self._layer(i, h, sparse_pass, kv, _sparse_attention(plan, rows))
        row_list = positions.tolist()
        assert row_list[-1] == n - 1, "the last prompt token must be computed"
        full_rows = range(lookup.prefix_len, n)
        rows_per_layer = [full_rows] * threshold + [row_list] * (num_layers - threshold)
        stats = PrefillStats(
            n_tokens=n,
            prefix_len=lookup.prefix_len,
            n_reused=plan.n_reused[0],
            n_selected=rows.recomputed[0],
            computed_rows=len(row_list),
            flops=modeled_prefill_flops(dims, rows_per_layer) + extra_flops,
        )
        exact = int(rows.exact_len[0]) == n
        return PrefillResult(self._logits(h[-1]), kv, n, stats, exact, tuple(row_list))

    def _look_ahead(self, request: _Request, plan: SparseExtendPlan, kv: RequestKV) -> tuple[torch.Tensor, int]:
        """The look-ahead pass (``ReuseSetting.lookahead``): the new rows alone through every layer over the
        stale re-aligned KV (``kv``, a scratch copy), each layer's mass per reused token of ``plan`` summed.
        Returns the mass and the pass's modeled FLOPs (the logits row excluded: it is not computed)."""
        lookup, dims = request.lookup, self.spec.dims
        extend = ExtendRequest(0, 0, lookup.prefix_len, lookup.n_tokens, lookup.new_rows, lookup.reused, 0.0)
        stale = self._plan(extend, SelectionConfig(full_layers=0, recompute_ratio=0.0, selection="none",
                                                   min_tokens_per_segment=0), kv)
        new_rows = select(stale)
        stale.fill_reused((request.pool.k[i], request.pool.v[i], kv.k[i], kv.v[i]) for i in range(dims.num_layers))
        positions = new_rows.layout.positions.long()  # the new rows, sorted: the order plan.mass reads
        h = self._decoder.embed_tokens(request.ids[positions])
        new_pass = self._rows(positions)
        mass: torch.Tensor | None = None
        for i in range(dims.num_layers):
            h, q = self._layer(i, h, new_pass, kv, _sparse_attention(stale, new_rows))
            layer_mass = plan.mass(q, kv.k[i], kv.v[i], self._scale(i))
            mass = layer_mass if mass is None else mass + layer_mass
        assert mass is not None
        row_list = positions.tolist()
        return mass, modeled_prefill_flops(dims, [row_list] * dims.num_layers) - 2 * dims.hidden * dims.vocab

    def _scale(self, layer: int) -> float:
        return float(self._decoder.layers[layer].self_attn.scaling)

    # ------------------------------------------------------------------ decoding
    @torch.no_grad()
    def _extend_many(self, results: Sequence[PrefillResult], token_lists: Sequence[Sequence[int]],
                     starts: Sequence[int]) -> list[torch.Tensor]:
        """Run ``token_lists[j]`` at positions ``starts[j]..`` over ``results[j]``'s KV, every request in
        one pass (``_layer_many``); logits per row, per request."""
        parts = []
        for result, tokens, start in zip(results, token_lists, starts, strict=True):
            if start + len(tokens) > result.kv.k.shape[1]:
                raise ValueError("the prefill was not given enough extra_capacity for these tokens")
            parts.append((self._rows(torch.arange(start, start + len(tokens))), result.kv))
        ids = [token for tokens in token_lists for token in tokens]
        h = self._decoder.embed_tokens(torch.as_tensor(ids, device=self.device))
        for i in range(self.spec.dims.num_layers):
            h, _ = self._layer_many(i, h, parts)
        logits = self._logits(h)
        return list(torch.split(logits, [len(tokens) for tokens in token_lists]))

    def greedy_decode(self, result: PrefillResult, n_new: int) -> list[int]:
        """Greedy tokens after a prefill (exact decoding over whatever KV the prefill left)."""
        return self.greedy_decode_many([result], n_new)[0]

    def greedy_decode_many(self, results: Sequence[PrefillResult], n_new: int) -> list[list[int]]:
        """``greedy_decode`` of several prefills, one step for all of them at a time."""
        if not results:
            return []
        tokens = [[int(result.logits.argmax())] for result in results]
        for step in range(1, n_new):
            starts = [result.n_tokens + step - 1 for result in results]
            logits = self._extend_many(results, [own[-1:] for own in tokens], starts)
            for own, rows in zip(tokens, logits, strict=True):
                own.append(int(rows[-1].argmax()))
        return tokens

    def teacher_forced_argmax(self, result: PrefillResult, forced: Sequence[int]) -> list[int]:
        """The model's top-1 token at each of ``len(forced)`` answer steps when fed ``forced`` as history."""
        return self.teacher_forced_argmax_many([result], forced)[0]

    def teacher_forced_argmax_many(self, results: Sequence[PrefillResult], forced: Sequence[int]) -> list[list[int]]:
        """``teacher_forced_argmax`` of several prefills with the same forced history, in one pass."""
        firsts = [[int(result.logits.argmax())] for result in results]
        if len(forced) <= 1:
            return [first[: len(forced)] for first in firsts]
        logits = self._extend_many(results, [forced[:-1]] * len(results), [result.n_tokens for result in results])
        return [first + rows.argmax(dim=-1).tolist() for first, rows in zip(firsts, logits, strict=True)]


def _sparse_attention(plan: SparseExtendPlan, rows: SparseRows) -> Attend:
    """A sparse layer's attention of ``rows``: ``plan.run`` as the executor's layers call it."""
    return lambda q, k_layer, v_layer, scale: plan.run(rows, q, k_layer, v_layer, scale)
