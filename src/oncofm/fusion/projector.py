"""Projectors: map the fused patient embedding to ``k`` soft tokens in the LLM's embedding space.

A registry of named builders (LLaVA's ``linear`` / ``mlp2x_gelu``); :func:`build_projector` is the
factory. Every projector maps ``(B, d_in)`` to ``(B, k, d_llm)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from oncofm.errors import OncoFMError

__all__ = ["PROJECTORS", "register_projector", "build_projector", "SoftTokenProjector"]

PROJECTORS: dict[str, Callable[[int, int], nn.Module]] = {}


def register_projector(name: str) -> Callable:
    """Decorator: register ``fn(d_in, d_out) -> nn.Module`` under ``name``."""

    def deco(fn: Callable[[int, int], nn.Module]) -> Callable[[int, int], nn.Module]:
        PROJECTORS[name] = fn
        return fn

    return deco


@register_projector("linear")
def _linear(d_in: int, d_out: int) -> nn.Module:
    return nn.Linear(d_in, d_out)


@register_projector("mlp2x_gelu")
def _mlp2x_gelu(d_in: int, d_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, d_out), nn.GELU(), nn.Linear(d_out, d_out))


class SoftTokenProjector(nn.Module):
    """``(B, d_in) -> (B, k, d_llm)``: one named body producing ``k * d_llm`` values, reshaped.

    The input is layer-normalised first (the embeddings of the two models live on different scales),
    and the output is scaled to the typical norm of the LLM's token embeddings (``out_scale``) so soft
    tokens start in the range the LLM expects.
    """

    def __init__(self, name: str, *, d_in: int, d_llm: int, n_tokens: int, out_scale: float = 1.0) -> None:
        super().__init__()
        if name not in PROJECTORS:
            raise OncoFMError(f"unknown projector {name!r}; choose one of {sorted(PROJECTORS)}")
        if d_in < 1 or d_llm < 1 or n_tokens < 1:
            raise ValueError(f"projector sizes must be positive: {d_in=}, {d_llm=}, {n_tokens=}")
        self.name, self.d_in, self.d_llm, self.n_tokens = name, d_in, d_llm, n_tokens
        self.norm = nn.LayerNorm(d_in)
        self.body = PROJECTORS[name](d_in, n_tokens * d_llm)
        self.out_norm = nn.LayerNorm(d_llm)
        self.register_buffer("out_scale", torch.tensor(float(out_scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"projector expects (B, {self.d_in}), got {tuple(x.shape)}")
        h = self.body(self.norm(x))  # (B, k * d_llm)
        h = h.view(x.shape[0], self.n_tokens, self.d_llm)  # (B, k, d_llm)
        return self.out_norm(h) * self.out_scale  # (B, k, d_llm)


def build_projector(name: str, *, d_in: int, d_llm: int, n_tokens: int, out_scale: float = 1.0) -> SoftTokenProjector:
    """Factory: the projector registered as ``name``."""
    return SoftTokenProjector(name, d_in=d_in, d_llm=d_llm, n_tokens=n_tokens, out_scale=out_scale)
