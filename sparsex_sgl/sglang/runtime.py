"""Per-scheduler SparseX settings, counters, and the fallback and error log.

One ``SchedulerRuntime`` per scheduler process, built by the cache factory and handed to the cache and the
model hook. It holds nothing per request: each request's state is a ``core.request.RequestState`` carried
on SGLang's request (``compat.request_state``). It only counts the requests that hold such state, so an
idle scheduler can be checked for leaks.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict

from sparsex_sgl.core.agreement import Gather
from sparsex_sgl.core.config import ServerConfig
from sparsex_sgl.core.ops import OpSet
from sparsex_sgl.core.request import Counters, RequestOutcome, RequestState, should_defer
from sparsex_sgl.core.rope import RopeConfig

logger = logging.getLogger("sparsex_sgl")


class SchedulerRuntime:
    """The shared SparseX state of one scheduler."""

    def __init__(self, config: ServerConfig, rope: RopeConfig | None, num_layers: int, ops: OpSet,
                 max_extend_tokens: int | None = None, gather: Gather | None = None, tp_rank: int = 0) -> None:
        self.config = config
        self.gather = gather
        """The tensor-parallel group's vote (``core.agreement``); None with one rank."""
        self.tp_rank = tp_rank
        self.rope = rope
        self.num_layers = num_layers
        self.ops = ops
        self.disabled_kind = ""
        """Why SparseX is off for this server, as the fallback it counts ("unsupported_model",
        "sglang_changed"; "" when on): every request is then served exact."""
        self.disabled_reason = ""
        """The same in words, for the log and ``/sparsex/stats``."""
        self.max_extend_tokens = max_extend_tokens
        """Longest extend a request with reuse may run in one step (None: no chunked prefill to respect)."""
        self.open_requests: set[str] = set()
        """Requests matched and not yet released or aborted: leak accounting only (their state is on them)."""
        self.counters = Counters()
        self._logged: set[str] = set()
        self._lock = threading.Lock()

    def disable(self, kind: str, reason: str) -> None:
        """Leave SparseX off for this server: requests get exact prefix caching only."""
        self.disabled_kind, self.disabled_reason = kind, reason
        logger.warning("SparseX is off for this server (%s: %s); requests get exact prefix caching only", kind,
                       reason)

    @property
    def threshold(self) -> int:
        return self.config.selection.threshold(self.num_layers)

    def open(self, rid: str) -> RequestState:
        """A new request's state (also for a retracted request matched anew), counted as open."""
        self.open_requests.add(rid)
        return RequestState(rid, report_counts=self.config.report_counts)

    def close(self, rid: str, state: RequestState | None) -> None:
        """The request left the scheduler (released, or retracted to be matched again): its admission state
        is reset; its outcome stays on it for the reply's ``meta_info``, which SGLang builds after."""
        self.open_requests.discard(rid)
        if state is not None:
            state.landed()
            state.reuse_refused = False

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

    def log_once(self, where: str, exc: BaseException) -> None:
        """The traceback of the first failure met at ``where`` (a tensor-parallel rank's failure is kept
        until its batch's next vote, then counted as that vote's fallback)."""
        with self._lock:
            first = where not in self._logged
            self._logged.add(where)
        if first:
            logger.error("SparseX failure in the %s (further cases are only counted)", where, exc_info=exc)

    def uncached_collision(self) -> None:
        """A checkpoint stopped at a piece whose hash names other cached tokens (counted; logged once)."""
        with self._lock:
            self.counters.uncached_collisions += 1
            first = "uncached_collision" not in self._logged
            self._logged.add("uncached_collision")
        if first:
            logger.error("SparseX: a segment hash names two different token sequences; the later one is not "
                         "cached (further cases are only counted)")

    def tracked_requests(self) -> int:
        """Requests this scheduler holds SparseX state for; 0 when it is idle (a leak check)."""
        return len(self.open_requests)

    def should_defer(self, request: RequestState, admitted: list[RequestState | None],
                     running: list[RequestState | None]) -> bool:
        """``request.should_defer``, counted in ``deferred_admissions``."""
        if not should_defer(request, admitted, running):
            return False
        with self._lock:
            self.counters.deferred_admissions += 1
        return True

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
        out["config"] = self.config.flat()
        out["tracked_requests"] = self.tracked_requests()
        out["disabled_reason"] = self.disabled_reason
        out["tp_rank"] = self.tp_rank
        return out
