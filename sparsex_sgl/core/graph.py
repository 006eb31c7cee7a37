"""The segment graph: which segments' KV is cached, under which context, and where it lives.

A node is one piece's KV computed under one context: the path of pieces from the root to it. Its
children are the pieces observed to follow it, so a root path equal to the request's leading pieces
is a prefix hit (nothing to repair), as in a radix tree; ``align`` lets a request follow gap cuts that
earlier requests cached (a prompt's last block, the tokens decoded after it). A reusable piece found
anywhere else in the graph is a *non-prefix hit*: its KV was computed at ``source_start`` and must be
re-rotated to the request's position and partly recomputed.

A node is *exact* when its KV equals a full prefill of its root path, and *blended* when it was computed
over reused, partly recomputed KV. Blended nodes serve only as prefix hits, to requests that resend the
very same pieces (a chat's next round after an edit), never as non-prefix sources: the KV is then the
one the earlier request already answered with, and nothing is approximated twice.

The graph stores no tensors. It owns KV *slots* in an engine pool, obtained through an injected
allocator, so the same bookkeeping serves SGLang's pool and the reference executor's pool, and is
tested on the CPU with exact slot ids. Eviction is LRU over unlocked leaves, within a token budget.

Accounting follows SGLang's ``RadixCache``: the protected (locked) token count is kept as locks change,
and eviction pops a heap of leaves, so neither costs a scan of the graph (a GPU server caches millions of
tokens, and the scheduler waits for every lock, unlock and eviction; ``bench/graph_scale.py``).

Segments can outlive the graph (docs/how-it-works.md, "Tiers"): an exact segment node that eviction removes
is handed to ``on_evict`` first, while its slots still hold its KV, so a lower tier can keep it; a segment
loaded back from such a tier enters as a *detached* node (``insert_detached``): its context is not a root
path of this graph, so it serves only as a non-prefix source, which is all a moved segment needs.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NewType, Protocol

from sparsex_sgl.core.errors import SegmentHashCollisionError
from sparsex_sgl.core.segments import Piece, SegmentHash

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
    child_lengths: Counter[int] = field(default_factory=Counter)
    """How many children have each length: the cuts ``SegmentGraph.align`` tries."""
    exact: bool = True
    reusable: bool = False
    """Inserted as a client-marked segment (a gap block is never worth keeping below the graph)."""
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
class EvictedSegment:
    """An exact segment node being evicted: its tokens, the position its KV was computed at, and the slots
    that still hold that KV while ``on_evict`` runs (they are freed right after)."""

    key: SegmentHash
    token_ids: tuple[int, ...]
    start_pos: int
    slots: tuple[int, ...]


@dataclass(frozen=True)
class Lookup:
    """What a request can take from the cache.

    Positions ``[0, prefix_len)`` are a prefix hit, each ``reused`` span is a non-prefix hit, and
    ``new_rows`` (the Sparse-Q rows) must be computed. The three cover the prompt without overlap; the
    last token is always in ``new_rows`` because its logits start decoding. The prefix hit's KV equals a
    full prefill's up to ``exact_prefix_len``, and is blended after it.
    """

    n_tokens: int
    prefix_len: int
    prefix_node_ids: tuple[NodeId, ...]
    prefix_slots: tuple[int, ...]
    reused: tuple[ReusedSegment, ...]
    new_rows: tuple[int, ...]
    exact_prefix_len: int

    @property
    def n_reused_tokens(self) -> int:
        return sum(r.length for r in self.reused)

    @property
    def node_ids(self) -> tuple[NodeId, ...]:
        """Every node the lookup reads, to be locked while the request runs."""
        return self.prefix_node_ids + tuple(r.node_id for r in self.reused)


def segments_it_caches(pieces: Sequence[Piece], lookup: Lookup) -> frozenset[SegmentHash]:
    """Keys of the segments a request will compute exactly, and so cache, under ``lookup``.

    Those are the reusable pieces after its exact prefix and before its first reused segment: a row
    before any reused token attends only to exact KV. (Pieces after a reused segment are computed over
    approximate KV and are not cached; see ``SparseRows.exact_len``.) A second request carrying one of
    these segments gains nothing from running in the same batch, where it computes the segment again;
    one batch later it reuses it.
    """
    first_reused = min((r.target_start for r in lookup.reused), default=lookup.n_tokens)
    return frozenset(p.key for p in pieces if p.reusable and p.start >= lookup.prefix_len and p.end <= first_reused)


def segments_it_computes(pieces: Sequence[Piece], lookup: Lookup) -> frozenset[SegmentHash]:
    """Keys of the segments a request computes under ``lookup``: those neither in its prefix hit nor reused.

    A request should wait for a segment another admitted request is about to cache only if it would
    otherwise compute that segment itself (``request.should_defer``).
    """
    reused = {r.target_start for r in lookup.reused}
    return frozenset(p.key for p in pieces if p.reusable and p.start >= lookup.prefix_len and p.start not in reused)


@dataclass(frozen=True)
class InsertResult:
    """Per piece: the node now holding it, and whether the caller's slots were adopted.

    Slots of pieces that were not adopted (already cached, or no room) stay the caller's to free.
    ``node_ids[i]`` is None where a piece could not be cached, and then for every later piece;
    ``collision`` says a piece stopped there because its hash names other cached tokens.
    """

    node_ids: tuple[NodeId | None, ...]
    adopted: tuple[bool, ...]
    collision: bool = False


class SegmentGraph:
    """Segment KV bookkeeping with exact-prefix and non-prefix lookup, refcounts and LRU eviction."""

    def __init__(self, allocator: SlotAllocator, max_tokens: int,
                 on_evict: Callable[[EvictedSegment], None] | None = None) -> None:
        """``on_evict`` sees every exact segment node that eviction removes, before its slots are freed
        (never at ``reset``, which drops everything); an exception it raises propagates only after the
        node is gone, so the graph stays consistent."""
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        self._allocator = allocator
        self.max_tokens = max_tokens
        self._ids = itertools.count(1)
        self._clock = itertools.count(1)
        self._on_evict = on_evict
        self._removal_listeners: list[Callable[[NodeId], None]] = []
        self._root = _Node(NodeId(0), None, SegmentHash(b""), (), (), 0)
        self._detached = _Node(NodeId(-1), None, SegmentHash(b""), (), (), 0)
        """Parent of the detached nodes: never walked by a prefix lookup, so they are never a prefix hit."""
        self._nodes: dict[NodeId, _Node] = {}
        self._by_key: dict[SegmentHash, dict[NodeId, _Node]] = {}
        self.total_tokens = 0
        self.protected_tokens = 0
        """Tokens of nodes with a lock (kept as locks change: SGLang asks for it on every lock and unlock)."""
        self._lru: list[tuple[int, NodeId]] = []
        """Heap of ``(last_access, id)`` pushed whenever a node may have become an evictable leaf; entries
        that no longer describe one (locked, parent again, touched since, removed) are skipped at pop."""

    def add_removal_listener(self, listener: Callable[[NodeId], None]) -> None:
        """Call ``listener`` with the id of every node that leaves the graph (eviction or ``reset``), after it
        left: what hangs on a node (a recurrent state, ``core.states``) goes with it."""
        self._removal_listeners.append(listener)

    # ------------------------------------------------------------------ lookup
    def align(self, pieces: Sequence[Piece], make_gap: Callable[[int, int], Piece]) -> list[Piece]:
        """Re-cut the gaps of ``pieces`` along the cached exact path, so that the prefix hit follows it.

        Gaps are cut in blocks counted from their start, but a cached path may cut a gap elsewhere: a
        prompt that ended inside a block, followed by the tokens decoded after it (a chat's next round
        resends both). Along the path, each gap takes the longest cached child its next tokens equal, as a
        radix tree would at piece granularity; where no child continues it, the rest of the current block
        becomes one piece and the later pieces stay as they were. Segments are never re-cut, and the
        result covers the same positions. ``make_gap(start, end)`` makes the gap piece ``[start, end)``
        of the request (its namespace decides the key, so tenants never share a cut).
        """
        out: list[Piece] = []
        node = self._root
        i = 0
        while i < len(pieces):
            piece = pieces[i]
            if piece.reusable:
                child = node.children.get(piece.key)
                if child is None:
                    return out + list(pieces[i:])
                out.append(piece)
                node = child
                i += 1
                continue
            j = next((k for k in range(i, len(pieces)) if pieces[k].reusable), len(pieces))
            region_end = pieces[j - 1].end
            cursor = piece.start
            while cursor < region_end:
                step = self._cached_gap(node, cursor, region_end, make_gap)
                if step is None:
                    k = next(k for k in range(i, j) if pieces[k].end > cursor)
                    if pieces[k].start == cursor:
                        return out + list(pieces[k:])
                    return out + [make_gap(cursor, pieces[k].end)] + list(pieces[k + 1 :])
                gap, node = step
                out.append(gap)
                cursor = gap.end
            i = j
        return out

    def cached_path_length(self, pieces: Sequence[Piece]) -> int:
        """How many leading tokens of ``pieces`` lie on a cached root path (their prefix hit, uncapped)."""
        return sum(nd.length for nd in self._cached_path(pieces))

    def root_path(self, pieces: Sequence[Piece]) -> tuple[NodeId, ...]:
        """The ids of the cached root path's nodes that the leading pieces follow."""
        return tuple(nd.id for nd in self._cached_path(pieces))

    def _cached_path(self, pieces: Sequence[Piece]) -> list[_Node]:
        """The nodes of the root path that the leading pieces follow, each confirmed on its token ids."""
        path: list[_Node] = []
        node = self._root
        for piece in pieces:
            child = node.children.get(piece.key)
            if child is None:
                break
            _confirm(child, piece)
            path.append(child)
            node = child
        return path

    def _cached_gap(self, node: _Node, start: int, region_end: int,
                    make_gap: Callable[[int, int], Piece]) -> tuple[Piece, _Node] | None:
        """The longest child of ``node`` that the gap's tokens from ``start`` equal, within the gap."""
        for length in sorted(node.child_lengths, reverse=True):
            if start + length > region_end:
                continue
            gap = make_gap(start, start + length)
            child = node.children.get(gap.key)
            if child is not None:
                _confirm(child, gap)
                return gap, child
        return None

    def lookup(self, pieces: Sequence[Piece]) -> Lookup:
        """Plan a request: exact prefix path first, then reusable pieces found anywhere."""
        if not pieces:
            raise ValueError("lookup needs at least one piece")
        n = pieces[-1].end
        now = next(self._clock)
        prefix_nodes = self._cached_path(pieces)
        for nd in prefix_nodes:
            self._touch(nd, now)
        covered = sum(p.length for p in pieces[: len(prefix_nodes)])
        prefix_len = min(covered, n - 1)
        blended = next((i for i, nd in enumerate(prefix_nodes) if not nd.exact), len(prefix_nodes))
        exact_prefix_len = min(sum(nd.length for nd in prefix_nodes[:blended]), prefix_len)
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
            self._touch(hit, now)
            length = piece.length - (1 if piece.end == n else 0)  # the last token is always computed
            if length > 0:
                reused.append(ReusedSegment(hit.id, hit.start_pos, piece.start, length, hit.slots[:length]))
            if piece.end == n:
                new_rows.append(n - 1)
        if prefix_len < covered:  # the whole prompt was an exact path: recompute its last token
            new_rows.append(n - 1)
        return Lookup(
            n_tokens=n,
            prefix_len=prefix_len,
            prefix_node_ids=tuple(nd.id for nd in prefix_nodes),
            prefix_slots=prefix_slots,
            reused=tuple(reused),
            new_rows=tuple(new_rows),
            exact_prefix_len=exact_prefix_len,
        )

    def prefix_only(self, lookup: Lookup, prefix_len: int) -> Lookup:
        """``lookup`` with its non-prefix hits dropped and its prefix cut to ``prefix_len`` (an engine's cap,
        or the exact part for a request that must be exact): everything after is computed. Only the
        nodes the cut prefix still reads stay in it, so a blended node past the cut is not locked and
        the request's exact KV can replace it (``insert``)."""
        kept = tuple(nid for nid in lookup.prefix_node_ids if self._nodes[nid].start_pos < prefix_len)
        return Lookup(lookup.n_tokens, prefix_len, kept, lookup.prefix_slots[:prefix_len], (),
                          tuple(range(prefix_len, lookup.n_tokens)), min(lookup.exact_prefix_len, prefix_len))

    def _best_candidate(self, piece: Piece, previous_key: SegmentHash | None) -> _Node | None:
        """Among exact nodes holding this piece, prefer one cached after the same predecessor, then the newest."""
        candidates = [nd for nd in self._by_key.get(piece.key, {}).values() if nd.exact]
        if not candidates:
            return None
        best = max(
            candidates,
            key=lambda nd: (nd.parent is not None and nd.parent.key == previous_key, nd.last_access, nd.id),
        )
        _confirm(best, piece)
        return best

    # ------------------------------------------------------------------ insert
    def insert(self, pieces: Sequence[Piece], slots: Sequence[int], exact_len: int | None = None) -> InsertResult:
        """Record a request's pieces as a root path, adopting the caller's slots for new nodes.

        ``slots[i]`` holds the KV of prompt position ``pieces[0].start + i``; the pieces must start at 0
        and be contiguous, because a node's context is its whole root path. The caller's KV equals a full
        prefill's up to ``exact_len`` (default: everywhere); pieces that end after it become blended
        nodes. An unlocked blended node is upgraded in place when the caller has the piece exactly.
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
        collision = False
        try:
            for piece in pieces:
                child = node.children.get(piece.key)
                exact = exact_len is None or piece.end <= exact_len
                if child is not None:
                    if child.token_ids != piece.token_ids:  # never raise here: earlier pieces were adopted
                        collision = True
                        break
                    child.reusable |= piece.reusable
                    took = exact and not child.exact
                    if took and child.lock_ref > 0:  # a running request reads the blended KV: keep it
                        break
                    if took:
                        self._allocator.free(child.slots)
                        child.slots, child.exact = tuple(slots[piece.start : piece.end]), True
                elif self._make_room(piece.length):
                    child = self._add_node(node, piece, tuple(slots[piece.start : piece.end]), exact)
                    took = True
                else:
                    break
                child.last_access = now  # locked just below; pushed to the LRU heap when unlocked
                self._inc(child)  # the path under construction must not be evicted by later pieces
                path.append(child)
                node_ids.append(child.id)
                adopted.append(took)
                node = child
        finally:
            for nd in path:
                self._dec(nd)
        missing = len(pieces) - len(node_ids)
        return InsertResult(tuple(node_ids) + (None,) * missing, tuple(adopted) + (False,) * missing, collision)

    def placed_path(self, pieces: Sequence[Piece], result: InsertResult | None) -> tuple[list[int], NodeId | None]:
        """The slots of positions ``0..`` that the graph holds for ``pieces`` after an insert of them, and the
        path's last node: the pieces ``result`` placed, or (the insert did not return) the cached root path
        the leading pieces follow, without raising on a hash collision (it ends the path)."""
        slots: list[int] = []
        last: NodeId | None = None
        if result is not None:
            for node_id in result.node_ids:
                if node_id is None:
                    break
                slots.extend(self._nodes[node_id].slots)
                last = node_id
            return slots, last
        node = self._root
        for piece in pieces:
            child = node.children.get(piece.key)
            if child is None or child.token_ids != piece.token_ids:
                break
            slots.extend(child.slots)
            last, node = child.id, child
        return slots, last

    def has_source(self, key: SegmentHash) -> bool:
        """Whether an exact node holds the piece ``key`` names (a lookup can reuse it without loading)."""
        return any(nd.exact for nd in self._by_key.get(key, {}).values())

    def insert_detached(self, piece: Piece, slots: Sequence[int], source_start: int) -> NodeId | None:
        """Adopt ``slots`` holding the exact KV of ``piece``'s tokens computed at ``source_start`` under a
        context this graph does not hold (a segment loaded from a lower tier, or prefilled behind a sink
        prefix), as a node that serves only as a non-prefix source. Returns its id, or None (slots not
        adopted) when there is no room or a detached node holds the piece already."""
        if len(slots) != piece.length or not piece.reusable:
            raise ValueError(f"a detached node holds a segment: {len(slots)} slots for a {piece.length}-token "
                             f"piece (reusable: {piece.reusable})")
        if piece.key in self._detached.children or not self._make_room(piece.length):
            return None
        node = self._add_node(self._detached, piece, tuple(slots), exact=True, start_pos=source_start)
        self._touch(node, next(self._clock))
        return node.id

    def _add_node(self, parent: _Node, piece: Piece, slots: tuple[int, ...], exact: bool,
                  start_pos: int | None = None) -> _Node:
        assert len(slots) == piece.length, (len(slots), piece.length)
        node = _Node(NodeId(next(self._ids)), parent, piece.key, piece.token_ids, slots,
                     piece.start if start_pos is None else start_pos, exact=exact, reusable=piece.reusable)
        parent.children[piece.key] = node
        parent.child_lengths[node.length] += 1
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
        while nd is not None and nd.parent is not None:  # up to the root (or the detached nodes' parent)
            if nd.lock_ref == 0:
                self.protected_tokens += nd.length
            nd.lock_ref += 1
            nd = nd.parent

    def _dec(self, node: _Node) -> None:
        nd: _Node | None = node
        while nd is not None and nd.parent is not None:
            assert nd.lock_ref > 0, f"unlock of node {nd.id} whose lock_ref is {nd.lock_ref}"
            nd.lock_ref -= 1
            if nd.lock_ref == 0:
                self.protected_tokens -= nd.length
                self._push_if_evictable(nd)
            nd = nd.parent

    def _touch(self, node: _Node, now: int) -> None:
        node.last_access = now
        self._push_if_evictable(node)

    def _push_if_evictable(self, node: _Node) -> None:
        if not node.children and node.lock_ref == 0:
            heapq.heappush(self._lru, (node.last_access, node.id))
            if len(self._lru) > 2 * len(self._nodes) + 1024:  # mostly stale entries: rebuild
                self._lru = [(nd.last_access, nd.id) for nd in self._nodes.values()
                             if not nd.children and nd.lock_ref == 0]
                heapq.heapify(self._lru)

    # ------------------------------------------------------------------ memory
    def alloc(self, n: int) -> list[int] | None:
        """Slots from the engine allocator, evicting unlocked LRU leaves when it is full."""
        while True:
            slots = self._allocator.alloc(n)
            if slots is not None:
                return slots
            if self.evict(1) == 0:
                return None

    def free_slots(self, slots: Sequence[int]) -> None:
        """Give back slots from ``alloc`` that no node adopted."""
        self._allocator.free(slots)

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
        while freed < n_tokens and self._lru:
            last_access, nid = heapq.heappop(self._lru)
            victim = self._nodes.get(nid)
            if victim is None or victim.children or victim.lock_ref or victim.last_access != last_access:
                continue  # stale: the node changed since this entry was pushed
            freed += victim.length
            self._remove(victim, spill=True)
        return freed

    def _remove(self, node: _Node, spill: bool = False) -> None:
        assert node.parent is not None and not node.children and node.lock_ref == 0
        del node.parent.children[node.key]
        lengths = node.parent.child_lengths
        lengths[node.length] -= 1
        if not lengths[node.length]:
            del lengths[node.length]
        del self._nodes[node.id]
        same_key = self._by_key[node.key]
        del same_key[node.id]
        if not same_key:
            del self._by_key[node.key]
        self.total_tokens -= node.length
        try:
            if spill and self._on_evict is not None and node.exact and node.reusable:
                self._on_evict(EvictedSegment(node.key, node.token_ids, node.start_pos, node.slots))
        finally:
            self._allocator.free(node.slots)
            if node.parent.parent is not None:  # not a root: the parent may have become a leaf
                self._push_if_evictable(node.parent)
            for listener in self._removal_listeners:
                listener(node.id)

    def reset(self) -> int:
        """Drop every node and free its slots; returns how many were still locked.

        Engines reset only when idle (SGLang's ``/flush_cache``, which then clears its allocator), so a
        lock left at that point is a leak, and keeping its node would hand out its slots twice."""
        leaked = sum(1 for nd in self._nodes.values() if nd.lock_ref > 0)
        removed = list(self._nodes)
        for nd in self._nodes.values():
            self._allocator.free(nd.slots)
        for root in (self._root, self._detached):
            root.children.clear()
            root.child_lengths.clear()
        self._nodes.clear()
        self._by_key.clear()
        self._lru.clear()
        self.total_tokens = self.protected_tokens = 0
        for node_id in removed:
            for listener in self._removal_listeners:
                listener(node_id)
        return leaked

    # ------------------------------------------------------------------ inspection
    def __len__(self) -> int:
        return len(self._nodes)

    @property
    def evictable_tokens(self) -> int:
        return self.total_tokens - self.protected_tokens

    def node_slots(self, node_id: NodeId) -> tuple[int, ...]:
        return self._nodes[node_id].slots

    def node_span(self, node_id: NodeId) -> tuple[int, int]:
        """The positions ``[start, end)`` of the node's tokens in its context."""
        node = self._nodes[node_id]
        return node.start_pos, node.start_pos + node.length

    def last_access(self, node_id: NodeId) -> int:
        return self._nodes[node_id].last_access

    def is_exact(self, node_id: NodeId) -> bool:
        return self._nodes[node_id].exact

    def lock_ref(self, node_id: NodeId) -> int:
        return self._nodes[node_id].lock_ref

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._nodes

    def check_invariants(self) -> None:
        """Assert the structural invariants; used by the property tests."""
        assert self.total_tokens == sum(nd.length for nd in self._nodes.values())
        assert self.protected_tokens == sum(nd.length for nd in self._nodes.values() if nd.lock_ref > 0)
        queued = set(self._lru)
        for nd in self._nodes.values():
            if not nd.children and nd.lock_ref == 0:
                assert (nd.last_access, nd.id) in queued, f"evictable leaf {nd.id} is not in the LRU heap"
        assert self.total_tokens <= self.max_tokens, (self.total_tokens, self.max_tokens)
        for nd in self._nodes.values():
            assert nd.lock_ref >= 0
            assert nd.parent is not None and nd.parent.children.get(nd.key) is nd
            assert self._by_key[nd.key][nd.id] is nd
            if nd.parent is self._detached:
                assert nd.exact and nd.reusable and not nd.children, nd.id
            else:
                assert nd.start_pos == (nd.parent.start_pos + nd.parent.length)
            assert nd.child_lengths == Counter(c.length for c in nd.children.values()), nd.id
            child_locks = sum(c.lock_ref for c in nd.children.values())
            assert nd.lock_ref >= child_locks, (nd.id, nd.lock_ref, child_locks)
        assert sum(len(v) for v in self._by_key.values()) == len(self._nodes)


def _confirm(node: _Node, piece: Piece) -> None:
    if node.token_ids != piece.token_ids:
        raise SegmentHashCollisionError(
            f"segment hash {piece.key.hex()} names two different token sequences "
            f"(cached node {node.id} has {node.length} tokens, the request's piece {piece.length})"
        )
