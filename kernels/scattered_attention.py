"""Triton attention for scattered queries, causal by explicit position, over SGLang's paged KV layout.

Each request contributes a sorted run of query rows (its recompute set) at explicit positions; its keys
and values are read through its slot-index row (``req_to_token[pool_idx, :seq_len]``) from per-layer
``[slots, kv_heads, head_dim]`` buffers, as SGLang's pool stores them.

A program owns one *tile* of (query row, query head) pairs that share a KV head: the GQA group's heads
are packed into the tile's rows, so each K/V block is gathered from the pool once per KV head rather
than once per query head (a 32/8 model reads K/V a quarter as often). Tiles are cut in the flattened
``row * group + head`` order of one request, so a group of 6 heads wastes no padded rows. Key blocks
wholly before the tile's first query position are visible to every pair and run unmasked; only the
blocks up to its last position are masked. Accumulation is float32 (online softmax); the
log-sum-exp comes back in natural log, so partial attentions merge.

``scattered_query_attention_ref`` (attention_ref.py) is the reference these kernels are tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl
from sparsex_sgl.kernels.tiles import csr_tiles

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class KernelConfig:
    """Launch shape: ``block_t`` (row, head) pairs per tile, ``block_n`` keys per step."""

    block_t: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2


DEFAULT_CONFIG = KernelConfig()
"""The fastest for 32/8 heads at 16k-32k keys in bench/kernels.py on an H200 (README, "GPU"); every config
gives the same numbers."""


@triton.jit
def _scattered_attention_kernel(
    Q, K, V, O, LSE, POS, REQ_TO_TOKEN, TILES, POOL_IDX, SEQ_LEN,
    stride_qm, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_om, stride_oh, stride_lm, stride_lh,
    stride_rt, scale_log2,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):
    # KV head fastest: blocks start in tile order across all heads, so heaviest-first holds for the grid.
    tile = tl.program_id(0) // NUM_KV_HEADS
    kv_head = tl.program_id(0) % NUM_KV_HEADS
    req = tl.load(TILES + tile * 3)
    flat0 = tl.load(TILES + tile * 3 + 1)
    flat_end = tl.load(TILES + tile * 3 + 2)
    pool_idx = tl.load(POOL_IDX + req).to(tl.int64)
    seq_len = tl.load(SEQ_LEN + req)

    flat = flat0 + tl.arange(0, BLOCK_T)
    ok = flat < flat_end
    rows = (flat // GROUP).to(tl.int64)
    heads = kv_head * GROUP + flat % GROUP
    dims = tl.arange(0, HEAD_DIM)
    pos = tl.load(POS + rows, mask=ok, other=0)
    first = tl.min(tl.where(ok, pos, 2147483647), axis=0)
    last = tl.max(tl.where(ok, pos, -1), axis=0)
    q = tl.load(Q + rows[:, None] * stride_qm + heads[:, None] * stride_qh + dims[None, :], mask=ok[:, None], other=0.0)

    m_i = tl.full([BLOCK_T], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_T], tl.float32)
    acc = tl.zeros([BLOCK_T, HEAD_DIM], tl.float32)
    end = tl.minimum(last + 1, seq_len)
    unmasked_end = tl.minimum((first // BLOCK_N) * BLOCK_N, end)  # key blocks every pair of the tile sees whole
    slot_row = REQ_TO_TOKEN + pool_idx * stride_rt
    for start in range(0, unmasked_end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        slots = tl.load(slot_row + cols).to(tl.int64)
        k = tl.load(K + slots[:, None] * stride_ks + kv_head * stride_kh + dims[None, :])
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2
        else:
            s = tl.dot(q, tl.trans(k)) * scale_log2
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(V + slots[:, None] * stride_vs + kv_head * stride_vh + dims[None, :])
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    for start in range(unmasked_end, end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < end
        slots = tl.load(slot_row + cols, mask=col_ok, other=0).to(tl.int64)
        k = tl.load(K + slots[:, None] * stride_ks + kv_head * stride_kh + dims[None, :], mask=col_ok[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2
        else:
            s = tl.dot(q, tl.trans(k)) * scale_log2
        visible = (cols[None, :] <= pos[:, None]) & col_ok[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a padded pair that sees nothing yet
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(V + slots[:, None] * stride_vs + kv_head * stride_vh + dims[None, :], mask=col_ok[:, None], other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    l_safe = tl.where(ok, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(O + rows[:, None] * stride_om + heads[:, None] * stride_oh + dims[None, :], out.to(O.dtype.element_ty),
             mask=ok[:, None])
    lse = (m_i + tl.math.log2(l_safe)) / 1.4426950408889634  # natural log, like the reference
    tl.store(LSE + rows * stride_lm + heads * stride_lh, lse, mask=ok)


def query_tiles(q_offsets: list[int], group: int, block_t: int) -> np.ndarray:
    """Tile table ``[tiles, 3]`` (int32: request, first and end flat pair) for rows ``q_offsets`` (CSR, host):
    request i owns flat (row, head) pairs ``[group * q_offsets[i], group * q_offsets[i+1])``."""
    return csr_tiles([group * offset for offset in q_offsets], block_t)


def heaviest_first(tiles: torch.Tensor, positions: torch.Tensor, group: int) -> torch.Tensor:
    """``tiles`` reordered by the position of their last row, latest (most keys) first, on the device.

    The last tiles to start decide when the launch ends; giving the long ones the first slots keeps the
    SMs busy to the end. No host sync: a sort of one entry per tile.
    """
    if tiles.shape[0] < 2:
        return tiles
    last_row = (tiles[:, 2].long() - 1) // group
    order = torch.argsort(positions[last_row], descending=True)
    return tiles[order].contiguous()


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
    config: KernelConfig = DEFAULT_CONFIG,
    tiles: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ragged, position-sorted query runs against their requests' pooled KV.

    ``q [M, hq, d]``; ``k_buffer, v_buffer [slots, hkv, d]``; ``q_positions [M]`` (int32, sorted within each
    request); ``q_offsets``: request i owns rows ``[q_offsets[i], q_offsets[i+1])``; ``req_to_token
    [rows, max_len]`` slot ids by position; ``pool_indices [B]``, ``seq_lens [B]`` (int32). ``tiles``: the
    ``query_tiles`` table on the device for ``config.block_t``, when the caller built it once per batch.
    Returns ``out [M, hq, d]`` (q's dtype) and ``lse [M, hq]`` (float32, natural log), written into ``out``
    and ``lse`` when given (e.g. an attention backend's output buffer).
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
    group = hq // hkv
    if tiles is None:
        tiles = torch.from_numpy(query_tiles(q_offsets, group, config.block_t)).to(q.device)
        tiles = heaviest_first(tiles, q_positions.to(q.device).long(), group)
    if tiles.shape[0] == 0:
        return out, lse
    as_int = {"dtype": torch.int32, "device": q.device}
    _scattered_attention_kernel[(tiles.shape[0] * hkv,)](
        q, k_buffer, v_buffer, out, lse, q_positions.to(**as_int).contiguous(), req_to_token, tiles,
        pool_indices.to(**as_int), seq_lens.to(**as_int),
        q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        out.stride(0), out.stride(1), lse.stride(0), lse.stride(1), req_to_token.stride(0), scale * LOG2E,
        NUM_KV_HEADS=hkv, GROUP=group, HEAD_DIM=d, BLOCK_T=config.block_t, BLOCK_N=config.block_n, IEEE=q.dtype == torch.float32,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out, lse
