"""Token selection: which reused tokens the sparse layers recompute.

Every policy scores the reused tokens of a batch and each request takes its top ones within its budget;
policies differ only in the score. Each is one registered scorer (``POLICIES``), and its docstring says
why it exists; what a policy reads (the value deviation of the last full layer, the attention mass of the
new rows) decides what the caller computes before ``sparse_extend.select``. The budget is one pure
function (``recompute_budget``), and the adaptive budget one device function (``covering_counts``). A new
policy is a scorer registered with ``@policy`` and its name added to ``Selection``, the choices the settings
accept (``tests/test_config.py`` checks the two agree).
How the policies compare on held-out questions: docs/results.md.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

Selection = Literal["sparse_q", "query_mass", "kv_deviation", "first_k", "none"]


@dataclass(frozen=True)
class ScoreInputs:
    """What a scorer may read of one batch's reused tokens (device tensors, request after request, each
    request's tokens in prompt order).

    ``indptr`` (host): request i owns tokens ``indptr[i]:indptr[i+1]``; ``offset [R]``: each token's
    position within its segment; ``moved [R]``: whether its segment sits at a position other than the one
    it was cached at; ``deviation [R]``: distance between its fresh and its re-aligned cached value at the
    last full layer; ``mass [R]``: attention mass the new rows put on it; ``mass_prior``: see
    ``sparse_q_signal``. Fields a policy does not read are None."""

    indptr: Sequence[int]
    offset: torch.Tensor
    moved: torch.Tensor
    deviation: torch.Tensor | None
    mass: torch.Tensor | None
    mass_prior: float


Scorer = Callable[[ScoreInputs], "torch.Tensor | None"]
Candidates = Literal["all", "moved", "none"]


@dataclass(frozen=True)
class Policy:
    """A registered selection policy: its scorer (``[R]`` float, higher recomputed first), what it reads,
    and which reused tokens are its candidates: "all", the "moved" segments' only, or "none"."""

    name: str
    score: Scorer
    reads_deviation: bool = False
    reads_mass: bool = False
    candidates: Candidates = "all"

    def n_candidates(self, n_reused: int, n_moved: int) -> int:
        """How many of a request's reused tokens (``n_moved`` of them in moved segments) it may take."""
        return {"all": n_reused, "moved": n_moved, "none": 0}[self.candidates]

    @property
    def reads_full_layer(self) -> bool:
        """Its signal comes from a computed layer, so the method needs at least one full layer."""
        return self.reads_deviation or self.reads_mass

    @property
    def scored(self) -> bool:
        """It ranks by a signal: forced tokens go first, and the adaptive budget applies."""
        return self.reads_full_layer


POLICIES: dict[str, Policy] = {}


def policy(name: Selection, *, reads_deviation: bool = False, reads_mass: bool = False,
           candidates: Candidates = "all") -> Callable[[Scorer], Scorer]:
    """Register the decorated function as the scorer of policy ``name``."""

    def register(score: Scorer) -> Scorer:
        if name in POLICIES:
            raise ValueError(f"selection policy {name!r} is registered twice")
        POLICIES[name] = Policy(name, score, reads_deviation, reads_mass, candidates)
        return score

    return register


@policy("sparse_q", reads_deviation=True, reads_mass=True)
def sparse_q(inputs: ScoreInputs) -> torch.Tensor:
    """SparseX's signal: value deviation weighted by the new rows' attention mass (``sparse_q_signal``).

    Deviation says how stale a token's KV is; mass says how much the new tokens read it. A stale token the
    question never reads cannot change the answer, so the mass factor moves the budget toward what is read;
    its prior keeps one early layer's broad attention from overruling deviation."""
    assert inputs.mass is not None and inputs.deviation is not None
    return torch.cat([sparse_q_signal(inputs.mass[a:b], inputs.deviation[a:b], inputs.mass_prior)
                      for a, b in itertools.pairwise(inputs.indptr)])


@policy("query_mass", reads_mass=True)
def query_mass(inputs: ScoreInputs) -> torch.Tensor:
    """The new rows' attention mass alone (ProphetKV's ordering): ranking by deviation lets tokens salient
    to the whole prompt but not to the question use up the budget; mass ranks by what the question reads."""
    assert inputs.mass is not None
    return inputs.mass


@policy("kv_deviation", reads_deviation=True)
def kv_deviation(inputs: ScoreInputs) -> torch.Tensor:
    """CacheBlend's signal: the distance between the fresh and the re-aligned cached value vectors of the
    last full layer, the tokens whose cached KV is most wrong in this context first."""
    assert inputs.deviation is not None
    return inputs.deviation


@policy("first_k", candidates="moved")
def first_k(inputs: ScoreInputs) -> torch.Tensor:
    """EPIC's rule: the first tokens of every moved segment, which were attention sinks where the segment
    was cached alone. Earliest offsets first; a stable sort breaks ties by segment order, so every moved
    segment gets about budget / moved segments. Tokens of unmoved segments are never candidates."""
    return torch.where(inputs.moved, -inputs.offset.float(), torch.full_like(inputs.offset, float("-inf"),
                                                                              dtype=torch.float32))


@policy("none", candidates="none")
def none(inputs: ScoreInputs) -> None:
    """Naive reuse: nothing is recomputed, the lower bound every other policy is measured against."""
    return


def sparse_q_signal(mass: torch.Tensor, deviation: torch.Tensor, mass_prior: float) -> torch.Tensor:
    """SparseX's score per reused token of one request: ``deviation * (mass / mean(mass) + mass_prior)``.

    ``mass_prior`` is how many mean masses of prior weight every token gets before the threshold layer's
    attention is counted: 0 trusts that one layer fully (mass x deviation), a large value leaves deviation
    alone (CacheBlend's signal). Both inputs are ``[r]``, float."""
    if mass.shape != deviation.shape:
        raise ValueError(f"mass {tuple(mass.shape)} and deviation {tuple(deviation.shape)} differ in shape")
    if mass_prior < 0:
        raise ValueError(f"mass_prior must be >= 0, got {mass_prior}")
    mean = mass.mean().clamp_min(torch.finfo(mass.dtype).tiny) if mass.numel() else mass.new_ones(())
    return deviation * (mass / mean + mass_prior)


def recompute_budget(n_reused: int, ratio: float, candidates: int, covering: int | None = None) -> int:
    """How many reused tokens a request recomputes: ``ratio`` of its ``n_reused`` (rounded), at most its
    ``candidates`` (the tokens its policy may take), and with an adaptive budget at most ``covering``
    (its forced tokens plus the fewest top tokens covering the share asked: ``covering_counts``)."""
    budget = min(candidates, round(ratio * n_reused))
    return budget if covering is None else min(budget, covering)


def covering_counts(sorted_signal: torch.Tensor, coverage: float) -> torch.Tensor:
    """Per row of ``sorted_signal [b, r]`` (non-negative, descending, zero padded): how many leading entries
    it takes for their sum to reach ``coverage`` of the row's total (at least 1), as ``[b]`` int64."""
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    cumulative = sorted_signal.double().cumsum(dim=1)
    goal = coverage * cumulative[:, -1:]
    return ((cumulative < goal).sum(dim=1) + 1).clamp_max(sorted_signal.shape[1])
