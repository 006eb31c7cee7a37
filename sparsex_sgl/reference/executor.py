"""Full prefill, SparseX prefill and the baselines over an HF decoder's own weights, on one code path.

The executor runs the HF modules (norms, projections, MLP, rotary embedding) itself, row by row, so it
can compute *some* token rows in a layer: every prefill here is "compute these positions in layer i",
with K/V written into a per-request dense cache indexed by position and attention of the computed
rows against all keys, causal by explicit position. Full prefill is the case where every layer
computes every row, and must equal the HF model's own forward.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sparsex_sgl.graph import LookupPlan
from sparsex_sgl.hybrid import HybridConfig, modeled_prefill_flops
from sparsex_sgl.kernels.dense import dense_causal_attention
from sparsex_sgl.reference.model import ModelSpec
from sparsex_sgl.reference.pool import TensorKVPool
from sparsex_sgl.sparse_extend import ExtendRequest, Kernels, RowLayout, SparseExtendPlan, attend_rows


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
    slot = position) for ``sparse_extend.attend_rows``."""

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
    plan: LookupPlan
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

    ``kernels="torch"`` computes scattered-row attention, selection scores and re-alignment with torch ops
    (the references); ``kernels="triton"`` with the Triton kernels (compiled on a GPU, interpreted on the
    CPU under ``TRITON_INTERPRET=1``), on the same code path. Whole-sequence causal attention always takes
    ``kernels.dense`` (FlashInfer when installed on CUDA, else SDPA).
    """

    def __init__(self, model: torch.nn.Module, kernels: Kernels = "torch") -> None:
        if kernels not in ("torch", "triton"):
            raise ValueError(f"kernels must be 'torch' or 'triton', got {kernels!r}")
        self.spec = ModelSpec.from_hf(model)
        self.model = model.eval()
        first = next(model.parameters())
        self.dtype, self.device = first.dtype, first.device
        self._decoder = model.model
        self.kernels: Kernels = kernels

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
        """One request's rows over slot row 0 (slot = position), for ``attend_rows``."""
        tiles = None
        if self.kernels == "triton":
            from sparsex_sgl.kernels.scattered_attention import DEFAULT_CONFIG, query_tiles

            group = self.spec.dims.n_heads // self.spec.dims.n_kv_heads
            tiles = torch.from_numpy(query_tiles([0, positions.numel()], group, DEFAULT_CONFIG.block_t)).to(self.device)
        one = torch.zeros(1, dtype=torch.int32, device=self.device)
        return RowLayout(positions.to(torch.int32), [0, positions.numel()], [0], [end], one, one + end, tiles)

    def _layer(
        self, i: int, h: torch.Tensor, rows: _Rows, kv: RequestKV, plan: SparseExtendPlan | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``i`` for one request's ``rows``; writes their K/V. Returns (hidden, rotated q). With a
        ``plan``, the rows are its sparse rows and attention is the plan's."""
        return self._layer_many(i, h, [(rows, kv)], plan)

    def _layer_many(
        self, i: int, h: torch.Tensor, parts: Sequence[tuple[_Rows, RequestKV]], plan: SparseExtendPlan | None = None
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
            if plan is not None:
                outs.append(plan.attend(q[start:end].contiguous(), kv.k[i], kv.v[i], attn.scaling))
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
        row is computed. Other rows (a prefix hit, decoding) take ``sparse_extend.attend_rows``.
        """
        if rows.every:
            end = rows.slot_row.shape[1]
            return dense_causal_attention(q, k_layer[:end], v_layer[:end], scale)
        out, _ = attend_rows(q.contiguous(), k_layer, v_layer, rows.slot_row, rows.layout, scale, self.kernels)
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
        """K/V ``[layers, len, kv_heads, head_dim]`` of a segment computed alone from position 0."""
        result = self.prefill_full(token_ids)
        return result.kv.k, result.kv.v

    @torch.no_grad()
    def prefill_reuse(
        self,
        input_ids: Sequence[int],
        plan: LookupPlan,
        pool: TensorKVPool,
        config: HybridConfig,
        extra_capacity: int = 0,
    ) -> PrefillResult:
        """Prefill that takes the plan's prefix and re-aligned segments from ``pool`` and recomputes per ``config``."""
        return self.prefill_reuse_many(input_ids, plan, pool, [config], extra_capacity)[0]

    @torch.no_grad()
    def prefill_reuse_many(
        self,
        input_ids: Sequence[int],
        plan: LookupPlan,
        pool: TensorKVPool,
        configs: Sequence[HybridConfig],
        extra_capacity: int = 0,
    ) -> list[PrefillResult]:
        """``prefill_reuse`` of one request under each of ``configs``, equal to running them one by one.

        The full layers do the same work under every config (every row above the prefix, over the same
        re-aligned KV), so they run once, as deep as the deepest threshold; each config goes on from its
        own threshold with a copy of the request's KV at that point. A quality sweep of many ratios and
        methods pays the full layers once per ``L_full`` instead of once per setting.
        """
        n = len(input_ids)
        if plan.n_tokens != n:
            raise ValueError(f"plan covers {plan.n_tokens} tokens, the prompt has {n}")
        num_layers = self.spec.dims.num_layers
        kv = RequestKV.empty(self.spec, n + extra_capacity, self.dtype, self.device)
        if plan.prefix_len:
            k, v = pool.read(plan.prefix_slots)
            kv.k[:, : plan.prefix_len], kv.v[:, : plan.prefix_len] = k, v
        request = _Request(torch.as_tensor(list(input_ids), device=self.device), plan, pool)
        by_threshold: dict[int, list[int]] = defaultdict(list)
        for index, config in enumerate(configs):
            by_threshold[config.threshold(num_layers)].append(index)
        results: dict[int, PrefillResult] = {}
        at_zero = by_threshold.pop(0, [])
        for index in at_zero:
            last = not by_threshold and index == at_zero[-1]  # nothing runs on this KV after it
            results[index] = self._sparse_layers(request, configs[index], 0, None, kv if last else kv.clone())
        if by_threshold:
            deepest = max(by_threshold)
            full_rows = torch.arange(plan.prefix_len, n)
            h = self._decoder.embed_tokens(request.ids[full_rows.to(self.device)])
            full_pass = self._rows(full_rows)
            qs: list[torch.Tensor] = []
            for i in range(deepest):
                at = by_threshold.get(i + 1, [])
                h, q = self._layer(i, h, full_pass, kv)
                qs.append(q)
                for index in at:
                    last = i + 1 == deepest and index == at[-1]  # nothing runs on this KV after it
                    results[index] = self._sparse_layers(request, configs[index], i + 1,
                                                         _FullLayersState(h, tuple(qs)), kv if last else kv.clone())
        return [results[index] for index in range(len(configs))]

    def _sparse_layers(self, request: _Request, config: HybridConfig, threshold: int, state: _FullLayersState | None,
                       kv: RequestKV) -> PrefillResult:
        """Select the reused tokens to recompute (by the signal at ``threshold`` where the policy has one)
        and run layers ``threshold..`` on the new and selected rows, through the batch's
        ``SparseExtendPlan`` (the same pipeline the SGLang adapter runs); ``state`` is the full layers'
        output (None when ``threshold`` is 0)."""
        plan, pool = request.plan, request.pool
        n, num_layers, dims = plan.n_tokens, self.spec.dims.num_layers, self.spec.dims
        slot_row = torch.arange(kv.k.shape[1], dtype=torch.int32, device=self.device)[None, :]
        extend = ExtendRequest(0, 0, plan.prefix_len, n, plan.new_rows, plan.reused, config.recompute_ratio)
        sparse = SparseExtendPlan([extend], config, self.spec.rope, slot_row, dims.n_heads, dims.n_kv_heads,
                                  self.kernels)
        extra_flops = self._look_ahead(request, sparse, kv.clone()) if config.mass_pass == "lookahead" else 0
        if state is None:
            sparse.select()
        else:
            if sparse.observes_full_layers:
                for j in range(threshold - 1):
                    sparse.observe(state.qs[j], kv.k[j], kv.v[j], self._decoder.layers[j].self_attn.scaling)
            t = threshold - 1
            sparse.select(state.qs[t], kv.k[t], kv.v[t], pool.v[t], self._decoder.layers[t].self_attn.scaling)
        sparse.fill_reused((pool.k[i], pool.v[i], kv.k[i], kv.v[i]) for i in range(threshold, num_layers))
        assert sparse.rows is not None and sparse.exact_len is not None
        rows = sparse.rows.positions.long()
        if state is None:
            h = self._decoder.embed_tokens(request.ids[rows])
        else:
            h = state.h[rows - plan.prefix_len]
        sparse_pass = self._rows(rows)
        for i in range(threshold, num_layers):
            h, _ = self._layer(i, h, sparse_pass, kv, sparse)
        row_list = rows.tolist()
        assert row_list[-1] == n - 1, "the last prompt token must be computed"
        full_rows = range(plan.prefix_len, n)
        rows_per_layer = [full_rows] * threshold + [row_list] * (num_layers - threshold)
        stats = PrefillStats(
            n_tokens=n,
            prefix_len=plan.prefix_len,
            n_reused=sparse.n_reused[0],
            n_selected=sparse.budgets[0],
            computed_rows=len(row_list),
            flops=modeled_prefill_flops(dims, rows_per_layer) + extra_flops,
        )
        exact = int(sparse.exact_len[0]) == n
        return PrefillResult(self._logits(h[-1]), kv, n, stats, exact, tuple(row_list))

    def _look_ahead(self, request: _Request, sparse: SparseExtendPlan, kv: RequestKV) -> int:
        """The look-ahead pass of ``mass_pass="lookahead"``: the new rows alone through every layer over the
        stale re-aligned KV (``kv``, a scratch copy), each layer's mass observed by ``sparse``. Returns its
        modeled FLOPs (the logits row excluded: it is not computed)."""
        plan, dims = request.plan, self.spec.dims
        extend = ExtendRequest(0, 0, plan.prefix_len, plan.n_tokens, plan.new_rows, plan.reused, 0.0)
        slot_row = torch.arange(kv.k.shape[1], dtype=torch.int32, device=self.device)[None, :]
        stale = SparseExtendPlan([extend], HybridConfig(full_layers=0, recompute_ratio=0.0, selection="none",
                                                        min_tokens_per_segment=0),
                                 self.spec.rope, slot_row, dims.n_heads, dims.n_kv_heads, self.kernels)
        stale.select()
        stale.fill_reused((request.pool.k[i], request.pool.v[i], kv.k[i], kv.v[i]) for i in range(dims.num_layers))
        assert stale.rows is not None
        rows = stale.rows.positions.long()  # the new rows, sorted: observe_new's order
        h = self._decoder.embed_tokens(request.ids[rows])
        new_pass = self._rows(rows)
        for i in range(dims.num_layers):
            h, q = self._layer(i, h, new_pass, kv, stale)
            sparse.observe_new(q, kv.k[i], kv.v[i], self._decoder.layers[i].self_attn.scaling)
        row_list = rows.tolist()
        return modeled_prefill_flops(dims, [row_list] * dims.num_layers) - 2 * dims.hidden * dims.vocab

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
        return list(logits.split([len(tokens) for tokens in token_lists]))

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
