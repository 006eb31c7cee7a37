"""Segments below the device pool, on real SGLang 0.5.23 servers on the CPU (SmolLM2-135M, HotpotQA):

- a pool small enough that eviction runs all the time, with a host tier: revisited segments come back from
  it and serve the very rows and tokens a server whose pool never evicts serves; at ratio 1.0 the output
  equals stock SGLang's;
- two servers sharing one ``file`` store: the second reuses what the first computed, with the first's rows and
  tokens; tenants stay apart; a restarted server reuses what was stored before; the same over a real Mooncake
  master with SGLang's ``mooncake`` backend;
- every store fault (missing, truncated, corrupt, foreign and half-written objects, a store that raises, one
  that hangs) injected under a live server: the request is served exact (stock's output), the fault counted,
  and no slot is leaked afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mooncake_master import mooncake_master  # tests/: on sys.path (pytest's rootdir insertion)

from sparsex_sgl.assets import hotpotqa_path, resolve_model
from sparsex_sgl.eval.hotpotqa import SegmentedPrompt, build_prompt, load_examples
from sparsex_sgl.testing import Server, flush_cache, idle_stats, launch, wait_ready

pytestmark = pytest.mark.slow

NEW_TOKENS = 8
TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def questions() -> list[list[SegmentedPrompt]]:
    """Per question its paragraphs in three orders (the first two start with different paragraphs, so the
    second is never a prefix hit on the first); prompts under 1,500 tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2"))
    out = []
    for example in load_examples(hotpotqa_path(), 60):
        orders = [build_prompt(tok, example, seed) for seed in range(3)]
        first = [o.segment_ids(0) for o in orders[:2]]
        if len(orders[0].input_ids) < 1500 and first[0] != first[1]:
            out.append(orders)
    assert len(out) >= 12
    return out


def generate(server: Server, prompt: SegmentedPrompt, segments: bool = True, **custom: Any) -> dict[str, Any]:
    return server.generate(prompt.input_ids, prompt.spans if segments else None, NEW_TOKENS, **custom)


def counts(reply: dict[str, Any]) -> dict[str, Any]:
    details = reply["meta_info"]["cached_tokens_details"]
    return {k: details[f"sparsex_{k}"] for k in ("prefix", "reused", "recomputed", "rows_crc32", "fallback")}


def warm_head(server: Server, prompt: SegmentedPrompt, **custom: Any) -> None:
    """Cache ``prompt``'s instruction head on ``server``, cut as ``prompt`` cuts it (a gap ending where its
    first segment starts), so that a comparison with another server differs only in where segments come from."""
    head = list(prompt.input_ids[: prompt.head_len])
    filler = list(prompt.input_ids[-13:])
    params = {"temperature": 0, "max_new_tokens": 1, "custom_params": {
        "sparsex_spans": [len(head), len(head) + 12], **custom}}
    status, reply = server.post("/generate", {"input_ids": head + filler, "sampling_params": params})
    assert status == 200, reply


def segment_tokens(prompt: SegmentedPrompt) -> int:
    return sum(end - start for start, end in prompt.spans)


def tiers(server: Server) -> dict[str, Any]:
    return dict(idle_stats(server)["tiers"])


def wait_written(server: Server, writes: int, timeout: float = 60) -> None:
    """The store writer runs behind the scheduler: wait until ``writes`` objects are in the store."""
    deadline = time.monotonic() + timeout
    while tiers(server)["store_writes"] < writes:
        assert time.monotonic() < deadline, tiers(server)
        time.sleep(0.2)


def assert_idle_and_flushable(server: Server) -> None:
    stats = idle_stats(server)
    assert stats["tracked_requests"] == 0 and stats["graph_protected_tokens"] == 0
    assert stats["allocator_free"] + stats["graph_tokens"] == stats["allocator_size"]  # no slot leaked
    assert flush_cache(server.url)
    stats = idle_stats(server)
    assert stats["graph_tokens"] == 0 and stats["allocator_free"] == stats["allocator_size"]
    assert stats["tiers"]["host_segments"] == 0


def start(model: Path, logs: Path, name: str, extra: list[str], pool: int, env: dict[str, str] | None = None) -> Server:
    return launch(model, extra, logs / f"{name}.log", pool, env=env)


def store_flags(path: Path, backend: str = "file", **extra: Any) -> list[str]:
    return ["--sparsex-storage-backend", backend, "--sparsex-storage-backend-extra-config",
            json.dumps({"file_storage_path": str(path), **extra})]


@pytest.fixture(scope="module")
def stock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = launch(resolve_model("smollm2"), [], tmp_path_factory.mktemp("stock") / "stock.log", 8192)
    try:
        wait_ready(server)
        yield server
    finally:
        server.stop()


def test_a_small_pool_reloads_evicted_segments_from_the_host_tier_as_if_never_evicted(
        tmp_path: Path, stock: Server, questions: list[list[SegmentedPrompt]]) -> None:
    model = resolve_model("smollm2")
    tiered = start(model, tmp_path, "tiered", ["--enable-sparsex", "--sparsex-host-tier-gb", "1"], 4096)
    unbounded = start(model, tmp_path, "unbounded", ["--enable-sparsex"], 40000)
    try:
        wait_ready(tiered)
        wait_ready(unbounded)
        asked = questions[:8]
        for orders in asked:  # about 10k prompt tokens into a 4,096-token pool: most paragraphs are evicted
            for server in (tiered, unbounded):
                generate(server, orders[0])
        spilled = tiers(tiered)
        assert spilled["spilled_segments"] > 0 and idle_stats(tiered)["evicted_tokens"] > 0
        reused = 0
        for orders in asked:
            got, expected = generate(tiered, orders[1]), generate(unbounded, orders[1])
            assert counts(got) == counts(expected) and got["output_ids"] == expected["output_ids"]
            reused += counts(got)["reused"]
        after = tiers(tiered)
        assert after["host_hits"] > 0 and after["host_hit_tokens"] > 0 and after["loaded_bytes"] > 0
        assert reused >= 0.8 * sum(segment_tokens(orders[1]) for orders in asked)
        for orders in asked[:3]:
            exact = generate(tiered, orders[2], sparsex_recompute_ratio=1.0)
            assert exact["output_ids"] == generate(stock, orders[2], segments=False)["output_ids"]
        assert tiers(tiered)["host_hits"] > after["host_hits"]
        assert not idle_stats(tiered)["fallbacks"].get("internal_error")
        assert_idle_and_flushable(tiered)
    finally:
        tiered.stop()
        unbounded.stop()


def test_instances_sharing_a_file_store_reuse_each_others_segments_across_restarts_and_tenants_stay_apart(
        tmp_path: Path, questions: list[list[SegmentedPrompt]]) -> None:
    model = resolve_model("smollm2")
    flags = ["--enable-sparsex", *store_flags(tmp_path / "store")]
    first, second = start(model, tmp_path, "first", flags, 16384), start(model, tmp_path, "second", flags, 16384)
    restarted = None
    try:
        wait_ready(first)
        wait_ready(second)
        asked = questions[:3]
        for orders in asked:
            generate(first, orders[0], sparsex_namespace="tenant-a")
        wait_written(first, sum(len(orders[0].spans) for orders in asked))

        expected = generate(first, asked[0][1], sparsex_namespace="tenant-a")
        warm_head(second, asked[0][1], sparsex_namespace="tenant-a")
        got = generate(second, asked[0][1], sparsex_namespace="tenant-a")
        assert counts(got)["reused"] == segment_tokens(asked[0][1])  # every paragraph, on its first visit
        assert counts(got) == counts(expected) and got["output_ids"] == expected["output_ids"]
        assert tiers(second)["store_hits"] == len(asked[0][1].spans)

        other = generate(second, asked[1][1], sparsex_namespace="tenant-b")
        assert counts(other)["reused"] == 0 and tiers(second)["store_hits"] == len(asked[0][1].spans)

        second.stop()
        restarted = start(model, tmp_path, "restarted", flags, 16384)
        wait_ready(restarted)
        expected = generate(first, asked[2][1], sparsex_namespace="tenant-a")
        warm_head(restarted, asked[2][1], sparsex_namespace="tenant-a")
        got = generate(restarted, asked[2][1], sparsex_namespace="tenant-a")
        assert counts(got)["reused"] == segment_tokens(asked[2][1])
        assert counts(got) == counts(expected) and got["output_ids"] == expected["output_ids"]
        assert not tiers(restarted)["store_faults"]
    finally:
        for server in (first, second, restarted):
            if server is not None:
                server.stop()


def test_instances_sharing_a_mooncake_store_reuse_each_others_segments_and_tenants_stay_apart(
        tmp_path: Path, questions: list[list[SegmentedPrompt]]) -> None:
    """The same as above on SGLang's ``mooncake`` backend over a real Mooncake master (TCP on 127.0.0.1); each
    server mounts 256 MB of its memory into the store."""
    with mooncake_master(tmp_path / "master.log") as config:
        flags = ["--enable-sparsex", "--sparsex-storage-backend", "mooncake", "--sparsex-storage-backend-extra-config",
                 json.dumps(config | {"global_segment_size": 256 << 20})]
        model = resolve_model("smollm2")
        first, second = start(model, tmp_path, "first", flags, 16384), start(model, tmp_path, "second", flags, 16384)
        try:
            wait_ready(first)
            wait_ready(second)
            orders = questions[3]
            generate(first, orders[0], sparsex_namespace="tenant-a")
            wait_written(first, len(orders[0].spans))
            expected = generate(first, orders[1], sparsex_namespace="tenant-a")
            warm_head(second, orders[1], sparsex_namespace="tenant-a")
            got = generate(second, orders[1], sparsex_namespace="tenant-a")
            assert counts(got)["reused"] == segment_tokens(orders[1])  # every paragraph, on its first visit
            assert counts(got) == counts(expected) and got["output_ids"] == expected["output_ids"]
            assert tiers(second)["store_hits"] == len(orders[1].spans) and not tiers(second)["store_faults"]
            other = generate(second, questions[4][1], sparsex_namespace="tenant-b")
            assert counts(other)["reused"] == 0
            assert_idle_and_flushable(second)
        finally:
            first.stop()
            second.stop()


def new_objects(store: Path, before: set[Path]) -> list[Path]:
    """Objects written since ``before``, in the order they were written (a request's paragraphs, in order)."""
    return sorted(set(store.glob("*.bin")) - before, key=lambda path: path.stat().st_mtime_ns)


def damage(written: list[Path], fault: str, donors: list[Path]) -> None:
    """Damage every object in ``written`` as ``fault`` says; a foreign object is ``donors``' (the same
    paragraphs, stored by another tenant) put under this tenant's keys."""
    assert written
    for path, donor in zip(written, donors or written):
        data = path.read_bytes()
        if fault == "missing":
            path.unlink()
        elif fault == "truncated":
            path.write_bytes(data[: len(data) // 3])
        elif fault == "corrupt":
            path.write_bytes(data[:500] + bytes([data[500] ^ 0x40]) + data[501:])
        elif fault == "half-written":
            path.write_bytes(data[: len(data) // 2] + bytes(len(data) - len(data) // 2))
        elif fault == "foreign":
            shutil.copyfile(donor, path)


FAULTS = {  # what a damaged store answers, and the reason counted for it
    "missing": None, "truncated": "unreadable", "corrupt": "corrupt", "half-written": "corrupt",
    "foreign": "foreign", "raise": "error", "hang": "timeout",
}


def test_every_store_fault_under_a_live_server_is_recomputed_exactly_and_counted(
        tmp_path: Path, stock: Server, questions: list[list[SegmentedPrompt]]) -> None:
    store = tmp_path / "store"
    store.mkdir()
    dynamic = {"backend_name": "faulty", "module_path": "faulty_store", "class_name": "FaultyFileStore"}
    env = {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    server = start(resolve_model("smollm2"), tmp_path, "faulty",
                   ["--enable-sparsex", *store_flags(store, "dynamic", **dynamic), "--sparsex-storage-timeout", "1"],
                   8192, env=env)
    try:
        wait_ready(server)
        expected_faults: dict[str, int] = {}
        writes = 0
        for (fault, reason), orders in zip(FAULTS.items(), questions[-len(FAULTS):]):
            donors: list[Path] = []
            if fault == "foreign":
                before = set(store.glob("*.bin"))
                generate(server, orders[0], sparsex_namespace="another-tenant")
                writes += len(orders[0].spans)
                wait_written(server, writes)
                donors = new_objects(store, before)
            before = set(store.glob("*.bin"))
            generate(server, orders[0])
            writes += len(orders[0].spans)
            wait_written(server, writes)
            assert flush_cache(server.url)  # the pool forgets it: only the store has the paragraphs now
            if fault in ("raise", "hang"):
                (store / "FAULT").write_text(fault)
            else:
                damage(new_objects(store, before), fault, donors)
            started = time.monotonic()
            got = generate(server, orders[1])
            (store / "FAULT").write_text("")
            assert counts(got)["reused"] == 0, fault
            assert got["output_ids"] == generate(stock, orders[1], segments=False)["output_ids"], fault
            writes += len(orders[1].spans)  # recomputed exactly, so written again (skipped where an object is)
            if fault == "hang":  # two reads time out (one per reader thread), the rest are refused at once
                assert time.monotonic() - started < 2 * 1 + 30
                expected_faults["timeout"] = 2
                expected_faults["busy"] = len(orders[1].spans) - 2
            elif reason is not None:
                expected_faults[reason] = expected_faults.get(reason, 0) + len(orders[1].spans)
            assert tiers(server)["store_faults"] == expected_faults, fault
        final = idle_stats(server)
        assert not final["fallbacks"].get("internal_error")
        assert_idle_and_flushable(server)
        healthy = questions[0]  # the store works again for a segment never damaged
        generate(server, healthy[0])
        wait_written(server, writes + len(healthy[0].spans))
        assert flush_cache(server.url)
        assert counts(generate(server, healthy[1]))["reused"] == segment_tokens(healthy[1])
    finally:
        server.stop()


def test_prewarm_endpoint_and_cli_store_a_corpus_and_refuse_bad_calls_whole(
        tmp_path: Path, questions: list[list[SegmentedPrompt]]) -> None:
    import subprocess
    import sys

    store = tmp_path / "store"
    server = start(resolve_model("smollm2"), tmp_path, "prewarm", ["--enable-sparsex", *store_flags(store)], 16384)
    try:
        wait_ready(server)
        good = [list(questions[0][0].segment_ids(i)) for i in range(3)]
        bad_calls: list[Any] = [
            [1, 2], {"segments": []}, {"segments": "text"}, {"segments": good, "bogus": 1},
            {"segments": [*good, [1, 2, 3]]},  # a segment too short to cache, after three good ones
            {"segments": [*good, [10**9] * 20]}, {"segments": [*good, {"text": "x"}]},
            {"segments": good, "sink_prefix": 5}, {"segments": good, "namespace": ["a"]},
            {"segments": [[5] * 20] * 257}, {"segments": [[5] * 9000]},
        ]
        before = idle_stats(server)  # (SGLang's /health check may have cached a token or two)
        for body in bad_calls:
            status, reply = server.post("/sparsex/prewarm", body)
            assert status == 400 and "error" in reply, (body if len(str(body)) < 200 else "...", reply)
        response = __import__("httpx").post(server.url + "/sparsex/prewarm", content=b"{not json", timeout=60)
        assert response.status_code == 400
        stats = idle_stats(server)
        assert (stats["requests"], stats["graph_tokens"]) == (before["requests"], before["graph_tokens"])
        assert not list(store.glob("*.bin"))  # nothing computed, nothing stored

        corpus = tmp_path / "corpus.jsonl"
        paragraphs = [orders[0].segment_ids(i) for orders in questions[:2] for i in range(len(orders[0].spans))]
        lines = [json.dumps({"input_ids": list(p)}) for p in paragraphs]
        lines[7] = json.dumps({"input_ids": [1, 2]})  # a bad segment: the run stops at its call
        corpus.write_text("\n".join(lines) + "\n")
        command = [sys.executable, "-m", "sparsex_sgl.cli", "prewarm", str(corpus), "--url", server.url, "--batch", "4"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
        assert done.returncode != 0 and "segments 4..7: 400" in done.stderr, done.stderr[-2000:]
        assert json.loads((tmp_path / "corpus.jsonl.prewarm").read_text()) == {"done": 4}
        lines[7] = json.dumps({"input_ids": list(paragraphs[7])})
        corpus.write_text("\n".join(lines) + "\n")
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        assert idle_stats(server)["requests"] == before["requests"] + len(paragraphs)  # resumed: no call sent twice
        wait_written(server, len(paragraphs))

        for use_store in (False, True):  # from the pool, then (flushed) from the store
            if use_store:
                assert flush_cache(server.url)
            for orders in questions[:2]:
                assert counts(generate(server, orders[1]))["reused"] == segment_tokens(orders[1])
        assert tiers(server)["store_hits"] == sum(len(orders[1].spans) for orders in questions[:2])
    finally:
        server.stop()
