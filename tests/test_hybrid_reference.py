"""The hybrid reference executor (issue 36): tiny randomly initialised Qwen3.5-text (three Gated DeltaNet layers
and one attention layer) and NemotronH (Mamba2, MLP and attention) models, float32, HF transformers on the CPU.
Resuming from any stored checkpoint gives the logits of a full prefill of the same tokens, within 1e-5 (the
recurrent kernels sum a chunked prefill in another order than a one-shot one; 3e-7 was measured on these
configs), and a request that shares only part of a cached prefix resumes from the deepest checkpoint inside it.
A restore that leaves the recurrent layers' "previous state" flag unset gives wrong logits, so the test could
not pass by resuming from zero state; an offset without a stored state is refused."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import NemotronHConfig, NemotronHForCausalLM, Qwen3_5ForCausalLM, Qwen3_5TextConfig
from transformers.cache_utils import LinearAttentionCacheLayerMixin

from sparsex_sgl.reference.hybrid import HybridPrefixCache

TOLERANCE = 1e-5


def tiny(kind: str) -> Any:
    torch.manual_seed(0)
    if kind == "qwen3_5":
        config: Any = Qwen3_5TextConfig(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            layer_types=["linear_attention"] * 3 + ["full_attention"], num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
            linear_num_key_heads=2, linear_num_value_heads=4, max_position_embeddings=512)
        return Qwen3_5ForCausalLM(config).float().eval()
    config = NemotronHConfig(
        vocab_size=256, hidden_size=64, hybrid_override_pattern="M-M*", num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=128, mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16, n_groups=2,
        conv_kernel=4, expand=2, chunk_size=64, max_position_embeddings=512)
    return NemotronHForCausalLM(config).float().eval()


@torch.no_grad()
def full_logits(model: Any, ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("kind", ["qwen3_5", "nemotron_h"])
def test_resuming_from_any_checkpoint_gives_the_full_prefill(kind: str) -> None:
    torch.set_num_threads(1)
    model = tiny(kind)
    gen = torch.Generator().manual_seed(1)
    first = torch.randint(0, 256, (200,), generator=gen).tolist()
    cache = HybridPrefixCache(model)
    done = cache.prefill(first, checkpoints=(64, 128, 192))
    assert done.resumed_from == 0
    assert torch.allclose(done.logits, full_logits(model, first), atol=TOLERANCE, rtol=0)
    (sequence,) = cache.sequences
    assert sorted(sequence.checkpoints) == [64, 128, 192]
    for offset in (64, 128, 192):
        resumed = cache.resume(first, sequence, offset)
        assert resumed.logits.shape[0] == 200 - offset
        assert torch.allclose(resumed.logits, full_logits(model, first)[offset:], atol=TOLERANCE, rtol=0), offset
    # A request sharing the first 150 tokens resumes from 128 and computes the rest exactly.
    second = first[:150] + torch.randint(0, 256, (40,), generator=gen).tolist()
    assert cache.lookup(second) == (sequence, 128)
    resumed = cache.prefill(second)
    assert resumed.resumed_from == 128
    assert torch.allclose(resumed.logits, full_logits(model, second)[128:], atol=TOLERANCE, rtol=0)
    # A request sharing less than the first checkpoint computes everything.
    third = first[:50] + torch.randint(0, 256, (30,), generator=gen).tolist()
    assert cache.lookup(third)[1] == 0 and cache.prefill(third).resumed_from == 0


@pytest.mark.parametrize("kind", ["qwen3_5", "nemotron_h"])
def test_a_restore_missing_either_half_is_wrong(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.set_num_threads(1)
    model = tiny(kind)
    ids = torch.randint(0, 256, (160,), generator=torch.Generator().manual_seed(2)).tolist()
    cache = HybridPrefixCache(model)
    cache.prefill(ids, checkpoints=(64,))
    (sequence,) = cache.sequences
    expected = full_logits(model, ids)[64:]
    real_restore = HybridPrefixCache._restore

    def without_previous_state(target: Any, source: Any, offset: int) -> None:
        real_restore(target, source, offset)
        for layer in target.layers:
            if isinstance(layer, LinearAttentionCacheLayerMixin):
                layer.has_previous_state[0] = False

    monkeypatch.setattr(HybridPrefixCache, "_restore", staticmethod(without_previous_state))
    assert (cache.resume(ids, sequence, 64).logits - expected).abs().max() > 100 * TOLERANCE
    monkeypatch.setattr(HybridPrefixCache, "_restore", staticmethod(real_restore))
    assert torch.allclose(cache.resume(ids, sequence, 64).logits, expected, atol=TOLERANCE, rtol=0)
    with pytest.raises(ValueError, match="no stored state"):
        cache.resume(ids, sequence, 100)
