"""The reference executor on the Triton kernels equals itself on the torch references.

Same tiny real-architecture models and segmented prompts as test_executor.py; without CUDA the kernels
run under Triton's interpreter (set before they are imported). Each prefill runs twice, once per
``kernels`` setting, from identical caches, so any difference comes from the kernels.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from test_executor import filled_cache, segmented_prompt

from sparsex_sgl.eval.methods import method_config
from sparsex_sgl.reference import ReferenceExecutor

# float32 with different summation orders (online softmax in blocks vs one softmax): ~1e-5 on O(1) logits.
TOL = {"rtol": 1e-4, "atol": 1e-4}


@pytest.mark.parametrize("method, ratio", [("sparsex", 0.3), ("cacheblend", 0.3), ("epic", 0.3), ("sparsex", 1.0)])
def test_reuse_prefill_same_with_triton_kernels(method: str, ratio: float) -> None:
    model = tiny_model("llama")
    ids, spans, segs = segmented_prompt(5)
    cfg = method_config(method, ratio, 2)
    assert cfg is not None
    results = []
    for kernels in ("torch", "triton"):
        executor = ReferenceExecutor(model, kernels=kernels)
        results.append(filled_cache(executor, segs).prefill(ids, spans, cfg))
    reference, ours = results
    assert ours.stats == reference.stats  # same selection, hence the same rows
    torch.testing.assert_close(ours.logits, reference.logits, **TOL)
    torch.testing.assert_close(ours.kv.k, reference.kv.k, **TOL)
