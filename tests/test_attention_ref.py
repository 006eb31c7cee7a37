"""Scattered-query attention reference equals the matching rows of dense causal attention (GQA), and the
selection scores equal the attention mass read off the dense attention matrix."""

from __future__ import annotations

import pytest
import torch
from sparsex_sgl.kernels import scattered_query_attention_ref, selection_scores_ref


def dense_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain causal attention over all rows, via explicit softmax: ``[n, hq, d]`` and probs ``[hq, n, n]``."""
    group = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, kk) * scale
    n = q.shape[0]
    scores = scores.masked_fill(torch.triu(torch.ones(n, n, dtype=torch.bool), 1), float("-inf"))
    probs = scores.softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, vv), probs


@pytest.mark.parametrize("hq, hkv", [(4, 4), (8, 2), (7, 1), (9, 3)])
@pytest.mark.parametrize("n", [1, 17, 130])
def test_scattered_rows_equal_dense_rows(hq: int, hkv: int, n: int) -> None:
    gen = torch.Generator().manual_seed(n * 31 + hq)
    q = torch.randn(n, hq, 32, generator=gen)
    k = torch.randn(n, hkv, 32, generator=gen)
    v = torch.randn(n, hkv, 32, generator=gen)
    rows = torch.sort(torch.randperm(n, generator=gen)[: max(1, n // 5)]).values
    rows = torch.unique(torch.cat([rows, torch.tensor([0, n - 1])]))  # position 0 and the last row
    dense, _ = dense_causal(q, k, v, 0.17)
    out, lse = scattered_query_attention_ref(q[rows], k, v, rows, 0.17)
    torch.testing.assert_close(out, dense[rows], rtol=1e-5, atol=1e-5)
    assert lse.shape == (rows.numel(), hq) and torch.isfinite(lse).all()


def test_mask_is_by_position_not_by_row_index() -> None:
    """One query at position 9 must see keys 0..9 even though it is row 0 of the query block."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(10, 2, 8, generator=gen), torch.randn(10, 2, 8, generator=gen), torch.randn(10, 2, 8,
                                                                                                      generator=gen)
    out, _ = scattered_query_attention_ref(q[9:], k, v, torch.tensor([9]), 1.0)
    dense, _ = dense_causal(q, k, v, 1.0)
    torch.testing.assert_close(out[0], dense[9])
    assert not torch.allclose(out[0], v[0].repeat_interleave(1, 0))  # not "sees only key 0"


def test_query_position_past_keys_is_rejected() -> None:
    q, k = torch.randn(1, 2, 8), torch.randn(4, 2, 8)
    with pytest.raises(ValueError, match="has no key"):
        scattered_query_attention_ref(q, k, k, torch.tensor([4]), 1.0)


def test_selection_scores_equal_dense_attention_mass() -> None:
    gen = torch.Generator().manual_seed(11)
    n, hq, hkv = 60, 6, 2
    q, k, v = (torch.randn(n, h, 16, generator=gen) for h in (hq, hkv, hkv))
    rows = torch.tensor([40, 41, 59])
    keys = torch.tensor([0, 5, 39, 40, 41, 58])
    _, probs = dense_causal(q, k, v, 0.25)
    _, lse = scattered_query_attention_ref(q[rows], k, v, rows, 0.25)
    scores = selection_scores_ref(q[rows], k, rows, lse, keys, 0.25)
    expected = probs[:, rows][:, :, keys].sum(dim=(0, 1))
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)
    assert scores[-1] == pytest.approx(float(probs[:, 59, 58].sum()), rel=1e-5)  # key 58 seen only by row 59
