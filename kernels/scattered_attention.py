"""Triton attention for scattered queries, causal by explicit position, over SGLang's paged KV layout.

Each request contributes a sorted run of query rows (its recompute set) at explicit positions; its keys
and values are read through its slot-index row (``req_to_token[pool_idx, :seq_len]``) from per-layer
``[slots, kv_heads, head_dim]`` buffers, as SGLang's pool stores them. A program handles one block of up
to ``BLOCK_M`` queries of one request and one query head. Key blocks wholly before the block's first
query position are visible to every query and run unmasked; only the tail up to its last position is
masked. Accumulation is float32 (online softmax); the log-sum-exp is returned in natural log.

``scattered_query_attention_ref`` (attention_ref.py) is the reference these kernels are tested against.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _scattered_attention_kernel(
    Q, K, V, O, LSE, POS, REQ_TO_TOKEN, BLOCK_REQ, BLOCK_ROW, BLOCK_END, POOL_IDX, SEQ_LEN,
    stride_qm, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_om, stride_oh, stride_lm, stride_lh,
    stride_rt, scale_log2,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    block = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP
    req = tl.load(BLOCK_REQ + block)
    row0 = tl.load(BLOCK_ROW + block)
    row_end = tl.load(BLOCK_END + block)
    pool_idx = tl.load(POOL_IDX + req).to(tl.int64)
    seq_len = tl.load(SEQ_LEN + req)

    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    dims = tl.arange(0, HEAD_DIM)
    pos = tl.load(POS + rows, mask=row_ok, other=0)
    first = tl.min(tl.where(row_ok, pos, 2147483647), axis=0)
    last = tl.max(tl.where(row_ok, pos, -1), axis=0)
    q = tl.load(Q + rows[:, None].to(tl.int64) * stride_qm + head * stride_qh + dims[None, :],
                mask=row_ok[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    end = tl.minimum(last + 1, seq_len)
    unmasked_end = (first // BLOCK_N) * BLOCK_N  # key blocks every query of this block sees whole
    for start in range(0, end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < end
        slots = tl.load(REQ_TO_TOKEN + pool_idx * stride_rt + cols, mask=col_ok, other=0).to(tl.int64)
        k = tl.load(K + slots[:, None] * stride_ks + kv_head * stride_kh + dims[None, :], mask=col_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale_log2
        if start >= unmasked_end:
            visible = (cols[None, :] <= pos[:, None]) & col_ok[None, :]
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(V + slots[:, None] * stride_vs + kv_head * stride_vh + dims[None, :], mask=col_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(O + rows[:, None].to(tl.int64) * stride_om + head * stride_oh + dims[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None])
    lse = (m_i + tl.math.log2(l_i)) / 1.4426950408889634  # natural log, like the reference
    tl.store(LSE + rows.to(tl.int64) * stride_lm + head * stride_lh, lse, mask=row_ok)


def _query_blocks(q_offsets: list[int], block_m: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Per program: its request, first row and end row (blocks never straddle two requests)."""
    req, row, end = [], [], []
    for i, (a, b) in enumerate(itertools.pairwise(q_offsets)):
        for start in range(a, b, block_m):
            req.append(i)
            row.append(start)
            end.append(min(start + block_m, b))
    return tuple(torch.tensor(xs, dtype=torch.int32, device=device) for xs in (req, row, end))


def scattered_query_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    q_positions: torch.Tensor,
    q_offsets: list[int],
    req_to_token: torch.Tensor,
    pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    block_m: int = 64,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ragged, position-sorted query runs against their requests' pooled KV.

    ``q [M, hq, d]``; ``k_buffer, v_buffer [slots, hkv, d]``; ``q_positions [M]`` (sorted within each
    request); ``q_offsets``: request i owns rows ``[q_offsets[i], q_offsets[i+1])``; ``req_to_token
    [rows, max_len]`` slot ids by position; ``pool_indices [B]``, ``seq_lens [B]``. Returns
    ``out [M, hq, d]`` (q's dtype) and ``lse [M, hq]`` (float32, natural log), written into ``out`` and
    ``lse`` when given (e.g. an attention backend's output buffer).
    """
    m, hq, d = q.shape
    hkv = k_buffer.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads {hq} are not a multiple of kv heads {hkv}")
    if d not in (16, 32, 64, 128, 256):
        raise ValueError(f"head_dim {d} is not a power of two in [16, 256]")
    if q.stride(-1) != 1 or k_buffer.stride(-1) != 1 or v_buffer.stride(-1) != 1:
        raise ValueError("q and the KV buffers need a contiguous last (head_dim) axis")
    out = torch.empty_like(q) if out is None else out
    lse = torch.empty(m, hq, dtype=torch.float32, device=q.device) if lse is None else lse
    if m == 0:
        return out, lse
    block_req, block_row, block_end = _query_blocks(q_offsets, block_m, q.device)
    pos = q_positions.to(device=q.device, dtype=torch.int32).contiguous()
    _scattered_attention_kernel[(block_req.numel(), hq)](
        q, k_buffer, v_buffer, out, lse, pos, req_to_token, block_req, block_row, block_end,
        pool_indices.to(torch.int32), seq_lens.to(torch.int32),
        q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        out.stride(0), out.stride(1), lse.stride(0), lse.stride(1), req_to_token.stride(0), scale * LOG2E,
        GROUP=hq // hkv, HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse
