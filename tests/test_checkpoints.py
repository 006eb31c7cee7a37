"""Checkpoint placement for hybrid models (issue 36): the O(N M) dynamic program against brute force over every
placement of at most ``m`` checkpoints, a sequence's plan (with or without a state at its end) against brute force
over every plan, and the decayed depth histogram against its definition."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsex_sgl.core.checkpoints import (
    BIN,
    DepthHistogram,
    HitDepths,
    expected_recompute,
    least_useful,
    place,
    plan_sequence,
)


def brute_force(p: list[float], m: int) -> float:
    bins = range(1, len(p))
    return min(expected_recompute(p, marks) for k in range(m + 1) for marks in itertools.combinations(bins, k))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(0, 10, allow_nan=False), min_size=1, max_size=9), st.integers(0, 4))
def test_the_dynamic_program_finds_the_brute_force_optimum(p: list[float], m: int) -> None:
    placement = place(p, m)
    assert len(placement.checkpoints) <= m and all(0 < c < len(p) for c in placement.checkpoints)
    assert placement.cost == pytest.approx(expected_recompute(p, placement.checkpoints))
    assert placement.cost == pytest.approx(brute_force(p, m), rel=1e-9, abs=1e-9)


def test_checkpoints_go_where_the_hits_land() -> None:
    p = [0.0] * 40
    p[10], p[25], p[33] = 5.0, 3.0, 1.0
    assert place(p, 2).checkpoints == (10, 25)
    assert place(p, 3).checkpoints == (10, 25, 33) and place(p, 3).cost == 0.0
    assert place(p, 0).cost == expected_recompute(p, ()) == 5 * 10 + 3 * 25 + 33
    assert least_useful(p, (10, 25, 33)) == 33  # dropping it costs 1 * (33 - 25); 10 or 25 would cost more


def test_the_histogram_decays_earlier_depths() -> None:
    h = DepthHistogram(bins=4, gamma=0.5)
    for depth in (0, BIN, 2 * BIN + 5, 10 * BIN):  # the last one is deeper than the last bin
        h.observe(depth)
    assert h.weights() == pytest.approx([0.125, 0.25, 0.5, 1.0])
    for _ in range(2000):  # the scale renormalises instead of overflowing
        h.observe(BIN)
    assert h.weights()[1] == pytest.approx(2.0) and h.weights()[3] == pytest.approx(0.0)


def sequence_cost(p: list[float], end_weight: float, length: int, offsets: tuple[int, ...]) -> float:
    """Expected recomputed bins of a hit on a sequence keeping states at ``offsets`` (tokens)."""
    inside = expected_recompute(p[: length // BIN + 1], [o // BIN for o in offsets if o % BIN == 0])
    return inside + end_weight * (length - max(offsets, default=0)) / BIN


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 10, allow_nan=False), min_size=2, max_size=8), st.floats(0, 20, allow_nan=False),
       st.integers(1, 3), st.integers(BIN, 9 * BIN))
def test_a_sequence_plan_is_the_brute_force_optimum(p: list[float], end_weight: float, m: int, length: int) -> None:
    offsets = plan_sequence(p, end_weight, m, length)
    assert len(offsets) <= m and all(0 < o <= length for o in offsets)
    bins = [b * BIN for b in range(1, length // BIN + 1)]
    best = min(sequence_cost(p, end_weight, length, (*marks, *end))
               for end in ((), (length,)) for k in range(m + 1 - len(end))
               for marks in itertools.combinations(bins, k))
    assert sequence_cost(p, end_weight, length, offsets) == pytest.approx(best, rel=1e-9, abs=1e-9)


def test_hits_at_sequence_ends_are_learned_apart() -> None:
    learned = HitDepths(bins=8, m=2, resolve_every=4)
    assert learned.plan(300) == (300,)  # before the first solve: one state at the end, as SGLang keeps
    for _ in range(4):
        learned.observe(2 * BIN + 10, at_end=False)
    assert learned.plan(300) == (2 * BIN,)
    for _ in range(8):  # conversations continue: their next turns hit the cached sequences' ends
        learned.observe(5 * BIN + 3, at_end=True)
    assert learned.plan(300) == (2 * BIN, 300) and learned.histogram.weights()[5] == 0.0
