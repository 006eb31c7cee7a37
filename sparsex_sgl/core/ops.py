"""The op sets the sparse extend runs on, chosen once at start-up: ``torch`` (the references, for the CPU)
or ``triton`` (the kernels: compiled on CUDA, interpreted on the CPU under ``TRITON_INTERPRET=1``).

Each op set implements the same four ops over SGLang-shaped buffers (per layer ``[slots, kv_heads,
head_dim]``, slots by position in ``req_to_token``): scattered-query attention, the attention mass per
reused key, the RoPE re-alignment copy, and the work tiles the kernels launch over. ``sparse_extend``
calls only these, so one plan runs on either set, and the kernel tests run every op over both.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch

from sparsex_sgl.core.rope import RopeConfig, rotate_pairs
from sparsex_sgl.kernels import scattered_query_attention_ref, selection_scores_ref
from sparsex_sgl.kernels.tiles import csr_tiles

OpSetName = Literal["torch", "triton"]
TORCH_SCORE_BYTES = 1 << 28
"""Largest float32 score block ``[heads, rows, keys]`` one chunk of the torch attention may build."""


@dataclass(frozen=True)
class RowLayout:
    """Query rows of a batch, CSR by request: request i's rows are ``indptr[i]:indptr[i+1]`` (host), at
    ``positions [M]`` (device, int32), over KV slots ``req_to_token[pool_index[i], :seq_len[i]]``.
    ``pool_index_dev`` / ``seq_len_dev`` / ``indptr_dev`` are the same on the device; ``tiles`` is the op
    set's work table for these rows (None for the torch ops)."""

    positions: torch.Tensor
    indptr: Sequence[int]
    pool_index: Sequence[int]
    seq_len: Sequence[int]
    pool_index_dev: torch.Tensor
    seq_len_dev: torch.Tensor
    indptr_dev: torch.Tensor
    tiles: torch.Tensor | None


@dataclass(frozen=True)
class KeyLayout:
    """Reused keys of a batch, CSR by request (``indptr``, host): their ``positions [R]`` and the ``slots [R]``
    their fresh K sits in (device); ``tiles``: the op set's work table over them (None for torch)."""

    positions: torch.Tensor
    slots: torch.Tensor
    indptr: Sequence[int]
    tiles: torch.Tensor | None


class OpSet(Protocol):
    """One implementation of the sparse extend's ops."""

    name: OpSetName

    def row_tiles(self, indptr: Sequence[int], group: int) -> np.ndarray | None:
        """Work tiles of attention over CSR rows (host), None if the op set needs none."""

    def key_tiles(self, indptr: Sequence[int]) -> np.ndarray | None:
        """Work tiles of the mass over CSR reused keys (host), None if the op set needs none."""

    def order_tiles(self, tiles: torch.Tensor | None, positions: torch.Tensor, group: int) -> torch.Tensor | None:
        """``tiles`` in launch order for rows at ``positions`` (device)."""

    def attend(self, q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, req_to_token: torch.Tensor,
               rows: RowLayout, scale: float, need_lse: bool = False,
               out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of ``q [M, hq, d]`` at ``rows`` over each request's pooled keys up to the row's position:
        ``(out [M, hq, d], lse [M, hq] float32 or None)``, into ``out`` when given."""

    def key_mass(self, q: torch.Tensor, k_buffer: torch.Tensor, req_to_token: torch.Tensor, rows: RowLayout,
                 lse: torch.Tensor, keys: KeyLayout, scale: float, heads: str) -> torch.Tensor:
        """Attention mass ``[R]`` (float32) each reused key of ``keys`` receives from its request's rows
        ``q [M, hq, d]`` at ``rows``, whose ``lse [M, hq]`` is over all keys; heads summed or maxed."""

    def realign(self, k_src: torch.Tensor, v_src: torch.Tensor, k_dst: torch.Tensor, v_dst: torch.Tensor,
                src_slots: torch.Tensor, dst_slots: torch.Tensor, delta_index: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, rope: RopeConfig) -> None:
        """``k_dst[dst] = rotate(k_src[src], delta)``, ``v_dst[dst] = v_src[src]`` for one layer's buffers."""


class TorchOps:
    """The torch references: attention is cut into row chunks so no ``[heads, rows, keys]`` score block
    outgrows ``TORCH_SCORE_BYTES``; without an LSE to return it takes SDPA, the faster path on the CPU."""

    name: OpSetName = "torch"

    def row_tiles(self, indptr: Sequence[int], group: int) -> None:
        return None

    def key_tiles(self, indptr: Sequence[int]) -> None:
        return None

    def order_tiles(self, tiles: torch.Tensor | None, positions: torch.Tensor, group: int) -> torch.Tensor | None:
        return tiles

    def attend(self, q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, req_to_token: torch.Tensor,
               rows: RowLayout, scale: float, need_lse: bool = False,
               out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = torch.empty_like(q) if out is None else out
        lse = torch.empty(q.shape[0], q.shape[1], dtype=torch.float32, device=q.device) if need_lse else None
        for i, (a, b) in enumerate(itertools.pairwise(rows.indptr)):
            if a == b:
                continue
            slots = req_to_token[rows.pool_index[i], : rows.seq_len[i]].long()
            keys, values = k_buffer[slots], v_buffer[slots]
            chunk = max(1, TORCH_SCORE_BYTES // (4 * q.shape[1] * slots.numel()))
            for start in range(a, b, chunk):
                part = slice(start, min(start + chunk, b))
                pos = rows.positions[part].long()
                if lse is not None:
                    out[part], lse[part] = scattered_query_attention_ref(q[part], keys, values, pos, scale)
                else:
                    visible = torch.arange(slots.numel(), device=q.device)[None, :] <= pos[:, None]
                    out[part] = torch.nn.functional.scaled_dot_product_attention(
                        q[part].transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1), attn_mask=visible,
                        scale=scale, enable_gqa=True).transpose(0, 1)
        return out, lse

    def key_mass(self, q: torch.Tensor, k_buffer: torch.Tensor, req_to_token: torch.Tensor, rows: RowLayout,
                 lse: torch.Tensor, keys: KeyLayout, scale: float, heads: str) -> torch.Tensor:
        masses = []
        for i, ((a, b), (ka, kb)) in enumerate(zip(itertools.pairwise(rows.indptr), itertools.pairwise(keys.indptr),
                                                   strict=True)):
            if kb > ka:
                k_seq = k_buffer[req_to_token[rows.pool_index[i], : rows.seq_len[i]].long()]
                masses.append(selection_scores_ref(q[a:b], k_seq, rows.positions[a:b].long(), lse[a:b],
                                                   keys.positions[ka:kb].long(), scale, heads=heads))
        return torch.cat(masses) if masses else torch.zeros(0, device=q.device)

    def realign(self, k_src: torch.Tensor, v_src: torch.Tensor, k_dst: torch.Tensor, v_dst: torch.Tensor,
                src_slots: torch.Tensor, dst_slots: torch.Tensor, delta_index: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, rope: RopeConfig) -> None:
        src, dst, index = src_slots.long(), dst_slots.long(), delta_index.long()
        k_dst[dst] = rotate_pairs(k_src[src], cos[index], sin[index], rope)
        v_dst[dst] = v_src[src]


class TritonOps:
    """The Triton kernels (``sparsex_sgl.kernels``); the mass with ``heads="max"`` takes the torch reference
    (the selection kernel sums heads)."""

    name: OpSetName = "triton"

    def __init__(self) -> None:
        from sparsex_sgl.kernels import realign, scattered_attention, selection

        self._attention, self._selection, self._realign = scattered_attention, selection, realign
        self._block_t = scattered_attention.DEFAULT_CONFIG.block_t

    def row_tiles(self, indptr: Sequence[int], group: int) -> np.ndarray:
        return csr_tiles([group * i for i in indptr], self._block_t)

    def key_tiles(self, indptr: Sequence[int]) -> np.ndarray:
        return csr_tiles(indptr, self._selection.BLOCK_R)

    def order_tiles(self, tiles: torch.Tensor | None, positions: torch.Tensor, group: int) -> torch.Tensor | None:
        return None if tiles is None else self._attention.heaviest_first(tiles, positions, group)

    def attend(self, q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, req_to_token: torch.Tensor,
               rows: RowLayout, scale: float, need_lse: bool = False,
               out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._attention.scattered_query_attention(
            q, k_buffer, v_buffer, rows.positions, list(rows.indptr), req_to_token, rows.pool_index_dev,
            rows.seq_len_dev, scale, tiles=rows.tiles, out=out)

    def key_mass(self, q: torch.Tensor, k_buffer: torch.Tensor, req_to_token: torch.Tensor, rows: RowLayout,
                 lse: torch.Tensor, keys: KeyLayout, scale: float, heads: str) -> torch.Tensor:
        if heads != "sum" or keys.tiles is None:
            return TorchOps().key_mass(q, k_buffer, req_to_token, rows, lse, keys, scale, heads)
        return self._selection.selection_scores(q, k_buffer, rows.positions, rows.indptr_dev, lse, keys.positions,
                                                keys.slots, keys.tiles, scale)

    def realign(self, k_src: torch.Tensor, v_src: torch.Tensor, k_dst: torch.Tensor, v_dst: torch.Tensor,
                src_slots: torch.Tensor, dst_slots: torch.Tensor, delta_index: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, rope: RopeConfig) -> None:
        if k_src.shape[-1] != rope.head_dim:
            raise ValueError(f"the buffers' head_dim {k_src.shape[-1]} is not the rope config's {rope.head_dim}")
        self._realign.realign_copy(k_src, v_src, k_dst, v_dst, src_slots, dst_slots.to(torch.int32), delta_index,
                                   cos, sin, rope.rotary_dim, rope.style == "neox")


OP_SETS: dict[str, type[TorchOps | TritonOps]] = {"torch": TorchOps, "triton": TritonOps}


def op_set(name: str, device: torch.device | str = "cpu") -> OpSet:
    """The op set called ``name``; "auto" is Triton on CUDA and torch elsewhere."""
    if name == "auto":
        name = "triton" if torch.device(device).type == "cuda" else "torch"
    if name not in OP_SETS:
        raise ValueError(f"unknown op set {name!r}; choose one of {('auto', *OP_SETS)}")
    return OP_SETS[name]()
