"""Aggregators: attention is a distribution over each slide's real patches; reference computations."""

from __future__ import annotations

import pytest
import torch

from oncofm.errors import OncoFMError
from oncofm.pathology.mil import AGGREGATORS, create_aggregator


def _bag() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(3, 7, 16)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] + [0] * 6], dtype=torch.bool)
    return x, mask


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_attention_sums_to_one_and_ignores_padding(name: str) -> None:
    x, mask = _bag()
    agg = create_aggregator(name, 16, hidden=8).eval()
    emb, att = agg(x, mask)
    assert emb.shape == (3, 8) and att.shape == (3, 7)
    torch.testing.assert_close(att.sum(dim=1), torch.ones(3))
    assert torch.all(att[~mask] == 0) and torch.all(att >= 0)
    # padding content never changes the result
    x2 = x.clone()
    x2[~mask] = 1e3
    emb2, att2 = agg(x2, mask)
    torch.testing.assert_close(emb, emb2)
    torch.testing.assert_close(att, att2)


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_permutation_invariance(name: str) -> None:
    x, _ = _bag()
    agg = create_aggregator(name, 16).eval()
    perm = torch.randperm(7)
    emb, att = agg(x)
    emb_p, att_p = agg(x[:, perm])
    torch.testing.assert_close(emb, emb_p)
    torch.testing.assert_close(att[:, perm], att_p)


def test_gated_attention_matches_the_formula() -> None:
    """a_i = softmax_i(w^T (tanh(V h_i) * sigm(U h_i))), z = sum_i a_i h_i (Ilse et al. 2018, eq. 9)."""
    x, mask = _bag()
    agg = create_aggregator("gated-attention", 16, hidden=8, attn_dim=4).eval()
    emb, att = agg(x, mask)
    for b in range(3):
        h = agg.project(x[b, mask[b]])  # (n, 8)
        s = agg.attn_w(torch.tanh(agg.attn_v(h)) * torch.sigmoid(agg.attn_u(h))).squeeze(-1)
        a = torch.exp(s - s.max()) / torch.exp(s - s.max()).sum()
        torch.testing.assert_close(att[b, mask[b]], a)
        torch.testing.assert_close(emb[b], (a[:, None] * h).sum(0))


def test_mean_pooling_is_the_masked_mean() -> None:
    x, mask = _bag()
    agg = create_aggregator("mean", 16, hidden=8).eval()
    emb, _ = agg(x, mask)
    for b in range(3):
        torch.testing.assert_close(emb[b], agg.project(x[b, mask[b]]).mean(0))


def test_empty_bag_and_unknown_name_are_errors() -> None:
    agg = create_aggregator("gated-attention", 4)
    with pytest.raises(ValueError, match="at least one real patch"):
        agg(torch.zeros(1, 3, 4), torch.zeros(1, 3, dtype=torch.bool))
    with pytest.raises(OncoFMError, match="gated-attention"):
        create_aggregator("max", 4)
