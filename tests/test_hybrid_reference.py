"""The hybrid reference executor (issue 36): tiny randomly initialised Qwen3.5-text (three Gated DeltaNet layers
and one attention layer) and NemotronH (Mamba2, MLP and attention) models, float32, HF transformers on the CPU.
Resuming from any stored checkpoint gives the logits of a full prefill of the same tokens, within 1e-5 (the
recurrent kernels sum a chunked prefill in another order than a one-shot one; 3e-7 was measured on these
configs), and a request that shares only part of a cached prefix resumes from the deepest checkpoint inside it.
A restore that leaves the recurrent layers' "previous state" flag unset gives wrong logits, so the test could
not pass by resuming from zero state. With the placement learned from the traffic and a pool smaller than the
states it asks for, every prefill stays exact."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers.cache_utils import LinearAttentionCacheLayerMixin

from sparsex_sgl.core.segments import SHARED
from sparsex_sgl.reference.hybrid import HybridPrefixCache, tiny_model

TOLERANCE = 1e-5


@torch.no_grad()
def full_logits(model: Any, ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("kind", ["qwen3_5", "nemotron_h"])
def test_resuming_from_any_checkpoint_gives_the_full_prefill(kind: str) -> None:
    torch.set_num_threads(1)
    model = tiny_model(kind)
    gen = torch.Generator().manual_seed(1)
    first = torch.randint(0, 256, (200,), generator=gen).tolist()
    cache = HybridPrefixCache(model)
    done = cache.prefill(first, capture=(64, 128, 192))
    assert done.resumed_from == 0 and done.captured == (64, 128, 192)
    assert torch.allclose(done.logits, full_logits(model, first), atol=TOLERANCE, rtol=0)
    # A request sharing the first c + 10 tokens resumes from c and computes the rest exactly.
    for offset in (64, 128, 192):
        second = first[: offset + 10] + torch.randint(0, 256, (40,), generator=gen).tolist()
        resumed = cache.prefill(second, capture=())
        assert resumed.resumed_from == offset
        assert resumed.logits.shape[0] == len(second) - offset
        assert torch.allclose(resumed.logits, full_logits(model, second)[offset:], atol=TOLERANCE, rtol=0), offset
    # A request sharing less than the first checkpoint computes everything.
    third = first[:50] + torch.randint(0, 256, (30,), generator=gen).tolist()
    assert cache.prefill(third).resumed_from == 0


@pytest.mark.parametrize("kind", ["qwen3_5", "nemotron_h"])
def test_a_restore_missing_either_half_is_wrong(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.set_num_threads(1)
    model = tiny_model(kind)
    ids = torch.randint(0, 256, (160,), generator=torch.Generator().manual_seed(2)).tolist()
    cache = HybridPrefixCache(model)
    cache.prefill(ids, capture=(64,))
    expected = full_logits(model, ids)[64:]
    real_restore = HybridPrefixCache._restore

    def without_previous_state(self: HybridPrefixCache, target: Any, slots: Any, state: Any) -> None:
        real_restore(self, target, slots, state)
        for layer in target.layers:
            if isinstance(layer, LinearAttentionCacheLayerMixin):
                layer.has_previous_state[0] = False

    monkeypatch.setattr(HybridPrefixCache, "_restore", without_previous_state)
    wrong = cache.prefill(ids, capture=())
    assert wrong.resumed_from == 64 and (wrong.logits - expected).abs().max() > 100 * TOLERANCE
    monkeypatch.setattr(HybridPrefixCache, "_restore", real_restore)
    right = cache.prefill(ids, capture=())
    assert right.resumed_from == 64 and torch.allclose(right.logits, expected, atol=TOLERANCE, rtol=0)


def test_learned_placement_and_a_small_state_pool_stay_exact() -> None:
    """Traffic of questions over two documents, the states placed by the learned placement in a pool of 4: every
    prefill, resumed or not, gives the full prefill's logits, and the pool keeps resuming the hits."""
    torch.set_num_threads(1)
    model = tiny_model("qwen3_5")
    gen = torch.Generator().manual_seed(3)
    docs = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (150, 230)]
    cache = HybridPrefixCache(model, max_states=4, per_sequence=2, resolve_every=3)
    resumed = []
    for i in range(12):
        ids = docs[i % 2] + torch.randint(0, 256, (12,), generator=gen).tolist()
        done = cache.prefill(ids)
        resumed.append(done.resumed_from)
        assert torch.allclose(done.logits, full_logits(model, ids)[done.resumed_from:], atol=TOLERANCE, rtol=0), i
        assert len(cache.states) <= 4 and len(cache.stored) == len(cache.states)
    learned = cache.states.learned(SHARED)  # the documents' deepest chunk boundaries, nothing at the ends
    assert learned.plan(162) == (128,) and learned.plan(242) == (128, 192)
    assert resumed[-4:] == [128, 192, 128, 192]
