"""Evaluation metrics shared by every OncoFM model (omics, slide, fusion).

One call, :func:`evaluate_predictions`, gives for a set of patients — pooled and per cancer type:

- ``auc``: the 5-year AUC on patients *with* a binary label (death by 5 years vs. followed beyond), with a
  percentile-bootstrap 95% CI (``auc_lo``, ``auc_hi``); patients censored before 5 years are left out and
  counted (``n_unlabelled``);
- ``c_index``: Harrell's C-index on *all* patients (overall survival, full follow-up), higher risk = earlier
  death; ties in risk count 1/2, as in lifelines and scikit-survival;
- ``td_auc``: the time-dependent (cumulative/dynamic) AUC at 5 years with inverse-probability-of-censoring
  weights estimated on the training patients (scikit-survival ``cumulative_dynamic_auc``), all patients;
- ``brier``: the IPCW Brier score at 5 years (scikit-survival ``brier_score``) with S(5y) = 1 - P(death by 5y),
  all patients; ``brier_labelled`` the plain Brier score on labelled patients.

A metric that cannot be computed for a group (one class only, no event before the horizon...) is NaN,
never an exception: small cancer types in a test split are normal.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd

from oncofm.survival.endpoints import horizon_days, horizon_label

log = logging.getLogger(__name__)

__all__ = ["auc_score", "bootstrap_auc", "paired_auc_difference", "harrell_c_index", "td_auc", "ipcw_brier", "evaluate_predictions",
           "SurvivalTargets", "POOLED"]

POOLED = "pooled"


def auc_score(y: npt.ArrayLike, score: npt.ArrayLike) -> float:
    """ROC AUC (Mann–Whitney, ties count 1/2); NaN when ``y`` has one class only."""
    return float(_auc_rows(np.asarray(y, dtype=float)[None, :], np.asarray(score, dtype=float)[None, :])[0])


def _auc_rows(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """AUC of each row of (B, n) labels/scores via average ranks."""
    from scipy.stats import rankdata

    ranks = rankdata(s, axis=1)  # (B, n), ties -> average rank
    n_pos = y.sum(axis=1)
    n_neg = y.shape[1] - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = ((ranks * y).sum(axis=1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    auc[(n_pos == 0) | (n_neg == 0)] = np.nan
    return auc


def _bootstrap_ci(n: int, stat: Callable[[np.ndarray], np.ndarray], n_boot: int, seed: int,
                  level: float) -> tuple[float, float]:
    """Percentile CI of ``stat(idx)`` over ``n_boot`` resamples of ``n`` patients with replacement;
    ``stat`` maps (B, n) resample indices to (B,) values (NaN ones are dropped)."""
    rng = np.random.default_rng(seed)
    values = []
    for start in range(0, n_boot, 250):  # chunks bound the memory of (B, n) arrays
        values.append(stat(rng.integers(0, n, size=(min(250, n_boot - start), n))))
    boot = np.concatenate(values)
    boot = boot[np.isfinite(boot)]
    alpha = (1 - level) / 2
    return float(np.quantile(boot, alpha)), float(np.quantile(boot, 1 - alpha))


def bootstrap_auc(y: npt.ArrayLike, score: npt.ArrayLike, *, n_boot: int = 1000, seed: int = 0,
                  level: float = 0.95) -> tuple[float, float, float]:
    """AUC and its percentile-bootstrap CI (patients resampled with replacement).

    Returns ``(auc, lo, hi)``; the CI is NaN when fewer than 2 samples of each class exist.
    """
    y = np.asarray(y, dtype=float)
    s = np.asarray(score, dtype=float)
    point = auc_score(y, s)
    if np.isnan(point) or min(y.sum(), len(y) - y.sum()) < 2 or n_boot < 1:
        return point, float("nan"), float("nan")
    return (point, *_bootstrap_ci(len(y), lambda idx: _auc_rows(y[idx], s[idx]), n_boot, seed, level))


def paired_auc_difference(y: npt.ArrayLike, a: npt.ArrayLike, b: npt.ArrayLike, *, n_boot: int = 2000,
                          seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """``AUC(a) - AUC(b)`` on the same patients and its paired percentile-bootstrap CI (each resample scores
    both on the same patients, so what they share cancels). Returns ``(difference, lo, hi)``."""
    y = np.asarray(y, dtype=float)
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if not (len(y) == len(a) == len(b)):
        raise ValueError(f"labels and scores differ in length: {len(y)}, {len(a)}, {len(b)}")
    point = auc_score(y, a) - auc_score(y, b)
    if np.isnan(point) or min(y.sum(), len(y) - y.sum()) < 2 or n_boot < 1:
        return point, float("nan"), float("nan")

    def diff(idx: np.ndarray) -> np.ndarray:
        return _auc_rows(y[idx], a[idx]) - _auc_rows(y[idx], b[idx])

    return (float(point), *_bootstrap_ci(len(y), diff, n_boot, seed, level))


def paired_c_index_difference(time: npt.ArrayLike, event: npt.ArrayLike, a: npt.ArrayLike, b: npt.ArrayLike, *,
                              n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """``C(a) - C(b)`` (Harrell) on the same patients and its paired percentile-bootstrap CI: each resample of
    patients scores both risks. Returns ``(difference, lo, hi)``."""
    t, e = np.asarray(time, dtype=float), np.asarray(event, dtype=float)
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if not (len(t) == len(e) == len(a) == len(b)):
        raise ValueError(f"lengths differ: {len(t)}, {len(e)}, {len(a)}, {len(b)}")
    point = harrell_c_index(t, e, a) - harrell_c_index(t, e, b)
    if n_boot < 1 or e.sum() < 2:
        return float(point), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(t), len(t))
        if e[idx].sum() == 0:
            continue
        diffs.append(harrell_c_index(t[idx], e[idx], a[idx]) - harrell_c_index(t[idx], e[idx], b[idx]))
    alpha = (1 - level) / 2
    lo, hi = np.nanquantile(diffs, [alpha, 1 - alpha])
    return float(point), float(lo), float(hi)


def harrell_c_index(time: npt.ArrayLike, event: npt.ArrayLike, risk: npt.ArrayLike) -> float:
    """Harrell's C-index: share of comparable pairs ordered correctly by ``risk`` (higher = earlier death).

    A pair (i, j) is comparable when i died first (``t_i < t_j``), or at the same time as a censored j.
    Ties in risk count 1/2. Equals ``lifelines.utils.concordance_index(time, -risk, event)``.
    """
    t = np.asarray(time, dtype=float)
    e = np.asarray(event, dtype=bool)
    r = np.asarray(risk, dtype=float)
    num, den = 0.0, 0.0
    for start in range(0, len(t), 2048):  # rows = subjects i who died; (chunk, n) comparisons
        rows = np.nonzero(e[start:start + 2048])[0] + start
        if len(rows) == 0:
            continue
        ti, ri = t[rows, None], r[rows, None]
        comparable = (t[None, :] > ti) | ((t[None, :] == ti) & ~e[None, :])
        num += float((comparable & (ri > r[None, :])).sum() + 0.5 * (comparable & (ri == r[None, :])).sum())
        den += float(comparable.sum())
    return num / den if den > 0 else float("nan")


@dataclass(frozen=True)
class SurvivalTargets:
    """Survival times (days) and events of a set of patients."""

    time: np.ndarray
    event: np.ndarray

    def structured(self) -> np.ndarray:
        from sksurv.util import Surv

        return Surv.from_arrays(event=self.event.astype(bool), time=self.time.astype(float))


def _ipcw_ok(train: SurvivalTargets, test: SurvivalTargets, horizon: float) -> bool:
    """Whether IPCW metrics at ``horizon`` are defined (an event before it, someone followed beyond it)."""
    return bool(((test.event == 1) & (test.time <= horizon)).any() and (test.time > horizon).any()
                and train.time.max() > horizon)


def _clip_to_train(train: SurvivalTargets, test: SurvivalTargets) -> SurvivalTargets:
    """sksurv's censoring estimator needs test times within the training follow-up; clip the rest."""
    tmax = float(train.time.max())
    time = np.minimum(test.time, tmax - 1e-6)
    return SurvivalTargets(time=time, event=test.event)


def td_auc(train: SurvivalTargets, test: SurvivalTargets, risk: npt.ArrayLike, years: float = 5.0) -> float:
    """Cumulative/dynamic AUC at ``years`` with IPCW from the training patients (scikit-survival)."""
    from sksurv.metrics import cumulative_dynamic_auc

    h = horizon_days(years)
    if not _ipcw_ok(train, test, h):
        return float("nan")
    test = _clip_to_train(train, test)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            auc, _ = cumulative_dynamic_auc(train.structured(), test.structured(), np.asarray(risk, float), [h])
        except ValueError as exc:
            log.debug("td-AUC undefined: %s", exc)
            return float("nan")
    return float(auc[0])


def ipcw_brier(train: SurvivalTargets, test: SurvivalTargets, prob_death: npt.ArrayLike,
               years: float = 5.0) -> float:
    """IPCW Brier score at ``years`` with S(h) = 1 - P(death by h) (scikit-survival ``brier_score``)."""
    from sksurv.metrics import brier_score

    h = horizon_days(years)
    if not _ipcw_ok(train, test, h):
        return float("nan")
    test = _clip_to_train(train, test)
    surv = 1.0 - np.asarray(prob_death, dtype=float)[:, None]  # (n, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            _, score = brier_score(train.structured(), test.structured(), surv, [h])
        except ValueError as exc:
            log.debug("Brier undefined: %s", exc)
            return float("nan")
    return float(score[0])


def _group_metrics(train: SurvivalTargets, time: np.ndarray, event: np.ndarray, prob: np.ndarray,
                   risk: np.ndarray, years: float, n_boot: int, seed: int) -> dict[str, float]:
    label = horizon_label(time, event, years)
    has = ~np.isnan(label)
    auc, lo, hi = bootstrap_auc(label[has], prob[has], n_boot=n_boot, seed=seed)
    test = SurvivalTargets(time=time, event=event)
    brier_l = float(np.mean((prob[has] - label[has]) ** 2)) if has.any() else float("nan")
    return {
        "n": int(len(time)), "n_labelled": int(has.sum()), "n_unlabelled": int((~has).sum()),
        "n_positive": int(np.nansum(label)), "auc": auc, "auc_lo": lo, "auc_hi": hi,
        "c_index": harrell_c_index(time, event, risk) if event.any() else float("nan"),
        "td_auc": td_auc(train, test, risk, years), "brier": ipcw_brier(train, test, prob, years),
        "brier_labelled": brier_l,
    }


def evaluate_predictions(
    *,
    time: npt.ArrayLike,
    event: npt.ArrayLike,
    prob: npt.ArrayLike,
    risk: npt.ArrayLike | None = None,
    cancer_type: npt.ArrayLike | None = None,
    train_time: npt.ArrayLike,
    train_event: npt.ArrayLike,
    years: float = 5.0,
    n_boot: int = 1000,
    seed: int = 0,
    min_group: int = 10,
) -> pd.DataFrame:
    """Every metric, pooled and per cancer type, in one table.

    Parameters
    ----------
    time, event
        Overall survival of the evaluated patients (days, 0/1).
    prob
        Predicted P(death within ``years``), used for AUC and Brier.
    risk
        Risk score for the C-index and td-AUC (default: ``prob``).
    train_time, train_event
        The training patients' survival, for the censoring distribution of the IPCW metrics.
    min_group
        Cancer types with fewer evaluated patients are reported with NaN metrics (counts only).

    Returns
    -------
    DataFrame
        Index ``group`` (``"pooled"`` first, then cancer types); columns n, n_labelled, n_unlabelled,
        n_positive, auc, auc_lo, auc_hi, c_index, td_auc, brier, brier_labelled.
    """
    time = np.asarray(time, dtype=float)
    event = np.asarray(event, dtype=float).astype(int)
    prob = np.asarray(prob, dtype=float)
    risk = prob if risk is None else np.asarray(risk, dtype=float)
    if not (len(time) == len(event) == len(prob) == len(risk)):
        raise ValueError(f"lengths differ: {len(time)=}, {len(event)=}, {len(prob)=}, {len(risk)=}")
    train = SurvivalTargets(time=np.asarray(train_time, float), event=np.asarray(train_event, float).astype(int))
    rows = {POOLED: _group_metrics(train, time, event, prob, risk, years, n_boot, seed)}
    if cancer_type is not None:
        ct = np.asarray(cancer_type).astype(str)
        for c in sorted(set(ct)):
            m = ct == c
            if m.sum() < min_group:
                rows[c] = {"n": int(m.sum())}
                continue
            rows[c] = _group_metrics(train, time[m], event[m], prob[m], risk[m], years, n_boot, seed)
    out = pd.DataFrame.from_dict(rows, orient="index")
    out.index.name = "group"
    return out


def mean_per_cancer(table: pd.DataFrame, metric: str = "c_index") -> float:
    """Unweighted mean of ``metric`` over cancer types (NaN groups skipped)."""
    per = table.drop(index=POOLED, errors="ignore")
    return float(np.nanmean(per[metric].to_numpy(dtype=float))) if len(per) else float("nan")
