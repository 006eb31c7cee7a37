"""A wrong SparseX setting stops ``python -m sglang.launch_server`` with one line naming the key, what it must
be and the value given, never a traceback; the same settings reach ``sgl.Engine`` as a ``ValueError``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sparsex_sgl.assets import resolve_model
from sparsex_sgl.sglang.settings import resolve_config

# One Python imports what a launch imports once (SGLang and its HTTP server: 12 of a failed launch's 13 s on
# 2 cores), then runs each launch as ``python -m sglang.launch_server`` would, in a fork of itself: the module as
# ``__main__`` with the case's argv, stdout dropped, stderr to a file, and the interpreter's own exit (a
# ``SystemExit`` string printed with status 1, an uncaught exception's traceback printed with status 1).
LAUNCHER = """
import json, os, runpy, sys, traceback
import sglang.launch_server, sglang.srt.entrypoints.http_server
for argv, stderr in json.loads(sys.argv[1]):
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        os.dup2(os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        sys.argv = [sglang.launch_server.__file__, *argv]
        try:
            runpy.run_module("sglang.launch_server", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as stop:
            if stop.code is None or isinstance(stop.code, int):
                code = stop.code or 0
            else:
                print(stop.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""

BAD_SETTINGS: list[tuple[list[str], str | None, str]] = [
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
]


@pytest.fixture(scope="module")
def launches(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[int, str]]:
    """Exit status and stderr of ``python -m sglang.launch_server --enable-sparsex`` for each bad setting."""
    folder, model = tmp_path_factory.mktemp("launches"), str(resolve_model("smollm2"))
    cases = []
    for i, (flags, preset, _) in enumerate(BAD_SETTINGS):
        if preset is not None:
            (folder / f"preset-{i}.yaml").write_text(preset)
            flags = [*flags, "--sparsex-config", str(folder / f"preset-{i}.yaml")]
        argv = ["--model-path", model, "--device", "cpu", "--enable-sparsex", *flags]
        cases.append((argv, str(folder / f"stderr-{i}.txt")))
    done = subprocess.run([sys.executable, "-c", LAUNCHER, json.dumps(cases)], capture_output=True, text=True,
                          timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    codes = [int(line) for line in done.stdout.split()]
    assert len(codes) == len(cases), done.stdout
    return [(code, Path(stderr).read_text()) for code, (_, stderr) in zip(codes, cases)]


@pytest.mark.parametrize("case", range(len(BAD_SETTINGS)), ids=[expected for *_, expected in BAD_SETTINGS])
def test_bad_settings_stop_the_launch_in_one_line(launches: list[tuple[int, str]], case: int) -> None:
    code, stderr = launches[case]
    expected = BAD_SETTINGS[case][2]
    assert code != 0
    assert "Traceback" not in stderr, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("sparsex_sgl: ") and expected in last, stderr[-2000:]


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
