"""A wrong SparseX setting stops ``python -m sglang.launch_server`` with one line naming the key, what it must
be and the value given, never a traceback; the same settings reach ``sgl.Engine`` as a ``ValueError``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sparsex_sgl.assets import resolve_model
from sparsex_sgl.sglang.settings import resolve_config


@pytest.mark.parametrize(
    "flags, preset, expected",
    [
        (["--sparsex-selection", "bogus"], None, "selection: Input should be 'sparse_q', 'query_mass', 'kv_deviation'"),
        (["--sparsex-recompute-ratio", "1.5"], None, "recompute_ratio must be in [0, 1], got 1.5"),
        ([], "sparsex:\n  mass_pass: lookahead\n", "unknown SparseX settings ['mass_pass']"),
        ([], "sparsex:\n  full_layers: two\n", "full_layers: Input should be a valid integer"),
        ([], "sparsex:\n  mass_heads: mean\n", "mass_heads: Input should be 'sum' or 'max' (got 'mean')"),
        ([], "sparsex:\n  ratio: 0.2\n", "unknown SparseX settings ['ratio']"),
        ([], "- 1\n- 2\n", "a preset is a mapping of settings"),
        (["--enable-hierarchical-cache"], None, "drop --enable-hierarchical-cache and use --sparsex-host-tier-gb"),
        (["--sparsex-storage-backend", "file", "--sparsex-storage-backend-extra-config", "{oops"], None,
         "storage_extra_config is not JSON"),
        (["--sparsex-host-tier-gb", "-1"], None, "host_tier_gb must be >= 0"),
        (["--pp-size", "2"], None, "does not support pipeline parallelism"),
        (["--enable-dp-attention", "--tp", "2"], None, "does not support DP attention"),
    ],
)
def test_bad_settings_stop_the_launch_in_one_line(tmp_path: Path, flags: list[str], preset: str | None,
                                                  expected: str) -> None:
    if preset is not None:
        (tmp_path / "preset.yaml").write_text(preset)
        flags = [*flags, "--sparsex-config", str(tmp_path / "preset.yaml")]
    done = subprocess.run([sys.executable, "-m", "sglang.launch_server", "--model-path", str(resolve_model("smollm2")),
                           "--device", "cpu", "--enable-sparsex", *flags], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("sparsex_sgl: ") and expected in last, done.stderr[-2000:]


def test_engine_keywords_are_validated_the_same_way() -> None:
    with pytest.raises(ValueError, match="full_layers: Input should be a valid integer"):
        resolve_config({"sparsex_full_layers": "two"})
    assert resolve_config({"sparsex_full_layers": 4, "sparsex_selection": "query_mass"}).selection.full_layers == 4


def test_parallelism_other_than_tensor_parallelism_is_named_for_refusal() -> None:
    """The one check both the launch (``--enable-sparsex``) and the cache factory (``--radix-cache-backend sparsex``
    alone) apply: TP and the defaults pass; each other way of splitting a model is named with its flag."""
    from sparsex_sgl.sglang.settings import refused_parallelism

    assert refused_parallelism({"tp_size": 4, "pp_size": 1, "enable_dp_attention": False, "ep_size": 1}) == ""
    assert refused_parallelism({"pp_size": 2}).endswith("got --pp-size 2")
    assert refused_parallelism({"enable_dp_attention": True}).startswith("DP attention")
    assert refused_parallelism({"attn_cp_size": 2}).startswith("context parallelism")
    assert refused_parallelism({"ep_size": 8}).startswith("expert parallelism")
