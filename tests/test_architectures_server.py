"""The served sparse path on each supported decoder family besides Llama (SmolLM2 covers Llama): SGLang's own
``Qwen2Model`` / ``Qwen3Model`` with their decoder layers, hooked by ``model_hook``, against the reference
executor on the same weights.

Randomly initialised small models (``conftest.tiny_model``, saved as HF folders; weights large enough that
attention depends on position) are served with ``--skip-tokenizer-init`` (token ids in and out). A prompt of
a head, three segments and a question is cached in one order and sent in another at ratio 0.15: the
server's plan, the rows its sparse layers computed and its first token's top logprobs must equal the
reference executor's, which runs the same pipeline over the HF modules.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from test_served_pipeline import TOP, assert_served_equals_reference

from sparsex_sgl.client import reuse_counts
from sparsex_sgl.core.protocol import flatten_spans
from sparsex_sgl.eval.hotpotqa import SegmentedPrompt
from sparsex_sgl.testing import Server, launch, wait_ready

pytestmark = pytest.mark.slow
FAMILIES = ("qwen2", "qwen3")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[Path, Server]]]:
    root = tmp_path_factory.mktemp("architectures")
    servers = {}
    for family in FAMILIES:
        folder = root / family
        model = tiny_model(family)
        model.generation_config.pad_token_id = 0
        model.save_pretrained(folder)
        servers[family] = (folder, launch(folder, ["--enable-sparsex", "--skip-tokenizer-init"], root / f"{family}.log",
                                          4096))
    try:
        for _, server in servers.values():
            wait_ready(server)
        yield servers
    finally:
        for _, server in servers.values():
            server.stop()


def prompt(order: list[int], seed: int = 0) -> SegmentedPrompt:
    """A 20-token head, three 40-token segments in ``order`` and a 12-token question (ids in [1, 256))."""
    gen = torch.Generator().manual_seed(seed)
    head = torch.randint(1, 256, (20,), generator=gen).tolist()
    segments = [torch.randint(1, 256, (40,), generator=gen).tolist() for _ in range(3)]
    question = torch.randint(1, 256, (12,), generator=gen).tolist()
    ids, spans = list(head), []
    for index in order:
        spans.append((len(ids), len(ids) + 40))
        ids += segments[index]
    return SegmentedPrompt(tuple(ids + question), tuple(spans), len(head))


def generate(server: Server, p: SegmentedPrompt, **extra: object) -> dict:  # type: ignore[type-arg]
    params = {"temperature": 0, "max_new_tokens": 1,
              "custom_params": {"sparsex_spans": flatten_spans(p.spans), "sparsex_approximate_logprobs": True}}
    status, reply = server.post("/generate", {"input_ids": list(p.input_ids), "sampling_params": params, **extra})
    assert status == 200, reply
    return reply


@pytest.mark.parametrize("family", FAMILIES)
def test_served_sparse_prefill_equals_the_reference_executor(served: dict, family: str) -> None:  # type: ignore[type-arg]
    folder, server = served[family]
    first, reordered = prompt([0, 1, 2]), prompt([2, 0, 1])
    generate(server, first)
    reply = generate(server, reordered, return_logprob=True, top_logprobs_num=TOP)
    counts = reuse_counts(reply["meta_info"])
    assert int(counts["reused"]) == 120 and counts["fallback"] == ""

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert_served_equals_reference(reply, model, first, reordered)
