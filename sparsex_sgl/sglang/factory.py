"""Builds the ``sparsex`` tree cache in a scheduler process and hooks the loaded model.

SGLang calls the factory after the model is loaded (``Scheduler.__init__`` -> ``build_kv_cache``), so
this is where the model's rope, the KV pool and the decoder stack are inspected. Anything SparseX cannot
serve (another architecture, a rope type without a delta rotation, a quantized or paged pool) leaves
the cache working as an exact prefix cache: every request then runs stock prefill, and the reason is
logged once and reported in the statistics.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from sparsex_sgl.errors import UnsupportedModelError
from sparsex_sgl.hybrid import HybridConfig
from sparsex_sgl.rope import RopeConfig
from sparsex_sgl.sglang import model_hook, runtime
from sparsex_sgl.sglang.cache import SegmentGraphCache
from sparsex_sgl.sglang.metrics import PrometheusExport
from sparsex_sgl.sparse_extend import Kernels

logger = logging.getLogger("sparsex_sgl")

CHUNKS_PER_REUSE_STEP = 4
"""A request with reuse runs its whole extend in one step, up to this many prefill chunks
(``--chunked-prefill-size``); longer ones are chunked with exact prefix reuse only."""

def config_of(server_args: Any) -> HybridConfig:
    """The server's SparseX settings (``plugin.server_config``); the defaults where the ``sparsex`` backends
    were chosen by their SGLang flags rather than ``--enable-sparsex``."""
    from sparsex_sgl.sglang.plugin import server_config

    return server_config(server_args) or HybridConfig()


def build(ctx: Any) -> SegmentGraphCache:
    """The radix-cache factory registered as ``sparsex``."""
    refused = [
        (ctx.enable_hierarchical_cache, "hierarchical cache (--enable-hierarchical-cache)"),
        (ctx.is_hybrid_swa, "sliding-window hybrid models"),
        (ctx.is_hybrid_ssm, "mamba/SSM hybrid models"),
        (ctx.tp_size > 1, "tensor parallelism > 1"),
        (ctx.params.page_size != 1, "--page-size other than 1"),
        (ctx.disable_radix_cache, "--disable-radix-cache"),
    ]
    for refused_now, what in refused:
        if refused_now:
            raise ValueError(f"--radix-cache-backend sparsex does not support {what}")
    config = config_of(ctx.server_args)
    model_runner = ctx.tp_worker.model_runner
    hf_config = ctx.model_config.hf_config
    num_layers = int(getattr(ctx.model_config, "num_hidden_layers", hf_config.num_hidden_layers))
    reason = ""
    rope: RopeConfig | None = None
    try:
        rope = RopeConfig.from_hf_config(hf_config)
    except (UnsupportedModelError, ValueError, AttributeError) as exc:
        reason = f"rope: {exc}"
    pool = model_runner.token_to_kv_pool
    if not reason and type(pool).__name__ != "MHATokenToKVPool":
        reason = f"KV pool {type(pool).__name__} (only an unquantized MHATokenToKVPool is supported)"
    device = torch.device(model_runner.device)
    kernels: Kernels = "triton" if config.kernels == "triton" or (config.kernels == "auto" and device.type == "cuda") \
        else "torch"
    chunk = getattr(ctx.server_args, "chunked_prefill_size", None)
    max_extend = CHUNKS_PER_REUSE_STEP * chunk if chunk is not None and chunk > 0 else None
    state = runtime.SparseXRuntime(config, rope, num_layers, kernels=kernels, max_extend_tokens=max_extend)
    if not reason:
        reason = model_hook.install(model_runner.model, model_runner, state)
    state.disabled_reason = reason
    if reason:
        logger.warning("SparseX is off for this model (%s); requests get exact prefix caching only", reason)
    else:
        logger.info("SparseX on: %s, %d layers", config, num_layers)
    metrics = None
    if getattr(ctx.server_args, "enable_metrics", False):
        args = ctx.server_args
        metrics = PrometheusExport({"model_name": str(args.served_model_name or args.model_path)})
    return SegmentGraphCache(ctx.params, state, device, metrics)
