"""The launch flags of SparseX and the ``ServerConfig`` they resolve to.

``--enable-sparsex`` expands to ``--radix-cache-backend sparsex --prefill-attention-backend sparsex``;
``--sparsex-config PATH`` reads a YAML preset (configs/), and the ``--sparsex-*`` flags override it. The
resolved config travels on the ``ServerArgs`` object itself (``_sparsex_config``, set at parsing and
pickled with it into the scheduler processes), so two engines in one process each keep their own, and a
hook of a server without the flag does nothing. ``sgl.Engine(enable_sparsex=True, ...)`` takes the same
settings as keywords.
"""

from __future__ import annotations

import argparse
from typing import Any

import yaml

from sparsex_sgl.core.config import KERNEL_CHOICES, SELECTION_CHOICES, ServerConfig, describe_error

NAME = "sparsex"
FLAGS: dict[str, str] = {
    "sparsex_recompute_ratio": "recompute_ratio",
    "sparsex_full_layers": "full_layers",
    "sparsex_selection": "selection",
    "sparsex_auto_segment": "auto_segment_tokens",
    "sparsex_kernels": "kernels",
    "sparsex_min_segment_tokens": "min_segment_tokens",
    "sparsex_markers": "markers",
    "sparsex_host_tier_gb": "host_tier_gb",
    "sparsex_storage_backend": "storage_backend",
    "sparsex_storage_backend_extra_config": "storage_extra_config",
    "sparsex_storage_timeout": "storage_timeout_s",
}
"""Override flags (as argparse / ``sgl.Engine`` names) and the setting each sets."""
OPTIONS = ("enable_sparsex", "sparsex_config", *FLAGS, "sparsex_hide_counts")


def add_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("SparseX (sparsex_sgl)")
    group.add_argument("--enable-sparsex", action="store_true", default=False,
                       help="Segment-level KV reuse: sets the sparsex radix-cache and prefill attention backends.")
    group.add_argument("--sparsex-config", type=str, default=None, help="YAML preset of the SparseX settings (configs/).")
    group.add_argument("--sparsex-recompute-ratio", type=float, default=None,
                       help="Share of reused tokens recomputed in the sparse layers (default 0.15).")
    group.add_argument("--sparsex-full-layers", type=int, default=None,
                       help="Layers computed over every token before the selection (default 2).")
    group.add_argument("--sparsex-selection", type=str, default=None, metavar="|".join(SELECTION_CHOICES),
                       help="sparse_q (SparseX), query_mass (SparseX, mass only), kv_deviation (CacheBlend-style), "
                            "first_k (EPIC-style) or none.")
    group.add_argument("--sparsex-auto-segment", type=int, default=None, metavar="TOKENS",
                       help="Find segments of about TOKENS tokens in requests without segment data (content-"
                            "defined chunking after the prefix hit); 0 (default): such requests are exact.")
    group.add_argument("--sparsex-kernels", type=str, default=None, choices=KERNEL_CHOICES,
                       help="Ops of the sparse layers: auto (default: Triton on CUDA, torch on the CPU), triton, "
                            "torch.")
    group.add_argument("--sparsex-min-segment-tokens", type=int, default=None, metavar="TOKENS",
                       help="Marked segments shorter than this are served as gap text (default 8).")
    group.add_argument("--sparsex-markers", action="store_true", default=None,
                       help="Parse in-band segment markers in every text prompt (default: only in requests with "
                            "custom_params sparsex_markers=true).")
    group.add_argument("--sparsex-host-tier-gb", type=float, default=None, metavar="GB",
                       help="Host memory that keeps segments evicted from the device pool, loaded back on a hit "
                            "(default 0: none).")
    group.add_argument("--sparsex-storage-backend", type=str, default=None, metavar="NAME",
                       help="Share segments across instances and restarts in a store built on an SGLang HiCache "
                            "storage backend: file, dynamic, ... (default: none).")
    group.add_argument("--sparsex-storage-backend-extra-config", type=str, default=None, metavar="JSON",
                       help='The backend\'s settings, as --hicache-storage-backend-extra-config takes them (file: '
                            '{"file_storage_path": "DIR"}).')
    group.add_argument("--sparsex-storage-timeout", type=float, default=None, metavar="SECONDS",
                       help="Longest wait for one store read before the segment is recomputed (default 2).")
    group.add_argument("--sparsex-hide-counts", action="store_true", default=None,
                       help="Leave the per-request sparsex_* counts out of meta_info (/sparsex/stats keeps totals).")


def server_config(server_args: Any) -> ServerConfig | None:
    """The SparseX settings a server (or ``sgl.Engine``) was started with, None without ``--enable-sparsex``."""
    values = getattr(server_args, "_sparsex_config", None)
    return None if values is None else ServerConfig.from_mapping(values)


def config_of(server_args: Any) -> ServerConfig:
    """The server's SparseX settings; the defaults where the ``sparsex`` backends were chosen by their SGLang
    flags rather than ``--enable-sparsex``."""
    return server_config(server_args) or ServerConfig()


def resolve_config(options: dict[str, Any]) -> ServerConfig:
    """The settings from a YAML preset plus flag overrides; a bad value (or a preset that cannot be read)
    is a ValueError whose message is one line (``config.describe_error``)."""
    try:
        return _resolve_config(options)
    except ValueError as exc:
        raise ValueError(describe_error(exc)) from None


def _resolve_config(options: dict[str, Any]) -> ServerConfig:
    try:
        base = ServerConfig.from_yaml(options["sparsex_config"]) if options.get("sparsex_config") else ServerConfig()
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"--sparsex-config {options['sparsex_config']}: {exc}") from None
    values = base.flat()
    for key, setting in FLAGS.items():
        if options.get(key) is not None:
            values[setting] = options[key]
    if options.get("sparsex_hide_counts"):
        values["report_counts"] = False
    return ServerConfig.from_mapping(values)


REFUSED_PARALLELISM = {
    "pp_size": "pipeline parallelism (the sparse layers run the whole layer stack)",
    "enable_dp_attention": "DP attention (a request's attention is not on every rank)",
    "attn_cp_size": "context parallelism", "dcp_size": "context parallelism",
    "ep_size": "expert parallelism (no MoE model is supported)",
}
"""Launch settings other than tensor parallelism that split a model across ranks: refused in one line."""


def refused_parallelism(values: dict[str, Any]) -> str:
    """What of ``REFUSED_PARALLELISM`` the launch settings ask for, with the flag given ("" if none)."""
    for key, what in REFUSED_PARALLELISM.items():
        value = values.get(key)
        if value is True or (type(value) is int and value > 1):
            return f"{what}; got --{key.replace('_', '-')} {value}"
    return ""


def implied_server_args(values: dict[str, Any], config: ServerConfig) -> tuple[dict[str, Any], ServerConfig]:
    """Server-arg settings implied by --enable-sparsex, and the config with the prefill backend it wraps (an
    explicit ``--prefill-attention-backend``); a conflicting explicit choice is an error."""
    if values.get("radix_cache_backend") not in (None, NAME):
        raise ValueError(f"--enable-sparsex sets --radix-cache-backend {NAME}; got {values['radix_cache_backend']!r}")
    if values.get("disable_radix_cache"):
        raise ValueError("--enable-sparsex needs the radix cache; drop --disable-radix-cache")
    if values.get("enable_hierarchical_cache"):
        raise ValueError("--enable-sparsex keeps segments in its own tiers, whose keys find a segment at any "
                         "position (HiCache's prefix-chained keys cannot): drop --enable-hierarchical-cache and use "
                         "--sparsex-host-tier-gb and --sparsex-storage-backend")
    refused = refused_parallelism(values)
    if refused:
        raise ValueError(f"--enable-sparsex does not support {refused}")
    if values.get("attention_backend") == NAME:
        raise ValueError(f"--attention-backend {NAME} is set by --enable-sparsex for prefill only; drop it")
    chosen = values.get("prefill_attention_backend")
    if chosen not in (None, NAME):
        config = ServerConfig.from_mapping({**config.flat(), "prefill_backend": chosen})
    return {"radix_cache_backend": NAME, "prefill_attention_backend": NAME}, config
