"""The sparse-extend pipeline (plan, select, fill, run) against per-request host oracles.

A batch of three requests over an SGLang-shaped pool (slot 0 padding, slots shuffled, requests in random
``req_to_token`` rows): one with a prefix hit and a moved and an unmoved segment, one without reuse, one
made only of moved segments and a question. The oracles are the host-side definitions the pipeline must
reproduce on the device: ``oracles.select_tokens`` and ``oracles.exact_length`` on a signal computed per
request with the torch references, ``scattered_query_attention_ref`` and ``rope.realign_keys``. Both op
sets run: torch, and Triton (compiled on CUDA, else under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from oracles import exact_length, reused_sources, reused_tokens, select_tokens, selection_budget
from sparsex_sgl.kernels import scattered_query_attention_ref, selection_scores_ref

from sparsex_sgl.core.config import SelectionConfig
from sparsex_sgl.core.graph import ReusedSegment
from sparsex_sgl.core.ops import OP_SETS, op_set
from sparsex_sgl.core.rope import RopeConfig, realign_keys
from sparsex_sgl.core.selection import sparse_q_signal
from sparsex_sgl.core.sparse_extend import ExtendRequest, SparseExtendPlan, SparseRows, select

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HQ, HKV, D = 4, 2, 32
SCALE = D**-0.5
ROPE = RopeConfig(head_dim=D, rotary_dim=D, theta=10000.0)
KERNELS = list(OP_SETS)


SHAPES = [(5, 60, [(10, 20, 7), (35, 15, 0)]), (0, 25, []), (0, 80, [(0, 20, 300), (20, 50, -11)])]
"""(prefix, n_tokens, [(target_start, length, delta)]) per request; the other extend rows are new."""


def make_batch(shapes=SHAPES, seed: int = 0, hq: int = HQ, hkv: int = HKV, d: int = D,  # type: ignore[no-untyped-def]
               dtype: torch.dtype = torch.float32):
    """Requests, ``req_to_token``, one layer's K/V buffers and the extend rows' queries."""
    g = torch.Generator().manual_seed(seed)
    n_slots = 1 + sum(n for _, n, _ in shapes) + sum(length for _, _, segs in shapes for _, length, _ in segs)
    free = (torch.randperm(n_slots - 1, generator=g) + 1).tolist()
    req_to_token = torch.zeros(len(shapes) + 3, max(n for _, n, _ in shapes) + 16, dtype=torch.int32)
    rows = torch.randperm(len(shapes) + 3, generator=g)[: len(shapes)].tolist()
    requests, start = [], 0
    for pool_index, (prefix, n, segs) in zip(rows, shapes, strict=True):
        req_to_token[pool_index, :n] = torch.tensor([free.pop() for _ in range(n)], dtype=torch.int32)
        reused, taken = [], set()
        for node, (target, length, delta) in enumerate(segs):
            slots = tuple(free.pop() for _ in range(length))
            reused.append(ReusedSegment(node, target - delta, target, length, slots))
            taken.update(range(target, target + length))
        new_rows = [p for p in range(prefix, n) if p not in taken]
        requests.append(ExtendRequest(pool_index, start, prefix, n, new_rows, reused, recompute_ratio=0.3))
        start += n - prefix
    k = torch.randn(n_slots, hkv, d, generator=g).to(dtype)
    v = torch.randn(n_slots, hkv, d, generator=g).to(dtype)
    q = torch.randn(start, hq, d, generator=g).to(dtype)
    return requests, req_to_token, k, v, q


def build(requests: list[ExtendRequest], config: SelectionConfig, r2t: torch.Tensor, kernels: str) -> SparseExtendPlan:
    return SparseExtendPlan.build(requests, config, ROPE, r2t.to(DEVICE), HQ, HKV, op_set(kernels))


def run_select(plan: SparseExtendPlan, layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
               scale: float = SCALE) -> SparseRows:
    """``select`` as the model hook calls it after the full layers ``layers`` (each ``(q of the extend rows,
    K, V)``, the last one the threshold layer): the deviation at the last, the mass summed over the layers
    the config names."""
    deviation = mass = None
    if plan.policy.reads_deviation:
        deviation = plan.deviation(layers[-1][2].to(DEVICE), layers[-1][2].to(DEVICE))
    for j in plan.config.mass_layers_of(len(layers)):
        q, k, v = (t.to(DEVICE) for t in layers[j])
        layer_mass = plan.mass(q[plan.new_index.long()], k, v, scale)
        mass = layer_mass if mass is None else mass + layer_mass
    return select(plan, deviation, mass)


def oracle_rows(request: ExtendRequest, config: SelectionConfig, r2t: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                q: torch.Tensor, scale: float = SCALE) -> tuple[list[int], int]:
    """The request's computed rows and exact length, from the host definitions (tensors on any one device)."""
    new = torch.tensor(request.new_rows)
    if not request.reused:
        return new.tolist(), request.n_tokens
    reused = reused_tokens(request.reused)
    src, _ = reused_sources(request.reused)
    src, dev_new, dev_pos = src.to(k.device), new.to(k.device), reused.positions.to(k.device)
    slots = r2t[request.pool_index, : request.n_tokens].long()
    dst = slots[dev_pos]
    signal = None
    if config.selection in ("sparse_q", "kv_deviation"):
        signal = (v[dst] - v[src]).norm(dim=(-2, -1))
        if config.selection == "sparse_q":
            q_new = q[dev_new - request.prefix_len + request.extend_start]
            _, lse = scattered_query_attention_ref(q_new, k[slots], v[slots], dev_new, scale)
            mass = selection_scores_ref(q_new, k[slots], dev_new, lse, dev_pos, scale)
            signal = sparse_q_signal(mass, signal, config.mass_prior)
    budget = selection_budget(len(reused), request.recompute_ratio)
    selected = select_tokens(reused, budget, config.selection, signal, config.min_tokens_per_segment)
    return torch.sort(torch.cat([new, selected])).values.tolist(), exact_length(reused, selected, request.n_tokens)


CONFIGS = {
    "sparse_q": SelectionConfig(full_layers=2, recompute_ratio=0.3, selection="sparse_q", min_tokens_per_segment=2),
    "kv_deviation": SelectionConfig(full_layers=2, recompute_ratio=0.3, selection="kv_deviation",
                                    min_tokens_per_segment=0),
    "first_k": SelectionConfig(full_layers=0, recompute_ratio=0.3, selection="first_k", min_tokens_per_segment=0),
    "none": SelectionConfig(full_layers=0, recompute_ratio=0.0, selection="none", min_tokens_per_segment=0),
}


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("policy", list(CONFIGS))
def test_selection_and_row_layout_match_the_host_oracle(kernels: str, policy: str) -> None:
    requests, r2t, k, v, q = make_batch()
    config = CONFIGS[policy]
    plan = build(requests, config, r2t, kernels)
    chosen = run_select(plan, [(q, k, v)]) if plan.policy.reads_full_layer else select(plan)
    got = chosen.layout.positions.cpu()
    for i, (request, (a, b)) in enumerate(zip(requests, itertools.pairwise(chosen.layout.indptr), strict=True)):
        rows, exact = oracle_rows(request, config, r2t, k, v, q)
        assert got[a:b].tolist() == rows, f"request {i}"
        assert int(chosen.exact_len[i]) == exact
        assert chosen.index[a:b].cpu().tolist() == [request.extend_start + p - request.prefix_len for p in rows]
        assert chosen.slots[a:b].cpu().tolist() == r2t[request.pool_index, rows].tolist()
    if policy == "none":
        assert chosen.exact_len.tolist() == [10, 25, 0]  # the first reused position, or the whole prompt


def test_plan_and_rows_are_frozen_and_a_policy_gets_what_it_reads() -> None:
    requests, r2t, k, v, q = make_batch()
    plan = build(requests, CONFIGS["sparse_q"], r2t, "torch")
    with pytest.raises(ValueError, match="pass what it reads"):
        select(plan)  # sparse_q reads deviation and mass
    rows = run_select(plan, [(q, k, v)])
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.max_budgets = ()  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        rows.index = rows.slots  # type: ignore[misc]
    again = run_select(plan, [(q, k, v)])  # a second selection from one plan gives the same rows
    assert torch.equal(again.layout.positions, rows.layout.positions)


@pytest.mark.parametrize("kernels", KERNELS)
def test_fill_and_attend_match_the_references(kernels: str) -> None:
    requests, r2t, k, v, q = make_batch(seed=1)
    plan = build(requests, CONFIGS["sparse_q"], r2t, kernels)
    rows = run_select(plan, [(q, k, v)])
    k_dst, v_dst = torch.full_like(k, float("nan")).to(DEVICE), torch.full_like(v, float("nan")).to(DEVICE)
    plan.fill_reused([(k.to(DEVICE), v.to(DEVICE), k_dst, v_dst)])
    written = torch.zeros(k.shape[0], dtype=torch.bool)
    for request in requests:
        if not request.reused:
            continue
        reused = reused_tokens(request.reused)
        src, delta = reused_sources(request.reused)
        dst = r2t[request.pool_index, reused.positions].long()
        torch.testing.assert_close(k_dst[dst].cpu(), realign_keys(k[src], delta, ROPE), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v_dst[dst].cpu(), v[src])
        written[dst] = True
    assert torch.isnan(k_dst.cpu()[~written]).all()  # nothing else written

    rows_q = torch.randn(rows.layout.positions.numel(), HQ, D, generator=torch.Generator().manual_seed(2))
    out = plan.run(rows, rows_q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), SCALE).cpu()
    for request, (a, b) in zip(requests, itertools.pairwise(rows.layout.indptr), strict=True):
        slots = r2t[request.pool_index, : request.n_tokens].long()
        ref, _ = scattered_query_attention_ref(rows_q[a:b], k[slots], v[slots],
                                               rows.layout.positions[a:b].cpu().long(), SCALE)
        torch.testing.assert_close(out[a:b], ref, atol=2e-3, rtol=2e-3)


def test_plan_rejects_rows_that_do_not_cover_the_extend() -> None:
    with pytest.raises(ValueError, match="do not cover"):
        ExtendRequest(0, 0, 0, 10, [8, 9], [], 0.15)
    with pytest.raises(ValueError, match="last prompt token"):
        ExtendRequest(0, 0, 0, 3, [0, 1], [ReusedSegment(0, 0, 2, 1, (5,))], 0.15)


def softmax_mass(request: ExtendRequest, r2t: torch.Tensor, k: torch.Tensor, q: torch.Tensor, rows: list[int],
                 heads: str) -> torch.Tensor:
    """Mass per reused token from the query ``rows`` (positions) of one layer, by explicit softmax: ``[r]``."""
    slots = r2t[request.pool_index, : request.n_tokens].long()
    q_rows = q[torch.tensor(rows) - request.prefix_len + request.extend_start].double()  # [m, hq, d]
    keys = k[slots].double().repeat_interleave(HQ // HKV, dim=1)  # [n, hq, d]
    scores = torch.einsum("mhd,nhd->hmn", q_rows, keys) * SCALE
    hidden = torch.arange(request.n_tokens)[None, :] > torch.tensor(rows)[:, None]
    probs = scores.masked_fill(hidden, float("-inf")).softmax(dim=-1)  # [hq, m, n]
    per_head = probs[:, :, reused_tokens(request.reused).positions].sum(dim=1)
    return per_head.sum(dim=0) if heads == "sum" else per_head.amax(dim=0)


MASS_CONFIGS = {
    "mass": SelectionConfig(recompute_ratio=0.3, selection="query_mass"),
    "mass_max_answer": SelectionConfig(recompute_ratio=0.3, selection="query_mass", mass_heads="max",
                                       mass_rows="answer"),
    "mass_all": SelectionConfig(recompute_ratio=0.3, selection="query_mass", mass_layers="all",
                                min_tokens_per_segment=0),
    "mass_coverage": SelectionConfig(recompute_ratio=0.3, selection="query_mass", coverage=0.1),
    "sparse_q_coverage": SelectionConfig(recompute_ratio=0.3, selection="sparse_q", coverage=0.1, mass_layers="all"),
}


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("name", list(MASS_CONFIGS))
def test_mass_signals_and_adaptive_budget_match_the_softmax_oracle(kernels: str, name: str) -> None:
    """Query mass (rows, heads, layers) and the coverage budget against an explicit-softmax oracle, per request;
    ``mass_layers="all"`` observes an earlier layer (other q/K) first."""
    config = MASS_CONFIGS[name]
    requests, r2t, k, v, q = make_batch(seed=3)
    g = torch.Generator().manual_seed(9)
    k0, v0, q0 = torch.randn(k.shape, generator=g), torch.randn(v.shape, generator=g), torch.randn(q.shape, generator=g)
    plan = build(requests, config, r2t, kernels)
    assert len(config.mass_layers_of(2)) == (2 if config.mass_layers == "all" else 1)
    chosen = run_select(plan, [(q0, k0, v0), (q, k, v)])
    got = chosen.layout.positions.cpu()
    for i, (request, (a, b)) in enumerate(zip(requests, itertools.pairwise(chosen.layout.indptr), strict=True)):
        if not request.reused:
            assert got[a:b].tolist() == list(request.new_rows)
            continue
        reused = reused_tokens(request.reused)
        last = max(s.target_start + s.length for s in request.reused)
        rows = [p for p in request.new_rows if config.mass_rows == "new" or p >= last]
        signal = softmax_mass(request, r2t, k, q, rows, config.mass_heads)
        if config.mass_layers == "all":
            signal = signal + softmax_mass(request, r2t, k0, q0, rows, config.mass_heads)
        if config.selection == "sparse_q":
            src, _ = reused_sources(request.reused)
            dst = r2t[request.pool_index, reused.positions].long()
            signal = sparse_q_signal(signal.float(), (v[dst] - v[src]).norm(dim=(-2, -1)), config.mass_prior).double()
        budget = selection_budget(len(reused), request.recompute_ratio)
        if config.coverage:
            forced = reused.moved & (reused.offset < config.min_tokens_per_segment)
            ordered = torch.sort(torch.where(forced, 0.0, signal), descending=True).values
            covered = int(torch.searchsorted(ordered.cumsum(0), config.coverage * ordered.sum())) + 1
            budget = min(budget, covered + int(forced.sum()))
            assert chosen.recomputed[i] == budget <= plan.max_budgets[i]
        selected = select_tokens(reused, budget, config.selection, signal, config.min_tokens_per_segment)
        assert got[a:b].tolist() == torch.sort(torch.cat([torch.tensor(request.new_rows), selected])).values.tolist()
    if config.coverage:
        assert sum(chosen.recomputed) < sum(plan.max_budgets)  # the adaptive budget took fewer somewhere
