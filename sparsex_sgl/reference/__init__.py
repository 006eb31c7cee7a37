"""Reference executor over HF transformers models: full prefill, segment cache fill, SparseX prefill
and the baselines on one code path, for tests and the fidelity evaluation."""

from sparsex_sgl.reference.executor import PrefillResult, ReferenceExecutor
from sparsex_sgl.reference.model import ModelSpec
from sparsex_sgl.reference.pool import FreeListAllocator, TensorKVPool

__all__ = ["FreeListAllocator", "ModelSpec", "PrefillResult", "ReferenceExecutor", "TensorKVPool"]
