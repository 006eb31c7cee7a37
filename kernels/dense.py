"""Dense causal prefill attention (every row of a sequence over its own keys), FlashInfer where it wins.

The full layers of a SparseX prefill, and full prefill itself, compute every row: plain causal attention,
where FlashInfer's dense prefill is near the GPU's peak and no scattered kernel can do better. FlashInfer is optional: it is used when it is importable, the tensors are on CUDA
and the shape is one it ships kernels for; otherwise torch SDPA runs the same computation, so the
Triton path and the CPU need nothing beyond torch. The choice is made per call by ``dense_backend``.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch

FLASHINFER_HEAD_DIMS = (64, 128, 256)
FLASHINFER_DTYPES = (torch.float16, torch.bfloat16)


@functools.cache
def _flashinfer() -> ModuleType | None:
    """FlashInfer when installed (imported once), else None."""
    try:
        import flashinfer
    except ImportError:
        return None
    return flashinfer


def dense_backend(q: torch.Tensor) -> str:
    """``"flashinfer"`` when FlashInfer is installed and supports ``q`` (CUDA, fp16/bf16, head dim 64/128/256),
    else ``"sdpa"``."""
    supported = q.is_cuda and q.dtype in FLASHINFER_DTYPES and q.shape[-1] in FLASHINFER_HEAD_DIMS
    return "flashinfer" if supported and _flashinfer() is not None else "sdpa"


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of rows ``0..n-1`` over keys ``0..n-1`` (GQA): ``q [n, hq, d]``, ``k, v [n, hkv, d]``
    → ``[n, hq, d]``, on the backend ``dense_backend`` picks."""
    if q.shape[0] != k.shape[0] or k.shape != v.shape:
        raise ValueError(f"dense causal attention needs q, k, v over the same rows: {q.shape}, {k.shape}, {v.shape}")
    if dense_backend(q) == "flashinfer":
        flashinfer = _flashinfer()
        assert flashinfer is not None
        return flashinfer.single_prefill_with_kv_cache(q, k, v, causal=True, sm_scale=scale)
    return torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, scale=scale, enable_gqa=True
    ).transpose(0, 1)
