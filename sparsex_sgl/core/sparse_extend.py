"""One batch's sparse extend (SparseX steps 5 and 6), shaped like a FlashInfer wrapper.

- ``SparseExtendPlan.build`` does every piece of host work of a batch once (which rows are new and which
  reused, where each reused token's cached KV sits and where it goes, the rotation table of the position
  deltas, each request's budget, the kernels' work tiles) and copies it to the device in one transfer.
  The plan is frozen: nothing fills it in later.
- After the full layers, the caller computes what the policy reads (``plan.deviation``, ``plan.mass``) and
  ``select(plan, ...)`` returns the frozen ``SparseRows``: the rows every sparse layer computes (new rows
  plus each request's top reused tokens), their slots and each request's exact length. Nothing reads back
  to the host unless the budget is adaptive (one read of the counts).
- ``plan.fill_reused`` writes the re-aligned cached K and the cached V of every reused token into the
  request's own slots, for every sparse layer, once; ``plan.run`` is one sparse layer's attention.

The SGLang adapter runs it over SGLang's KV pool and the reference executor over its own pool-shaped
buffers, so both compute the same numbers, on the op set chosen at start-up (``ops``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from sparsex_sgl.core.config import SelectionConfig
from sparsex_sgl.core.graph import ReusedSegment
from sparsex_sgl.core.ops import KeyLayout, OpSet, RowLayout
from sparsex_sgl.core.rope import RopeConfig, delta_rotation_table
from sparsex_sgl.core.selection import POLICIES, Policy, ScoreInputs, covering_counts, recompute_budget

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
class ReusedTable:
    """Every reused token of a batch, request after request, segment after segment (device tensors ``[R]``).

    ``keys``: their positions, their own (destination) slots and the work tiles of the mass; ``src_slots``:
    where their cached KV sits; ``request``: their request's index; ``starts [B]``: each request's first
    token (``indptr[:-1]``); ``padded``: their index in a
    ``[B, max_reused]`` request-by-token grid (top-k runs per row of it); ``offset`` / ``moved``: position
    in the segment and whether the segment moved; ``delta_index`` rows of ``cos, sin [deltas, rotary/2]``."""

    keys: KeyLayout
    src_slots: torch.Tensor
    request: torch.Tensor
    starts: torch.Tensor
    padded: torch.Tensor
    offset: torch.Tensor
    moved: torch.Tensor
    delta_index: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor

    @property
    def indptr(self) -> Sequence[int]:
        return self.keys.indptr


@dataclass(frozen=True)
class BudgetLayout:
    """What follows from each request's count of recomputed tokens ``budgets``: the top-k picks ``take [K]``
    (indices into the padded grid) and their requests ``take_request [K]``, the rows' requests
    ``rows_request [M]``, the rows' CSR ``rows_indptr`` (host; ``rows_indptr_dev`` on the device) and the
    attention tiles ``rows_tiles``."""

    budgets: tuple[int, ...]
    computed: tuple[int, ...]
    take: torch.Tensor
    take_request: torch.Tensor
    rows_request: torch.Tensor
    rows_indptr: tuple[int, ...]
    rows_indptr_dev: torch.Tensor
    rows_tiles: torch.Tensor | None


@dataclass(frozen=True)
class SparseRows:
    """The rows the sparse layers of a batch compute, chosen by ``select`` (frozen, on the device).

    ``layout``: their positions, CSR by request (request i's rows ``layout.indptr[i]:[i+1]``, sorted);
    ``index [M]``: each row's index in the batch's extend layout (the residual stream's rows);
    ``slots [M]``: the KV slot its fresh K/V goes to; ``exact_len [B]``: per request, how many leading
    positions hold KV equal to a full prefill's; ``recomputed`` / ``computed``: per request, reused tokens
    recomputed and rows computed (host)."""

    layout: RowLayout
    index: torch.Tensor
    slots: torch.Tensor
    exact_len: torch.Tensor
    recomputed: tuple[int, ...]
    computed: tuple[int, ...]


ShardReduce = Callable[[torch.Tensor, Literal["sum", "max"]], torch.Tensor]
"""The sum or the max of a tensor over the ranks of a tensor-parallel group, returned on every rank. Each
rank holds a share of the heads, so a signal computed per rank would rank tokens differently on each and the
ranks would recompute different rows (the MLP and the output all-reduce mix rows). The plan reduces the
per-head parts of its signals before any ranking: the squared value deviation and the mass summed over heads
(``sum``), or the per-head maximum (``max``); every rank then scores, budgets and picks the same rows."""


@dataclass(frozen=True, eq=False)
class SparseExtendPlan:
    """The sparse extend of one batch; see the module docstring for the call order. Build with ``build``.

    Per request (device ``[B]``): ``req_pool`` (its ``req_to_token`` row), ``req_base`` (``extend_start -
    prefix_len``: row index = position + base), ``req_len`` (prompt length). Per new row (device ``[N]``,
    CSR ``new_indptr``): ``new_positions``, ``new_request``, ``new_index`` (row in the extend layout).
    ``scored``: the rows whose attention mass scores a request's reused tokens (``config.mass_rows``), and
    ``scored_in_new [S]`` their index among the new rows. Per request (host): ``candidates``, the reused
    tokens its policy may take, and ``max_budgets``, its budget at its ratio; ``fixed`` is the budget layout
    of those, which ``select`` uses unless the budget is adaptive. ``shards``: how a tensor-parallel rank
    agrees its signals with the others (None: one rank holds every head).
    """

    requests: tuple[ExtendRequest, ...]
    config: SelectionConfig
    policy: Policy
    rope: RopeConfig
    ops: OpSet
    req_to_token: torch.Tensor
    group: int
    req_pool: torch.Tensor
    req_base: torch.Tensor
    req_len: torch.Tensor
    new_indptr: tuple[int, ...]
    new_positions: torch.Tensor
    new_request: torch.Tensor
    new_index: torch.Tensor
    scored: RowLayout
    scored_in_new: torch.Tensor
    reused: ReusedTable
    max_reused: int
    candidates: tuple[int, ...]
    max_budgets: tuple[int, ...]
    fixed: BudgetLayout
    shards: ShardReduce | None = None

    @classmethod
    def build(cls, requests: Sequence[ExtendRequest], config: SelectionConfig, rope: RopeConfig,
              req_to_token: torch.Tensor, num_q_heads: int, num_kv_heads: int, ops: OpSet,
              shards: ShardReduce | None = None) -> SparseExtendPlan:
        """The plan of ``requests`` over ``req_to_token [rows, max_len]`` (on the KV's device); the head
        counts (this rank's) fix the GQA packing of the kernels' tiles; ``shards`` when the heads are split
        across tensor-parallel ranks."""
        reqs = tuple(requests)
        device = req_to_token.device
        group = num_q_heads // num_kv_heads
        policy = POLICIES[config.selection]
        segments = [list(r.reused) for r in reqs]
        n_reused = [sum(s.length for s in segs) for segs in segments]
        movable = [sum(s.length for s in segs if s.delta != 0) for segs in segments]
        candidates = tuple(policy.n_candidates(n, m) for n, m in zip(n_reused, movable, strict=True))
        max_budgets = tuple(recompute_budget(n, r.recompute_ratio, c)
                            for r, n, c in zip(reqs, n_reused, candidates, strict=True))
        key_indptr = _indptr(n_reused)
        scored_rows = [_scored_rows(r, config) if n else [] for r, n in zip(reqs, n_reused, strict=True)]
        scored_indptr = _indptr([len(rows) for rows in scored_rows])
        new_indptr = _indptr([len(r.new_rows) for r in reqs])
        max_reused = max(n_reused, default=0)

        up = _Upload()
        up.add("req_pool", np.array([r.pool_index for r in reqs]))
        up.add("req_base", np.array([r.extend_start - r.prefix_len for r in reqs]))
        up.add("req_len", np.array([r.n_tokens for r in reqs]))
        up.add("new_positions", _concat([r.new_rows for r in reqs]))
        up.add("new_request", np.repeat(np.arange(len(reqs)), [len(r.new_rows) for r in reqs]))
        up.add("new_index", _concat([np.asarray(r.new_rows, np.int64) - r.prefix_len + r.extend_start for r in reqs]))
        up.add("scored_positions", _concat(scored_rows))
        up.add("scored_in_new", _concat([np.searchsorted(np.asarray(r.new_rows), rows) + base
                                         for r, rows, base in zip(reqs, scored_rows, new_indptr[:-1], strict=True)]))
        up.add("scored_indptr", np.array(scored_indptr))
        up.add("key_positions", _concat([np.arange(s.target_start, s.target_start + s.length)
                                         for segs in segments for s in segs]))
        up.add("src_slots", _concat([np.asarray(s.slots) for segs in segments for s in segs]))
        deltas = torch.as_tensor(_concat([np.full(s.length, s.delta) for segs in segments for s in segs]))
        cos, sin, delta_index = delta_rotation_table(deltas, rope)
        up.add("delta_index", delta_index.numpy())
        up.add("cos", cos.numpy().reshape(-1, cos.shape[-1]) if cos.numel() else np.zeros((0, 1), np.float32))
        up.add("sin", sin.numpy().reshape(-1, sin.shape[-1]) if sin.numel() else np.zeros((0, 1), np.float32))
        up.add("key_request", np.repeat(np.arange(len(reqs)), n_reused))
        up.add("key_starts", np.array(key_indptr[:-1]))
        up.add("padded", _concat([b * max_reused + np.arange(n) for b, n in enumerate(n_reused)]))
        up.add("offset", _concat([np.arange(s.length) for segs in segments for s in segs]))
        up.add("moved", _concat([np.full(s.length, s.delta != 0) for segs in segments for s in segs]).astype(bool))
        scored_tiles = ops.row_tiles(scored_indptr, group)
        if scored_tiles is not None:
            up.add("scored_tiles", scored_tiles)
        key_tiles = ops.key_tiles(key_indptr)
        if key_tiles is not None:
            up.add("key_tiles", key_tiles)
        d = up.to(device)
        pool_index = [r.pool_index for r in reqs]
        seq_len = [r.n_tokens for r in reqs]
        scored = RowLayout(d["scored_positions"], scored_indptr, pool_index, seq_len, d["req_pool"], d["req_len"],
                           d["scored_indptr"], d.get("scored_tiles"))
        dst_slots = req_to_token[d["req_pool"][d["key_request"]].long(), d["key_positions"].long()].long()
        reused = ReusedTable(KeyLayout(d["key_positions"], dst_slots, key_indptr, d.get("key_tiles")), d["src_slots"],
                             d["key_request"], d["key_starts"], d["padded"], d["offset"], d["moved"].bool(),
                             d["delta_index"], d["cos"], d["sin"])
        fixed = _budget_layout(max_budgets, reqs, max_reused, ops, group, device)
        return cls(reqs, config, policy, rope, ops, req_to_token, group, d["req_pool"], d["req_base"], d["req_len"],
                   tuple(new_indptr), d["new_positions"], d["new_request"], d["new_index"], scored,
                   d["scored_in_new"], reused, max_reused, candidates, max_budgets, fixed, shards)

    @property
    def n_reused(self) -> tuple[int, ...]:
        """Reused tokens per request."""
        return tuple(b - a for a, b in itertools.pairwise(self.reused.indptr))

    # ------------------------------------------------------------------ what the policies read
    def deviation(self, v_fresh: torch.Tensor, v_cached: torch.Tensor) -> torch.Tensor:
        """Per reused token ``[R]``: the distance between its fresh value (``v_fresh`` at its own slot, one full
        layer's buffer) and its cached value (``v_cached`` at its source slot, the same layer)."""
        fresh = v_fresh[self.reused.keys.slots].float()
        diff = fresh - v_cached[self.reused.src_slots.long()].float()
        if self.shards is None:
            return diff.norm(dim=(-2, -1))
        return self.shards(diff.square().sum(dim=(-2, -1)), "sum").sqrt()

    def mass(self, q_new: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, scale: float) -> torch.Tensor:
        """One layer's attention mass per reused token ``[R]`` from the scored rows, given the layer's rotated
        queries of the batch's new rows ``q_new [N, hq, d]`` (``q_extend[plan.new_index]``) and its KV buffers
        (the fresh K/V of every row it computed already written)."""
        q_scored = q_new[self.scored_in_new.long()].contiguous()
        _, lse = self.ops.attend(q_scored, k_buffer, v_buffer, self.req_to_token, self.scored, scale, need_lse=True)
        assert lse is not None
        mass = self.ops.key_mass(q_scored, k_buffer, self.req_to_token, self.scored, lse, self.reused.keys, scale,
                                 self.config.mass_heads)
        if self.shards is None:
            return mass
        return self.shards(mass, self._mass_reduce)

    @property
    def _mass_reduce(self) -> Literal["sum", "max"]:
        """How the ranks combine their heads' mass: as the config combines heads within one rank."""
        return "max" if self.config.mass_heads == "max" else "sum"

    def absent(self, signal: Literal["deviation", "mass"]) -> torch.Tensor:
        """A sharded plan's signal with nothing from this rank (its own part could not be computed): the
        rank still joins the reduce the others are in, so every rank gets the same tensor and no rank waits
        for one that never comes; the batch then falls back on every rank (``agreement``)."""
        assert self.shards is not None, "only a tensor-parallel rank has others to reduce with"
        zeros = torch.zeros(self.reused.src_slots.numel(), dtype=torch.float32, device=self.req_to_token.device)
        if signal == "deviation":
            return self.shards(zeros, "sum").sqrt()
        return self.shards(zeros, self._mass_reduce)

    # ------------------------------------------------------------------ sparse layers
    def fill_reused(self, layers: Iterable[LayerBuffers]) -> None:
        """Write the re-aligned cached K and the cached V of every reused token into its request's own slot,
        in each sparse layer's buffers (``(k_source, v_source, k_dest, v_dest)`` per layer)."""
        table = self.reused
        if table.src_slots.numel() == 0:
            return
        for k_src, v_src, k_dst, v_dst in layers:
            self.ops.realign(k_src, v_src, k_dst, v_dst, table.src_slots, table.keys.slots, table.delta_index,
                             table.cos, table.sin, self.rope)

    def run(self, rows: SparseRows, q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, scale: float,
            out: torch.Tensor | None = None) -> torch.Tensor:
        """One sparse layer's attention: ``q [M, hq, d]`` of ``rows`` over the pooled KV (their own K/V already
        written) -> ``[M, hq, d]``, into ``out`` when given."""
        result, _ = self.ops.attend(q, k_buffer, v_buffer, self.req_to_token, rows.layout, scale, out=out)
        return result


def select(plan: SparseExtendPlan, deviation: torch.Tensor | None = None,
           mass: torch.Tensor | None = None) -> SparseRows:
    """Each request's recompute set: its new rows plus its top reused tokens by the policy's score.

    ``deviation`` and ``mass`` (``[R]``, from ``plan.deviation`` / summed ``plan.mass``) are what the policy
    reads; without reused tokens nothing is read. Scored policies rank each moved segment's first
    ``min_tokens_per_segment`` tokens ahead of all others; ties go to the earlier token (stable sort)."""
    policy, table, config = plan.policy, plan.reused, plan.config
    score = None
    if table.src_slots.numel():
        if (policy.reads_deviation and deviation is None) or (policy.reads_mass and mass is None):
            raise ValueError(f"selection {policy.name!r} reads the last full layer's deviation and/or the new rows' "
                         "mass: pass what it reads")
        score = policy.score(ScoreInputs(table.indptr, table.offset, table.moved, deviation, mass, config.mass_prior))
    forced = table.moved & (table.offset < config.min_tokens_per_segment)
    if score is not None and policy.scored:
        score = torch.where(forced, torch.full_like(score, float("inf")), score)
    layout = plan.fixed
    if score is not None and policy.scored and config.coverage > 0:
        budgets = _covering_budgets(plan, score, forced)
        layout = _budget_layout(budgets, plan.requests, plan.max_reused, plan.ops, plan.group, plan.req_pool.device)
    chosen = _top(plan, score, layout)
    stride = max((r.n_tokens for r in plan.requests), default=0) + 1
    keys = torch.cat([plan.new_request.long() * stride + plan.new_positions.long(),
                      layout.take_request.long() * stride + table.keys.positions.long()[chosen]])
    rows_request = layout.rows_request.long()
    positions = torch.sort(keys).values - rows_request * stride
    tiles = plan.ops.order_tiles(layout.rows_tiles, positions, plan.group)
    rows = RowLayout(positions.to(torch.int32), layout.rows_indptr, plan.scored.pool_index, plan.scored.seq_len,
                     plan.req_pool, plan.req_len, layout.rows_indptr_dev, tiles)
    index = plan.req_base.long()[rows_request] + positions
    slots = plan.req_to_token[plan.req_pool.long()[rows_request], positions].long()
    picked = torch.zeros(table.src_slots.numel(), dtype=torch.bool, device=positions.device)
    picked[chosen] = True
    request, req_len = table.request.long(), plan.req_len.long()
    kept = torch.where(picked, req_len[request], table.keys.positions.long())
    exact_len = req_len.scatter_reduce(0, request, kept, "amin")
    return SparseRows(rows, index, slots, exact_len, layout.budgets, layout.computed)


def _top(plan: SparseExtendPlan, score: torch.Tensor | None, layout: BudgetLayout) -> torch.Tensor:
    """Global reused-token indices of each request's ``budget`` highest scores (ties: earlier first)."""
    device = plan.req_pool.device
    if score is None or layout.take.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    b, width = len(plan.requests), plan.max_reused
    padded = torch.full((b * width,), float("-inf"), device=device)
    padded[plan.reused.padded.long()] = score.float()
    order = torch.sort(padded.view(b, width), dim=1, descending=True, stable=True).indices
    return plan.reused.starts.long()[layout.take_request.long()] + order.view(-1)[layout.take.long()]


def _covering_budgets(plan: SparseExtendPlan, score: torch.Tensor, forced: torch.Tensor) -> tuple[int, ...]:
    """Per request: its forced tokens plus the fewest top scored tokens covering ``config.coverage`` of its
    total signal, within its fixed budget (``recompute_budget``; one read back to the host)."""
    table, device = plan.reused, plan.req_pool.device
    b, width = len(plan.requests), plan.max_reused
    finite = torch.zeros(b * width, dtype=torch.float64, device=device)
    finite[table.padded.long()] = torch.where(forced, 0.0, score.double())
    n_forced = torch.zeros(b, dtype=torch.int64, device=device).index_add_(0, table.request.long(), forced.long())
    ordered = torch.sort(finite.view(b, width), dim=1, descending=True).values
    counts = covering_counts(ordered, plan.config.coverage) + n_forced
    return tuple(recompute_budget(n, r.recompute_ratio, candidates, covering=int(c)) if n else 0
                 for r, n, candidates, c in zip(plan.requests, plan.n_reused, plan.candidates, counts.tolist(),
                                                strict=True))


def _budget_layout(budgets: Sequence[int], requests: Sequence[ExtendRequest], max_reused: int, ops: OpSet,
                   group: int, device: torch.device) -> BudgetLayout:
    """Lay out what depends on the number of tokens each request recomputes (one small upload)."""
    computed = [len(r.new_rows) + b for r, b in zip(requests, budgets, strict=True)]
    rows_indptr = _indptr(computed)
    up = _Upload()
    up.add("take", _concat([b * max_reused + np.arange(k) for b, k in enumerate(budgets)]))
    up.add("take_request", np.repeat(np.arange(len(requests)), budgets))
    up.add("rows_request", np.repeat(np.arange(len(requests)), computed))
    up.add("rows_indptr", np.array(rows_indptr))
    tiles = ops.row_tiles(rows_indptr, group)
    if tiles is not None:
        up.add("rows_tiles", tiles)
    d = up.to(device)
    return BudgetLayout(tuple(budgets), tuple(computed), d["take"], d["take_request"], d["rows_request"],
                        tuple(rows_indptr), d["rows_indptr"], d.get("rows_tiles"))


def _scored_rows(request: ExtendRequest, config: SelectionConfig) -> Sequence[int]:
    """The rows whose attention mass scores the request's reused tokens: its new rows, or with
    ``mass_rows="answer"`` those after its last reused token (the question and the generation prompt)."""
    if config.mass_rows == "new":
        return request.new_rows
    last_reused = max(s.target_start + s.length for s in request.reused)
    return [p for p in request.new_rows if p >= last_reused]


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


def _indptr(counts: Sequence[int]) -> list[int]:
    return [0, *itertools.accumulate(counts)]


def _concat(arrays: Sequence[Sequence[int] | np.ndarray]) -> np.ndarray:
    parts = [np.asarray(a) for a in arrays]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)
