"""Recurrent-state checkpoints in the segment graph (issue 36, item 1): a lookup resumes from the deepest state
within the exact prefix hit, states go with their node, the state pool drops the least useful unlocked state
first and never KV, and each namespace learns its own placement. The random test checks ``resume`` against a
brute-force oracle: the deepest offset whose state slot is still held and was captured on the request's own
tokens."""

from __future__ import annotations

import random
from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from sparsex_sgl.core.checkpoints import BIN
from sparsex_sgl.core.graph import SegmentGraph
from sparsex_sgl.core.segments import SHARED, NamespaceKey, make_piece, namespace_key, split_into_pieces
from sparsex_sgl.core.states import Resume, StateCheckpoints
from sparsex_sgl.reference.pool import FreeListAllocator


class Cache:
    """A graph with state checkpoints, driven the way an engine drives it (lookup, resume, capture, insert)."""

    def __init__(self, kv_slots: int = 4096, max_states: int = 8, per_sequence: int = 4, resolve_every: int = 10):
        self.kv = FreeListAllocator(kv_slots)
        self.state_slots = FreeListAllocator(max_states + 1)
        self.graph = SegmentGraph(self.kv, kv_slots - 1)
        self.states = StateCheckpoints(self.graph, self.state_slots, max_states, per_sequence, resolve_every)
        self.captured: dict[int, tuple[int, ...]] = {}
        """State slot -> the tokens its state was computed on (the oracle's record)."""

    def resume(self, ids: Sequence[int], namespace: NamespaceKey = SHARED) -> Resume:
        pieces = split_into_pieces(ids, [], namespace, BIN)
        pieces = self.graph.align(pieces, lambda s, e: make_piece(ids, s, e, namespace, reusable=False))
        return self.states.resume(self.graph.lookup(pieces), namespace)

    def prefill(self, ids: Sequence[int], namespace: NamespaceKey = SHARED,
                capture: Sequence[int] | None = None) -> Resume:
        pieces = split_into_pieces(ids, [], namespace, BIN)
        pieces = self.graph.align(pieces, lambda s, e: make_piece(ids, s, e, namespace, reusable=False))
        resume = self.states.resume(self.graph.lookup(pieces), namespace)
        self.graph.lock(resume.lookup.node_ids)
        offsets = self.states.plan(namespace, resume.offset, len(ids)) if capture is None else \
            tuple(c for c in capture if resume.offset < c <= len(ids))
        slots = self.states.alloc(len(offsets)) or []
        for offset, slot in zip(offsets, slots):
            self.captured[slot] = tuple(ids[:offset])
        fresh = self.graph.alloc(len(ids) - resume.offset) or []
        result = self.graph.insert(pieces, [*resume.lookup.prefix_slots, *fresh]) if fresh else None
        if result is not None:
            self.kv.free([s for p, took in zip(pieces, result.adopted) if not took
                          for pos, s in enumerate([*resume.lookup.prefix_slots, *fresh][p.start:p.end], p.start)
                          if pos >= resume.offset])
        self.states.adopt(result.node_ids if result else [], dict(zip(offsets, slots)), namespace)
        self.graph.unlock(resume.lookup.node_ids)
        return resume

    def held(self) -> dict[int, tuple[int, ...]]:
        return {slot: tokens for slot, tokens in self.captured.items() if slot in self.state_slots._used}


def tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000) for _ in range(n)]


def test_a_request_resumes_from_the_deepest_state_inside_its_exact_prefix() -> None:
    cache = Cache()
    first = tokens(1, 300)
    assert cache.prefill(first, capture=(64, 128, 256)).state_slot is None
    assert len(cache.states) == 3
    for shared, expected in ((70, 64), (128, 128), (200, 128), (256, 256), (40, 0)):
        resume = cache.resume(first[:shared] + tokens(shared, 50))
        assert resume.offset == expected, shared
        assert resume.lookup.prefix_len == expected and len(resume.lookup.prefix_slots) == expected
        assert resume.lookup.new_rows == tuple(range(expected, shared + 50))
        assert (resume.state_slot is None) == (expected == 0)
    # The same prompt again: its last token is always computed, so its end state (300 is no offset) is not enough.
    assert cache.resume(first).offset == 256
    # A state on another branch of the same prefix is never used.
    other = first[:128] + tokens(2, 200)
    cache.prefill(other, capture=(192,))
    assert cache.resume(first[:250] + tokens(3, 10)).offset == 128
    assert cache.resume(other[:250] + tokens(3, 10)).offset == 192


def test_states_go_with_their_node_and_the_pool_frees_them() -> None:
    cache = Cache()
    first = tokens(1, 200)
    cache.prefill(first, capture=(64, 192))
    held = dict(cache.held())
    assert len(held) == 2 and cache.state_slots.free_size == 8 - 2
    cache.graph.evict(1)  # the LRU leaf: the last block [192, 200), holding no state
    assert len(cache.states) == 2
    cache.graph.evict(8)  # the block [128, 192), which ends at the state 192
    assert len(cache.states) == 1 and cache.resume(first).offset == 64
    cache.graph.reset()
    assert len(cache.states) == 0 and cache.state_slots.free_size == 8


def test_a_full_pool_drops_the_least_useful_unlocked_state_never_kv() -> None:
    cache = Cache(max_states=3, resolve_every=1000)
    base = tokens(1, 260)
    cache.prefill(base, capture=(64, 128, 192))
    for i in range(6):  # hits at depth 64..127 (bin 1) once each, at 128..191 (bin 2) five times each
        cache.resume(base[:100] + tokens(10 + i, 20))
        for _ in range(5):
            cache.resume(base[:150] + tokens(20 + i, 20))
    kv_before = cache.graph.total_tokens
    # Dropping 192 loses no hit, 64 one weight-unit of hits times 64 tokens, 128 five times more.
    cache.prefill(tokens(2, 100), capture=(64,))
    assert cache.graph.total_tokens == kv_before + 100
    assert cache.resume(base[:250]).offset == 128
    cache.prefill(tokens(3, 100), capture=(64,))
    assert cache.resume(base[:100] + [0]).offset == 0 and cache.resume(base[:150] + [0]).offset == 128
    # A state a running request resumes from is not dropped, though it is the least useful (no hit lands past
    # 256): lock the path through it and fill the pool.
    lonely = tokens(6, 300)
    cache.prefill(lonely, capture=(256,))
    resume = cache.resume(lonely[:290] + [0])
    assert resume.offset == 256
    cache.graph.lock(resume.lookup.node_ids)
    cache.prefill(tokens(4, 100), capture=(64,))
    cache.prefill(tokens(5, 100), capture=(64,))
    assert cache.resume(lonely[:290] + [0]).offset == 256
    cache.graph.unlock(resume.lookup.node_ids)
    cache.prefill(tokens(7, 100), capture=(64,))
    assert cache.resume(lonely[:290] + [0]).offset == 0


def test_each_namespace_learns_its_own_placement() -> None:
    cache = Cache(per_sequence=1, resolve_every=10)
    a, b = namespace_key("a"), namespace_key("b")
    doc_a, doc_b = tokens(1, 200), tokens(2, 400)
    assert not cache.states.learned(a).solved
    assert cache.states.plan(a, 0, 200) == (200,)  # before the first solve: the sequence's end, as SGLang keeps
    cache.prefill(doc_a, a)
    cache.prefill(doc_b, b)
    for i in range(10):
        cache.resume(doc_a[:140] + tokens(100 + i, 30), a)
        cache.resume(doc_b[:330] + tokens(200 + i, 30), b)
    assert cache.states.plan(a, 0, 500) == (128,) and cache.states.plan(b, 0, 500) == (320,)
    assert cache.states.plan(a, 128, 500) == ()
    # The tenants' identical tokens are different paths: b never resumes from a's state.
    cache.prefill(doc_a[:140] + tokens(300, 30), a)
    assert cache.resume(doc_a[:140] + [0], a).offset == 128
    assert cache.resume(doc_a[:140] + [0], b).offset == 0


def test_conversations_that_continue_at_the_end_keep_a_state_there() -> None:
    """Turns that resend the conversation so far hit each cached sequence at its end: a state there serves them,
    where one placed inside the shared prefix would not."""
    cache = Cache(per_sequence=1, resolve_every=4)
    system = tokens(1, 100)
    chats = [system + tokens(10 + i, 50) for i in range(4)]
    for turn in range(4):
        for i, chat in enumerate(chats):
            resume = cache.prefill(chat)
            if turn == 3:  # learned: each turn resumes from the end of the previous one
                assert resume.offset == len(chat) - 37, (turn, i)
            chats[i] = chat + tokens(100 * turn + i, 37)
    assert cache.states.learned(SHARED).end_weight > 0
    assert cache.states.plan(SHARED, 0, 500) == (500,)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 6), st.integers(0, 5), st.integers(0, 2)),
                min_size=1, max_size=25))
def test_resume_matches_a_brute_force_oracle(ops: list[tuple[int, int, int, int]]) -> None:
    cache = Cache(kv_slots=1200, max_states=5, per_sequence=2, resolve_every=3)
    docs = [tokens(d, 400) for d in range(4)]
    for step, (doc, blocks, tail, action) in enumerate(ops):
        ids = docs[doc][: blocks * 50 + 10] + tokens(1000 + step, 5 * tail + 1)
        if action == 2:
            cache.graph.evict(100)
            continue
        expected = max((len(prefix) for prefix in cache.held().values()
                        if len(prefix) < len(ids) and tuple(ids[: len(prefix)]) == prefix), default=0)
        resume = cache.prefill(ids) if action == 0 else cache.resume(ids)
        assert resume.offset == expected, (step, resume.offset, expected)
        assert len(cache.states) == len(cache.held()) <= 5
        cache.graph.check_invariants()
