"""SparseX's settings: what the method needs (``SelectionConfig``) apart from what a server switches
(``ServerConfig``).

Both are frozen dataclasses validated on construction by pydantic, so a YAML preset, a launch flag and an
``sgl.Engine`` keyword are checked by the same rules; every choice is a ``Literal`` defined once, which
pydantic enforces and whose values the flag parser and the error messages read. A bad value is a
``ValueError``; ``describe_error`` makes it the one line a launch stops with.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass as validated_dataclass

from sparsex_sgl.core.selection import POLICIES, Selection

MassRows = Literal["new", "answer"]
MassLayers = Literal["last", "all"]
MassHeads = Literal["sum", "max"]
Kernels = Literal["auto", "torch", "triton"]
KERNEL_CHOICES: tuple[str, ...] = get_args(Kernels)
SELECTION_CHOICES: tuple[str, ...] = get_args(Selection)


@validated_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class SelectionConfig:
    """How one reuse prefill chooses the tokens it recomputes (docs/how-it-works.md, "Selection").

    Layers ``[0, full_layers)`` compute every extend row; the policy ``selection`` then scores the reused
    tokens and each request recomputes its top ``recompute_ratio`` of them (``selection.recompute_budget``)
    in layers ``[full_layers, L)``, its new tokens always."""

    full_layers: int = 2
    recompute_ratio: float = 0.15
    selection: Selection = "sparse_q"
    min_tokens_per_segment: int = 1
    """The first tokens of each moved segment ranked ahead of every scored token (scored policies)."""
    mass_prior: float = 4.0
    """Prior weight of ``sparse_q``'s mass factor, in mean masses (``selection.sparse_q_signal``)."""
    mass_rows: MassRows = "new"
    """Rows whose attention mass is read: "new" (every new token) or "answer" (the new tokens after the last
    reused one: the question and the generation prompt)."""
    mass_layers: MassLayers = "last"
    """Full layers whose mass is summed: "last" (the threshold layer) or "all"."""
    mass_heads: MassHeads = "sum"
    """How heads combine per reused token: "sum" (all heads' mass) or "max" (the head that reads it most)."""
    coverage: float = 0.0
    """Adaptive budget: 0 takes ``recompute_ratio`` of the reused tokens; in (0, 1] takes per request the
    fewest top tokens whose signal covers that share of its total, at most ``recompute_ratio`` of them."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.recompute_ratio <= 1.0:
            raise ValueError(f"recompute_ratio must be in [0, 1], got {self.recompute_ratio}")
        if self.full_layers < 0 or self.min_tokens_per_segment < 0 or self.mass_prior < 0:
            raise ValueError("full_layers, min_tokens_per_segment and mass_prior must be >= 0")
        if not 0.0 <= self.coverage <= 1.0:
            raise ValueError(f"coverage must be in [0, 1], got {self.coverage}")
        policy = POLICIES[self.selection]
        if self.coverage and not policy.scored:
            raise ValueError(f"coverage needs a scored selection {scored_policies()}, got {self.selection!r}")
        if policy.reads_full_layer and self.full_layers < 1:
            raise ValueError(f"selection {self.selection!r} reads its signal from a full layer: full_layers >= 1")

    def threshold(self, num_layers: int) -> int:
        """First sparse layer (== number of full layers run), clamped to the model depth."""
        return min(self.full_layers, num_layers)

    def mass_layers_of(self, threshold: int) -> range:
        """The full layers whose attention mass the policy reads (empty when it reads none)."""
        if not POLICIES[self.selection].reads_mass or threshold < 1:
            return range(0)
        return range(threshold) if self.mass_layers == "all" else range(threshold - 1, threshold)


@validated_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class ServerConfig:
    """What ``--enable-sparsex`` serves with: the selection, and the server's switches."""

    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    kernels: Kernels = "auto"
    """Ops of the sparse layers (``ops``): "triton", "torch", or "auto" (Triton on CUDA, torch on the CPU).
    "triton" on the CPU needs ``TRITON_INTERPRET=1`` (slow: for tests)."""
    prefill_backend: str = ""
    """SGLang attention backend the ``sparsex`` prefill backend wraps; "" = the one SGLang picked."""
    auto_segment_tokens: int = 0
    """Average length of the segments found in requests without segment data (``segments.auto_spans``);
    0: such requests get exact prefix reuse only, as on stock SGLang."""
    min_segment_tokens: int = 8
    """Marked segments shorter than this are served as gap text (exact prefix reuse only)."""
    markers: bool = False
    """Parse in-band segment markers in every text prompt; off: only requests with ``sparsex_markers``."""
    report_counts: bool = True
    """Return each request's ``sparsex_*`` counts in ``meta_info`` (they reveal what others cached)."""
    host_tier_gb: float = 0.0
    """Host memory (GB) that keeps the segments the device pool evicts (``core.tiers.HostTier``); 0: none."""
    storage_backend: str = ""
    """A shared segment store on one of SGLang's HiCache storage backends, by its name (``file``, ``mooncake``,
    ``dynamic``, ...); "": none."""
    storage_extra_config: str = ""
    """The backend's settings, a JSON object as SGLang's ``--hicache-storage-backend-extra-config`` takes
    (``file``: ``{"file_storage_path": DIR}``; ``dynamic``: ``backend_name``, ``module_path``, ``class_name``)."""
    storage_timeout_s: float = 2.0
    """The longest a scheduler waits for one store read before it recomputes the segment."""

    def __post_init__(self) -> None:
        if self.host_tier_gb < 0 or self.storage_timeout_s <= 0:
            raise ValueError(f"host_tier_gb must be >= 0 and storage_timeout_s > 0, got {self.host_tier_gb} and "
                             f"{self.storage_timeout_s}")
        if self.storage_extra_config and not self.storage_backend:
            raise ValueError("storage_extra_config needs a storage_backend")
        self.storage_settings()
        if self.min_segment_tokens < 1:
            raise ValueError(f"min_segment_tokens must be >= 1, got {self.min_segment_tokens}")
        if self.auto_segment_tokens != 0 and self.auto_segment_tokens < 4:
            raise ValueError(f"auto_segment_tokens must be 0 (off) or >= 4, got {self.auto_segment_tokens}")

    def storage_settings(self) -> dict[str, Any] | None:
        """``storage_extra_config`` parsed (None when empty); a ValueError unless it is a JSON object."""
        if not self.storage_extra_config:
            return None
        try:
            value = json.loads(self.storage_extra_config)
        except ValueError as exc:
            raise ValueError(f"storage_extra_config is not JSON: {exc}") from None
        if not isinstance(value, dict):
            raise ValueError(f"storage_extra_config must be a JSON object, got {type(value).__name__}")  # noqa: TRY004 - a config error
        return value

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> ServerConfig:
        """The config from a flat mapping of setting names of either dataclass (a preset, resolved flags)."""
        selection_keys = {f.name for f in fields(SelectionConfig)}
        server_keys = {f.name for f in fields(cls)} - {"selection"}
        unknown = set(values) - selection_keys - server_keys
        if unknown:
            raise ValueError(f"unknown SparseX settings {sorted(unknown)}; valid: {sorted(selection_keys | server_keys)}")
        selection = SelectionConfig(**{k: v for k, v in values.items() if k in selection_keys})
        return cls(selection=selection, **{k: v for k, v in values.items() if k in server_keys})

    @classmethod
    def from_yaml(cls, path: str | Path) -> ServerConfig:
        """A preset: a mapping of settings, optionally under ``sparsex:`` (configs/)."""
        import yaml

        data = yaml.safe_load(Path(path).read_text()) or {}
        block = data.get("sparsex", data) if isinstance(data, Mapping) else data
        if not isinstance(block, Mapping):
            raise ValueError(f"{path}: a preset is a mapping of settings (optionally under 'sparsex:'), got "  # noqa: TRY004 - a config error, reported as one line
                             f"{type(block).__name__}")
        return cls.from_mapping(block)

    def flat(self) -> dict[str, Any]:
        """Every setting by name, in one flat mapping (``from_mapping``'s inverse; builtins only)."""
        values = asdict(self)
        return {**values.pop("selection"), **values}


def scored_policies() -> tuple[str, ...]:
    return tuple(name for name, policy in POLICIES.items() if policy.scored)


def describe_error(exc: ValueError) -> str:
    """One line naming each offending setting, what it must be and the value given."""
    if not isinstance(exc, ValidationError):
        return str(exc)
    parts = []
    for error in exc.errors():
        message = str(error["msg"]).removeprefix("Value error, ")
        field = ".".join(str(part) for part in error["loc"])
        parts.append(f"{field}: {message} (got {error['input']!r})" if field else message)
    return "; ".join(parts)
