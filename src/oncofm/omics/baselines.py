"""Baselines run beside the omics transformer: same split, same features.

- ``clinical``: logistic regression on cancer type (one-hot) + age + sex (+ stage and grade when the
  encoder has those covariates) only;
- ``logistic_l2``: L2 logistic regression on the gene features + clinical covariates;
- ``coxnet``: Cox elastic net (scikit-survival ``CoxnetSurvivalAnalysis``, l1_ratio 0.5) on the same,
  trained on every training patient (follow-up censored at the horizon), P(death) from its survival curve;
- ``hgb``: histogram gradient boosting classifier on the same.

The gene features are the pair tensor's expression and expression × coefficient (the gene's Cox log-hazard
contribution), i.e. the transformer's inputs flattened; further layers (CNV, mutation) add their value (0
where not measured) and an absent-layer flag (:func:`layer_design`), covariates
(stage, grade) one-hot levels and an unknown flag — every model sees the same inputs. Each baseline picks its one regularisation
hyperparameter on the validation split (AUC + C-index), exactly like the transformer picks its epoch;
the test split is only predicted. A registry maps names to builders so more can be added.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from oncofm.omics.data import ClinicalEncoder, OmicsTable
from oncofm.survival.endpoints import censor_at_horizon, horizon_days
from oncofm.survival.metrics import auc_score, harrell_c_index

log = logging.getLogger(__name__)


@dataclass
class BaselinePrediction:
    """Predictions of one fitted baseline for the validation and test patients."""

    name: str
    val_prob: np.ndarray
    test_prob: np.ndarray
    test_risk: np.ndarray
    chosen: str  # the hyperparameter picked on validation


def gene_design(table: OmicsTable) -> np.ndarray:
    """(N, 2G) expression and expression × coefficient."""
    x, c = table.pairs[..., 0], table.pairs[..., 1]
    return np.concatenate([x, x * c], axis=1).astype(np.float32)


def layer_design(table: OmicsTable) -> np.ndarray:
    """(N, Σ F + 1) per further layer: the value (0 where not measured: diploid / wild-type) and a flag for a
    patient without the layer — the same columns as the omics model's wide path.

    Unlike expression, value × coefficient is left out: for sparse binary features the training-split
    coefficient makes that product fit the training outcomes (double dipping); on tcga13 validation it cost
    the Cox elastic net 0.03 (mutation) of validation score, the plain value nothing (docs/omics.md)."""
    cols = []
    for _, values in table.layers.values():
        x = values[..., 0]
        cols += [np.nan_to_num(x), np.isnan(x).all(axis=1, keepdims=True)]
    return (np.concatenate(cols, axis=1) if cols else np.zeros((len(table), 0))).astype(np.float32)


def _val_score(table: OmicsTable, prob: np.ndarray) -> float:
    has = ~np.isnan(table.label)
    t, e = censor_at_horizon(table.time, table.event, table.horizon_years)  # as the transformer's monitor
    return np.nanmean([auc_score(table.label[has], prob[has]), harrell_c_index(t, e, prob)])


def _select(name: str, grid: list, fit_predict: Callable, val: OmicsTable) -> tuple:
    """Fit every grid value, keep the best on validation; returns (value, model)."""
    best = (-np.inf, None, None)
    for value in grid:
        model, prob_fn = fit_predict(value)
        score = _val_score(val, prob_fn(model, "val"))
        log.debug("%s %s: val score %.4f", name, value, score)
        if score > best[0]:
            best = (score, value, model)
    return best[1], best[2]


def _logistic(features: Callable[[OmicsTable], np.ndarray], grid: list[float]) -> Callable:
    def run(train: OmicsTable, val: OmicsTable, test: OmicsTable, name: str) -> BaselinePrediction:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        has = ~np.isnan(train.label)
        xs = {"train": features(train), "val": features(val), "test": features(test)}

        def fit_predict(c: float):  # noqa: ANN202
            m = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
            m.fit(xs["train"][has], train.label[has].astype(int))
            return m, lambda m, part: m.predict_proba(xs[part])[:, 1]

        c, model = _select(name, grid, fit_predict, val)
        prob = model.predict_proba(xs["test"])[:, 1]
        return BaselinePrediction(name, model.predict_proba(xs["val"])[:, 1], prob, prob, f"C={c:g}")

    return run


#: smallest penalty of the elastic-net paths, as a share of the largest (``alpha_min_ratio`` settings)
ALPHA_MIN_RATIO = 0.01


def _coxnet(features: Callable[[OmicsTable], np.ndarray], alpha_min_ratio: float = ALPHA_MIN_RATIO) -> Callable:
    def run(train: OmicsTable, val: OmicsTable, test: OmicsTable, name: str) -> BaselinePrediction:
        from sklearn.preprocessing import StandardScaler
        from sksurv.linear_model import CoxnetSurvivalAnalysis
        from sksurv.util import Surv

        scaler = StandardScaler().fit(features(train))
        xs = {"train": scaler.transform(features(train)), "val": scaler.transform(features(val)),
              "test": scaler.transform(features(test))}
        t, e = censor_at_horizon(train.time, train.event, train.horizon_years)
        y = Surv.from_arrays(event=e.astype(bool), time=t)
        h = horizon_days(train.horizon_years)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = CoxnetSurvivalAnalysis(l1_ratio=0.5, n_alphas=20, alpha_min_ratio=alpha_min_ratio, max_iter=2000,
                                           fit_baseline_model=True).fit(xs["train"], y)

        def prob_at_h(alpha: float, part: str) -> np.ndarray:
            fns = model.predict_survival_function(xs[part], alpha=alpha)
            return np.array([1.0 - float(f(min(h, f.x[-1]))) for f in fns])

        # one path fit; the validation split picks the penalty along it
        best = max((float(_val_score(val, prob_at_h(float(a), "val"))), float(a)) for a in model.alphas_[::2])
        alpha = best[1]
        return BaselinePrediction(name, prob_at_h(alpha, "val"), prob_at_h(alpha, "test"),
                                  model.predict(xs["test"], alpha=alpha), f"alpha={alpha:.4g}")

    return run


def _hgb(features: Callable[[OmicsTable], np.ndarray]) -> Callable:
    def run(train: OmicsTable, val: OmicsTable, test: OmicsTable, name: str) -> BaselinePrediction:
        from sklearn.ensemble import HistGradientBoostingClassifier

        has = ~np.isnan(train.label)
        xs = {"train": features(train), "val": features(val), "test": features(test)}

        def fit_predict(lr: float):  # noqa: ANN202
            m = HistGradientBoostingClassifier(learning_rate=lr, max_iter=200, max_leaf_nodes=15,
                                               l2_regularization=1.0, random_state=0)
            m.fit(xs["train"][has], train.label[has].astype(int))
            return m, lambda m, part: m.predict_proba(xs[part])[:, 1]

        lr, model = _select(name, [0.03, 0.1], fit_predict, val)
        prob = model.predict_proba(xs["test"])[:, 1]
        return BaselinePrediction(name, model.predict_proba(xs["val"])[:, 1], prob, prob, f"learning_rate={lr:g}")

    return run


def _builders(encoder: ClinicalEncoder, alpha_min_ratio: float = ALPHA_MIN_RATIO) -> dict[str, Callable]:
    clinical = encoder.design

    def full(t: OmicsTable) -> np.ndarray:
        return np.concatenate([gene_design(t), layer_design(t), clinical(t)], axis=1)

    return {
        "clinical": _logistic(clinical, [1.0]),
        "logistic_l2": _logistic(full, [0.001, 0.01, 0.1]),
        "coxnet": _coxnet(full, alpha_min_ratio),
        "hgb": _hgb(full),
    }


BASELINES = ("clinical", "logistic_l2", "coxnet", "hgb")


def anchor_linear(train: OmicsTable, val: OmicsTable, encoder: ClinicalEncoder, kind: str = "logistic",
                  grid: tuple[float, ...] = (0.001, 0.01, 0.1), alpha_min_ratio: float = ALPHA_MIN_RATIO
                  ) -> dict[str, np.ndarray | float | str]:
    """A penalised linear model on the omics model's wide inputs, as raw-scale weights to anchor it.

    ``kind="logistic"``: L2 logistic regression on the labelled training patients (``C`` from ``grid``);
    ``kind="coxnet"``: Cox elastic net (l1_ratio 0.5, as the ``coxnet`` baseline) on every training patient,
    its linear predictor then mapped to a logit by a one-variable logistic fit on the labelled training
    patients (Platt scaling). The penalty is chosen on the validation split either way.

    Features: expression and expression × coefficient of every gene, cancer type one-hot (without the
    unknown type), age z (missing → 0) and the age-missing flag — exactly the inputs of
    :class:`oncofm.omics.model.OmicsTransformer`'s linear path, so the fitted weights can be copied into it
    (the residual model then starts as this logistic regression). ``C`` is chosen on the validation split
    (AUC + C-index), as for the ``logistic_l2`` baseline.

    Returns ``genes`` (2G,), ``cancer`` (n_cancer_types,) with 0 for the unknown type, ``clinical`` (2,),
    ``bias`` and ``chosen``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    def design(t: OmicsTable) -> np.ndarray:  # the wide path's columns, in its order (no sex)
        p = encoder.design_parts(t)
        return np.concatenate([gene_design(t), layer_design(t), p["cancer"], p["age"], p["covariates"]], 1)

    n_genes = 2 * train.pairs.shape[1]
    n_layers = layer_design(train).shape[1]
    xs = {"train": design(train), "val": design(val)}
    has = ~np.isnan(train.label)
    scaler = StandardScaler().fit(xs["train"])
    zs = {k: scaler.transform(v) for k, v in xs.items()}
    if kind == "logistic":
        best = (-np.inf, None, None)
        for c in grid:
            m = LogisticRegression(C=c, max_iter=2000).fit(zs["train"][has], train.label[has].astype(int))
            score = _val_score(val, m.predict_proba(zs["val"])[:, 1])
            if score > best[0]:
                best = (score, c, m)
        _, c, m = best
        coef, intercept, chosen = m.coef_[0], float(m.intercept_[0]), f"logistic C={c:g}"
    elif kind == "coxnet":
        from sksurv.linear_model import CoxnetSurvivalAnalysis
        from sksurv.util import Surv

        t, e = censor_at_horizon(train.time, train.event, train.horizon_years)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cox = CoxnetSurvivalAnalysis(l1_ratio=0.5, n_alphas=20, alpha_min_ratio=alpha_min_ratio,
                                         max_iter=2000).fit(
                zs["train"], Surv.from_arrays(event=e.astype(bool), time=t))
        # the score is rank-based, so the linear predictor ranks validation patients directly
        scores = [(float(_val_score(val, zs["val"] @ cox.coef_[:, i])), i) for i in range(0, cox.coef_.shape[1], 2)]
        i = max(scores)[1]
        beta = cox.coef_[:, i]
        platt = LogisticRegression(C=1e6, max_iter=2000).fit((zs["train"][has] @ beta)[:, None],
                                                             train.label[has].astype(int))
        a = float(platt.coef_[0, 0])
        coef, intercept, chosen = a * beta, float(platt.intercept_[0]), f"coxnet alpha={cox.alphas_[i]:.4g}"
    else:
        raise ValueError(f"unknown anchor {kind!r}; choose 'logistic' or 'coxnet'")
    w = coef / scaler.scale_  # raw-scale weights
    bias = intercept - float((coef * scaler.mean_ / scaler.scale_).sum())
    c = chosen
    n_ct = len(encoder.cancer_types)
    start = n_genes + n_layers
    out = {"genes": w[:n_genes], "cancer": np.concatenate([[0.0], w[start:start + n_ct - 1]]),
           "clinical": w[start + n_ct - 1:start + n_ct + 1], "bias": bias, "chosen": c}
    if n_layers:
        out["layers"] = w[n_genes:start]
    if encoder.covariates:
        out["covariates"] = w[start + n_ct + 1:]
    return out


def run_baselines(train: OmicsTable, val: OmicsTable, test: OmicsTable, encoder: ClinicalEncoder,
                  names: tuple[str, ...] = BASELINES, alpha_min_ratio: float = ALPHA_MIN_RATIO
                  ) -> dict[str, BaselinePrediction]:
    """Fit each named baseline on ``train``, choose on ``val``, predict ``test``."""
    from oncofm.logging_utils import track

    builders = _builders(encoder, alpha_min_ratio)
    unknown = sorted(set(names) - set(builders))
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; choose from {sorted(builders)}")
    out = {}
    for name in track(list(names), "baselines"):
        out[name] = builders[name](train, val, test, name)
        log.info("baseline %s fitted (%s)", name, out[name].chosen)
    return out
