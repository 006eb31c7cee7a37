"""Per-scheduler SparseX state: the settings, the counters, and the fallback and error log.

One ``SparseXRuntime`` per scheduler process, built by the cache factory and handed to the cache, the
model hook and the attention backend. It holds nothing per request: each request's state is a
``request.SparseXRequest`` carried on SGLang's ``Req`` (``req.sparsex``). It only counts the requests
that hold such state, so an idle scheduler can be checked for leaks.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict

from sparsex_sgl.hybrid import HybridConfig
from sparsex_sgl.request import Counters, RequestOutcome, SparseXRequest, should_defer
from sparsex_sgl.rope import RopeConfig
from sparsex_sgl.sparse_extend import Kernels

logger = logging.getLogger("sparsex_sgl")


class SparseXRuntime:
    """The shared state of one scheduler."""

    def __init__(self, config: HybridConfig, rope: RopeConfig | None, num_layers: int, disabled_reason: str = "",
                 kernels: Kernels = "torch", max_extend_tokens: int | None = None) -> None:
        self.config = config
        self.rope = rope
        self.num_layers = num_layers
        self.disabled_reason = disabled_reason
        self.kernels: Kernels = kernels
        self.max_extend_tokens = max_extend_tokens
        """Longest extend a request with reuse may run in one step (None: no chunked prefill to respect)."""
        self.open_requests: set[str] = set()
        """Requests matched and not yet released or aborted: leak accounting only (their state is on them)."""
        self.counters = Counters()
        self._logged: set[str] = set()
        self._lock = threading.Lock()

    @property
    def threshold(self) -> int:
        return self.config.threshold(self.num_layers)

    def request(self, req: object) -> SparseXRequest:
        """The SparseX state carried on SGLang's ``req``, created at its first match (and open again when a
        retracted request is matched anew)."""
        state: SparseXRequest | None = getattr(req, "sparsex", None)
        if state is None:
            state = SparseXRequest(req.rid, report_counts=self.config.report_counts)  # type: ignore[attr-defined]
            req.sparsex = state  # type: ignore[attr-defined]
        self.open_requests.add(state.rid)
        return state

    def close(self, req: object) -> None:
        """``req`` left the scheduler (released, or retracted to be matched again): its admission state is
        reset; its outcome stays on it for the reply's ``meta_info``, which SGLang builds after the release."""
        self.open_requests.discard(req.rid)  # type: ignore[attr-defined]
        state: SparseXRequest | None = getattr(req, "sparsex", None)
        if state is not None:
            state.landed()
            state.reuse_refused = False

    def drop(self, req: object) -> None:
        """Forget ``req``'s SparseX state entirely (a fault met while planning it: it is served as stock)."""
        self.open_requests.discard(req.rid)  # type: ignore[attr-defined]
        req.sparsex = None  # type: ignore[attr-defined]

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

    def tracked_requests(self) -> int:
        """Requests this scheduler holds SparseX state for; 0 when it is idle (a leak check)."""
        return len(self.open_requests)

    def should_defer(self, request: SparseXRequest, admitted: list[SparseXRequest | None],
                     running: list[SparseXRequest | None]) -> bool:
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
        out["config"] = asdict(self.config)
        out["tracked_requests"] = self.tracked_requests()
        out["disabled_reason"] = self.disabled_reason
        return out
