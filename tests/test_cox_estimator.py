"""BatchedCoxPH against lifelines (Efron) and statsmodels PHReg (Breslow) on the real tcga13 training split."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from oncofm.survival.cox import (
    NOTE_CONSTANT,
    NOTE_FEW_EVENTS,
    NOTE_MISSING,
    NOTE_NOT_CONVERGED,
    NOTE_SEPARATION,
    BatchedCoxPH,
    ConvergenceWarning,
    _Block,
    _build_stratum,
    _loglik_grad_info,
)
from oncofm.survival.endpoints import censor_at_horizon

# cancer types whose 5-year-censored training deaths include tied times (checked in the test)
TIED_TYPES = ("BRCA", "HNSC", "LUSC")


@pytest.fixture(scope="module")
def train_data(tcga13_run: Path) -> dict[str, tuple[pd.DataFrame, np.ndarray, np.ndarray]]:
    """Per cancer type: (normalised training expression, time censored at 5 y, event)."""
    from oncofm.cohort.normalize import load_normalized_expression

    patients = pd.read_parquet(tcga13_run / "cohort" / "patients.parquet").set_index("patient_id")
    splits = pd.read_parquet(tcga13_run / "cohort" / "splits.parquet").set_index("patient_id")
    expr = load_normalized_expression(tcga13_run)
    train = splits.index[splits["split"] == "train"]
    out = {}
    for ct in (*TIED_TYPES, "LUAD", "GBM"):
        ids = [i for i in train if patients.loc[i, "cancer_type"] == ct]
        t, e = censor_at_horizon(patients.loc[ids, "os_days"], patients.loc[ids, "os_event"], 5)
        out[ct] = (expr.loc[ids], t, e)
    return out


def _sample_genes(x: pd.DataFrame, k: int, seed: int) -> list[str]:
    # well-behaved genes: no missing values, many distinct values (sparse genes are tested for separation below)
    ok = [g for g in x.columns if x[g].notna().all() and x[g].nunique() > len(x) // 2]
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(ok, size=k, replace=False).tolist())


def test_real_data_has_tied_death_times(train_data: dict) -> None:
    for ct in TIED_TYPES:
        _, t, e = train_data[ct]
        deaths = pd.Series(t[e == 1])
        assert deaths.duplicated().sum() >= 1, f"{ct}: expected tied death times in the training split"


@pytest.mark.parametrize("ct", TIED_TYPES)
def test_efron_matches_lifelines(train_data: dict, ct: str) -> None:
    from lifelines import CoxPHFitter

    x, t, e = train_data[ct]
    genes = _sample_genes(x, 8, seed=sum(map(ord, ct)))
    fit = BatchedCoxPH(ties="efron").fit(x[genes], t, e).summary_
    for g in genes:
        df = pd.DataFrame({"x": x[g].to_numpy(dtype=float), "t": t, "e": e})
        ref = CoxPHFitter().fit(df, "t", "e", fit_options={"precision": 1e-12, "r_precision": 0}).summary.loc["x"]
        assert fit.loc[g, "coef"] == pytest.approx(ref["coef"], abs=1e-5)
        assert fit.loc[g, "se"] == pytest.approx(ref["se(coef)"], abs=1e-5)
        assert fit.loc[g, "p"] == pytest.approx(ref["p"], abs=1e-5)
        assert fit.loc[g, "converged"] and fit.loc[g, "note"] == ""


@pytest.mark.parametrize("ct", TIED_TYPES)
def test_breslow_matches_statsmodels(train_data: dict, ct: str) -> None:
    from statsmodels.duration.hazard_regression import PHReg

    x, t, e = train_data[ct]
    genes = _sample_genes(x, 10, seed=7 + len(ct))
    fit = BatchedCoxPH(ties="breslow").fit(x[genes], t, e).summary_
    for g in genes:
        ref = PHReg(t, x[g].to_numpy(dtype=float)[:, None], status=e, ties="breslow").fit()
        assert abs(fit.loc[g, "coef"] - ref.params[0]) < 1e-8
        assert abs(fit.loc[g, "se"] - ref.bse[0]) < 1e-8
        assert abs(fit.loc[g, "p"] - ref.pvalues[0]) < 1e-8


def test_stratified_matches_lifelines_and_statsmodels(train_data: dict) -> None:
    from lifelines import CoxPHFitter
    from statsmodels.duration.hazard_regression import PHReg

    parts = [train_data[ct] for ct in TIED_TYPES]
    x = pd.concat([p[0] for p in parts])
    t = np.concatenate([p[1] for p in parts])
    e = np.concatenate([p[2] for p in parts])
    strata = np.repeat(TIED_TYPES, [len(p[0]) for p in parts])
    genes = _sample_genes(x, 4, seed=3)
    efron = BatchedCoxPH().fit(x[genes], t, e, strata=strata).summary_
    breslow = BatchedCoxPH(ties="breslow").fit(x[genes], t, e, strata=strata).summary_
    for g in genes:
        df = pd.DataFrame({"x": x[g].to_numpy(dtype=float), "t": t, "e": e, "s": strata})
        ref = CoxPHFitter().fit(df, "t", "e", strata=["s"],
                                fit_options={"precision": 1e-12, "r_precision": 0}).summary.loc["x"]
        assert efron.loc[g, "coef"] == pytest.approx(ref["coef"], abs=1e-5)
        assert efron.loc[g, "se"] == pytest.approx(ref["se(coef)"], abs=1e-5)
        sm = PHReg(t, x[g].to_numpy(dtype=float)[:, None], status=e, strata=strata, ties="breslow").fit()
        assert abs(breslow.loc[g, "coef"] - sm.params[0]) < 1e-8
        assert abs(breslow.loc[g, "se"] - sm.bse[0]) < 1e-8


def test_score_and_information_match_finite_differences(train_data: dict) -> None:
    x, t, e = train_data["BRCA"]
    genes = _sample_genes(x, 5, seed=1)
    st = _build_stratum(t, e, np.arange(len(t)))
    blk = _Block.make(x[genes].to_numpy(dtype=np.float64)[st.rows].T.copy(), st)
    b = np.linspace(-0.4, 0.4, len(genes))
    h = 1e-5
    for efron in (True, False):
        ll, grad, info = _loglik_grad_info(b, [blk], [st], efron)
        llp, gp, _ = _loglik_grad_info(b + h, [blk], [st], efron)
        llm, gm, _ = _loglik_grad_info(b - h, [blk], [st], efron)
        np.testing.assert_allclose(grad, (llp - llm) / (2 * h), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(info, -(gp - gm) / (2 * h), rtol=1e-6, atol=1e-6)


def test_missing_values_are_dropped_per_gene(train_data: dict) -> None:
    from lifelines import CoxPHFitter

    x, t, e = train_data["HNSC"]
    genes = _sample_genes(x, 3, seed=5)
    xm = x[genes].copy()
    xm.iloc[::7, 0] = np.nan                  # partial missingness in one gene only
    fit = BatchedCoxPH().fit(xm, t, e).summary_
    g = genes[0]
    keep = xm[g].notna().to_numpy()
    df = pd.DataFrame({"x": xm[g].to_numpy(dtype=float)[keep], "t": t[keep], "e": e[keep]})
    ref = CoxPHFitter().fit(df, "t", "e", fit_options={"precision": 1e-12, "r_precision": 0}).summary.loc["x"]
    assert fit.loc[g, "coef"] == pytest.approx(ref["coef"], abs=1e-5)
    assert fit.loc[g, "n"] == keep.sum() and fit.loc[g, "events"] == e[keep].sum()
    assert fit.loc[genes[1], "n"] == len(t)


def test_degenerate_genes_give_nan_with_reason(train_data: dict) -> None:
    x, t, e = train_data["LUAD"]
    n = len(t)
    good = _sample_genes(x, 2, seed=11)
    rank = pd.Series(t).rank(method="first").to_numpy()
    cols = {
        "good_a": x[good[0]].to_numpy(dtype=float),
        "good_b": x[good[1]].to_numpy(dtype=float),
        "constant": np.full(n, 1.3),
        "separated": -rank,                   # earlier time -> higher value: the dying patient always ranks first
        "all_missing": np.full(n, np.nan),
    }
    X = pd.DataFrame(cols)
    with pytest.warns(ConvergenceWarning, match="3 of 5 genes"):
        fit = BatchedCoxPH().fit(X, t, e)
    s = fit.summary_
    assert s.loc["good_a", "note"] == "" and np.isfinite(s.loc["good_a", "coef"])
    assert s.loc["constant", "note"].startswith(NOTE_CONSTANT)
    assert s.loc["separated", "note"].startswith(NOTE_SEPARATION)
    assert s.loc["all_missing", "note"].startswith(NOTE_MISSING)
    bad = s.loc[["constant", "separated", "all_missing"]]
    assert bad[["coef", "se", "z", "p"]].isna().all().all()
    assert not np.isinf(s[["coef", "se", "z", "p"]].to_numpy(dtype=float)).any()
    assert not bad["converged"].any()


def test_too_few_events_and_non_convergence(train_data: dict) -> None:
    x, t, e = train_data["GBM"]
    genes = _sample_genes(x, 3, seed=2)
    with pytest.warns(ConvergenceWarning, match="too few events"):
        few = BatchedCoxPH(min_events=int(e.sum()) + 1).fit(x[genes], t, e)
    assert few.summary_["note"].str.startswith(NOTE_FEW_EVENTS).all()
    assert few.summary_["coef"].isna().all()
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        short = BatchedCoxPH(max_iter=1, tol=1e-14).fit(x[genes], t, e)
    assert short.summary_["note"].str.startswith(NOTE_NOT_CONVERGED).all()
    assert short.summary_["coef"].isna().all() and not short.converged_.any()


def test_chunking_does_not_change_results(train_data: dict) -> None:
    x, t, e = train_data["LUSC"]
    genes = _sample_genes(x, 40, seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        whole = BatchedCoxPH().fit(x[genes], t, e).summary_
        chunked = BatchedCoxPH(chunk_size=7).fit(x[genes], t, e).summary_
    pd.testing.assert_frame_equal(whole, chunked, check_exact=False, atol=1e-12, rtol=0)


def test_invalid_input_is_a_value_error() -> None:
    x = np.zeros((4, 2))
    with pytest.raises(ValueError, match="ties"):
        BatchedCoxPH(ties="exact").fit(x, [1, 2, 3, 4], [1, 0, 1, 0])
    with pytest.raises(ValueError, match="rows"):
        BatchedCoxPH().fit(x, [1, 2, 3], [1, 0, 1])
    with pytest.raises(ValueError, match="event"):
        BatchedCoxPH().fit(x, [1, 2, 3, 4], [1, 0, 2, 0])
    with pytest.raises(ValueError, match="time"):
        BatchedCoxPH().fit(x, [1, -2, 3, 4], [1, 0, 1, 0])


def _efron_loglik(b: float, x: np.ndarray, t: np.ndarray, e: np.ndarray) -> float:
    """Efron partial log-likelihood, written out event time by event time (reference for the tests)."""
    total = 0.0
    for tk in np.unique(t[e == 1]):
        dead, risk = (t == tk) & (e == 1), t >= tk
        d = dead.sum()
        s0, sd = np.exp(b * x[risk]).sum(), np.exp(b * x[dead]).sum()
        total += b * x[dead].sum() - sum(np.log(s0 - (j / d) * sd) for j in range(d))
    return total


def test_real_separated_genes_are_detected_exactly(train_data: dict) -> None:
    """LUSC's IL9, PRLH, PTH2 are almost always at the floor; every death has the lowest value at risk."""
    x, t, e = train_data["LUSC"]
    genes = ["IL9", "PRLH", "PTH2"]
    with pytest.warns(ConvergenceWarning):
        fit = BatchedCoxPH().fit(x[genes], t, e).summary_
    for g in genes:
        assert fit.loc[g, "note"].startswith(NOTE_SEPARATION) and np.isnan(fit.loc[g, "coef"])
        v = x[g].to_numpy(dtype=float)
        # the definition, checked directly: the likelihood keeps rising as the coefficient goes to -inf
        lls = [_efron_loglik(b, v, t, e) for b in (-1.0, -4.0, -16.0)]
        assert lls[0] < lls[1] < lls[2]


def test_estimate_is_the_maximum_where_lifelines_diverges(train_data: dict) -> None:
    """BRCA AMBN (sparse): lifelines ends at coef ≈ -47; the true maximum is near +0.54 (checked by brute force)."""
    x, t, e = train_data["BRCA"]
    v = x["AMBN"].to_numpy(dtype=float)
    fit = BatchedCoxPH().fit(v[:, None], t, e)
    b = fit.coef_[0]
    assert fit.converged_[0] and 0.3 < b < 0.8
    assert fit.loglik_[0] == pytest.approx(_efron_loglik(b, v, t, e), abs=1e-8)
    for other in (b - 0.05, b + 0.05, -47.0, 0.0):
        assert _efron_loglik(other, v, t, e) < fit.loglik_[0]
