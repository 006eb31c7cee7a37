"""Torch references: attention of queries at explicit positions, and the selection signal.

SparseX's sparse layers compute only a scattered set of query rows (the recompute set) against all keys
of the request, causal *by position*: a query at position p sees keys at positions <= p. LMCache once
masked such rows by their row index instead (LMCache#1152); masking by explicit position is the point.
Both functions return or take the log-sum-exp so partial attentions merge and the selection scores
need no second softmax pass.
"""

from __future__ import annotations

import torch


def _grouped_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Scores ``[kv_heads, group, m, n]`` in float32 for ``q [m, hq, d]`` and ``k [n, hkv, d]``."""
    m, hq, d = q.shape
    _n, hkv, _ = k.shape
    if hq % hkv:
        raise ValueError(f"query heads {hq} are not a multiple of kv heads {hkv}")
    qg = q.float().reshape(m, hkv, hq // hkv, d)
    return torch.einsum("mhgd,nhd->hgmn", qg, k.float()) * scale


def scattered_query_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_positions: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``m`` queries at ``q_positions`` against keys at positions ``0..n-1``.

    Shapes: ``q [m, hq, d]``, ``k, v [n, hkv, d]``, ``q_positions [m]`` (int, each < n).
    Returns ``out [m, hq, d]`` in q's dtype and ``lse [m, hq]`` (float32, natural log).
    """
    m, hq, d = q.shape
    n, _hkv, _ = k.shape
    if q_positions.shape != (m,):
        raise ValueError(f"q_positions must be [{m}], got {tuple(q_positions.shape)}")
    if m and int(q_positions.max()) >= n:
        raise ValueError(f"a query position {int(q_positions.max())} has no key (n={n})")
    scores = _grouped_scores(q, k, scale)
    hidden = torch.arange(n, device=k.device)[None, :] > q_positions[:, None].to(k.device)
    scores = scores.masked_fill(hidden, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [hkv, g, m]
    probs = torch.exp(scores - lse[..., None])
    out = torch.einsum("hgmn,nhd->mhgd", probs, v.float()).reshape(m, hq, d)
    return out.to(q.dtype), lse.permute(2, 0, 1).reshape(m, hq)


def selection_scores_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    q_positions: torch.Tensor,
    lse: torch.Tensor,
    key_positions: torch.Tensor,
    scale: float,
    heads: str = "sum",
) -> torch.Tensor:
    """Attention mass each key in ``key_positions`` receives from the query rows, summed over rows, then
    summed over heads (``heads="sum"``, the mean up to a constant) or the largest head's (``"max"``: a key
    that one head reads hard is not averaged away by the heads that ignore it).

    ``lse [m, hq]`` is the one returned by the attention over *all* keys, so the mass is the true softmax
    share without materialising the full attention matrix. Returns float32 ``[len(key_positions)]``.
    """
    if heads not in ("sum", "max"):
        raise ValueError(f"heads must be 'sum' or 'max', got {heads!r}")
    m, hq, _ = q.shape
    hkv = k.shape[1]
    scores = _grouped_scores(q, k[key_positions], scale)  # [hkv, g, m, r]
    lse_g = lse.float().reshape(m, hkv, hq // hkv).permute(1, 2, 0)  # [hkv, g, m]
    probs = torch.exp(scores - lse_g[..., None])
    visible = key_positions[None, :].to(q_positions.device) <= q_positions[:, None]
    probs = probs.masked_fill(~visible, 0.0)
    if heads == "sum":
        return probs.sum(dim=(0, 1, 2))
    return probs.sum(dim=2).reshape(hq, -1).amax(dim=0)
