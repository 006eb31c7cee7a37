"""Triton selection scores: the attention mass each reused key receives from the Sparse-Q rows.

At the threshold layer the new tokens' queries have already been attended over all keys, which gave
their log-sum-exp; the softmax share of key j for query row i and head h is then
``exp(q_ih . k_j * scale - lse_ih)``, so the mass per reused key needs one pass over (rows x reused
keys) and never the full rows x all-keys matrix. A program owns a block of reused keys and one KV head,
loops over the query rows of every query head of its group, and writes a partial sum per KV head; the
heads are summed on the host. ``selection_scores_ref`` (attention_ref.py) is the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _selection_kernel(
    Q, K, LSE, QPOS, KPOS, KSLOT, OUT, m, r,
    stride_qm, stride_qh, stride_ks, stride_kh, stride_lm, stride_lh, stride_oh, scale_log2,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
):
    block = tl.program_id(0)
    kv_head = tl.program_id(1)
    keys = block * BLOCK_R + tl.arange(0, BLOCK_R)
    key_ok = keys < r
    dims = tl.arange(0, HEAD_DIM)
    slots = tl.load(KSLOT + keys, mask=key_ok, other=0).to(tl.int64)
    kpos = tl.load(KPOS + keys, mask=key_ok, other=0)
    k = tl.load(K + slots[:, None] * stride_ks + kv_head * stride_kh + dims[None, :], mask=key_ok[:, None], other=0.0)
    mass = tl.zeros([BLOCK_R], tl.float32)
    for g in range(GROUP):
        head = kv_head * GROUP + g
        for start in range(0, m, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            row_ok = rows < m
            q = tl.load(Q + rows[:, None].to(tl.int64) * stride_qm + head * stride_qh + dims[None, :],
                        mask=row_ok[:, None], other=0.0)
            qpos = tl.load(QPOS + rows, mask=row_ok, other=-1)
            lse = tl.load(LSE + rows.to(tl.int64) * stride_lm + head * stride_lh, mask=row_ok, other=0.0) * 1.4426950408889634
            s = tl.dot(q, tl.trans(k)) * scale_log2 - lse[:, None]
            visible = (kpos[None, :] <= qpos[:, None]) & row_ok[:, None] & key_ok[None, :]
            p = tl.where(visible, tl.math.exp2(s), 0.0)
            mass += tl.sum(p, axis=0)
    tl.store(OUT + kv_head * stride_oh + keys, mass, mask=key_ok)


def selection_scores(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    q_positions: torch.Tensor,
    lse: torch.Tensor,
    key_positions: torch.Tensor,
    key_slots: torch.Tensor,
    scale: float,
    block_m: int = 32,
    block_r: int = 64,
) -> torch.Tensor:
    """Mass per reused key, summed over the query rows and heads: float32 ``[r]``.

    ``q [m, hq, d]`` at ``q_positions [m]`` with their ``lse [m, hq]`` over all keys; the reused keys
    are at ``key_positions [r]`` and live in ``k_buffer [slots, hkv, d]`` at ``key_slots [r]``.
    """
    m, hq, d = q.shape
    hkv = k_buffer.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads {hq} are not a multiple of kv heads {hkv}")
    r = key_positions.numel()
    partial = torch.empty(hkv, r, dtype=torch.float32, device=q.device)
    if r == 0 or m == 0:
        return torch.zeros(r, dtype=torch.float32, device=q.device)
    _selection_kernel[(triton.cdiv(r, block_r), hkv)](
        q, k_buffer, lse, q_positions.to(torch.int32), key_positions.to(torch.int32), key_slots.to(torch.int32),
        partial, m, r, q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1), lse.stride(0), lse.stride(1),
        partial.stride(0), scale * LOG2E, GROUP=hq // hkv, HEAD_DIM=d, BLOCK_M=block_m, BLOCK_R=block_r,
    )
    return partial.sum(dim=0)


def top_reused(scores: torch.Tensor, budget: int) -> torch.Tensor:
    """Indices of the ``budget`` highest scores, in ascending index order (ties keep the earlier key)."""
    budget = min(budget, scores.numel())
    order = torch.sort(scores, descending=True, stable=True).indices[:budget]
    return torch.sort(order).values
