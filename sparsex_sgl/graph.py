"""The segment graph: which segments' KV is cached, under which context, and where it lives.

A node is one piece's KV computed under one context: the path of pieces from the root to it. Its
children are the pieces observed to follow it, so a root path equal to the request's leading pieces
is an exact prefix hit (exact KV, nothing to repair), as in a radix tree. A reusable piece found
anywhere else in the graph is a *non-prefix hit*: its KV was computed at ``source_start`` and must be
re-rotated to the request's position and partly recomputed.

The graph stores no tensors. It owns KV *slots* in an engine pool, obtained through an injected
allocator, so the same bookkeeping serves SGLang's pool and the reference executor's pool, and is
tested on the CPU with exact slot ids. Eviction is LRU over unlocked leaves, within a token budget.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NewType, Protocol

from sparsex_sgl.errors import SegmentHashCollisionError
from sparsex_sgl.segments import Piece, SegmentHash

NodeId = NewType("NodeId", int)


class SlotAllocator(Protocol):
    """The engine's KV-slot allocator (SGLang's token_to_kv_pool_allocator has this shape)."""

    def alloc(self, n: int) -> list[int] | None:
        """Return ``n`` free slot ids, or None when fewer are free."""

    def free(self, slots: Sequence[int]) -> None:
        """Give slots back."""


@dataclass(eq=False)
class _Node:
    id: NodeId
    parent: _Node | None
    key: SegmentHash
    token_ids: tuple[int, ...]
    slots: tuple[int, ...]
    start_pos: int
    children: dict[SegmentHash, _Node] = field(default_factory=dict)
    lock_ref: int = 0
    last_access: int = 0

    @property
    def length(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class ReusedSegment:
    """A cached piece placed at a new position: rotate keys by ``target_start - source_start``."""

    node_id: NodeId
    source_start: int
    target_start: int
    length: int
    slots: tuple[int, ...]

    @property
    def delta(self) -> int:
        return self.target_start - self.source_start


@dataclass(frozen=True)
class LookupPlan:
    """What a request can take from the cache.

    Positions ``[0, prefix_len)`` are an exact prefix hit, each ``reused`` span is a non-prefix hit,
    and ``new_rows`` (the Sparse-Q rows) must be computed. The three cover the prompt without overlap;
    the last token is always in ``new_rows`` because its logits start decoding.
    """

    n_tokens: int
    prefix_len: int
    prefix_node_ids: tuple[NodeId, ...]
    prefix_slots: tuple[int, ...]
    reused: tuple[ReusedSegment, ...]
    new_rows: tuple[int, ...]

    @property
    def n_reused_tokens(self) -> int:
        return sum(r.length for r in self.reused)

    @property
    def node_ids(self) -> tuple[NodeId, ...]:
        """Every node the plan reads, to be locked while the request runs."""
        return self.prefix_node_ids + tuple(r.node_id for r in self.reused)


def segments_it_caches(pieces: Sequence[Piece], plan: LookupPlan) -> frozenset[SegmentHash]:
    """Keys of the segments a request will compute exactly, and so cache, under ``plan``.

    Those are the reusable pieces after its exact prefix and before its first reused segment: a row
    before any reused token attends only to exact KV. (Pieces after a reused segment are computed over
    approximate KV and are not cached; see ``select.exact_length``.) A second request carrying one of
    these segments gains nothing from running in the same batch, where it computes the segment again;
    one batch later it reuses it.
    """
    first_reused = min((r.target_start for r in plan.reused), default=plan.n_tokens)
    return frozenset(p.key for p in pieces if p.reusable and p.start >= plan.prefix_len and p.end <= first_reused)


@dataclass(frozen=True)
class InsertResult:
    """Per piece: the node now holding it, and whether the caller's slots were adopted.

    Slots of pieces that were not adopted (already cached, or no room) stay the caller's to free.
    ``node_ids[i]`` is None where a piece could not be cached.
    """

    node_ids: tuple[NodeId | None, ...]
    adopted: tuple[bool, ...]


class SegmentGraph:
    """Segment KV bookkeeping with exact-prefix and non-prefix lookup, refcounts and LRU eviction."""

    def __init__(self, allocator: SlotAllocator, max_tokens: int) -> None:
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        self._allocator = allocator
        self.max_tokens = max_tokens
        self._ids = itertools.count(1)
        self._clock = itertools.count(1)
        self._root = _Node(NodeId(0), None, SegmentHash(b""), (), (), 0)
        self._nodes: dict[NodeId, _Node] = {}
        self._by_key: dict[SegmentHash, dict[NodeId, _Node]] = {}
        self.total_tokens = 0

    # ------------------------------------------------------------------ lookup
    def lookup(self, pieces: Sequence[Piece]) -> LookupPlan:
        """Plan a request: exact prefix path first, then reusable pieces found anywhere."""
        if not pieces:
            raise ValueError("lookup needs at least one piece")
        n = pieces[-1].end
        now = next(self._clock)
        node = self._root
        prefix_nodes: list[_Node] = []
        for piece in pieces:
            child = node.children.get(piece.key)
            if child is None:
                break
            _confirm(child, piece)
            child.last_access = now
            prefix_nodes.append(child)
            node = child
        covered = sum(p.length for p in pieces[: len(prefix_nodes)])
        prefix_len = min(covered, n - 1)
        prefix_slots = tuple(s for nd in prefix_nodes for s in nd.slots)[:prefix_len]

        reused: list[ReusedSegment] = []
        new_rows: list[int] = []
        previous_key = pieces[len(prefix_nodes) - 1].key if prefix_nodes else None
        for piece in pieces[len(prefix_nodes) :]:
            hit = self._best_candidate(piece, previous_key) if piece.reusable else None
            previous_key = piece.key
            if hit is None:
                new_rows.extend(range(piece.start, piece.end))
                continue
            hit.last_access = now
            length = piece.length - (1 if piece.end == n else 0)  # the last token is always computed
            if length > 0:
                reused.append(ReusedSegment(hit.id, hit.start_pos, piece.start, length, hit.slots[:length]))
            if piece.end == n:
                new_rows.append(n - 1)
        if prefix_len < covered:  # the whole prompt was an exact path: recompute its last token
            new_rows.append(n - 1)
        return LookupPlan(
            n_tokens=n,
            prefix_len=prefix_len,
            prefix_node_ids=tuple(nd.id for nd in prefix_nodes),
            prefix_slots=prefix_slots,
            reused=tuple(reused),
            new_rows=tuple(new_rows),
        )

    def _best_candidate(self, piece: Piece, previous_key: SegmentHash | None) -> _Node | None:
        """Among nodes holding this piece, prefer one cached after the same predecessor, then the newest."""
        candidates = self._by_key.get(piece.key)
        if not candidates:
            return None
        best = max(
            candidates.values(),
            key=lambda nd: (nd.parent is not None and nd.parent.key == previous_key, nd.last_access, nd.id),
        )
        _confirm(best, piece)
        return best

    # ------------------------------------------------------------------ insert
    def insert(self, pieces: Sequence[Piece], slots: Sequence[int]) -> InsertResult:
        """Record a request's pieces as a root path, adopting the caller's slots for new nodes.

        ``slots[i]`` holds the KV of prompt position ``pieces[0].start + i``; the pieces must start at 0
        and be contiguous, because a node's context is its whole root path.
        """
        if pieces and pieces[0].start != 0:
            raise ValueError("a graph path starts at position 0")
        if len(slots) < (pieces[-1].end if pieces else 0):
            raise ValueError(f"{len(slots)} slots for {pieces[-1].end} tokens")
        now = next(self._clock)
        node = self._root
        node_ids: list[NodeId | None] = []
        adopted: list[bool] = []
        path: list[_Node] = []
        try:
            for piece in pieces:
                child = node.children.get(piece.key)
                if child is not None:
                    _confirm(child, piece)
                    took = False
                else:
                    if not self._make_room(piece.length):
                        node_ids.extend([None] * (len(pieces) - len(node_ids)))
                        adopted.extend([False] * (len(pieces) - len(adopted)))
                        break
                    child = self._add_node(node, piece, tuple(slots[piece.start : piece.end]))
                    took = True
                child.last_access = now
                self._inc(child)  # the path under construction must not be evicted by later pieces
                path.append(child)
                node_ids.append(child.id)
                adopted.append(took)
                node = child
        finally:
            for nd in path:
                self._dec(nd)
        return InsertResult(tuple(node_ids), tuple(adopted))

    def _add_node(self, parent: _Node, piece: Piece, slots: tuple[int, ...]) -> _Node:
        assert len(slots) == piece.length, (len(slots), piece.length)
        node = _Node(NodeId(next(self._ids)), parent, piece.key, piece.token_ids, slots, piece.start)
        parent.children[piece.key] = node
        self._nodes[node.id] = node
        self._by_key.setdefault(piece.key, {})[node.id] = node
        self.total_tokens += node.length
        return node

    # ------------------------------------------------------------------ locks
    def lock(self, node_ids: Iterable[NodeId]) -> None:
        """Protect nodes (and their ancestors, which keep them reachable) from eviction."""
        for nid in node_ids:
            self._inc(self._nodes[nid])

    def unlock(self, node_ids: Iterable[NodeId]) -> None:
        for nid in node_ids:
            self._dec(self._nodes[nid])

    def _inc(self, node: _Node) -> None:
        nd: _Node | None = node
        while nd is not None and nd is not self._root:
            nd.lock_ref += 1
            nd = nd.parent

    def _dec(self, node: _Node) -> None:
        nd: _Node | None = node
        while nd is not None and nd is not self._root:
            assert nd.lock_ref > 0, f"unlock of node {nd.id} whose lock_ref is {nd.lock_ref}"
            nd.lock_ref -= 1
            nd = nd.parent

    # ------------------------------------------------------------------ memory
    def alloc(self, n: int) -> list[int] | None:
        """Slots from the engine allocator, evicting unlocked LRU leaves when it is full."""
        while True:
            slots = self._allocator.alloc(n)
            if slots is not None:
                return slots
            if self.evict(1) == 0:
                return None

    def _make_room(self, n: int) -> bool:
        if n > self.max_tokens:
            return False
        excess = self.total_tokens + n - self.max_tokens
        if excess > 0:
            self.evict(excess)
        return self.total_tokens + n <= self.max_tokens

    def evict(self, n_tokens: int) -> int:
        """Free at least ``n_tokens`` cached tokens if possible, least recently used leaves first."""
        freed = 0
        while freed < n_tokens:
            leaves = [nd for nd in self._nodes.values() if not nd.children and nd.lock_ref == 0]
            if not leaves:
                break
            victim = min(leaves, key=lambda nd: (nd.last_access, nd.id))
            freed += victim.length
            self._remove(victim)
        return freed

    def _remove(self, node: _Node) -> None:
        assert node.parent is not None and not node.children and node.lock_ref == 0
        del node.parent.children[node.key]
        del self._nodes[node.id]
        same_key = self._by_key[node.key]
        del same_key[node.id]
        if not same_key:
            del self._by_key[node.key]
        self.total_tokens -= node.length
        self._allocator.free(node.slots)

    def reset(self) -> None:
        """Drop every unlocked node; locked ones stay (a running request still reads them)."""
        self.evict(self.total_tokens)

    # ------------------------------------------------------------------ inspection
    def __len__(self) -> int:
        return len(self._nodes)

    @property
    def protected_tokens(self) -> int:
        return sum(nd.length for nd in self._nodes.values() if nd.lock_ref > 0)

    @property
    def evictable_tokens(self) -> int:
        return self.total_tokens - self.protected_tokens

    def node_slots(self, node_id: NodeId) -> tuple[int, ...]:
        return self._nodes[node_id].slots

    def lock_ref(self, node_id: NodeId) -> int:
        return self._nodes[node_id].lock_ref

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._nodes

    def check_invariants(self) -> None:
        """Assert the structural invariants; used by the property tests."""
        assert self.total_tokens == sum(nd.length for nd in self._nodes.values())
        assert self.total_tokens <= self.max_tokens, (self.total_tokens, self.max_tokens)
        for nd in self._nodes.values():
            assert nd.lock_ref >= 0
            assert nd.parent is not None and nd.parent.children.get(nd.key) is nd
            assert self._by_key[nd.key][nd.id] is nd
            assert nd.start_pos == (nd.parent.start_pos + nd.parent.length)
            child_locks = sum(c.lock_ref for c in nd.children.values())
            assert nd.lock_ref >= child_locks, (nd.id, nd.lock_ref, child_locks)
        assert sum(len(v) for v in self._by_key.values()) == len(self._nodes)


def _confirm(node: _Node, piece: Piece) -> None:
    if node.token_ids != piece.token_ids:
        raise SegmentHashCollisionError(
            f"segment hash {piece.key.hex()} names two different token sequences "
            f"(cached node {node.id} has {node.length} tokens, the request's piece {piece.length})"
        )
