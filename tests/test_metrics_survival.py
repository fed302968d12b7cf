"""Survival metrics against reference implementations (sklearn, lifelines, scikit-survival) on real tcga13 data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from oncofm.survival.endpoints import horizon_days, horizon_label
from oncofm.survival.metrics import (
    POOLED,
    SurvivalTargets,
    auc_score,
    bootstrap_auc,
    evaluate_predictions,
    harrell_c_index,
    ipcw_brier,
    mean_per_cancer,
    paired_auc_difference,
    td_auc,
)


@pytest.fixture(scope="module")
def real(shared_data) -> pd.DataFrame:
    """Real tcga13 overall survival with a noisy risk score (age + noise), ties in times included."""
    p = pd.read_csv(shared_data / "tcga13" / "patients.csv")
    p = p[p["age"].notna()].copy()
    rng = np.random.default_rng(0)
    p["time"] = p["survival_months"] * 30.4375
    p["risk"] = (p["age"] - 60) / 10 + rng.normal(size=len(p))
    p["risk_tied"] = np.round(p["risk"])  # many tied risks
    return p.reset_index(drop=True)


def test_auc_matches_sklearn(real: pd.DataFrame) -> None:
    from sklearn.metrics import roc_auc_score

    y = horizon_label(real["time"], real["event"])
    has = ~np.isnan(y)
    for col in ("risk", "risk_tied"):
        assert auc_score(y[has], real[col][has]) == pytest.approx(roc_auc_score(y[has], real[col][has]), abs=1e-12)
    assert np.isnan(auc_score([1, 1, 1], [0.1, 0.2, 0.3]))


def test_c_index_matches_lifelines_and_sksurv(real: pd.DataFrame) -> None:
    from lifelines.utils import concordance_index
    from sksurv.metrics import concordance_index_censored

    t, e = real["time"].to_numpy(), real["event"].to_numpy()
    for col in ("risk", "risk_tied"):
        r = real[col].to_numpy()
        ours = harrell_c_index(t, e, r)
        assert ours == pytest.approx(concordance_index(t, -r, e), abs=1e-10)
        assert ours == pytest.approx(concordance_index_censored(e.astype(bool), t, r)[0], abs=1e-10)


def test_bootstrap_ci_brackets_point_and_shrinks_with_n(real: pd.DataFrame) -> None:
    y = horizon_label(real["time"], real["event"])
    has = ~np.isnan(y)
    auc, lo, hi = bootstrap_auc(y[has], real["risk"][has], n_boot=400)
    assert lo < auc < hi
    _, lo_s, hi_s = bootstrap_auc(y[has][:150], real["risk"][has][:150], n_boot=400)
    assert (hi_s - lo_s) > (hi - lo)
    assert bootstrap_auc(y[has], real["risk"][has], n_boot=400) == (auc, lo, hi)  # seeded


def test_td_auc_and_brier_match_sksurv(real: pd.DataFrame) -> None:
    from sksurv.metrics import brier_score, cumulative_dynamic_auc
    from sksurv.util import Surv

    train, test = real.iloc[::2], real.iloc[1::2]
    test = test[test["time"] < train["time"].max()]
    tr = SurvivalTargets(train["time"].to_numpy(), train["event"].to_numpy())
    te = SurvivalTargets(test["time"].to_numpy(), test["event"].to_numpy())
    h = horizon_days(5)
    ytr = Surv.from_arrays(train["event"].astype(bool), train["time"])
    yte = Surv.from_arrays(test["event"].astype(bool), test["time"])
    ref, _ = cumulative_dynamic_auc(ytr, yte, test["risk"].to_numpy(), [h])
    assert td_auc(tr, te, test["risk"]) == pytest.approx(ref[0], abs=1e-12)
    prob = 1 / (1 + np.exp(-test["risk"].to_numpy()))
    _, ref_b = brier_score(ytr, yte, (1 - prob)[:, None], [h])
    assert ipcw_brier(tr, te, prob) == pytest.approx(ref_b[0], abs=1e-12)


def test_evaluate_predictions_pooled_and_per_type(real: pd.DataFrame) -> None:
    train, test = real.iloc[::2], real.iloc[1::2]
    prob = 1 / (1 + np.exp(-test["risk"].to_numpy()))
    table = evaluate_predictions(time=test["time"], event=test["event"], prob=prob, risk=test["risk"],
                                 cancer_type=test["tcga_project"], train_time=train["time"],
                                 train_event=train["event"], n_boot=50)
    assert table.index[0] == POOLED
    assert set(table.index[1:]) == set(test["tcga_project"])
    pooled = table.loc[POOLED]
    assert pooled["n"] == len(test) and pooled["n_labelled"] + pooled["n_unlabelled"] == len(test)
    y = horizon_label(test["time"], test["event"])
    assert pooled["n_labelled"] == int((~np.isnan(y)).sum())
    brca = test["tcga_project"] == "BRCA"
    assert table.loc["BRCA", "c_index"] == pytest.approx(
        harrell_c_index(test["time"][brca], test["event"][brca], test["risk"][brca]))
    assert 0.4 < mean_per_cancer(table) < 0.8
    with pytest.raises(ValueError, match="lengths differ"):
        evaluate_predictions(time=[1, 2], event=[1, 0], prob=[0.5], train_time=[1], train_event=[1])


def test_paired_auc_difference_is_exact_and_its_ci_reflects_the_pairing() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300).astype(float)
    signal = y + rng.normal(scale=1.0, size=300)
    # the same scores: difference 0 in every resample
    assert paired_auc_difference(y, signal, signal, n_boot=200) == (0.0, 0.0, 0.0)
    # planted: b is a with a small extra noise; the difference is the AUC difference, and pairing makes
    # its CI narrower than the two unpaired CIs would suggest
    b = signal + rng.normal(scale=0.3, size=300)
    d, lo, hi = paired_auc_difference(y, signal, b, n_boot=1000)
    assert d == pytest.approx(auc_score(y, signal) - auc_score(y, b))
    assert lo <= d <= hi
    _, alo, ahi = bootstrap_auc(y, signal, n_boot=1000)
    assert hi - lo < (ahi - alo) / 2
    # an informative score against a random one: the CI excludes 0
    d, lo, hi = paired_auc_difference(y, signal, rng.normal(size=300), n_boot=1000)
    assert lo > 0.1
    with pytest.raises(ValueError, match="length"):
        paired_auc_difference(y, signal, signal[:10])
