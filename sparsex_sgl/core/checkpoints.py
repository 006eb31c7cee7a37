"""Where to keep recurrent-state checkpoints along a cached prefix (hybrid models; arXiv 2605.05219).

A recurrent layer's state depends on its whole left context, so a hybrid model can resume a prefix hit only
from a stored state at or below the hit's depth, and recomputes every token after it. Keeping a state every
chunk costs memory (one Gated DeltaNet state weighs as much as hundreds of tokens of attention KV); keeping
a few, where the hits land, costs little recomputation. ``place`` chooses ``m`` checkpoints that minimise the
expected recomputed tokens under the distribution of hit depths, which ``DepthHistogram`` learns online.

Depths are counted in bins of ``BIN`` tokens, the recurrent kernels' chunk: the prefill computes the state at
every chunk boundary anyway, so a checkpoint there costs a copy. A hit of depth ``t`` (bins) resumes from the
deepest checkpoint ``c <= t`` (bin 0, the empty prefix, always qualifies) and recomputes ``t - c`` bins.

Two kinds of hit are learned apart (``HitDepths``): a hit that ends inside or at a shared prefix (a document, a
system prompt) lands at the same absolute depth for many sequences, which the dynamic program serves; a hit that
continues a cached sequence at its very end (a conversation's next turn) lands at a different depth for each,
which only a state at each sequence's end serves. Each sequence keeps ``m`` states, one of them at its end when
the end hits save more than the ``m``-th placed checkpoint would.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

BIN = 64
"""Tokens per depth bin: the chunk of the chunked linear-attention and SSM kernels (FLA, SGLang)."""


def expected_recompute(p: Sequence[float], checkpoints: Sequence[int]) -> float:
    """Expected recomputed bins of a hit, hit depths distributed as ``p`` (weights per bin, any scale),
    resuming from the deepest of ``checkpoints`` (bins) at or below the depth, or from 0."""
    marks = sorted(set(checkpoints) | {0})
    total, k = 0.0, 0
    for t, weight in enumerate(p):
        while k + 1 < len(marks) and marks[k + 1] <= t:
            k += 1
        total += weight * (t - marks[k])
    return total


@dataclass(frozen=True)
class Placement:
    checkpoints: tuple[int, ...]
    """Bins holding a state, ascending (bin 0 is implicit: the empty prefix)."""
    cost: float
    """Expected recomputed bins per hit (in the weights' scale)."""


def place(p: Sequence[float], m: int) -> Placement:
    """The ``m`` checkpoints (at most; fewer if fewer bins help) minimising ``expected_recompute(p, ...)``.

    Dynamic program over the last checkpoint: with ``W0``/``W1`` the prefix sums of ``p_t`` and ``p_t t``,
    ``D_k(j) = min(D_{k-1}(j), W1(j) + min_{1<=s<=j} [b_s - s W0(j)])`` with ``b_s = D_{k-1}(s-1) - W1(s-1) +
    s W0(s-1)``: the inner minimum is the lower envelope of lines of slope ``-s`` queried at ``W0(j)``, which
    grows with ``j`` while slopes fall with ``s``, so a monotone queue (convex-hull trick) answers each ``j``
    in amortised O(1) and the whole program runs in O(N M), against O(N^2 M) for the plain loop."""
    n = len(p)
    if any(weight < 0 for weight in p):
        raise ValueError("depth weights must be >= 0")
    w0, w1 = [0.0] * (n + 1), [0.0] * (n + 1)  # shifted by one: w0[j + 1] = sum of p[0..j]
    for t, weight in enumerate(p):
        w0[t + 1] = w0[t] + weight
        w1[t + 1] = w1[t] + weight * t
    previous = [w1[j + 1] for j in range(n)]  # D_0(j): every hit recomputes from 0
    choices: list[list[int]] = []  # choices[k][j]: the last checkpoint of D_{k+1}(j), or -1 (none added)
    for _ in range(min(m, max(n - 1, 0))):
        current, chosen = list(previous), [-1] * n
        hull: list[tuple[float, float, int]] = []  # lines (slope, intercept, s), slopes falling
        head = 0
        for j in range(1, n):
            s = j  # the line of a checkpoint at bin j becomes available at j
            line = (-float(s), previous[s - 1] - w1[s] + s * w0[s], s)
            while len(hull) - head >= 2 and _useless(hull[-2], hull[-1], line):
                hull.pop()
            hull.append(line)
            head = min(head, len(hull) - 1)
            x = w0[j + 1]
            while head + 1 < len(hull) and _value(hull[head + 1], x) <= _value(hull[head], x):
                head += 1
            best = w1[j + 1] + _value(hull[head], x)
            if best < current[j]:
                current[j], chosen[j] = best, hull[head][2]
        choices.append(chosen)
        previous = current
    marks: list[int] = []
    j = n - 1
    for chosen in reversed(choices):
        if j >= 0 and chosen[j] > 0:
            marks.append(chosen[j])
            j = chosen[j] - 1
    checkpoints = tuple(sorted(marks))
    return Placement(checkpoints, expected_recompute(p, checkpoints))


def least_useful(p: Sequence[float], checkpoints: Sequence[int]) -> int:
    """The checkpoint whose loss raises the expected recomputation least: the first state to drop under
    memory pressure (before any KV, which every hit needs)."""
    if not checkpoints:
        raise ValueError("no checkpoint to drop")
    marks = sorted(checkpoints)
    return min(marks, key=lambda c: expected_recompute(p, [m for m in marks if m != c]))


def _value(line: tuple[float, float, int], x: float) -> float:
    return line[0] * x + line[1]


def _useless(a: tuple[float, float, int], b: tuple[float, float, int], c: tuple[float, float, int]) -> bool:
    """Whether ``b`` is nowhere strictly below both ``a`` and ``c`` (slopes a > b > c)."""
    return (c[1] - a[1]) * (a[0] - b[0]) <= (b[1] - a[1]) * (a[0] - c[0])


class DepthHistogram:
    """The hit depths of a cache's lookups (bins of ``BIN`` tokens, depth 0 for a miss), each earlier one
    weighing ``gamma`` times less per later one, so the placement follows traffic that drifts (0.99: the
    last few hundred lookups count). O(1) per observation: weights are kept in a growing scale, renormalised
    before it overflows."""

    def __init__(self, bins: int, gamma: float = 0.99) -> None:
        if bins < 1 or not 0.0 < gamma <= 1.0:
            raise ValueError("a histogram needs at least one bin and a decay in (0, 1]")
        self.gamma = gamma
        self._weights = [0.0] * bins
        self._scale = 1.0

    def observe(self, depth_tokens: int) -> None:
        """One lookup's hit depth in tokens (deeper than the last bin counts in the last bin)."""
        self.decay()
        self._weights[min(max(depth_tokens, 0) // BIN, len(self._weights) - 1)] += self._scale

    def decay(self) -> None:
        """One lookup that adds no depth: every earlier one weighs ``gamma`` times less."""
        self._scale /= self.gamma
        if self._scale > 1e100:
            self._weights = [w / self._scale for w in self._weights]
            self._scale = 1.0

    def weights(self) -> list[float]:
        """The decayed weight of each bin (the latest observation weighs 1)."""
        return [w / self._scale for w in self._weights]


def plan_sequence(p: Sequence[float], end_weight: float, m: int, length: int) -> tuple[int, ...]:
    """The offsets (tokens) at which a cached sequence of ``length`` tokens keeps its ``m`` states: the dynamic
    program over the depths it can serve (``p`` cut at its length), with one of them moved to its end when the
    hits that continue sequences at their end (``end_weight``, on ``p``'s scale) save more there."""
    if m < 1:
        return ()
    bins = length // BIN + 1
    cut = [*p[:bins], *[0.0] * (bins - len(p))]  # no hit on this sequence goes deeper than its length
    served = list(cut)  # without a state at the end, an end hit recomputes from the last checkpoint like a hit
    served[-1] += end_weight  # at the last bin, plus the same (length % BIN) tokens wherever that checkpoint is
    placed = place(served, m)
    if length % BIN == 0:  # the end is a chunk boundary: a state there is one of the placed checkpoints
        return tuple(c * BIN for c in placed.checkpoints)
    fewer = place(cut, m - 1)
    if fewer.cost < placed.cost + end_weight * (length % BIN) / BIN:
        return (*(c * BIN for c in fewer.checkpoints), length)
    return tuple(c * BIN for c in placed.checkpoints)


class HitDepths:
    """One namespace's learned hits: a decayed histogram of the depths of hits inside shared prefixes, the decayed
    weight of hits at a cached sequence's end, and the placements they give, re-solved every ``resolve_every``
    lookups (a sequence's plan depends on its length: solved once per length between re-solves). Every lookup by
    default: a new document's first hits then place its states at once (the document QA replay recomputes 93
    prefix tokens a request re-solving every lookup, 312 every 10), for 2 to 26 ms of Python per lookup
    (146 to 512 bins, 16 states; docs/results.md). Before the first solve a sequence keeps one state, at its end,
    as SGLang does."""

    def __init__(self, bins: int, m: int, resolve_every: int = 1, gamma: float = 0.99) -> None:
        if m < 1 or resolve_every < 1:
            raise ValueError("a placement needs at least one state per sequence and a re-solve period >= 1")
        self.m = m
        self.resolve_every = resolve_every
        self.histogram = DepthHistogram(bins, gamma)
        self._end_weight = 0.0
        self._since_solve = 0
        self._weights: list[float] | None = None
        self._end_snapshot = 0.0
        self._plans: dict[int, tuple[int, ...]] = {}

    def observe(self, depth_tokens: int, at_end: bool) -> None:
        """One lookup's hit depth, and whether it continues a cached sequence at that sequence's end."""
        gamma = self.histogram.gamma
        self._end_weight = self._end_weight * gamma + (1.0 if at_end else 0.0)
        if at_end:
            self.histogram.decay()
        else:
            self.histogram.observe(depth_tokens)
        self._since_solve += 1
        if self._since_solve >= self.resolve_every:
            self._weights, self._end_snapshot = self.histogram.weights(), self._end_weight
            self._plans.clear()
            self._since_solve = 0

    @property
    def end_weight(self) -> float:
        """The decayed weight of the hits at a cached sequence's end (on the histogram's scale)."""
        return self._end_weight

    @property
    def solved(self) -> bool:
        return self._weights is not None

    def plan(self, length: int) -> tuple[int, ...]:
        """The offsets at which a cached sequence of ``length`` tokens keeps a state."""
        if self._weights is None:
            return (length,)
        if length not in self._plans:
            self._plans[length] = plan_sequence(self._weights, self._end_snapshot, self.m, length)
        return self._plans[length]
