"""``HybridStateCache``: the ``sparsex`` cache backend for hybrid models (attention and recurrent layers).

A recurrent layer's state depends on its whole left context, so these models reuse exact prefixes only, and only
from a stored state: segments found elsewhere are not reused (the fallback ``recurrent_layers``, logged once and
counted per request that marked segments). The segment graph keeps the attention KV of every cached path whole,
as for any model; ``core.states`` keeps recurrent states at the offsets its learned placement chooses, in SGLang's
own state pool (``compat.StatePool``). A match reports as its prefix the deepest stored state within the exact
hit, and stages a copy of it into the request's own state slot, which SGLang makes on the forward stream before
any recurrent layer runs; everything after that offset is computed through all layers.

States are taken where SGLang has them (``--mamba-radix-cache-strategy no_buffer``, overlap scheduling off): in the
request's slot at a checkpoint, i.e. at a chunk's end (copied) and at the request's end (taken over). SGLang's
forward keeps one state per request and extend (docs/sglang-hybrid-cache.md), so a prefill is cut into chunks that
end at the offsets the placement chooses (``next_cut``, applied by the plugin's admission hooks): each costs a
scheduler step, and a chunk's end is where the state is copied.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from sparsex_sgl.core.protocol import SPANS_KEY
from sparsex_sgl.core.request import Match, RequestOutcome
from sparsex_sgl.core.states import StateCheckpoints
from sparsex_sgl.sglang import compat
from sparsex_sgl.sglang.cache import MatchHandle, SegmentGraphCache, _MatchVotes
from sparsex_sgl.sglang.compat import EvictParams, EvictResult, MatchPrefixParams, MatchResult
from sparsex_sgl.sglang.metrics import PrometheusExport
from sparsex_sgl.sglang.runtime import SchedulerRuntime

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import Req

logger = logging.getLogger("sparsex_sgl")

RECURRENT = "recurrent_layers"
"""The fallback of a request that marked segments on a hybrid model: served with exact prefix reuse only."""


class HybridStateCache(SegmentGraphCache):
    """Exact prefix reuse for a hybrid model, resumed from recurrent-state checkpoints in SGLang's state pool."""

    def __init__(self, params: Any, runtime: SchedulerRuntime, device: torch.device,
                 metrics: PrometheusExport | None = None) -> None:
        super().__init__(params, runtime, device, metrics, None)
        self.state_pool = compat.StatePool(params)
        self.states = StateCheckpoints(self.graph, self.state_pool, self.state_pool.size)
        self._learned_from: set[str] = set()
        """Requests whose hit depth the placement has learned (SGLang matches a request more than once)."""

    def supports_mamba(self) -> bool:
        return True

    # ------------------------------------------------------------------ matching
    def _match(self, params: MatchPrefixParams, votes: _MatchVotes) -> MatchResult:
        req = params.req
        if req is None or len(params.key) == 0:
            return self._result(MatchHandle(), 0)
        state = self._open(req)
        token_ids = compat.request_tokens(req)[0]
        fallback = RECURRENT if compat.custom_params(req).get(SPANS_KEY) else ""
        if fallback:
            self.runtime.fallback(fallback, "a recurrent layer must see every token: exact prefixes only")
        key_ns = self._namespace(req)
        pieces = self._pieces(token_ids, [], key_ns)
        lookup = self.graph.lookup(pieces)
        lookup = self.graph.prefix_only(lookup, min(lookup.exact_prefix_len, len(params.key)))
        rid = compat.request_id(req)
        resume = self.states.resume(lookup, key_ns, learn=rid not in self._learned_from)
        self._learned_from.add(rid)
        handle_nodes = resume.lookup.prefix_node_ids[-1:]
        if resume.state_slot is not None and params.cow_mamba and not self._stage_copy(req, resume.state_slot,
                                                                                      handle_nodes):
            resume = self.states.resume(self.graph.prefix_only(lookup, 0), key_ns, learn=False)
            handle_nodes = ()
        offset = resume.offset
        state.matched = Match(resume.lookup, tuple(pieces), (), 1.0, frozenset(), frozenset(), False)
        outcome = RequestOutcome(prompt=lookup.n_tokens, prefix=offset, blended_prefix=0,
                                 computed=lookup.n_tokens - offset, loaded=0, fallback=fallback)
        outcome.exact_len = outcome.exact_bound
        state.outcome = outcome
        slots = torch.tensor(resume.lookup.prefix_slots, dtype=torch.int64, device=self.device)
        return self._result(MatchHandle(handle_nodes, slots), offset)

    def _stage_copy(self, req: Req, source: int, path: tuple[Any, ...]) -> bool:
        """Have SGLang copy the state ``source`` into the request's own slot; making room for that slot drops
        the least useful other state (``source``'s node is locked meanwhile). False if no slot can be had."""
        own = None
        if compat.request_state_slot(req) is None:
            self.graph.lock(path)
            try:
                own = self._free_slot()
            finally:
                self.graph.unlock(path)
            if own is None:
                return False
        return compat.stage_state_copy(req, source, self.state_pool, own)

    def _free_slot(self) -> int | None:
        """One state slot of SGLang's pool, dropping the least useful unlocked state if none is free."""
        slots = self.state_pool.alloc(1)
        if slots is None and self.states.evict(1):
            slots = self.state_pool.alloc(1)
        return None if slots is None else slots[0]

    # ------------------------------------------------------------------ caching a request
    def _checkpoint(self, req: Req, up_to: int) -> None:
        """Cache the KV as any model does, then keep the request's live state (its state after ``up_to``
        tokens) where the placement asks for one: copied at a chunk's end, taken over at the request's end.
        Every cached path is told to the states, kept or not: its end is where a next turn would hit."""
        super()._checkpoint(req, up_to)
        finished = compat.request_finished(req)
        state = compat.request_state(req)
        match = None if state is None else state.matched
        key_ns = self._namespace(req)
        resumed = 0 if match is None else match.lookup.prefix_len
        n = up_to if finished else compat.request_tokens(req)[1]
        path = self.graph.root_path(self._cut_to_cache(req, compat.fill_ids(req, up_to), match))
        captured: dict[int, int] = {}
        own = compat.request_state_slot(req)
        if own is not None and up_to in self.states.plan(key_ns, resumed, n) and (finished or up_to < n):
            if finished:
                captured[up_to] = own
                compat.request_state_slot(req, take=True)
            else:
                fresh = self._free_slot()
                if fresh is not None:
                    self.state_pool.copy(own, fresh)
                    captured[up_to] = fresh
        self.states.adopt(path, captured, key_ns)

    def next_cut(self, req: Req, prefix_len: int) -> int | None:
        """How many tokens the request's next extend should take to end at the next offset its placement keeps
        a state at (None: no such offset before the prompt's end, which the prefill reaches anyway)."""
        token_ids, n_prompt = compat.request_tokens(req)
        ahead = [c for c in self.states.plan(self._namespace(req), prefix_len, n_prompt) if c < n_prompt]
        return ahead[0] - prefix_len if ahead and len(token_ids) == n_prompt else None

    def on_release(self, req: Req, *, checkpointed: bool) -> None:
        super().on_release(req, checkpointed=checkpointed)
        self._learned_from.discard(compat.request_id(req))
        self.state_pool.release_request(req)  # a state the cache took over is not the request's any more

    # ------------------------------------------------------------------ memory
    def evict(self, params: EvictParams) -> EvictResult:
        result = super().evict(params)
        result.mamba_num_evicted = self.states.evict(params.mamba_num)
        return result

    def mamba_evictable_size(self) -> int:
        return len(self.states) - self.states.locked()

    def mamba_protected_size(self) -> int:
        return self.states.locked()

    def all_mamba_values_flatten(self) -> torch.Tensor:
        return torch.tensor(self.states.slots(), dtype=torch.int64, device=self.state_pool.device)

    def stats(self) -> dict[str, object]:
        out = super().stats()
        out.update(recurrent_states=len(self.states), recurrent_states_locked=self.states.locked(),
                   state_pool_size=self.state_pool.size)
        return out
