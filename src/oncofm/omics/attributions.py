"""Attributions per patient for the omics model: integrated gradients per input value, occlusion per covariate.

The attribution of an input value (a gene's normalised expression, a gene's copy-number level, a gene's
mutation status) is its integrated gradient of the logit of P(death within the horizon) along the straight
path from the *neutral input* — every value 0: expression at the training median after normalisation, no
copy-number change, wild-type — to the patient's values, all values moving together, with the Cox
coefficients, cancer type, age, sex, stage and grade held fixed and unmeasured values (NaN) left masked.
Signed: positive pushes towards death within the horizon. By completeness, the attributions of a patient sum
(up to the Riemann error) to ``logit(x) - logit(neutral)``; a value equal to the neutral one (a wild-type
gene, an unchanged copy number) gets exactly 0. For an expression-only model this is the expression path of
earlier versions, unchanged.

Stage and grade are tokens, not numbers, so they get an *occlusion* effect: ``logit(x) - logit(x with the
covariate unknown)`` (0 when it is unknown already).
"""

from __future__ import annotations

import torch

from oncofm.omics.model import model_inputs

__all__ = ["attributions_by_layer", "covariate_effects", "integrated_gradients"]


def _scaled(t: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """(S*B, F, 2) copies of (B, F, 2) pairs with the values scaled by each alpha (coefficients kept)."""
    steps = len(alphas)
    s = t.unsqueeze(0).repeat(steps, 1, 1, 1)  # (S, B, F, 2)
    s[..., 0] = alphas[:, None, None] * t[..., 0].unsqueeze(0)
    return s.reshape(steps * t.shape[0], *t.shape[1:]).requires_grad_(True)


def attributions_by_layer(model: torch.nn.Module, batch: dict[str, torch.Tensor], *,
                          steps: int = 16) -> dict[str, torch.Tensor]:
    """``{"expression": (B, G), "<layer>": (B, F), ...}`` integrated gradients for one batch (midpoint Riemann
    sum with ``steps`` points; NaN where a layer value was not measured)."""
    if steps < 1:
        raise ValueError(f"{steps=} must be >= 1")
    pairs, cancer, age, sex, *more = model_inputs(batch)
    extra = dict(more[0]) if more else {}
    layer_keys = [k for k in extra if k.startswith("layer_")]
    b = pairs.shape[0]
    alphas = (torch.arange(steps, dtype=pairs.dtype) + 0.5) / steps  # (S,)
    inputs = {"expression": pairs, **{k: extra[k] for k in layer_keys}}
    scaled = {k: _scaled(v, alphas) for k, v in inputs.items()}
    rep = (lambda t: t.repeat(steps, *([1] * (t.ndim - 1))))  # noqa: E731 - (S*B, ...) in (S, B) order
    was_training = model.training
    model.eval()
    with torch.enable_grad():
        args = (scaled["expression"], rep(cancer), rep(age), rep(sex))
        if more:
            args = (*args, {k: scaled[k] if k in scaled else rep(v) for k, v in extra.items()})
        logits, _ = model(*args)
        grads = torch.autograd.grad(logits.sum(), [scaled[k] for k in inputs])
    model.train(was_training)
    out = {}
    for (key, x), grad in zip(inputs.items(), grads, strict=True):
        mean_grad = grad[..., 0].reshape(steps, b, x.shape[1]).mean(0)  # (B, F)
        out[key.removeprefix("layer_")] = (x[..., 0] * mean_grad).detach()  # NaN * grad stays NaN: not measured
    return out


def integrated_gradients(model: torch.nn.Module, batch: dict[str, torch.Tensor], *, steps: int = 16) -> torch.Tensor:
    """(B, G) expression attributions for one batch (see :func:`attributions_by_layer`)."""
    return attributions_by_layer(model, batch, steps=steps)["expression"]


def covariate_effects(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{"stage": (B,), ...}``: each covariate's occlusion effect on the logit, ``logit(x) - logit(x with that
    covariate unknown)``, for a model with covariate tokens (empty without)."""
    args = model_inputs(batch)
    if len(args) < 5:
        return {}
    extra = args[4]
    names = [k.removeprefix("cov_") for k in extra if k.startswith("cov_")]
    if not names:
        return {}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        full, _ = model(*args[:4], extra)
        out = {}
        for name in names:
            hidden = dict(extra)
            hidden[f"cov_{name}"] = torch.zeros_like(extra[f"cov_{name}"])  # level 0 = unknown
            out[name] = full - model(*args[:4], hidden)[0]
    model.train(was_training)
    return out
