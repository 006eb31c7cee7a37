"""Attention kernels for SparseX, installed as ``sparsex_sgl.kernels``.

Every op has one signature and a torch reference here; faster implementations (Triton, FlashInfer)
register beside it and are tested against the reference. Nothing here imports sglang.
"""

from sparsex_sgl.kernels.attention_ref import scattered_query_attention_ref, selection_scores_ref

__all__ = ["scattered_query_attention_ref", "selection_scores_ref"]
