"""The per-layer hybrid plan of a SparseX prefill, and its modeled cost.

Layers ``[0, full_layers)`` compute every non-prefix token; at the threshold a selection policy picks
reused tokens within ``recompute_ratio`` of the reused count; layers ``[full_layers, L)`` compute only
the recompute set (new tokens plus the selected ones) and read every other position's KV from the
re-aligned cache. The baselines are the same plan with other knobs, so they run on the same executor:
naive reuse (no full layers, nothing selected), CacheBlend-style (KV deviation at the threshold),
EPIC-style (no full layers, first tokens of each moved segment).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, ValidationError
from pydantic.dataclasses import dataclass as validated_dataclass

from sparsex_sgl.select import MASS_SELECTIONS, SELECTIONS, SIGNAL_SELECTIONS

KERNEL_CHOICES: tuple[str, ...] = ("auto", "torch", "triton")
MASS_ROWS: tuple[str, ...] = ("new", "answer")
MASS_LAYERS: tuple[str, ...] = ("last", "all")
MASS_HEADS: tuple[str, ...] = ("sum", "max")
MASS_PASSES: tuple[str, ...] = ("threshold", "lookahead")
MASS_PRIOR = 4.0
"""Prior weight of ``sparse_q``'s attention-mass factor (``select.sparse_q_signal``), in mean masses; chosen
on development questions (HotpotQA offsets 500+), apart from the questions the README reports, and kept by
the held-out run of the served case (paragraphs cached in another order), where it is level with deviation."""


@validated_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class HybridConfig:
    """Knobs of one recompute method, validated on construction: each field's type by pydantic (from YAML
    presets, flags and ``sgl.Engine`` keywords alike), then the ranges and choices below. A bad value is a
    ``ValueError`` (pydantic's ``ValidationError``); ``describe_error`` makes it the one line a launch
    stops with."""

    full_layers: int = 2
    recompute_ratio: float = 0.15
    selection: str = "sparse_q"
    min_tokens_per_segment: int = 1
    mass_prior: float = MASS_PRIOR
    mass_rows: str = "new"
    """Rows whose attention mass is read (mass policies, ``select``): "new" (every new token) or "answer"
    (the new tokens after the last reused one: the question and the generation prompt). In chat and
    agent prompts the new tokens include edited turns and tool text, which read the reused text for
    their own sake, not for the answer's."""
    mass_layers: str = "last"
    """Layers whose mass is summed: "last" (the threshold layer) or "all" (every full layer)."""
    mass_heads: str = "sum"
    """How heads combine per reused token, within each layer: "sum" (all heads' mass) or "max" (the head
    that reads it most); layers then add up."""
    mass_pass: str = "threshold"
    """Which attention gives the mass: "threshold" (the full layers of the one forward, as ``mass_layers``
    says) or "lookahead" (a second pass of the new rows alone through every layer over the stale re-aligned
    KV, every layer's mass summed; ``select``'s docstring says why). The look-ahead is an offline comparison
    point: the reference executor runs it and counts its FLOPs, the server refuses it."""
    coverage: float = 0.0
    """Adaptive budget: 0 takes ``recompute_ratio`` of the reused tokens; in (0, 1] takes per request the
    fewest top tokens whose signal covers that share of its total, at most ``recompute_ratio`` of them."""
    auto_segment_tokens: int = 0
    """Average length of the segments found in requests without segment data (``segments.auto_spans``),
    after their prefix hit; 0 (the default): such requests get exact prefix reuse only, as on stock SGLang."""
    kernels: str = "auto"
    """Ops of the sparse layers (``sparse_extend``): "triton", "torch", or "auto" (Triton on CUDA, torch on
    the CPU). "triton" on the CPU needs ``TRITON_INTERPRET=1`` (slow: for tests)."""
    prefill_backend: str = ""
    """SGLang attention backend the ``sparsex`` prefill backend wraps; "" = the one SGLang picked (the
    decode backend: ``--attention-backend`` or its default)."""
    min_segment_tokens: int = 8
    """Marked segments shorter than this are served as gap text (exact prefix reuse only): a node per few
    tokens grows the graph (its work per request) and saves almost no compute."""
    markers: bool = False
    """Parse in-band segment markers in every text prompt (``protocol.MARKER_BEGIN``), for programs that
    can send only text (``frontend.segment``). Off: only requests with ``sparsex_markers`` are parsed, so
    user text that contains the markers is served as sent."""
    report_counts: bool = True
    """Return each request's ``sparsex_*`` counts in ``meta_info``. Off hides them from clients (they
    reveal what other requests in the namespace cached); ``/sparsex/stats`` keeps the totals."""

    def __post_init__(self) -> None:
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if not 0.0 <= self.recompute_ratio <= 1.0:
            raise ValueError(f"recompute_ratio must be in [0, 1], got {self.recompute_ratio}")
        if self.full_layers < 0 or self.min_tokens_per_segment < 0 or self.mass_prior < 0:
            raise ValueError("full_layers, min_tokens_per_segment and mass_prior must be >= 0")
        if self.min_segment_tokens < 1:
            raise ValueError(f"min_segment_tokens must be >= 1, got {self.min_segment_tokens}")
        if self.auto_segment_tokens != 0 and self.auto_segment_tokens < 4:
            raise ValueError(f"auto_segment_tokens must be 0 (off) or >= 4, got {self.auto_segment_tokens}")
        if self.kernels not in KERNEL_CHOICES:
            raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {self.kernels!r}")
        for name, value, choices in (("mass_rows", self.mass_rows, MASS_ROWS), ("mass_layers", self.mass_layers,
                                     MASS_LAYERS), ("mass_heads", self.mass_heads, MASS_HEADS),
                                     ("mass_pass", self.mass_pass, MASS_PASSES)):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        if self.mass_pass == "lookahead" and self.selection not in MASS_SELECTIONS:
            raise ValueError(f"mass_pass 'lookahead' needs a mass selection {MASS_SELECTIONS}, got {self.selection!r}")
        if not 0.0 <= self.coverage <= 1.0:
            raise ValueError(f"coverage must be in [0, 1], got {self.coverage}")
        if self.coverage and self.selection not in SIGNAL_SELECTIONS:
            raise ValueError(f"coverage needs a scored selection {SIGNAL_SELECTIONS}, got {self.selection!r}")
        if self.selection in SIGNAL_SELECTIONS and self.full_layers < 1:
            raise ValueError(f"selection {self.selection!r} reads its signal from a full layer: full_layers >= 1")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> HybridConfig:
        """The config from a mapping of field names (a preset's ``hybrid`` block, resolved flags)."""
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown hybrid settings {sorted(unknown)}; valid: {sorted(cls.__dataclass_fields__)}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path) -> HybridConfig:
        import yaml

        data = yaml.safe_load(Path(path).read_text()) or {}
        block = data.get("hybrid", data) if isinstance(data, Mapping) else data
        if not isinstance(block, Mapping):
            raise ValueError(f"{path}: a preset is a mapping of settings (optionally under 'hybrid:'), got "  # noqa: TRY004 - a config error, reported as one line
                             f"{type(block).__name__}")
        return cls.from_mapping(block)

    def threshold(self, num_layers: int) -> int:
        """First sparse layer (== number of full layers run), clamped to the model depth."""
        return min(self.full_layers, num_layers)


SPARSEX_SIGNALS: dict[str, dict[str, Any]] = {
    "sparse_q": {},
    "mass": {"selection": "query_mass"},
    "mass_all": {"selection": "query_mass", "mass_layers": "all"},
    "mass_max": {"selection": "query_mass", "mass_heads": "max"},
    "mass_all_max": {"selection": "query_mass", "mass_layers": "all", "mass_heads": "max"},
    "answer_mass": {"selection": "query_mass", "mass_rows": "answer"},
    "lookahead": {"selection": "query_mass", "mass_pass": "lookahead"},
    "lookahead_q": {"mass_pass": "lookahead"},
}
"""SparseX's candidate signals by name (``select``'s module docstring says why each), as settings over the
shipped ``HybridConfig``: ``sparse_q`` is the shipped one, the others are its query-mass variants;
``lookahead`` is the look-ahead pass's mass alone, ``lookahead_q`` weighs deviation by it as ``sparse_q``
weighs it by the threshold layer's mass."""


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


def method_config(method: str, ratio: float, full_layers: int, signal: str = "sparse_q",
                  coverage: float = 0.0) -> HybridConfig | None:
    """The hybrid plan of a named method; None for full prefill (no reuse at all). ``signal`` (a key of
    ``SPARSEX_SIGNALS``) and ``coverage`` apply to SparseX only."""
    if method == "full":
        return None
    if method == "naive":
        return HybridConfig(full_layers=0, recompute_ratio=0.0, selection="none", min_tokens_per_segment=0)
    if method == "cacheblend":
        return HybridConfig(full_layers=full_layers, recompute_ratio=ratio, selection="kv_deviation",
                            min_tokens_per_segment=0)
    if method == "epic":
        return HybridConfig(full_layers=0, recompute_ratio=ratio, selection="first_k", min_tokens_per_segment=0)
    if method == "sparsex":
        if signal not in SPARSEX_SIGNALS:
            raise ValueError(f"unknown SparseX signal {signal!r}; choose one of {tuple(SPARSEX_SIGNALS)}")
        return HybridConfig(full_layers=full_layers, recompute_ratio=ratio, coverage=coverage,
                            **SPARSEX_SIGNALS[signal])
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")


METHODS: tuple[str, ...] = ("full", "naive", "cacheblend", "epic", "sparsex")


@dataclass(frozen=True)
class ModelDims:
    """The shapes that fix a decoder's FLOPs per token."""

    num_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    def linear_flops_per_token(self) -> int:
        """Multiply-adds x2 of one layer's projections and gated MLP for one token."""
        q_out = self.n_heads * self.head_dim
        kv_out = 2 * self.n_kv_heads * self.head_dim
        return 2 * (self.hidden * (q_out + kv_out) + q_out * self.hidden + 3 * self.hidden * self.intermediate)

    def attention_flops(self, query_positions: Sequence[int]) -> int:
        """QK^T and PV for queries at these positions, each seeing ``position + 1`` keys."""
        return 4 * self.n_heads * self.head_dim * sum(p + 1 for p in query_positions)


def modeled_prefill_flops(dims: ModelDims, rows_per_layer: Sequence[Sequence[int]]) -> int:
    """FLOPs of a prefill that computes ``rows_per_layer[i]`` (prompt positions) in layer i, plus one logits row.

    Layers usually share a few row sets (full layers, sparse layers): each distinct sequence object is
    summed once, so a 32k-token prefill's accounting costs two passes over its rows, not one per layer.
    """
    assert len(rows_per_layer) == dims.num_layers, (len(rows_per_layer), dims.num_layers)
    per_token = dims.linear_flops_per_token()
    per_rows: dict[int, int] = {}
    for rows in rows_per_layer:
        if id(rows) not in per_rows:
            per_rows[id(rows)] = len(rows) * per_token + dims.attention_flops(rows)
    total = sum(per_rows[id(rows)] for rows in rows_per_layer)
    return total + 2 * dims.hidden * dims.vocab
