"""The Triton scattered-query attention against its torch reference.

Without CUDA the kernel runs under Triton's interpreter (``TRITON_INTERPRET=1``, set in conftest.py before the
kernel module is imported), on small shapes; on a GPU the same cases run compiled.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from sparsex_sgl.kernels import scattered_query_attention_ref
from sparsex_sgl.kernels.scattered_attention import KernelConfig, heaviest_first, query_tiles, scattered_query_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = KernelConfig(block_t=32, block_n=32, num_warps=4)
"""Tiles of 32 (row, head) pairs: small cases still span several tiles and key blocks."""


def _case(seq_lens: list[int], n_queries: list[int], hq: int, hkv: int, d: int, dtype: torch.dtype, seed: int):  # type: ignore[no-untyped-def]
    """Random pooled KV for ragged requests whose slots are scattered over the pool, and sorted query positions."""
    g = torch.Generator().manual_seed(seed)
    n_slots = sum(seq_lens) + 7
    k = torch.randn(n_slots, hkv, d, generator=g).to(dtype)
    v = torch.randn(n_slots, hkv, d, generator=g).to(dtype)
    perm = torch.randperm(n_slots - 1, generator=g) + 1  # slot 0 is SGLang's padding slot
    req_to_token = torch.zeros(len(seq_lens) + 2, max(seq_lens) + 5, dtype=torch.int32)
    pool_indices = torch.randperm(len(seq_lens) + 2, generator=g)[: len(seq_lens)]
    cursor, positions, offsets = 0, [], [0]
    for i, (n, m) in enumerate(zip(seq_lens, n_queries)):
        req_to_token[pool_indices[i], :n] = perm[cursor : cursor + n].to(torch.int32)
        cursor += n
        pos = torch.sort(torch.randperm(n, generator=g)[:m]).values
        if m and n - 1 not in pos:  # the last token is always computed
            pos[-1] = n - 1
        positions.append(pos)
        offsets.append(offsets[-1] + m)
    q = torch.randn(offsets[-1], hq, d, generator=g).to(dtype)
    return q, k, v, torch.cat(positions), offsets, req_to_token, pool_indices, torch.tensor(seq_lens)


def _check(seq_lens: list[int], n_queries: list[int], hq: int, hkv: int, d: int, dtype: torch.dtype, seed: int = 0,
           config: KernelConfig = SMALL) -> None:
    q, k, v, pos, offsets, r2t, pool, lens = _case(seq_lens, n_queries, hq, hkv, d, dtype, seed)
    dev = [t.to(DEVICE) for t in (q, k, v, pos, r2t, pool, lens)]
    out, lse = scattered_query_attention(dev[0], dev[1], dev[2], dev[3], offsets, dev[4], dev[5], dev[6],
                                         scale=d**-0.5, config=config)
    tol = {"atol": 2e-2, "rtol": 2e-2} if dtype != torch.float32 else {"atol": 2e-3, "rtol": 2e-3}
    for i, (a, b) in enumerate(itertools.pairwise(offsets)):
        slots = r2t[pool[i], : seq_lens[i]].long()
        ref_out, ref_lse = scattered_query_attention_ref(q[a:b].float(), k[slots].float(), v[slots].float(), pos[a:b],
                                                         d**-0.5)
        torch.testing.assert_close(out[a:b].float().cpu(), ref_out, **tol)
        torch.testing.assert_close(lse[a:b].cpu(), ref_lse, **tol)


@pytest.mark.parametrize("hq, hkv", [(4, 4), (8, 2), (7, 1), (12, 2)])
def test_gqa_ratios_ragged_batch(hq: int, hkv: int) -> None:
    """Groups of 1, 4, 7 and 6 heads packed into tiles of 32 (row, head) pairs: tiles end mid-row and
    mid-request, and a request of one row shares nothing with its neighbours."""
    _check([70, 33, 129], [20, 1, 40], hq, hkv, 32, torch.float32)


def test_tiles_cover_every_pair_once_and_heaviest_run_first() -> None:
    offsets, group = [0, 5, 5, 12], 3
    tiles = query_tiles(offsets, group, 4)
    covered = [f for _, a, b in tiles for f in range(a, b)]
    assert covered == list(range(12 * group))  # each (row, head) pair once, in order
    for r, a, b in tiles.tolist():  # a tile stays inside its request's pairs
        assert offsets[r] * group <= a < b <= offsets[r + 1] * group
    positions = torch.tensor([1, 2, 3, 4, 900, 10, 11, 12, 13, 14, 15, 600])
    ordered = heaviest_first(torch.from_numpy(tiles), positions, group)
    last = [int(positions[(b - 1) // group]) for _, _, b in ordered.tolist()]
    assert last == sorted(last, reverse=True) and sorted(map(tuple, ordered.tolist())) == sorted(map(tuple, tiles.tolist()))


def test_block_borders_and_position_zero() -> None:
    # 64 queries in blocks of 16 against keys in blocks of 16: query positions 0, 15, 16, 31, 32 ... fall on borders.
    _, k, v, _, _, r2t, pool, lens = _case([80], [0], 2, 1, 16, torch.float32, 3)
    positions = torch.tensor([0, 1, 15, 16, 17, 31, 32, 47, 48, 63, 64, 79])
    q = torch.randn(len(positions), 2, 16)
    dev = [t.to(DEVICE) for t in (q, k, v, positions, r2t, pool, lens)]
    out, lse = scattered_query_attention(dev[0], dev[1], dev[2], dev[3], [0, len(positions)], dev[4], dev[5], dev[6],
                                         scale=0.25, config=KernelConfig(block_t=16, block_n=16))
    slots = r2t[pool[0], :80].long()
    ref_out, ref_lse = scattered_query_attention_ref(q, k[slots], v[slots], positions, 0.25)
    torch.testing.assert_close(out.cpu(), ref_out, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lse.cpu(), ref_lse, atol=2e-3, rtol=2e-3)


def test_one_query_half_precision_and_head_dims() -> None:
    _check([50], [1], 4, 2, 64, torch.float16, seed=5)
    _check([90, 17], [30, 17], 4, 2, 64, torch.float16, seed=6)
    _check([70], [12], 2, 1, 128, torch.float16, seed=7)


def test_output_is_fully_written() -> None:
    """Every row and head is written: output buffers poisoned with NaN come back finite and equal to fresh ones."""
    q, k, v, pos, offsets, r2t, pool, lens = _case([65, 40], [33, 9], 4, 2, 32, torch.float32, 8)
    dev = [t.to(DEVICE) for t in (q, k, v, pos, r2t, pool, lens)]
    args = (dev[0], dev[1], dev[2], dev[3], offsets, dev[4], dev[5], dev[6])
    fresh = scattered_query_attention(*args, scale=0.2)
    poisoned_out = torch.full_like(dev[0], float("nan"))
    poisoned_lse = torch.full((dev[0].shape[0], 4), float("nan"), device=DEVICE)
    out, lse = scattered_query_attention(*args, scale=0.2, out=poisoned_out, lse=poisoned_lse)
    assert out is poisoned_out and torch.isfinite(out).all() and torch.isfinite(lse).all()
    torch.testing.assert_close((out, lse), fresh)
