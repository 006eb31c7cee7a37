"""Triton selection scores and fused RoPE re-alignment + copy against their torch references.

Without CUDA they run under Triton's interpreter (``TRITON_INTERPRET=1``, set in conftest.py before the kernel modules
are imported), on small shapes.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from sparsex_sgl.kernels import scattered_query_attention_ref, selection_scores_ref
from sparsex_sgl.kernels.realign import realign_copy
from sparsex_sgl.kernels.selection import BLOCK_R, selection_scores
from sparsex_sgl.kernels.tiles import csr_tiles

from sparsex_sgl.core.rope import RopeConfig, delta_rotation_table, realign_keys

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("hq, hkv", [(4, 4), (8, 2), (7, 1)])
def test_selection_scores_match_reference(hq: int, hkv: int) -> None:
    """A batch of three requests (one without query rows) in one launch: each key's mass comes from its
    own request's rows only, and keys after every query of the request get none."""
    g = torch.Generator().manual_seed(hq)
    d, lens, n_rows, n_keys = 32, [200, 90, 150], [37, 0, 5], [130, 40, 64]
    k_buffer = torch.randn(sum(lens) + 1, hkv, d, generator=g)
    perm = torch.randperm(sum(lens), generator=g) + 1  # slot 0 is padding
    qs, q_pos, lses, key_pos, key_slots, expected, cursor = [], [], [], [], [], [], 0
    for n, m, r in zip(lens, n_rows, n_keys):
        slots = perm[cursor : cursor + n]  # position -> pool slot
        cursor += n
        pos = torch.sort(torch.randperm(n, generator=g)[:m]).values
        q = torch.randn(m, hq, d, generator=g)
        _, lse = scattered_query_attention_ref(q, k_buffer[slots], k_buffer[slots], pos, d**-0.5)
        kp = torch.sort(torch.randperm(n, generator=g)[:r]).values
        expected.append(selection_scores_ref(q, k_buffer[slots], pos, lse, kp, d**-0.5))
        qs.append(q), q_pos.append(pos), lses.append(lse), key_pos.append(kp), key_slots.append(slots[kp])
        if m:
            assert expected[-1][kp > pos.max()].abs().sum() == 0
    q_off = torch.tensor([0, *itertools.accumulate(n_rows)], dtype=torch.int32)
    tiles = torch.from_numpy(csr_tiles([0, *itertools.accumulate(n_keys)], BLOCK_R))
    got = selection_scores(*(t.to(DEVICE) for t in (torch.cat(qs), k_buffer, torch.cat(q_pos), q_off, torch.cat(lses),
                                                   torch.cat(key_pos), torch.cat(key_slots), tiles)), d**-0.5, block_m=16)
    torch.testing.assert_close(got.cpu(), torch.cat(expected), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "cfg",
    [
        RopeConfig(head_dim=64, rotary_dim=64, theta=10000.0),
        RopeConfig(head_dim=32, rotary_dim=32, theta=1e6, style="gptj"),
        RopeConfig(head_dim=64, rotary_dim=32, theta=10000.0),  # partial rotary
        RopeConfig(head_dim=32, rotary_dim=32, theta=500000.0, scaling="llama3", factor=8.0,
                   original_max_position_embeddings=8192),
    ],
)
def test_realign_copy_matches_reference(cfg: RopeConfig) -> None:
    g = torch.Generator().manual_seed(cfg.head_dim + cfg.rotary_dim)
    slots, heads, n = 300, 3, 75
    k = torch.randn(slots, heads, cfg.head_dim, generator=g)
    v = torch.randn(slots, heads, cfg.head_dim, generator=g)
    perm = torch.randperm(slots - 1, generator=g) + 1
    src, dst = perm[:n], perm[n : 2 * n]
    deltas = torch.cat([torch.full((40,), 1234), torch.full((20,), -57), torch.full((15,), 40_000)])
    k_dev, v_dev = k.to(DEVICE), v.to(DEVICE)
    cos, sin, index = delta_rotation_table(deltas, cfg)
    as_int = {"dtype": torch.int32, "device": DEVICE}
    realign_copy(k_dev, v_dev, k_dev, v_dev, src.to(**as_int), dst.to(**as_int), index.to(**as_int), cos.to(DEVICE),
                 sin.to(DEVICE), cfg.rotary_dim, cfg.style == "neox", block_t=16)  # in place, like SGLang's pool
    torch.testing.assert_close(k_dev.cpu()[dst], realign_keys(k[src], deltas, cfg), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v_dev.cpu()[dst], v[src])
    untouched = torch.ones(slots, dtype=torch.bool)
    untouched[dst] = False
    torch.testing.assert_close(k_dev.cpu()[untouched], k[untouched])  # nothing else written
