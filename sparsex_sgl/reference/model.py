"""What the reference executor needs to know about an HF decoder, and the check that it can serve it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sparsex_sgl.core.errors import UnsupportedModelError
from sparsex_sgl.core.rope import RopeConfig
from sparsex_sgl.reference.flops import ModelDims

SUPPORTED_ARCHITECTURES: tuple[str, ...] = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


@dataclass(frozen=True)
class ModelSpec:
    """Architecture facts of a supported model: shapes, RoPE, and whether q/k are RMS-normed (Qwen3)."""

    architecture: str
    dims: ModelDims
    rope: RopeConfig
    qk_norm: bool

    @classmethod
    def from_hf(cls, model: Any) -> ModelSpec:
        """Validate an HF ``*ForCausalLM`` and describe it; UnsupportedModelError names what is missing."""
        config = model.config
        arch = type(model).__name__
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {arch} is not supported by the reference executor; supported: {SUPPORTED_ARCHITECTURES}"
            )
        layer_types = getattr(config, "layer_types", None) or []
        if getattr(config, "use_sliding_window", False) or "sliding_attention" in layer_types:
            raise UnsupportedModelError("sliding-window attention layers are not supported; disable the window")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dims = ModelDims(
            num_layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            n_heads=config.num_attention_heads,
            n_kv_heads=config.num_key_value_heads,
            head_dim=head_dim,
            intermediate=config.intermediate_size,
            vocab=config.vocab_size,
        )
        rope = RopeConfig.from_hf_config(config)
        if rope.rotary_dim != head_dim:
            raise UnsupportedModelError(
                f"{arch} with partial rotary ({rope.rotary_dim}/{head_dim}) is not an HF layout we can run"
            )
        qk_norm = hasattr(model.model.layers[0].self_attn, "q_norm")
        return cls(arch, dims, rope, qk_norm)
