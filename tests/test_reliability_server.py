"""A shared ``--enable-sparsex`` server under careless and hostile clients (issue 15), on the CPU.

One server for the module (SmolLM2, a 3,072-token pool so eviction runs, ``--schedule-policy dfs-weight``,
``--sparsex-hide-counts``). After every bad request the server must still serve; isolation is checked
with SGLang's own ``cached_tokens`` and the scheduler's reuse counters, which the client cannot hide
from a test; and once idle, every KV slot is free or cached and no per-request state is left behind.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsex_sgl.assets import hotpotqa_path, resolve_model
from sparsex_sgl.core.protocol import MARKER_BEGIN, MARKER_END, flatten_spans
from sparsex_sgl.eval.hotpotqa import SegmentedPrompt, build_prompt, load_examples
from sparsex_sgl.testing import Server, flush_cache, idle_stats, launch, wait_ready

pytestmark = pytest.mark.slow

POOL = 3072


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("reliability") / "sparsex.log"
    flags = ["--enable-sparsex", "--sparsex-hide-counts", "--schedule-policy", "dfs-weight",
             "--max-running-requests", "4"]
    srv = launch(resolve_model("smollm2"), flags, log, POOL)
    try:
        wait_ready(srv)
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def tok() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model("smollm2"))


@pytest.fixture(scope="module")
def prompts(tok: Any) -> list[tuple[SegmentedPrompt, SegmentedPrompt]]:
    """Short HotpotQA prompts (four paragraphs), each in two paragraph orders."""
    out = []
    for example in load_examples(hotpotqa_path(), 40, offset=100):
        example = type(example)(**{**example.__dict__, "paragraphs": example.paragraphs[:4]})
        pair = (build_prompt(tok, example, 0), build_prompt(tok, example, 1))
        if len(pair[0].input_ids) < 700 and pair[0].spans != pair[1].spans:
            out.append(pair)
    assert len(out) >= 6
    return out


stats = idle_stats


def post(server: Server, prompt: SegmentedPrompt | None = None, *, spans: bool = True, text: str | None = None,
         custom: dict[str, Any] | None = None, **top: Any) -> tuple[int, Any]:
    params: dict[str, Any] = {"temperature": 0, "max_new_tokens": 2}
    custom = dict(custom or {})
    if prompt is not None and spans:
        custom["sparsex_spans"] = flatten_spans(prompt.spans)
    if custom:
        params["custom_params"] = custom
    body: dict[str, Any] = {"sampling_params": params, **top}
    if text is not None:
        body["text"] = text
    elif prompt is not None:
        body["input_ids"] = list(prompt.input_ids)
    return server.post("/generate", body)


def alive(server: Server) -> None:
    status, reply = server.post("/generate", {"text": "The capital of France is", "sampling_params": {"max_new_tokens": 1}})
    assert status == 200 and reply["meta_info"]["completion_tokens"] == 1, reply


def idle_and_whole(server: Server) -> dict[str, Any]:
    """Wait until the scheduler is idle, then check that no slot, lock or request state leaked."""
    deadline = time.monotonic() + 60
    while True:
        s = stats(server)
        if (s["tracked_requests"] == 0 and s["graph_protected_tokens"] == 0
                and s["allocator_free"] + s["graph_tokens"] == s["allocator_size"]) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert s["tracked_requests"] == 0, s
    assert s["graph_protected_tokens"] == 0, s
    assert s["allocator_free"] + s["graph_tokens"] == s["allocator_size"], s
    return s


# ----------------------------------------------------------------------------------------------- bad input
HUGE = [0.5] * 100_000


@pytest.mark.parametrize("body, reason", [
    ({"text": ""}, "empty"),
    ({"input_ids": []}, "empty"),
    ({"input_ids": [1, 2, 10**9]}, "vocabulary"),
    ({"input_ids": [5, -3, 7]}, "vocabulary"),
    ({"text": "hi", "sampling_params": {"custom_params": "sparsex"}}, "object"),
    ({"text": "hi", "sampling_params": {"custom_params": [1, 2]}}, "object"),
    ({"input_ids": [5, 6, 7], "sampling_params": {"custom_params": ""}}, "object"),
    ({"input_ids": [5, 6, 7], "sampling_params": {"custom_params": False}}, "object"),
    ({"input_ids": [5, 6, 7], "sampling_params": {"custom_params": {"tool": [[1, 2]]}}}, "custom_params"),
    ({"input_ids": [5, 6, 7], "sampling_params": {"custom_params": {"tool": {"a": {"b": 1}}}}}, "custom_params"),
    ({"input_ids": [5, 6, 7], "sampling_params": {"custom_params": {"sparsex_spans": HUGE}}}, "integers"),
    ({"input_ids": [5, 6, 7, 8], "sampling_params": {"custom_params": {"sparsex_spans": [0, 9]}}}, "outside"),
    ({"text": "a b", "sampling_params": {"custom_params": {"sparsex_recompute_ratio": HUGE}}}, "[0, 1]"),
])
def test_bad_requests_get_a_short_400_and_the_server_keeps_serving(server: Server, body: dict, reason: str) -> None:
    """Each of these stopped the scheduler or answered 500 / a 500 KB echo before (issue 15)."""
    body = {"sampling_params": {}, **body}
    body["sampling_params"] = {"max_new_tokens": 1, **body["sampling_params"]}
    status, reply = server.post("/generate", body)
    assert status == 400 and reason in str(reply), (status, str(reply)[:300])
    assert len(json.dumps(reply)) < 1000
    alive(server)


def test_markers_in_text_are_served_as_sent_unless_the_request_asks(server: Server, tok: Any) -> None:
    quote = "the user typed this sentence into a chat box, markers and all"
    text = f"Quote: {MARKER_BEGIN}{quote}{MARKER_END} and more text after it."
    before = stats(server)
    status, reply = post(server, text=text)
    assert status == 200 and reply["meta_info"]["prompt_tokens"] == len(tok.encode(text))  # markers kept
    assert stats(server)["requests_with_segments"] == before["requests_with_segments"]
    status, reply = post(server, text=text, custom={"sparsex_markers": True})
    assert status == 200 and reply["meta_info"]["prompt_tokens"] < len(tok.encode(text))  # markers removed
    assert stats(server)["requests_with_segments"] == before["requests_with_segments"] + 1
    short = text.replace(quote, "too short")  # under --sparsex-min-segment-tokens (8): served as gap text
    assert post(server, text=short, custom={"sparsex_markers": True})[0] == 200
    assert stats(server)["requests_with_segments"] == before["requests_with_segments"] + 1


def test_reuse_counts_can_be_hidden_from_clients(server: Server, prompts: list) -> None:
    first, second = prompts[0]
    assert post(server, first)[0] == 200
    before = stats(server)["reused_tokens"]
    status, reply = post(server, second)
    assert status == 200 and stats(server)["reused_tokens"] > before  # it reused...
    details = reply["meta_info"].get("cached_tokens_details") or {}
    assert not any(k.startswith("sparsex_") for k in details), details  # ...and the client cannot tell


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(data=st.data())
def test_fuzzed_requests_get_a_reply_or_a_400_and_never_stop_the_server(server: Server, data: st.DataObject) -> None:
    scalar = st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=False) | st.text(max_size=8)
    value = scalar | st.lists(scalar, max_size=6) | st.lists(st.lists(st.integers(0, 40), max_size=3), max_size=3) \
        | st.dictionaries(st.text(max_size=4), scalar, max_size=3)
    key = st.sampled_from(["sparsex_spans", "sparsex_segments", "sparsex_namespace", "sparsex_recompute_ratio",
                           "sparsex_approximate_logprobs", "sparsex_markers", "other"])
    custom = st.none() | st.dictionaries(key, value, max_size=4) | scalar
    word = st.sampled_from(["alpha", " beta", " gamma", MARKER_BEGIN, MARKER_END, " \u00e9t\u00e9", "\n", "  "])
    text = st.lists(word, max_size=20).map("".join)
    ids = st.lists(st.integers(-2, 49_200), max_size=40)
    body: dict[str, Any] = {"sampling_params": {"max_new_tokens": 1, "custom_params": data.draw(custom)}}
    if data.draw(st.booleans()):
        body["text"] = data.draw(text)
    else:
        body["input_ids"] = data.draw(ids)
    status, reply = server.post("/generate", body, timeout=120)
    assert status in (200, 400), (status, body, reply)
    if status == 400:
        assert len(json.dumps(reply)) < 1000
    alive(server)


# ----------------------------------------------------------------------------------------------- isolation
SALT = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"  # a sha256 hex, as tenants use
LONG = "tenant-" + "x" * 70


@pytest.mark.parametrize("first, second, shared", [
    ({}, {}, True),
    ({"custom": {"sparsex_namespace": "a"}}, {"custom": {"sparsex_namespace": "a"}}, True),
    ({"custom": {"sparsex_namespace": "a"}}, {}, False),
    ({"custom": {"sparsex_namespace": "a"}}, {"custom": {"sparsex_namespace": "b"}}, False),
    ({"custom": {"sparsex_namespace": LONG + "1"}}, {"custom": {"sparsex_namespace": LONG + "2"}}, False),
    ({"cache_salt": SALT, "custom": {"sparsex_namespace": "a"}},
     {"cache_salt": SALT, "custom": {"sparsex_namespace": "b"}}, False),
    ({"cache_salt": "s|t"}, {"cache_salt": "s", "custom": {"sparsex_namespace": "t|"}}, False),
    ({"cache_salt": SALT}, {"cache_salt": SALT[:-1] + "9"}, False),
    ({"cache_salt": SALT}, {"cache_salt": SALT}, True),
    ({"extra_key": "k1"}, {"extra_key": "k2"}, False),
])
@pytest.mark.parametrize("spans", [True, False], ids=["segments", "plain"])
def test_tenants_share_kv_only_under_equal_isolation_fields(server: Server, prompts: list, first: dict,
                                                            second: dict, shared: bool, spans: bool) -> None:
    """SGLang keys its radix tree on ``(extra_key, cache_salt)``; we key on those and the namespace. The
    second request resends the first's prompt (a prefix hit) or, with segments, reorders it (reuse)."""
    assert flush_cache(server.url)
    one, other = prompts[1]
    assert post(server, one, spans=spans, **first)[0] == 200
    before = stats(server)
    status, reply = post(server, other if spans else one, spans=spans, **second)
    assert status == 200
    after = stats(server)
    took = reply["meta_info"]["cached_tokens"] + after["reused_tokens"] - before["reused_tokens"]
    assert (took > 0) == shared, (took, reply["meta_info"])


def test_namespace_holds_on_exact_fallbacks(server: Server, prompts: list) -> None:
    """A request that must run exact (prompt logprobs) still caches under its own namespace."""
    assert flush_cache(server.url)
    one, _ = prompts[2]
    status, _ = post(server, one, custom={"sparsex_namespace": "tenant-a"}, return_logprob=True, logprob_start_len=0)
    assert status == 200
    status, reply = post(server, one, spans=False)
    assert status == 200 and reply["meta_info"]["cached_tokens"] == 0
    status, reply = post(server, one, spans=False, custom={"sparsex_namespace": "tenant-a"})
    assert status == 200 and reply["meta_info"]["cached_tokens"] > 0


def test_exact_requests_never_take_a_blended_prefix(server: Server, prompts: list) -> None:
    """After a reordered request cached its prompt blended, resending it at ratio 1.0 (exact) may use only
    the exact part of that cached path."""
    assert flush_cache(server.url)
    one, other = prompts[3]
    assert post(server, one)[0] == 200
    assert post(server, other)[0] == 200  # reuses one's paragraphs: cached blended after its first reuse
    before = stats(server)
    assert post(server, other)[0] == 200
    middle = stats(server)
    assert middle["blended_prefix_tokens"] > before["blended_prefix_tokens"]  # the resend takes it...
    assert post(server, other, custom={"sparsex_recompute_ratio": 1.0})[0] == 200
    assert stats(server)["blended_prefix_tokens"] == middle["blended_prefix_tokens"]  # ...an exact one does not


# ----------------------------------------------------------------------------------------------- aborts and leaks
def test_aborts_and_disconnects_leak_nothing(server: Server, prompts: list) -> None:
    """Requests aborted while queued (``/abort_request``), and clients that hang up before the first token
    and in the middle of decoding, with segments and without; then the pool identity, and a flush that
    returns every slot."""
    long_body = {"input_ids": list(prompts[4][0].input_ids) * 3,
                 "sampling_params": {"max_new_tokens": 48, "ignore_eos": True}}
    queued = [{"rid": f"queued-{i}", "input_ids": list(prompts[i % 4][i % 2].input_ids),
               "sampling_params": {"max_new_tokens": 8, "custom_params": {
                   "sparsex_spans": flatten_spans(prompts[i % 4][i % 2].spans)}}} for i in range(6)]
    workers = [threading.Thread(target=server.post, args=("/generate", long_body)) for _ in range(4)]
    workers += [threading.Thread(target=server.post, args=("/generate", body)) for body in queued]
    for w in workers:
        w.start()
        time.sleep(0.05)
    for body in queued:  # the four long requests fill --max-running-requests: these wait in the queue
        server.post("/abort_request", {"rid": body["rid"]})
    for chunks in (0, 1, 5):
        server.hang_up_after(long_body, chunks)
        server.hang_up_after({**queued[0], "rid": None}, chunks)
    for w in workers:
        w.join()
    idle_and_whole(server)
    alive(server)
    assert flush_cache(server.url)
    s = idle_and_whole(server)
    assert s["graph_tokens"] == 0 and s["allocator_free"] == s["allocator_size"]


def test_a_burst_over_the_pool_is_served_whole(server: Server, prompts: list) -> None:
    """More concurrent requests than the pool holds, under dfs-weight ordering (which dropped queued
    requests before): every one is answered, eviction ran, nothing leaked."""
    before = stats(server)
    results: list[int] = []

    def send(prompt: SegmentedPrompt) -> None:
        results.append(post(server, prompt)[0])

    threads = [threading.Thread(target=send, args=(pair[i % 2],)) for i, pair in enumerate(prompts * 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * len(threads)
    assert stats(server)["evicted_tokens"] > before["evicted_tokens"]
    idle_and_whole(server)


def test_retraction_loses_nothing(prompts: list, tmp_path: Any) -> None:
    """Decode requests retracted and re-queued (SGLang's own retraction test switch, ``SGLANG_TEST_RETRACT``:
    every third step retracts as if the pool were full), which SparseX then plans again: every request is
    answered in full, and the idle pool is whole."""
    small = launch(resolve_model("smollm2"), ["--enable-sparsex"], tmp_path / "retract.log", POOL,
                   env={"SGLANG_TEST_RETRACT": "1"})
    try:
        wait_ready(small)
        results: list[tuple[int, Any]] = []
        bodies = [{"input_ids": list(p.input_ids), "sampling_params": {
            "temperature": 0, "max_new_tokens": 24, "ignore_eos": True,
            "custom_params": {"sparsex_spans": flatten_spans(p.spans)}}} for p in (*prompts[5], prompts[4][0])]
        threads = [threading.Thread(target=lambda b=b: results.append(small.post("/generate", b, timeout=300)))
                   for b in bodies]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [status for status, _ in results] == [200] * len(bodies), results
        assert all(reply["meta_info"]["completion_tokens"] == 24 for _, reply in results)
        assert "Testing retraction. #retracted_reqs: 1" in small.log.read_text()  # the case under test happened
        idle_and_whole(small)
    finally:
        small.stop()
