"""RoPE configuration and the delta rotation that moves cached keys to new positions.

The KV pool holds keys *after* RoPE. RoPE at position p rotates each rotary pair by ``p * inv_freq``,
and rotations add, so a key cached at ``p0`` is moved to ``p1`` by one more rotation by
``(p1 - p0) * inv_freq``. Scaled variants only change ``inv_freq`` (linear, llama3, yarn) or multiply
cos/sin by a constant (yarn's attention factor), which the cached key already carries: the delta
rotation never applies it again. Variants whose frequencies depend on the sequence length (dynamic NTK,
longrope) or on several position streams (mrope) have no exact delta rotation and are refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, cast, get_args

import torch

from sparsex_sgl.core.errors import UnsupportedModelError

RopeStyle = Literal["neox", "gptj"]
RopeScaling = Literal["default", "linear", "llama3", "yarn"]
SUPPORTED_SCALING: tuple[str, ...] = get_args(RopeScaling)


@dataclass(frozen=True)
class RopeConfig:
    """Everything that fixes the rotation angles of one model.

    ``style`` is the pairing: "neox" rotates dims (i, i + rotary_dim/2) (Llama, Qwen in HF and SGLang),
    "gptj" rotates (2i, 2i + 1). Only the first ``rotary_dim`` dims of a head rotate (partial rotary).
    """

    head_dim: int
    rotary_dim: int
    theta: float
    style: RopeStyle = "neox"
    scaling: RopeScaling = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.scaling not in SUPPORTED_SCALING:
            raise UnsupportedModelError(
                f"rope scaling {self.scaling!r} has no exact delta rotation; supported: {SUPPORTED_SCALING}. "
                "Serve this model without SparseX."
            )
        if self.style not in ("neox", "gptj"):
            raise ValueError(f"rope style must be 'neox' or 'gptj', got {self.style!r}")
        if not (0 < self.rotary_dim <= self.head_dim) or self.rotary_dim % 2:
            raise ValueError(f"rotary_dim must be even and in (0, head_dim={self.head_dim}], got {self.rotary_dim}")
        if self.theta <= 0 or self.factor <= 0:
            raise ValueError(f"rope theta and factor must be positive, got {self.theta} and {self.factor}")
        if self.scaling in ("llama3", "yarn") and self.original_max_position_embeddings <= 0:
            raise ValueError(f"{self.scaling} rope scaling needs original_max_position_embeddings")

    @classmethod
    def from_hf_config(cls, config: Any) -> RopeConfig:
        """Parse a transformers config (``rope_parameters`` of 5.x, or legacy ``rope_scaling``)."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        params = dict(getattr(config, "rope_parameters", None) or {})
        legacy = getattr(config, "rope_scaling", None)
        if legacy and not params.get("rope_type"):
            params.update(legacy)
        theta = params.get("rope_theta", getattr(config, "rope_theta", None))
        if theta is None:
            raise UnsupportedModelError("the model config names no rope_theta; is it a RoPE model?")
        rope_type = params.get("rope_type", params.get("type", "default")) or "default"
        partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0
        rotary_dim = int(head_dim * partial)
        if getattr(config, "mrope_section", None) or "mrope_section" in params:
            raise UnsupportedModelError("multimodal rope (mrope) positions are not supported by SparseX")
        original_max = params.get("original_max_position_embeddings") or getattr(config, "max_position_embeddings", 0)
        if rope_type not in SUPPORTED_SCALING:
            raise UnsupportedModelError(
                f"rope_type {rope_type!r} has no exact delta rotation; supported: {SUPPORTED_SCALING}. "
                "Serve this model without SparseX."
            )
        factor = float(params.get("factor", 1.0) or 1.0)
        attention_factor = 1.0
        if rope_type == "yarn":
            attention_factor = params.get("attention_factor") or _yarn_attention_factor(
                factor, params.get("mscale"), params.get("mscale_all_dim")
            )
        return cls(
            head_dim=head_dim,
            rotary_dim=rotary_dim,
            theta=float(theta),
            style="neox",
            scaling=cast(RopeScaling, rope_type),
            factor=factor,
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(original_max or 0),
            beta_fast=float(params.get("beta_fast") or 32.0),
            beta_slow=float(params.get("beta_slow") or 1.0),
            truncate=bool(params.get("truncate", True)),
            attention_factor=float(attention_factor),
        )

    def inv_freq(self) -> torch.Tensor:
        """Per-pair angular frequency, float64 ``[rotary_dim // 2]``."""
        dim = self.rotary_dim
        exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim
        base = 1.0 / (self.theta**exponents)
        if self.scaling == "default":
            return base
        if self.scaling == "linear":
            return base / self.factor
        if self.scaling == "llama3":
            return self._llama3(base)
        return self._yarn(base)

    def _llama3(self, inv_freq: torch.Tensor) -> torch.Tensor:
        old_len = self.original_max_position_embeddings
        low_wavelen = old_len / self.low_freq_factor
        high_wavelen = old_len / self.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / self.factor, inv_freq)
        smooth = (old_len / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
        smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)

    def _yarn(self, inv_freq: torch.Tensor) -> torch.Tensor:
        dim, base, max_pos = self.rotary_dim, self.theta, self.original_max_position_embeddings

        def correction_dim(rotations: float) -> float:
            return (dim * math.log(max_pos / (rotations * 2 * math.pi))) / (2 * math.log(base))

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        extrapolation_share = 1 - ramp
        return (inv_freq / self.factor) * (1 - extrapolation_share) + inv_freq * extrapolation_share


def _yarn_attention_factor(factor: float, mscale: float | None, mscale_all_dim: float | None) -> float:
    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if mscale and mscale_all_dim:
        return get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
    return get_mscale(factor)


def _rotate(x: torch.Tensor, angles: torch.Tensor, cfg: RopeConfig, scale: float) -> torch.Tensor:
    """Rotate the rotary pairs of ``x [n, heads, head_dim]`` by ``angles [n, rotary_dim/2]`` (float64).

    The angles and their cos/sin are float64 (a delta of many thousand positions times the highest
    frequency must not lose its fraction); the rotation itself runs in float32 (float64 for float64
    input), which is what the model's own rotary embedding does and is several times faster.
    """
    if x.shape[-1] != cfg.head_dim:
        raise ValueError(f"last dim {x.shape[-1]} is not head_dim {cfg.head_dim}")
    work_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    cos = (torch.cos(angles) * scale).to(work_dtype)
    sin = (torch.sin(angles) * scale).to(work_dtype)
    return rotate_pairs(x, cos, sin, cfg)


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cfg: RopeConfig) -> torch.Tensor:
    """Rotate the rotary pairs of ``x [n, heads, head_dim]`` by per-row ``cos, sin [n, rotary_dim/2]``.

    Runs in cos's dtype; the dims past ``rotary_dim`` pass through unrotated.
    """
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    r = cfg.rotary_dim
    work = x[..., :r].to(cos.dtype)
    if cfg.style == "neox":
        x1, x2 = work[..., : r // 2], work[..., r // 2 :]
        rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    else:
        x1, x2 = work[..., 0::2], work[..., 1::2]
        rotated = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    if x.shape[-1] == r:
        return rotated.to(x.dtype)
    return torch.cat([rotated.to(x.dtype), x[..., r:]], dim=-1)


def delta_rotation_table(deltas: torch.Tensor, cfg: RopeConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """cos/sin ``[distinct deltas, rotary_dim/2]`` (float32, from float64 angles) and each token's row.

    A segment moves as a whole, so a batch has few distinct deltas: the table is built on the host once
    per batch and every sparse layer's re-alignment reads it (``sparse_extend``).
    """
    distinct, index = torch.unique(deltas.cpu(), return_inverse=True)
    angles = distinct.to(torch.float64)[:, None] * cfg.inv_freq()[None, :]
    return torch.cos(angles).float(), torch.sin(angles).float(), index


def apply_rope(x: torch.Tensor, positions: torch.Tensor, cfg: RopeConfig) -> torch.Tensor:
    """RoPE at absolute positions: ``x [n, heads, head_dim]``, ``positions [n]`` (integers).

    The reference the delta rotation is tested against; includes yarn's attention factor.
    """
    angles = positions.to(torch.float64).unsqueeze(-1) * cfg.inv_freq().to(positions.device)
    return _rotate(x, angles, cfg, cfg.attention_factor)


def realign_keys(k: torch.Tensor, delta: torch.Tensor | int, cfg: RopeConfig) -> torch.Tensor:
    """Move post-RoPE keys ``k [n, kv_heads, head_dim]`` by ``delta`` positions (int or ``[n]``)."""
    inv_freq = cfg.inv_freq().to(k.device)
    d = torch.as_tensor(delta, dtype=torch.float64, device=k.device)
    if d.dim() == 0:
        d = d.expand(k.shape[0])
    return _rotate(k, d.unsqueeze(-1) * inv_freq, cfg, 1.0)
