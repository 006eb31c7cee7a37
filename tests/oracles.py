"""Host-side definitions of the selection, one request at a time: the oracles the device pipeline
(``core.sparse_extend.select``) is tested against. They are written independently of it (per request, on
the host, in float64, by explicit sorting), so a test comparing the two could fail on either side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sparsex_sgl.core.graph import ReusedSegment

SELECTIONS: tuple[str, ...] = ("sparse_q", "query_mass", "kv_deviation", "first_k", "none")


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
