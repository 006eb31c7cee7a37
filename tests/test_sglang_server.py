"""SparseX inside a real SGLang 0.5.23 server on the CPU, with SmolLM2-135M and HotpotQA prompts.

Two servers run side by side for the whole module: stock SGLang (radix cache) as the reference for
exact output, and the same server with ``--enable-sparsex``. Both are greedy (temperature 0).
"""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sparsex_sgl.assets import hotpotqa_path, resolve_model
from sparsex_sgl.client import Segment, SparseXClient, reuse_counts
from sparsex_sgl.core.protocol import flatten_spans
from sparsex_sgl.eval.hotpotqa import SegmentedPrompt, build_prompt, load_examples
from sparsex_sgl.testing import Server, flush_cache, launch, wait_ready

pytestmark = pytest.mark.slow

MAX_TOTAL_TOKENS = 4096
"""Small on purpose: three ~1.5k-token prompts fill it, so eviction runs during the module."""
NEW_TOKENS = 12
CHUNKED = ("--chunked-prefill-size", "512")
"""Both servers chunk prefill at 512 tokens: every prompt here is longer, so requests that reuse segments
run whole beside chunked ones (plugin ``_admit``), up to 4 chunks (2,048 tokens)."""


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server]]:
    logs = tmp_path_factory.mktemp("servers")
    model = resolve_model("smollm2")
    stock = launch(model, list(CHUNKED), logs / "stock.log", MAX_TOTAL_TOKENS)
    sparsex = launch(model, ["--enable-sparsex", "--sparsex-markers", "--enable-metrics", *CHUNKED], logs / "sparsex.log",
                     MAX_TOTAL_TOKENS)
    try:
        wait_ready(stock)
        wait_ready(sparsex)
        yield stock, sparsex
    finally:
        stock.stop()
        sparsex.stop()


@pytest.fixture(scope="module")
def prompts() -> list[list[SegmentedPrompt]]:
    """Per question, its paragraphs in three orders; only questions under 1,800 tokens (they must fit
    the 4,096-token pool twice: a cached order plus a running one)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2"))
    out = []
    for example in load_examples(hotpotqa_path(), 12):
        orders = [build_prompt(tok, example, seed) for seed in range(3)]
        if len(orders[0].input_ids) < 1800:
            out.append(orders)
    assert len(out) >= 5
    return out


def generate(server: Server, prompt: SegmentedPrompt, segments: bool = True, **custom: Any) -> dict[str, Any]:
    return server.generate(prompt.input_ids, prompt.spans if segments else None, NEW_TOKENS, **custom)


def stats(server: Server) -> dict[str, Any]:
    schedulers = server.get("/sparsex/stats")["schedulers"]
    assert len(schedulers) == 1
    return schedulers[0]


def test_without_segment_data_outputs_equal_stock(servers: tuple[Server, Server], prompts: list) -> None:
    stock, sparsex = servers
    for orders in prompts[:2]:
        expected = generate(stock, orders[0], segments=False)
        got = generate(sparsex, orders[0], segments=False)
        assert got["output_ids"] == expected["output_ids"]
        counts = reuse_counts(got["meta_info"])
        assert counts["reused"] == 0 and counts["fallback"] == ""


def test_repeated_request_is_a_prefix_hit(servers: tuple[Server, Server], prompts: list) -> None:
    _, sparsex = servers
    prompt = prompts[0][1]
    first = generate(sparsex, prompt)
    again = generate(sparsex, prompt)
    n = len(prompt.input_ids)
    # The whole prompt is cached as an exact path; SGLang recomputes the last token, and the trailing
    # gap (question) is cached in 16-token blocks, so at least n - 16 tokens hit.
    assert again["meta_info"]["cached_tokens"] >= n - 16
    assert reuse_counts(again["meta_info"])["prefix"] == again["meta_info"]["cached_tokens"]
    assert again["output_ids"] == first["output_ids"]


def test_next_chat_round_hits_through_the_generated_reply_as_stock_does(
        servers: tuple[Server, Server], prompts: list) -> None:
    """Multi-round chat, no segments: the next round resends the prompt, the reply the server generated
    and a new turn. Stock SGLang's radix tree hits through the reply (all of it that has KV); SparseX
    caches decoded tokens too and must hit exactly as far, with the same output. Without decoded tokens
    cached, its hit stopped at the prompt's last whole 16-token block (n - n % 16)."""
    stock, sparsex = servers
    prompt = prompts[4][0]
    first = generate(stock, prompt, segments=False)
    assert generate(sparsex, prompt, segments=False)["output_ids"] == first["output_ids"]
    n, reply = len(prompt.input_ids), tuple(first["output_ids"])
    next_round = SegmentedPrompt(prompt.input_ids + reply + prompts[0][0].input_ids[-20:], (), prompt.head_len)
    expected = generate(stock, next_round, segments=False)
    got = generate(sparsex, next_round, segments=False)
    assert expected["meta_info"]["cached_tokens"] >= n + len(reply) - 1
    assert got["meta_info"]["cached_tokens"] == expected["meta_info"]["cached_tokens"]
    assert got["output_ids"] == expected["output_ids"]


def test_reordered_paragraphs_reuse_and_ratio_one_is_exact(servers: tuple[Server, Server], prompts: list) -> None:
    stock, sparsex = servers
    before = stats(sparsex)
    orders = prompts[1]
    generate(sparsex, orders[0])  # caches the paragraphs in one order
    reordered = orders[1]
    exact = generate(sparsex, reordered, sparsex_recompute_ratio=1.0)
    counts = reuse_counts(exact["meta_info"])
    # Every paragraph is cached, in another order: each one is on the exact prefix path (when the
    # shuffle kept the leading ones) or a non-prefix hit; only the question is new.
    paragraph_tokens = sum(e - s for s, e in reordered.spans)
    assert counts["reused"] > 0
    assert counts["prefix"] + counts["reused"] == reordered.spans[0][0] + paragraph_tokens
    assert counts["recomputed"] == counts["reused"]  # ratio 1.0 recomputes every reused token
    assert exact["output_ids"] == generate(stock, reordered, segments=False)["output_ids"]

    sparse = generate(sparsex, orders[2])
    counts = reuse_counts(sparse["meta_info"])
    assert counts["reused"] > 0
    # The default plan recomputes round(0.15 * reused) reused tokens, plus the new tokens.
    assert counts["recomputed"] == round(0.15 * counts["reused"])
    assert counts["computed"] == counts["prompt"] - counts["prefix"] - counts["reused"] + counts["recomputed"]
    after = stats(sparsex)
    assert after["reused_tokens"] - before["reused_tokens"] >= counts["reused"]
    assert after["requests_with_reuse"] - before["requests_with_reuse"] >= 2


def test_frontend_program_reuses_segments(servers: tuple[Server, Server], prompts: list) -> None:
    import sglang as sgl

    from sparsex_sgl import client as sx

    _, sparsex = servers
    example = load_examples(hotpotqa_path(), 1, offset=20)[0]

    @sgl.function
    def rag(s, chunks, question):  # type: ignore[no-untyped-def]
        s += "Answer the question using the documents below.\n\n"
        for chunk in chunks:
            s += sx.segment(chunk)
        s += "Question: " + question + "\nAnswer:" + sgl.gen("answer", max_tokens=8, temperature=0)

    backend = sgl.RuntimeEndpoint(sparsex.url)
    first = rag.run(chunks=list(example.paragraphs[:6]), question=example.question, backend=backend)
    assert first.get_meta_info("answer")["completion_tokens"] > 0  # waits for the first run to finish
    chunks = list(example.paragraphs[:6])
    random.Random(0).shuffle(chunks)
    second = rag.run(chunks=chunks, question=example.question, backend=backend)
    # The second run finds every chunk cached (HotpotQA paragraphs also recur across questions, so the
    # first run may already reuse some): all chunk tokens are prefix or non-prefix hits.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2"))
    chunk_tokens = sum(len(tok.encode(c, add_special_tokens=False)) for c in chunks)
    counts = reuse_counts(second.get_meta_info("answer"))
    assert counts["reused"] > 0 and counts["prefix"] + counts["reused"] >= chunk_tokens, counts

    client = SparseXClient(sparsex.url)
    reply = client.generate(["Answer from the documents.\n\n", *map(Segment, chunks[::-1]), "Question: x\nAnswer:"],
                            {"temperature": 0, "max_new_tokens": 4})
    assert reuse_counts(reply["meta_info"])["reused"] > 0


@pytest.mark.parametrize(
    "custom, message",
    [
        ({"sparsex_spans": "0-5"}, "flat list"),
        ({"sparsex_spans": [[0, 5], [5, 9]]}, "integers"),
        ({"sparsex_spans": [0, 5, 3]}, "even length"),
        ({"sparsex_spans": [10, 20, 15, 30]}, "overlap"),
        ({"sparsex_spans": [0, 5], "sparsex_recompute_ratio": 2}, "[0, 1]"),
    ],
)
def test_malformed_custom_params_get_400(servers: tuple[Server, Server], prompts: list, custom: dict,
                                         message: str) -> None:
    _, sparsex = servers
    params = {"temperature": 0, "max_new_tokens": 2, "custom_params": custom}
    status, reply = sparsex.post("/generate", {"input_ids": list(prompts[0][0].input_ids), "sampling_params": params})
    assert status == 400 and message in str(reply), reply
    assert generate(sparsex, prompts[0][0])["meta_info"]["completion_tokens"] > 0  # still serving


def test_spans_out_of_range_get_400(servers: tuple[Server, Server], prompts: list) -> None:
    """Checked in the tokenizer manager against the tokenized prompt: the scheduler never sees them."""
    _, sparsex = servers
    prompt = prompts[2][0]
    n = len(prompt.input_ids)
    params = {"temperature": 0, "max_new_tokens": NEW_TOKENS, "custom_params": {"sparsex_spans": [0, n + 100]}}
    status, reply = sparsex.post("/generate", {"input_ids": list(prompt.input_ids), "sampling_params": params})
    assert status == 400 and "outside the prompt" in str(reply), reply
    assert generate(sparsex, prompt)["meta_info"]["completion_tokens"] > 0


def test_burst_defers_a_repeated_segment_to_the_next_batch(servers: tuple[Server, Server], prompts: list) -> None:
    """Two orders of one question queue up together behind a running prefill. Batched together, both would
    compute every paragraph (nothing is cached yet); SparseX admits one and defers the other by one batch,
    where it reuses the paragraphs the first one cached. Without the deferral both report 0 reused tokens."""
    _, sparsex = servers
    assert flush_cache(sparsex.url)
    before = stats(sparsex)
    blocker, orders = prompts[4][0], prompts[3]
    replies: dict[int, dict[str, Any]] = {}

    def send(index: int, prompt: SegmentedPrompt, segments: bool) -> None:
        replies[index] = generate(sparsex, prompt, segments=segments)

    # The blocker is a ~1.5k-token prefill without segments (about 3 s on this CPU, measured in the
    # harness); the pair arrives 0.5 s into it and waits in the queue for the next batch.
    threads = [threading.Thread(target=send, args=(0, blocker, False))]
    threads[0].start()
    time.sleep(0.5)
    threads += [threading.Thread(target=send, args=(i + 1, orders[i], True)) for i in range(2)]
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join()
    counts = [reuse_counts(replies[i + 1]["meta_info"]) for i in range(2)]
    later = max(range(2), key=lambda i: counts[i]["reused"])
    assert counts[1 - later]["reused"] == 0
    spans = orders[later].spans
    assert counts[later]["reused"] > 0
    assert counts[later]["prefix"] + counts[later]["reused"] == spans[0][0] + sum(e - s for s, e in spans)
    assert stats(sparsex)["deferred_admissions"] - before["deferred_admissions"] >= 1


def test_next_round_is_a_blended_prefix_hit_and_an_exact_request_replaces_it(
        servers: tuple[Server, Server], prompts: list) -> None:
    """A chat's next round resends the previous prompt plus new tokens. When the previous prompt reused
    segments, its KV after the first reused one is blended: SparseX serves it again as a prefix hit (as
    stock SGLang serves its own exact KV) instead of re-blending it every round. A request that must be
    exact (here: one asking for logprobs) gets only the exact part, equals stock, and its exact KV
    replaces the blended copy, so the next round after it is an exact hit. Without blended caching the
    first next round would re-blend (``reused`` > 0, ``blended_prefix`` 0)."""
    stock, sparsex = servers
    assert flush_cache(sparsex.url)
    first, reordered = prompts[2][0], prompts[2][1]
    generate(sparsex, first)  # caches the paragraphs in one order
    blended = generate(sparsex, reordered)
    assert reuse_counts(blended["meta_info"])["reused"] > 0
    n = len(reordered.input_ids)
    follow_up = tuple(blended["output_ids"]) + first.input_ids[:24]  # the answer and more text, all new
    next_round = SegmentedPrompt(reordered.input_ids + follow_up, reordered.spans, reordered.head_len)

    hit = reuse_counts(generate(sparsex, next_round)["meta_info"])
    exact_part = int(hit["prefix"]) - int(hit["blended_prefix"])
    # The trailing question is cached in 16-token blocks, so at least n - 16 tokens hit, as in
    # test_repeated_request_is_a_prefix_hit; the exact part ends where the first paragraph moved.
    assert int(hit["prefix"]) >= n - 16 and hit["reused"] == 0
    assert int(hit["blended_prefix"]) > 0 and exact_part <= reordered.spans[-1][0]

    payload = {"input_ids": list(next_round.input_ids), "return_logprob": True,
               "sampling_params": {"temperature": 0, "max_new_tokens": NEW_TOKENS,
                                   "custom_params": {"sparsex_spans": flatten_spans(next_round.spans)}}}
    status, exact = sparsex.post("/generate", payload)
    assert status == 200, exact
    counts = reuse_counts(exact["meta_info"])
    assert counts["blended_prefix"] == 0 and int(counts["prefix"]) <= exact_part
    assert exact["output_ids"] == generate(stock, next_round, segments=False)["output_ids"]

    again = reuse_counts(generate(sparsex, next_round)["meta_info"])
    assert int(again["prefix"]) >= n - 16 and again["blended_prefix"] == 0
    assert stats(sparsex)["blended_prefix_tokens"] >= int(hit["blended_prefix"])


def test_reuse_longer_than_four_chunks_runs_chunked_and_exact(servers: tuple[Server, Server], prompts: list) -> None:
    """Reuse runs a request's extend in one step, bounded at 4 prefill chunks (2,048 tokens here): a longer
    one is planned without reuse, chunked as on stock SGLang and exact (counted once, by its reason)."""
    stock, sparsex = servers

    def joined(order: int) -> SegmentedPrompt:
        a, b = prompts[0][order], prompts[1][order]
        shift = len(a.input_ids)
        return SegmentedPrompt(a.input_ids + b.input_ids, a.spans + tuple((s + shift, e + shift) for s, e in b.spans),
                               a.head_len)

    first, second = joined(0), joined(1)
    assert len(second.input_ids) > 2048
    assert flush_cache(sparsex.url)
    generate(sparsex, first)  # caches every paragraph
    before = stats(sparsex)["fallbacks"].get("extend_longer_than_chunks", 0)
    reply = generate(sparsex, second)
    assert reuse_counts(reply["meta_info"])["reused"] == 0
    assert stats(sparsex)["fallbacks"].get("extend_longer_than_chunks", 0) == before + 1
    assert reply["output_ids"] == generate(stock, second, segments=False)["output_ids"]


def test_memory_is_accounted_evicted_and_returned(servers: tuple[Server, Server], prompts: list) -> None:
    _, sparsex = servers
    start = stats(sparsex)
    # A burst of concurrent requests over every question, more tokens than the pool holds.
    errors: list[BaseException] = []

    def send(prompt: SegmentedPrompt) -> None:
        try:
            generate(sparsex, prompt)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(orders[i % 3],)) for i, orders in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    after = stats(sparsex)
    assert after["evicted_tokens"] > start["evicted_tokens"]
    # Idle: every slot is either free or owned by the graph (nothing leaked to finished requests).
    assert after["graph_protected_tokens"] == 0
    assert after["allocator_free"] + after["graph_tokens"] == after["allocator_size"]
    assert generate(sparsex, prompts[0][2])["meta_info"]["completion_tokens"] > 0
    assert flush_cache(sparsex.url)  # refused (400) only while a request is still in the scheduler
    flushed = stats(sparsex)
    assert flushed["graph_tokens"] == 0 and flushed["allocator_free"] == flushed["allocator_size"]


ENGINE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import sglang as sgl

    if __name__ == "__main__":
        ids, spans, flipped, flipped_spans = json.loads(sys.argv[2])
        engine = sgl.Engine(model_path=sys.argv[1], enable_sparsex=True, sparsex_recompute_ratio=0.3,
                            device="cpu", attention_backend="torch_native", sampling_backend="pytorch",
                            disable_cuda_graph=True, skip_server_warmup=True, dtype="float32",
                            mem_fraction_static=0.3, max_total_tokens=4096, log_level="error")
        try:
            out = []
            for prompt, sp in ((ids, spans), (flipped, flipped_spans)):
                r = engine.generate(input_ids=prompt, sampling_params={"temperature": 0, "max_new_tokens": 4,
                                    "custom_params": {"sparsex_spans": sp}})
                out.append(r["meta_info"]["cached_tokens_details"])
            print("RESULT " + json.dumps(out))
        finally:
            engine.shutdown()
    """
)


def test_prometheus_metrics_equal_the_stats_endpoint(servers: tuple[Server, Server], prompts: list) -> None:
    """``--enable-metrics``: SparseX's counters are on SGLang's own ``/metrics`` (parsed with prometheus_client's
    parser, beside SGLang's metrics) and equal ``/sparsex/stats`` once requests have finished."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    _, sparsex = servers
    generate(sparsex, prompts[1][0])
    generate(sparsex, prompts[1][2])  # reuses the paragraphs in another order
    expected = stats(sparsex)
    text = httpx.get(sparsex.url + "/metrics", timeout=60).text
    samples = {(s.name, s.labels.get("reason")): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert any(name.startswith("sglang:") for name, _ in samples)  # SGLang's own metrics are still there
    for key in ("requests", "requests_with_reuse", "prompt_tokens", "reused_tokens", "recomputed_tokens",
                "computed_tokens", "evicted_tokens", "deferred_admissions"):
        assert samples.get((f"sparsex_{key}_total", None), 0.0) == expected[key], key
    assert expected["reused_tokens"] > 0
    for reason, count in expected["fallbacks"].items():
        assert samples[("sparsex_fallbacks_total", reason)] == count
    assert samples[("sparsex_graph_tokens", None)] == expected["graph_tokens"] > 0
    assert samples[("sparsex_graph_nodes", None)] == expected["graph_nodes"]


def test_openai_chat_marks_segments_and_its_next_round_hits_through_the_reply(servers: tuple[Server, Server]) -> None:
    """``/v1/chat/completions`` through the OpenAI SDK: documents listed in ``extra_body.custom_params``
    (``sparsex_segments``) are found in the chat template's ids and reused by a conversation that puts them
    in another order; exact settings give stock SGLang's output; the next round, which resends the
    server's reply, is a prefix hit through the whole first round."""
    from openai import OpenAI

    stock, sparsex = servers
    docs = list(load_examples(hotpotqa_path(), 1, offset=33)[0].paragraphs[:4])

    def chat(server: Server, messages: list[dict[str, str]], order: list[int] | None = None,
             **custom: Any) -> str:
        client = OpenAI(base_url=server.url + "/v1", api_key="none")
        extra = {"custom_params": {"sparsex_segments": [docs[i] for i in order], **custom}} if order else None
        reply = client.chat.completions.create(model=str(resolve_model("smollm2")), messages=messages,  # type: ignore[arg-type]
                                               temperature=0, max_tokens=NEW_TOKENS, extra_body=extra)
        return reply.choices[0].message.content or ""

    def messages_for(order: list[int]) -> list[dict[str, str]]:
        return [{"role": "system", "content": "Answer from the documents."},
                {"role": "user", "content": "".join(docs[i] for i in order) + "Question: what is this about?"}]

    first, reordered = [0, 1, 2, 3], [2, 0, 3, 1]
    assert chat(sparsex, messages_for(first)) == chat(stock, messages_for(first))  # no segment data: stock
    from openai import BadRequestError

    client = OpenAI(base_url=sparsex.url + "/v1", api_key="none")
    for bad in ({"sparsex_segments": ["a text that is not in the prompt at all"]},  # not in the templated ids
                {"sparsex_segments": [docs[0]], "sparsex_spans": [0, 8]}):  # both kinds of segment data
        with pytest.raises(BadRequestError):
            client.chat.completions.create(model=str(resolve_model("smollm2")), messages=messages_for(first),  # type: ignore[arg-type]
                                           max_tokens=2, extra_body={"custom_params": bad})
    chat(sparsex, messages_for(first), first)
    before = stats(sparsex)
    exact = chat(sparsex, messages_for(reordered), reordered, sparsex_recompute_ratio=1.0)
    after = stats(sparsex)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2"))
    doc_tokens = sum(len(tok.encode(d, add_special_tokens=False)) for d in docs)
    # Every document moved; each may lose up to 2 merged edge tokens on each side.
    assert after["reused_tokens"] - before["reused_tokens"] >= doc_tokens - 4 * len(docs)
    assert exact == chat(stock, messages_for(reordered))  # every reused token recomputed: exact
    reply = chat(sparsex, messages_for(reordered), reordered)
    next_round = [*messages_for(reordered), {"role": "assistant", "content": reply},
                  {"role": "user", "content": "And in one word?"}]
    before = stats(sparsex)
    chat(sparsex, next_round, reordered)
    after = stats(sparsex)
    first_round = tok.apply_chat_template(messages_for(reordered), tokenize=True, add_generation_prompt=True)
    first_round_tokens = len(first_round["input_ids"] if hasattr(first_round, "keys") else first_round)
    assert after["prefix_tokens"] - before["prefix_tokens"] >= first_round_tokens - 16


def test_openai_completions_marks_text_segments(servers: tuple[Server, Server]) -> None:
    """``/v1/completions`` through the OpenAI SDK: a text prompt with ``sparsex_segments`` in
    ``extra_body.custom_params`` reuses the documents when they come back in another order; recomputing
    every reused token gives stock SGLang's completion; segment text absent from the prompt is a 400."""
    from openai import BadRequestError, OpenAI
    from transformers import AutoTokenizer

    stock, sparsex = servers
    docs = list(load_examples(hotpotqa_path(), 1, offset=34)[0].paragraphs[:4])
    model = str(resolve_model("smollm2"))

    def prompt_for(order: list[int]) -> str:
        return "Answer from the documents.\n\n" + "".join(docs[i] for i in order) + "Question: what is this about?\nAnswer:"

    def complete(server: Server, order: list[int], segments: bool = True, **custom: Any) -> str:
        client = OpenAI(base_url=server.url + "/v1", api_key="none")
        extra = {"custom_params": {"sparsex_segments": [docs[i] for i in order], **custom}} if segments else None
        reply = client.completions.create(model=model, prompt=prompt_for(order), temperature=0,
                                          max_tokens=NEW_TOKENS, extra_body=extra)
        return reply.choices[0].text

    first, reordered = [0, 1, 2, 3], [3, 1, 0, 2]
    assert complete(sparsex, first, segments=False) == complete(stock, first, segments=False)
    with pytest.raises(BadRequestError):
        OpenAI(base_url=sparsex.url + "/v1", api_key="none").completions.create(
            model=model, prompt=prompt_for(first), max_tokens=2,
            extra_body={"custom_params": {"sparsex_segments": ["a text that is not in the prompt at all"]}})
    complete(sparsex, first)
    before = stats(sparsex)
    exact = complete(sparsex, reordered, sparsex_recompute_ratio=1.0)
    after = stats(sparsex)
    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2"))
    doc_tokens = sum(len(tok.encode(d, add_special_tokens=False)) for d in docs)
    assert after["reused_tokens"] - before["reused_tokens"] >= doc_tokens - 4 * len(docs)
    assert exact == complete(stock, reordered, segments=False)


def test_engine_with_enable_sparsex(prompts: list, tmp_path: Path) -> None:
    import json

    first, second = prompts[3][0], prompts[3][1]
    script = tmp_path / "engine_run.py"
    script.write_text(ENGINE_SCRIPT)
    arg = json.dumps([list(first.input_ids), flatten_spans(first.spans), list(second.input_ids),
                      flatten_spans(second.spans)])
    run = subprocess.run([sys.executable, str(script), str(resolve_model("smollm2")), arg],
                         capture_output=True, text=True, timeout=900, check=False)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    cold, warm = json.loads(lines[0][len("RESULT "):])
    assert cold["sparsex_reused"] == 0
    assert warm["sparsex_reused"] > 0
    assert warm["sparsex_recomputed"] == round(0.3 * warm["sparsex_reused"])  # the Engine kwarg took effect
