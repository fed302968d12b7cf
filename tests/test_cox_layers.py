"""Cox per omics layer: CNV (continuous) and mutation status (binary) on the real tcga13 training split.

Exactness against lifelines (Efron) for CNV and mutation features; rare mutations excluded with a note;
completely separated ones re-estimated with Firth's penalised partial likelihood (checked against an
independent brute-force implementation) or excluded; the stage's layered table and BH within layer × type.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from statsmodels.stats.multitest import multipletests

from oncofm.survival.cox import NOTE_SEPARATION, BatchedCoxPH, firth_cox
from oncofm.survival.cox_stage import (
    CoxSettings,
    fit_coefficients,
    load_coefficients,
    run_cox,
    significant_counts,
)
from oncofm.survival.endpoints import censor_at_horizon


def _train_layer(run: Path, layer: str, ct: str) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    patients = pd.read_parquet(run / "cohort" / "patients.parquet").set_index("patient_id")
    splits = pd.read_parquet(run / "cohort" / "splits.parquet").set_index("patient_id")
    m = pd.read_parquet(run / "cohort" / f"{layer}.parquet")
    ids = [i for i in splits.index[splits["split"] == "train"] if patients.loc[i, "cancer_type"] == ct and i in m.index]
    x = m.loc[ids].dropna(axis=1, how="all")
    t, e = censor_at_horizon(patients.loc[ids, "os_days"], patients.loc[ids, "os_event"], 5)
    return x, t, e


def _lifelines(x: np.ndarray, t: np.ndarray, e: np.ndarray) -> pd.Series:
    from lifelines import CoxPHFitter

    df = pd.DataFrame({"x": x.astype(float), "t": t, "e": e})
    return CoxPHFitter().fit(df, "t", "e", fit_options={"precision": 1e-12, "r_precision": 0}).summary.loc["x"]


@pytest.mark.parametrize("ct", ["LGG", "BRCA"])
def test_cnv_matches_lifelines(tcga13_run: Path, ct: str) -> None:
    x, t, e = _train_layer(tcga13_run, "cnv", ct)
    # planted: the CDKN2A/B deletion region is prognostic in LGG; plus spread-out genes
    planted = [g for g in ("CDKN2A", "EGFR", "MTAP") if g in x]
    genes = planted + [g for g in sorted(x.columns[x.nunique() >= 3])[::40][:6] if g not in planted]
    fit = BatchedCoxPH().fit(x[genes], t, e).summary_
    for g in genes:
        ref = _lifelines(x[g].to_numpy(), t, e)
        assert fit.loc[g, "coef"] == pytest.approx(ref["coef"], abs=1e-5), g
        assert fit.loc[g, "se"] == pytest.approx(ref["se(coef)"], abs=1e-5), g
        assert fit.loc[g, "p"] == pytest.approx(ref["p"], abs=1e-5), g
    if ct == "LGG":
        assert fit.loc["CDKN2A", "coef"] < -0.8 and fit.loc["CDKN2A", "p"] < 1e-6  # deletion (lower CN) -> worse


@pytest.mark.parametrize("ct", ["LGG", "LUAD", "HNSC"])
def test_mutation_matches_lifelines(tcga13_run: Path, ct: str) -> None:
    x, t, e = _train_layer(tcga13_run, "mutation", ct)
    carriers = x.sum()
    ok = [g for g in x.columns if 15 <= carriers[g] <= len(x) - 15]
    genes = sorted(ok)[:8]
    fit = BatchedCoxPH().fit(x[genes], t, e).summary_
    from lifelines.exceptions import ConvergenceError

    compared = 0
    for g in genes:
        try:
            ref = _lifelines(x[g].to_numpy(), t, e)
        except ConvergenceError:  # lifelines' Newton step overflows on a few binary covariates
            continue
        compared += 1
        assert fit.loc[g, "coef"] == pytest.approx(ref["coef"], abs=1e-5), g
        assert fit.loc[g, "se"] == pytest.approx(ref["se(coef)"], abs=1e-5), g
        assert fit.loc[g, "p"] == pytest.approx(ref["p"], abs=1e-5), g
    assert compared >= 5
    if ct == "LGG":  # IDH1-mutant gliomas live longer (real planted answer)
        idh = BatchedCoxPH().fit(x[["IDH1"]], t, e).summary_.loc["IDH1"]
        assert idh["coef"] < -1.0 and idh["p"] < 1e-5


# ---------------------------------------------------------------- Firth, checked independently
def _efron(b: float, x: np.ndarray, t: np.ndarray, e: np.ndarray) -> tuple[float, float]:
    """Plain-python Efron partial log-likelihood and information (one covariate), independent of oncofm."""
    ll, info = 0.0, 0.0
    w = np.exp(b * x)
    for time in np.unique(t[e == 1]):
        dead = (t == time) & (e == 1)
        risk = t >= time
        d = int(dead.sum())
        s = [(w[risk] * x[risk] ** k).sum() for k in range(3)]
        sd = [(w[dead] * x[dead] ** k).sum() for k in range(3)]
        ll += b * x[dead].sum()
        for ell in range(d):
            den = [s[k] - ell / d * sd[k] for k in range(3)]
            ll -= np.log(den[0])
            info += den[2] / den[0] - (den[1] / den[0]) ** 2
    return ll, info


def _firth_reference(x: np.ndarray, t: np.ndarray, e: np.ndarray) -> tuple[float, float]:
    from scipy.optimize import minimize_scalar

    def pen(b: float) -> float:
        ll, info = _efron(b, x, t, e)
        return ll + 0.5 * np.log(info)

    res = minimize_scalar(lambda b: -pen(b), bounds=(-15, 15), method="bounded", options={"xatol": 1e-9})
    stat = 2 * (pen(res.x) - pen(0.0))
    return float(res.x), float(stat)


def test_separated_real_mutation_gets_the_firth_estimate(tcga13_run: Path) -> None:
    from scipy.stats import chi2

    x, t, e = _train_layer(tcga13_run, "mutation", "COAD")
    fit = BatchedCoxPH().fit(x, t, e)
    sep = [g for g, n in zip(x.columns, fit.note_, strict=True) if str(n).startswith(NOTE_SEPARATION)
           and x[g].sum() >= 10][:3]
    assert sep, "expected separated mutations in COAD (carriers that all survive the horizon)"
    for g in sep:
        v = x[g].to_numpy()
        assert e[v == 1].sum() == 0 or e[v == 0].sum() == 0  # the planted answer: an all-surviving group
        firth = firth_cox(v[:, None], t, e)
        coef, stat = _firth_reference(v.astype(float), t, e)
        assert np.isfinite(firth.coef[0]) and abs(firth.coef[0]) < 6
        assert firth.coef[0] == pytest.approx(coef, abs=1e-5)
        assert firth.p[0] == pytest.approx(chi2.sf(stat, 1), rel=1e-3, abs=1e-6)


def test_firth_is_close_to_the_mle_when_data_are_not_separated(tcga13_run: Path) -> None:
    x, t, e = _train_layer(tcga13_run, "mutation", "LGG")
    mle = BatchedCoxPH().fit(x[["IDH1"]], t, e).coef_[0]
    firth = firth_cox(x[["IDH1"]], t, e).coef[0]
    assert abs(firth - mle) < 0.1 and abs(firth) < abs(mle)  # shrunk a little towards 0


# ---------------------------------------------------------------- the stage's rules
def _planted(n: int = 200, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    strong = (rng.random(n) < 0.3).astype(float)
    t = rng.exponential(np.exp(-1.0 * strong)) * 1000
    e = (rng.random(n) < 0.8).astype(float)
    rare = np.zeros(n)
    rare[:4] = 1.0                                                    # 4 carriers < min_carriers=10
    separated = np.zeros(n)
    alive = np.flatnonzero(e == 0)[:12]
    separated[alive] = 1.0                                            # 12 carriers, none died: separation
    x = pd.DataFrame({"STRONG": strong, "RARE": rare, "SEP": separated, "UNMEASURED": np.nan})
    return x, t, e, np.full(n, "X")


@pytest.mark.parametrize("separation", ["firth", "exclude"])
def test_rare_and_separated_mutations(separation: str) -> None:
    x, t, e, ct = _planted()
    table = fit_coefficients(x, t, e, ct, horizon_years=None, pan_cancer=False, layer="mutation", min_carriers=10,
                             separation=separation, progress=False).set_index("gene")
    assert set(table["layer"]) == {"mutation"}
    assert "UNMEASURED" not in table.index                              # not measured in the type: no row
    assert table.loc["STRONG", "note"] == "" and 0.6 < table.loc["STRONG", "coef"] < 1.4
    assert table.loc["RARE", "note"] == "too few carriers (4 < min_carriers=10)"
    assert np.isnan(table.loc["RARE", "coef"]) and not table.loc["RARE", "converged"]
    note = table.loc["SEP", "note"]
    if separation == "firth":
        assert note.startswith("firth: complete separation") and table.loc["SEP", "converged"]
        assert -6 < table.loc["SEP", "coef"] < -0.5 and 0 < table.loc["SEP", "p"] < 1
    else:
        assert note.startswith("complete separation") and note.endswith("excluded (separation=exclude)")
        assert np.isnan(table.loc["SEP", "coef"])


def test_stage_writes_every_layer_with_bh_within_layer_and_type(tcga13_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tcga13_run / "cohort", run / "cohort")
    run_cox(CoxSettings(run=str(run), plots=False))
    table = load_coefficients(run, layer=None)
    assert table.columns[:3].tolist() == ["gene", "layer", "cancer_type"]
    assert set(table["layer"]) == {"expression", "cnv", "mutation"}
    for _, part in table.dropna(subset=["p"]).groupby(["layer", "cancer_type"]):
        np.testing.assert_allclose(part["q"], multipletests(part["p"].to_numpy(), method="fdr_bh")[1], atol=1e-14)
    # no row for a cancer type without that layer (KIRP, LUSC, SKCM have no CNV in tcga13)
    assert not set(table.loc[table["layer"] == "cnv", "cancer_type"]) & {"KIRP", "LUSC", "SKCM"}
    mut = table[table["layer"] == "mutation"].set_index(["gene", "cancer_type"])
    assert mut.loc[("IDH1", "LGG"), "q"] < 0.05 and mut.loc[("IDH1", "LGG"), "coef"] < 0
    assert (table["note"].str.startswith("too few carriers") == (table["layer"] != "expression")
            & table["note"].str.startswith("too few carriers")).all()
    counts = significant_counts(table)
    assert counts.loc["cnv", "LGG"] >= 10 and counts.loc["mutation", "LGG"] >= 2
    assert load_coefficients(run).equals(table[table["layer"] == "expression"].reset_index(drop=True))
    # changing a layer setting triggers the stage contract (refit), the same settings skip
    assert run_cox(CoxSettings(run=str(run), plots=False)) == {"coefficients": run / "cox" / "coefficients.parquet"}
    mtime = (run / "cox" / "coefficients.parquet").stat().st_mtime_ns
    run_cox(CoxSettings(run=str(run), plots=False, separation="exclude"))
    assert (run / "cox" / "coefficients.parquet").stat().st_mtime_ns != mtime
    excluded = load_coefficients(run, layer=None)
    assert excluded["note"].str.endswith("excluded (separation=exclude)").sum() == \
        table["note"].str.startswith("firth").sum() > 0
