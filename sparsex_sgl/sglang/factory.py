"""Builds the ``sparsex`` tree cache in a scheduler process and hooks the loaded model.

SGLang calls the factory after the model is loaded (``Scheduler.__init__`` -> ``build_kv_cache``), so
this is where the model's rope, the KV pool and the decoder stack are inspected. Anything SparseX cannot
serve (an SGLang whose pinned sources changed, another architecture, a rope type without a delta rotation,
a quantized pool) leaves the cache working as an exact prefix cache: every request then runs stock
prefill, and the reason is logged once, counted per request and reported in the statistics. Server
features the cache cannot work with at all (hierarchical cache, paged pools, pipeline parallelism, ...) stop the launch.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from sparsex_sgl.core.agreement import DISAGREEMENT
from sparsex_sgl.core.config import ServerConfig
from sparsex_sgl.core.errors import UnsupportedModelError
from sparsex_sgl.core.ops import op_set
from sparsex_sgl.core.rope import RopeConfig
from sparsex_sgl.core.tiers import HostTier, KVLayout, SegmentStore, TierCounters
from sparsex_sgl.sglang import compat, model_hook
from sparsex_sgl.sglang.cache import SegmentGraphCache
from sparsex_sgl.sglang.hybrid_cache import RECURRENT, HybridStateCache
from sparsex_sgl.sglang.metrics import PrometheusExport
from sparsex_sgl.sglang.runtime import SchedulerRuntime
from sparsex_sgl.sglang.settings import REFUSED_PARALLELISM, config_of, refused_parallelism
from sparsex_sgl.sglang.tiers import PoolTiers

if TYPE_CHECKING:
    from sglang.srt.mem_cache.registry import TreeCacheBuildContext

logger = logging.getLogger("sparsex_sgl")

CHUNKS_PER_REUSE_STEP = 4
"""A request with reuse runs its whole extend in one step, up to this many prefill chunks
(``--chunked-prefill-size``); longer ones are chunked with exact prefix reuse only."""


def build(ctx: TreeCacheBuildContext) -> SegmentGraphCache:
    """The radix-cache factory registered as ``sparsex``."""
    server_args, model_runner, hf_config, num_layers, params = compat.build_parts(ctx)
    refused = compat.refused_features(ctx)
    parallel = refused_parallelism(compat.server_values(server_args, REFUSED_PARALLELISM))
    if refused or parallel:  # --radix-cache-backend sparsex without --enable-sparsex reaches here unchecked
        raise ValueError(f"--radix-cache-backend sparsex does not support {refused[0] if refused else parallel}")
    config = config_of(server_args)
    model, pool, _, device = compat.runner_parts(model_runner)
    chunk, metrics_on, model_name = compat.server_facts(server_args)
    if compat.hybrid_ssm(ctx):
        return _hybrid(params, config, num_layers, device, metrics_on, model_name)
    rope: RopeConfig | None = None
    kind, reason = "", ""
    changed = compat.changed_pins()
    if changed:
        kind, reason = "sglang_changed", (f"this SGLang's {', '.join(changed)} differ from the sglang 0.5.23 source "
                                          "sparsex_sgl.sglang.compat was written against")
    if not reason:
        try:
            rope = RopeConfig.from_hf_config(hf_config)
        except (UnsupportedModelError, ValueError, AttributeError) as exc:
            kind, reason = "unsupported_model", f"rope: {exc}"
    if not reason and not compat.plain_kv_pool(pool):
        kind, reason = "unsupported_model", (f"KV pool {type(pool).__name__} (only an unquantized MHATokenToKVPool is "
                                             "supported)")
    max_extend = CHUNKS_PER_REUSE_STEP * chunk if chunk is not None else None
    gather, shards = compat.tp_collectives(ctx)
    shard = compat.tp_shard(ctx)
    runtime = SchedulerRuntime(config, rope, num_layers, op_set(config.kernels, device), max_extend_tokens=max_extend,
                               gather=gather, tp_rank=shard[0])
    if gather is not None:  # every rank gathers, whatever it found above, so none waits for another
        sizes = gather(compat.cache_pools(params)[3])
        if len(set(sizes)) > 1 and not reason:  # the ranks' graphs would evict differently: their decisions must be equal
            kind, reason = DISAGREEMENT, f"the tensor-parallel ranks' KV pools differ in size: {sizes}"
    if not reason:
        reason = model_hook.install(model, model_runner, runtime, shards)
        kind = "unsupported_model" if reason else ""
    if reason:
        runtime.disable(kind, reason)
    else:
        logger.info("SparseX on: %s, %d layers, %s ops", config, num_layers, runtime.ops.name)
    metrics = PrometheusExport({"model_name": model_name}, rank=shard[0]) if metrics_on else None
    tiers = _tiers(config, pool, num_layers, device, model_name, shard) if not reason else None
    return SegmentGraphCache(params, runtime, device, metrics, tiers)


def _hybrid(params: Any, config: ServerConfig, num_layers: int, device: torch.device, metrics_on: bool,
            model_name: str) -> HybridStateCache:
    """A hybrid model (recurrent layers): exact prefixes resumed from recurrent-state checkpoints, no segment
    reuse (docs/how-it-works.md, "Hybrid models"); the model is not hooked."""
    runtime = SchedulerRuntime(config, None, num_layers, op_set(config.kernels, device))
    runtime.disable(RECURRENT, "a recurrent layer's state depends on its whole left context: exact prefixes only, "
                               "resumed from stored recurrent states")
    metrics = PrometheusExport({"model_name": model_name}, rank=0) if metrics_on else None
    return HybridStateCache(params, runtime, device, metrics)


def _tiers(config: ServerConfig, pool: Any, num_layers: int, device: torch.device, model_name: str,
           shard: tuple[int, int]) -> PoolTiers | None:
    """The host tier and the shared store the flags ask for (None: the pool is the only tier). A store
    that cannot be built stops the launch, with SGLang's own reason."""
    if not config.host_tier_gb and not config.storage_backend:
        return None
    k_buffer, v_buffer = compat.layer_buffers(pool, 0)
    layout = KVLayout(model_name, k_buffer.dtype, num_layers, int(k_buffer.shape[1]), int(k_buffer.shape[2]),
                      int(v_buffer.shape[2]), *shard)
    counters = TierCounters()
    host = HostTier(int(config.host_tier_gb * 1e9), counters) if config.host_tier_gb else None
    store = None
    if config.storage_backend:
        try:
            backend = compat.storage_backend(config.storage_backend, config.storage_settings(), model_name, *shard)
        except Exception as exc:
            raise ValueError(f"--sparsex-storage-backend {config.storage_backend}: {exc}") from exc
        store = SegmentStore(backend, layout, counters, timeout_s=config.storage_timeout_s)
    logger.info("SparseX tiers: host %.3g GB, store %s", config.host_tier_gb, config.storage_backend or "none")
    return PoolTiers(pool, layout, device, host, store, counters, config.storage_backend)
