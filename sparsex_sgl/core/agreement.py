"""Tensor-parallel ranks taking one decision: the votes that keep their forwards identical.

With tensor parallelism every rank runs its own scheduler, cache and model shard over the same requests, and
their forwards meet in collectives (the output and MLP all-reduces, the selection's signal reduce). Ranks
that ran different forwards would wait on each other forever, or mix rows of different batches. The graph
takes the same decisions on every rank because it sees the same requests in the same order (SGLang
broadcasts each request to every rank) over pools of the same size; what a rank cannot guarantee alone is
what depends on the world outside it: a store read that times out on one rank, a fault in SparseX code on
one rank. So each such decision is voted: every rank casts its ballot (what it found, or why it failed),
every rank sees all ballots (``Gather``), and every rank derives the same verdict from them. A vote is cast
at the same point of the same call on every rank, on every path, failures included, so the ranks' votes
pair up one to one.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

Gather = Callable[[object], list[object]]
"""One collective call: this rank's ballot in, every rank's ballot out (in rank order, the same list on
every rank). None where one rank holds the whole model: then there is nobody to agree with."""

DISAGREEMENT = "rank_disagreement"
"""The fallback counted when no rank failed but their ballots differ (their caches diverged)."""


@dataclass(frozen=True)
class Verdict:
    """A vote's outcome, the same on every rank: go on, or fall back for ``reason`` (the failure of the
    lowest rank that failed, or ``DISAGREEMENT``); ``rank`` is who reported it (-1: no single rank)."""

    reason: str = ""
    rank: int = -1

    @property
    def agreed(self) -> bool:
        return not self.reason


def vote(gather: Gather | None, kind: str, value: Hashable, failure: str = "") -> Verdict:
    """Every rank's ``(kind, value, failure)`` compared: agreed when no rank failed and all values are
    equal. ``kind`` names the vote, so ballots of two different votes never count as agreement."""
    if gather is None:
        return Verdict(failure, 0 if failure else -1)
    ballots = gather((kind, value, failure))
    for rank, ballot in enumerate(ballots):
        if not isinstance(ballot, tuple) or len(ballot) != 3 or ballot[0] != kind:
            return Verdict(DISAGREEMENT)
        if ballot[2]:
            return Verdict(str(ballot[2]), rank)
    if any(ballot != ballots[0] for ballot in ballots[1:]):
        return Verdict(DISAGREEMENT)
    return Verdict()


def available_everywhere(gather: Gather | None, found: Sequence[tuple[Hashable, bool]]) -> set[Hashable]:
    """The keys every rank found (segments each rank read from a tier): only those may be used, so every
    rank's graph adopts the same nodes. A rank that failed before reading casts nothing found."""
    mine = {key for key, ok in found if ok}
    if gather is None:
        return mine
    ballots = gather(("available", tuple(sorted(mine, key=repr))))
    agreed = set(mine)
    for ballot in ballots:
        if not isinstance(ballot, tuple) or len(ballot) != 2 or ballot[0] != "available":
            return set()
        agreed &= set(ballot[1])
    return agreed


class RankGuard:
    """The SparseX steps of one batch on one rank, between votes.

    With one rank a failing step raises: the batch falls back at once. With tensor parallelism a rank cannot
    leave alone (the others would wait for it in the next collective), so the failure is kept, the step
    returns its placeholder, later steps are skipped, and the rank goes on joining the collectives until the
    next vote (``vote``), where every rank learns of it and falls back."""

    FAILURE = "sparse_forward_error"

    def __init__(self, gather: Gather | None) -> None:
        self.gather = gather
        self.failure = ""
        self.error: BaseException | None = None

    def attempt(self, step: Callable[[], T], placeholder: T) -> T:
        if self.failure:
            return placeholder
        try:
            return step()
        except Exception as exc:
            if self.gather is None:
                raise
            self.failure, self.error = self.FAILURE, exc
            return placeholder

    def vote(self, kind: str, value: Hashable = None) -> Verdict:
        return vote(self.gather, kind, value, self.failure)
