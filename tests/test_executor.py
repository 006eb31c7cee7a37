"""Reference executor on tiny random Llama / Qwen2 (GQA) / Qwen3 models: full prefill equals the HF
forward, SparseX at ratio 1.0 equals full prefill, an exact cached path needs no recompute, and the
approximate methods really differ (so the equalities above could fail)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from sparsex_sgl.core.config import SelectionConfig
from sparsex_sgl.core.errors import UnsupportedModelError
from sparsex_sgl.eval.methods import method_config
from sparsex_sgl.reference import ReferenceExecutor
from sparsex_sgl.reference.cache import ReferenceSegmentCache

# Float32 logits of a 4-layer model with O(1) activations agree to ~1e-5 between two summation orders.
TOL = {"rtol": 1e-4, "atol": 1e-4}


def segmented_prompt(seed: int) -> tuple[list[int], list[list[int]], list[list[int]]]:
    """A 6-token head, three 12-20 token segments, an 8-token question; and the segments alone."""
    gen = torch.Generator().manual_seed(seed)
    head = torch.randint(0, 256, (6,), generator=gen).tolist()
    segs = [torch.randint(0, 256, (int(n),), generator=gen).tolist() for n in (12, 20, 15)]
    question = torch.randint(0, 256, (8,), generator=gen).tolist()
    ids, spans = list(head), []
    for seg in segs:
        spans.append([len(ids), len(ids) + len(seg)])
        ids += seg
    return ids + question, spans, segs


@pytest.fixture(params=["llama", "qwen2", "qwen3"])
def executor(request: pytest.FixtureRequest) -> ReferenceExecutor:
    return ReferenceExecutor(tiny_model(request.param))


def test_full_prefill_equals_hf_forward(executor: ReferenceExecutor) -> None:
    ids, _, _ = segmented_prompt(0)
    hf = executor.model(torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(executor.prefill_full(ids).logits, hf, **TOL)


def test_greedy_decode_equals_hf_generate(executor: ReferenceExecutor) -> None:
    ids, _, _ = segmented_prompt(1)
    ours = executor.greedy_decode(executor.prefill_full(ids, extra_capacity=6), 6)
    hf = executor.model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids):]
    assert ours == hf.tolist()


def filled_cache(executor: ReferenceExecutor, segs: list[list[int]]) -> ReferenceSegmentCache:
    cache = ReferenceSegmentCache(executor, num_slots=512)
    for seg in reversed(segs):  # cache order is irrelevant: each alone from position 0
        assert cache.fill_segment(seg)
    return cache


@pytest.mark.parametrize("full_layers", [1, 2])
@pytest.mark.parametrize("method", ["sparsex", "cacheblend", "epic"])
def test_ratio_one_equals_full_prefill(executor: ReferenceExecutor, method: str, full_layers: int) -> None:
    ids, spans, segs = segmented_prompt(2)
    cache = filled_cache(executor, segs)
    cfg = method_config(method, 1.0, full_layers)
    assert cfg is not None
    result = cache.prefill(ids, spans, cfg)
    assert result.stats.n_reused == 47 and result.stats.computed_rows == len(ids)  # 3 segments, 47 tokens
    torch.testing.assert_close(result.logits, executor.prefill_full(ids).logits, **TOL)


def test_approximate_reuse_differs_from_full_prefill(executor: ReferenceExecutor) -> None:
    """Without this, the equality tests above could pass by never reading the cache."""
    ids, spans, segs = segmented_prompt(2)
    cache = filled_cache(executor, segs)
    full = executor.prefill_full(ids).logits
    naive = cache.prefill(ids, spans, SelectionConfig(full_layers=0, recompute_ratio=0.0, selection="none"))
    assert naive.stats.computed_rows == 8 + 6  # the question and the uncached head
    assert (naive.logits - full).abs().max() > 1e-2


def test_exact_cached_path_needs_no_recompute(executor: ReferenceExecutor) -> None:
    ids, spans, _ = segmented_prompt(3)
    cache = ReferenceSegmentCache(executor, num_slots=512)
    full = executor.prefill_full(ids, extra_capacity=4)
    assert cache.store(ids, spans, full)
    plan = cache.lookup(ids, spans)
    assert plan.prefix_len == len(ids) - 1 and plan.reused == () and plan.new_rows == (len(ids) - 1,)
    result = cache.prefill(ids, spans, SelectionConfig(full_layers=2, recompute_ratio=0.15), extra_capacity=4)
    assert result.stats.computed_rows == 1 and result.stats.n_selected == 0 and result.exact
    torch.testing.assert_close(result.logits, full.logits, **TOL)
    assert executor.greedy_decode(result, 4) == executor.greedy_decode(full, 4)


def test_sparsex_recomputes_within_budget_and_models_fewer_flops(executor: ReferenceExecutor) -> None:
    ids, spans, segs = segmented_prompt(4)
    cache = filled_cache(executor, segs)
    result = cache.prefill(ids, spans, SelectionConfig(full_layers=1, recompute_ratio=0.25))
    assert result.stats.n_selected == round(0.25 * 47)
    assert result.stats.computed_rows == 6 + 8 + result.stats.n_selected
    assert result.stats.flops < executor.full_flops(len(ids))
    assert not result.exact


def test_unsupported_architecture_is_refused() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        ReferenceExecutor(model)


def test_sliding_window_is_refused() -> None:
    model = tiny_model("qwen2")
    model.config.use_sliding_window = True
    with pytest.raises(UnsupportedModelError, match="sliding"):
        ReferenceExecutor(model)


def test_non_exact_result_cannot_enter_the_graph_as_a_path() -> None:
    executor = ReferenceExecutor(tiny_model("llama"))
    ids, spans, segs = segmented_prompt(5)
    cache = filled_cache(executor, segs)
    result = cache.prefill(ids, spans, SelectionConfig(full_layers=1, recompute_ratio=0.1))
    with pytest.raises(ValueError, match="exactly computed"):
        cache.store(ids, spans, result)


def test_many_configs_equal_each_config_alone(executor: ReferenceExecutor) -> None:
    """prefill_reuse_many runs the full layers once for every config; each result must still be the one its
    config gets alone, bit for bit (the same ops on the same rows), at thresholds 0, 1 and 2 and under
    every policy. A KV shared between two results would fail it: the later config overwrites rows."""
    ids, spans, segs = segmented_prompt(5)
    cache = filled_cache(executor, segs)
    configs = [method_config(m, r, layers) for m in ("naive", "cacheblend", "epic", "sparsex")
               for r in (0.1, 0.3) for layers in (1, 2)]
    configs = [cfg for cfg in configs if cfg is not None]
    many = cache.prefill_many(ids, spans, configs, extra_capacity=4)
    for cfg, result in zip(configs, many, strict=True):
        alone = cache.prefill(ids, spans, cfg, extra_capacity=4)
        assert result.stats == alone.stats
        assert torch.equal(result.logits, alone.logits)
        assert torch.equal(result.kv.k, alone.kv.k) and torch.equal(result.kv.v, alone.kv.v)
    assert len({tuple(result.logits.tolist()) for result in many}) > len(configs) // 2  # the configs differ


def test_batched_decoding_equals_one_request_at_a_time(executor: ReferenceExecutor) -> None:
    """One decode step for several requests (shared projections, attention per request) gives each request
    the tokens it gets alone: summation orders differ by ~1e-6, far below these models' top-2 gaps."""
    ids, spans, segs = segmented_prompt(6)
    cache = filled_cache(executor, segs)
    configs = [method_config("naive", 0.0, 0), method_config("sparsex", 0.3, 1)]
    results = cache.prefill_many(ids, spans, [cfg for cfg in configs if cfg is not None], extra_capacity=6)
    results.append(executor.prefill_full(ids, extra_capacity=6))
    greedy = executor.greedy_decode_many(results, 6)
    assert len(set(map(tuple, greedy))) > 1  # else a mix-up of requests' KV would go unseen
    assert greedy == [executor.greedy_decode(result, 6) for result in results]
    forced = greedy[-1]
    assert executor.teacher_forced_argmax_many(results, forced) == [
        executor.teacher_forced_argmax(result, forced) for result in results
    ]
