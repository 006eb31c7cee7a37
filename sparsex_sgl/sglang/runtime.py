"""Per-scheduler SparseX state shared by the cache backend, the attention backend and the model hook.

The cache plans a request in ``match_prefix``; the model hook reads that plan when the request's
extend batch runs and records what it actually did (the outcome), which ``checkpoint`` then uses to
decide what is exact enough to cache. All three live in the scheduler process and meet here, keyed by
request id.
"""

from __future__ import annotations

import logging
import threading
import zlib
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields

import torch

from sparsex_sgl.graph import LookupPlan
from sparsex_sgl.hybrid import HybridConfig
from sparsex_sgl.rope import RopeConfig
from sparsex_sgl.segments import Piece, SegmentHash
from sparsex_sgl.sparse_extend import Kernels

logger = logging.getLogger("sparsex_sgl")

CONFIG_ENV = "SPARSEX_SGL_CONFIG"
"""JSON of the HybridConfig, exported by the launcher; its scheduler processes inherit it."""

MAX_DEFERRALS = 32
"""Admission rounds a request may wait for segments that other requests are computing (a request being
prefilled in chunks spans several rounds); bounded, so every request runs."""
GAP_BLOCK = 16
"""Gap pieces, and the tokens a request decodes, are cached in blocks of this many tokens
(``segments.split_into_pieces``)."""


@dataclass(frozen=True)
class RequestPlan:
    """A request's lookup plan, the pieces and spans it was made from, and its recompute ratio."""

    plan: LookupPlan
    pieces: tuple[Piece, ...]
    """The prompt's cut (``SegmentGraph.align``): the request caches its KV along this same cut."""
    spans: tuple[tuple[int, int], ...]
    recompute_ratio: float
    caches: frozenset[SegmentHash] = frozenset()
    """The segments this request will compute exactly and cache (``graph.segments_it_caches``)."""
    computes: frozenset[SegmentHash] = frozenset()
    """The segments it computes rather than reuses (``graph.segments_it_computes``): what it may wait for."""
    auto_segmented: bool = False
    """Its spans were found by ``segments.auto_spans``, not sent by the client."""


@dataclass
class RequestOutcome:
    """What the prefill of one request did; returned to the client and summed into the counters.

    ``exact_len``: leading positions whose KV equals a full prefill's (the rest is cached as blended).
    ``blended_prefix``: prefix-hit tokens served from blended nodes (``graph`` explains them).
    """

    prompt: int
    prefix: int = 0
    blended_prefix: int = 0
    reused: int = 0
    recomputed: int = 0
    computed: int = 0
    exact_len: int = 0
    fallback: str = ""
    rows_crc32: int = 0
    """CRC-32 of the positions the sparse layers computed (int32, ascending): lets a client or a test check
    which rows ran without shipping them; 0 when no sparse forward ran."""
    pending_exact_len: torch.Tensor | None = None
    """The sparse forward's exact length (``SparseExtendPlan.exact_len``), still on the device: read at
    the checkpoint (``settle``), after the batch's results, so the forward never waits for it."""

    pending_rows: torch.Tensor | None = None
    """The positions the sparse layers computed, on the device until ``settle``."""

    def settle(self) -> None:
        """Fold the forward's results in (a few small reads, once, after the batch has finished)."""
        if self.pending_exact_len is not None:
            self.exact_len = min(self.exact_len, int(self.pending_exact_len))
            self.pending_exact_len = None
        if self.pending_rows is not None:
            self.rows_crc32 = zlib.crc32(self.pending_rows.to("cpu", torch.int32).numpy().tobytes())
            self.pending_rows = None

    def mark_exact(self, fallback: str) -> None:
        """The batch fell back to full prefill: everything above the prefix was computed exactly."""
        self.reused = self.recomputed = 0
        self.computed = self.prompt - self.prefix
        self.exact_len = self.exact_bound
        self.pending_exact_len = self.pending_rows = None
        self.rows_crc32 = 0
        self.fallback = fallback

    @property
    def exact_bound(self) -> int:
        """The most ``exact_len`` can be: the whole prompt, or the prefix hit's exact part if it has a
        blended one (everything computed after blended KV is blended)."""
        return self.prefix - self.blended_prefix if self.blended_prefix else self.prompt

    def as_details(self) -> dict[str, int | str]:
        """The ``meta_info.cached_tokens_details`` entries (ints and strings only, as SGLang types them)."""
        return {f"sparsex_{f.name}": getattr(self, f.name) for f in fields(self)
                if f.name not in ("exact_len", "pending_exact_len", "pending_rows")}


@dataclass
class Counters:
    """Cumulative statistics of one scheduler, served at ``GET /sparsex/stats``."""

    requests: int = 0
    requests_with_segments: int = 0
    requests_auto_segmented: int = 0
    requests_with_reuse: int = 0
    prompt_tokens: int = 0
    prefix_tokens: int = 0
    blended_prefix_tokens: int = 0
    reused_tokens: int = 0
    recomputed_tokens: int = 0
    computed_tokens: int = 0
    sparse_batches: int = 0
    evicted_tokens: int = 0
    deferred_admissions: int = 0
    fallbacks: Counter[str] = field(default_factory=Counter)


class SparseXRuntime:
    """The shared state; one per scheduler process (see ``current``)."""

    def __init__(self, config: HybridConfig, rope: RopeConfig | None, num_layers: int, disabled_reason: str = "",
                 kernels: Kernels = "torch", max_extend_tokens: int | None = None) -> None:
        self.config = config
        self.rope = rope
        self.num_layers = num_layers
        self.disabled_reason = disabled_reason
        self.kernels: Kernels = kernels
        self.max_extend_tokens = max_extend_tokens
        """Longest extend a request with reuse may run in one step (None: no chunked prefill to respect)."""
        self.plans: dict[str, RequestPlan] = {}
        self.outcomes: dict[str, RequestOutcome] = {}
        self.in_flight: dict[str, frozenset[SegmentHash]] = {}
        """Admitted requests whose prefill has not been cached yet, and the segments they will cache."""
        self.deferrals: Counter[str] = Counter()
        self.reuse_refused: set[str] = set()
        """Requests to plan with exact prefix reuse only (``refuse_reuse``), until they leave."""
        self.counters = Counters()
        self._logged: set[str] = set()
        self._lock = threading.Lock()

    @property
    def threshold(self) -> int:
        return self.config.threshold(self.num_layers)

    def fallback(self, reason: str, detail: str = "") -> None:
        """Count a request that ran exact full prefill instead of SparseX; log each reason once."""
        with self._lock:
            self.counters.fallbacks[reason] += 1
            first = reason not in self._logged
            self._logged.add(reason)
        if first:
            logger.warning("SparseX falls back to exact full prefill (%s)%s; further cases are only counted",
                           reason, f": {detail}" if detail else "")

    def internal_error(self, where: str, exc: BaseException) -> None:
        """A bug in SparseX code met while serving: the request falls back (counted as ``internal_error``),
        the first one per place is logged with its traceback, and the scheduler keeps running."""
        with self._lock:
            self.counters.fallbacks["internal_error"] += 1
            first = where not in self._logged
            self._logged.add(where)
        if first:
            logger.error("SparseX internal error in %s; the request falls back to stock prefill and the server "
                         "keeps serving (further cases are only counted)", where, exc_info=exc)

    def forget(self, rid: str) -> None:
        """Drop everything held for ``rid``: it left the scheduler (released, or aborted while queued)."""
        self.plans.pop(rid, None)
        self.outcomes.pop(rid, None)
        self.landed(rid)
        self.reuse_refused.discard(rid)

    def tracked_requests(self) -> int:
        """Requests this runtime holds state for; 0 when the scheduler is idle (a leak check)."""
        return len(set(self.plans) | set(self.outcomes) | set(self.in_flight) | set(self.deferrals)
                   | self.reuse_refused)

    def should_defer(self, rid: str, admitted: Sequence[str], running: Collection[str] = ()) -> bool:
        """Whether request ``rid`` should wait for a later prefill batch: a request already admitted to this
        batch (``admitted``), or one still running whose prompt is not cached yet (``running``: overlap
        scheduling plans a batch before the last one is cached, and a prompt is cached only when its
        prefill is done), computes and will cache a segment that ``rid`` would otherwise compute again.

        Under a burst (many requests queued while a forward runs) the repeats of a segment otherwise land in
        the batch of its first appearance and all compute it in full; waiting turns them into reuse. It
        never stalls the scheduler: the first request of a batch waits only for a request that is running
        (which will land), and no request waits more than ``MAX_DEFERRALS`` times."""
        entry = self.plans.get(rid)
        if entry is None or not entry.computes or self.deferrals[rid] >= MAX_DEFERRALS:
            return False
        earlier = [self.plans[other].caches for other in admitted if other in self.plans]
        earlier += [caches for other, caches in self.in_flight.items() if other != rid and other in running]
        if all(entry.computes.isdisjoint(caches) for caches in earlier):
            return False
        with self._lock:
            self.counters.deferred_admissions += 1
            self.deferrals[rid] += 1
        return True

    def admitted(self, rid: str) -> None:
        """``rid`` joined a prefill batch: until its checkpoint, its segments are in flight."""
        for gone in [other for other in self.in_flight if other not in self.plans]:
            del self.in_flight[gone]  # released without landing (never held KV): nothing to wait for
        entry = self.plans.get(rid)
        if entry is not None and entry.caches:
            self.in_flight[rid] = entry.caches

    def landed(self, rid: str) -> None:
        """``rid``'s prefill was cached (or it left): its segments are no longer in flight."""
        self.in_flight.pop(rid, None)
        self.deferrals.pop(rid, None)

    def refuse_reuse(self, rid: str) -> None:
        """Plan ``rid`` without reuse from now on (it could not be admitted with it)."""
        self.reuse_refused.add(rid)

    def has_reuse(self, rids: Iterable[str]) -> bool:
        """Whether any of these requests is planned to reuse a segment (its batch runs sparse)."""
        return any((entry := self.plans.get(rid)) is not None and bool(entry.plan.reused) for rid in rids)

    def record(self, outcome: RequestOutcome, had_segments: bool, auto_segmented: bool = False) -> None:
        c = self.counters
        with self._lock:
            c.requests += 1
            c.requests_with_segments += int(had_segments)
            c.requests_auto_segmented += int(auto_segmented)
            c.requests_with_reuse += int(outcome.reused > 0)
            c.prompt_tokens += outcome.prompt
            c.prefix_tokens += outcome.prefix
            c.blended_prefix_tokens += outcome.blended_prefix
            c.reused_tokens += outcome.reused
            c.recomputed_tokens += outcome.recomputed
            c.computed_tokens += outcome.computed

    def stats(self) -> dict[str, object]:
        """Builtins only: this crosses SGLang's process boundary in an internal-state reply."""
        c = self.counters
        out: dict[str, object] = {k: v for k, v in asdict(c).items() if k != "fallbacks"}
        out["fallbacks"] = dict(c.fallbacks)
        out["config"] = asdict(self.config)
        out["tracked_requests"] = self.tracked_requests()
        out["disabled_reason"] = self.disabled_reason
        return out


_current: SparseXRuntime | None = None


def install(runtime: SparseXRuntime | None) -> None:
    global _current
    _current = runtime


def current() -> SparseXRuntime | None:
    """The runtime of this scheduler process, or None where SparseX is off."""
    return _current
