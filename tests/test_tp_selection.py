"""Tensor parallelism (issue 34) over torch.distributed (gloo, the CPU's backend), two ranks:

- the selection: each holding half the heads, both pick exactly the rows one rank holding every head picks;
  their signals equal its signals up to summation order. Without the reduction the ranks disagree (the test
  checks that too, so it cannot pass by construction). A rank whose part is absent still picks the rows
  the other picks;
- the votes (``core.agreement``): a failure on one rank, differing values, differing votes and differing
  reads give the same verdict on both ranks."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_sparse_extend import HKV, HQ, ROPE, make_batch

from sparsex_sgl.core.agreement import DISAGREEMENT, RankGuard, Verdict, available_everywhere, vote
from sparsex_sgl.core.config import SelectionConfig
from sparsex_sgl.core.ops import op_set
from sparsex_sgl.core.sparse_extend import SparseExtendPlan, select

CONFIGS = {
    "sparse_q": SelectionConfig(full_layers=2, recompute_ratio=0.3, min_tokens_per_segment=2),
    "kv_deviation": SelectionConfig(full_layers=2, recompute_ratio=0.3, selection="kv_deviation",
                                    min_tokens_per_segment=0),
    "mass_max_all": SelectionConfig(full_layers=2, recompute_ratio=0.3, selection="query_mass", mass_heads="max",
                                    mass_layers="all"),
    "coverage": SelectionConfig(full_layers=2, recompute_ratio=0.3, coverage=0.6),
}


def all_reduce(tensor: torch.Tensor, op: Literal["sum", "max"]) -> torch.Tensor:
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return out


def layers(seed: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Two full layers' (q, K, V) of one batch, every head."""
    _, _, k, v, q = make_batch(seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    return [(torch.randn(q.shape, generator=g), torch.randn(k.shape, generator=g), torch.randn(v.shape, generator=g)),
            (q, k, v)]


def rows_of(name: str, seed: int, rank: int | None, reduce: bool,
            absent: bool = False) -> tuple[list[int], list[float], list[float]]:
    """The rows chosen, the deviation and the mass, on one rank of two (its half of the q and KV heads) or on
    one rank holding every head (``rank`` None)."""
    requests, r2t, _, _, _ = make_batch(seed=seed)
    config = CONFIGS[name]
    full = layers(seed)
    if rank is None:
        hq, hkv, shard = HQ, HKV, full
    else:
        hq, hkv = HQ // 2, HKV // 2
        shard = [(q[:, rank * hq:(rank + 1) * hq], k[:, rank * hkv:(rank + 1) * hkv],
                  v[:, rank * hkv:(rank + 1) * hkv]) for q, k, v in full]
    plan = SparseExtendPlan.build(requests, config, ROPE, r2t, hq, hkv, op_set("torch"),
                                  all_reduce if reduce and rank is not None else None)
    deviation = None
    if plan.policy.reads_deviation:
        deviation = plan.absent("deviation") if absent else plan.deviation(shard[-1][2], shard[-1][2])
    mass = None
    for j in config.mass_layers_of(2):
        q, k, v = shard[j]
        layer_mass = plan.absent("mass") if absent else plan.mass(q[plan.new_index.long()], k, v, 32**-0.5)
        mass = layer_mass if mass is None else mass + layer_mass
    rows = select(plan, deviation, mass)
    return (rows.layout.positions.tolist(), [] if deviation is None else deviation.tolist(),
            [] if mass is None else mass.tolist())


def gather(ballot: object) -> list[object]:
    ballots: list[object] = [None, None]
    dist.all_gather_object(ballots, ballot)
    return ballots


def failing_step() -> str:
    raise RuntimeError("injected fault")


def votes(rank: int) -> dict[str, object]:
    """Each vote's verdict on this rank, every rank casting its own ballot."""
    guard = RankGuard(gather)
    placeholder = guard.attempt(failing_step if rank == 1 else lambda: "rows", "placeholder")
    return {
        "equal": vote(gather, "match", (3, (1, 2)), ""),
        "failed on rank 1": vote(gather, "match", (3, (1, 2)), "internal_error" if rank == 1 else ""),
        "values differ": vote(gather, "match", (3, rank), ""),
        "votes differ": vote(gather, "plan" if rank == 0 else "rows", True, ""),
        "available": available_everywhere(gather, [(b"a", rank == 0), (b"b", True), (b"c", rank == 1)]),
        "guarded step": (placeholder, guard.vote("rows", 7)),
        "absent on rank 1": {name: rows_of(name, 0, rank, True, absent=rank == 1)[0] for name in CONFIGS},
    }


def _rank(rank: int, init: str, out: str, reduce: bool | None) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        if reduce is None:
            results: object = votes(rank)
        else:
            results = {(name, seed): rows_of(name, seed, rank, reduce) for name in CONFIGS for seed in range(4)}
        Path(f"{out}.{rank}").write_bytes(pickle.dumps(results))
    finally:
        dist.destroy_process_group()


def two_ranks(tmp_path: Path, reduce: bool | None) -> list[Any]:
    out = str(tmp_path / f"rows-{reduce}")
    mp.spawn(_rank, args=(f"file://{tmp_path / f'rendezvous-{reduce}'}", out, reduce), nprocs=2, join=True)
    return [pickle.loads(Path(f"{out}.{rank}").read_bytes()) for rank in range(2)]


def test_two_ranks_pick_the_rows_one_rank_with_every_head_picks(tmp_path: Path) -> None:
    ranks = two_ranks(tmp_path, reduce=True)
    for (name, seed), (rows, deviation, mass) in ranks[0].items():
        expected_rows, expected_deviation, expected_mass = rows_of(name, seed, None, reduce=False)
        assert ranks[1][name, seed][0] == rows == expected_rows, (name, seed)
        assert torch.allclose(torch.tensor(deviation), torch.tensor(expected_deviation), rtol=1e-5), (name, seed)
        assert torch.allclose(torch.tensor(mass), torch.tensor(expected_mass), rtol=1e-5, atol=1e-7), (name, seed)


def test_without_the_reduction_the_ranks_would_pick_different_rows(tmp_path: Path) -> None:
    ranks = two_ranks(tmp_path, reduce=False)
    differ = [key for key in ranks[0] if ranks[0][key][0] != ranks[1][key][0]]
    assert len(differ) >= len(ranks[0]) // 2, differ


def test_every_vote_gives_both_ranks_the_same_verdict(tmp_path: Path) -> None:
    zero, one = two_ranks(tmp_path, reduce=None)
    assert zero == one | {"guarded step": zero["guarded step"]}
    assert zero["equal"] == Verdict()
    assert zero["failed on rank 1"] == Verdict("internal_error", 1)
    assert zero["values differ"] == zero["votes differ"] == Verdict(DISAGREEMENT)
    assert zero["available"] == {b"b"}
    assert zero["guarded step"] == ("rows", Verdict(RankGuard.FAILURE, 1))
    assert one["guarded step"] == ("placeholder", Verdict(RankGuard.FAILURE, 1))
    assert all(zero["absent on rank 1"].values())  # both ranks picked the same rows, from rank 0's part alone
