"""Integrated gradients per patient per gene for the omics model.

The attribution of gene ``g`` is the integrated gradient of the logit of P(death within the horizon) with
respect to the gene's normalised expression, along the straight path from the neutral expression 0 (the
training median after normalisation) to the patient's value, with the gene's Cox coefficient, cancer type,
age and sex held fixed. Signed: positive pushes towards death within the horizon. By completeness, the
attributions of a patient sum (up to the Riemann error) to ``logit(x) - logit(x with all expression 0)``.
"""

from __future__ import annotations

import torch

from oncofm.omics.model import model_inputs


def integrated_gradients(model: torch.nn.Module, batch: dict[str, torch.Tensor], *, steps: int = 16) -> torch.Tensor:
    """(B, G) attributions for one batch (midpoint Riemann sum with ``steps`` points)."""
    if steps < 1:
        raise ValueError(f"{steps=} must be >= 1")
    pairs, cancer, age, sex, *more = model_inputs(batch)
    b, g, _ = pairs.shape
    alphas = (torch.arange(steps, dtype=pairs.dtype) + 0.5) / steps  # (S,)
    x = pairs[..., 0]  # (B, G)
    scaled = pairs.unsqueeze(0).repeat(steps, 1, 1, 1)  # (S, B, G, 2)
    scaled[..., 0] = alphas[:, None, None] * x.unsqueeze(0)
    scaled = scaled.reshape(steps * b, g, 2).requires_grad_(True)
    rep = (lambda t: t.repeat(steps, *([1] * (t.ndim - 1))))  # noqa: E731 - (S*B, ...) in (S, B) order
    was_training = model.training
    model.eval()
    with torch.enable_grad():
        args = (scaled, rep(cancer), rep(age), rep(sex))
        if more:  # further layers / covariates held fixed
            args = (*args, {k: rep(v) for k, v in more[0].items()})
        logits, _ = model(*args)
        (grad,) = torch.autograd.grad(logits.sum(), scaled)
    model.train(was_training)
    mean_grad = grad[..., 0].reshape(steps, b, g).mean(0)  # (B, G)
    return (x * mean_grad).detach()
