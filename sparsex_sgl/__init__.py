"""sparsex_sgl: segment-level KV-cache reuse (the SparseX method) for SGLang.

``sparsex_sgl.core`` is the engine-free method, ``sparsex_sgl.sglang`` the SGLang adapter (imported only by
SGLang's plugin loader), ``sparsex_sgl.kernels`` the Triton kernels; the rest are user tools (the CLI,
assets, the client, the evaluation and the load harness).
"""

from sparsex_sgl.core.errors import (
    InvalidSegmentsError,
    SegmentHashCollisionError,
    SparseXError,
    UnsupportedModelError,
)

__version__ = "0.1.0"

__all__ = [
    "InvalidSegmentsError",
    "SegmentHashCollisionError",
    "SparseXError",
    "UnsupportedModelError",
    "__version__",
]
