"""Triton selection scores: the attention mass each reused key receives from the Sparse-Q rows.

At the threshold layer the new tokens' queries have already been attended over all keys, which gave
their log-sum-exp; the softmax share of key j for query row i and head h is then
``exp(q_ih . k_j * scale - lse_ih)``, so the mass per reused key needs one pass over (rows x reused
keys) and never the full rows x all-keys matrix. A program owns a tile of one request's reused keys and
one KV head and loops over that request's query rows for every query head of the group; it writes a
partial sum per KV head, summed on the device afterwards. One launch serves a whole batch (CSR offsets
for the rows and the keys of each request). ``selection_scores_ref`` (attention_ref.py) is the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
BLOCK_R = 64
"""Reused keys per tile."""


@triton.jit
def _selection_kernel(
    Q, K, LSE, QPOS, Q_OFF, KPOS, KSLOT, TILES, OUT,
    stride_qm, stride_qh, stride_ks, stride_kh, stride_lm, stride_lh, stride_oh, scale_log2,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    req = tl.load(TILES + tile * 3)
    key0 = tl.load(TILES + tile * 3 + 1)
    key_end = tl.load(TILES + tile * 3 + 2)
    row0 = tl.load(Q_OFF + req)
    row_end = tl.load(Q_OFF + req + 1)
    keys = key0 + tl.arange(0, BLOCK_R)
    key_ok = keys < key_end
    dims = tl.arange(0, HEAD_DIM)
    slots = tl.load(KSLOT + keys, mask=key_ok, other=0).to(tl.int64)
    kpos = tl.load(KPOS + keys, mask=key_ok, other=0)
    k = tl.load(K + slots[:, None] * stride_ks + kv_head * stride_kh + dims[None, :], mask=key_ok[:, None], other=0.0)
    mass = tl.zeros([BLOCK_R], tl.float32)
    for g in range(GROUP):
        head = kv_head * GROUP + g
        for start in range(row0, row_end, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            row_ok = rows < row_end
            q = tl.load(Q + rows[:, None].to(tl.int64) * stride_qm + head * stride_qh + dims[None, :],
                        mask=row_ok[:, None], other=0.0)
            qpos = tl.load(QPOS + rows, mask=row_ok, other=-1)
            lse = tl.load(LSE + rows.to(tl.int64) * stride_lm + head * stride_lh, mask=row_ok, other=0.0) * 1.4426950408889634
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2 - lse[:, None]
            else:
                s = tl.dot(q, tl.trans(k)) * scale_log2 - lse[:, None]
            visible = (kpos[None, :] <= qpos[:, None]) & row_ok[:, None] & key_ok[None, :]
            p = tl.where(visible, tl.math.exp2(s), 0.0)
            mass += tl.sum(p, axis=0)
    tl.store(OUT + kv_head * stride_oh + keys, mass, mask=key_ok)


def selection_scores(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    q_positions: torch.Tensor,
    q_offsets: torch.Tensor,
    lse: torch.Tensor,
    key_positions: torch.Tensor,
    key_slots: torch.Tensor,
    tiles: torch.Tensor,
    scale: float,
    block_m: int = 32,
) -> torch.Tensor:
    """Mass per reused key, summed over its request's query rows and heads: float32 ``[R]``.

    ``q [M, hq, d]`` at ``q_positions [M]`` with their ``lse [M, hq]`` over all keys; request i owns rows
    ``q_offsets[i]:q_offsets[i+1]`` (device, int32 ``[B+1]``); the reused keys are at ``key_positions
    [R]`` and live in ``k_buffer [slots, hkv, d]`` at ``key_slots [R]``; ``tiles`` is the ``key_tiles``
    table (``tiles.csr_tiles``) of the keys' CSR offsets (device, ``BLOCK_R`` keys per tile).
    """
    m, hq, d = q.shape
    hkv = k_buffer.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads {hq} are not a multiple of kv heads {hkv}")
    r = key_positions.numel()
    partial = torch.zeros(hkv, r, dtype=torch.float32, device=q.device)
    if r == 0 or m == 0 or tiles.shape[0] == 0:
        return partial.sum(dim=0)
    as_int = {"dtype": torch.int32, "device": q.device}
    _selection_kernel[(tiles.shape[0], hkv)](
        q, k_buffer, lse, q_positions.to(**as_int), q_offsets.to(**as_int), key_positions.to(**as_int),
        key_slots.to(**as_int), tiles, partial,
        q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1), lse.stride(0), lse.stride(1),
        partial.stride(0), scale * LOG2E, GROUP=hq // hkv, HEAD_DIM=d, BLOCK_M=block_m, BLOCK_R=BLOCK_R,
        IEEE=q.dtype == torch.float32,
    )
    return partial.sum(dim=0)
