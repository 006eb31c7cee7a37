"""Segment graph: exact-prefix and non-prefix lookup with exact slots, collisions, LRU eviction within the
token budget, and invariants under random insert / lookup / lock / evict sequences (hypothesis)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from sparsex_sgl.core.errors import SegmentHashCollisionError
from sparsex_sgl.core.graph import EvictedSegment, SegmentGraph, segments_it_caches, segments_it_computes
from sparsex_sgl.core.request import MAX_DEFERRALS, Match, RequestState, should_defer
from sparsex_sgl.core.segments import (
    SHARED,
    NamespaceKey,
    Piece,
    SegmentHash,
    cut_gap,
    make_piece,
    namespace_key,
    split_into_pieces,
)
from sparsex_sgl.reference.pool import FreeListAllocator

A, B, C, Q1, Q2 = [1] * 4, [2] * 3, [3] * 5, [7, 8], [9]


def prompt(*parts: list[int]) -> tuple[list[int], list[list[int]]]:
    """Concatenate parts; every part but the last is a reusable segment."""
    ids: list[int] = []
    spans = []
    for part in parts[:-1]:
        spans.append([len(ids), len(ids) + len(part)])
        ids += part
    return ids + parts[-1], spans


def cache_alone(graph: SegmentGraph, tokens: list[int]) -> list[int]:
    slots = graph.alloc(len(tokens))
    assert slots is not None
    graph.insert(split_into_pieces(tokens, [[0, len(tokens)]]), slots)
    return slots


def test_exact_path_is_a_prefix_hit_and_other_orders_are_non_prefix_hits() -> None:
    graph = SegmentGraph(FreeListAllocator(64), max_tokens=63)
    ids, spans = prompt(A, B, Q1)
    pieces = split_into_pieces(ids, spans)
    slots = graph.alloc(len(ids))
    assert slots == list(range(1, 10))  # slot 0 is never handed out
    result = graph.insert(pieces, slots)
    assert result.adopted == (True, True, True)

    same = graph.lookup(split_into_pieces(ids, spans))
    assert same.prefix_len == 8 and same.new_rows == (8,)  # the last token is always computed
    assert same.prefix_slots == tuple(range(1, 9)) and same.reused == ()

    ids2, spans2 = prompt(B, A, Q2)
    plan = graph.lookup(split_into_pieces(ids2, spans2))
    assert plan.prefix_len == 0
    b, a = plan.reused
    assert (b.source_start, b.target_start, b.length, b.slots) == (4, 0, 3, (5, 6, 7))
    assert (a.source_start, a.target_start, a.length, a.slots, a.delta) == (0, 3, 4, (1, 2, 3, 4), 3)
    assert plan.new_rows == (7,)
    assert graph.check_invariants() is None


def test_segments_it_caches_stop_at_the_first_reused_segment() -> None:
    """A request caches the segments it computes before its first reused one (exact KV there), never its
    prefix (already cached) nor what follows a reused segment (computed over approximate KV)."""
    graph = SegmentGraph(FreeListAllocator(64), max_tokens=63)
    d, e = [4] * 3, [5] * 2
    ids, spans = prompt(A, B, Q1)
    graph.insert(split_into_pieces(ids, spans), graph.alloc(len(ids)) or [])
    cache_alone(graph, C)
    key = {piece.token_ids: piece.key for piece in split_into_pieces(*prompt(A, B, d, C, e, Q2)) if piece.reusable}

    pieces = split_into_pieces(*prompt(A, B, d, C, e, Q2))  # A B: prefix, d: new, C: reused, e: after it
    plan = graph.lookup(pieces)
    assert plan.prefix_len == 7 and [r.target_start for r in plan.reused] == [10]
    assert segments_it_caches(pieces, plan) == {key[tuple(d)]}

    novel = split_into_pieces(*prompt(d, e, Q2))  # nothing cached: every segment is computed exactly
    assert segments_it_caches(novel, graph.lookup(novel)) == {key[tuple(d)], key[tuple(e)]}


def planned(graph: SegmentGraph, rid: str, pieces: list) -> RequestState:  # type: ignore[type-arg]
    """A request's SparseX state after its match on ``graph`` (the core's ``request.RequestState``)."""
    plan = graph.lookup(pieces)
    return RequestState(rid, Match(plan, tuple(pieces), (), 0.15, segments_it_caches(pieces, plan),
                                           segments_it_computes(pieces, plan)))


def test_a_request_waits_only_for_segments_an_admitted_request_caches() -> None:
    """The in-batch deferral rule: wait when a request already in the batch caches one of your segments;
    never when nothing is shared, when nothing is admitted yet, or when you have no plan."""
    from sparsex_sgl.core.config import ServerConfig
    from sparsex_sgl.core.ops import op_set
    from sparsex_sgl.sglang.runtime import SchedulerRuntime

    runtime = SchedulerRuntime(ServerConfig(), None, 4, op_set("torch"))
    graph = SegmentGraph(FreeListAllocator(64), max_tokens=63)
    ab, ba, c = (planned(graph, rid, split_into_pieces(*prompt(*parts)))
                 for rid, parts in (("ab", (A, B, Q1)), ("ba", (B, A, Q2)), ("c", (C, Q1))))
    unplanned = RequestState("unplanned")
    assert not runtime.should_defer(ab, [], [])  # the first request of a batch
    assert runtime.should_defer(ba, [ab], []) and runtime.should_defer(ba, [c, ab], [])
    assert not runtime.should_defer(c, [ab, ba], []) and not runtime.should_defer(unplanned, [ab], [])
    assert runtime.counters.deferred_admissions == 2


def test_a_request_waits_for_segments_in_flight_but_not_forever() -> None:
    """Under overlap scheduling a batch is planned before the previous one is cached: a request whose
    segments a running request of that earlier batch computes waits until it has landed (its whole prompt
    cached, or it left), even as the first of its batch, at most MAX_DEFERRALS times, and never for a
    request that is not running (so the scheduler is never left idle)."""
    graph = SegmentGraph(FreeListAllocator(64), max_tokens=63)
    ab, ba, c = (planned(graph, rid, split_into_pieces(*prompt(*parts)))
                 for rid, parts in (("ab", (A, B, Q1)), ("ba", (B, A, Q2)), ("c", (C, Q1))))
    ab.admitted()
    assert should_defer(ba, [], [ab]) and not should_defer(c, [], [ab])
    assert not should_defer(ba, [], [])  # "ab" left without landing: nothing to wait for
    ab.landed()
    assert not should_defer(ba, [], [ab])
    ab.admitted()  # admitted again and running on: "ba" still runs eventually
    waits = 0
    while should_defer(ba, [], [ab]):
        waits += 1
    assert waits == MAX_DEFERRALS - 1  # one wait was spent above


def test_a_request_waits_for_a_segment_it_computes_after_a_reused_one() -> None:
    """A request whose first segment is reused computes, but does not cache, the segments after it; it
    still waits for an in-flight request that caches one of them (a chunked prefill caches its segments
    chunk by chunk, so a later request can find the first ones cached and the rest still coming)."""
    graph = SegmentGraph(FreeListAllocator(64), max_tokens=63)
    cache_alone(graph, A)
    x = planned(graph, "x", split_into_pieces(*prompt(C, B, Q1)))
    y = planned(graph, "y", split_into_pieces(Q2 + A + B + Q1, [[1, 5], [5, 8]]))  # a gap, A (cached alone), B
    assert y.matched is not None
    assert [r.target_start for r in y.matched.lookup.reused] == [1] and not y.matched.caches
    assert len(y.matched.computes) == 1
    assert not should_defer(y, [], [])
    x.admitted()  # x computes and caches C and B
    assert should_defer(y, [], [x])


def test_prefill_cuda_graph_is_refused_only_for_batches_with_reuse() -> None:
    from types import SimpleNamespace

    from sparsex_sgl.core.graph import Lookup, ReusedSegment
    from sparsex_sgl.sglang.plugin import _refuse_prefill_graph

    reuse = Lookup(8, 0, (), (), (ReusedSegment(1, 0, 2, 4, (5, 6, 7, 8)),), (0, 1, 6, 7), 2)
    plain = Lookup(8, 4, (1,), (5, 6, 7, 8), (), (4, 5, 6, 7), 4)
    r = RequestState("r", Match(reuse, (), (), 0.15))
    p = RequestState("p", Match(plain, (), (), 0.15))

    def stock_says_yes(self: object, fb: object) -> bool:
        return True

    assert _refuse_prefill_graph(stock_says_yes, None, SimpleNamespace(sparsex_requests=[p, r])) is False
    assert _refuse_prefill_graph(stock_says_yes, None, SimpleNamespace(sparsex_requests=[p, None])) is True
    assert _refuse_prefill_graph(stock_says_yes, None, SimpleNamespace()) is True


def test_segment_cached_after_the_same_predecessor_is_preferred() -> None:
    graph = SegmentGraph(FreeListAllocator(64), max_tokens=63)
    alone = cache_alone(graph, C)
    ids, spans = prompt(A, C, Q1)
    after_a = graph.alloc(len(ids))
    graph.insert(split_into_pieces(ids, spans), after_a)
    ids2, spans2 = prompt(B, A, C, Q2)
    plan = graph.lookup(split_into_pieces(ids2, spans2))
    c = plan.reused[-1]
    assert c.slots == tuple(after_a[4:9]) and c.slots != tuple(alone)
    assert (c.source_start, c.target_start) == (4, 7)


def test_prompt_ending_in_a_reused_segment_recomputes_its_last_token() -> None:
    graph = SegmentGraph(FreeListAllocator(32), max_tokens=31)
    cache_alone(graph, A)
    ids = [5] + A
    plan = graph.lookup(split_into_pieces(ids, [[1, 5]]))
    assert plan.reused[0].length == 3 and plan.new_rows == (0, 4)


def test_hash_collision_is_an_error_not_a_hit() -> None:
    graph = SegmentGraph(FreeListAllocator(32), max_tokens=31)
    cache_alone(graph, A)
    key = split_into_pieces(A, [[0, 4]])[0].key
    forged = [Piece(0, 4, (5, 5, 5, 5), SegmentHash(key), True), Piece(4, 5, (9,), SegmentHash(b"q" * 16), False)]
    with pytest.raises(SegmentHashCollisionError):
        graph.lookup(forged)
    forged_later = [Piece(0, 1, (9,), SegmentHash(b"x" * 16), False), Piece(1, 5, (5, 5, 5, 5), key, True)]
    with pytest.raises(SegmentHashCollisionError):
        graph.lookup(forged_later)


def test_a_colliding_piece_ends_an_insert_without_raising_and_the_placed_path_says_what_is_held() -> None:
    """An insert adopts slots piece by piece, so it must not raise halfway (the caller would not know which
    slots the graph now owns): a collision ends it there, reported, and ``placed_path`` names the slots held."""
    allocator = FreeListAllocator(32)
    graph = SegmentGraph(allocator, max_tokens=31)
    a_slots = cache_alone(graph, A)
    key = split_into_pieces(A, [[0, 4]])[0].key
    forged = [Piece(0, 4, (5, 5, 5, 5), SegmentHash(key), True), Piece(4, 5, (9,), SegmentHash(b"q" * 16), False)]
    slots = graph.alloc(5)
    assert slots is not None
    result = graph.insert(forged, slots)
    assert result.collision and result.node_ids == (None, None) and result.adopted == (False, False)
    assert graph.placed_path(forged, result) == ([], None)
    assert graph.placed_path(forged, None) == ([], None)  # the cached path stops at the colliding piece
    genuine = split_into_pieces(A + [9], [[0, 4]])
    held, last = graph.placed_path(genuine, None)
    assert held == list(a_slots) and last is not None and graph.node_slots(last) == tuple(a_slots)
    graph.check_invariants()


def test_lru_eviction_frees_slots_and_spares_locked_nodes() -> None:
    allocator = FreeListAllocator(12)  # 11 usable slots
    graph = SegmentGraph(allocator, max_tokens=11)
    a_slots = cache_alone(graph, A)  # 4
    cache_alone(graph, B)  # 3
    plan = graph.lookup(split_into_pieces(A + Q1, [[0, 4]]))  # touches A: B is now least recent
    graph.lock(plan.node_ids)
    cache_alone(graph, C)  # 5 more tokens: over budget, evicts B (unlocked, LRU)
    assert graph.total_tokens == 9 and allocator.free_size == 2
    assert graph.lookup(split_into_pieces(B + Q1, [[0, 3]])).reused == ()
    assert graph.evict(100) == 5  # only C could go; A is locked
    assert graph.node_slots(plan.node_ids[0]) == tuple(a_slots)
    graph.unlock(plan.node_ids)
    with pytest.raises(AssertionError, match="lock_ref"):
        graph.unlock(plan.node_ids)  # a second unlock would make the refcount negative
    assert graph.evict(100) == 4 and allocator.free_size == 11


def test_blended_nodes_serve_only_prefix_hits_and_are_upgraded_when_computed_exactly() -> None:
    """A request exact up to position 4 (it reused B at 4..7) caches A exact and B, Q1 blended. The same
    pieces again are a prefix hit with exact part 4; B elsewhere is not reused from the blended copy;
    an exact computation of B after A replaces the blended copy unless a request still reads it."""
    allocator = FreeListAllocator(64)
    graph = SegmentGraph(allocator, max_tokens=63)
    ids, spans = prompt(A, B, Q1)
    pieces = split_into_pieces(ids, spans)
    blended = graph.alloc(len(ids)) or []
    result = graph.insert(pieces, blended, exact_len=4)
    assert result.adopted == (True, True, True)
    assert [graph.is_exact(nid) for nid in result.node_ids if nid is not None] == [True, False, False]

    again = graph.lookup(pieces)
    assert (again.prefix_len, again.exact_prefix_len, again.reused) == (8, 4, ())
    assert graph.lookup(split_into_pieces(*prompt(B, Q2))).reused == ()  # only a blended B is cached

    graph.lock(again.node_ids)  # a running request reads the blended B: an exact B must not free it
    exact = graph.alloc(len(ids)) or []
    held = graph.insert(pieces, exact)
    assert held.adopted == (False, False, False) and held.node_ids[1:] == (None, None)
    assert graph.node_slots(result.node_ids[1]) == tuple(blended[4:7])  # type: ignore[arg-type]
    graph.unlock(again.node_ids)

    upgraded = graph.insert(pieces, exact)
    assert upgraded.adopted == (False, True, True)
    assert graph.node_slots(result.node_ids[1]) == tuple(exact[4:7])  # type: ignore[arg-type]
    assert graph.lookup(pieces).exact_prefix_len == 8  # all of the prefix hit (the last token is computed)
    moved = graph.lookup(split_into_pieces(*prompt(B, Q2)))
    assert [r.slots for r in moved.reused] == [tuple(exact[4:7])]
    allocator.free(exact[:4])  # A was cached already: those slots stayed the caller's
    assert allocator.free_size + graph.total_tokens == 63  # the blended slots went back to the pool
    graph.check_invariants()


def aligned(graph: SegmentGraph, ids: list[int], spans: list[list[int]], namespace: NamespaceKey = SHARED,
            block: int = 16) -> list[Piece]:
    """A request's pieces as the SGLang cache cuts them: gap blocks, re-cut along the cached path."""
    pieces = split_into_pieces(ids, spans, namespace, gap_block=block)
    return graph.align(pieces, lambda start, end: make_piece(ids, start, end, namespace, reusable=False))


def test_next_round_hits_through_a_prompt_cut_short_and_the_tokens_decoded_after_it() -> None:
    """A chat's next round resends the previous prompt and the reply decoded after it. The prompt's last
    gap block ended early (21 = 16 + 5 tokens) and the reply is cached in blocks from there, so the
    next round's fixed blocks ([16, 32), ...) would miss from 16 on; aligned, it hits through the reply
    (30 tokens), as stock SGLang's radix tree does. Another namespace hits nothing."""
    graph = SegmentGraph(FreeListAllocator(128), max_tokens=127)
    prompt_ids, reply = list(range(10, 31)), list(range(50, 59))
    first = aligned(graph, prompt_ids, [])
    assert [(p.start, p.end) for p in first] == [(0, 16), (16, 21)]
    slots = graph.alloc(30) or []
    graph.insert(first, slots)
    finished = first + cut_gap(prompt_ids + reply, 21, 30, SHARED, 16)
    assert graph.insert(finished, slots).adopted == (False, False, True)

    next_round = prompt_ids + reply + list(range(70, 80))
    assert graph.lookup(split_into_pieces(next_round, [], gap_block=16)).prefix_len == 16  # fixed blocks
    pieces = aligned(graph, next_round, [])
    assert [(p.start, p.end) for p in pieces] == [(0, 16), (16, 21), (21, 30), (30, 32), (32, 40)]
    plan = graph.lookup(pieces)
    assert plan.prefix_len == 30 and plan.prefix_slots == tuple(slots)
    assert graph.lookup(aligned(graph, next_round, [], namespace=namespace_key("tenant-b"))).prefix_len == 0

    longer = graph.alloc(32) or []  # another request cached the same start in whole blocks: the longest wins
    graph.insert(split_into_pieces(next_round[:32], [], gap_block=16), longer)
    assert [(p.start, p.end) for p in aligned(graph, next_round, [])][:2] == [(0, 16), (16, 32)]
    graph.check_invariants()


def test_alignment_stops_at_a_segment_and_never_recuts_one() -> None:
    """A cached gap child that runs into the request's next segment is not followed: segments keep their
    spans, and the gap before one is cut up to its start."""
    graph = SegmentGraph(FreeListAllocator(64), max_tokens=63)
    ids = [7] * 6 + A  # a 6-token gap, then segment A
    cached = graph.alloc(10) or []
    graph.insert(split_into_pieces(ids, [], gap_block=8), cached)  # one gap block [0, 8) over A's start
    pieces = aligned(graph, ids, [[6, 10]], block=8)
    assert [(p.start, p.end, p.reusable) for p in pieces] == [(0, 6, False), (6, 10, True)]
    assert graph.lookup(pieces).prefix_len == 0


def test_segment_larger_than_budget_is_not_cached() -> None:
    graph = SegmentGraph(FreeListAllocator(64), max_tokens=4)
    slots = graph.alloc(5)
    assert slots is not None
    result = graph.insert(split_into_pieces(C, [[0, 5]]), slots)
    assert result.node_ids == (None,) and result.adopted == (False,)
    assert graph.total_tokens == 0


SEGMENTS = [tuple([t] * n) for t, n in zip(range(1, 7), (3, 1, 4, 2, 5, 2))]


class GraphMachine(RuleBasedStateMachine):
    """Random request traffic against a small pool and budget, with a lower tier that keeps what eviction
    hands it and loads segments back as detached nodes."""

    def __init__(self) -> None:
        super().__init__()
        self.allocator = FreeListAllocator(24)
        self.graph = SegmentGraph(self.allocator, max_tokens=16, on_evict=self._spill)
        self.held: list[tuple] = []  # locked node-id tuples  # type: ignore[type-arg]
        self.tier: dict[SegmentHash, EvictedSegment] = {}
        self.source_start: dict[int, int] = {}  # detached node id -> the position its KV was computed at

    def _spill(self, segment: EvictedSegment) -> None:
        """Only an exact, client-marked segment reaches the tier, with slots still allocated to it."""
        assert segment.token_ids in SEGMENTS, segment.token_ids
        assert all(s in self.allocator._used for s in segment.slots)
        self.tier[segment.key] = segment

    def _pieces(self, order: list[int], tail: list[int]) -> list[Piece]:
        """Segments in ``order``, then a gap (cut in blocks of 3, aligned along the cached path)."""
        ids: list[int] = []
        spans = []
        for index in order:
            spans.append([len(ids), len(ids) + len(SEGMENTS[index])])
            ids += SEGMENTS[index]
        pieces = aligned(self.graph, ids + tail, spans, block=3)
        assert [(p.start, p.end, p.token_ids) for p in pieces if p.reusable] == [
            (s, e, SEGMENTS[i]) for (s, e), i in zip(spans, order)]  # segments are never re-cut
        assert [t for p in pieces for t in p.token_ids] == ids + tail
        assert all(a.end == b.start for a, b in itertools.pairwise(pieces))
        return pieces

    @rule(order=st.lists(st.integers(0, 5), min_size=0, max_size=4, unique=True),
          tail=st.lists(st.integers(100, 101), min_size=1, max_size=5), decoded=st.integers(0, 4),
          exact_len=st.none() | st.integers(0, 20))
    def insert(self, order: list[int], tail: list[int], decoded: int, exact_len: int | None) -> None:
        """A request caches its prompt along its aligned cut, then the tokens it decoded, in blocks from
        the prompt's end (as ``SegmentGraphCache.checkpoint`` does)."""
        pieces = self._pieces(order, tail)
        n = pieces[-1].end
        ids = [t for p in pieces for t in p.token_ids] + [100] * decoded
        pieces += cut_gap(ids, n, n + decoded, SHARED, 3)
        slots = self.graph.alloc(pieces[-1].end)
        if slots is None:
            return
        locked_before = {nid: self.graph.node_slots(nid) for ids in self.held for nid in ids}
        result = self.graph.insert(pieces, slots, exact_len)
        for piece, took in zip(pieces, result.adopted):
            if not took:
                self.allocator.free(slots[piece.start : piece.end])
        for nid, old in locked_before.items():  # what a running request reads never moves
            assert self.graph.node_slots(nid) == old

    @rule(order=st.lists(st.integers(0, 5), min_size=0, max_size=4, unique=True),
          tail=st.lists(st.integers(100, 101), min_size=1, max_size=8), keep=st.booleans())
    def lookup(self, order: list[int], tail: list[int], keep: bool) -> None:
        pieces = self._pieces(order, tail)
        plan = self.graph.lookup(pieces)
        ids = [t for p in pieces for t in p.token_ids]
        covered = set(range(plan.prefix_len)) | set(plan.new_rows)
        for r in plan.reused:
            assert SEGMENTS[order[[p.start for p in pieces].index(r.target_start)]][: r.length] == tuple(
                ids[r.target_start : r.target_start + r.length])
            covered |= set(range(r.target_start, r.target_start + r.length))
        assert covered == set(range(len(ids))) and plan.new_rows[-1] == len(ids) - 1
        assert all(self.graph.is_exact(r.node_id) for r in plan.reused)  # blended KV is never moved
        for r in plan.reused:  # a loaded segment is re-rotated from where its KV was computed
            assert r.source_start == self.source_start.get(r.node_id, r.source_start)
        assert not set(plan.prefix_node_ids) & set(self.source_start)  # a detached node is never a prefix
        exact_len = 0
        for piece, nid in zip(pieces, plan.prefix_node_ids):
            if not self.graph.is_exact(nid):
                break
            exact_len = piece.end
        assert plan.exact_prefix_len == min(exact_len, plan.prefix_len)
        if keep:
            self.graph.lock(plan.node_ids)
            self.held.append(plan.node_ids)

    @precondition(lambda self: self.tier)
    @rule(index=st.integers(0, 10))
    def load(self, index: int) -> None:
        """A segment the tier kept comes back as a detached node, unless the graph holds it exactly."""
        segment = list(self.tier.values())[index % len(self.tier)]
        piece = make_piece(segment.token_ids, 0, len(segment.token_ids), SHARED, reusable=True)
        assert piece.key == segment.key
        if self.graph.has_source(piece.key):
            return
        slots = self.graph.alloc(piece.length)
        if slots is None:
            return
        nid = self.graph.insert_detached(piece, slots, segment.start_pos)
        if nid is None:
            self.allocator.free(slots)
            return
        del self.tier[segment.key]
        self.source_start[nid] = segment.start_pos
        assert self.graph.has_source(piece.key)

    @precondition(lambda self: self.held)
    @rule(index=st.integers(0, 10))
    def unlock(self, index: int) -> None:
        self.graph.unlock(self.held.pop(index % len(self.held)))

    @rule(n=st.integers(1, 20))
    def evict(self, n: int) -> None:
        locked_before = {nid: self.graph.node_slots(nid) for ids in self.held for nid in ids}
        leaves = [nd for nd in self.graph._nodes.values() if not nd.children and nd.lock_ref == 0]
        lru = min(leaves, key=lambda nd: (nd.last_access, nd.id)) if leaves else None  # the scan it replaced
        freed = self.graph.evict(n)
        assert (freed > 0) == (lru is not None)
        if lru is not None:
            assert lru.id not in self.graph  # the least recently used evictable leaf goes first
        for nid, slots in locked_before.items():
            assert nid in self.graph and self.graph.node_slots(nid) == slots

    @rule()
    def reset(self) -> None:
        locked = sum(1 for nd in self.graph._nodes.values() if nd.lock_ref > 0)
        spilled = len(self.tier)
        assert self.graph.reset() == locked  # leaked locks are reported, and their nodes dropped too
        assert len(self.tier) == spilled  # a flush drops the graph's nodes; it spills nothing
        self.source_start.clear()
        assert len(self.graph) == 0 and self.graph.total_tokens == self.graph.protected_tokens == 0
        self.held.clear()

    @invariant()
    def consistent(self) -> None:
        self.graph.check_invariants()
        assert self.graph.total_tokens <= 16
        assert self.allocator.free_size + self.graph.total_tokens == 23  # no slot leaked or double-owned
        for ids in self.held:
            for nid in ids:
                assert nid in self.graph and self.graph.lock_ref(nid) > 0


TestGraphMachine = GraphMachine.TestCase
TestGraphMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
