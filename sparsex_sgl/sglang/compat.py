"""The one seam between SparseX and SGLang's internals, written against ``sglang==0.5.23``.

Every SGLang attribute, function and class the adapter reads, writes or patches beyond the official plugin
interfaces (the cache and attention-backend registries, ``HookRegistry``, ``BasePrefixCache``) is reached
through a function here, and each SGLang source whose behaviour one of them relies on is pinned by the
SHA-256 of its source (``PINS``). On another source ``changed_pins`` names it: the cache factory then
leaves SparseX off for the server (exact serving, the reason logged and counted as ``sglang_changed``),
the request hooks pass requests through, and ``tests/test_sglang_seam.py`` fails until the code here is
re-read against the new source and the pins are updated. No other adapter module imports SGLang at run
time (the same test checks that).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import threading
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from fastapi import Request
from sglang.srt.mem_cache.base_prefix_cache import (
    BasePrefixCache,
    CacheRequestHandle,
    DecLockRefParams,
    DecLockRefResult,
    EvictParams,
    EvictResult,
    IncLockRefResult,
    MatchPrefixParams,
    MatchResult,
)

if TYPE_CHECKING:
    from fastapi import FastAPI
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.managers.schedule_batch import Req, ScheduleBatch
    from sglang.srt.managers.schedule_policy import PrefillAdder
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
    from sglang.srt.mem_cache.registry import TreeCacheBuildContext
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch
    from sglang.srt.model_executor.model_runner import ModelRunner

    from sparsex_sgl.core.agreement import Gather
    from sparsex_sgl.core.request import RequestState
    from sparsex_sgl.core.sparse_extend import ShardReduce

Submit = Callable[[list[int], dict[str, Any], "str | None", "str | None"], Awaitable[dict[str, Any]]]
"""Serve one prompt as ``/generate`` does: ``(input_ids, sampling_params, extra_key, cache_salt) -> reply``."""

__all__ = [
    "BasePrefixCache", "CacheRequestHandle", "DecLockRefParams", "DecLockRefResult", "EvictParams", "EvictResult",
    "IncLockRefResult", "MatchPrefixParams", "MatchResult",
]

PINS: dict[str, str] = {
    "sglang.srt.managers.schedule_policy.PrefillAdder.add_chunked_req":
        "af3ae7db76b5e8d2adab38add0312ebbaae1932f2095c39fe670be6db67e53cc",
    "sglang.srt.mem_cache.memory_pool.HybridReqToTokenPool.__init__":
        "8e8e01e4c397c2a72d6037023f1fc2ac88c447624e68702303a63c329085ded1",
    "sglang.srt.mem_cache.allocator.mamba.MambaSlotAllocator.alloc":
        "7297996a0d78e2b4fd567dfd4cb46f194de640a98626b44f269a4d7bbb787958",
    "sglang.srt.mem_cache.allocator.mamba.MambaSlotAllocator.free":
        "c847d0245493326ef7b4aff6dc7a4123d9a8488f2fb078d7931eb77c804b612f",
    "sglang.srt.mem_cache.memory_pool.HybridReqToTokenPool.translate_mamba_indices":
        "24905251ba7dc956485a94da89670c8b8116b336e362542a34e19c8af5816de5",
    "sglang.srt.mem_cache.memory_pool.MambaPool.copy_from":
        "edf49d42d268f7926efd650edac3a09a109ec196055f64fce1105d467b6fd724",
    "sglang.srt.mem_cache.unified_cache.components.mamba.MambaComponent.finalize_match_result_in_cache":
        "cf8b61d4a6d7c8be5ad750526766f99e5a1809b0d1de237fe5ae057dcec5cad3",
    "sglang.srt.mem_cache.unified_cache.components.mamba.MambaComponent.prepare_for_caching_req":
        "3c3d5ac8e7e46b8f2105eab327ec29b7816c35a6971267c4466e3ad7c41695bb",
    "sglang.srt.mem_cache.unified_cache.components.mamba.MambaComponent.cleanup_after_caching_req":
        "f37c742b8956608403de69e63e250887197af07fb4fd7b6d956442a89858b031",
    "sglang.srt.managers.schedule_batch.Req.finished":
        "e9520ce0af62f8c7ecd751d9f603a65cff9cfc3752c13e4f7a656d74021384fc",
    "sglang.srt.mem_cache.memory_pool.HybridReqToTokenPool.free_mamba_cache":
        "3dab5fea7f1f231c06d997d62254fc544d785c3445d93445b5ed6e051e0bdb56",
    "sglang.srt.mem_cache.registry.create_tree_cache":
        "e797893ad42c211330b6d7df6af6ae8ef46126402f77a7a5d06c1ce50e9526b1",
    "sglang.srt.model_executor.model_runner.ModelRunner.load_model":
        "bf6781e45efd63b5441b7850012e6ff35f61fe62c9c6458fcb27f276ca334a54",
    "sglang.srt.entrypoints.engine.Engine.__init__": "54412adbf86ad86b9d29ac676a3ef237ddc1c0b8d1d844ffae3c110dac656913",
    "sglang.srt.distributed.parallel_state.GroupCoordinator.__init__":
        "dfcd45b955026c6bc01e20d93b3a15a2ae52178e6a5a9d882cd28fe36c947b16",
    "sglang.srt.distributed.parallel_state.init_model_parallel_group":
        "cf0355669ac6af65dea4272e667c89f7b0e2783606ab5d3e3b9464b41d368ef8",
    "sglang.srt.entrypoints.http_server.get_global_state":
        "4141aecd7b88b98661677dca30e80afa33f5e976b716b07163f4610e7361981f",
    "sglang.srt.layers.layer_boundary.residual.batch.clear":
        "93007b19dfba7c8481e848fdfc01348176b75d6e57c9cd78ed8dc9fd79c66814",
    "sglang.srt.layers.layer_boundary.residual.batch.complete_output":
        "07e9db3b0a9bb92fe1b31a315e190d2b8accd43ef38b3e0e4b699523ccde2868",
    "sglang.srt.layers.layer_boundary.residual.batch.export_replay_handoff":
        "02406ff2a28532b7c1ec209d86ebe041b4b850b492581e27b4ee7426039c11a5",
    "sglang.srt.layers.layer_boundary.residual.batch.final_norm":
        "242e96d61e14bc1e007884f04539fae84d55661d77cdd6277df66c9d46bbab1a",
    "sglang.srt.layers.layer_boundary.residual.batch.import_replay_handoff":
        "b20e16d76a55fc053d595de81b6e3a450b78c140115a64cb46246d4a252d24fd",
    "sglang.srt.layers.layer_boundary.residual.batch.start":
        "2b3296ab96cf6e0257bb49d5022254e8316fca087752fee6f0f2f93246e955d4",
    "sglang.srt.layers.radix_attention.RadixAttention.__init__":
        "bfedb02b83a9cd4879688c5d38e92fc3cac565c2f5d98b940d88c8ebe7da89f8",
    "sglang.srt.layers.radix_attention.RadixAttention.forward":
        "4ca2cac7fefcd32bc21a3e137201b292bb933a1c95f697cfad56e346e4a98dcb",
    "sglang.srt.layers.rotary_embedding.base.RotaryEmbedding.__init__":
        "669e515f7f234f9188f01062fe2722ac1d5a597e610b8893ac8ad07543e27e1a",
    "sglang.srt.managers.io_struct.GenerateReqInput":
        "855c1ed70061fc39ccbad4f22e61bcbd7606cc9e453a7e5d5655cb3b94083ad0",
    "sglang.srt.managers.schedule_batch.Req.__init__":
        "95516b226df11e45019d15c8b853c7e8781fb2a8524f445c825e2b7ae52c19b7",
    "sglang.srt.managers.schedule_batch.Req.init_next_round_input":
        "e7af52023f823aec3726cf67236ed435b6cf8e585376f3032bcb636bf73372fb",
    "sglang.srt.managers.schedule_batch.Req.refresh_fill_ids":
        "c36555f5ab4697b73bf5bff1c90605804a0768a3fa6063691f740185a7a2e340",
    "sglang.srt.managers.schedule_batch.ReqKvInfo": "78ec05bef977dd1a6fe03af28ebef42247d9517b405ba425213caa14c5610ad4",
    "sglang.srt.managers.schedule_batch.ScheduleBatch":
        "6db4b835a70420455a5770ce5b34b82f520ae4b3fafcef1661dba6969c06787a",
    "sglang.srt.managers.schedule_policy.AddReqResult":
        "a3d369b4716f5b7d37a0d247b2e02f3df569f11ac095fb2988b6faa25542baa0",
    "sglang.srt.managers.schedule_policy.PrefillAdder.__init__":
        "311684cd26be5b49ecc864a1f5adabf6263513b986c4d8d5738703b8d58615aa",
    "sglang.srt.managers.schedule_policy.PrefillAdder.add_one_req":
        "11ea292b16f33cb686bf72862fee68949b2586dac1b4c42a45525c6b43c17f7f",
    "sglang.srt.managers.scheduler_components.internal_state.SchedulerInternalStateController.get_internal_state":
        "f01b8205456841227be61ec37cf42654fee9a26c1dfea6a55eb93d8bca9ebde4",
    "sglang.srt.managers.scheduler_components.output_streamer.SchedulerOutputStreamer.get_cached_tokens_details":
        "532f8103ebb758996a2682345a6bc131ce1c0dff4c861004ce831bbadce4138b",
    "sglang.srt.managers.tokenizer_control_mixin.TokenizerControlMixin.get_internal_state":
        "2c8c8a78ff656d01a46cfb8eb0e91b18e4a74ed8cbde43d0dc6c6948ca660b6c",
    "sglang.srt.managers.tokenizer_manager.TokenizerManager.__init__":
        "eab95c39ec58cf4db875bb908b4527ee0f77827fb7de2e75e595057e92d603fc",
    "sglang.srt.managers.tokenizer_manager.TokenizerManager._tokenize_one_request":
        "e6d36ac90556da841582a252ae1c229ff575d13c779345ee91700c5df589bbe7",
    "sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request":
        "913d991d70106bffabf71c04915609bc6cc8b15678478eb5aae2c10b9ef814d8",
    "sglang.srt.managers.tokenizer_manager.TokenizerManager.generate_request":
        "894e0b7b045095200ca7ab30150bdcc7ef605c759d5d487d95427c473cf61f0a",
    "sglang.srt.mem_cache.allocator.token.TokenToKVPoolAllocator.alloc":
        "923aed278344d0a540e1fab8ff523225486b54ce09bd572ea39fe51bf9b0e118",
    "sglang.srt.mem_cache.allocator.token.TokenToKVPoolAllocator.available_size":
        "078f68a95bae72e396b13ce9163c5d89a09f0e37467970117bf143c621bfe5b4",
    "sglang.srt.mem_cache.allocator.token.TokenToKVPoolAllocator.free":
        "2d0c243cc83399cc6934d57c6d93cc0c0fa6341ae0518e0365e3e63493bc1d13",
    "sglang.srt.mem_cache.cache_init_params.CacheInitParams":
        "f053037848f3a09cfdc87d88c0d02514995b447631ae5ccf35944b37d5d4ec81",
    "sglang.srt.mem_cache.common.release_kv_cache": "90e19434d1fa8c220ddc6bf9349fcbf831e46de1310d92156887a113045435f9",
    "sglang.srt.mem_cache.hicache_storage.HiCacheFile.exists":
        "2f531e31ad3b0af84b254eef10599d20a78967edeea679422d88ccf5729dc9fa",
    "sglang.srt.mem_cache.hicache_storage.HiCacheFile.get":
        "0ca3ac4e0d7b65628dd2491bf5067a0505a7bf2d8b24d87a3f5304e52c7c2988",
    "sglang.srt.mem_cache.hicache_storage.HiCacheFile.set":
        "29390fb5cbd0bea379dfa2b9a1675ece86ebc70020a84b3180293d5038b96c74",
    "sglang.srt.mem_cache.hicache_storage.HiCacheStorageConfig":
        "5265356794bed999a4453f5046497eeac30de667259e95a68003d15b37ced814",
    "sglang.srt.mem_cache.memory_pool.KVWriteLoc": "e8a5d95ba308eb463af3daa9e213015ee9d00063db0349dbed5c8306152f6a8e",
    "sglang.srt.mem_cache.memory_pool.MHATokenToKVPool.__init__":
        "292b714d4030ac7c69731dc50f2802a1e4563a9ccfce08236c2c018a4d0715f3",
    "sglang.srt.mem_cache.memory_pool.MHATokenToKVPool.get_key_buffer":
        "ab5fc2d68e854c1d8c0f34ae5d0ed0d79072df1d95b06ca56198a542046c9919",
    "sglang.srt.mem_cache.memory_pool.MHATokenToKVPool.get_value_buffer":
        "ba5ea7b1b294d656e697ec4ae094a5356271e6735c361d0bc2ede17dcf227d54",
    "sglang.srt.mem_cache.memory_pool.MHATokenToKVPool.set_kv_buffer":
        "f5ac5415f0503888fa91d18f532d869b3ca8492733d41bf46065f9a5fc8d0e2a",
    "sglang.srt.mem_cache.memory_pool.ReqToTokenPool.__init__":
        "474f1c413d92b0a63be304c08af01b9bad1b3bfe12298f6bb3f9d362dc0dcbf2",
    "sglang.srt.mem_cache.registry.TreeCacheBuildContext":
        "ab93e276f6240fe60bce3c8ca6933477409639e094518a33ac00c8ac8f6c355d",
    "sglang.srt.mem_cache.storage.backend_factory.StorageBackendFactory._create_builtin_backend":
        "75ba4c4c2b2f3aa3ac0f7b719488a8639d37aa8017ff8d517caa82f3398f98a9",
    "sglang.srt.mem_cache.storage.mooncake_store.mooncake_store.MooncakeBaseStore.register_buffer":
        "dd029f6ecc7f62076f1408646d794f02388c2d77ad96c273a45d855eac8d57c0",
    "sglang.srt.mem_cache.storage.mooncake_store.mooncake_store.MooncakeStore.__init__":
        "14b64b1d6ef6c413be86513943a9a3d09954cb9b19e78c950cf3848b80410f42",
    "sglang.srt.mem_cache.storage.mooncake_store.mooncake_store.MooncakeStore.exists":
        "12e9706300e93b4772e73e4cc6291d916cfcdd0f0ebbaaa6526a3c863594cc90",
    "sglang.srt.mem_cache.storage.mooncake_store.mooncake_store.MooncakeStore.get":
        "521a1f49892fddd690207986badab759531ea4b8881c5b96a225f66e72e0cd79",
    "sglang.srt.mem_cache.storage.mooncake_store.mooncake_store.MooncakeStore.set":
        "3e4a276a2c272ae1b6060b276d30dd7a70174cc4bf5b3da35116408f8ab2996b",
    "sglang.srt.mem_cache.storage.backend_factory.StorageBackendFactory.create_backend":
        "32bb8e1563e291391df615cdb14d2f45d4fe168066fc17454798639ab929b1ad",
    "sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new":
        "1f92fa245fced357d681c76ce8b7874c4b1fab10380a8eb3f88243c6ab7aa35f",
    "sglang.srt.model_executor.model_runner.ModelRunner.__init__":
        "57d8b5cce5d3e259a3b72c6d9e322087e480f3021287650710cb58382e6089b7",
    "sglang.srt.model_executor.runner.eager_runner.EagerRunner.load_batch":
        "6e460a10c84a1430c3b74dbc9dde2708a01c9d10a321f556967f54db91b5ed56",
    "sglang.srt.model_executor.runner.prefill_cuda_graph_runner.PrefillCudaGraphRunner.can_run_graph":
        "2c4349416d987ef50243f2449277d985ce65aa304384e0a40d1a3d370f9db49e",
    "sglang.srt.models.llama.LlamaAttention.forward":
        "232b19ff50081952b7cc1893b5333b1864b0bf210ff13adb75031199261ac45e",
    "sglang.srt.models.llama.LlamaDecoderLayer.forward":
        "6d3680dbd7256ed245ecc69eddd62d9ab58ed482626175dfa1d327eeb1876606",
    "sglang.srt.models.llama.LlamaModel.forward": "d02b894a8afcbf3f4945a3bf062bbe297cd8d8c96cfaef66d5415db1e87d981b",
    "sglang.srt.models.qwen2.Qwen2Attention.forward":
        "41849402eca609941200beb43178d201496da72bdd368f335bb4d42bb9252746",
    "sglang.srt.models.qwen2.Qwen2DecoderLayer.forward":
        "6d3680dbd7256ed245ecc69eddd62d9ab58ed482626175dfa1d327eeb1876606",
    "sglang.srt.models.qwen2.Qwen2Model.forward": "2a5dfe1535ad52ee1110334aa5ef62d5d42017d0fb88b636e4ba1c59532e5afa",
    "sglang.srt.models.qwen3.Qwen3Attention.forward":
        "51db2ef32c3cff344af91602c74b3db46711198dc477933673e3cb57408325bd",
    "sglang.srt.models.qwen3.Qwen3DecoderLayer.forward":
        "7f3747f9e5dde0a80a4c1939525fc34c4aafaa2735d722eb8d624779e27f79bb",
    "sglang.srt.models.qwen3.Qwen3Model.forward": "38b8b1b6d5ce0768ffeca9b2d2a8d2b75dee7643bdeee690b6f7695a14b86c45",
    "sglang.srt.runtime_context.attention_backends": "5fad60b26308e0586fd41ea422aadaf95d9df0deb9014d55f2906e6691d7ce69",
    "sglang.srt.sampling.sampling_params.SamplingParams":
        "1d0c9893d15ecaa68157b2512c846deec1983d949625ffadb3d6f8d972c70e09",
    "sglang.srt.server_args.ServerArgs": "964c88a6d7f2d3e1f37548c6cc5ea1e64ae2204c75ba15dafc4f3521d9fcb9c3",
    "sglang.srt.server_args.ServerArgs.add_cli_args":
        "8d5f9b207365f5bad13d4623477aa017145dc67a98499441daf0eb84412c5a9e",
    "sglang.srt.server_args.ServerArgs.from_cli_args":
        "32152825e268b6da4218b27ab4f654c3230474a12af0cd4b2a9c4e6c588be0f2",
}
"""SHA-256 of the source of every SGLang function or class a function of this module relies on, as of
sglang 0.5.23; filled in by ``python -m sparsex_sgl.sglang.compat --print-pins`` after re-reading."""


TORCH_OPS_PINS: dict[str, str] = {
    "sglang.kernels.ops.attention.triton_gdn_fused_proj.fused_qkvzba_split_reshape_cat_contiguous":
        "ffb71f6b2f5ff855c9048ab5a5b24b11d3201016696709269079071e7d8b5392",
    "sglang.kernels.ops.elementwise.elementwise.fused_sigmoid_mul":
        "35737a93045d38c7be42cc5c59a06b1db355b08994026c903716253475248ebe",
    "sglang.kernels.ops.attention.fla.layernorm_gated.layernorm_fn":
        "02513fa19e43eda2580ea36d2cb2d32c17c56e2fca4cea323cfb7689fae3167e",
    "sglang.kernels.ops.attention.linear.fused_gdn_gating.fused_gdn_gating":
        "f789a9c0d1253846d3239dec22b260fa6d5868c92b1f100a331e3a8e93cd6ad2",
    "sglang.kernels.ops.mamba.causal_conv1d_triton.causal_conv1d_fn":
        "f6fdaaa1136a5be43439c78258385ecdea23fd06697dae476c55b6b91ef33dc4",
    "sglang.kernels.ops.mamba.causal_conv1d_triton.causal_conv1d_update":
        "9deee5a1f64dea91cfb7c90eea14ea8460013b26d314416f8094652619b34c88",
    "sglang.kernels.ops.attention.fla.chunk.chunk_gated_delta_rule":
        "2352618b281432035fa851896b9459e907a6a6b626641b71dde2caa56eb6479a",
    "sglang.kernels.ops.attention.linear.fused_sigmoid_gating_recurrent.fused_sigmoid_gating_delta_rule_update":
        "f66af14f8c40efaaddc969b20b7dae9444b8f1696bf55c8e417cf8096a2bbf59",
    "sglang.kernels.ops.mamba.triton_ops.ssd_combined.mamba_chunk_scan_combined":
        "46705f606c8c69db13eca4c4192935cb94794dc72995c3d41077ca376eabe752",
    "sglang.kernels.ops.mamba.triton_ops.ssu_dispatch.selective_state_update":
        "e07d5c16aa89284e77c04dedcec251d37d245a89ff7056b9ee82fd38789f00a2",
    "sglang.srt.models.qwen3_5.Qwen3_5GatedDeltaNet.forward":
        "c261d84a3d8b40ca93dff8079093f15b674ac95b192574fa2ab6351b794d2a8b",
    "sglang.srt.models.qwen3_5.Qwen3_5AttentionDecoderLayer.self_attention":
        "c30c9577e036dc1c57bd567fd8c750b6a23979b0ac47a35b4f760d060e1df662",
    "sglang.kernels.ops.attention.fla.layernorm_gated.RMSNorm.forward":
        "1edbcfc2c1d05b915dbf1e76566461505c4eb04192fc71def185b1d89a609e77",
    "sglang.srt.layers.attention.linear.gdn_backend.GDNAttnBackend.forward_decode":
        "bd4945e7e726901fe84bf0acb5106c3bca6fa56b8eea9b1826b2453352a98721",
    "sglang.srt.layers.attention.linear.gdn_backend.GDNAttnBackend.forward_extend":
        "157c717197b16be15298906f144e17b29bd9d5d465753f1ddf07174fb9cff9cd",
    "sglang.srt.layers.attention.linear.gdn_backend.GDNAttnBackend._convolve_prefill":
        "289549785832cf952f5dd8ed009d659132544cb78d2cb019fda6f2297a31cb21",
    "sglang.srt.layers.attention.linear.gdn_backend.GDNAttnBackend._prefill_gates":
        "bd75e722f6781fb328acc5d376bb101a8dfc132754275736e45eeced89b6b46f",
    "sglang.srt.layers.attention.linear.kernels.gdn_triton.TritonGDNKernel":
        "d68ba1fc688e7547aea5d584daa72b100dc2ccbf85e1cfe28b6f797223bda341",
    "sglang.srt.layers.attention.hybrid_linear_attn_backend.Mamba2AttnBackend.forward":
        "e483ee84e0b081c2e0e7dd9db3f955cc6d305fae0b356dcaf13ac97b3b96a4bd",
    "sglang.srt.layers.attention.mamba.mamba.MambaMixer2.forward":
        "5a9071150a454e0d6b05f1c8e57f02ac96566ba0fe84a804dd5a53bc6b3e4675",
    "sglang.srt.configs.hybrid_arch.mambaish_config":
        "ab0787bde144a2d2c5a4ab2d33f9e30970ef513ea8b0e3477c62af5de7bf2c31",
}
"""The SGLang sources ``torch_hybrid_ops`` replaces or whose calls the stand-ins mirror (``sglang.torch_ops``): read
only where a hybrid model is served on the CPU, because reading them imports SGLang's hybrid layers (seconds in
every process); every other pin is in ``PINS``."""

_STATE = "sparsex"
"""The attribute of SGLang's ``Req`` that carries its ``RequestState``."""
_BATCH_STATES = "sparsex_requests"
"""The attribute of a ``ForwardBatch`` that carries its requests' states, in batch order."""
_SPARSE_STEP = "sparsex"
"""The attribute of a ``ForwardBatch`` that carries, during its sparse layers, what they attend."""
_PINS_MARK = "__sglang_pins__"
_WRAPPED_MARK = "__sparsex__"


# ---------------------------------------------------------------------- pins
def source_digest(dotted: str) -> str:
    """SHA-256 of the source of the object at ``dotted`` ("" if it cannot be read: gone, not Python, or its
    module fails to import: any of these is a change)."""
    try:
        return hashlib.sha256(inspect.getsource(_resolve(dotted)).encode()).hexdigest()
    except Exception:  # noqa: BLE001 - whatever stops the source being read, the pin does not hold
        return ""


def changed_pins(pins: dict[str, str] | None = None) -> list[str]:
    """The pinned SGLang objects whose installed source differs from the pin (or that are gone)."""
    if pins is None:
        return list(_changed_now())
    return [name for name, digest in pins.items() if source_digest(name) != digest]


@functools.cache
def _changed_now() -> tuple[str, ...]:
    return tuple(changed_pins(PINS))


def unchanged() -> bool:
    """Whether this process's SGLang is the source every pin was read against (computed once per process:
    the plugin computes it while the server starts, so no request waits for it)."""
    return not _changed_now()


def _resolve(dotted: str) -> Any:
    """The object at ``package.module.Class.attr``: the longest importable prefix, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            target: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            target = getattr(target, attr)
        return target
    raise ImportError(dotted)


def _pin(*names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Mark a function of this module as relying on the SGLang objects ``names`` (each must be in PINS;
    ``tests/test_sglang_seam.py`` checks it). Documentation for the reader; no run-time cost."""

    def mark(function: Callable[..., Any]) -> Callable[..., Any]:
        setattr(function, _PINS_MARK, names)
        return function

    return mark


# ---------------------------------------------------------------------- plugin set-up (launcher, every process)
HOOK_TARGETS = {
    "add_cli_args": "sglang.srt.server_args.ServerArgs.add_cli_args",
    "from_cli_args": "sglang.srt.server_args.ServerArgs.from_cli_args",
    "tokenize": "sglang.srt.managers.tokenizer_manager.TokenizerManager._tokenize_one_request",
    "validate": "sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request",
    "cached_tokens_details":
        "sglang.srt.managers.scheduler_components.output_streamer.SchedulerOutputStreamer.get_cached_tokens_details",
    "internal_state":
        "sglang.srt.managers.scheduler_components.internal_state.SchedulerInternalStateController.get_internal_state",
    "admit": "sglang.srt.managers.schedule_policy.PrefillAdder.add_one_req",
    "admit_chunk": "sglang.srt.managers.schedule_policy.PrefillAdder.add_chunked_req",
    "prefill_graph": "sglang.srt.model_executor.runner.prefill_cuda_graph_runner.PrefillCudaGraphRunner.can_run_graph",
    "forward_batch": "sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new",
    "static_batch": "sglang.srt.model_executor.runner.eager_runner.EagerRunner.load_batch",
    "model_loaded": "sglang.srt.model_executor.model_runner.ModelRunner.load_model",
}
"""The SGLang methods the plugin hooks (``HookRegistry``), by the role the hook plays; each is pinned."""


def register_backends(name: str, create_attention: Callable[[ModelRunner], Any],
                      create_cache: Callable[[TreeCacheBuildContext], Any]) -> None:
    """Register the ``name`` attention backend (and its CLI choice) and radix-cache backend, once."""
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS, register_attention_backend
    from sglang.srt.mem_cache.registry import register_radix_cache_backend, registered_radix_cache_backends

    if name not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([name])
    if name not in ATTENTION_BACKENDS:
        register_attention_backend(name)(create_attention)  # type: ignore[no-untyped-call]
    if name not in registered_radix_cache_backends():
        register_radix_cache_backend(name, create_cache)


def register_hooks(hooks: Sequence[tuple[str, Callable[..., Any], str]]) -> None:
    """``(role in HOOK_TARGETS, hook, "before" | "after" | "around")`` through SGLang's ``HookRegistry``."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    kinds = {"before": HookType.BEFORE, "after": HookType.AFTER, "around": HookType.AROUND}
    for role, hook, kind in hooks:
        HookRegistry.register(HOOK_TARGETS[role], hook, kinds[kind])


@_pin("sglang.srt.entrypoints.engine.Engine.__init__")
def wrap_engine_server_args(wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    """Replace ``Engine.server_args_class`` (which ``Engine.__init__`` calls with the Engine's keywords) by
    ``wrap(original)``, once. A HookRegistry REPLACE on this class-valued attribute would rebind
    ``ServerArgs`` in every module; a plain setattr reaches the first Engine too."""
    import sys

    module = sys.modules.get("sglang.srt.entrypoints.engine")
    if module is None:
        return
    engine = module.Engine
    if getattr(engine.__dict__.get("server_args_class"), _WRAPPED_MARK, False):
        return
    wrapped = wrap(engine.server_args_class)
    setattr(wrapped, _WRAPPED_MARK, True)
    engine.server_args_class = staticmethod(wrapped)


@_pin("sglang.srt.layers.rotary_embedding.base.RotaryEmbedding.__init__")
def use_torch_rotary() -> None:
    """Pure-torch rotary embedding on the CPU (SGLang otherwise imports a vllm kernel that is absent here)."""
    import sglang.srt.layers.rotary_embedding.base as rotary_base

    rotary_base._is_cpu = True


_TORCH_OPS = {
    "sglang.srt.models.qwen3_5": ("fused_qkvzba_split_reshape_cat_contiguous", "fused_sigmoid_mul"),
    "sglang.kernels.ops.attention.fla.layernorm_gated": ("layernorm_fn",),
    "sglang.srt.layers.attention.linear.gdn_backend": ("fused_gdn_gating", "causal_conv1d_fn", "causal_conv1d_update"),
    "sglang.srt.layers.attention.linear.kernels.gdn_triton": ("chunk_gated_delta_rule",
                                                              "fused_sigmoid_gating_delta_rule_update"),
    "sglang.srt.layers.attention.mamba.mamba": ("causal_conv1d_fn", "causal_conv1d_update", "mamba_chunk_scan_combined",
                                                "selective_state_update"),
}
"""Module -> the kernel names its code looks up at call time, which ``torch_hybrid_ops`` rebinds."""


@_pin(*TORCH_OPS_PINS)
def torch_hybrid_ops(model_runner: ModelRunner) -> bool:
    """Serve a hybrid model (Gated DeltaNet or Mamba2 layers) on the CPU: rebind the kernel names its layers call
    to the pure-torch ops of ``sglang.torch_ops``, and keep decode off the packed GDN kernel (no torch version).
    False (nothing done) for a model without recurrent layers; raises where SGLang's hybrid layers are not the
    source the stand-ins mirror, since the server could not run them anyway."""
    from sglang.srt.configs.hybrid_arch import mambaish_config

    if mambaish_config(model_runner.model_config) is None:
        return False
    changed = changed_pins(TORCH_OPS_PINS)
    if changed:
        raise RuntimeError(f"sparsex_sgl: the CPU ops for hybrid models were written against other SGLang sources "
                           f"({', '.join(changed)})")
    from sparsex_sgl.sglang import torch_ops

    for module_name, names in _TORCH_OPS.items():
        module = importlib.import_module(module_name)
        for name in names:
            setattr(module, name, getattr(torch_ops, name))
    mamba = importlib.import_module("sglang.srt.layers.attention.mamba.mamba")
    setattr(mamba, "causal_conv1d_fn_triton", torch_ops.causal_conv1d_fn)  # noqa: B010 - bound on GPU hosts only
    setattr(mamba, "causal_conv1d_update_triton", torch_ops.causal_conv1d_update)  # noqa: B010
    importlib.import_module("sglang.srt.layers.attention.linear.kernels.gdn_triton").TritonGDNKernel \
        .supports_packed_decode = False
    return True


@_pin("sglang.srt.distributed.parallel_state.init_model_parallel_group")
def gloo_groups_without_nccl() -> None:
    """Tensor parallelism on the CPU: SGLang 0.5.23 gives every process group that is not NPU, XPU or Mooncake
    a PyNccl communicator, whose constructor needs CUDA, so ``--tp 2 --device cpu`` dies at start-up
    ("Expected a cuda device, but got: cpu"). Groups on ``gloo``, the CPU's backend, get none (their
    collectives then run on gloo, as SGLang's CPU path intends). Idempotent."""
    from sglang.srt.distributed import parallel_state

    original = parallel_state.init_model_parallel_group
    if getattr(original, "_sparsex_gloo", False):
        return

    @functools.wraps(original)
    def init(group_ranks: Any, local_rank: int, backend: str, use_pynccl: bool | None = None, *args: Any,
             **kwargs: Any) -> Any:
        if use_pynccl is None and backend == "gloo":
            use_pynccl = False
        return original(group_ranks, local_rank, backend, use_pynccl, *args, **kwargs)

    init._sparsex_gloo = True  # type: ignore[attr-defined]
    parallel_state.init_model_parallel_group = init


@_pin("sglang.srt.entrypoints.http_server.get_global_state",
      "sglang.srt.managers.tokenizer_control_mixin.TokenizerControlMixin.get_internal_state")
def add_stats_route(path: str, section: str) -> None:
    """``GET path`` on SGLang's HTTP app: ``{"schedulers": [state[section] of every scheduler]}``, through
    SGLang's internal-state RPC (``internal_state_hook`` puts the section there)."""
    from sglang.srt.entrypoints import http_server

    async def stats() -> Any:
        manager = http_server.get_global_state().tokenizer_manager
        if not hasattr(manager, "get_internal_state"):  # a multi-tokenizer router: it keeps no scheduler link
            return {"schedulers": [], "error": f"{type(manager).__name__} does not report scheduler state"}
        states = await manager.get_internal_state()
        return {"schedulers": [state.get(section) for state in states]}

    _add_route(http_server.app, path, stats, "GET")


def _add_route(app: FastAPI, path: str, handler: Callable[..., Any], method: str) -> None:
    if not any(getattr(route, "path", None) == path for route in app.routes):
        app.add_api_route(path, handler, methods=[method])


@_pin("sglang.srt.entrypoints.http_server.get_global_state", "sglang.srt.managers.io_struct.GenerateReqInput",
      "sglang.srt.managers.tokenizer_manager.TokenizerManager.__init__",
      "sglang.srt.managers.tokenizer_manager.TokenizerManager.generate_request")
def add_generate_route(path: str, handler: Callable[[Any, Any, Submit], Any]) -> None:
    """``POST path`` on SGLang's HTTP app: ``handler(request, tokenizer_manager, submit)``, where ``submit(input_ids,
    sampling_params, extra_key, cache_salt)`` serves one prompt as ``/generate`` would (the same checks and
    hooks) and returns its reply."""
    from sglang.srt.entrypoints import http_server
    from sglang.srt.managers.io_struct import GenerateReqInput

    async def route(request: Request) -> Any:  # FastAPI reads the annotation: a module-level name
        from fastapi.responses import JSONResponse
        from sglang.srt.managers.tokenizer_manager import TokenizerManager

        manager = http_server.get_global_state().tokenizer_manager
        if not isinstance(manager, TokenizerManager):  # a multi-tokenizer router serves /generate its own way
            return JSONResponse({"error": f"{path} needs a single tokenizer manager, not {type(manager).__name__}"},
                                status_code=501)

        async def submit(input_ids: list[int], sampling_params: dict[str, Any], extra_key: str | None,
                         cache_salt: str | None) -> dict[str, Any]:
            obj = GenerateReqInput(input_ids=input_ids, sampling_params=sampling_params, extra_key=extra_key,
                                   cache_salt=cache_salt)
            reply: dict[str, Any] = await manager.generate_request(obj, None).__anext__()
            return reply

        return await handler(request, manager, submit)

    _add_route(http_server.app, path, route, "POST")


@_pin("sglang.srt.managers.scheduler_components.internal_state.SchedulerInternalStateController.get_internal_state")
def internal_state_tree_cache(controller: Any) -> Any:
    """The tree cache of the scheduler whose internal-state reply ``controller`` builds."""
    return controller.scheduler.tree_cache


@_pin("sglang.srt.managers.scheduler_components.internal_state.SchedulerInternalStateController.get_internal_state")
def set_internal_state(result: Any, section: str, value: dict[str, object]) -> None:
    result.internal_state[section] = value


# ---------------------------------------------------------------------- the tokenizer manager
@_pin("sglang.srt.managers.tokenizer_manager.TokenizerManager.__init__",
      "sglang.srt.managers.io_struct.GenerateReqInput")
def tokenizer_parts(manager: Any) -> tuple[Any, Any, int]:
    """The tokenizer manager's server args, tokenizer and the model's vocabulary size."""
    return manager.server_args, manager.tokenizer, int(manager.model_config.vocab_size)


@_pin("sglang.srt.managers.tokenizer_manager.TokenizerManager.__init__")
def context_length(manager: Any) -> int:
    """The longest prompt plus output the served model takes (SGLang refuses longer requests)."""
    return int(manager.context_len)


@_pin("sglang.srt.sampling.sampling_params.SamplingParams")
def check_custom_param_types(custom: object) -> None:
    """ValueError (a 400) if ``custom_params`` holds a value SGLang's scheduler cannot decode as its
    ``CustomParamValue`` (its typed decoder does not catch that: the scheduler would die)."""
    import msgspec
    from sglang.srt.sampling.sampling_params import CustomParamValue

    try:
        msgspec.convert(custom, type=dict[str, CustomParamValue] | None, strict=True)
    except msgspec.ValidationError as exc:
        raise ValueError(f"custom_params: {str(exc)[:120]} (values: null, bool, number, string, or a flat list "
                         "or object of those)") from None


@_pin("sglang.srt.managers.schedule_batch.Req.finished")
def request_finished(req: Req) -> bool:
    return bool(req.finished())


@_pin("sglang.srt.managers.schedule_batch.Req.__init__")
def cached_tokens(req: Req) -> int:
    """SGLang's own prefix-hit count of a request (``meta_info.cached_tokens``)."""
    return int(req.cached_tokens)


# ---------------------------------------------------------------------- requests
@_pin("sglang.srt.managers.schedule_batch.Req.__init__")
def request_state(req: Req) -> RequestState | None:
    """SparseX's state carried on SGLang's request (``Req`` has no slots; SGLang sets no such attribute)."""
    return getattr(req, _STATE, None)


def set_request_state(req: Req, state: RequestState | None) -> None:
    setattr(req, _STATE, state)


@_pin("sglang.srt.managers.schedule_batch.Req.__init__")
def custom_params(req: Req) -> dict[str, object]:
    """The request's ``sampling_params.custom_params`` (a dict, empty when absent or of another type)."""
    custom = getattr(req.sampling_params, "custom_params", None)
    return custom if isinstance(custom, dict) else {}


@_pin("sglang.srt.managers.schedule_batch.Req.__init__")
def request_tokens(req: Req) -> tuple[list[int], int]:
    """The prompt and the tokens decoded so far (one list), and the prompt's length."""
    prompt = list(req.origin_input_ids)
    return prompt + list(req.output_ids or []), len(prompt)


@_pin("sglang.srt.managers.schedule_batch.Req.__init__")
def request_isolation(req: Req) -> tuple[str | None, str | None]:
    """SGLang's isolation fields of a request: ``extra_key`` and ``cache_salt``."""
    return getattr(req, "extra_key", None), getattr(req, "cache_salt", None)


@_pin("sglang.srt.managers.schedule_batch.Req.__init__")
def exactness_needs(req: Req) -> str:
    """Why the request needs exact prefill whatever it marks ("" if nothing does): prompt logprobs (or
    output logprobs without ``sparsex_approximate_logprobs``), hidden states, multimodal input."""
    from sparsex_sgl.core.protocol import APPROXIMATE_LOGPROBS_KEY

    if req.return_logprob:
        start = req.logprob_start_len
        prompt_rows = start is not None and 0 <= start < len(req.origin_input_ids)
        if prompt_rows or custom_params(req).get(APPROXIMATE_LOGPROBS_KEY) is not True:
            return "logprobs_requested"
    if req.return_hidden_states:
        return "hidden_states_requested"
    if req.multimodal_inputs is not None:
        return "multimodal_request"
    return ""


@_pin("sglang.srt.managers.schedule_batch.Req.__init__")
def request_id(req: Req) -> str:
    return str(req.rid)


@_pin("sglang.srt.managers.schedule_batch.Req.__init__", "sglang.srt.managers.schedule_batch.Req.refresh_fill_ids")
def fill_ids(req: Req, up_to: int) -> list[int]:
    """The request's token ids ``[0, up_to)`` as the checkpoint caches them (prompt, then decoded)."""
    return list(req.full_untruncated_fill_ids[:up_to])


# ---------------------------------------------------------------------- KV ownership of a request
@_pin("sglang.srt.managers.schedule_batch.Req.init_next_round_input")
def prefix_len(req: Req) -> int:
    """Where the request's next extend starts: its match, or the end of its last chunk."""
    return int(req.prefix_len)


@_pin("sglang.srt.managers.schedule_batch.ReqKvInfo", "sglang.srt.mem_cache.common.release_kv_cache")
def protected_len(req: Req) -> int:
    """How many leading positions of the request's row the tree cache owns (SGLang frees the rest)."""
    return int(req.kv.cache_protected_len)


@_pin("sglang.srt.managers.schedule_batch.ReqKvInfo", "sglang.srt.mem_cache.common.release_kv_cache")
def protect(req: Req, end: int) -> None:
    """The tree cache owns positions ``[0, end)`` of the request's row from now on: SGLang's release
    (``release_kv_cache``) frees only ``[end, owned)``, and the request counts a hit only past ``end``."""
    req.kv.cache_protected_len = end
    req.kv.cache_inserted_len = max(req.kv.cache_inserted_len, end)


@_pin("sglang.srt.managers.schedule_batch.ReqKvInfo", "sglang.srt.mem_cache.memory_pool.ReqToTokenPool.__init__")
def request_row(req: Req, req_to_token: torch.Tensor) -> torch.Tensor:
    """The request's ``req_to_token`` row (slots by position; a view: writes go to SGLang's table)."""
    return req_to_token[req.kv.req_pool_idx]


@_pin("sglang.srt.managers.schedule_batch.Req.__init__", "sglang.srt.mem_cache.common.release_kv_cache")
def move_lock(req: Req, cache: BasePrefixCache, handle: Any) -> None:
    """Re-anchor the request on ``handle``: lock it, unlock what the request held, as SGLang's own
    checkpoints do (``release_kv_cache`` unlocks ``req.lock``)."""
    new_lock = cache.lock(handle)
    cache.unlock(req.lock)
    req.lock = new_lock
    req.last_node = handle


# ---------------------------------------------------------------------- admission
@_pin("sglang.srt.managers.schedule_policy.PrefillAdder.__init__",
      "sglang.srt.managers.schedule_policy.PrefillAdder.add_one_req")
def adder_view(adder: PrefillAdder) -> tuple[BasePrefixCache, list[Req], list[Req]]:
    """The batch being built: its tree cache, the requests admitted so far, the requests running."""
    running = adder.running_batch.reqs if adder.running_batch is not None else []
    return adder.tree_cache, adder.can_run_list, list(running)


@_pin("sglang.srt.managers.schedule_policy.PrefillAdder.__init__",
      "sglang.srt.managers.schedule_policy.PrefillAdder.add_one_req")
def chunk_budget(adder: PrefillAdder) -> int | None:
    """Tokens the chunked-prefill budget has left in this batch (None: chunked prefill is off)."""
    return adder.rem_chunk_tokens


@_pin("sglang.srt.managers.schedule_policy.PrefillAdder.__init__",
      "sglang.srt.managers.schedule_policy.PrefillAdder.add_one_req")
def set_chunk_budget(adder: PrefillAdder, tokens: int | None) -> None:
    adder.rem_chunk_tokens = tokens


@_pin("sglang.srt.managers.schedule_policy.PrefillAdder.__init__",
      "sglang.srt.managers.schedule_policy.PrefillAdder.add_chunked_req")
def chunked_limit(adder: PrefillAdder) -> int | None:
    """The cap on the next chunk of the request being prefilled in chunks (None: none)."""
    return adder.chunked_req_limit


@_pin("sglang.srt.managers.schedule_policy.PrefillAdder.__init__",
      "sglang.srt.managers.schedule_policy.PrefillAdder.add_chunked_req")
def set_chunked_limit(adder: PrefillAdder, tokens: int | None) -> None:
    adder.chunked_req_limit = tokens


@_pin("sglang.srt.managers.schedule_policy.AddReqResult")
def add_req_results() -> Any:
    """SGLang's ``AddReqResult`` (what ``add_one_req`` returns)."""
    from sglang.srt.managers.schedule_policy import AddReqResult

    return AddReqResult


@_pin("sglang.srt.managers.schedule_batch.Req.init_next_round_input")
def rematch(req: Req, cache: BasePrefixCache) -> None:
    """Match the request again (SGLang's own per-round re-match), e.g. once its reuse was refused."""
    req.init_next_round_input(cache)


# ---------------------------------------------------------------------- batches
@_pin("sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new",
      "sglang.srt.model_executor.runner.eager_runner.EagerRunner.load_batch")
def batch_states(forward_batch: ForwardBatch) -> list[RequestState | None]:
    """The SparseX state of each request of a forward batch, in batch order (empty if none carries any)."""
    return getattr(forward_batch, _BATCH_STATES, None) or []


@_pin("sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new",
      "sglang.srt.managers.schedule_batch.ScheduleBatch")
def carry_states(batch: ScheduleBatch, forward_batch: ForwardBatch) -> None:
    """An extend batch's requests' SparseX states go with the forward batch built from it."""
    if batch.forward_mode.is_extend():  # the batch may be the overlap scheduler's copy, without the cache
        states = [request_state(req) for req in batch.reqs]
        if any(state is not None for state in states):
            setattr(forward_batch, _BATCH_STATES, states)


def copy_states(source: ForwardBatch, target: ForwardBatch) -> None:
    states = getattr(source, _BATCH_STATES, None)
    if states is not None:
        setattr(target, _BATCH_STATES, states)


def sparse_step(forward_batch: ForwardBatch) -> Any:
    """The sparse layers' rows the attention backend runs for this batch (None outside them)."""
    return getattr(forward_batch, _SPARSE_STEP, None)


def set_sparse_step(forward_batch: ForwardBatch, step: Any) -> None:
    setattr(forward_batch, _SPARSE_STEP, step)


@_pin("sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new")
def extend_layout(forward_batch: ForwardBatch) -> tuple[list[int], list[int], list[int]] | None:
    """Per request of an extend batch: prefix length, extend length, ``req_to_token`` row; None if this is
    not a plain extend (decode, mixed, target verify, ...) or its host copies are absent."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    if forward_batch.forward_mode != ForwardMode.EXTEND:
        return None
    prefix, extend = forward_batch.extend_prefix_lens_cpu, forward_batch.extend_seq_lens_cpu
    if prefix is None or extend is None:
        return None
    rows = forward_batch.req_pool_indices_cpu
    rows = rows if rows is not None else forward_batch.req_pool_indices
    return [int(p) for p in prefix], [int(e) for e in extend], [int(r) for r in rows.tolist()]


# ---------------------------------------------------------------------- recurrent states (hybrid models)
@_pin("sglang.srt.mem_cache.memory_pool.HybridReqToTokenPool.__init__",
      "sglang.srt.mem_cache.allocator.mamba.MambaSlotAllocator.alloc",
      "sglang.srt.mem_cache.allocator.mamba.MambaSlotAllocator.free",
      "sglang.srt.mem_cache.memory_pool.HybridReqToTokenPool.translate_mamba_indices",
      "sglang.srt.mem_cache.memory_pool.MambaPool.copy_from",
      "sglang.srt.mem_cache.memory_pool.HybridReqToTokenPool.free_mamba_cache",
      "sglang.srt.mem_cache.registry.create_tree_cache")
class StatePool:
    """SGLang's pool of recurrent-state slots (``HybridReqToTokenPool``), as ``core.states`` uses it: a slot
    allocator over ints, the pool's size, and a copy of one slot's states (every recurrent layer's) into
    another, as SGLang's own mamba cache copies a running request's state at a chunk's end."""

    def __init__(self, params: Any) -> None:
        self._pool = params.req_to_token_pool
        self._allocator = self._pool.mamba_allocator
        self.size = int(self._allocator.size)
        self.device = self._allocator.device

    def alloc(self, n: int) -> list[int] | None:
        slots = self._allocator.alloc(n)
        return None if slots is None else [int(s) for s in slots.view(-1).tolist()]

    def free(self, slots: Sequence[int]) -> None:
        if slots:
            self._allocator.free(torch.tensor(list(slots), dtype=torch.int64, device=self.device))

    def copy(self, source: int, target: int) -> None:
        index = functools.partial(torch.tensor, dtype=torch.int64, device=self.device)
        self._pool.mamba_pool.copy_from(self._pool.translate_mamba_indices(index([source])),
                                        self._pool.translate_mamba_indices(index([target])))

    def release_request(self, req: Req) -> None:
        """Free a request's own state slot (SGLang's release frees only its KV row)."""
        if req.kv.mamba_pool_idx is not None:
            self._pool.free_mamba_cache(req)


@_pin("sglang.srt.managers.schedule_batch.ReqKvInfo",
      "sglang.srt.mem_cache.unified_cache.components.mamba.MambaComponent.finalize_match_result_in_cache")
def stage_state_copy(req: Req, source: int, pool: StatePool, own: int | None) -> bool:
    """Have SGLang copy the stored state ``source`` into the request's own state slot on the forward stream, before
    any recurrent layer runs, as SGLang's mamba cache does at a hit; ``own`` is the slot to give a request that
    holds none (True: staged)."""
    if req.kv.mamba_pool_idx is None:
        if own is None:
            return False
        req.kv.mamba_pool_idx = torch.tensor(own, dtype=torch.int64, device=pool.device)
    req.kv.mamba_cow_src_index = torch.tensor([source], dtype=torch.int64, device=pool.device)
    req.kv.mamba_needs_clear = False
    return True


@_pin("sglang.srt.managers.schedule_batch.ReqKvInfo",
      "sglang.srt.mem_cache.unified_cache.components.mamba.MambaComponent.prepare_for_caching_req",
      "sglang.srt.mem_cache.unified_cache.components.mamba.MambaComponent.cleanup_after_caching_req")
def request_state_slot(req: Req, take: bool = False) -> int | None:
    """The request's own state slot (its live recurrent state; None if it holds none). ``take``: the cache takes
    the slot over at the request's end, as SGLang's mamba cache does (the request then holds none)."""
    slot = req.kv.mamba_pool_idx
    if slot is None:
        return None
    if take:
        req.kv.mamba_pool_idx = None
    return int(slot)


# ---------------------------------------------------------------------- model, pool, attention
@_pin("sglang.srt.mem_cache.memory_pool.MHATokenToKVPool.__init__")
def plain_kv_pool(pool: Any) -> bool:
    """Whether the pool is SGLang's unquantized per-layer ``MHATokenToKVPool`` (no subclass)."""
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    return type(pool) is MHATokenToKVPool


@_pin("sglang.srt.model_executor.model_runner.ModelRunner.__init__")
def runner_parts(model_runner: ModelRunner) -> tuple[torch.nn.Module, Any, torch.Tensor, torch.device]:
    """The loaded model, its KV pool (any ``KVCache``: ``plain_kv_pool`` tells whether SparseX can run on
    it), the ``req_to_token`` table and the device."""
    assert model_runner.req_to_token_pool is not None, "a model runner serving generation has a req_to_token pool"
    return (model_runner.model, model_runner.token_to_kv_pool, model_runner.req_to_token_pool.req_to_token,
            torch.device(model_runner.device))


@_pin("sglang.srt.model_executor.model_runner.ModelRunner.__init__")
def runner_server_args(model_runner: ModelRunner) -> Any:
    return model_runner.server_args


@_pin("sglang.srt.mem_cache.memory_pool.MHATokenToKVPool.get_key_buffer",
      "sglang.srt.mem_cache.memory_pool.MHATokenToKVPool.get_value_buffer")
def layer_buffers(pool: MHATokenToKVPool, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's K and V buffers ``[slots, kv_heads, head_dim]``."""
    return pool.get_key_buffer(layer_id), pool.get_value_buffer(layer_id)


@_pin("sglang.srt.mem_cache.memory_pool.MHATokenToKVPool.set_kv_buffer", "sglang.srt.mem_cache.memory_pool.KVWriteLoc")
def write_kv(pool: MHATokenToKVPool, layer: RadixAttention, slots: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor) -> None:
    """Write one layer's fresh K/V of some rows to ``slots``."""
    from sglang.srt.mem_cache.memory_pool import KVWriteLoc

    pool.set_kv_buffer(layer, KVWriteLoc(slots), k, v)


@_pin("sglang.srt.layers.radix_attention.RadixAttention.__init__")
def attention_shape(layer: RadixAttention) -> tuple[int, int, int, int, int, float]:
    """A RadixAttention layer's id, query and KV heads (this rank), q/k head dim, v head dim and scale."""
    return (layer.layer_id, layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim, layer.v_head_dim,
            float(layer.scaling))


@_pin("sglang.srt.layers.radix_attention.RadixAttention.forward", "sglang.srt.models.llama.LlamaAttention.forward",
      "sglang.srt.models.qwen2.Qwen2Attention.forward", "sglang.srt.models.qwen3.Qwen3Attention.forward")
def tap_queries(layer: RadixAttention, into: dict[int, torch.Tensor]) -> Any:
    """Record the rotated queries each call of ``layer`` receives, ``[rows, q_heads * head_dim]``, into
    ``into[layer_id]``; returns the handle whose ``remove()`` ends it. The models call their RadixAttention
    with the queries after RoPE as its first argument."""
    layer_id = layer.layer_id

    def record(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        into[layer_id] = args[0]

    return layer.register_forward_pre_hook(record)


@_pin("sglang.srt.runtime_context.attention_backends")
def inner_attention_backend(model_runner: ModelRunner, chosen: str, own: str) -> Any:
    """Build the stock attention backend the ``own`` prefill backend wraps: ``chosen``, else the decode
    backend SGLang resolved."""
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.runtime_context import attention_backends

    inner = chosen or attention_backends()[1]
    if inner == own or inner not in ATTENTION_BACKENDS:
        raise ValueError(f"--enable-sparsex wraps a stock prefill attention backend, got {inner!r}")
    return ATTENTION_BACKENDS[inner](model_runner)


def decoder_of(model: torch.nn.Module) -> Any:
    """The decoder stack of a ``*ForCausalLM`` (``model.model``), or None."""
    return getattr(model, "model", None)


@_pin("sglang.srt.models.llama.LlamaModel.forward", "sglang.srt.models.qwen2.Qwen2Model.forward",
      "sglang.srt.models.qwen3.Qwen3Model.forward")
def decoder_limits(decoder: Any) -> str:
    """Why the hooked decoder loop cannot serve this decoder instance ("" if it can)."""
    if not decoder.pp_group.is_first_rank or not decoder.pp_group.is_last_rank:
        return "pipeline parallelism is not supported"
    if decoder.layers_to_capture:
        return "auxiliary hidden-state capture (speculative decoding) is not supported"
    if getattr(getattr(decoder.layers[decoder.start_layer], "self_attn", None), "attn", None) is None:
        return f"decoder {type(decoder).__name__} has no RadixAttention at layers[i].self_attn.attn"
    return ""


def radix_attention(decoder: Any, layer: int) -> RadixAttention:
    return decoder.layers[layer].self_attn.attn


@_pin("sglang.srt.models.llama.LlamaModel.forward", "sglang.srt.models.qwen2.Qwen2Model.forward",
      "sglang.srt.models.qwen3.Qwen3Model.forward")
def decoder_parts(decoder: Any) -> tuple[Callable[[torch.Tensor], torch.Tensor], Any, int, int, torch.nn.Module]:
    """What the decoder loop calls, as the pinned model forwards call it: the embedding, the layers, the
    first and end layer of this rank, and the final norm."""
    return decoder.embed_tokens, decoder.layers, int(decoder.start_layer), int(decoder.end_layer), decoder.norm


@_pin("sglang.srt.models.llama.LlamaModel.forward", "sglang.srt.models.llama.LlamaDecoderLayer.forward",
      "sglang.srt.models.qwen2.Qwen2Model.forward", "sglang.srt.models.qwen2.Qwen2DecoderLayer.forward",
      "sglang.srt.models.qwen3.Qwen3Model.forward", "sglang.srt.models.qwen3.Qwen3DecoderLayer.forward")
def replace_forward(decoder: torch.nn.Module, forward: Callable[..., Any]) -> None:
    """Make ``forward`` the decoder instance's forward (the class and other instances keep theirs): a loop
    that embeds, calls ``layers[i](positions, hidden, forward_batch, capture_output=None)`` and normalises as
    the pinned model forwards do, with the residual stream handled as they handle it."""
    decoder.forward = forward


@_pin("sglang.srt.layers.layer_boundary.residual.batch.start", "sglang.srt.layers.layer_boundary.residual.batch.clear",
      "sglang.srt.layers.layer_boundary.residual.batch.complete_output",
      "sglang.srt.layers.layer_boundary.residual.batch.export_replay_handoff",
      "sglang.srt.layers.layer_boundary.residual.batch.import_replay_handoff",
      "sglang.srt.layers.layer_boundary.residual.batch.final_norm")
def residual_stream() -> Any:
    """SGLang's residual-stream helpers (``start``, ``complete_output``, ``export_replay_handoff``,
    ``import_replay_handoff``, ``final_norm``, ``clear``), which the decoder loop calls as SGLang's does."""
    from sglang.srt.layers.layer_boundary.residual import batch

    return batch


# ---------------------------------------------------------------------- building the cache
@_pin("sglang.srt.mem_cache.registry.TreeCacheBuildContext", "sglang.srt.mem_cache.cache_init_params.CacheInitParams")
def refused_features(ctx: TreeCacheBuildContext) -> list[str]:
    """The features of this server the ``sparsex`` cache does not support (parallelism other than TP:
    ``settings.refused_parallelism``)."""
    refused = [
        (ctx.enable_hierarchical_cache,
         ("hierarchical cache (--enable-hierarchical-cache: SparseX keeps segments in its own tiers, "
          "--sparsex-host-tier-gb and --sparsex-storage-backend)")),
        (ctx.is_hybrid_swa, "sliding-window hybrid models"),
        (ctx.is_hybrid_ssm and ctx.params.enable_mamba_extra_buffer,
         "--mamba-radix-cache-strategy extra_buffer (hybrid models: no_buffer)"),
        (ctx.is_hybrid_ssm and ctx.tp_size > 1, "tensor parallelism for hybrid models"),
        (ctx.params.page_size != 1, "--page-size other than 1"),
        (ctx.disable_radix_cache, "--disable-radix-cache"),
    ]
    return [what for refused_now, what in refused if refused_now]


@_pin("sglang.srt.mem_cache.registry.TreeCacheBuildContext")
def build_parts(ctx: TreeCacheBuildContext) -> tuple[Any, ModelRunner, Any, int, Any]:
    """The server args, the model runner, the HF config and the layer count of the model being served, and
    the cache's ``CacheInitParams``."""
    hf_config = ctx.model_config.hf_config
    num_layers = int(getattr(ctx.model_config, "num_hidden_layers", hf_config.num_hidden_layers))
    return ctx.server_args, ctx.tp_worker.model_runner, hf_config, num_layers, ctx.params


@_pin("sglang.srt.mem_cache.cache_init_params.CacheInitParams",
      "sglang.srt.mem_cache.allocator.token.TokenToKVPoolAllocator.alloc",
      "sglang.srt.mem_cache.allocator.token.TokenToKVPoolAllocator.free",
      "sglang.srt.mem_cache.allocator.token.TokenToKVPoolAllocator.available_size")
def cache_pools(params: Any) -> tuple[Any, torch.Tensor, Any, int, int]:
    """What a tree cache is built over: the ``req_to_token`` pool (a tree cache exposes it as
    ``req_to_token_pool``) and its table, the token allocator (``alloc(n) -> Tensor | None``,
    ``free(Tensor)``, ``available_size()``; exposed as ``token_to_kv_pool_allocator``), the pool's size in
    slots and the page size."""
    allocator = params.token_to_kv_pool_allocator
    return (params.req_to_token_pool, params.req_to_token_pool.req_to_token, allocator, int(allocator.size),
            int(params.page_size))


@_pin("sglang.srt.mem_cache.registry.TreeCacheBuildContext")
def hybrid_ssm(ctx: TreeCacheBuildContext) -> bool:
    """Whether the model has recurrent (Mamba2, Gated DeltaNet, ...) layers besides attention."""
    return bool(ctx.is_hybrid_ssm)


@_pin("sglang.srt.mem_cache.registry.TreeCacheBuildContext")
def tp_shard(ctx: TreeCacheBuildContext) -> tuple[int, int]:
    """This scheduler's tensor-parallel rank and the TP size: which share of the KV heads its pool holds."""
    return int(ctx.tp_rank), int(ctx.tp_size)


@_pin("sglang.srt.mem_cache.registry.TreeCacheBuildContext",
      "sglang.srt.distributed.parallel_state.GroupCoordinator.__init__")
def tp_collectives(ctx: TreeCacheBuildContext) -> tuple[Gather | None, ShardReduce | None]:
    """The tensor-parallel group's two collectives (None, None with one rank): the vote, every rank's
    ballot gathered over the group's CPU (gloo) group, which needs no device sync; and the signal reduce,
    an all-reduce over its device group (NCCL on CUDA, gloo on the CPU)."""
    if int(ctx.tp_size) <= 1:
        return None, None
    cpu_group, device_group = ctx.tp_group.cpu_group, ctx.tp_group.device_group
    size = int(ctx.tp_size)

    def gather(ballot: object) -> list[object]:
        ballots: list[object] = [None] * size
        torch.distributed.all_gather_object(ballots, ballot, group=cpu_group)
        return ballots

    def reduce(tensor: torch.Tensor, op: Literal["sum", "max"]) -> torch.Tensor:
        out = tensor.clone()
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM if op == "sum" else
                                     torch.distributed.ReduceOp.MAX, group=device_group)
        return out

    return gather, reduce


@_pin("sglang.srt.mem_cache.hicache_storage.HiCacheStorageConfig",
      "sglang.srt.mem_cache.hicache_storage.HiCacheFile.get", "sglang.srt.mem_cache.hicache_storage.HiCacheFile.set",
      "sglang.srt.mem_cache.hicache_storage.HiCacheFile.exists",
      "sglang.srt.mem_cache.storage.backend_factory.StorageBackendFactory.create_backend",
      "sglang.srt.mem_cache.storage.backend_factory.StorageBackendFactory._create_builtin_backend",
      "sglang.srt.mem_cache.storage.mooncake_store.mooncake_store.MooncakeBaseStore.register_buffer",
      "sglang.srt.mem_cache.storage.mooncake_store.mooncake_store.MooncakeStore.__init__",
      "sglang.srt.mem_cache.storage.mooncake_store.mooncake_store.MooncakeStore.get",
      "sglang.srt.mem_cache.storage.mooncake_store.mooncake_store.MooncakeStore.set",
      "sglang.srt.mem_cache.storage.mooncake_store.mooncake_store.MooncakeStore.exists")
def storage_backend(name: str, extra_config: dict[str, Any] | None, model_name: str, tp_rank: int,
                    tp_size: int) -> Any:
    """One of SGLang's HiCache storage backends by its ``--hicache-storage-backend`` name (``dynamic`` loads
    an out-of-tree class from ``extra_config``), configured as a non-MLA rank of one pipeline stage, with no
    host KV pool (backends that need one, ``hf3fs`` and others, refuse to build here). The store relies on the
    tested default's semantics: ``get`` fills the target or raises on a short read, ``set`` writes a
    temporary file and renames it, ``exists`` is a stat. ``mooncake`` moves bytes only between buffers
    registered with its transfer engine, so it is wrapped in ``_RegisteredObjects``."""
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig
    from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

    config = HiCacheStorageConfig(tp_rank=tp_rank, tp_size=tp_size, pp_rank=0, pp_size=1, attn_cp_rank=0,
                                  attn_cp_size=1, is_mla_model=False, enable_storage_metrics=False,
                                  is_page_first_layout=False, model_name=model_name, extra_config=extra_config)
    backend = StorageBackendFactory.create_backend(name, config, None)
    return _RegisteredObjects(backend) if name == "mooncake" else backend


class _RegisteredObjects:
    """Whole objects through a zero-copy backend (SGLang's ``MooncakeStore``: ``get`` / ``set`` take a pointer
    and a size inside memory registered with the transfer engine).

    Each call borrows a registered staging buffer (one per concurrent caller: at most the store's readers
    plus its writer), grown by doubling and re-registered when an object outgrows it. A read first zeroes
    its window, so an object shorter than expected leaves zeros that fail the object's checksum (Mooncake
    reports only success, not the length read); a longer one fails the read.
    """

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def _borrow(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            buffer = self._free.pop() if self._free else None
        if buffer is None or buffer.numel() < nbytes:
            if buffer is not None:
                self.backend.store.unregister_buffer(buffer.data_ptr())
            size = 1 << max(20, (nbytes - 1).bit_length())
            buffer = torch.empty(size, dtype=torch.uint8)
            self.backend.register_buffer(buffer)
        return buffer

    def _give_back(self, buffer: torch.Tensor) -> None:
        with self._lock:
            self._free.append(buffer)

    def exists(self, key: str) -> bool:
        return bool(self.backend.exists(key))

    def get(self, key: str, target_location: torch.Tensor | None = None, target_sizes: Any = None) -> Any:
        assert target_location is not None
        nbytes = target_location.numel()
        buffer = self._borrow(nbytes)
        try:
            window = buffer[:nbytes]
            window.zero_()
            if not self.backend.get(key, target_location=window.data_ptr(), target_sizes=nbytes):
                return None
            target_location.copy_(window)
            return target_location
        finally:
            self._give_back(buffer)

    def set(self, key: str, value: torch.Tensor | None = None, target_location: Any = None,
            target_sizes: Any = None) -> bool:
        assert value is not None
        nbytes = value.numel()
        buffer = self._borrow(nbytes)
        try:
            buffer[:nbytes].copy_(value)
            return bool(self.backend.set(key, target_location=buffer.data_ptr(), target_sizes=nbytes))
        finally:
            self._give_back(buffer)


@_pin("sglang.srt.server_args.ServerArgs")
def on_cpu(server_args: Any) -> bool:
    """Whether the server runs on the CPU (``--device cpu``)."""
    return getattr(server_args, "device", None) == "cpu"


@_pin("sglang.srt.server_args.ServerArgs")
def server_values(server_args: Any, keys: Iterable[str]) -> dict[str, Any]:
    """The launch settings ``keys`` (``ServerArgs`` field names; None where this SGLang has no such field)."""
    return {key: getattr(server_args, key, None) for key in keys}


@_pin("sglang.srt.server_args.ServerArgs")
def server_facts(server_args: Any) -> tuple[int | None, bool, str]:
    """``--chunked-prefill-size`` (None when off), ``--enable-metrics``, and the model name metrics use."""
    chunk = server_args.chunked_prefill_size
    name = str(server_args.served_model_name or server_args.model_path)
    return (chunk if chunk is not None and chunk > 0 else None), bool(server_args.enable_metrics), name


def relied_on() -> list[str]:
    """Every SGLang object this module relies on: the hook targets and each function's ``_pin`` names."""
    names = set(HOOK_TARGETS.values())
    for function in globals().values():
        names.update(getattr(function, _PINS_MARK, ()))
    return sorted(names)


def main() -> None:
    """``python -m sparsex_sgl.sglang.compat``: print ``PINS`` and ``TORCH_OPS_PINS`` for the installed SGLang, to paste here once
    every function above has been re-read against its source."""
    for title, names in (("PINS", [n for n in relied_on() if n not in TORCH_OPS_PINS]),
                         ("TORCH_OPS_PINS", list(TORCH_OPS_PINS))):
        print(f"{title}: dict[str, str] = {{")
        for name in names:
            print(f'    "{name}": "{source_digest(name) or "MISSING"}",')
        print("}")


if __name__ == "__main__":
    main()
