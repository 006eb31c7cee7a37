"""The served sparse path against the reference executor, and on the Triton kernels, in real CPU servers.

The SGLang adapter and the reference executor run one sparse-extend pipeline (``sparse_extend.py``);
this checks that the numbers a server serves are that pipeline's. Two ``--enable-sparsex`` servers with
SmolLM2: one on the torch ops, one on the Triton kernels under ``TRITON_INTERPRET=1``.

- A real HotpotQA prompt reordered at ratio 0.15 (an approximate prefill): the server's plan (prefix,
  reused, recomputed), the positions its sparse layers computed (``rows_crc32``) and its first token's
  top logprobs equal the reference executor's on the same weights and cache contents.
- Short prompts on the Triton server give the same greedy output and the same computed rows as on the
  torch server.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from sparsex_sgl.assets import hotpotqa_path, resolve_model
from sparsex_sgl.client import reuse_counts
from sparsex_sgl.core.protocol import flatten_spans
from sparsex_sgl.core.request import GAP_BLOCK
from sparsex_sgl.eval.hotpotqa import SegmentedPrompt, build_prompt, load_examples
from sparsex_sgl.eval.methods import method_config
from sparsex_sgl.reference import ReferenceExecutor
from sparsex_sgl.reference.cache import ReferenceSegmentCache
from sparsex_sgl.testing import Server, flush_cache, launch, wait_ready

pytestmark = pytest.mark.slow
TOP = 5
LOGPROB_TOL = 2e-3
"""float32 on both sides, different kernels (SGLang's torch-native attention and fused layers vs the HF
modules): logits agree to ~1e-4; a different selected row would move them by far more."""


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server]]:
    logs = tmp_path_factory.mktemp("served")
    model = resolve_model("smollm2")
    torch_ops = launch(model, ["--enable-sparsex", "--sparsex-kernels", "torch"], logs / "torch.log", 8192)
    triton_ops = launch(model, ["--enable-sparsex", "--sparsex-kernels", "triton"], logs / "triton.log", 8192,
                        env={"TRITON_INTERPRET": "1"})
    try:
        wait_ready(torch_ops)
        wait_ready(triton_ops)
        yield torch_ops, triton_ops
    finally:
        torch_ops.stop()
        triton_ops.stop()


def _generate(server: Server, prompt: SegmentedPrompt, new_tokens: int, **extra: Any) -> dict[str, Any]:
    custom = {"sparsex_spans": flatten_spans(prompt.spans), "sparsex_approximate_logprobs": True}
    payload = {"input_ids": list(prompt.input_ids), **extra,
               "sampling_params": {"temperature": 0, "max_new_tokens": new_tokens, "custom_params": custom}}
    status, reply = server.post("/generate", payload)
    assert status == 200, reply
    return reply


def _crc(rows: tuple[int, ...] | list[int]) -> int:
    return zlib.crc32(np.asarray(rows, dtype=np.int32).tobytes())


def test_approximate_prefill_equals_the_reference_executor(servers: tuple[Server, Server]) -> None:
    server, _ = servers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model("smollm2")
    tok = AutoTokenizer.from_pretrained(path)
    (example,) = load_examples(hotpotqa_path(), 1, offset=1)
    first, reordered = build_prompt(tok, example, 0), build_prompt(tok, example, 1)
    assert flush_cache(server.url)
    _generate(server, first, 1)  # caches the paragraphs (and the instruction) in the first order
    reply = _generate(server, reordered, 1, return_logprob=True, top_logprobs_num=TOP)
    served = reuse_counts(reply["meta_info"])
    assert int(served["reused"]) > 0 and served["fallback"] == ""

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert_served_equals_reference(reply, model, first, reordered)


def assert_served_equals_reference(reply: dict[str, Any], model: torch.nn.Module, first: SegmentedPrompt,
                                   reordered: SegmentedPrompt) -> None:
    """The server's reply to ``reordered`` (sent after ``first``, at ratio 0.15 and ``L_full`` 2) against the
    reference executor on the same weights and cache contents: the plan's counts, the rows the sparse
    layers computed and the first token's top logprobs."""
    served = reuse_counts(reply["meta_info"])
    executor = ReferenceExecutor(model)
    cache = ReferenceSegmentCache(executor, num_slots=4 * len(first.input_ids), gap_block=GAP_BLOCK)
    assert cache.store(first.input_ids, first.spans, executor.prefill_full(first.input_ids))
    config = method_config("sparsex", 0.15, 2)
    assert config is not None
    ours = cache.prefill(reordered.input_ids, reordered.spans, config)
    plan = cache.lookup(reordered.input_ids, reordered.spans)
    assert (int(served["prefix"]), int(served["reused"]), int(served["recomputed"])) == (
        plan.prefix_len, ours.stats.n_reused, ours.stats.n_selected)
    assert int(served["rows_crc32"]) == _crc(ours.rows), "the server computed other rows than the reference"
    logprobs = torch.log_softmax(ours.logits.double(), dim=-1)
    expected = torch.topk(logprobs, TOP)
    top = reply["meta_info"]["output_top_logprobs"][0]  # [(logprob, token id, text)] of the first token
    assert [int(t[1]) for t in top] == expected.indices.tolist()
    torch.testing.assert_close(torch.tensor([float(t[0]) for t in top], dtype=torch.float64), expected.values,
                               atol=LOGPROB_TOL, rtol=0)


def test_triton_kernels_serve_what_the_torch_ops_serve(servers: tuple[Server, Server]) -> None:
    torch_ops, triton_ops = servers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2"))
    for offset in (2, 3):
        (example,) = load_examples(hotpotqa_path(), 1, offset=offset)
        short = dataclasses.replace(example, paragraphs=example.paragraphs[:3])  # ~300 tokens: the interpreter is slow
        first, reordered = build_prompt(tok, short, 0), build_prompt(tok, short, 1)
        replies = []
        for server in (torch_ops, triton_ops):
            assert flush_cache(server.url)
            _generate(server, first, 1)
            replies.append(_generate(server, reordered, 8))
        counts = [reuse_counts(r["meta_info"]) for r in replies]
        assert int(counts[0]["reused"]) > 0 and counts[1]["fallback"] == ""
        assert counts[0]["rows_crc32"] == counts[1]["rows_crc32"]
        assert replies[0]["output_ids"] == replies[1]["output_ids"]
