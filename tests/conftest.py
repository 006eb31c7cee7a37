"""Shared fixtures: tiny random HF models (fixed seeds) and the real SmolLM2 folder.

Without CUDA the Triton kernels run under Triton's interpreter. ``@triton.jit`` reads
``TRITON_INTERPRET`` when a kernel module is imported, and any test module may import one indirectly
(``sparsex_sgl.sglang`` imports the pipeline), so it is set here, before pytest imports the test modules.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def tiny_model(family: str, n_heads: int = 4, n_kv_heads: int = 2, layers: int = 4):  # type: ignore[no-untyped-def]
    """A randomly initialised Llama / Qwen2 / Qwen3 with a real architecture and small shapes."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    common = {
        "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": layers,
        "num_attention_heads": n_heads, "num_key_value_heads": n_kv_heads, "max_position_embeddings": 512,
        "tie_word_embeddings": False,
    }
    configs = {
        "llama": lambda: LlamaConfig(**common, rope_theta=10000.0),
        "qwen2": lambda: Qwen2Config(**common, rope_theta=1e6),
        "qwen3": lambda: Qwen3Config(**common, head_dim=16, rope_theta=1e6),
    }
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(configs[family](), dtype=torch.float32)
    # Random init at std 0.02 gives near-uniform attention; larger weights make positions matter,
    # so a wrong mask or a wrong rotation shows up in the logits.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.15)
    return model.eval()


@pytest.fixture(scope="session")
def smollm2():  # type: ignore[no-untyped-def]
    """The real SmolLM2-135M-Instruct (converted from the GGUF by scripts/setup) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparsex_sgl.assets import prepare_smollm2

    path = prepare_smollm2()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)
