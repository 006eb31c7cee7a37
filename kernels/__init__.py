"""Attention kernels for SparseX, installed as ``sparsex_sgl.kernels``.

Every op has a torch reference (``attention_ref``) and a Triton implementation tested against it:
``scattered_attention`` (queries at explicit positions over SGLang's pooled KV, with the LSE),
``selection`` (attention mass per reused key from the LSE) and ``realign`` (RoPE re-alignment
fused with the K/V copy between slots), plus ``dense`` (whole-sequence causal prefill: FlashInfer when
installed on CUDA, else SDPA). The Triton modules are imported on demand, so this package
loads without a GPU; their tests run them under ``TRITON_INTERPRET=1`` there. Nothing here imports sglang.
"""

from sparsex_sgl.kernels.attention_ref import scattered_query_attention_ref, selection_scores_ref

__all__ = ["scattered_query_attention_ref", "selection_scores_ref"]
