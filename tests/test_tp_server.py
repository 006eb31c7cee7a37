"""Tensor parallelism on the CPU (``--tp 2 --device cpu``), real SGLang 0.5.23 servers on a tiny Qwen2 (4 query
and 2 KV heads: one KV head per rank).

- Stock SGLang dies at start-up with ``--tp 2`` on the CPU (a PyNccl communicator on a CPU device); with the
  plugin's CPU shim a two-rank server computes what a one-rank server computes: prompt logprobs within 1e-4
  (float32, another summation order across the two head shards) and the same greedy tokens.
- A two-rank SparseX server picks the rows a one-rank SparseX server picks on the same requests
  (``sparsex_rows_crc32``; the ranks reduce their signals before ranking, so the score is the one-rank score
  up to summation order, and ties go to the earlier token on both), with the same tokens and prompt
  logprobs within the same 1e-4; at ratio 1.0, and for requests without segment data, it gives stock TP-2's
  tokens.
- A fault on rank 1 only (in the match, the plan, the signals, a sparse layer, a store read) gives the same
  fallback on both ranks (``/sparsex/stats`` lists each rank), the exact answer (stock TP-2's tokens), and
  the server goes on reusing.
"""

from __future__ import annotations

import json
import os
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from conftest import tiny_model
from prometheus_client.parser import text_string_to_metric_families

from sparsex_sgl.client import reuse_counts
from sparsex_sgl.testing import Server, flush_cache, launch, wait_ready

pytestmark = pytest.mark.slow

TESTS = Path(__file__).parent
TP2_ENV = {"SGLANG_CPU_OMP_THREADS_BIND": "0|1"}

SITECUSTOMIZE = '''
import os
from pathlib import Path

control = os.environ.get("SPARSEX_TEST_FAULTS")
if control:
    import torch.distributed as dist

    from sparsex_sgl.core import graph, sparse_extend

    def armed(name):
        """A one-shot fault: the file ``name`` in the control folder arms it, on rank 1 only."""
        path = Path(control) / name
        if not (dist.is_initialized() and dist.get_rank() == 1 and path.exists()):
            return False
        path.unlink()
        return True

    def wrap(owner, attr, name, is_classmethod=False):
        real = getattr(owner, attr).__func__ if is_classmethod else getattr(owner, attr)

        def faulty(*args, **kwargs):
            if armed(name):
                raise RuntimeError(f"injected fault on rank 1: {name}")
            return real(*args, **kwargs)

        setattr(owner, attr, classmethod(faulty) if is_classmethod else faulty)

    wrap(graph.SegmentGraph, "lookup", "match")
    wrap(sparse_extend.SparseExtendPlan, "build", "plan", is_classmethod=True)
    wrap(sparse_extend.SparseExtendPlan, "deviation", "signals")
    wrap(sparse_extend.SparseExtendPlan, "run", "layer")
'''


def rag_prompt(seed: int, order: tuple[int, ...]) -> tuple[list[int], list[tuple[int, int]]]:
    """A 20-token head, three 40-token segments (in ``order``) and a 10-token question; one corpus per seed."""
    gen = torch.Generator().manual_seed(seed)
    head, question = torch.randint(1, 256, (20,), generator=gen).tolist(), torch.randint(1, 256, (10,), generator=gen)
    segments = [torch.randint(1, 256, (40,), generator=gen).tolist() for _ in range(3)]
    ids, spans = list(head), []
    for i in order:
        spans.append((len(ids), len(ids) + 40))
        ids += segments[i]
    return ids + question.tolist(), spans


def generate(server: Server, ids: list[int], spans: list[tuple[int, int]] | None, **custom: Any) -> dict[str, Any]:
    """Greedy, 6 tokens. With segment data: the top-5 logprobs of each output token (prompt logprobs would
    need exact prefill, so the client accepts approximate ones); without: the prompt's logprobs too."""
    params: dict[str, Any] = {"temperature": 0, "max_new_tokens": 6}
    body: dict[str, Any] = {"input_ids": ids, "return_logprob": True, "sampling_params": params}
    if spans is None:
        body["logprob_start_len"] = 0
    else:
        body["top_logprobs_num"] = 5
        params["custom_params"] = {"sparsex_spans": [x for span in spans for x in span],
                                   "sparsex_approximate_logprobs": True, **custom}
    status, reply = server.post("/generate", body)
    assert status == 200, reply
    return dict(reply)


def logprobs(reply: dict[str, Any]) -> torch.Tensor:
    """The prompt's logprobs (a reply without segment data), else each output token's top 5."""
    meta = reply["meta_info"]
    if meta.get("output_top_logprobs"):
        return torch.tensor([[p[0] for p in top] for top in meta["output_top_logprobs"]])
    return torch.tensor([p[0] for p in meta["input_token_logprobs"][1:]])


def wait_written(server: Server, at_least: int) -> None:
    """Until every rank's store writer has written ``at_least`` objects (it writes behind the scheduler)."""
    deadline = time.monotonic() + 60
    while min(r["tiers"]["store_writes"] for r in ranks(server)) < at_least:
        assert time.monotonic() < deadline, ranks(server)
        time.sleep(0.2)


def ranks(server: Server) -> list[dict[str, Any]]:
    stats = server.get("/sparsex/stats")["schedulers"][0]
    assert [r["tp_rank"] for r in stats["ranks"]] == [0, 1]
    return list(stats["ranks"])


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Stock TP 1 and TP 2, SparseX TP 1, and SparseX TP 2 over a faulty file store with rank-1 faults."""
    root = tmp_path_factory.mktemp("tp")
    model = tiny_model("qwen2")
    model.generation_config.pad_token_id = 0
    model.save_pretrained(root / "model")
    (root / "site").mkdir()
    (root / "site" / "sitecustomize.py").write_text(textwrap.dedent(SITECUSTOMIZE))
    (root / "faults").mkdir()
    (root / "store").mkdir()
    store = {"file_storage_path": str(root / "store"), "backend_name": "faulty", "module_path": "faulty_store",
             "class_name": "FaultyFileStore"}
    path = os.pathsep.join([str(root / "site"), str(TESTS), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    flags = ["--skip-tokenizer-init"]
    sparsex = [*flags, "--enable-sparsex", "--sparsex-recompute-ratio", "0.15"]
    tp2 = ["--tp", "2"]
    started = {
        "stock1": launch(root / "model", flags, root / "stock1.log", 4096),
        "stock2": launch(root / "model", [*flags, *tp2], root / "stock2.log", 4096, env=TP2_ENV),
        "sparsex1": launch(root / "model", sparsex, root / "sparsex1.log", 4096),
        "sparsex2": launch(root / "model", [*sparsex, *tp2, "--enable-metrics", "--sparsex-storage-backend", "dynamic",
                                            "--sparsex-storage-backend-extra-config", json.dumps(store),
                                            "--sparsex-storage-timeout", "2"], root / "sparsex2.log", 4096,
                           env={**TP2_ENV, "PYTHONPATH": path, "SPARSEX_TEST_FAULTS": str(root / "faults")}),
    }
    try:
        for server in started.values():
            wait_ready(server)
        yield {**started, "faults": root / "faults", "store": root / "store"}
    finally:
        for server in started.values():
            server.stop()


def test_a_two_rank_cpu_server_computes_what_a_one_rank_server_computes(servers: dict[str, Any]) -> None:
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        ids = torch.randint(1, 256, (60,), generator=gen).tolist()
        replies = [generate(servers[name], ids, None) for name in ("stock1", "stock2")]
        assert torch.allclose(logprobs(replies[0]), logprobs(replies[1]), atol=1e-4, rtol=0)
        assert replies[0]["output_ids"] == replies[1]["output_ids"]


def test_two_ranks_pick_the_rows_one_rank_picks_and_agree_with_stock_at_ratio_one(servers: dict[str, Any]) -> None:
    one, two, stock = servers["sparsex1"], servers["sparsex2"], servers["stock2"]
    orders = [(0, 1, 2), (2, 0, 1), (1, 2, 0), (2, 1, 0)]
    sparse_rows = 0
    for seed in (11, 12):
        for order in orders:
            ids, spans = rag_prompt(seed, order)
            replies = [generate(server, ids, spans) for server in (one, two)]
            counts = [reuse_counts(r["meta_info"]) for r in replies]
            assert counts[0] == counts[1], (seed, order)  # reused, recomputed, rows_crc32, ... all equal
            assert replies[0]["output_ids"] == replies[1]["output_ids"], (seed, order)
            assert torch.allclose(logprobs(replies[0]), logprobs(replies[1]), atol=1e-4, rtol=0), (seed, order)
            sparse_rows += int(counts[1]["rows_crc32"] != 0)
        plain = torch.randint(1, 256, (50,), generator=torch.Generator().manual_seed(seed)).tolist()
        assert generate(two, plain, None)["output_ids"] == generate(stock, plain, None)["output_ids"]
    assert sparse_rows >= 6  # the orders after each corpus's first reuse segments sparsely
    generate(two, *rag_prompt(13, (0, 1, 2)))  # a corpus cached exactly (no blended prefix to cut back to)
    ids, spans = rag_prompt(13, (2, 0, 1))
    exact = generate(two, ids, spans, sparsex_recompute_ratio=1.0)
    counts = reuse_counts(exact["meta_info"])
    assert counts["reused"] == counts["recomputed"] == 120, counts
    assert exact["output_ids"] == generate(stock, ids, None)["output_ids"]
    per_rank = ranks(two)
    assert per_rank[0]["reused_tokens"] == per_rank[1]["reused_tokens"] > 0
    assert per_rank[0]["sparse_batches"] == per_rank[1]["sparse_batches"] > 0
    # /metrics counts each request once (rank 0's counters), and sums what each rank writes to the store.
    text = httpx.get(two.url + "/metrics", timeout=60).text
    samples = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}
    for key in ("requests", "reused_tokens", "recomputed_tokens"):
        assert samples[f"sparsex_{key}_total"] == per_rank[0][key], key
    writes = [r["tiers"]["store_writes"] for r in per_rank]  # the metric is synced at releases, writes lag them
    assert writes[0] < samples["sparsex_tier_store_writes_total"] <= sum(writes), (samples, writes)


FAULTS = {"match": "internal_error", "plan": "sparse_forward_error", "signals": "sparse_forward_error",
          "layer": "sparse_forward_error"}


def test_a_fault_on_rank_one_only_is_the_same_exact_fallback_on_both_ranks(servers: dict[str, Any]) -> None:
    two, stock, faults, store = servers["sparsex2"], servers["stock2"], servers["faults"], servers["store"]
    expected: dict[str, int] = dict(ranks(two)[0]["fallbacks"])
    for seed, (fault, reason) in enumerate(FAULTS.items(), start=21):
        generate(two, *rag_prompt(seed, (0, 1, 2)))  # caches the corpus
        ids, spans = rag_prompt(seed, (2, 0, 1))
        (faults / fault).touch()
        got = generate(two, ids, spans)
        assert not (faults / fault).exists(), fault  # rank 1 met it
        assert got["output_ids"] == generate(stock, ids, None)["output_ids"], fault
        assert int(reuse_counts(got["meta_info"]).get("reused", 0)) == 0, fault
        expected[reason] = expected.get(reason, 0) + 1
        per_rank = ranks(two)
        assert per_rank[0]["fallbacks"] == per_rank[1]["fallbacks"] == expected, fault
        again = generate(two, *rag_prompt(seed, (1, 2, 0)))  # and the server goes on reusing
        assert int(reuse_counts(again["meta_info"])["reused"]) > 0, fault
    # A store read failing on rank 1 only: neither rank uses the segment, both recompute it exactly.
    written = min(r["tiers"]["store_writes"] for r in ranks(two))
    generate(two, *rag_prompt(31, (0, 1, 2)))
    wait_written(two, written + 3)
    assert flush_cache(two.url)  # the pools forget the corpus: only the store holds it
    (store / "FAULT").write_text("raise@1")
    ids, spans = rag_prompt(31, (2, 1, 0))
    got = generate(two, ids, spans)
    (store / "FAULT").write_text("")
    assert int(reuse_counts(got["meta_info"])["loaded"]) == 0
    assert got["output_ids"] == generate(stock, ids, None)["output_ids"]
    per_rank = ranks(two)
    assert per_rank[1]["tiers"]["store_faults"].get("error", 0) >= 1
    assert per_rank[0]["tiers"]["store_faults"].get("other_rank", 0) >= 1
    assert per_rank[0]["tiers"]["store_hits"] == per_rank[1]["tiers"]["store_hits"]
    assert flush_cache(two.url)
    healthy = generate(two, *rag_prompt(31, (1, 0, 2)))  # the store serves both ranks again
    assert int(reuse_counts(healthy["meta_info"])["loaded"]) > 0
    assert int(reuse_counts(healthy["meta_info"])["reused"]) > 0
