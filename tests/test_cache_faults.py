"""``SegmentGraphCache`` over SGLang's real pool classes, with faults injected into SparseX code.

A bug in SparseX code inside the scheduler (matching, the checkpoint, the release) must cost one request
its reuse, be counted as ``internal_error``, and never reach SGLang's scheduler loop, which does not catch
it. Requests that SGLang drops while queued must not leave state behind, and handles must behave as dict
keys under SGLang's dfs-weight policy.
"""

from __future__ import annotations

from array import array
from types import SimpleNamespace

import pytest
import torch
from sglang.srt.managers.schedule_batch import Req
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.base_prefix_cache import CacheRequestOutcome, MatchPrefixParams
from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
from sglang.srt.mem_cache.radix_cache import RadixKey
from sglang.srt.sampling.sampling_params import SamplingParams

from sparsex_sgl.core.config import ServerConfig
from sparsex_sgl.core.ops import op_set
from sparsex_sgl.sglang.cache import MatchHandle, SegmentGraphCache
from sparsex_sgl.sglang.runtime import SchedulerRuntime


def make_cache() -> SegmentGraphCache:
    allocator = TokenToKVPoolAllocator(256, torch.float32, "cpu", None, False)
    params = SimpleNamespace(req_to_token_pool=ReqToTokenPool(4, 128, "cpu", False),
                             token_to_kv_pool_allocator=allocator, page_size=1)
    return SegmentGraphCache(params, SchedulerRuntime(ServerConfig(), None, 2, op_set("torch")), torch.device("cpu"))


def make_req(rid: str, ids: list[int], spans: list[int] | None = None) -> Req:
    custom = {"sparsex_spans": spans} if spans else None
    req = Req(rid, "", array("q", ids), SamplingParams(custom_params=custom))  # as the scheduler builds it
    req.refresh_fill_ids()  # as the scheduler does before matching
    return req


def match(cache: SegmentGraphCache, req: Req) -> int:
    return cache.match_prefix(MatchPrefixParams(key=RadixKey(req.origin_input_ids), req=req)).device_prefix_len


def boom(*args: object, **kwargs: object) -> None:
    raise RuntimeError("injected fault")


def test_a_fault_in_matching_serves_the_request_without_reuse(monkeypatch: pytest.MonkeyPatch) -> None:
    cache = make_cache()
    monkeypatch.setattr(cache.graph, "lookup", boom)
    req = make_req("r", list(range(10, 60)), [0, 20])
    assert match(cache, req) == 0
    assert cache.runtime.counters.fallbacks["internal_error"] == 1
    assert cache.runtime.tracked_requests() == 0 and getattr(req, "sparsex", None) is None


def test_a_fault_in_the_checkpoint_or_release_is_counted_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    cache = make_cache()
    req = make_req("r", list(range(10, 60)), [0, 20])
    match(cache, req)
    monkeypatch.setattr(cache, "_cut_to_cache", boom)
    cache.checkpoint(req, up_to=50)  # nothing cached, nothing raised
    assert cache.graph.total_tokens == 0
    monkeypatch.setattr(cache.runtime, "record", boom)
    cache.on_release(req, checkpointed=True)
    assert cache.runtime.counters.fallbacks["internal_error"] == 2
    assert cache.runtime.tracked_requests() == 0


def test_a_request_aborted_while_queued_leaves_no_state() -> None:
    """SGLang's abort of a queued request calls ``finish(handle, ABORT)`` and never releases it."""
    cache = make_cache()
    reqs = [make_req(f"r{i}", list(range(10 + i, 60 + i)), [0, 20]) for i in range(3)]
    for req in reqs:
        match(cache, req)
    assert cache.runtime.tracked_requests() == 3
    for req in reqs:
        cache.finish(req.cache_request_handle, CacheRequestOutcome.ABORT)
    assert cache.runtime.tracked_requests() == 0


def test_handles_are_dict_keys_and_dfs_weight_keeps_every_request() -> None:
    same = [MatchHandle((7,), torch.arange(5)), MatchHandle((7,), torch.arange(5))]  # equal, distinct tensors
    assert len({same[0]: 0, same[1]: 1}) == 1
    handles = [MatchHandle(), MatchHandle((3,), torch.arange(2)), *same, MatchHandle((3,), torch.arange(2))]
    order = make_cache().dfs_weight_order(handles)
    assert sorted(order) == list(range(len(handles)))  # a permutation: no request dropped
    assert order[:2] in ([1, 4], [2, 3])  # the requests on one node run together, ahead of the lone one
