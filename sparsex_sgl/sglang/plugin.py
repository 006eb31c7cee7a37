"""The SGLang plugin (entry point ``sglang.srt.plugins: sparsex``).

SGLang calls ``register()`` once in every process it starts (launcher, scheduler, detokenizer, and in
``sgl.Engine``) before parsing arguments or loading a model. It registers the ``sparsex`` radix-cache
and attention backends, adds the launch flags, and hooks a few SGLang methods through the official
``HookRegistry``. Every hook is a no-op unless ``--enable-sparsex`` (or ``enable_sparsex=True``) was
given, except the CPU shim, which ``--device cpu`` switches on for stock SGLang too.

Flags: ``--enable-sparsex`` expands to ``--radix-cache-backend sparsex --prefill-attention-backend
sparsex``; the ``sparsex`` prefill backend wraps the prefill backend SGLang would have used (its
``--prefill-attention-backend``, else the decode one). Chunked prefill and the overlap scheduler stay on:
a request that reuses segments runs in one extend step (``_admit``), every other request is chunked as on
stock SGLang, and prefill CUDA graphs are refused for batches that carry a SparseX plan
(``_refuse_prefill_graph``). ``--sparsex-config PATH`` reads a YAML preset (configs/), and
``--sparsex-recompute-ratio`` / ``--sparsex-full-layers`` / ``--sparsex-selection`` /
``--sparsex-auto-segment`` / ``--sparsex-kernels`` override it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import yaml

from sparsex_sgl.hybrid import KERNEL_CHOICES, HybridConfig, describe_error

if TYPE_CHECKING:
    from sparsex_sgl.request import SparseXRequest
    from sparsex_sgl.sglang.runtime import SparseXRuntime

logger = logging.getLogger("sparsex_sgl")

NAME = "sparsex"
CPU_SHIM_ENV = "SPARSEX_SGL_CPU_SHIM"
OPTIONS = ("enable_sparsex", "sparsex_config", "sparsex_recompute_ratio", "sparsex_full_layers", "sparsex_selection",
           "sparsex_auto_segment", "sparsex_kernels", "sparsex_min_segment_tokens", "sparsex_markers",
           "sparsex_hide_counts")
STATS_ROUTE = "/sparsex/stats"


def register() -> None:
    """Entry point; cheap and idempotent."""
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS, register_attention_backend
    from sglang.srt.mem_cache.registry import register_radix_cache_backend, registered_radix_cache_backends
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([NAME])
    if NAME not in ATTENTION_BACKENDS:
        register_attention_backend(NAME)(_create_attention_backend)
    if NAME not in registered_radix_cache_backends():
        register_radix_cache_backend(NAME, _create_tree_cache)
    hooks = [
        ("sglang.srt.server_args.ServerArgs.add_cli_args", _add_cli_args, HookType.AROUND),
        ("sglang.srt.server_args.ServerArgs.from_cli_args", _from_cli_args, HookType.AROUND),
        ("sglang.srt.managers.tokenizer_manager.TokenizerManager._tokenize_one_request", _segment_text, HookType.BEFORE),
        ("sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request", _validate_prompt,
         HookType.BEFORE),
        ("sglang.srt.managers.scheduler_components.output_streamer.SchedulerOutputStreamer.get_cached_tokens_details",
         _add_details, HookType.AFTER),
        ("sglang.srt.managers.scheduler_components.internal_state.SchedulerInternalStateController.get_internal_state",
         _add_internal_state, HookType.AFTER),
        ("sglang.srt.managers.schedule_policy.PrefillAdder.add_one_req", _admit, HookType.AROUND),
        ("sglang.srt.model_executor.runner.prefill_cuda_graph_runner.PrefillCudaGraphRunner.can_run_graph",
         _refuse_prefill_graph, HookType.AROUND),
        ("sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new", _carry_requests, HookType.AFTER),
        ("sglang.srt.model_executor.runner.eager_runner.EagerRunner.load_batch", _carry_to_static_batch, HookType.AFTER),
    ]
    for target, hook, kind in hooks:
        HookRegistry.register(target, hook, kind)
    _patch_engine_kwargs()
    if os.environ.get(CPU_SHIM_ENV) == "1":
        _apply_cpu_shim()


def server_config(server_args: Any) -> HybridConfig | None:
    """The SparseX settings a server (or ``sgl.Engine``) was started with, None without ``--enable-sparsex``.

    They travel on the ``ServerArgs`` object itself (``_sparsex_config``, set at parsing and pickled with it
    into the scheduler processes), so two engines in one process each keep their own, and a hook of a
    server without the flag does nothing."""
    values = getattr(server_args, "_sparsex_config", None)
    return None if values is None else HybridConfig.from_mapping(values)


# ---------------------------------------------------------------------- backends
def _create_attention_backend(model_runner: Any) -> Any:
    """The ``sparsex`` prefill backend around the one SGLang would have built (``HybridConfig.prefill_backend``,
    else the decode backend SGLang resolved)."""
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.runtime_context import attention_backends

    from sparsex_sgl.sglang.attention import SparseXAttnBackend
    from sparsex_sgl.sglang.factory import config_of

    inner = config_of(getattr(model_runner, "server_args", None)).prefill_backend or attention_backends()[1]
    if inner == NAME or inner not in ATTENTION_BACKENDS:
        raise ValueError(f"--enable-sparsex wraps a stock prefill attention backend, got {inner!r}")
    return SparseXAttnBackend(ATTENTION_BACKENDS[inner](model_runner), model_runner)


def _create_tree_cache(ctx: Any) -> Any:
    from sparsex_sgl.sglang.factory import build

    return build(ctx)


def _apply_cpu_shim() -> None:
    """Pure-torch rotary embedding on the CPU (SGLang otherwise imports a vllm kernel that is absent)."""
    import sglang.srt.layers.rotary_embedding.base as rotary_base

    rotary_base._is_cpu = True


# ---------------------------------------------------------------------- flags and Engine kwargs
def _add_cli_args(original: Any, parser: argparse.ArgumentParser) -> None:
    original(parser)
    group = parser.add_argument_group("SparseX (sparsex_sgl)")
    group.add_argument("--enable-sparsex", action="store_true", default=False,
                       help="Segment-level KV reuse: sets the sparsex radix-cache and prefill attention backends.")
    group.add_argument("--sparsex-config", type=str, default=None, help="YAML preset of the hybrid plan (configs/).")
    group.add_argument("--sparsex-recompute-ratio", type=float, default=None,
                       help="Share of reused tokens recomputed in the sparse layers (default 0.15).")
    group.add_argument("--sparsex-full-layers", type=int, default=None,
                       help="Layers computed over every token before the selection (default 2).")
    group.add_argument("--sparsex-selection", type=str, default=None,
                       help="sparse_q (SparseX), query_mass (SparseX, mass only), kv_deviation (CacheBlend-style), "
                            "first_k (EPIC-style) or none.")
    group.add_argument("--sparsex-auto-segment", type=int, default=None, metavar="TOKENS",
                       help="Find segments of about TOKENS tokens in requests without segment data (content-"
                            "defined chunking after the prefix hit); 0 (default): such requests are exact.")
    group.add_argument("--sparsex-kernels", type=str, default=None, choices=KERNEL_CHOICES,
                       help="Ops of the sparse layers: auto (default: Triton on CUDA, torch on the CPU), triton, "
                            "torch.")
    group.add_argument("--sparsex-min-segment-tokens", type=int, default=None, metavar="TOKENS",
                       help="Marked segments shorter than this are served as gap text (default 8).")
    group.add_argument("--sparsex-markers", action="store_true", default=None,
                       help="Parse in-band segment markers in every text prompt (default: only in requests with "
                            "custom_params sparsex_markers=true).")
    group.add_argument("--sparsex-hide-counts", action="store_true", default=None,
                       help="Leave the per-request sparsex_* counts out of meta_info (/sparsex/stats keeps totals).")


def resolve_config(options: dict[str, Any]) -> HybridConfig:
    """The hybrid plan from a YAML preset plus flag overrides; a bad value (or a preset that cannot be read)
    is a ValueError whose message is one line (``hybrid.describe_error``)."""
    try:
        return _resolve_config(options)
    except ValueError as exc:
        raise ValueError(describe_error(exc)) from None


def _resolve_config(options: dict[str, Any]) -> HybridConfig:
    try:
        base = HybridConfig.from_yaml(options["sparsex_config"]) if options.get("sparsex_config") else HybridConfig()
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"--sparsex-config {options['sparsex_config']}: {exc}") from None
    values = asdict(base)
    for key, field_name in (("sparsex_recompute_ratio", "recompute_ratio"), ("sparsex_full_layers", "full_layers"),
                            ("sparsex_selection", "selection"), ("sparsex_auto_segment", "auto_segment_tokens"),
                            ("sparsex_kernels", "kernels"), ("sparsex_min_segment_tokens", "min_segment_tokens"),
                            ("sparsex_markers", "markers")):
        if options.get(key) is not None:
            values[field_name] = options[key]
    if options.get("sparsex_hide_counts"):
        values["report_counts"] = False
    if values["mass_pass"] == "lookahead":
        raise ValueError("mass_pass 'lookahead' is an offline comparison point (a second pass over the new rows, "
                         "reference executor only); the server serves the single-pass signals")
    return HybridConfig.from_mapping(values)


def _sparsex_defaults(values: dict[str, Any], config: HybridConfig) -> tuple[dict[str, Any], HybridConfig]:
    """Server-arg settings implied by --enable-sparsex, and the config with the prefill backend it wraps (an
    explicit ``--prefill-attention-backend``); a conflicting explicit choice is an error."""
    if values.get("radix_cache_backend") not in (None, NAME):
        raise ValueError(f"--enable-sparsex sets --radix-cache-backend {NAME}; got {values['radix_cache_backend']!r}")
    if values.get("disable_radix_cache"):
        raise ValueError("--enable-sparsex needs the radix cache; drop --disable-radix-cache")
    if values.get("attention_backend") == NAME:
        raise ValueError(f"--attention-backend {NAME} is set by --enable-sparsex for prefill only; drop it")
    chosen = values.get("prefill_attention_backend")
    if chosen not in (None, NAME):
        config = HybridConfig.from_mapping({**asdict(config), "prefill_backend": chosen})
    return {"radix_cache_backend": NAME, "prefill_attention_backend": NAME}, config


def _export(server_args: Any, config: HybridConfig | None) -> None:
    """Hand the settings to the scheduler processes (they inherit the environment at spawn)."""
    if getattr(server_args, "device", None) == "cpu":
        os.environ[CPU_SHIM_ENV] = "1"
        _apply_cpu_shim()
    if config is not None:
        server_args._sparsex_config = asdict(config)


def _from_cli_args(original: Any, cls: Any, args: argparse.Namespace) -> Any:
    options = {k: getattr(args, k, None) for k in OPTIONS}
    config = None
    if options["enable_sparsex"]:
        try:
            implied, config = _sparsex_defaults(vars(args), resolve_config(options))
            for key, value in implied.items():
                setattr(args, key, value)
        except ValueError as exc:  # a bad preset or flag value: one line, no traceback
            raise SystemExit(f"sparsex_sgl: {exc}") from None
    elif any(options[k] is not None for k in OPTIONS[1:]):
        raise SystemExit("sparsex_sgl: --sparsex-* options need --enable-sparsex")
    server_args = original(cls, args)
    _export(server_args, config)
    if config is not None:
        _add_http_route()
    return server_args


def _patch_engine_kwargs() -> None:
    """Let ``sgl.Engine(enable_sparsex=True, ...)`` through.

    ``Engine.__init__`` loads plugins and then builds ``self.server_args_class(**kwargs)``, which rejects
    unknown keywords. A plain setattr of a factory works for the first Engine too; a HookRegistry
    REPLACE on this class-valued attribute would rebind ``ServerArgs`` in every module.
    """
    engine_module = sys.modules.get("sglang.srt.entrypoints.engine")
    if engine_module is None:
        return
    engine = engine_module.Engine
    current = engine.__dict__.get("server_args_class")
    if getattr(current, "__sparsex__", False):
        return
    base = engine.server_args_class

    def build_server_args(**kwargs: Any) -> Any:
        options = {k: kwargs.pop(k) for k in OPTIONS if k in kwargs}
        config = None
        if options.get("enable_sparsex"):
            implied, config = _sparsex_defaults(kwargs, resolve_config(options))
            kwargs.update(implied)
        elif options:
            raise ValueError("sparsex_* options need enable_sparsex=True")
        server_args = base(**kwargs)
        _export(server_args, config)
        return server_args

    build_server_args.__sparsex__ = True  # type: ignore[attr-defined]
    engine.server_args_class = staticmethod(build_server_args)


# ---------------------------------------------------------------------- requests
def _check_wire_type(custom: Any) -> None:
    import msgspec
    from sglang.srt.sampling.sampling_params import CustomParamValue

    try:
        msgspec.convert(custom, type=dict[str, CustomParamValue] | None, strict=True)
    except msgspec.ValidationError as exc:
        raise ValueError(f"custom_params: {str(exc)[:120]} (values: null, bool, number, string, or a flat list "
                         "or object of those)") from None


def _validate_prompt(self: Any, obj: Any, input_ids: Any, *args: Any, **kwargs: Any) -> None:
    """Input the scheduler cannot serve is the client's error, a short 400 from the tokenizer manager:
    malformed ``custom_params`` (our keys, and any value of a type SGLang's scheduler cannot decode as
    ``CustomParamValue``: its typed decoder does not catch that), an empty prompt and token ids outside the
    vocabulary (stock SGLang's scheduler dies on both), and segment spans outside the prompt."""
    if server_config(self.server_args) is None:
        return
    from sparsex_sgl import protocol
    from sparsex_sgl.segments import validate_spans

    params = obj.sampling_params if isinstance(getattr(obj, "sampling_params", None), dict) else {}
    custom = params.get("custom_params")
    protocol.check_custom_params(custom)
    _check_wire_type(custom)
    if input_ids is None:
        return
    if len(input_ids) == 0:
        raise ValueError("the prompt is empty")
    vocab = int(self.model_config.vocab_size)
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in input_ids):
        raise ValueError("input_ids must be integers")
    if min(input_ids) < 0 or max(input_ids) >= vocab:
        bad = next(t for t in input_ids if not 0 <= t < vocab)
        raise ValueError(f"input_ids holds token id {bad}, outside the vocabulary [0, {vocab})")
    if isinstance(custom, dict) and custom.get(protocol.SPANS_KEY):
        validate_spans(protocol.parse_spans(custom[protocol.SPANS_KEY]), len(input_ids))


def _segment_text(self: Any, obj: Any, *args: Any, **kwargs: Any) -> None:
    """Segment data that needs the tokenizer becomes token spans: a text prompt with a listed
    ``sparsex_segments`` or with in-band markers (where the request, ``sparsex_markers``, or the server,
    ``--sparsex-markers``, asks for them) is tokenized piece by piece; a token prompt with a listed
    ``sparsex_segments`` (the chat template's ids of ``/v1/chat/completions``) gets the spans where the
    segments' own ids occur in it (``protocol.locate_segments``)."""
    config = server_config(self.server_args)
    if config is None:
        return
    from sparsex_sgl import protocol

    text, input_ids = getattr(obj, "text", None), getattr(obj, "input_ids", None)
    params = obj.sampling_params if isinstance(getattr(obj, "sampling_params", None), dict) else None
    raw = (params or {}).get("custom_params")
    if isinstance(input_ids, list) and input_ids and isinstance(input_ids[0], int):
        if not isinstance(raw, dict) or not raw.get(protocol.SEGMENTS_KEY):
            return
        protocol.check_custom_params(raw)
        if raw.get(protocol.SPANS_KEY):
            raise ValueError(f"send {protocol.SPANS_KEY} or {protocol.SEGMENTS_KEY}, not both")
        tok = self.tokenizer
        spans = protocol.locate_segments(input_ids, [tok.encode(t, add_special_tokens=False)
                                                     for t in raw[protocol.SEGMENTS_KEY]])
        custom = {k: v for k, v in raw.items() if k != protocol.SEGMENTS_KEY}
        custom[protocol.SPANS_KEY] = protocol.flatten_spans(spans)
        obj.sampling_params = {**params, "custom_params": custom}  # type: ignore[dict-item]
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
    tok = self.tokenizer
    ids, spans = protocol.encode_pieces(pieces, lambda t: tok.encode(t),
                                        lambda t: tok.encode(t, add_special_tokens=False))
    custom.pop(protocol.SEGMENTS_KEY, None)
    custom[protocol.SPANS_KEY] = protocol.flatten_spans(spans)
    obj.sampling_params = {**params, "custom_params": custom}
    obj.text = "".join(p.text for p in pieces)
    obj.input_ids = ids


def _admit(original: Any, self: Any, req: Any, *args: Any, **kwargs: Any) -> Any:
    """Admission of one waiting request to the prefill batch being built (``PrefillAdder``).

    - **Deferral** (``SparseXRuntime.should_defer``): a request whose segments a request in this batch, or
      a running one whose prompt is not cached yet, will cache waits for them; ``CONTINUE`` without adding
      it is what SGLang's loop already does for a request it skips (LoRA), and the request stays queued,
      in order. Only running requests count, so a deferral never leaves the scheduler idle.
    - **Chunked prefill**: a request that reuses segments needs its whole extend in one step (the sparse
      layers read every reused token's re-aligned KV). Where the chunk budget left would cut it, it is
      admitted whole as the first request of a batch, which then takes no more requests (its budget set
      to 0), or, behind other requests, it closes the batch and leads the next one. Requests without a
      plan are chunked as on stock SGLang. ``SegmentGraphCache`` plans no reuse for an extend longer than
      ``max_extend_tokens`` (4 chunks), so one step stays bounded.
    - **No room**: a request with reuse keeps its reused nodes, and the cached paths they hang on, from
      eviction while it is admitted. If those and its extend cannot fit the pool even with nothing else
      running, it would wait forever: it is matched again without reuse and admitted as on stock SGLang
      (counted as ``no_room_for_reuse``).
    """
    from sglang.srt.managers.schedule_policy import AddReqResult

    runtime: SparseXRuntime | None = getattr(self.tree_cache, "runtime", None)
    request: SparseXRequest | None = getattr(req, "sparsex", None)
    if runtime is None or request is None:
        return original(self, req, *args, **kwargs)
    budget = self.rem_chunk_tokens
    try:
        running_reqs = self.running_batch.reqs if self.running_batch is not None else []
        running = [getattr(r, "sparsex", None) for r in running_reqs]
        if runtime.should_defer(request, [getattr(r, "sparsex", None) for r in self.can_run_list], running):
            return AddReqResult.CONTINUE
        reuses = request.reuses
        lookup = request.matched.plan if request.matched is not None else None
        whole = reuses and budget is not None and lookup is not None and lookup.n_tokens - lookup.prefix_len > budget
    except Exception as exc:  # noqa: BLE001 - a SparseX bug: admit it as stock SGLang would, without its plan
        runtime.internal_error("admission", exc)
        runtime.drop(req)
        return original(self, req, *args, **kwargs)
    if not whole:
        result = original(self, req, *args, **kwargs)
    elif self.can_run_list:
        return AddReqResult.OTHER
    else:
        self.rem_chunk_tokens = None  # chunked prefill off for this one admission
        try:
            result = original(self, req, *args, **kwargs)
        finally:
            self.rem_chunk_tokens = 0 if req in self.can_run_list else budget
    if result == AddReqResult.NO_TOKEN and reuses and not self.can_run_list and not running:
        # Nothing runs, so no memory will come free by waiting: the reused segments' nodes (with the cached
        # paths they hang on, which they keep from eviction) and the extend do not fit the pool together.
        # Serve the request as stock SGLang would, with exact prefix reuse only.
        request.reuse_refused = True
        req.init_next_round_input(self.tree_cache)  # match again, now without reuse (counted there)
        result = original(self, req, *args, **kwargs)
    if req in self.can_run_list:
        request.admitted()
    return result


def _refuse_prefill_graph(original: Any, self: Any, forward_batch: Any) -> bool:
    """No prefill CUDA graph for a batch that carries a SparseX plan: its sparse layers change the row
    count mid-forward, which a captured graph cannot follow. Other batches keep SGLang's choice."""
    requests = getattr(forward_batch, "sparsex_requests", None) or ()
    if any(request is not None and request.reuses for request in requests):
        return False
    return bool(original(self, forward_batch))


def _add_details(result: Any, self: Any, req: Any) -> Any:
    """Per-request SparseX counts in ``meta_info["cached_tokens_details"]`` (unless ``--sparsex-hide-counts``)."""
    request: SparseXRequest | None = getattr(req, "sparsex", None)
    outcome = None if request is None else request.outcome
    if outcome is None or request is None or not request.report_counts:
        return result
    details = dict(result) if result else {"device": req.cached_tokens, "host": 0}
    outcome.settle()  # the batch's results are out, so its device values are ready
    details.update(outcome.as_details())
    return details


def _add_internal_state(result: Any, self: Any, *args: Any, **kwargs: Any) -> Any:
    tree_cache = self.scheduler.tree_cache
    if getattr(tree_cache, "runtime", None) is not None:  # the sparsex cache
        result.internal_state["sparsex"] = tree_cache.stats()
    return result


def _carry_requests(result: Any, cls: Any, batch: Any, *args: Any, **kwargs: Any) -> Any:
    """``ForwardBatch.init_new``: the batch's requests' SparseX state (``Req.sparsex``, in batch order) goes
    with the forward batch, where the model hook and the prefill-graph check read it."""
    if batch.forward_mode.is_extend():  # the batch may be the overlap scheduler's copy, without the cache
        states = [getattr(req, "sparsex", None) for req in batch.reqs]
        if any(state is not None for state in states):
            result.sparsex_requests = states
    return result


def _carry_to_static_batch(result: Any, self: Any, forward_batch: Any, *args: Any, **kwargs: Any) -> Any:
    """``EagerRunner.load_batch`` copies the live forward batch into its static buffers as a new
    ``ForwardBatch``: the requests' state goes along (the model hook reads it there)."""
    requests = getattr(forward_batch, "sparsex_requests", None)
    if requests is not None:
        result.sparsex_requests = requests
    return result


def _add_http_route() -> None:
    """``GET /sparsex/stats``: the counters of every scheduler, through SGLang's internal-state RPC."""
    from sglang.srt.entrypoints import http_server

    if any(getattr(r, "path", None) == STATS_ROUTE for r in http_server.app.routes):
        return

    async def sparsex_stats() -> Any:
        states = await http_server.get_global_state().tokenizer_manager.get_internal_state()
        return {"schedulers": [s.get("sparsex") for s in states]}

    http_server.app.add_api_route(STATS_ROUTE, sparsex_stats, methods=["GET"])
