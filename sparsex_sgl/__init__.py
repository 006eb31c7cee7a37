"""sparsex_sgl: segment-level KV-cache reuse (the SparseX method) for SGLang.

The package root holds the engine-agnostic core (segments, graph, rope, select, hybrid); the SGLang
adapter lives in ``sparsex_sgl.sglang`` and is imported only by SGLang's plugin loader.
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
