"""Token selection: which reused tokens are recomputed in the sparse layers.

All policies score the reused tokens of one request and take the top ones within a budget; they differ
only in the signal. The attention-mass policies read the mass that the Sparse-Q rows (the new tokens,
computed in every layer anyway) put on each reused token, from the log-sum-exp of their attention:

- ``sparse_q`` (SparseX's first signal): the distance between each reused token's fresh and re-aligned
  cached value at the last full layer, weighted by that mass shrunk toward the mean mass
  (``sparse_q_signal``). Deviation says how stale a token's KV is; mass says how much the new tokens
  read it. With the shipped prior it is mostly deviation (README, "Choosing the SparseX signal").
- ``query_mass``: the mass alone, not multiplied by deviation (ProphetKV's ordering). A token the
  question does not read cannot change the answer however stale it is; ranking by deviation lets tokens
  salient to the whole prompt but not to the question use up the budget ("crowding out"). Which rows'
  mass, at which layers and how heads combine are ``HybridConfig.mass_rows`` / ``mass_layers`` /
  ``mass_heads``.
- Where the mass comes from is ``HybridConfig.mass_pass``: the full layers of the one forward, or (a
  comparison point, reference executor only) a *look-ahead* pass: the new rows first run alone through
  every layer over the stale re-aligned KV, and their mass summed over all layers scores the tokens. It
  sees the mass of the very layers that will read the stale KV, where the threshold layer sees only an
  early layer's broad attention, at the price of a second pass over the new rows (counted in the FLOPs),
  so it departs from the single-pass design. Both mass policies take either source.
- ``kv_deviation`` (CacheBlend-style): distance between the fresh value vectors of the full layers and
  the re-aligned cached ones.
- ``first_k`` (EPIC-style): the first tokens of every moved segment, which acted as attention sinks
  when the segment was cached alone.
- ``none``: nothing (naive reuse).

The budget is fixed (``recompute_ratio`` of the reused tokens) or adaptive (``HybridConfig.coverage``:
the fewest top tokens whose signal covers that share of the request's total, at most the fixed budget),
so a request whose question reads little of the reused text recomputes little.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from sparsex_sgl.graph import ReusedSegment

Selection = Literal["sparse_q", "query_mass", "kv_deviation", "first_k", "none"]
SELECTIONS: tuple[str, ...] = ("sparse_q", "query_mass", "kv_deviation", "first_k", "none")
SIGNAL_SELECTIONS: tuple[str, ...] = ("sparse_q", "query_mass", "kv_deviation")
"""Policies that select after a computed layer, hence at least one full layer."""
MASS_SELECTIONS: tuple[str, ...] = ("sparse_q", "query_mass")
"""Policies that read the new rows' attention mass."""


@dataclass(frozen=True)
class ReusedTokens:
    """The reused tokens of one request, in prompt order.

    ``positions [r]``: prompt positions; ``segment [r]``: index of their reused segment;
    ``offset [r]``: position within that segment; ``moved [r]``: whether the segment sits at a position
    other than the one it was cached at (an unmoved segment's first tokens are genuine sinks).
    """

    positions: torch.Tensor
    segment: torch.Tensor
    offset: torch.Tensor
    moved: torch.Tensor

    def __len__(self) -> int:
        return int(self.positions.numel())


def reused_tokens(segments: Sequence[ReusedSegment]) -> ReusedTokens:
    """The per-token view of a plan's reused segments (at their target positions)."""
    if not segments:
        empty = torch.empty(0, dtype=torch.int64)
        return ReusedTokens(empty, empty, empty, torch.empty(0, dtype=torch.bool))
    positions = torch.cat([torch.arange(s.target_start, s.target_start + s.length) for s in segments])
    segment = torch.cat([torch.full((s.length,), i, dtype=torch.int64) for i, s in enumerate(segments)])
    offset = torch.cat([torch.arange(s.length) for s in segments])
    moved = torch.cat([torch.full((s.length,), s.delta != 0) for s in segments])
    return ReusedTokens(positions, segment, offset, moved)


def reused_sources(segments: Sequence[ReusedSegment]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per reused token (in ``reused_tokens`` order): the slot its cached KV sits in, and its position delta."""
    slots = torch.tensor([s for seg in segments for s in seg.slots], dtype=torch.int64)
    deltas = torch.tensor([seg.delta for seg in segments for _ in range(seg.length)], dtype=torch.int64)
    return slots, deltas


def exact_length(reused: ReusedTokens, selected: torch.Tensor, n_tokens: int) -> int:
    """How many leading prompt positions have exact KV after a reuse prefill.

    A reused token that was not recomputed keeps KV from another context, and every position after it
    attends to it in the sparse layers; positions before the first such token are exact.
    """
    kept = reused.positions[~torch.isin(reused.positions, selected)]
    return int(kept.min()) if kept.numel() else n_tokens


def sparse_q_signal(mass: torch.Tensor, deviation: torch.Tensor, mass_prior: float) -> torch.Tensor:
    """SparseX's score per reused token: ``deviation * (mass / mean(mass) + mass_prior)``.

    ``mass_prior`` is how many mean-masses of prior weight every token gets before the threshold layer's
    attention is counted: 0 trusts that one layer fully (mass x deviation), a large value leaves
    deviation alone (CacheBlend's signal). Both inputs are ``[r]``, float.
    """
    if mass.shape != deviation.shape:
        raise ValueError(f"mass {tuple(mass.shape)} and deviation {tuple(deviation.shape)} differ in shape")
    if mass_prior < 0:
        raise ValueError(f"mass_prior must be >= 0, got {mass_prior}")
    mean = mass.mean().clamp_min(torch.finfo(mass.dtype).tiny) if mass.numel() else mass.new_ones(())
    return deviation * (mass / mean + mass_prior)


def coverage_count(sorted_signal: torch.Tensor, coverage: float) -> torch.Tensor:
    """Per row of ``sorted_signal [b, r]`` (descending, >= 0, padding 0): how many leading entries it takes
    for their sum to reach ``coverage`` of the row's total (at least 1), as ``[b]`` int64, on its device."""
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    cumulative = sorted_signal.double().cumsum(dim=1)
    goal = coverage * cumulative[:, -1:]
    return ((cumulative < goal).sum(dim=1) + 1).clamp_max(sorted_signal.shape[1])


def selection_budget(n_reused: int, ratio: float) -> int:
    """Number of reused tokens to recompute at a recompute ratio."""
    return min(n_reused, round(ratio * n_reused))


def select_tokens(
    reused: ReusedTokens,
    budget: int,
    policy: str,
    signal: torch.Tensor | None = None,
    min_per_segment: int = 0,
) -> torch.Tensor:
    """Prompt positions (sorted, int64) of the reused tokens to recompute, at most ``budget`` of them.

    ``signal [r]`` is the policy's score per reused token (higher = recompute first); the first
    ``min_per_segment`` tokens of each moved segment are taken before any scored token.
    """
    if policy not in SELECTIONS:
        raise ValueError(f"unknown selection policy {policy!r}; choose one of {SELECTIONS}")
    r = len(reused)
    budget = min(budget, r)
    if policy == "none" or budget <= 0:
        return torch.empty(0, dtype=torch.int64)
    offset = reused.offset.to(torch.float64)
    if policy == "first_k":
        # Earliest offsets first; ties (same offset in several segments) broken by segment order,
        # so every moved segment gets about budget / n_moved tokens.
        score = torch.where(reused.moved, -offset, torch.full_like(offset, -float("inf")))
        order = _stable_descending(score)
    else:
        if signal is None or signal.shape != (r,):
            raise ValueError(f"policy {policy!r} needs a signal of shape [{r}]")
        forced = reused.moved & (reused.offset < min_per_segment)
        score = torch.where(forced, torch.full_like(offset, float("inf")), signal.cpu().to(torch.float64))
        order = _stable_descending(score)
    chosen = order[:budget]
    chosen = chosen[score[chosen] > -float("inf")]  # never tokens of unmoved segments under first_k
    return torch.sort(reused.positions[chosen]).values


def _stable_descending(score: torch.Tensor) -> torch.Tensor:
    return torch.sort(score, descending=True, stable=True).indices
