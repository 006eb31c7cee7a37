"""One batch's sparse extend (SparseX steps 5 and 6): a plan built once per batch, runs once per layer.

Shaped like FlashInfer's wrappers. ``SparseExtendPlan.build`` does every piece of host work of a batch
once: which rows are new and which reused, where each reused token's cached KV sits and where it goes,
the rotation table of the position deltas, each request's recompute budget, and the work tiles of the
kernels; it copies all of it to the device in one transfer. After that nothing reads back to the host:

- ``select`` (at the last full layer, after its attention) scores the reused tokens on the device (value
  deviation, and for ``sparse_q`` the attention mass of the new rows from their log-sum-exp), picks each
  request's top tokens and lays out the rows the sparse layers compute. Every request's count of rows is
  fixed by its budget at plan time, so the layout's shape is known before the scores are;
- ``fill_reused`` writes the re-aligned cached K and the cached V of every reused token into the
  request's own slots, for every sparse layer, once;
- ``attend`` is one sparse layer's attention: the computed rows at their positions over the request's
  pooled KV, causal by position.

The SGLang adapter runs it over SGLang's KV pool, and the reference executor over its own pool-shaped
buffers, so both compute the same numbers. The ops come from ``kernels``: ``"triton"`` (compiled on CUDA;
interpreted on the CPU under ``TRITON_INTERPRET=1``) or ``"torch"`` (the references, for the CPU; their
attention is cut into row chunks so no ``[heads, rows, N]`` score block outgrows ``TORCH_SCORE_BYTES``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from sparsex_sgl.graph import ReusedSegment
from sparsex_sgl.hybrid import HybridConfig
from sparsex_sgl.kernels import scattered_query_attention_ref, selection_scores_ref
from sparsex_sgl.kernels.tiles import csr_tiles
from sparsex_sgl.rope import RopeConfig, delta_rotation_table, rotate_pairs
from sparsex_sgl.select import (
    MASS_SELECTIONS,
    SIGNAL_SELECTIONS,
    coverage_count,
    selection_budget,
    sparse_q_signal,
)

Kernels = Literal["torch", "triton"]
TORCH_SCORE_BYTES = 1 << 28
"""Largest float32 score block ``[heads, rows, keys]`` one chunk of the torch attention may build."""
LayerBuffers = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
"""One layer's ``(k_source, v_source, k_dest, v_dest)`` buffers, each ``[slots, kv_heads, head_dim]``."""


@dataclass(frozen=True)
class ExtendRequest:
    """One request of an extend batch, as the plan needs it (host data).

    Its extend rows are positions ``[prefix_len, n_tokens)``, rows ``extend_start..`` of the batch's row
    layout (request after request, as SGLang lays out an extend batch); its KV slots by position are
    ``req_to_token[pool_index]``. ``new_rows`` (sorted, ending at ``n_tokens - 1``) are computed in every
    layer; ``reused`` segments cover the other extend rows. A request without reuse has every extend row
    in ``new_rows`` and ``reused == ()``.
    """

    pool_index: int
    extend_start: int
    prefix_len: int
    n_tokens: int
    new_rows: Sequence[int]
    reused: Sequence[ReusedSegment]
    recompute_ratio: float

    def __post_init__(self) -> None:
        n_reused = sum(s.length for s in self.reused)
        if len(self.new_rows) + n_reused != self.n_tokens - self.prefix_len:
            raise ValueError(f"{len(self.new_rows)} new and {n_reused} reused rows do not cover the "
                             f"{self.n_tokens - self.prefix_len} extend rows")
        if not self.new_rows or self.new_rows[-1] != self.n_tokens - 1 or self.new_rows[0] < self.prefix_len:
            raise ValueError("new rows must lie in the extend rows and end at the last prompt token")


@dataclass(frozen=True)
class RowLayout:
    """Query rows of a batch, CSR by request: request i's rows are ``offsets[i]:offsets[i+1]`` (host), at
    ``positions [M]`` (device, int32), over KV slots ``req_to_token[pool_index[i], :seq_len[i]]``.
    ``pool_index_dev``/``seq_len_dev`` are the same on the device; ``tiles`` is the Triton kernel's table
    (``scattered_attention.query_tiles``), None for the torch ops."""

    positions: torch.Tensor
    offsets: list[int]
    pool_index: list[int]
    seq_len: list[int]
    pool_index_dev: torch.Tensor
    seq_len_dev: torch.Tensor
    tiles: torch.Tensor | None


def attend_rows(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, req_to_token: torch.Tensor,
                layout: RowLayout, scale: float, kernels: Kernels, need_lse: bool = False,
                out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of the rows ``q [M, hq, d]`` of ``layout``, each at its position over its request's pooled
    keys up to that position: ``(out [M, hq, d], lse [M, hq] or None)``. The Triton kernel always gives the
    LSE; the torch ops compute it only when asked (the SDPA path is the faster one on the CPU)."""
    if kernels == "triton":
        from sparsex_sgl.kernels.scattered_attention import scattered_query_attention

        return scattered_query_attention(q, k_buffer, v_buffer, layout.positions, layout.offsets, req_to_token,
                                         layout.pool_index_dev, layout.seq_len_dev, scale, tiles=layout.tiles,
                                         out=out)
    out = torch.empty_like(q) if out is None else out
    lse = torch.empty(q.shape[0], q.shape[1], dtype=torch.float32, device=q.device) if need_lse else None
    for i, (a, b) in enumerate(itertools.pairwise(layout.offsets)):
        if a == b:
            continue
        slots = req_to_token[layout.pool_index[i], : layout.seq_len[i]].long()
        keys, values = k_buffer[slots], v_buffer[slots]
        chunk = max(1, TORCH_SCORE_BYTES // (4 * q.shape[1] * slots.numel()))
        for start in range(a, b, chunk):
            rows = slice(start, min(start + chunk, b))
            pos = layout.positions[rows].long()
            if lse is not None:
                out[rows], lse[rows] = scattered_query_attention_ref(q[rows], keys, values, pos, scale)
            else:
                visible = torch.arange(slots.numel(), device=q.device)[None, :] <= pos[:, None]
                out[rows] = torch.nn.functional.scaled_dot_product_attention(
                    q[rows].transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1), attn_mask=visible,
                    scale=scale, enable_gqa=True).transpose(0, 1)
    return out, lse


class _Upload:
    """Host arrays packed into one int32 buffer, copied to the device in one transfer, then split."""

    def __init__(self) -> None:
        self._parts: list[tuple[str, np.ndarray]] = []

    def add(self, name: str, array: np.ndarray) -> None:
        self._parts.append((name, np.ascontiguousarray(array)))

    def to(self, device: torch.device) -> dict[str, torch.Tensor]:
        flat = [a.astype(np.int32).reshape(-1) if a.dtype != np.float32 else a.reshape(-1).view(np.int32)
                for _, a in self._parts]
        host = torch.from_numpy(np.concatenate(flat) if flat else np.zeros(0, np.int32))
        if device.type == "cuda":
            host = host.pin_memory()
        buffer = host.to(device, non_blocking=True)
        out, start = {}, 0
        for (name, array), part in zip(self._parts, flat, strict=True):
            view = buffer[start : start + part.size]
            view = view.view(torch.float32) if array.dtype == np.float32 else view
            out[name] = view.view(array.shape) if array.ndim > 1 else view
            start += part.size
        return out


class SparseExtendPlan:
    """The sparse extend of one batch; see the module docstring for the call order."""

    def __init__(self, requests: Sequence[ExtendRequest], config: HybridConfig, rope: RopeConfig,
                 req_to_token: torch.Tensor, num_q_heads: int, num_kv_heads: int, kernels: Kernels) -> None:
        """Build the plan. ``req_to_token [rows, max_len]`` is on the KV's device; the head counts fix the
        GQA packing of the Triton tiles."""
        if kernels not in ("torch", "triton"):
            raise ValueError(f"kernels must be 'torch' or 'triton', got {kernels!r}")
        self.requests = list(requests)
        self.config = config
        self.rope = rope
        self.req_to_token = req_to_token
        self.kernels: Kernels = kernels
        self.group = num_q_heads // num_kv_heads
        self.device = req_to_token.device
        if kernels == "triton":
            from sparsex_sgl.kernels import realign, scattered_attention, selection

            self._attention, self._selection, self._realign = scattered_attention, selection, realign
            self._block_t = scattered_attention.DEFAULT_CONFIG.block_t
        self._build()

    # ------------------------------------------------------------------ plan (host work, one upload)
    def _build(self) -> None:
        reqs, config = self.requests, self.config
        segments = [list(r.reused) for r in reqs]
        n_reused = [sum(s.length for s in segs) for segs in segments]
        budgets = [0 if not n else selection_budget(n, r.recompute_ratio) for r, n in zip(reqs, n_reused, strict=True)]
        if config.selection == "none":
            budgets = [0] * len(reqs)
        elif config.selection == "first_k":  # only moved segments' tokens are candidates
            movable = [sum(s.length for s in segs if s.delta != 0) for segs in segments]
            budgets = [min(b, m) for b, m in zip(budgets, movable, strict=True)]
        self.n_reused = n_reused
        self.key_offsets = _csr(n_reused)
        # The rows whose attention mass scores a request's reused tokens: its new rows, or with
        # ``mass_rows="answer"`` those after its last reused token (the question and generation prompt).
        scored = [self._scored_rows(r) if n else [] for r, n in zip(reqs, n_reused, strict=True)]
        self.scored_offsets = _csr([len(rows) for rows in scored])
        max_r = max(n_reused, default=0)
        self._stride = max((r.n_tokens for r in reqs), default=0) + 1
        self._mass_sum: torch.Tensor | None = None

        up = _Upload()
        up.add("req_pool", np.array([r.pool_index for r in reqs]))
        up.add("req_base", np.array([r.extend_start - r.prefix_len for r in reqs]))
        up.add("req_len", np.array([r.n_tokens for r in reqs]))
        up.add("new_pos", _concat([r.new_rows for r in reqs]))
        up.add("new_req", np.repeat(np.arange(len(reqs)), [len(r.new_rows) for r in reqs]))
        up.add("new_idx", _concat([np.asarray(r.new_rows, np.int64) - r.prefix_len + r.extend_start for r in reqs]))
        new_base = _csr([len(r.new_rows) for r in reqs])
        up.add("scored_pos", _concat(scored))
        up.add("scored_in_new", _concat([np.searchsorted(np.asarray(r.new_rows), rows) + base
                                         for r, rows, base in zip(reqs, scored, new_base[:-1], strict=True)]))
        up.add("scored_offsets", np.array(self.scored_offsets))
        positions = [np.arange(s.target_start, s.target_start + s.length) for segs in segments for s in segs]
        up.add("r_pos", _concat(positions))
        up.add("r_src", _concat([np.asarray(s.slots) for segs in segments for s in segs]))
        deltas = torch.as_tensor(_concat([np.full(s.length, s.delta) for segs in segments for s in segs]))
        cos, sin, delta_index = delta_rotation_table(deltas, self.rope)
        up.add("r_delta", delta_index.numpy())
        up.add("cos", cos.numpy().reshape(-1, cos.shape[-1]) if cos.numel() else np.zeros((0, 1), np.float32))
        up.add("sin", sin.numpy().reshape(-1, sin.shape[-1]) if sin.numel() else np.zeros((0, 1), np.float32))
        up.add("r_req", np.repeat(np.arange(len(reqs)), n_reused))
        up.add("r_pad", _concat([b * max_r + np.arange(n) for b, n in enumerate(n_reused)]))
        up.add("r_off", np.array(self.key_offsets[:-1]))
        offsets = _concat([np.arange(s.length) for segs in segments for s in segs])
        moved = _concat([np.full(s.length, s.delta != 0) for segs in segments for s in segs]).astype(bool)
        up.add("r_forced", moved & (offsets < config.min_tokens_per_segment))
        # EPIC-style: earliest offsets of moved segments first (ties by segment order: stable sort).
        up.add("first_k", np.where(moved, -offsets, -np.inf).astype(np.float32))
        if self.kernels == "triton":
            up.add("scored_tiles", csr_tiles([self.group * o for o in self.scored_offsets], self._block_t))
            up.add("key_tiles", csr_tiles(self.key_offsets, self._selection.BLOCK_R))
        self._dev = up.to(self.device)
        self._padded_shape = (len(reqs), max_r)
        d = self._dev
        self.reused_dst = self.req_to_token[d["req_pool"][d["r_req"]].long(), d["r_pos"].long()].long()
        self.max_budgets = budgets
        """Each request's recompute budget at its ratio; the budgets taken (``budgets``) are these unless
        ``config.coverage`` sets them per request at ``select``."""
        self._set_budgets(budgets)
        self.rows: RowLayout | None = None
        self.rows_index: torch.Tensor | None = None
        self.rows_slot: torch.Tensor | None = None
        self.exact_len: torch.Tensor | None = None

    def _scored_rows(self, request: ExtendRequest) -> Sequence[int]:
        if self.config.mass_rows == "new":
            return request.new_rows
        last_reused = max(s.target_start + s.length for s in request.reused)
        return [p for p in request.new_rows if p >= last_reused]

    def _set_budgets(self, budgets: Sequence[int]) -> None:
        """Lay out what depends on the number of tokens each request recomputes (one small upload)."""
        reqs, max_r = self.requests, self._padded_shape[1]
        self.budgets = list(budgets)
        self.computed = [len(r.new_rows) + b for r, b in zip(reqs, budgets, strict=True)]
        self.row_offsets = _csr(self.computed)
        up = _Upload()
        up.add("sel_take", _concat([b * max_r + np.arange(k) for b, k in enumerate(budgets)]))
        up.add("sel_req", np.repeat(np.arange(len(reqs)), budgets))
        up.add("rows_req", np.repeat(np.arange(len(reqs)), self.computed))
        if self.kernels == "triton":
            up.add("rows_tiles", csr_tiles([self.group * o for o in self.row_offsets], self._block_t))
        self._dev.update(up.to(self.device))

    # ------------------------------------------------------------------ full layers: attention mass
    @property
    def observes_full_layers(self) -> bool:
        """Whether every full layer before the threshold should be passed to ``observe``."""
        return self.config.selection in MASS_SELECTIONS and self.config.mass_layers == "all" \
            and self.config.mass_pass == "threshold" and self.reused_dst.numel() > 0

    def observe(self, q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, scale: float) -> None:
        """Add one layer's attention mass (from ``q [E, hq, d]``, the batch's extend rows) to the signal;
        call it after that layer's attention, its K/V written to the buffers."""
        self.observe_new(q[self._dev["new_idx"].long()], k_buffer, v_buffer, scale)

    def observe_new(self, q_new: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, scale: float) -> None:
        """``observe`` from the queries of the batch's new rows only (``[sum new rows, hq, d]``, request after
        request): the look-ahead pass computes no other rows."""
        mass = self._mass(q_new[self._dev["scored_in_new"].long()].contiguous(), k_buffer, v_buffer, scale)
        self._mass_sum = mass if self._mass_sum is None else self._mass_sum + mass

    # ------------------------------------------------------------------ threshold: score, select, lay out
    def select(self, q: torch.Tensor | None = None, k_buffer: torch.Tensor | None = None,
               v_buffer: torch.Tensor | None = None, v_source: torch.Tensor | None = None,
               scale: float | None = None) -> None:
        """Choose every request's recompute set and lay out the sparse layers' rows.

        For a signal policy call it after the last full layer's attention, with that layer's rotated
        queries of the batch's extend rows ``q [E, hq, d]``, its KV buffers (fresh K/V of every extend row
        in the requests' own slots) and ``v_source``, the buffer the reused tokens' cached V comes from.
        Without full layers (``first_k``, ``none``) call it with no arguments. With a fixed budget every
        request's count of rows is known at plan time, so nothing reads back to the host; an adaptive
        budget (``config.coverage``) reads the counts back once.
        """
        d, selection = self._dev, self.config.selection
        score = None
        if selection in SIGNAL_SELECTIONS and self.reused_dst.numel():
            if q is None or k_buffer is None or v_buffer is None or v_source is None or scale is None:
                raise ValueError(f"selection {selection!r} scores at a full layer: pass its q and KV")
            if selection in ("sparse_q", "kv_deviation"):
                src = d["r_src"].long()
                score = (v_buffer[self.reused_dst].float() - v_source[src].float()).norm(dim=(-2, -1))
            if selection in MASS_SELECTIONS:
                if self.config.mass_pass == "threshold":
                    self.observe(q, k_buffer, v_buffer, scale)
                mass = self._mass_sum
                if mass is None:
                    raise ValueError("mass_pass 'lookahead' needs the look-ahead pass's mass (observe_new) first")
                score = mass if score is None else torch.cat(
                    [sparse_q_signal(mass[a:b], score[a:b], self.config.mass_prior)
                     for a, b in itertools.pairwise(self.key_offsets)])
            assert score is not None
            score = torch.where(d["r_forced"].bool(), torch.full_like(score, float("inf")), score)
        elif selection == "first_k":
            score = d["first_k"]
        if score is not None and self.config.coverage > 0:
            self._set_budgets(self._covering_budgets(score))
        chosen = self._top(score)
        rows_req = d["rows_req"].long()
        keys = torch.cat([d["new_req"].long() * self._stride + d["new_pos"].long(),
                          d["sel_req"].long() * self._stride + d["r_pos"].long()[chosen]])
        positions = torch.sort(keys).values - rows_req * self._stride
        tiles = d.get("rows_tiles")
        if tiles is not None:
            tiles = self._attention.heaviest_first(tiles, positions, self.group)
        self.rows = self._layout(positions.to(torch.int32), self.row_offsets, tiles)
        self.rows_index = d["req_base"].long()[rows_req] + positions
        self.rows_slot = self.req_to_token[d["req_pool"].long()[rows_req], positions].long()
        picked = torch.zeros(self.reused_dst.numel(), dtype=torch.bool, device=self.device)
        picked[chosen] = True
        kept_pos = torch.where(picked, d["req_len"].long()[d["r_req"].long()], d["r_pos"].long())
        self.exact_len = d["req_len"].long().scatter_reduce(0, d["r_req"].long(), kept_pos, "amin")

    def _covering_budgets(self, score: torch.Tensor) -> list[int]:
        """Per request: its forced tokens plus the fewest top scored tokens covering ``config.coverage`` of
        its total signal, at most its fixed budget (one read back to the host)."""
        d = self._dev
        b, max_r = self._padded_shape
        finite = torch.zeros(b * max_r, dtype=torch.float64, device=self.device)
        forced = d["r_forced"].bool()
        finite[d["r_pad"].long()] = torch.where(forced, 0.0, score.double())
        n_forced = torch.zeros(b, dtype=torch.int64, device=self.device).index_add_(0, d["r_req"].long(), forced.long())
        ordered = torch.sort(finite.view(b, max_r), dim=1, descending=True).values
        counts = coverage_count(ordered, self.config.coverage) + n_forced
        return [min(int(c), cap) if n else 0
                for c, cap, n in zip(counts.tolist(), self.max_budgets, self.n_reused, strict=True)]

    def _top(self, score: torch.Tensor | None) -> torch.Tensor:
        """Global reused-token indices of each request's ``budget`` highest scores (ties: earlier first)."""
        d = self._dev
        if score is None or d["sel_take"].numel() == 0:
            return torch.zeros(0, dtype=torch.long, device=self.device)
        b, max_r = self._padded_shape
        padded = torch.full((b * max_r,), float("-inf"), device=self.device)
        padded[d["r_pad"].long()] = score.float()
        order = torch.sort(padded.view(b, max_r), dim=1, descending=True, stable=True).indices
        return d["r_off"].long()[d["sel_req"].long()] + order.view(-1)[d["sel_take"].long()]

    def _mass(self, q_scored: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
              scale: float) -> torch.Tensor:
        """Attention mass per reused token from its request's scored rows ``q_scored``, in one layer: ``[R]``.
        Heads are summed, or with ``mass_heads="max"`` the largest head's mass is taken (torch ops only:
        the Triton selection kernel sums heads)."""
        d = self._dev
        layout = self._layout(d["scored_pos"], self.scored_offsets, d.get("scored_tiles"))
        _, lse = attend_rows(q_scored, k_buffer, v_buffer, self.req_to_token, layout, scale, self.kernels,
                             need_lse=True)
        assert lse is not None
        heads = self.config.mass_heads
        if self.kernels == "triton" and heads == "sum":
            return self._selection.selection_scores(
                q_scored, k_buffer, d["scored_pos"], d["scored_offsets"], lse, d["r_pos"], self.reused_dst,
                d["key_tiles"], scale)
        masses = []
        for i, ((a, b), (ka, kb)) in enumerate(zip(itertools.pairwise(self.scored_offsets),
                                                   itertools.pairwise(self.key_offsets), strict=True)):
            if kb > ka:
                k_seq = k_buffer[self._slots(i)]
                masses.append(selection_scores_ref(q_scored[a:b], k_seq, d["scored_pos"][a:b].long(), lse[a:b],
                                                   d["r_pos"][ka:kb].long(), scale, heads=heads))
        return torch.cat(masses) if masses else torch.zeros(0, device=self.device)

    # ------------------------------------------------------------------ sparse layers
    def fill_reused(self, layers: Iterable[LayerBuffers]) -> None:
        """Write the re-aligned cached K and the cached V of every reused token into its request's own slot,
        in each sparse layer's buffers (``(k_source, v_source, k_dest, v_dest)`` per layer)."""
        d = self._dev
        if self.reused_dst.numel() == 0:
            return
        src = d["r_src"].long()
        for k_src, v_src, k_dst, v_dst in layers:
            if self.kernels == "triton":
                self._realign.realign_copy(k_src, v_src, k_dst, v_dst, d["r_src"], self.reused_dst.to(torch.int32),
                                           d["r_delta"], d["cos"], d["sin"], self.rope)
            else:
                index = d["r_delta"].long()
                k_dst[self.reused_dst] = rotate_pairs(k_src[src], d["cos"][index], d["sin"][index], self.rope)
                v_dst[self.reused_dst] = v_src[src]

    def attend(self, q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, scale: float,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """One sparse layer's attention: ``q [M, hq, d]`` of the computed rows (``rows``) over the pooled
        KV (their own K/V already written) → ``[M, hq, d]``, into ``out`` when given."""
        assert self.rows is not None, "select() lays out the rows first"
        result, _ = attend_rows(q, k_buffer, v_buffer, self.req_to_token, self.rows, scale, self.kernels, out=out)
        return result

    def _layout(self, positions: torch.Tensor, offsets: list[int], tiles: torch.Tensor | None) -> RowLayout:
        d = self._dev
        return RowLayout(positions, offsets, [r.pool_index for r in self.requests],
                         [r.n_tokens for r in self.requests], d["req_pool"], d["req_len"], tiles)

    def _slots(self, i: int) -> torch.Tensor:
        """Request ``i``'s KV slots by position (``req_to_token`` row, its whole prompt)."""
        request = self.requests[i]
        return self.req_to_token[request.pool_index, : request.n_tokens].long()


def _csr(counts: Sequence[int]) -> list[int]:
    return [0, *itertools.accumulate(counts)]


def _concat(arrays: Sequence[Sequence[int] | np.ndarray]) -> np.ndarray:
    parts = [np.asarray(a) for a in arrays]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)
