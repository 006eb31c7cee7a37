"""The copied decoder loop is guarded: SparseX serves only on the SGLang source it was written against.

``model_hook.SparseXForward`` replaces the decoder loop of SGLang's Llama / Qwen2 / Qwen3 models and calls
their layers row-selectively. The source of every SGLang function it copies or relies on is pinned
(``FOLLOWED_SOURCES``); on another source ``install`` leaves SparseX off (exact serving). Here: the pins
match the installed sglang, a changed function is detected (the check could fail), and the served loop
is exercised on each architecture's real decoder classes by the server tests (Llama: SmolLM2 in
test_served_pipeline.py; Qwen2 and Qwen3: test_architectures_server.py).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect

from sparsex_sgl.sglang import model_hook


def test_every_followed_sglang_function_is_the_pinned_source() -> None:
    changed = model_hook.unfollowed_changes()
    assert not changed, (f"SGLang changed {changed}: re-read SparseXForward (model_hook.py) against the new source, "
                         "then update model_hook.FOLLOWED_SOURCES")


def test_the_pins_cover_each_supported_architecture() -> None:
    families = {name.split(".")[3] for name in model_hook.FOLLOWED_SOURCES if name.startswith("sglang.srt.models.")}
    assert families == {"llama", "qwen2", "qwen3"}
    for model in model_hook.SUPPORTED_MODELS:
        module = importlib.import_module(f"sglang.srt.models.{model.removesuffix('Model').lower()}")
        assert f"{module.__name__}.{model}.forward" in model_hook.FOLLOWED_SOURCES


def test_a_changed_or_missing_function_is_reported() -> None:
    name = "sglang.srt.models.llama.LlamaModel.forward"
    from sglang.srt.models.llama import LlamaModel

    real = hashlib.sha256(inspect.getsource(LlamaModel.forward).encode()).hexdigest()
    assert model_hook.unfollowed_changes({name: real}) == []
    assert model_hook.unfollowed_changes({name: "0" * 64}) == [name]
    gone = "sglang.srt.models.llama.LlamaModel.no_such_method"
    assert model_hook.unfollowed_changes({gone: real}) == [gone]
