"""The query-mass signals and the look-ahead pass, checked against HF's own eager attention weights.

The oracle is independent of our attention and mass code: HF's forward with ``output_attentions=True``
gives every layer's softmax weights. SparseX's full layers compute every row above the cached prefix
exactly, so the mass the new rows put on each reused token at those layers is read off HF's full forward;
the look-ahead pass is HF's forward of the question over the stale KV (naive reuse's cache) as
``past_key_values``. The selected set must be the top of that mass (``oracles.select_tokens``), or for the
signals that weigh value deviation by it, of deviation (HF's values of the whole prompt against those of
each segment alone) times that mass.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_model
from oracles import reused_tokens, select_tokens, selection_budget
from test_executor import filled_cache, segmented_prompt
from transformers import DynamicCache

from sparsex_sgl.core.config import SelectionConfig
from sparsex_sgl.eval.methods import method_config
from sparsex_sgl.reference import ReferenceExecutor
from sparsex_sgl.reference.flops import modeled_prefill_flops

RATIO = 0.3


def eager_executor(family: str) -> ReferenceExecutor:
    model = tiny_model(family)
    model.set_attn_implementation("eager")
    return ReferenceExecutor(model)


def oracle_rows(executor: ReferenceExecutor, ids: list[int], spans: list[list[int]], config: SelectionConfig,
                attentions: list[torch.Tensor], scored_rows: torch.Tensor) -> list[int]:
    """New rows plus the reused tokens ``select_tokens`` picks from the mass in ``attentions`` (per layer
    ``[heads, rows, keys]`` of the rows ``scored_rows``); for ``sparse_q`` the mass weighs the deviation
    (``value_deviation``) as ``deviation * (mass / mean mass + mass_prior)``."""
    plan = filled_cache(executor, [ids[a:b] for a, b in spans]).lookup(ids, spans)
    reused = reused_tokens(plan.reused)
    per_head = torch.stack([a[:, :, reused.positions] for a in attentions]).double().sum(dim=2)  # [layers, heads, r]
    # Heads combine within each layer (a layer's strongest head under "max"), then layers add up.
    mass = (per_head.sum(dim=1) if config.mass_heads == "sum" else per_head.amax(dim=1)).sum(dim=0)
    signal = mass
    if config.selection == "sparse_q":
        signal = value_deviation(executor, ids, spans, config.full_layers - 1) * (mass / mass.mean() + config.mass_prior)
    budget = selection_budget(len(reused), config.recompute_ratio)
    chosen = select_tokens(reused, budget, config.selection, signal, config.min_tokens_per_segment)
    taken = set(reused.positions.tolist())
    new = [p for p in range(len(ids)) if p not in taken]
    assert set(scored_rows.tolist()) <= set(new)
    return sorted(new + chosen.tolist())


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("signal", ["mass", "mass_all", "mass_max", "mass_all_max", "answer_mass"])
def test_query_mass_selects_the_top_of_hf_attention(family: str, signal: str) -> None:
    executor = eager_executor(family)
    ids, spans, segs = segmented_prompt(3)
    setting = method_config("sparsex", RATIO, 2, signal)
    assert setting is not None
    config = setting.selection
    result = filled_cache(executor, segs).prefill(ids, spans, setting)
    with torch.no_grad():
        attentions = executor.model(torch.tensor([ids]), output_attentions=True).attentions
    layers = range(2) if config.mass_layers == "all" else [1]
    taken = {p for a, b in spans for p in range(a, b)}
    answer_start = spans[-1][1] if config.mass_rows == "answer" else 0
    rows = torch.tensor([p for p in range(answer_start, len(ids)) if p not in taken])
    picked = [attentions[i][0][:, rows] for i in layers]
    assert list(result.rows) == oracle_rows(executor, ids, spans, config, picked, rows)


def value_deviation(executor: ReferenceExecutor, ids: list[int], spans: list[list[int]], layer: int) -> torch.Tensor:
    """Per reused token (prompt order): the distance between its value vectors at ``layer`` in HF's forward of
    the whole prompt and in HF's forward of its segment alone (values carry no position)."""
    def values(tokens: list[int]) -> torch.Tensor:
        with torch.no_grad():
            cache = executor.model(torch.tensor([tokens]), use_cache=True).past_key_values
        return cache.layers[layer].values[0].transpose(0, 1)  # [tokens, kv_heads, head_dim]

    whole = values(ids)
    return torch.cat([(whole[a:b] - values(ids[a:b])).double().norm(dim=(-2, -1)) for a, b in spans])


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("signal", ["lookahead", "lookahead_q"])
def test_lookahead_selects_by_the_mass_over_the_stale_kv(family: str, signal: str) -> None:
    executor = eager_executor(family)
    ids, spans, segs = segmented_prompt(4)
    cache = filled_cache(executor, segs)
    setting = method_config("sparsex", RATIO, 2, signal)
    naive = method_config("naive", 0.0, 0)
    assert setting is not None and naive is not None and setting.lookahead
    config = setting.selection
    result = cache.prefill(ids, spans, setting)
    stale = cache.prefill(ids, spans, naive)
    # The look-ahead pass: the new rows over the stale KV. Here they are the uncached head (positions
    # 0..5) and the question after the last segment; HF's forward of the question over the stale KV of
    # everything before it gives the question's rows, the head's rows attend only to the head itself.
    start = spans[-1][1]
    past = DynamicCache()
    for i in range(executor.spec.dims.num_layers):
        past.update(stale.kv.k[i, :start].transpose(0, 1)[None], stale.kv.v[i, :start].transpose(0, 1)[None], i)
    with torch.no_grad():
        out = executor.model(torch.tensor([ids[start:]]), past_key_values=past,
                             position_ids=torch.arange(start, len(ids))[None], output_attentions=True)
    rows = torch.arange(start, len(ids))
    all_layers = [a[0] for a in out.attentions]
    assert list(result.rows) == oracle_rows(executor, ids, spans, config, all_layers, rows)
    # Its extra pass is counted: the new rows through every layer, no logits row.
    dims = executor.spec.dims
    new_rows = list(stale.rows)
    sparse_rows = [range(len(ids))] * 2 + [list(result.rows)] * (dims.num_layers - 2)
    look_ahead = modeled_prefill_flops(dims, [new_rows] * dims.num_layers) - 2 * dims.hidden * dims.vocab
    assert result.stats.flops == modeled_prefill_flops(dims, sparse_rows) + look_ahead


def test_coverage_recomputes_less_and_never_more_than_the_ratio() -> None:
    executor = ReferenceExecutor(tiny_model("qwen2"))
    ids, spans, segs = segmented_prompt(5)
    cache = filled_cache(executor, segs)
    fixed = method_config("sparsex", RATIO, 2, "mass")
    assert fixed is not None
    by_coverage = {c: cache.prefill(ids, spans, dataclasses.replace(fixed.selection, coverage=c)).stats.n_selected
                   for c in (0.05, 0.3, 0.6, 1.0)}
    budget = cache.prefill(ids, spans, fixed).stats.n_selected
    counts = list(by_coverage.values())
    assert counts == sorted(counts) and counts[-1] == budget and counts[0] < budget
    with pytest.raises(ValueError, match="coverage"):
        SelectionConfig(selection="first_k", full_layers=0, coverage=0.5)
