"""The SGLang plugin (entry point ``sglang.srt.plugins: sparsex``).

SGLang calls ``register()`` once in every process it starts (launcher, scheduler, detokenizer, and in
``sgl.Engine``) before parsing arguments or loading a model. It registers the ``sparsex`` radix-cache
and attention backends, adds the launch flags, and hooks a few SGLang methods through the official
``HookRegistry``. Every hook is a no-op unless ``--enable-sparsex`` (or ``enable_sparsex=True``) was
given, except the CPU shim, which ``--device cpu`` switches on for stock SGLang too.

Flags: ``--enable-sparsex`` expands to ``--radix-cache-backend sparsex
--prefill-attention-backend sparsex`` with chunked prefill and the overlap scheduler off (the sparse
path needs each prompt in one extend step, planned and run in order). ``--sparsex-config PATH`` reads a
YAML preset (configs/), and ``--sparsex-recompute-ratio`` / ``--sparsex-full-layers`` /
``--sparsex-selection`` / ``--sparsex-auto-segment`` override it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict
from typing import Any

from sparsex_sgl.hybrid import HybridConfig
from sparsex_sgl.sglang.runtime import CONFIG_ENV

logger = logging.getLogger("sparsex_sgl")

NAME = "sparsex"
CPU_SHIM_ENV = "SPARSEX_SGL_CPU_SHIM"
OPTIONS = ("enable_sparsex", "sparsex_config", "sparsex_recompute_ratio", "sparsex_full_layers", "sparsex_selection",
           "sparsex_auto_segment")
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
        ("sglang.srt.sampling.sampling_params.SamplingParams.verify", _verify_custom_params, HookType.AFTER),
        ("sglang.srt.managers.tokenizer_manager.TokenizerManager._tokenize_one_request", _segment_text, HookType.BEFORE),
        ("sglang.srt.managers.scheduler_components.output_streamer.SchedulerOutputStreamer.get_cached_tokens_details",
         _add_details, HookType.AFTER),
        ("sglang.srt.managers.scheduler_components.internal_state.SchedulerInternalStateController.get_internal_state",
         _add_internal_state, HookType.AFTER),
        ("sglang.srt.managers.schedule_policy.PrefillAdder.add_one_req", _admit, HookType.AROUND),
    ]
    for target, hook, kind in hooks:
        HookRegistry.register(target, hook, kind)
    _patch_engine_kwargs()
    if os.environ.get(CPU_SHIM_ENV) == "1":
        _apply_cpu_shim()


def enabled() -> bool:
    """Whether this process tree serves with SparseX (the launcher exports the config to its children)."""
    return CONFIG_ENV in os.environ


# ---------------------------------------------------------------------- backends
def _create_attention_backend(model_runner: Any) -> Any:
    from sparsex_sgl.sglang.attention import create

    return create(model_runner)


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
                       help="sparse_q (SparseX), kv_deviation (CacheBlend-style), first_k (EPIC-style) or none.")
    group.add_argument("--sparsex-auto-segment", type=int, default=None, metavar="TOKENS",
                       help="Find segments of about TOKENS tokens in requests without segment data (content-"
                            "defined chunking after the prefix hit); 0 (default): such requests are exact.")


def resolve_config(options: dict[str, Any]) -> HybridConfig:
    """The hybrid plan from a YAML preset plus flag overrides; raises ValueError on bad values."""
    base = HybridConfig.from_yaml(options["sparsex_config"]) if options.get("sparsex_config") else HybridConfig()
    values = asdict(base)
    for key, field_name in (("sparsex_recompute_ratio", "recompute_ratio"), ("sparsex_full_layers", "full_layers"),
                            ("sparsex_selection", "selection"), ("sparsex_auto_segment", "auto_segment_tokens")):
        if options.get(key) is not None:
            values[field_name] = options[key]
    return HybridConfig.from_mapping(values)


def _sparsex_defaults(values: dict[str, Any]) -> dict[str, Any]:
    """Server-arg settings implied by --enable-sparsex; a conflicting explicit choice is an error."""
    if values.get("radix_cache_backend") not in (None, NAME):
        raise ValueError(f"--enable-sparsex sets --radix-cache-backend {NAME}; got {values['radix_cache_backend']!r}")
    if values.get("disable_radix_cache"):
        raise ValueError("--enable-sparsex needs the radix cache; drop --disable-radix-cache")
    implied: dict[str, Any] = {"radix_cache_backend": NAME, "disable_overlap_schedule": True, "chunked_prefill_size": -1}
    if values.get("prefill_attention_backend") in (None, NAME):
        implied["prefill_attention_backend"] = NAME
    return implied


def _export(server_args: Any, config: HybridConfig | None) -> None:
    """Hand the settings to the scheduler processes (they inherit the environment at spawn)."""
    if getattr(server_args, "device", None) == "cpu":
        os.environ[CPU_SHIM_ENV] = "1"
        _apply_cpu_shim()
    if config is not None:
        server_args._sparsex_config = asdict(config)
        os.environ[CONFIG_ENV] = json.dumps(asdict(config))


def _from_cli_args(original: Any, cls: Any, args: argparse.Namespace) -> Any:
    options = {k: getattr(args, k, None) for k in OPTIONS}
    config = None
    if options["enable_sparsex"]:
        try:
            config = resolve_config(options)
            for key, value in _sparsex_defaults(vars(args)).items():
                setattr(args, key, value)
        except ValueError as exc:
            raise SystemExit(f"sparsex_sgl: {exc}") from exc
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
            config = resolve_config(options)
            kwargs.update(_sparsex_defaults(kwargs))
        elif options:
            raise ValueError("sparsex_* options need enable_sparsex=True")
        server_args = base(**kwargs)
        _export(server_args, config)
        return server_args

    build_server_args.__sparsex__ = True  # type: ignore[attr-defined]
    engine.server_args_class = staticmethod(build_server_args)


# ---------------------------------------------------------------------- requests
def _verify_custom_params(result: Any, self: Any, *args: Any, **kwargs: Any) -> None:
    """Malformed segment data is the client's error: a clear 400 from the tokenizer manager."""
    if enabled():
        from sparsex_sgl.protocol import check_custom_params

        check_custom_params(self.custom_params)


def _segment_text(self: Any, obj: Any, *args: Any, **kwargs: Any) -> None:
    """Text prompts with segment markers (or a listed ``sparsex_segments``) become ids plus spans."""
    if not enabled() or not isinstance(getattr(obj, "text", None), str) or getattr(obj, "input_ids", None) is not None:
        return
    from sparsex_sgl import protocol

    params = obj.sampling_params if isinstance(obj.sampling_params, dict) else None
    custom = dict((params or {}).get("custom_params") or {})
    listed = custom.get(protocol.SEGMENTS_KEY)
    if not listed and not protocol.has_markers(obj.text):
        return
    if params is None:
        raise ValueError("segment markers need a single request with its own sampling_params")
    protocol.check_custom_params(custom)
    pieces = protocol.split_listed_segments(obj.text, listed) if listed else protocol.split_marked_text(obj.text)
    tok = self.tokenizer
    ids, spans = protocol.encode_pieces(pieces, lambda t: tok.encode(t),
                                        lambda t: tok.encode(t, add_special_tokens=False))
    custom.pop(protocol.SEGMENTS_KEY, None)
    custom[protocol.SPANS_KEY] = protocol.flatten_spans(spans)
    obj.sampling_params = {**params, "custom_params": custom}
    obj.text = "".join(p.text for p in pieces)
    obj.input_ids = ids


def _admit(original: Any, self: Any, req: Any, *args: Any, **kwargs: Any) -> Any:
    """Defer a request whose segments a request already in this prefill batch will cache
    (``SparseXRuntime.should_defer``): the SparseX counterpart of SGLang's in-batch prefix caching.

    ``CONTINUE`` without adding the request is what SGLang's admission loop already does for a request it
    skips (LoRA): the loop goes on with the next waiting request, and this one stays queued, in order.
    """
    from sparsex_sgl.sglang.runtime import current

    runtime = current()
    if runtime is not None and runtime.should_defer(req.rid, [r.rid for r in self.can_run_list]):
        from sglang.srt.managers.schedule_policy import AddReqResult

        return AddReqResult.CONTINUE
    return original(self, req, *args, **kwargs)


def _add_details(result: Any, self: Any, req: Any) -> Any:
    """Per-request SparseX counts in ``meta_info["cached_tokens_details"]``."""
    outcome = getattr(req, "sparsex_outcome", None)
    if outcome is None:
        return result
    details = dict(result) if result else {"device": req.cached_tokens, "host": 0}
    details.update(outcome.as_details())
    return details


def _add_internal_state(result: Any, self: Any, *args: Any, **kwargs: Any) -> Any:
    stats = getattr(self.scheduler.tree_cache, "stats", None)
    if callable(stats) and enabled():
        result.internal_state["sparsex"] = stats()
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
