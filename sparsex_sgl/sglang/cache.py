"""``SegmentGraphCache``: the ``sparsex`` radix-cache backend of SGLang 0.5.23.

It keeps SGLang's contract for an ordinary prefix cache (exact prefix hits reported as ``cached_tokens``,
lock accounting, eviction under memory pressure, duplicate slots freed at ``checkpoint``) on top of the
engine-free ``SegmentGraph``, whose slots are SGLang's own KV-pool slots. What it adds is the *match*: for a
request that marks segments, ``match_prefix`` also finds the segments cached at other positions; the model
hook (``model_hook.py``) fills and recomputes them in the extend step, since SGLang's scheduler can only
place reused KV at the front of a request. Every SGLang internal it touches goes through ``compat``.

A request that reused segments without recomputing them all has KV equal to a full prefill's up to its
first approximate position (``SparseRows.exact_len``); its prompt is cached exact up to there and blended
after. Blended prefix hits go only to requests that mark segments and may be approximated: a request
without segments, or one that needs exact prefill (logprobs, ...), gets the exact part only.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from sparsex_sgl.core.agreement import Gather, Verdict, available_everywhere, vote
from sparsex_sgl.core.errors import InvalidSegmentsError, SegmentHashCollisionError
from sparsex_sgl.core.graph import (
    EvictedSegment,
    InsertResult,
    NodeId,
    SegmentGraph,
    segments_it_caches,
    segments_it_computes,
)
from sparsex_sgl.core.protocol import NAMESPACE_KEY, RATIO_KEY, SPANS_KEY, parse_ratio, parse_spans
from sparsex_sgl.core.request import GAP_BLOCK, Match, RequestOutcome, RequestState
from sparsex_sgl.core.segments import (
    NamespaceKey,
    Piece,
    SegmentHash,
    auto_spans,
    cut_gap,
    make_piece,
    namespace_key,
    split_into_pieces,
    validate_spans,
)
from sparsex_sgl.sglang import compat
from sparsex_sgl.sglang.compat import (
    BasePrefixCache,
    CacheRequestHandle,
    DecLockRefParams,
    DecLockRefResult,
    EvictParams,
    EvictResult,
    IncLockRefResult,
    MatchPrefixParams,
    MatchResult,
)
from sparsex_sgl.sglang.metrics import PrometheusExport
from sparsex_sgl.sglang.runtime import SchedulerRuntime
from sparsex_sgl.sglang.tiers import PoolTiers

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import Req

logger = logging.getLogger("sparsex_sgl")


@dataclass(frozen=True, eq=False)
class MatchHandle:
    """What SGLang holds as ``req.last_node``: the graph nodes to lock and the prefix's slots. Two handles
    are equal when they name the same nodes (SGLang's policies use handles as dict keys)."""

    node_ids: tuple[NodeId, ...] = ()
    prefix_slots: torch.Tensor | None = None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MatchHandle) and self.node_ids == other.node_ids

    def __hash__(self) -> int:
        return hash(self.node_ids)


@dataclass
class _MatchVotes:
    """The votes of one match, cast in the same order on every rank and every path (a failure included):
    the segments read from the tiers (when there are tiers), then the match itself."""

    gather: Gather | None
    with_loads: bool
    loads_cast: bool = False

    def available(self, found: Sequence[tuple[SegmentHash, bool]]) -> set[Any]:
        self.loads_cast = True
        return available_everywhere(self.gather, found)

    def close(self, match: Match | None, failure: str) -> Verdict:
        if self.gather is None:
            return Verdict(failure)
        if self.with_loads and not self.loads_cast:
            self.available([])
        lookup = None if match is None else match.lookup
        ballot = None if lookup is None or match is None else (
            lookup.n_tokens, lookup.prefix_len, lookup.exact_prefix_len, match.recompute_ratio,
            tuple((r.source_start, r.target_start, r.length) for r in lookup.reused))
        return vote(self.gather, "match", ballot, failure)


class _PoolAllocator:
    """SGLang's token allocator seen as the graph's ``SlotAllocator`` (lists of ints <-> int64 tensors)."""

    def __init__(self, allocator: Any, device: torch.device) -> None:
        self._allocator = allocator
        self._device = device

    def alloc(self, n: int) -> list[int] | None:
        slots = self._allocator.alloc(n)
        return None if slots is None else list(slots.tolist())

    def free(self, slots: Sequence[int]) -> None:
        if slots:
            self._allocator.free(torch.tensor(list(slots), dtype=torch.int64, device=self._device))


class SegmentGraphCache(BasePrefixCache):
    """Prefix cache plus segment reuse over SGLang's KV pool."""

    def __init__(self, params: Any, runtime: SchedulerRuntime, device: torch.device,
                 metrics: PrometheusExport | None = None, tiers: PoolTiers | None = None) -> None:
        self.disable = False
        self.metrics = metrics
        """The Prometheus exporter (``--enable-metrics``), synced when counters change; None: metrics off."""
        (self.req_to_token_pool, self.req_to_token, self.token_to_kv_pool_allocator, self.pool_size,
         self.page_size) = compat.cache_pools(params)
        self.device = device
        self.runtime = runtime
        self.tiers = tiers
        """The host tier and the shared store below the pool (None: segments die on eviction)."""
        self.graph = SegmentGraph(_PoolAllocator(self.token_to_kv_pool_allocator, device),
                                  max_tokens=self.pool_size, on_evict=None if tiers is None else self._spill)
        self.root_node = MatchHandle()

    # ------------------------------------------------------------------ request state
    def _open(self, req: Req) -> RequestState:
        """The SparseX state carried on ``req``, created at its first match (and open again when a retracted
        request is matched anew)."""
        state = compat.request_state(req)
        if state is None:
            state = self.runtime.open(compat.request_id(req))
            compat.set_request_state(req, state)
        else:
            self.runtime.open_requests.add(state.rid)
        return state

    def drop(self, req: Req) -> None:
        """Forget ``req``'s SparseX state entirely (a fault met while matching it: it is served as stock)."""
        self.runtime.open_requests.discard(compat.request_id(req))
        compat.set_request_state(req, None)

    # ------------------------------------------------------------------ matching
    def _segment_data(self, req: Req, n_prompt: int) -> tuple[list[tuple[int, int]], float]:
        """Spans and recompute ratio from ``custom_params``; InvalidSegmentsError if malformed. Spans shorter
        than ``min_segment_tokens`` are dropped (their tokens stay gap text: a node per few tokens would
        grow the graph and reuse almost nothing)."""
        custom = compat.custom_params(req)
        raw = custom.get(SPANS_KEY)
        spans = validate_spans(parse_spans(raw), n_prompt) if raw else []
        shortest = self.runtime.config.min_segment_tokens
        ratio = parse_ratio(custom.get(RATIO_KEY))
        return ([s for s in spans if s[1] - s[0] >= shortest],
                self.runtime.config.selection.recompute_ratio if ratio is None else ratio)

    @staticmethod
    def _namespace(req: Req) -> NamespaceKey:
        """What keys every piece a request looks up or caches (prefix gaps, segments, decoded tokens): a
        hash of SGLang's isolation fields (``extra_key``, ``cache_salt``) and the client's namespace, so
        requests share KV only when all three are equal, as stock SGLang's radix cache keys on the first
        two. Read from the request itself on every path, including fallbacks and checkpoints."""
        namespace = compat.custom_params(req).get(NAMESPACE_KEY)
        return namespace_key(*compat.request_isolation(req),
                             namespace if isinstance(namespace, str) and namespace else None)

    def _pieces(self, token_ids: Sequence[int], spans: Sequence[tuple[int, int]], key_ns: NamespaceKey) -> list[Piece]:
        """The request's pieces, with its gaps cut along the cached path (``SegmentGraph.align``)."""
        pieces = split_into_pieces(token_ids, spans, key_ns, gap_block=GAP_BLOCK)
        return self.graph.align(pieces, lambda start, end: make_piece(token_ids, start, end, key_ns, reusable=False))

    def match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        """The request's match. With tensor parallelism the ranks then vote on it (``core.agreement``): if one
        failed, or their matches differ, every rank drops it and serves the request as stock SGLang would
        from position 0, counting the same fallback."""
        votes = _MatchVotes(self.runtime.gather, with_loads=self.tiers is not None)
        failure, result = "", None
        try:
            result = self._match(params, votes)
        except Exception as exc:  # noqa: BLE001 - a SparseX bug must not stop the scheduler: serve it unshared
            self.runtime.internal_error("match_prefix", exc)
            failure = "internal_error"
        state = None if params.req is None else compat.request_state(params.req)
        verdict = votes.close(None if failure or state is None else state.matched, failure)
        if result is not None and verdict.agreed:
            return result
        if not failure:  # another rank failed, or the ranks' graphs differ: this rank falls back with them
            self.runtime.fallback(verdict.reason, f"reported by tensor-parallel rank {verdict.rank}"
                                  if verdict.rank >= 0 else "the ranks' matches differ")
        if params.req is not None:
            self.drop(params.req)
        return self._result(MatchHandle(), 0)

    def _match(self, params: MatchPrefixParams, votes: _MatchVotes) -> MatchResult:
        req = params.req
        limit = len(params.key)
        if req is None or limit == 0:
            return self._result(MatchHandle(), 0)
        state = self._open(req)
        token_ids, n_prompt = compat.request_tokens(req)
        try:
            spans, ratio = self._segment_data(req, n_prompt)
        except InvalidSegmentsError as exc:
            self.runtime.fallback("invalid_segments", str(exc))
            spans, ratio = [], self.runtime.config.selection.recompute_ratio
        reason = self._no_reuse_reason(req, state.reuse_refused)
        key_ns = self._namespace(req)
        auto_segmented = False
        try:
            pieces = self._pieces(token_ids, spans, key_ns)
            if not spans and not reason and self.runtime.config.auto_segment_tokens:
                spans = self._auto_spans(token_ids[:n_prompt], pieces)
                auto_segmented = bool(spans)
                if spans:
                    pieces = self._pieces(token_ids, spans, key_ns)
            if spans and not reason and self.tiers is not None:
                state.loaded += self.tiers.load(self.graph, pieces, votes.available)
            lookup = self.graph.lookup(pieces)
        except SegmentHashCollisionError as exc:
            self.runtime.fallback("hash_collision", str(exc))
            state.matched = state.outcome = None
            return self._result(MatchHandle(), 0)
        if lookup.reused and not reason and self._too_long_for_one_step(lookup.n_tokens - lookup.prefix_len):
            reason = "extend_longer_than_chunks"
        fallback = reason if lookup.reused and reason else ""
        if fallback:
            self.runtime.fallback(fallback)
        if reason or not spans or auto_segmented or ratio >= 1.0:
            limit = min(limit, lookup.exact_prefix_len)  # blended KV only where the client accepts approximation
        if (lookup.reused and (reason or len(token_ids) != n_prompt)) or lookup.prefix_len > limit:
            lookup = self.graph.prefix_only(lookup, min(lookup.prefix_len, limit))
        state.matched = Match(lookup, tuple(pieces), tuple(spans), ratio, segments_it_caches(pieces, lookup),
                              segments_it_computes(pieces, lookup), auto_segmented)
        n = lookup.n_tokens
        outcome = RequestOutcome(prompt=n, prefix=lookup.prefix_len,
                                 blended_prefix=lookup.prefix_len - lookup.exact_prefix_len,
                                 computed=n - lookup.prefix_len, loaded=state.loaded, fallback=fallback)
        outcome.exact_len = outcome.exact_bound
        state.outcome = outcome  # the model hook fills it in; the checkpoint and the meta_info hook read it
        node_ids = lookup.prefix_node_ids[-1:] + tuple(r.node_id for r in lookup.reused)
        slots = torch.tensor(lookup.prefix_slots, dtype=torch.int64, device=self.device)
        return self._result(MatchHandle(node_ids, slots), lookup.prefix_len)

    def _auto_spans(self, prompt_ids: Sequence[int], pieces: Sequence[Piece]) -> list[tuple[int, int]]:
        """Content-defined segments (``segments.auto_spans``) that start after the request's prefix hit,
        which stays exact and follows the cached cuts (a chat's reply included)."""
        hit = self.graph.cached_path_length(pieces)
        return [s for s in auto_spans(prompt_ids, self.runtime.config.auto_segment_tokens) if s[0] >= hit]

    def _too_long_for_one_step(self, extend: int) -> bool:
        """A reuse prefill runs its extend in one step (plugin ``_admit``); past ``max_extend_tokens`` the
        request is chunked as on stock SGLang, with exact prefix reuse."""
        limit = self.runtime.max_extend_tokens
        return limit is not None and extend > limit

    def _no_reuse_reason(self, req: Req, reuse_refused: bool) -> str:
        if self.runtime.disabled_kind:
            return self.runtime.disabled_kind
        if reuse_refused:
            return "no_room_for_reuse"
        return compat.exactness_needs(req)

    @staticmethod
    def _result(handle: MatchHandle, prefix_len: int) -> MatchResult:
        return MatchResult(device_prefix_len=prefix_len, last_device_node=handle, last_host_node=handle,
                           best_match_node=handle)

    def dfs_weight_order(self, node_handles: Sequence[object]) -> list[int]:
        """``--schedule-policy dfs-weight``: requests that end their prefix hit on the same node run
        together, the largest groups first, in arrival order otherwise. (SGLang's walk from the root node
        would reach none of our handles, which hang in no tree, and drop every request from the queue.)"""
        keys = [h.node_ids[:1] if isinstance(h, MatchHandle) else () for h in node_handles]
        weight = Counter(keys)
        first = {key: index for index, key in reversed(list(enumerate(keys)))}
        return sorted(range(len(keys)), key=lambda i: (-weight[keys[i]] if keys[i] else 0, first[keys[i]], i))

    def path_device_indices(self, node: MatchHandle) -> torch.Tensor:
        if node.prefix_slots is None:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        return node.prefix_slots

    # ------------------------------------------------------------------ locks
    def inc_lock_ref(self, node: MatchHandle) -> IncLockRefResult:
        before = self.graph.protected_tokens
        self.graph.lock(node.node_ids)
        return IncLockRefResult(delta=before - self.graph.protected_tokens)

    def dec_lock_ref(self, node: MatchHandle, params: DecLockRefParams | None = None) -> DecLockRefResult:
        before = self.graph.protected_tokens
        self.graph.unlock(node.node_ids)
        return DecLockRefResult(delta=before - self.graph.protected_tokens)

    # ------------------------------------------------------------------ caching a request
    def checkpoint(self, req: Req, *, up_to: int, **kwargs: object) -> None:
        """Cache the request's KV up to ``up_to``. A failure is counted and the scheduler goes on; whatever
        it interrupted, each slot of the row is owned by the graph or by the request, never by both."""
        try:
            self._checkpoint(req, up_to)
        except Exception as exc:  # noqa: BLE001 - logged and counted by internal_error
            self.runtime.internal_error("checkpoint", exc)

    def _checkpoint(self, req: Req, up_to: int) -> None:
        token_ids = compat.fill_ids(req, up_to)
        if not token_ids:
            return
        state = compat.request_state(req)
        match = None if state is None else state.matched
        outcome = None if state is None else state.outcome
        if outcome is not None:
            outcome.settle()
        if state is not None and up_to >= compat.request_tokens(req)[1]:
            state.landed()  # its whole prompt is cached now (a chunk's checkpoint is not enough)
        pieces = self._cut_to_cache(req, token_ids, match)
        if not pieces:
            return
        # Decoded tokens attend to the prompt's KV: exact after an exact prompt, blended otherwise.
        exact_len = None if outcome is None or outcome.exact_len >= outcome.prompt else outcome.exact_len
        row = compat.request_row(req, self.req_to_token)
        row_slots = row[: pieces[-1].end].tolist()
        result: InsertResult | None = None
        try:
            result = self.graph.insert(pieces, row_slots, exact_len)
        finally:  # even if the insert failed midway: it may have adopted some of the row's slots
            placed = self._take_over(req, row, row_slots, self.graph.placed_path(pieces, result))
            if placed is not None:  # the request runs on: what the tree now owns stays locked for it
                compat.move_lock(req, self, MatchHandle((placed,)))
        if result is not None and result.collision:
            self.runtime.uncached_collision()
        if result is not None and self.tiers is not None:
            self.tiers.keep(self.graph, pieces, result)

    def _spill(self, evicted: EvictedSegment) -> None:
        """The graph evicts an exact segment: the tiers keep it. A failure costs only that segment."""
        assert self.tiers is not None
        try:
            self.tiers.spill(evicted)
        except Exception as exc:  # noqa: BLE001 - logged and counted by internal_error
            self.runtime.internal_error("spill", exc)

    def _take_over(self, req: Req, row: torch.Tensor, row_slots: Sequence[int],
                   path: tuple[list[int], NodeId | None]) -> NodeId | None:
        """Make the graph the owner of the row's positions its path now holds (``graph_slots``, from 0):
        first the protected length moves past them, since SGLang's release frees the row past it (a slot
        the graph adopted must never be freed by the request too); then, where the graph held a piece
        already, the row is pointed at the graph's copy and the request's own copy freed (a failure there
        leaks those copies, it never double-owns one). Returns the last node of the path, None if the
        path does not reach past what the tree owned already."""
        graph_slots, last_node = path
        end, protected = len(graph_slots), compat.protected_len(req)
        if last_node is None or end < protected:
            return None
        compat.protect(req, end)
        duplicates = [pos for pos in range(protected, end) if row_slots[pos] != graph_slots[pos]]
        if duplicates:
            where = torch.tensor(duplicates, dtype=torch.int64, device=row.device)
            own = row[where].clone()
            row[where] = torch.tensor([graph_slots[pos] for pos in duplicates], dtype=row.dtype, device=row.device)
            self.token_to_kv_pool_allocator.free(own)
        return last_node

    def _cut_to_cache(self, req: Req, token_ids: list[int], match: Match | None) -> list[Piece]:
        """The pieces to cache: the prompt along the cut it was matched with (its prefix nodes, locked since
        then, are on it whatever was cached meanwhile), then the decoded tokens in blocks counted from the
        prompt's end (where the prompt's last block may have been cut short). Every checkpoint of a request
        cuts the same way, so no two of its nodes hold one slot."""
        key_ns = self._namespace(req)
        if match is not None:
            matched, n_prompt = list(match.pieces), match.lookup.n_tokens
        else:  # matched without the graph (nothing to match): the plain cut of the prompt
            n_prompt = compat.request_tokens(req)[1]
            matched = split_into_pieces(token_ids[:n_prompt], [], key_ns, gap_block=GAP_BLOCK)
        prompt = [p for p in matched if p.end <= len(token_ids)]
        end = prompt[-1].end if prompt else 0
        if end < n_prompt:  # a partial checkpoint: the next one continues the matched cut
            return prompt
        return prompt + cut_gap(token_ids, end, len(token_ids), key_ns, GAP_BLOCK)

    def on_release(self, req: Req, *, checkpointed: bool) -> None:
        state = compat.request_state(req)
        match = None if state is None else state.matched
        outcome = None if state is None else state.outcome
        self.runtime.close(compat.request_id(req), state)
        try:
            if outcome is not None:
                outcome.settle()
                self.runtime.record(outcome, had_segments=bool(match and match.spans),
                                    auto_segmented=bool(match and match.auto_segmented))
                logger.debug("SparseX request %s: %s", compat.request_id(req), outcome)
                self._sync_metrics()
        except Exception as exc:  # noqa: BLE001 - logged and counted by internal_error
            self.runtime.internal_error("on_release", exc)

    def release_aborted_request(self, handle: CacheRequestHandle) -> None:
        """A request aborted while queued leaves without a release (its state goes with its ``Req``)."""
        self.runtime.open_requests.discard(handle.rid)

    # ------------------------------------------------------------------ memory
    def evict(self, params: EvictParams) -> EvictResult:
        freed = self.graph.evict(params.num_tokens)
        self.runtime.counters.evicted_tokens += freed
        self._sync_metrics()
        return EvictResult(num_tokens_evicted=freed)

    def _sync_metrics(self) -> None:
        if self.metrics is not None:
            self.metrics.sync(self.runtime.counters, len(self.graph), self.graph.total_tokens,
                              None if self.tiers is None else self.tiers.counters)

    def evictable_size(self) -> int:
        return self.graph.evictable_tokens

    def full_evictable_size(self) -> int:
        return self.graph.evictable_tokens

    def protected_size(self) -> int:
        return self.graph.protected_tokens

    def full_protected_size(self) -> int:
        return self.graph.protected_tokens

    def total_size(self) -> int:
        return self.graph.total_tokens

    def reset(self) -> None:
        if self.tiers is not None:
            self.tiers.clear()
        leaked = self.graph.reset()
        if leaked:
            logger.error("SparseX: %d cache nodes were still locked at a cache flush (a lock leak); dropped", leaked)

    def pretty_print(self) -> None:
        logger.info("SegmentGraphCache: %d nodes, %d tokens (%d protected)", len(self.graph),
                    self.graph.total_tokens, self.graph.protected_tokens)

    def stats(self) -> dict[str, object]:
        out = self.runtime.stats()
        out.update(graph_nodes=len(self.graph), graph_tokens=self.graph.total_tokens,
                   graph_protected_tokens=self.graph.protected_tokens,
                   allocator_free=int(self.token_to_kv_pool_allocator.available_size()),
                   allocator_size=self.pool_size)
        if self.tiers is not None:
            out["tiers"] = self.tiers.stats()
        return out

