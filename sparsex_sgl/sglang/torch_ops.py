"""Pure-torch versions of the ops SGLang 0.5.23's hybrid layers call, for serving hybrids on the CPU.

SGLang runs Gated DeltaNet (Qwen3.5, Qwen3-Next) and Mamba2 (NemotronH) layers through Triton kernels on CUDA, or
through sgl-kernel CPU ops whose build is not on PyPI, so the CPU server cannot run a hybrid as installed.
``compat.torch_hybrid_ops`` swaps these functions in for the kernels' names in the modules that call them, on
the CPU device only. Each takes the kernel's arguments and layout and writes the same state slots in place; the
recurrences run token by token in float32 (exact, slow: meant for the tiny models the tests serve). Paths the
CPU server does not take (speculative decoding, packed decode, fp8, paged conv state) are refused loudly.

Served against HF transformers' own forward of the same weights (``tests/test_hybrid_server.py``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F


def _l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    xf = x.float()
    return xf * torch.rsqrt((xf * xf).sum(-1, keepdim=True) + eps)


def _silu_if(y: torch.Tensor, activation: Any) -> torch.Tensor:
    return F.silu(y) if activation in ("silu", "swish", True) else y


# ---------------------------------------------------------------------- Qwen3.5 / Qwen3-Next projections
def fused_qkvzba_split_reshape_cat_contiguous(mixed_qkvz: torch.Tensor, mixed_ba: torch.Tensor, num_heads_qk: int,
                                              num_heads_v: int, head_qk: int, head_v: int
                                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[q|k|v|z]``, ``[b|a]`` -> ``mixed_qkv [T, 2 Hk Dk + Hv Dv]``, ``z [T, Hv, Dv]``, ``b, a [T, Hv]``."""
    qkv_dim = num_heads_qk * head_qk * 2 + num_heads_v * head_v
    mixed_qkv = mixed_qkvz[:, :qkv_dim].contiguous()
    z = mixed_qkvz[:, qkv_dim:qkv_dim + num_heads_v * head_v].reshape(-1, num_heads_v, head_v).contiguous()
    return mixed_qkv, z, mixed_ba[:, :num_heads_v].contiguous(), mixed_ba[:, num_heads_v:2 * num_heads_v].contiguous()


def fused_sigmoid_mul(attn_output: torch.Tensor, gate: torch.Tensor, inplace: bool = False,
                      quant: bool = False) -> torch.Tensor:
    if quant:
        raise NotImplementedError("fp8 output of fused_sigmoid_mul on the CPU")
    g = gate.reshape(attn_output.shape) if gate.ndim == 3 and attn_output.ndim == 2 else gate
    out = attn_output * torch.sigmoid(g.float()).to(attn_output.dtype)
    if inplace:
        return attn_output.copy_(out)
    return out


def layernorm_fn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, z: torch.Tensor | None = None,
                 eps: float = 1e-6, group_size: int | None = None, norm_before_gate: bool = True,
                 is_rms_norm: bool = False, activation: str | None = "swish") -> torch.Tensor:
    """The gated (RMS) norm of FLA's ``layernorm_gated``: ``norm(x) * silu(z)`` (or ``norm(x * silu(z))``)."""
    if activation not in ("swish", "silu", None):
        raise NotImplementedError(f"gated norm with activation {activation!r} on the CPU")
    xf = x.float()
    zf = None if z is None else z.float()
    if zf is not None and not norm_before_gate:
        xf = xf * F.silu(zf)
    shape = xf.shape
    if group_size is not None:
        xf = xf.reshape(*shape[:-1], shape[-1] // group_size, group_size)
    if is_rms_norm:
        xn = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    else:
        xn = (xf - xf.mean(-1, keepdim=True)) * torch.rsqrt(xf.var(-1, unbiased=False, keepdim=True) + eps)
    xn = xn.reshape(shape) * weight.float()
    if bias is not None:
        xn = xn + bias.float()
    if zf is not None and norm_before_gate:
        xn = xn * F.silu(zf)
    return xn.to(x.dtype)


def fused_gdn_gating(A_log: torch.Tensor, a: torch.Tensor, b: torch.Tensor, dt_bias: torch.Tensor,
                     beta: float = 1.0, threshold: float = 20.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``g = -exp(A_log) softplus(a + dt_bias)``, ``beta = sigmoid(b)``, both ``[1, T, H]`` float32."""
    x = a.float() + dt_bias.float()
    softplus = torch.where(beta * x <= threshold, torch.log1p(torch.exp(beta * x)) / beta, x)
    return (-torch.exp(A_log.float()) * softplus).unsqueeze(0), torch.sigmoid(b.float()).unsqueeze(0)


# ---------------------------------------------------------------------- causal conv (both families)
def _conv_step(state: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               activation: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [dim, L]`` after the window ``state [dim, state_len]``: the outputs and the next window."""
    window = torch.cat([state.float(), x.float()], dim=1)
    start = state.shape[-1] - (weight.shape[1] - 1)
    y = F.conv1d(window[:, start:].unsqueeze(0), weight.float().unsqueeze(1),
                 None if bias is None else bias.float(), groups=x.shape[0]).squeeze(0)
    return _silu_if(y, activation), window[:, -state.shape[-1]:]


def causal_conv1d_fn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv_states: torch.Tensor,
                     query_start_loc: torch.Tensor, seq_lens_cpu: Any = None, cache_indices: torch.Tensor | None = None,
                     has_initial_state: torch.Tensor | None = None, activation: Any = "silu", pad_slot_id: int = -1,
                     validate_data: bool = False, block_table: Any = None, **_: Any) -> torch.Tensor:
    """Prefill of packed sequences: ``x (dim, tokens)``; each sequence's window ``conv_states[slot]`` is read
    (when it has an initial state) and updated in place."""
    if block_table is not None:
        raise NotImplementedError("paged conv state on the CPU")
    out = torch.empty_like(x)
    starts = query_start_loc.tolist()
    slots = cache_indices.tolist() if cache_indices is not None else list(range(len(starts) - 1))
    initial = has_initial_state.tolist() if has_initial_state is not None else [False] * (len(starts) - 1)
    for i, (s, e) in enumerate(itertools.pairwise(starts)):
        if slots[i] == pad_slot_id or e <= s:
            continue
        state = conv_states[slots[i]] if initial[i] else torch.zeros_like(conv_states[slots[i]])
        y, window = _conv_step(state, x[:, s:e], weight, bias, activation)
        out[:, s:e] = y.to(x.dtype)
        conv_states[slots[i]] = window.to(conv_states.dtype)
    return out


def causal_conv1d_update(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor | None = None, activation: Any = None, cache_seqlens: Any = None,
                         conv_state_indices: torch.Tensor | None = None, num_accept_tokens: Any = None,
                         intermediate_conv_window: Any = None, intermediate_state_indices: Any = None,
                         retrieve_next_token: Any = None, retrieve_next_sibling: Any = None,
                         retrieve_parent_token: Any = None, pad_slot_id: int = -1, metadata: Any = None,
                         validate_data: bool = False) -> torch.Tensor:
    """Decode: ``x (batch, dim[, L])`` after each row's window ``conv_state[slot]``, updated in place."""
    if cache_seqlens is not None or intermediate_conv_window is not None or retrieve_parent_token is not None:
        raise NotImplementedError("speculative or circular-buffer conv update on the CPU")
    squeeze = x.dim() == 2
    rows = x.unsqueeze(-1) if squeeze else x
    slots = conv_state_indices.tolist() if conv_state_indices is not None else list(range(rows.shape[0]))
    out = torch.zeros_like(rows)
    for i, slot in enumerate(slots):
        if slot == pad_slot_id or slot < 0:
            continue
        y, window = _conv_step(conv_state[slot], rows[i], weight, bias, activation)
        out[i] = y.to(x.dtype)
        conv_state[slot] = window.to(conv_state.dtype)
    return out.squeeze(-1) if squeeze else out


# ---------------------------------------------------------------------- Gated DeltaNet
def _delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                state: torch.Tensor, chunk: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """One sequence: ``q, k [T, H, K]``, ``v [T, HV, V]``, ``g, beta [T, HV]`` from ``state [HV, V, K]`` (SGLang's
    pool layout). Returns the outputs ``[T, HV, V]``, the final state and (``chunk``) the state at the start of
    each chunk."""
    heads = v.shape[1] // q.shape[1]
    scale = q.shape[-1] ** -0.5
    q = _l2norm(q).repeat_interleave(heads, dim=1) * scale
    k = _l2norm(k).repeat_interleave(heads, dim=1)
    s = state.float().clone()
    out = torch.empty(v.shape, dtype=torch.float32)
    starts = []
    for t in range(q.shape[0]):
        if chunk is not None and t % chunk == 0:
            starts.append(s.clone())
        s = s * torch.exp(g[t].float())[:, None, None]
        delta = (v[t].float() - torch.einsum("hvk,hk->hv", s, k[t])) * beta[t].float()[:, None]
        s = s + delta[:, :, None] * k[t][:, None, :]
        out[t] = torch.einsum("hvk,hk->hv", s, q[t])
    return out, s, starts


def _check_delta_rule_args(q: torch.Tensor, scale: float | None, l2norm: bool) -> None:
    if not l2norm or scale not in (None, q.shape[-1] ** -0.5):
        raise NotImplementedError("delta rule without the in-kernel q/k l2norm and default scale on the CPU")


def chunk_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                           scale: float | None = None, initial_state: torch.Tensor | None = None,
                           initial_state_indices: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                           head_first: bool = False, use_qk_l2norm_in_kernel: bool = False,
                           inplace_update: bool = True) -> tuple[torch.Tensor, None, torch.Tensor | None]:
    """Prefill of packed sequences (``q, k [1, T, H, K]``, ``v [1, T, HV, V]``, ``g, beta [1, T, HV]``) from and
    into the state pool ``initial_state[initial_state_indices]``; returns ``(o, None, h)`` as SGLang's FLA
    wrapper does, ``h`` the states at every 64-token chunk start."""
    _check_delta_rule_args(q, scale, use_qk_l2norm_in_kernel)
    if head_first or initial_state is None or initial_state_indices is None or cu_seqlens is None:
        raise NotImplementedError("chunk_gated_delta_rule without packed sequences and a state pool on the CPU")
    o = torch.empty(v.shape, dtype=q.dtype)
    chunk_states: list[torch.Tensor] = []
    bounds, slots = cu_seqlens.tolist(), initial_state_indices.tolist()
    for i, (s, e) in enumerate(itertools.pairwise(bounds)):
        out, final, starts = _delta_rule(q[0, s:e], k[0, s:e], v[0, s:e], g[0, s:e], beta[0, s:e],
                                         initial_state[slots[i]], chunk=64)
        o[0, s:e] = out.to(o.dtype)
        chunk_states.extend(starts)
        if inplace_update:
            initial_state[slots[i]] = final.to(initial_state.dtype)
    h = torch.stack(chunk_states).unsqueeze(0).to(q.dtype) if chunk_states else None
    return o, None, h


def fused_sigmoid_gating_delta_rule_update(A_log: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                                           dt_bias: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                           softplus_beta: float = 1.0, softplus_threshold: float = 20.0,
                                           initial_state_source: torch.Tensor | None = None,
                                           initial_state_indices: torch.Tensor | None = None,
                                           scale: float | None = None, use_qk_l2norm_in_kernel: bool = False,
                                           cu_seqlens: torch.Tensor | None = None, is_kda: bool = False,
                                           disable_state_update: bool = False,
                                           intermediate_states_buffer: Any = None, **unused: Any) -> torch.Tensor:
    """Decode: the gating and one delta-rule step per sequence (``q, k [1, B, H, K]``, ``v [1, B, HV, V]``),
    the states updated in place in ``initial_state_source``."""
    _check_delta_rule_args(q, scale, use_qk_l2norm_in_kernel)
    if is_kda or disable_state_update or intermediate_states_buffer is not None or initial_state_source is None \
            or initial_state_indices is None:
        raise NotImplementedError("KDA, speculative or state-less delta-rule decode on the CPU")
    g, beta = fused_gdn_gating(A_log, a, b, dt_bias, softplus_beta, softplus_threshold)
    bounds = cu_seqlens.tolist() if cu_seqlens is not None else list(range(q.shape[1] + 1))
    o = torch.zeros(v.shape, dtype=q.dtype)
    for i, (s, e) in enumerate(itertools.pairwise(bounds)):
        slot = int(initial_state_indices[i])
        if slot < 0:
            continue
        out, final, _ = _delta_rule(q[0, s:e], k[0, s:e], v[0, s:e], g[0, s:e], beta[0, s:e],
                                    initial_state_source[slot])
        o[0, s:e] = out.to(o.dtype)
        initial_state_source[slot] = final.to(initial_state_source.dtype)
    return o


# ---------------------------------------------------------------------- Mamba2
def _step_size(dt: torch.Tensor, dt_bias: torch.Tensor | None, softplus: bool,
               limit: tuple[float, float]) -> torch.Tensor:
    dt = dt.float() if dt_bias is None else dt.float() + dt_bias.float()
    if softplus:
        dt = torch.where(dt <= 20.0, F.softplus(dt), dt)
    low, high = limit
    return dt.clamp(low, high) if low > 0.0 or high != float("inf") else dt


def _ssd(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
         D: torch.Tensor | None, h: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One sequence of the Mamba2 recurrence: ``x [L, H, P]``, ``dt [L, H]``, ``B, C [L, G, N]`` from ``h [H, P, N]``;
    yields each token's output ``[H, P]`` and the state after it."""
    groups = x.shape[1] // B.shape[1]
    b, c = B.float().repeat_interleave(groups, dim=1), C.float().repeat_interleave(groups, dim=1)
    skip = None if D is None else (D.float()[:, None] if D.dim() == 1 else D.float())
    for t in range(x.shape[0]):
        h = h * torch.exp(dt[t] * A.float())[:, None, None] + (dt[t][:, None] * x[t].float())[:, :, None] * b[t][:, None]
        y = torch.einsum("hpn,hn->hp", h, c[t])
        yield (y if skip is None else y + skip * x[t].float()), h


def mamba_chunk_scan_combined(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                              C: torch.Tensor, chunk_size: int, D: torch.Tensor | None = None,
                              z: torch.Tensor | None = None, dt_bias: torch.Tensor | None = None,
                              initial_states: torch.Tensor | None = None, seq_idx: Any = None,
                              chunk_indices: Any = None, chunk_offsets: Any = None,
                              cu_seqlens: torch.Tensor | None = None, dt_softplus: bool = False,
                              dt_limit: tuple[float, float] = (0.0, float("inf")), out: torch.Tensor | None = None,
                              return_final_states: bool = False, return_varlen_states: bool = False,
                              return_intermediate_states: bool = False, state_dtype: torch.dtype | None = None,
                              return_track_states: bool = False, track_seq_idx: torch.Tensor | None = None,
                              track_end_locs: torch.Tensor | None = None) -> Any:
    """Prefill of packed sequences (``x [1, T, H, P]``, ``cu_seqlens``): writes ``out`` and returns what SGLang's
    SSD wrapper returns: the final state of each sequence, and (as asked) the chunk-grid states over the packed
    tokens and the states at ``track_end_locs``."""
    if x.shape[0] != 1 or cu_seqlens is None or z is not None or return_final_states or not return_varlen_states:
        raise NotImplementedError("Mamba2 prefill other than packed varlen with final states on the CPU")
    _, total, heads, head_dim = x.shape
    dtype = state_dtype or C.dtype
    step = _step_size(dt[0], dt_bias, dt_softplus, dt_limit)
    bounds = cu_seqlens.tolist()
    chunks = (total + chunk_size - 1) // chunk_size
    grid: list[torch.Tensor | None] = [None] * chunks
    final = torch.empty(len(bounds) - 1, heads, head_dim, B.shape[-1], dtype=dtype)
    track_at: dict[int, list[int]] = {}
    if track_seq_idx is not None and track_end_locs is not None:
        for j, end in enumerate(track_end_locs.tolist()):
            track_at.setdefault(end, []).append(j)
    tracked: list[torch.Tensor | None] = [None] * sum(len(v) for v in track_at.values())
    y_all = torch.empty(total, heads, head_dim, dtype=torch.float32)
    for i, (s, e) in enumerate(itertools.pairwise(bounds)):
        h = initial_states[i].float() if initial_states is not None else torch.zeros(heads, head_dim, B.shape[-1])
        if s == 0:
            grid[0] = h
        for j in track_at.get(s, []):
            tracked[j] = h
        for t, (y, state) in enumerate(_ssd(x[0, s:e], step[s:e], A, B[0, s:e], C[0, s:e], D, h)):
            h = state
            y_all[s + t] = y
            done = s + t + 1
            if done % chunk_size == 0 and done // chunk_size < chunks:
                grid[done // chunk_size] = h
            for j in track_at.get(done, []):
                tracked[j] = h
        final[i] = h.to(dtype)
    if out is not None:
        out.copy_(y_all.view(1, total, heads, head_dim).to(out.dtype))
    states = torch.stack([torch.zeros(heads, head_dim, B.shape[-1]) if g is None else g for g in grid])
    states = states.unsqueeze(0).to(dtype)
    if return_track_states:
        track = torch.stack([t for t in tracked if t is not None]).unsqueeze(0).to(dtype) if tracked else None
        return states, final, track
    if return_intermediate_states:
        return states, final
    return final


def selective_state_update(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
                           B: torch.Tensor, C: torch.Tensor, D: torch.Tensor | None = None,
                           z: torch.Tensor | None = None, dt_bias: torch.Tensor | None = None,
                           dt_softplus: bool = False, state_batch_indices: torch.Tensor | None = None,
                           pad_slot_id: int = -1, out: torch.Tensor | None = None, disable_state_update: bool = False,
                           intermediate_states_buffer: Any = None, cache_steps: Any = None,
                           retrieve_parent_token: Any = None, intermediate_state_indices: Any = None) -> None:
    """Decode, one token per row: ``state [slots, H, P, N]`` updated in place, outputs written to ``out``."""
    if disable_state_update or intermediate_states_buffer is not None or x.dim() != 3:
        raise NotImplementedError("speculative Mamba2 decode on the CPU")
    heads = x.shape[1]
    step = _step_size(dt, dt_bias, dt_softplus, (0.0, float("inf")))
    b = B.float().repeat_interleave(heads // B.shape[1], dim=1)
    c = C.float().repeat_interleave(heads // C.shape[1], dim=1)
    slots = state_batch_indices.tolist() if state_batch_indices is not None else list(range(x.shape[0]))
    for i, slot in enumerate(slots):
        if slot == pad_slot_id or slot < 0:
            continue
        h = state[slot].float() * torch.exp(step[i][:, :, None] * A.float())
        h = h + (step[i] * x[i].float())[:, :, None] * b[i][:, None, :]
        y = torch.einsum("hpn,hn->hp", h, c[i])
        if D is not None:
            y = y + D.float() * x[i].float()
        if z is not None:
            y = y * F.silu(z[i].float())
        state[slot] = h.to(state.dtype)
        if out is not None:
            out[i] = y.to(out.dtype)
