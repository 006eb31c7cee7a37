"""Triton selection scores and fused RoPE re-alignment + copy against their torch references.

Without CUDA they run under Triton's interpreter (``TRITON_INTERPRET=1``, set before the kernel modules
are imported), on small shapes.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sparsex_sgl.kernels import scattered_query_attention_ref, selection_scores_ref
from sparsex_sgl.kernels.realign import realign_copy
from sparsex_sgl.kernels.selection import selection_scores, top_reused

from sparsex_sgl.rope import RopeConfig, realign_keys

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("hq, hkv, m, r", [(4, 4, 1, 70), (8, 2, 37, 130), (7, 1, 20, 5)])
def test_selection_scores_match_reference(hq: int, hkv: int, m: int, r: int) -> None:
    g = torch.Generator().manual_seed(hq * 100 + m)
    n, d = 200, 32
    k_seq = torch.randn(n, hkv, d, generator=g)
    slots = torch.randperm(n, generator=g) + 1  # position -> pool slot
    k_buffer = torch.zeros(n + 1, hkv, d)
    k_buffer[slots] = k_seq
    q_pos = torch.sort(torch.randperm(n, generator=g)[:m]).values
    q = torch.randn(m, hq, d, generator=g)
    _, lse = scattered_query_attention_ref(q, k_seq, k_seq, q_pos, d**-0.5)
    key_pos = torch.sort(torch.randperm(n, generator=g)[:r]).values
    expected = selection_scores_ref(q, k_seq, q_pos, lse, key_pos, d**-0.5)
    got = selection_scores(q.to(DEVICE), k_buffer.to(DEVICE), q_pos.to(DEVICE), lse.to(DEVICE), key_pos.to(DEVICE),
                           slots[key_pos].to(DEVICE), d**-0.5, block_m=16, block_r=32)
    torch.testing.assert_close(got.cpu(), expected, atol=1e-4, rtol=1e-4)
    assert expected[key_pos > q_pos.max()].abs().sum() == 0  # keys after every query get no mass


def test_top_reused_keeps_the_highest_in_index_order() -> None:
    scores = torch.tensor([0.1, 0.9, 0.3, 0.9, 0.05])
    assert top_reused(scores, 3).tolist() == [1, 2, 3]
    assert top_reused(scores, 10).tolist() == [0, 1, 2, 3, 4]


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
    realign_copy(k_dev, v_dev, k_dev, v_dev, src, dst, deltas, cfg, block_t=16)  # in place, like SGLang's pool
    torch.testing.assert_close(k_dev.cpu()[dst], realign_keys(k[src], deltas, cfg), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v_dev.cpu()[dst], v[src])
    untouched = torch.ones(slots, dtype=torch.bool)
    untouched[dst] = False
    torch.testing.assert_close(k_dev.cpu()[untouched], k[untouched])  # nothing else written
