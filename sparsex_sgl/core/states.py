"""Recurrent-state checkpoints along the segment graph's exact paths (hybrid models; arXiv 2605.05219).

A hybrid model's recurrent layers resume only from a stored state, and only on an exact prefix: the graph keeps
the attention KV of every cached path whole, and this keeps each recurrent layer's state (conv window and SSM /
delta-rule state, one *state slot* of an engine pool) at a few offsets along those paths. A request resumes from
the deepest state at or below its exact prefix hit; every token after it is computed through all layers.

Where the states go is learned per namespace (tenants' traffic differs, ``core.checkpoints.HitDepths``): every
lookup's hit depth enters a decayed histogram, a hit that continues a cached sequence at its end is counted
apart, and every ``resolve_every`` lookups the ``per_sequence`` offsets that minimise the expected recomputed
tokens are re-solved. A prefill captures a state at each chosen offset it passes: the recurrent kernels' 64-token
chunk boundaries and the prefill's end, where the state exists anyway. Until a namespace has been solved once, a
sequence keeps one state, at its end, as SGLang does.

A state lives in the node whose tokens it ends in (``start < offset <= end``), so it goes with that node: the
KV it continues from goes too. Its own pool is bounded apart from the KV (one Gated DeltaNet state weighs as
much as hundreds of tokens of KV): when the pool is full the state whose loss adds the least expected
recomputation goes first, and never the state a running request resumes from (its node is locked). The
graph's KV is never evicted for a state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from sparsex_sgl.core.checkpoints import BIN, HitDepths
from sparsex_sgl.core.graph import Lookup, NodeId, SegmentGraph, SlotAllocator
from sparsex_sgl.core.segments import NamespaceKey


@dataclass(frozen=True)
class Resume:
    """Where a request starts: ``lookup`` cut to the state's offset (its ``prefix_len``), and the state slot to
    load, None when nothing is reused."""

    lookup: Lookup
    state_slot: int | None

    @property
    def offset(self) -> int:
        return self.lookup.prefix_len


@dataclass(eq=False)
class _State:
    slot: int
    offset: int
    namespace: NamespaceKey
    path: tuple[NodeId, ...]
    """The root path to the node holding it (ids never change, and a node's ancestors stay its ancestors)."""


@dataclass
class StateCheckpoints:
    """The recurrent states of ``graph``'s paths, in ``allocator``'s slots (at most ``max_states``)."""

    graph: SegmentGraph
    allocator: SlotAllocator
    max_states: int
    per_sequence: int = 16
    resolve_every: int = 1
    bins: int = 512
    """Histogram bins (64 tokens each): hits deeper than ``bins * 64`` tokens count in the last one."""
    _at: dict[NodeId, dict[int, _State]] = field(default_factory=dict)
    _ends: set[NodeId] = field(default_factory=set)
    """The last node of every cached sequence not continued since: a hit there continues it (a conversation's
    next turn)."""
    _traffic: dict[NamespaceKey, HitDepths] = field(default_factory=dict)
    _count: int = 0

    def __post_init__(self) -> None:
        if self.max_states < 1 or self.per_sequence < 1 or self.resolve_every < 1:
            raise ValueError("the state pool, the checkpoints per sequence and the re-solve period must be >= 1")
        self.graph.add_removal_listener(self._node_removed)

    # ------------------------------------------------------------------ lookup
    def resume(self, lookup: Lookup, namespace: NamespaceKey, learn: bool = True) -> Resume:
        """The deepest state within ``lookup``'s exact prefix hit (the request's last token is never inside
        it), and the lookup cut there; the hit depth is learned for the namespace's placement (``learn``: once
        per request, where an engine matches a request more than once)."""
        hit = lookup.exact_prefix_len
        if learn:
            last = lookup.prefix_node_ids[-1] if lookup.prefix_node_ids else None
            at_end = last in self._ends and self.graph.node_span(last)[1] == hit
            self._learned(namespace).observe(hit, at_end)
        best: _State | None = None
        for node_id in lookup.prefix_node_ids:
            for state in self._at.get(node_id, {}).values():
                if state.offset <= hit and (best is None or state.offset > best.offset):
                    best = state
        if best is None:
            return Resume(self.graph.prefix_only(lookup, 0), None)
        return Resume(self.graph.prefix_only(lookup, best.offset), best.slot)

    def _learned(self, namespace: NamespaceKey) -> HitDepths:
        if namespace not in self._traffic:
            self._traffic[namespace] = HitDepths(self.bins, self.per_sequence, self.resolve_every)
        return self._traffic[namespace]

    # ------------------------------------------------------------------ capture
    def plan(self, namespace: NamespaceKey, resumed_from: int, n_tokens: int) -> tuple[int, ...]:
        """The offsets in ``(resumed_from, n_tokens]`` where a prefill of ``n_tokens`` should capture a state."""
        return tuple(c for c in self._learned(namespace).plan(n_tokens) if resumed_from < c <= n_tokens)

    def alloc(self, n: int) -> list[int] | None:
        """``n`` state slots, dropping the least useful states when the pool is full (None: too many are in use
        by running requests)."""
        if n > self.max_states:
            return None
        over = self._count + n - self.max_states
        if over > 0:
            self._drop(over)
        if self._count + n > self.max_states:
            return None
        slots = self.allocator.alloc(n)
        if slots is None and self._drop(n):
            slots = self.allocator.alloc(n)
        return slots

    def adopt(self, path: Sequence[NodeId | None], captured: dict[int, int], namespace: NamespaceKey) -> int:
        """Keep the states a prefill captured (``captured``: offset -> slot from ``alloc``) in the nodes of the
        request's graph ``path`` (``InsertResult.node_ids``) that end at or after them; a state whose node was
        not cached, is not exact, or already has a state there is freed. Returns how many were kept."""
        nodes = [nid for nid in path if nid is not None]
        self._ends.difference_update(nodes[:-1])  # continued: its next turn is this sequence's
        if nodes and len(nodes) == len(path):
            self._ends.add(nodes[-1])
        spans = [(nid, *self.graph.node_span(nid)) for nid in nodes]
        kept, freed = 0, []
        for offset, slot in sorted(captured.items()):
            place_at = next((i for i, (_, start, end) in enumerate(spans) if start < offset <= end), None)
            if place_at is None or not self.graph.is_exact(nodes[place_at]):
                freed.append(slot)
                continue
            node_id = nodes[place_at]
            held = self._at.setdefault(node_id, {})
            if offset in held or self._count >= self.max_states:
                freed.append(slot)
                continue
            held[offset] = _State(slot, offset, namespace, tuple(nodes[: place_at + 1]))
            self._count += 1
            kept += 1
        if freed:
            self.allocator.free(freed)
        return kept

    # ------------------------------------------------------------------ memory
    def evict(self, n: int) -> int:
        """Free up to ``n`` unlocked states, least expected gain first (an engine short of state slots)."""
        return self._drop(n) if n > 0 else 0

    def _drop(self, n: int) -> int:
        """Free ``n`` unlocked states, least expected gain first (then least recently used)."""
        gains = self._gains()
        victims = sorted(gains, key=lambda s: (gains[s], self.graph.last_access(s.path[-1])))[:n]
        for state in victims:
            del self._at[state.path[-1]][state.offset]
            if not self._at[state.path[-1]]:
                del self._at[state.path[-1]]
        self._release(victims)
        return len(victims)

    def _gains(self) -> dict[_State, float]:
        """Each unlocked state's expected gain: the hits that resume from it times the tokens they would recompute
        without it (down to the state before it), under its namespace's learned hits. A state inside shared
        prefixes serves the hit depths from its offset up to the next state above it on any path; a state at a
        sequence's end serves that sequence's continuations, a share of the namespace's end hits."""
        deeper: dict[NodeId, list[int]] = {}
        ends: dict[NamespaceKey, int] = {}
        for states in self._at.values():
            for state in states.values():
                for node_id in state.path:
                    deeper.setdefault(node_id, []).append(state.offset)
                ends[state.namespace] = ends.get(state.namespace, 0) + self._at_end(state)
        gains: dict[_State, float] = {}
        for node_id, states in self._at.items():
            if self.graph.lock_ref(node_id) > 0:
                continue
            for state in states.values():
                below = [s.offset for nid in state.path for s in self._at.get(nid, {}).values()
                         if s.offset < state.offset]
                learned = self._learned(state.namespace)
                if self._at_end(state):
                    hits = learned.end_weight / ends[state.namespace]
                else:
                    weights = learned.histogram.weights()
                    above = [o for o in deeper[node_id] if o > state.offset]
                    hits = sum(weights[state.offset // BIN : min(above) // BIN if above else len(weights)])
                gains[state] = hits * (state.offset - max(below, default=0))
        return gains

    def _at_end(self, state: _State) -> bool:
        return state.path[-1] in self._ends and self.graph.node_span(state.path[-1])[1] == state.offset

    def _node_removed(self, node_id: NodeId) -> None:
        self._ends.discard(node_id)
        self._release(list(self._at.pop(node_id, {}).values()))

    def _release(self, states: Sequence[_State]) -> None:
        self._count -= len(states)
        if states:
            self.allocator.free([s.slot for s in states])

    # ------------------------------------------------------------------ inspection
    def __len__(self) -> int:
        return self._count

    def locked(self) -> int:
        """How many states a running request may resume from (their nodes are locked)."""
        return sum(len(states) for node_id, states in self._at.items() if self.graph.lock_ref(node_id) > 0)

    def slots(self) -> list[int]:
        return [state.slot for states in self._at.values() for state in states.values()]

    def offsets(self, node_id: NodeId) -> tuple[int, ...]:
        """The offsets holding a state in ``node_id``, ascending."""
        return tuple(sorted(self._at.get(node_id, {})))

    def learned(self, namespace: NamespaceKey) -> HitDepths:
        """What the namespace's lookups taught (its placement per sequence length)."""
        return self._learned(namespace)
