"""Triton RoPE re-alignment fused with the copy: cached K rotated by its position delta, V copied.

A reused segment's cached keys sit in their source slots, rotated for the positions they were cached
at; the request needs them in its own slots, rotated for their new positions. One pass reads K and V
from the source slots, rotates K by the delta in every rotary pair, and writes both to the destination
slots. The rotation angles (delta x frequency) come from ``rope.delta_rotation_table``: float64 on the
host, once per distinct delta and batch, because in float32 a delta of thousands of positions times the
highest frequency loses the fraction that matters. ``rope.realign_keys`` is the
reference; every scaling the core supports (default, linear, llama3, yarn) only changes the frequencies.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _realign_copy_kernel(
    K_SRC, V_SRC, K_DST, V_DST, SRC, DST, DELTA_IDX, COS, SIN, n,
    stride_ks, stride_kh, stride_vs, stride_vh, stride_kds, stride_kdh, stride_vds, stride_vdh, stride_c,
    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr, NEOX: tl.constexpr, BLOCK_T: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = tokens < n
    src = tl.load(SRC + tokens, mask=ok, other=0).to(tl.int64)
    dst = tl.load(DST + tokens, mask=ok, other=0).to(tl.int64)
    which = tl.load(DELTA_IDX + tokens, mask=ok, other=0).to(tl.int64)
    pair = tl.arange(0, HALF)
    cos = tl.load(COS + which[:, None] * stride_c + pair[None, :], mask=ok[:, None], other=1.0)
    sin = tl.load(SIN + which[:, None] * stride_c + pair[None, :], mask=ok[:, None], other=0.0)
    dims = tl.arange(0, HEAD_DIM)
    if NEOX:
        first = pair
        second = pair + HALF
    else:
        first = pair * 2
        second = pair * 2 + 1
    for h in range(HEADS):
        k_row = K_SRC + src[:, None] * stride_ks + h * stride_kh
        x1 = tl.load(k_row + first[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        x2 = tl.load(k_row + second[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        out_row = K_DST + dst[:, None] * stride_kds + h * stride_kdh
        if HALF * 2 < HEAD_DIM:  # partial rotary: the tail dims are copied unrotated
            tail = tl.load(k_row + dims[None, :], mask=ok[:, None] & (dims[None, :] >= HALF * 2), other=0.0)
            tl.store(out_row + dims[None, :], tail, mask=ok[:, None] & (dims[None, :] >= HALF * 2))
        tl.store(out_row + first[None, :], (x1 * cos - x2 * sin).to(K_DST.dtype.element_ty), mask=ok[:, None])
        tl.store(out_row + second[None, :], (x2 * cos + x1 * sin).to(K_DST.dtype.element_ty), mask=ok[:, None])
        v = tl.load(V_SRC + src[:, None] * stride_vs + h * stride_vh + dims[None, :], mask=ok[:, None], other=0.0)
        tl.store(V_DST + dst[:, None] * stride_vds + h * stride_vdh + dims[None, :], v, mask=ok[:, None])


def realign_copy(
    k_src: torch.Tensor,
    v_src: torch.Tensor,
    k_dst: torch.Tensor,
    v_dst: torch.Tensor,
    src_slots: torch.Tensor,
    dst_slots: torch.Tensor,
    delta_index: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    rotary_dim: int,
    neox: bool,
    block_t: int = 32,
) -> None:
    """``k_dst[dst] = rotate(k_src[src], delta)`` and ``v_dst[dst] = v_src[src]`` for one layer's buffers.

    Buffers are ``[slots, kv_heads, head_dim]`` (source and destination may be the same tensors);
    ``src_slots, dst_slots [n]`` and ``delta_index [n]`` (int32, on the buffers' device) name each token's
    row of ``cos, sin [deltas, rotary_dim/2]`` (``rope.delta_rotation_table``, float32 on the device); the
    first ``rotary_dim`` dims rotate, in neox (halves) or GPT-J (interleaved) pairing.
    """
    n = src_slots.numel()
    if n == 0:
        return
    _, heads, d = k_src.shape
    if rotary_dim > d or rotary_dim % 2 or rotary_dim & (rotary_dim - 1) or d & (d - 1):
        raise ValueError(f"head_dim {d} / rotary_dim {rotary_dim} must be powers of two, rotary_dim <= head_dim")
    _realign_copy_kernel[(triton.cdiv(n, block_t),)](
        k_src, v_src, k_dst, v_dst, src_slots, dst_slots, delta_index, cos, sin, n,
        k_src.stride(0), k_src.stride(1), v_src.stride(0), v_src.stride(1), k_dst.stride(0), k_dst.stride(1),
        v_dst.stride(0), v_dst.stride(1), cos.stride(0),
        HEADS=heads, HEAD_DIM=d, HALF=rotary_dim // 2, NEOX=neox, BLOCK_T=block_t,
    )
