"""The SGLang plugin (entry point ``sglang.srt.plugins: sparsex``).

SGLang calls ``register()`` once in every process it starts (launcher, scheduler, detokenizer, and in
``sgl.Engine``) before parsing arguments or loading a model. It registers the ``sparsex`` radix-cache
and attention backends, adds the launch flags (``settings``), and hooks a few SGLang methods through the
official ``HookRegistry`` (``compat.HOOK_TARGETS``). Every hook is a no-op unless ``--enable-sparsex`` (or
``enable_sparsex=True``) was given, or where this SGLang is not the source ``compat`` was written against;
the CPU shim (pure-torch rotary, gloo groups without PyNccl for ``--tp`` > 1, pure-torch ops for the recurrent
layers of hybrid models) is switched on by ``--device cpu`` for stock SGLang too.

Chunked prefill and the overlap scheduler stay on: a request that reuses segments runs in one extend step
(``_admit``), every other request is chunked as on stock SGLang, and prefill CUDA graphs are refused for
batches that carry a request with reuse (``_refuse_prefill_graph``).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sparsex_sgl.core import protocol
from sparsex_sgl.core.config import ServerConfig
from sparsex_sgl.core.segments import validate_spans
from sparsex_sgl.sglang import compat, prewarm, settings
from sparsex_sgl.sglang.settings import NAME, OPTIONS, server_config

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import Req, ScheduleBatch
    from sglang.srt.managers.schedule_policy import PrefillAdder
    from sglang.srt.mem_cache.registry import TreeCacheBuildContext
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch
    from sglang.srt.model_executor.model_runner import ModelRunner

    from sparsex_sgl.sglang.cache import SegmentGraphCache
    from sparsex_sgl.sglang.hybrid_cache import HybridStateCache

logger = logging.getLogger("sparsex_sgl")

CPU_SHIM_ENV = "SPARSEX_SGL_CPU_SHIM"
STATS_ROUTE = "/sparsex/stats"
STATE_SECTION = "sparsex"


def register() -> None:
    """Entry point; cheap and idempotent."""
    compat.register_backends(NAME, _create_attention_backend, _create_tree_cache)
    compat.register_hooks([
        ("add_cli_args", _add_cli_args, "around"),
        ("from_cli_args", _from_cli_args, "around"),
        ("tokenize", _segment_text, "before"),
        ("validate", _validate_prompt, "before"),
        ("cached_tokens_details", _add_details, "after"),
        ("internal_state", _add_internal_state, "after"),
        ("admit", _admit, "around"),
        ("admit_chunk", _admit_chunk, "around"),
        ("prefill_graph", _refuse_prefill_graph, "around"),
        ("forward_batch", _carry_requests, "after"),
        ("static_batch", _carry_to_static_batch, "after"),
        ("model_loaded", _hybrid_ops_on_cpu, "after"),
    ])
    compat.wrap_engine_server_args(_engine_server_args)
    if os.environ.get(CPU_SHIM_ENV) == "1":
        _cpu_shim()


def _hybrid_ops_on_cpu(result: Any, runner: ModelRunner, *args: Any, **kwargs: Any) -> Any:
    """``ModelRunner.load_model``: a hybrid model served on the CPU runs its recurrent layers on pure-torch ops
    (``compat.torch_hybrid_ops``); done here, once the model is known, because importing SGLang's hybrid layers
    costs every other server seconds a process."""
    if os.environ.get(CPU_SHIM_ENV) == "1" and compat.torch_hybrid_ops(runner):
        logger.info("sparsex_sgl: recurrent layers run on pure-torch ops on the CPU (slow; for tests)")
    return result


def _cpu_shim() -> None:
    """What SGLang 0.5.23 lacks on the CPU: the pure-torch rotary embedding and gloo groups without PyNccl."""
    compat.use_torch_rotary()
    compat.gloo_groups_without_nccl()


# ---------------------------------------------------------------------- backends
def _create_attention_backend(model_runner: ModelRunner) -> Any:
    """The ``sparsex`` prefill backend around the one SGLang would have built (``ServerConfig.prefill_backend``,
    else the decode backend SGLang resolved)."""
    from sparsex_sgl.sglang.attention import SparseXAttnBackend

    chosen = settings.config_of(compat.runner_server_args(model_runner)).prefill_backend
    return SparseXAttnBackend(compat.inner_attention_backend(model_runner, chosen, NAME), model_runner)


def _create_tree_cache(ctx: TreeCacheBuildContext) -> SegmentGraphCache:
    from sparsex_sgl.sglang.factory import build

    return build(ctx)


def _active(server_args: Any) -> ServerConfig | None:
    """The server's SparseX settings when its request hooks should act: ``--enable-sparsex`` was given and
    this SGLang is the source the hooks were written against (else they pass requests through)."""
    config = server_config(server_args)
    return config if config is not None and compat.unchanged() else None


# ---------------------------------------------------------------------- flags and Engine kwargs
def _add_cli_args(original: Callable[..., Any], parser: argparse.ArgumentParser) -> None:
    original(parser)
    settings.add_flags(parser)


def _export(server_args: Any, config: ServerConfig | None) -> None:
    """Hand the settings to the scheduler processes (they inherit the environment at spawn)."""
    if compat.on_cpu(server_args):
        os.environ[CPU_SHIM_ENV] = "1"
        _cpu_shim()
    if config is not None:
        server_args._sparsex_config = config.flat()


def _from_cli_args(original: Callable[..., Any], cls: Any, args: argparse.Namespace) -> Any:
    options = {k: getattr(args, k, None) for k in OPTIONS}
    config = None
    if options["enable_sparsex"]:
        try:
            implied, config = settings.implied_server_args(vars(args), settings.resolve_config(options))
            for key, value in implied.items():
                setattr(args, key, value)
        except ValueError as exc:  # a bad preset or flag value: one line, no traceback
            raise SystemExit(f"sparsex_sgl: {exc}") from None
    elif any(options[k] is not None for k in OPTIONS[1:]):
        raise SystemExit("sparsex_sgl: --sparsex-* options need --enable-sparsex")
    server_args = original(cls, args)
    _export(server_args, config)
    if config is not None:
        compat.add_stats_route(STATS_ROUTE, STATE_SECTION)
        compat.add_generate_route(prewarm.PATH, prewarm.handle)
        compat.unchanged()  # read the pins now, in the launcher (the tokenizer's process), not at a request
    return server_args


def _engine_server_args(base: Callable[..., Any]) -> Callable[..., Any]:
    """``sgl.Engine(enable_sparsex=True, sparsex_...=...)``: the Engine's ServerArgs factory, taking our keywords."""

    def build_server_args(**kwargs: Any) -> Any:
        options = {k: kwargs.pop(k) for k in OPTIONS if k in kwargs}
        config = None
        if options.get("enable_sparsex"):
            implied, config = settings.implied_server_args(kwargs, settings.resolve_config(options))
            kwargs.update(implied)
        elif options:
            raise ValueError("sparsex_* options need enable_sparsex=True")
        server_args = base(**kwargs)
        _export(server_args, config)
        if config is not None:
            compat.unchanged()  # read the pins now, not at the first request
        return server_args

    return build_server_args


# ---------------------------------------------------------------------- requests
def _validate_prompt(manager: Any, obj: Any, input_ids: Any, *args: Any, **kwargs: Any) -> None:
    """Input the scheduler cannot serve is the client's error, a short 400 from the tokenizer manager:
    malformed ``custom_params`` (our keys, and any value of a type SGLang's scheduler cannot decode), an
    empty prompt and token ids outside the vocabulary (stock SGLang's scheduler dies on both), and segment
    spans outside the prompt."""
    server_args, _, vocab = compat.tokenizer_parts(manager)
    if _active(server_args) is None:
        return
    params = obj.sampling_params if isinstance(getattr(obj, "sampling_params", None), dict) else {}
    custom = params.get("custom_params")
    protocol.check_custom_params(custom)
    compat.check_custom_param_types(custom)
    if input_ids is None:
        return
    if len(input_ids) == 0:
        raise ValueError("the prompt is empty")
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in input_ids):
        raise ValueError("input_ids must be integers")
    protocol.check_vocabulary(input_ids, vocab, "input_ids")
    if isinstance(custom, dict) and custom.get(protocol.SPANS_KEY):
        validate_spans(protocol.parse_spans(custom[protocol.SPANS_KEY]), len(input_ids))


def _segment_text(manager: Any, obj: Any, *args: Any, **kwargs: Any) -> None:
    """Segment data that needs the tokenizer becomes token spans: a text prompt with a listed
    ``sparsex_segments`` or with in-band markers (where the request, ``sparsex_markers``, or the server,
    ``--sparsex-markers``, asks for them) is tokenized piece by piece; a token prompt with a listed
    ``sparsex_segments`` (the chat template's ids of ``/v1/chat/completions``) gets the spans where the
    segments' own ids occur in it (``protocol.locate_segments``)."""
    server_args, tok, _ = compat.tokenizer_parts(manager)
    config = _active(server_args)
    if config is None:
        return
    text, input_ids = getattr(obj, "text", None), getattr(obj, "input_ids", None)
    params = obj.sampling_params if isinstance(getattr(obj, "sampling_params", None), dict) else None
    raw = (params or {}).get("custom_params")
    if isinstance(input_ids, list) and input_ids and isinstance(input_ids[0], int):
        if not isinstance(raw, dict) or not raw.get(protocol.SEGMENTS_KEY):
            return
        protocol.check_custom_params(raw)
        if raw.get(protocol.SPANS_KEY):
            raise ValueError(f"send {protocol.SPANS_KEY} or {protocol.SEGMENTS_KEY}, not both")
        spans = protocol.locate_segments(input_ids, [tok.encode(t, add_special_tokens=False)
                                                     for t in raw[protocol.SEGMENTS_KEY]])
        custom = {k: v for k, v in raw.items() if k != protocol.SEGMENTS_KEY}
        custom[protocol.SPANS_KEY] = protocol.flatten_spans(spans)
        obj.sampling_params = {**(params or {}), "custom_params": custom}
        return
    if not isinstance(text, str) or input_ids is not None:
        return
    protocol.check_custom_params(raw)
    custom = dict(raw or {})
    listed = custom.get(protocol.SEGMENTS_KEY)
    markers = bool(custom.get(protocol.MARKERS_KEY)) or config.markers
    if not listed and not (markers and protocol.has_markers(text)):
        return
    if params is None:
        raise ValueError("segment markers need a single request with its own sampling_params")
    pieces = protocol.split_listed_segments(text, listed) if listed else protocol.split_marked_text(text)
    ids, spans = protocol.encode_pieces(pieces, lambda t: tok.encode(t),
                                        lambda t: tok.encode(t, add_special_tokens=False))
    custom.pop(protocol.SEGMENTS_KEY, None)
    custom[protocol.SPANS_KEY] = protocol.flatten_spans(spans)
    obj.sampling_params = {**params, "custom_params": custom}
    obj.text = "".join(p.text for p in pieces)
    obj.input_ids = ids


def _next_cut(tree_cache: HybridStateCache, req: Req) -> int | None:
    """``HybridStateCache.next_cut`` from where the request's next extend starts; a SparseX bug is counted and the
    extend is cut as SGLang cuts it."""
    try:
        return tree_cache.next_cut(req, compat.prefix_len(req))
    except Exception as exc:  # noqa: BLE001 - logged and counted by internal_error
        tree_cache.runtime.internal_error("admission", exc)
        return None


def _cut_at_state(original: Callable[..., Any], adder: PrefillAdder, req: Req, tree_cache: HybridStateCache,
                  args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """A hybrid's prefill admitted with its chunk budget cut so that the extend ends where its placement keeps a
    recurrent state (SGLang copies the state there at the chunk's end); the rest of the batch's budget stays
    what it was, less what the request took."""
    budget = compat.chunk_budget(adder)
    cut = _next_cut(tree_cache, req)
    if cut is None or budget is None or cut >= budget:
        return original(adder, req, *args, **kwargs)
    compat.set_chunk_budget(adder, cut)
    try:
        return original(adder, req, *args, **kwargs)
    finally:
        left = compat.chunk_budget(adder)
        compat.set_chunk_budget(adder, budget - cut + (left or 0))


def _admit_chunk(original: Callable[..., Any], adder: PrefillAdder, req: Req, *args: Any, **kwargs: Any) -> Any:
    """``PrefillAdder.add_chunked_req``: a hybrid's next chunk ends where its placement keeps the next state."""
    from sparsex_sgl.sglang.hybrid_cache import HybridStateCache

    tree_cache = compat.adder_view(adder)[0]
    if not isinstance(tree_cache, HybridStateCache) or not compat.unchanged():
        return original(adder, req, *args, **kwargs)
    cut = _next_cut(tree_cache, req)
    limit = compat.chunked_limit(adder)
    if cut is None or (limit is not None and limit <= cut):
        return original(adder, req, *args, **kwargs)
    compat.set_chunked_limit(adder, cut)
    try:
        return original(adder, req, *args, **kwargs)
    finally:
        compat.set_chunked_limit(adder, limit)


def _admit(original: Callable[..., Any], adder: PrefillAdder, req: Req, *args: Any, **kwargs: Any) -> Any:
    """Admission of one waiting request to the prefill batch being built (``PrefillAdder``).

    - **Deferral** (``SchedulerRuntime.should_defer``): a request whose segments a request in this batch,
      or a running one whose prompt is not cached yet, will cache waits for them; ``CONTINUE`` without
      adding it is what SGLang's loop already does for a request it skips (LoRA), and the request stays
      queued, in order. Only running requests count, so a deferral never leaves the scheduler idle.
    - **Chunked prefill**: a request that reuses segments needs its whole extend in one step (the sparse
      layers read every reused token's re-aligned KV). Where the chunk budget left would cut it, it is
      admitted whole as the first request of a batch, which then takes no more requests (its budget set
      to 0), or, behind other requests, it closes the batch and leads the next one. Requests without
      reuse are chunked as on stock SGLang. ``SegmentGraphCache`` matches no reuse for an extend longer
      than ``max_extend_tokens`` (4 chunks), so one step stays bounded.
    - **No room**: a request with reuse keeps its reused nodes, and the cached paths they hang on, from
      eviction while it is admitted. If those and its extend cannot fit the pool even with nothing else
      running, it would wait forever: it is matched again without reuse and admitted as on stock SGLang
      (counted as ``no_room_for_reuse``).
    """
    from sparsex_sgl.sglang.cache import SegmentGraphCache
    from sparsex_sgl.sglang.hybrid_cache import HybridStateCache

    request = compat.request_state(req)
    if request is None or not compat.unchanged():
        return original(adder, req, *args, **kwargs)
    tree_cache, batch, running_reqs = compat.adder_view(adder)
    if isinstance(tree_cache, HybridStateCache):
        return _cut_at_state(original, adder, req, tree_cache, args, kwargs)
    if not isinstance(tree_cache, SegmentGraphCache) or tree_cache.runtime.disabled_kind:
        return original(adder, req, *args, **kwargs)
    runtime = tree_cache.runtime
    results = compat.add_req_results()
    budget = compat.chunk_budget(adder)
    try:
        running = [compat.request_state(r) for r in running_reqs]
        if runtime.should_defer(request, [compat.request_state(r) for r in batch], running):
            return results.CONTINUE
        reuses = request.reuses
        lookup = request.matched.lookup if request.matched is not None else None
        whole = reuses and budget is not None and lookup is not None and lookup.n_tokens - lookup.prefix_len > budget
    except Exception as exc:  # a SparseX bug: admit it as stock SGLang would, without reuse (one rank)
        if runtime.gather is not None:
            raise  # a drop on one rank alone would make the ranks' batches differ: stop as stock SGLang would
        runtime.internal_error("admission", exc)
        tree_cache.drop(req)
        return original(adder, req, *args, **kwargs)
    if not whole:
        result = original(adder, req, *args, **kwargs)
    elif batch:
        return results.OTHER
    else:
        compat.set_chunk_budget(adder, None)  # chunked prefill off for this one admission
        try:
            result = original(adder, req, *args, **kwargs)
        finally:
            compat.set_chunk_budget(adder, 0 if req in batch else budget)
    if result == results.NO_TOKEN and reuses and not batch and not running:
        # Nothing runs, so no memory will come free by waiting: the reused segments' nodes (with the cached
        # paths they hang on, which they keep from eviction) and the extend do not fit the pool together.
        # Serve the request as stock SGLang would, with exact prefix reuse only.
        request.reuse_refused = True
        compat.rematch(req, tree_cache)  # match again, now without reuse (counted there)
        result = original(adder, req, *args, **kwargs)
    if req in batch:
        request.admitted()
    return result


def _refuse_prefill_graph(original: Callable[..., Any], runner: Any, forward_batch: ForwardBatch) -> bool:
    """No prefill CUDA graph for a batch that carries a request with reuse: its sparse layers change the row
    count mid-forward, which a captured graph cannot follow. Other batches keep SGLang's choice."""
    if any(state is not None and state.reuses for state in compat.batch_states(forward_batch)):
        return False
    return bool(original(runner, forward_batch))


def _add_details(result: Any, streamer: Any, req: Req) -> Any:
    """Per-request SparseX counts in ``meta_info["cached_tokens_details"]`` (unless ``--sparsex-hide-counts``)."""
    state = compat.request_state(req)
    outcome = None if state is None else state.outcome
    if outcome is None or state is None or not state.report_counts:
        return result
    details = dict(result) if result else {"device": compat.cached_tokens(req), "host": 0}
    outcome.settle()  # the batch's results are out, so its device values are ready
    details.update(outcome.as_details())
    return details


def _add_internal_state(result: Any, controller: Any, *args: Any, **kwargs: Any) -> Any:
    """``/sparsex/stats``: this scheduler's statistics; with tensor parallelism, rank 0's, and every rank's
    under ``ranks`` (each rank answers the same request, which SGLang broadcasts to all; rank 0's reply is
    the one served)."""
    from sparsex_sgl.sglang.cache import SegmentGraphCache

    tree_cache = compat.internal_state_tree_cache(controller)
    if isinstance(tree_cache, SegmentGraphCache):
        stats = tree_cache.stats()
        gather = tree_cache.runtime.gather
        if gather is not None:
            stats["ranks"] = gather(tree_cache.stats())
        compat.set_internal_state(result, STATE_SECTION, stats)
    return result


def _carry_requests(result: ForwardBatch, cls: Any, batch: ScheduleBatch, *args: Any, **kwargs: Any) -> ForwardBatch:
    """``ForwardBatch.init_new``: the batch's requests' SparseX states (in batch order) go with the forward
    batch, where the model hook and the prefill-graph check read them."""
    compat.carry_states(batch, result)
    return result


def _carry_to_static_batch(result: ForwardBatch, runner: Any, forward_batch: ForwardBatch, *args: Any,
                           **kwargs: Any) -> ForwardBatch:
    """``EagerRunner.load_batch`` copies the live forward batch into its static buffers as a new
    ``ForwardBatch``: the requests' states go along (the model hook reads them there)."""
    compat.copy_states(forward_batch, result)
    return result
