"""One request's SparseX state, engine-free: what it matched, what its prefill did, and the admission
rule that lets repeats of a segment wait for the request computing it.

An engine adapter creates a ``RequestState`` when it first matches a request and carries it on the
request itself (SGLang: ``Req.sparsex``, and on the batch, ``ForwardBatch.sparsex_requests``) through
admission, the forward and the checkpoint to its release: a reader follows one object, and nothing is
looked up by request id.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, fields

import torch

from sparsex_sgl.core.graph import Lookup
from sparsex_sgl.core.segments import Piece, SegmentHash

MAX_DEFERRALS = 32
"""Admission rounds a request may wait for segments that other requests are computing (a request being
prefilled in chunks spans several rounds); bounded, so every request runs."""
GAP_BLOCK = 16
"""Gap pieces, and the tokens a request decodes, are cached in blocks of this many tokens
(``segments.split_into_pieces``)."""


@dataclass(frozen=True)
class Match:
    """A request's match: its lookup, the pieces and spans it was made from, and its recompute ratio."""

    lookup: Lookup
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
    loaded: int = 0
    """Tokens of the segments this request's match brought into the pool from the host tier or the store."""
    fallback: str = ""
    rows_crc32: int = 0
    """CRC-32 of the positions the sparse layers computed (int32, ascending): lets a client or a test check
    which rows ran without shipping them; 0 when no sparse forward ran."""
    pending_exact_len: torch.Tensor | None = None
    """The sparse forward's exact length (``SparseRows.exact_len``), still on the device: read at
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
    uncached_collisions: int = 0
    """Pieces a checkpoint could not cache because their hash names other cached tokens (the request itself
    was served; only its KV stayed out of the graph)."""
    fallbacks: Counter[str] = field(default_factory=Counter)


@dataclass
class RequestState:
    """Everything SparseX holds for one request, from its first match to its release.

    ``matched`` is its last match (a waiting request is matched again each scheduling round, and
    again without reuse once ``reuse_refused``); ``outcome`` what its prefill did, filled in by the
    forward and settled at the checkpoint; the rest is its admission state."""

    rid: str
    matched: Match | None = None
    outcome: RequestOutcome | None = None
    report_counts: bool = True
    """Whether the client sees the ``sparsex_*`` counts (``ServerConfig.report_counts``)."""
    in_flight: bool = False
    """Admitted, and its prompt not cached yet: the segments it caches are still being computed."""
    deferrals: int = 0
    reuse_refused: bool = False
    """Match it with exact prefix reuse only from now on (it could not be admitted with reuse)."""
    loaded: int = 0
    """Tokens its matches loaded from the tiers (a later match finds them in the pool)."""

    @property
    def reuses(self) -> bool:
        """Whether its match reuses a segment (its batch runs sparse)."""
        return self.matched is not None and bool(self.matched.lookup.reused)

    def admitted(self) -> None:
        """It joined a prefill batch: until its prompt is cached, its segments are in flight."""
        self.in_flight = self.matched is not None and bool(self.matched.caches)

    def landed(self) -> None:
        """Its prompt was cached (or it left): its segments are no longer in flight."""
        self.in_flight = False
        self.deferrals = 0


def should_defer(request: RequestState, admitted: Iterable[RequestState | None],
                 running: Iterable[RequestState | None]) -> bool:
    """Whether ``request`` should wait for a later prefill batch: a request already admitted to this batch
    (``admitted``), or one still running whose prompt is not cached yet (``running``: overlap scheduling
    plans a batch before the last one is cached, and a prompt is cached only when its prefill is done),
    computes and will cache a segment that ``request`` would otherwise compute again.

    Under a burst (many requests queued while a forward runs) the repeats of a segment otherwise land in
    the batch of its first appearance and all compute it in full; waiting turns them into reuse. It never
    stalls the scheduler: the first request of a batch waits only for a request that is running (which
    will land), and no request waits more than ``MAX_DEFERRALS`` times. A deferral is counted on the
    request."""
    matched = request.matched
    if matched is None or not matched.computes or request.deferrals >= MAX_DEFERRALS:
        return False
    earlier = [other.matched.caches for other in admitted if other is not None and other.matched is not None]
    earlier += [other.matched.caches for other in running
                if other is not None and other is not request and other.in_flight and other.matched is not None]
    if all(matched.computes.isdisjoint(caches) for caches in earlier):
        return False
    request.deferrals += 1
    return True
