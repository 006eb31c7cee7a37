"""The kernels and the sparse-extend pipeline at serving size on a GPU (skipped without CUDA).

What the interpreter cannot show: bf16 at 16k-32k keys, slots shuffled over the pool as SGLang's
allocator leaves them, three ragged requests per launch, and float32 at IEEE precision (``tl.dot`` would
otherwise run as TF32 and miss the 1e-4 tolerances). The torch references are too large to run over every
row at this size, so each request is checked on its last rows (they see the most keys) and a random
sample of the others.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch
from sparsex_sgl.kernels import scattered_query_attention_ref, selection_scores_ref
from test_sparse_extend import CONFIGS, make_batch, oracle_rows, run_select

from sparsex_sgl.core.ops import OP_SETS, op_set
from sparsex_sgl.core.rope import RopeConfig, delta_rotation_table, realign_keys
from sparsex_sgl.core.sparse_extend import SparseExtendPlan

GPU = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not GPU and os.environ.get("SPARSEX_GPU_DRY_RUN") != "1", reason="needs a CUDA device")
DEVICE = "cuda" if GPU else "cpu"
SHRINK = 1 if GPU else 64
SEQ_LENS = [32768 // SHRINK, 16384 // SHRINK, 9001 // SHRINK]
RATIO = 0.15
HALF = torch.bfloat16 if GPU else torch.float16  # the interpreter has no bfloat16


def _sample(a: int, b: int, g: torch.Generator, n: int = 192) -> torch.Tensor:
    """Rows to check: the last 64 of ``[a, b)`` and a random ``n - 64`` of the rest."""
    last = torch.arange(max(a, b - 64), b)
    rest = torch.arange(a, max(a, b - 64))
    return torch.cat([rest[torch.randperm(rest.numel(), generator=g)[: n - 64]], last])


def _ragged(hq: int, hkv: int, dtype: torch.dtype, seed: int = 0):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    d = 128
    n_slots = sum(SEQ_LENS) + 1
    k = torch.randn(n_slots, hkv, d, generator=g, dtype=torch.float32).to(dtype).to(DEVICE)
    v = torch.randn(n_slots, hkv, d, generator=g, dtype=torch.float32).to(dtype).to(DEVICE)
    perm = torch.randperm(n_slots - 1, generator=g) + 1  # slot 0 is SGLang's padding slot
    req_to_token = torch.zeros(8, max(SEQ_LENS), dtype=torch.int32)
    pool = torch.randperm(8, generator=g)[: len(SEQ_LENS)]
    positions, offsets, cursor = [], [0], 0
    for i, n in enumerate(SEQ_LENS):
        req_to_token[pool[i], :n] = perm[cursor : cursor + n].to(torch.int32)
        cursor += n
        m = int(RATIO * n)
        pos = torch.sort(torch.randperm(n - 1, generator=g)[: m - 1]).values
        positions.append(torch.cat([pos, torch.tensor([n - 1])]))
        offsets.append(offsets[-1] + m)
    q = torch.randn(offsets[-1], hq, d, generator=g, dtype=torch.float32).to(dtype).to(DEVICE)
    return q, k, v, torch.cat(positions), offsets, req_to_token.to(DEVICE), pool, d


@pytest.mark.parametrize("hq, hkv", [(32, 8), (12, 2)])
@pytest.mark.parametrize("dtype", [HALF, torch.float32])
def test_scattered_attention_full_size(hq: int, hkv: int, dtype: torch.dtype) -> None:
    from sparsex_sgl.kernels.scattered_attention import scattered_query_attention

    torch.backends.cuda.matmul.allow_tf32 = False
    q, k, v, pos, offsets, r2t, pool, d = _ragged(hq, hkv, dtype)
    lens = torch.tensor(SEQ_LENS, dtype=torch.int32, device=DEVICE)
    out, lse = scattered_query_attention(q, k, v, pos.to(DEVICE), offsets, r2t, pool.to(DEVICE), lens, d**-0.5)
    tol = {"atol": 2e-2, "rtol": 2e-2} if dtype == HALF else {"atol": 1e-4, "rtol": 1e-4}
    g = torch.Generator().manual_seed(1)
    for i, (a, b) in enumerate(itertools.pairwise(offsets)):
        rows = _sample(a, b, g)
        slots = r2t[pool[i], : SEQ_LENS[i]].long()
        ref_out, ref_lse = scattered_query_attention_ref(q[rows].float(), k[slots].float(), v[slots].float(),
                                                         pos[rows].to(DEVICE), d**-0.5)
        torch.testing.assert_close(out[rows].float(), ref_out, **tol)
        torch.testing.assert_close(lse[rows], ref_lse, **tol)


def test_selection_scores_full_size() -> None:
    from sparsex_sgl.kernels.selection import BLOCK_R, selection_scores
    from sparsex_sgl.kernels.tiles import csr_tiles

    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator().manual_seed(2)
    n, hq, hkv, d, m = 32768 // SHRINK, 32, 8, 128, 96 // (SHRINK // 8 or 1)
    k_seq = torch.randn(n, hkv, d, generator=g).to(DEVICE)
    slots = (torch.randperm(n, generator=g) + 1).to(DEVICE)
    k_buffer = torch.zeros(n + 1, hkv, d, device=DEVICE)
    k_buffer[slots] = k_seq
    q_pos = torch.arange(n - m, n).to(DEVICE)
    q = torch.randn(m, hq, d, generator=g).to(DEVICE)
    _, lse = scattered_query_attention_ref(q, k_seq, k_seq, q_pos, d**-0.5)
    key_pos = torch.arange(64, n - m).to(DEVICE)
    expected = selection_scores_ref(q, k_seq, q_pos, lse, key_pos, d**-0.5)
    tiles = torch.from_numpy(csr_tiles([0, key_pos.numel()], BLOCK_R)).to(DEVICE)
    q_off = torch.tensor([0, m], dtype=torch.int32, device=DEVICE)
    got = selection_scores(q, k_buffer, q_pos, q_off, lse, key_pos, slots[key_pos], tiles, d**-0.5)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4)


def test_realign_copy_full_size_bf16() -> None:
    from sparsex_sgl.kernels.realign import realign_copy

    g = torch.Generator().manual_seed(3)
    cfg = RopeConfig(head_dim=128, rotary_dim=128, theta=500000.0, scaling="llama3", factor=8.0,
                     original_max_position_embeddings=8192)
    n_slots, n = 70000 // SHRINK, 30000 // SHRINK
    k = torch.randn(n_slots, 8, 128, generator=g).to(HALF).to(DEVICE)
    v = torch.randn(n_slots, 8, 128, generator=g).to(HALF).to(DEVICE)
    perm = torch.randperm(n_slots - 1, generator=g) + 1
    src, dst = perm[:n], perm[n : 2 * n]
    deltas = torch.repeat_interleave(torch.tensor([31000, -4000, 17, 0, 12345]), n // 5)
    src, dst = src[: deltas.numel()], dst[: deltas.numel()]
    cos, sin, index = delta_rotation_table(deltas, cfg)
    expected = realign_keys(k[src.to(DEVICE)].float(), deltas.to(DEVICE), cfg).to(HALF)
    as_int = {"dtype": torch.int32, "device": DEVICE}
    realign_copy(k, v, k, v, src.to(**as_int), dst.to(**as_int), index.to(**as_int), cos.to(DEVICE), sin.to(DEVICE),
                 cfg.rotary_dim, cfg.style == "neox")
    torch.testing.assert_close(k[dst.to(DEVICE)].float(), expected.float(), atol=2e-2, rtol=1e-2)
    assert torch.equal(v[dst.to(DEVICE)], v[src.to(DEVICE)])


@pytest.mark.parametrize("policy", ["sparse_q", "kv_deviation"])
def test_pipeline_full_size_matches_torch_pipeline_and_oracle(policy: str) -> None:
    """The Triton pipeline against the torch pipeline and the host oracle: one 24k-token RAG-shaped
    request (moved and unmoved segments), a 6k-token request without reuse, a small one."""
    torch.backends.cuda.matmul.allow_tf32 = False
    seg = 512 // SHRINK * 4
    segs = [(64 + seg * j, seg, -700 * (j % 3)) for j in range(46)]
    shapes = [(0, 64 + seg * 46 + 384, segs), (0, 6000 // SHRINK, []), (16, 900, [(16, 512, 40)])]
    requests, r2t, k, v, q = make_batch(shapes, seed=4, hq=32, hkv=8, d=128)
    config = CONFIGS[policy]
    scale = 128**-0.5
    plans, chosen = {}, {}
    for kernels in OP_SETS:
        plans[kernels] = SparseExtendPlan.build(requests, config, RopeConfig(128, 128, 1e6), r2t.to(DEVICE), 32, 8,
                                                op_set(kernels))
        chosen[kernels] = run_select(plans[kernels], [(q, k, v)], scale)
    torch_rows, triton_rows = chosen["torch"], chosen["triton"]
    assert torch.equal(torch_rows.layout.positions, triton_rows.layout.positions)
    assert torch.equal(torch_rows.exact_len, triton_rows.exact_len)
    for i, (request, (a, b)) in enumerate(zip(requests, itertools.pairwise(torch_rows.layout.indptr), strict=True)):
        rows, exact = oracle_rows(request, config, r2t.to(DEVICE), k.to(DEVICE), v.to(DEVICE), q.to(DEVICE), scale)
        assert torch_rows.layout.positions[a:b].cpu().tolist() == rows, f"request {i}"
        assert int(torch_rows.exact_len[i]) == exact
    rows_q = torch.randn(torch_rows.layout.positions.numel(), 32, 128,
                         generator=torch.Generator().manual_seed(5)).to(DEVICE)
    outs = [plans[x].run(chosen[x], rows_q, k.to(DEVICE), v.to(DEVICE), scale) for x in OP_SETS]
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)
