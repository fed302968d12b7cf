"""Slide aggregators (multiple-instance pooling) behind a registry: :func:`create_aggregator`.

An aggregator maps a padded bag of patch features ``x`` (B, N, D) with a validity ``mask`` (B, N) to
``(slide_embedding (B, H), attention (B, N))``. The attention of every slide is non-negative, zero on
padded positions, and sums to 1 over the slide's real patches — it is returned, never hidden in hooks.

- ``gated-attention``: Ilse et al. 2018 gated attention: a_i ∝ exp(w·(tanh(V h_i) ⊙ σ(U h_i))).
- ``mean``: mean pooling, the baseline (uniform attention).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from oncofm.errors import OncoFMError

__all__ = ["AGGREGATORS", "GatedAttentionMIL", "MeanPoolMIL", "create_aggregator", "masked_softmax"]

AGGREGATORS: dict[str, Callable[..., nn.Module]] = {}


def register_aggregator(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        AGGREGATORS[name] = cls
        return cls

    return deco


def create_aggregator(name: str, in_dim: int, **kwargs: Any) -> nn.Module:
    """Build the aggregator registered as ``name`` for ``in_dim``-wide patch features."""
    if name not in AGGREGATORS:
        raise OncoFMError(f"unknown aggregator {name!r}; choose one of {', '.join(sorted(AGGREGATORS))}")
    return AGGREGATORS[name](in_dim, **kwargs)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over dim 1 restricted to ``mask`` (True = real patch). ``scores``: (B, N)."""
    if mask is None:
        return torch.softmax(scores, dim=1)
    if not bool(mask.any(dim=1).all()):
        raise ValueError("every bag needs at least one real patch (a row of the mask is all False)")
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=1)


class _Projector(nn.Module):
    def __init__(self, in_dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        if in_dim < 1 or hidden < 1:
            raise ValueError(f"dimensions must be positive: {in_dim=}, {hidden=}")
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@register_aggregator("gated-attention")
class GatedAttentionMIL(nn.Module):
    """Gated attention pooling (Ilse, Tomczak & Welling, 2018).

    Shapes
    ------
    x: (B, N, in_dim), mask: (B, N) bool → embedding (B, hidden), attention (B, N).
    """

    def __init__(self, in_dim: int, *, hidden: int = 128, attn_dim: int = 64, dropout: float = 0.1) -> None:
        super().__init__()
        self.out_dim = hidden
        self.project = _Projector(in_dim, hidden, dropout)
        self.attn_v = nn.Linear(hidden, attn_dim)
        self.attn_u = nn.Linear(hidden, attn_dim)
        self.attn_w = nn.Linear(attn_dim, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.project(x)  # (B, N, hidden)
        gate = torch.tanh(self.attn_v(h)) * torch.sigmoid(self.attn_u(h))  # (B, N, attn_dim)
        attention = masked_softmax(self.attn_w(gate).squeeze(-1), mask)  # (B, N)
        embedding = torch.einsum("bn,bnh->bh", attention, h)  # (B, hidden)
        return embedding, attention


@register_aggregator("mean")
class MeanPoolMIL(nn.Module):
    """Mean of the projected patch features (uniform attention): the baseline."""

    def __init__(self, in_dim: int, *, hidden: int = 128, dropout: float = 0.1, **_: Any) -> None:
        super().__init__()
        self.out_dim = hidden
        self.project = _Projector(in_dim, hidden, dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.project(x)  # (B, N, hidden)
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        attention = masked_softmax(torch.zeros(x.shape[:2], device=x.device), mask)  # uniform (B, N)
        return torch.einsum("bn,bnh->bh", attention, h), attention
