"""The one seam to SGLang (``sparsex_sgl.sglang.compat``), and what must hold when SparseX code fails there.

- Every SGLang object the seam relies on is pinned by its source, the pins match the installed sglang,
  and a changed or missing source is reported: this file fails until the seam is re-read after an upgrade.
- No module outside the seam imports SGLang at run time, and the core imports neither SGLang nor Triton.
- A real server whose pinned source "changed" (a pin altered in its processes) serves every request
  exactly, with SparseX off, the reason in ``/sparsex/stats`` and counted per request.
- A real server whose checkpoint fails right after the graph adopted the request's slots keeps every
  slot with one owner: idle, free + cached slots equal the pool and ``/flush_cache`` frees everything (the
  ownership bug of issue 32: the code before the fix lost its scheduler to SGLang's leak check here). The
  same server's sparse layer failing mid-forward re-runs that batch as SGLang's own, exact prefill.

The two servers get their fault from a ``sitecustomize`` module on their ``PYTHONPATH``, which every
process they spawn imports at start-up; the package itself carries no test hook.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import inspect
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sparsex_sgl.sglang import compat

PACKAGE = Path(__file__).resolve().parent.parent / "sparsex_sgl"


def test_every_pinned_sglang_source_is_the_installed_one() -> None:
    changed = compat.changed_pins() + compat.changed_pins(compat.TORCH_OPS_PINS)
    assert not changed, (f"SGLang changed {changed}: re-read the functions of sparsex_sgl/sglang/compat.py that "
                         "rely on them against the new source, then update compat.PINS (python -m "
                         "sparsex_sgl.sglang.compat)")


def test_the_pins_are_exactly_what_the_seam_relies_on() -> None:
    assert set(compat.PINS) | set(compat.TORCH_OPS_PINS) == set(compat.relied_on())
    assert not set(compat.PINS) & set(compat.TORCH_OPS_PINS)
    families = {name.split(".")[3] for name in compat.PINS if name.startswith("sglang.srt.models.")}
    assert families == {"llama", "qwen2", "qwen3"}


def test_a_changed_or_missing_source_is_reported() -> None:
    from sglang.srt.models.llama import LlamaModel

    name = "sglang.srt.models.llama.LlamaModel.forward"
    real = hashlib.sha256(inspect.getsource(LlamaModel.forward).encode()).hexdigest()
    assert compat.changed_pins({name: real}) == []
    assert compat.changed_pins({name: "0" * 64}) == [name]
    gone = "sglang.srt.models.llama.LlamaModel.no_such_method"
    assert compat.changed_pins({gone: real}) == [gone]


def _runtime_imports(path: Path) -> set[str]:
    """Top-level packages a module imports outside ``if TYPE_CHECKING:`` blocks."""
    tree = ast.parse(path.read_text())
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    names = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_only_the_seam_imports_sglang_and_the_core_imports_no_engine() -> None:
    importers = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if "sglang" in _runtime_imports(p))
    assert importers == ["sglang/compat.py"]
    for path in (PACKAGE / "core").rglob("*.py"):
        assert not _runtime_imports(path) & {"sglang", "triton"}, path
    assert not (_runtime_imports(PACKAGE / "core" / "ops.py") & {"triton"})  # the Triton op set imports lazily


# ---------------------------------------------------------------------- faults in real servers
SITECUSTOMIZE = '''
import os

fault = os.environ.get("SPARSEX_TEST_FAULT")
if fault == "changed_pin":
    from sparsex_sgl.sglang import compat

    compat.PINS["sglang.srt.managers.schedule_batch.Req.init_next_round_input"] = "0" * 64
elif fault == "after_insert":
    from sparsex_sgl.core import graph

    real_insert = graph.SegmentGraph.insert
    calls = []

    def insert(self, pieces, *args, **kwargs):
        result = real_insert(self, pieces, *args, **kwargs)
        if any(piece.reusable for piece in pieces):
            calls.append(1)
            if len(calls) == 2:  # the first request with segments, as it is released (decoded tokens adopted)
                raise RuntimeError("injected fault: the graph adopted the slots, the checkpoint goes no further")
        return result

    graph.SegmentGraph.insert = insert

    from sparsex_sgl.core import sparse_extend

    real_build, real_run = sparse_extend.SparseExtendPlan.build.__func__, sparse_extend.SparseExtendPlan.run
    state = {"batches": 0, "raised": False}

    def build(cls, *args, **kwargs):
        state["batches"] += 1
        return real_build(cls, *args, **kwargs)

    def run(self, *args, **kwargs):
        if state["batches"] == 2 and not state["raised"]:  # the second batch with reuse, in a sparse layer
            state["raised"] = True
            raise RuntimeError("injected fault in a sparse layer")
        return real_run(self, *args, **kwargs)

    sparse_extend.SparseExtendPlan.build = classmethod(build)
    sparse_extend.SparseExtendPlan.run = run
'''


@pytest.fixture(scope="module")
def faulty_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    import os

    from sparsex_sgl.assets import resolve_model
    from sparsex_sgl.testing import launch, wait_ready

    logs = tmp_path_factory.mktemp("seam")
    (logs / "sitecustomize.py").write_text(textwrap.dedent(SITECUSTOMIZE))
    path = os.pathsep.join([str(logs), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    servers = {fault: launch(resolve_model("smollm2"), ["--enable-sparsex"], logs / f"{fault}.log", 8192,
                             env={"PYTHONPATH": path, "SPARSEX_TEST_FAULT": fault})
               for fault in ("changed_pin", "after_insert")}
    try:
        for server in servers.values():
            wait_ready(server)
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def _prompts() -> list[Any]:
    from transformers import AutoTokenizer

    from sparsex_sgl.assets import hotpotqa_path, resolve_model
    from sparsex_sgl.eval.hotpotqa import build_prompt, load_examples

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2"))
    (example,) = load_examples(hotpotqa_path(), 1, offset=7)
    example = dataclasses.replace(example, paragraphs=example.paragraphs[:3])
    return [build_prompt(tok, example, seed) for seed in range(3)]


def _generate(server: Any, prompt: Any, **custom: Any) -> dict[str, Any]:
    from sparsex_sgl.core.protocol import flatten_spans

    status, reply = server.post("/generate", {"input_ids": list(prompt.input_ids), "sampling_params": {
        "temperature": 0, "max_new_tokens": 6, "custom_params": {"sparsex_spans": flatten_spans(prompt.spans),
                                                                 **custom}}})
    assert status == 200, reply
    return dict(reply)


@pytest.mark.slow
def test_a_changed_pin_leaves_sparsex_off_counted_and_serving(faulty_servers: dict[str, Any]) -> None:
    from sparsex_sgl.client import reuse_counts
    from sparsex_sgl.testing import idle_stats

    server = faulty_servers["changed_pin"]
    first, again, _ = _prompts()
    _generate(server, first)
    reply = _generate(server, again)
    assert int(reuse_counts(reply["meta_info"])["reused"]) == 0
    s = idle_stats(server)
    assert "Req.init_next_round_input" in s["disabled_reason"]
    assert s["fallbacks"].get("sglang_changed", 0) >= 1 and s["reused_tokens"] == 0


@pytest.mark.slow
def test_a_checkpoint_failing_after_adoption_leaves_every_slot_one_owner(faulty_servers: dict[str, Any]) -> None:
    from sparsex_sgl.client import reuse_counts
    from sparsex_sgl.testing import flush_cache, idle_stats

    server = faulty_servers["after_insert"]
    first, again, third = _prompts()
    _generate(server, first)  # its checkpoint fails right after the graph adopted its slots
    s = idle_stats(server)
    assert s["fallbacks"].get("internal_error") == 1 and s["tracked_requests"] == 0, s
    assert s["graph_tokens"] > 0 and s["allocator_free"] + s["graph_tokens"] == s["allocator_size"], s
    exact = _generate(server, again, sparsex_recompute_ratio=1.0)  # reuses what that checkpoint adopted
    assert int(reuse_counts(exact["meta_info"])["reused"]) > 0
    assert flush_cache(server.url)
    fresh = _generate(server, again, sparsex_recompute_ratio=1.0)  # computed from scratch after the flush
    assert fresh["output_ids"] == exact["output_ids"]
    assert flush_cache(server.url)
    s = idle_stats(server)
    assert s["graph_tokens"] == 0 and s["allocator_free"] == s["allocator_size"], s
    _generate(server, third)  # still serving; caches the paragraphs in a third order
    fallen = _generate(server, again)  # its sparse layer fails: the batch re-runs as exact prefill
    counts = reuse_counts(fallen["meta_info"])
    assert counts["fallback"] == "sparse_forward_error" and int(counts["reused"]) == 0
    assert fallen["output_ids"] == fresh["output_ids"]  # exact, as the prefill from scratch
    s = idle_stats(server)
    assert s["allocator_free"] + s["graph_tokens"] == s["allocator_size"], s
