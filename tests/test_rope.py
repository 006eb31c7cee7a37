"""Delta-RoPE: re-rotating cached keys equals RoPE recomputed at the new positions (float64), for every
supported pairing, partial rotary dims and scaling variant; config parsing and refusals."""

from __future__ import annotations

import pytest
import torch

from sparsex_sgl.core.errors import UnsupportedModelError
from sparsex_sgl.core.rope import RopeConfig, apply_rope, realign_keys

VARIANTS = {
    "default": {"scaling": "default"},
    "linear": {"scaling": "linear", "factor": 4.0},
    "llama3": {"scaling": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192, "theta": 500000.0},
    "yarn": {"scaling": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096, "attention_factor": 1.1386},
}


def make_config(variant: str, style: str, rotary_fraction: float) -> RopeConfig:
    kwargs = dict(VARIANTS[variant])
    theta = kwargs.pop("theta", 10000.0)
    return RopeConfig(head_dim=128, rotary_dim=int(128 * rotary_fraction), theta=theta, style=style, **kwargs)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("rotary_fraction", [1.0, 0.5, 0.25])
def test_delta_rotation_equals_rope_at_new_positions(variant: str, style: str, rotary_fraction: float) -> None:
    cfg = make_config(variant, style, rotary_fraction)
    gen = torch.Generator().manual_seed(7)
    k = torch.randn(64, 4, 128, dtype=torch.float64, generator=gen)
    p0 = torch.randint(0, 4000, (64,), generator=gen)
    p1 = torch.randint(0, 32000, (64,), generator=gen)
    cached = apply_rope(k, p0, cfg)
    moved = realign_keys(cached, p1 - p0, cfg)
    torch.testing.assert_close(moved, apply_rope(k, p1, cfg), rtol=1e-9, atol=1e-9)
    # there and back is the identity
    torch.testing.assert_close(realign_keys(moved, p0 - p1, cfg), cached, rtol=1e-9, atol=1e-9)
    # dims past rotary_dim never move
    assert torch.equal(moved[..., cfg.rotary_dim:], k[..., cfg.rotary_dim:])


def test_scalar_delta_and_float32_keys() -> None:
    cfg = RopeConfig(head_dim=64, rotary_dim=64, theta=1e5)
    k = torch.randn(10, 3, 64)
    p0 = torch.arange(10)
    moved = realign_keys(apply_rope(k, p0, cfg), 1000, cfg)
    assert moved.dtype == torch.float32
    torch.testing.assert_close(moved, apply_rope(k, p0 + 1000, cfg), rtol=1e-5, atol=1e-5)


def _hf_config(rope_parameters: dict) -> object:  # type: ignore[type-arg]
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=256, num_attention_heads=2, max_position_embeddings=4096,
                       rope_parameters=rope_parameters)


@pytest.mark.parametrize(
    "params",
    [
        {"rope_type": "default", "rope_theta": 10000.0},
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
         "high_freq_factor": 4.0, "original_max_position_embeddings": 1024},
        {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 1024},
    ],
    ids=lambda p: p["rope_type"],
)
def test_inv_freq_and_attention_factor_match_transformers(params: dict) -> None:  # type: ignore[type-arg]
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = _hf_config(params)
    ours = RopeConfig.from_hf_config(config)
    init = ROPE_INIT_FUNCTIONS.get(params["rope_type"], LlamaRotaryEmbedding.compute_default_rope_parameters)
    inv_freq, attention_factor = init(config)
    torch.testing.assert_close(ours.inv_freq().float(), inv_freq.float(), rtol=1e-6, atol=0)
    assert ours.attention_factor == pytest.approx(attention_factor)
    assert ours.rotary_dim == 128


@pytest.mark.parametrize("rope_type", ["dynamic", "longrope"])
def test_length_dependent_rope_is_refused(rope_type: str) -> None:
    params = {"rope_type": rope_type, "rope_theta": 10000.0, "factor": 2.0}
    if rope_type == "longrope":
        params.update(short_factor=[1.0] * 64, long_factor=[2.0] * 64, original_max_position_embeddings=1024)
    with pytest.raises(UnsupportedModelError, match="no exact delta rotation"):
        RopeConfig.from_hf_config(_hf_config(params))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rotary_dim": 63}, "rotary_dim"),
        ({"rotary_dim": 256}, "rotary_dim"),
        ({"style": "rotated"}, "style"),
        ({"scaling": "llama3", "factor": 8.0}, "original_max_position_embeddings"),
        ({"theta": -1.0}, "positive"),
    ],
)
def test_invalid_rope_configs_name_the_problem(kwargs: dict, message: str) -> None:  # type: ignore[type-arg]
    base = {"head_dim": 128, "rotary_dim": 128, "theta": 10000.0}
    base.update(kwargs)
    with pytest.raises(ValueError, match=message):
        RopeConfig(**base)  # type: ignore[arg-type]


def test_hf_rotary_keys_realign_to_hf_rotary_at_new_positions() -> None:
    """The executor stores keys rotated by HF's own rotary embedding; our delta must match it too."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = LlamaConfig(hidden_size=128, num_attention_heads=2, rope_parameters={"rope_type": "default",
                                                                                   "rope_theta": 1e5})
    rotary = LlamaRotaryEmbedding(config)
    k = torch.randn(1, 3, 20, 64)  # [batch, heads, seq, dim], HF layout

    def hf_rope(positions: torch.Tensor) -> torch.Tensor:
        cos, sin = rotary(k, positions[None])
        return apply_rotary_pos_emb(k, k, cos, sin)[1][0].transpose(0, 1)  # [seq, heads, dim]

    p0, p1 = torch.arange(20), torch.arange(20) + 1500
    moved = realign_keys(hf_rope(p0), 1500, RopeConfig.from_hf_config(config))
    # HF computes angles in float32 (error ~ position * 2^-24 rad): 1e-3 covers positions up to ~10k.
    torch.testing.assert_close(moved, hf_rope(p1), rtol=1e-3, atol=1e-3)
