"""Automatic segmentation in a real SGLang 0.5.23 server on the CPU (SmolLM2-135M, HotpotQA prompts).

A client that sends plain prompts, with no segment data (any OpenAI-style client), still gets non-prefix
reuse when the server runs with ``--sparsex-auto-segment``: the paragraphs of a RAG prompt sent again in
another order are found by content-defined chunking and reused at their new positions.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from sparsex_sgl.assets import hotpotqa_path, resolve_model
from sparsex_sgl.client import reuse_counts
from sparsex_sgl.eval.hotpotqa import SegmentedPrompt, build_prompt, load_examples
from sparsex_sgl.testing import Server, launch, wait_ready

pytestmark = pytest.mark.slow

AVERAGE = 32
"""Automatic segments of about 32 tokens: HotpotQA paragraphs (about 100-200 tokens) hold several."""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("auto") / "sparsex-auto.log"
    sparsex = launch(resolve_model("smollm2"), ["--enable-sparsex", "--sparsex-auto-segment", str(AVERAGE)], log, 4096)
    try:
        wait_ready(sparsex)
        yield sparsex
    finally:
        sparsex.stop()


def plain(server: Server, prompt: SegmentedPrompt, **payload: Any) -> dict[str, Any]:
    params: dict[str, Any] = {"temperature": 0, "max_new_tokens": 12, **payload.pop("params", {})}
    status, reply = server.post("/generate", {"input_ids": list(prompt.input_ids), "sampling_params": params,
                                              **payload})
    assert status == 200, reply
    return reply


def test_plain_prompts_reuse_recurring_paragraphs(server: Server) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2"))
    example = next(e for e in load_examples(hotpotqa_path(), 12) if len(build_prompt(tok, e, 0).input_ids) < 1800)
    first, reordered = build_prompt(tok, example, 0), build_prompt(tok, example, 1)
    before = server.get("/sparsex/stats")["schedulers"][0]
    plain(server, first)

    exact = plain(server, reordered, params={"custom_params": {"sparsex_recompute_ratio": 1.0}})
    counts = reuse_counts(exact["meta_info"])
    paragraphs = sum(e - s for s, e in reordered.spans)
    # Chunks wholly inside a paragraph recur; those that straddle a paragraph border, and the question, do not.
    assert 0 < counts["reused"] <= paragraphs
    assert counts["recomputed"] == counts["reused"]  # ratio 1.0: every reused token recomputed, exact
    # The exact reference: a request asking for logprobs runs exact full prefill after its exact prefix.
    reference = plain(server, reordered, return_logprob=True)
    assert reuse_counts(reference["meta_info"])["reused"] == 0
    assert exact["output_ids"] == reference["output_ids"]

    third = build_prompt(tok, example, 2)
    sparse = reuse_counts(plain(server, third)["meta_info"])
    assert sparse["reused"] > 0 and sparse["recomputed"] == round(0.15 * sparse["reused"])
    after = server.get("/sparsex/stats")["schedulers"][0]
    assert after["requests_auto_segmented"] - before["requests_auto_segmented"] >= 3

    # The third order is now cached blended after its first approximated token. A request that resends it
    # with a new paragraph before the question is segmented automatically (its new paragraph); its client
    # never accepted approximation, so it takes only the exact part of that cached path.
    end = max(e for _, e in third.spans)
    extra = tok(load_examples(hotpotqa_path(), 1, offset=60)[0].paragraphs[0], add_special_tokens=False)["input_ids"]
    grown = SegmentedPrompt((*third.input_ids[:end], *extra, *third.input_ids[end:]), (), 0)
    grown_counts = reuse_counts(plain(server, grown)["meta_info"])
    assert server.get("/sparsex/stats")["schedulers"][0]["requests_auto_segmented"] > after["requests_auto_segmented"]
    assert grown_counts["prefix"] > 0 and grown_counts["blended_prefix"] == 0, grown_counts
    print(f"auto segments: reused {counts['reused']} of {paragraphs} paragraph tokens "
          f"({len(reordered.input_ids)}-token prompt); third order reused {sparse['reused']}")
