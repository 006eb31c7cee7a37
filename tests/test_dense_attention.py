"""Dense causal prefill (``kernels.dense``): the automatic backend choice and its result against the reference.

On the CPU the choice must be SDPA (FlashInfer has no CPU kernels); on a GPU with FlashInfer installed it
must be FlashInfer for bf16 / fp16 at head dims 64 and 128, and both must equal the torch reference.
"""

from __future__ import annotations

import pytest
import torch
from sparsex_sgl.kernels import scattered_query_attention_ref
from sparsex_sgl.kernels.dense import dense_backend, dense_causal_attention

CUDA = torch.cuda.is_available()


def _qkv(n: int, hq: int, hkv: int, d: int, dtype: torch.dtype, device: str, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, h, d, generator=g).to(dtype).to(device) for h in (hq, hkv, hkv)]


@pytest.mark.parametrize("n, hq, hkv", [(1, 4, 4), (37, 4, 1), (130, 7, 1), (96, 8, 2)])
def test_cpu_uses_sdpa_and_equals_reference(n: int, hq: int, hkv: int) -> None:
    q, k, v = _qkv(n, hq, hkv, 64, torch.float32, "cpu", seed=n)
    assert dense_backend(q) == "sdpa"
    out = dense_causal_attention(q, k, v, 0.125)
    ref, _ = scattered_query_attention_ref(q, k, v, torch.arange(n), 0.125)
    # float32, one softmax vs another summation order: ~1e-6 on O(1) outputs.
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_rejects_rows_that_are_not_one_sequence() -> None:
    q, k, v = _qkv(8, 4, 2, 64, torch.float32, "cpu", seed=0)
    with pytest.raises(ValueError, match="same rows"):
        dense_causal_attention(q[:5], k, v, 0.125)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_dense_equals_reference(dtype: torch.dtype, d: int) -> None:
    n, hq, hkv = 4096, 12, 2
    q, k, v = _qkv(n, hq, hkv, d, dtype, "cuda", seed=d)
    try:
        import flashinfer  # noqa: F401

        assert dense_backend(q) == "flashinfer"
    except ImportError:
        assert dense_backend(q) == "sdpa"
    out = dense_causal_attention(q, k, v, d**-0.5)
    rows = torch.arange(n - 256, n, device="cuda")  # the rows that see the most keys
    ref, _ = scattered_query_attention_ref(q[rows], k, v, rows, d**-0.5)
    # bf16 output rounding (2^-8 relative) on O(1) values; fp16 is 8x finer.
    torch.testing.assert_close(out[rows].float(), ref.float(), rtol=2e-2, atol=2e-2)
