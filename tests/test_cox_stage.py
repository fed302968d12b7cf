"""The `cox` stage on the real tcga13 run: table contract, training-only fitting, FDR, skip/redo, plots."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from statsmodels.stats.multitest import multipletests

from oncofm.survival.cox_stage import COLUMNS, PAN_CANCER, CoxSettings, load_coefficients, run_cox
from oncofm.survival.endpoints import horizon_days


def _copy_cohort(src: Path, dst: Path) -> Path:
    shutil.copytree(src / "cohort", dst / "cohort")
    return dst


@pytest.fixture(scope="module")
def cox_run(tcga13_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = _copy_cohort(tcga13_run, tmp_path_factory.mktemp("cox_run"))
    run_cox(CoxSettings(run=str(run)))
    return run


@pytest.fixture(scope="module")
def table(cox_run: Path) -> pd.DataFrame:
    return load_coefficients(cox_run)


def _train(run: Path) -> pd.DataFrame:
    patients = pd.read_parquet(run / "cohort" / "patients.parquet")
    splits = pd.read_parquet(run / "cohort" / "splits.parquet")
    return patients.merge(splits, on="patient_id").query("split == 'train'")


def test_table_contract(table: pd.DataFrame, cox_run: Path) -> None:
    assert tuple(table.columns) == COLUMNS
    genes = pd.read_parquet(cox_run / "cohort" / "expression.parquet").columns
    types = sorted(_train(cox_run)["cancer_type"].unique())
    assert set(table["cancer_type"]) == {*types, PAN_CANCER}
    assert set(table["layer"]) == {"expression"}  # load_coefficients' default: the expression rows
    assert table.groupby("cancer_type").size().eq(len(genes)).all()
    assert (table["horizon_years"] == 5.0).all()
    values = table[["coef", "se", "z", "p", "q"]].to_numpy(dtype=float)
    assert not np.isinf(values).any()
    ok = table["note"] == ""
    firth = table["note"].str.startswith("firth")
    assert table.loc[ok | firth, ["coef", "se", "p", "q"]].notna().all().all()
    assert table.loc[ok | firth, "converged"].all()
    assert table.loc[~ok & ~firth, "coef"].isna().all() and not table.loc[~ok & ~firth, "converged"].any()


def test_counts_are_training_patients_censored_at_5_years(table: pd.DataFrame, cox_run: Path) -> None:
    train = _train(cox_run)
    h = horizon_days(5)
    for ct, part in train.groupby("cancer_type"):
        rows = table[(table["cancer_type"] == ct) & (table["note"] == "")]
        events = int(((part["os_event"] == 1) & (part["os_days"] <= h)).sum())
        if len(rows):
            assert rows["n"].max() == len(part)
            assert rows["events"].max() == events
    pan = table[(table["cancer_type"] == PAN_CANCER) & (table["note"] == "")]
    assert pan["n"].max() == len(train)


def test_few_events_type_is_nan_with_note(table: pd.DataFrame) -> None:
    read = table[table["cancer_type"] == "READ"]      # 9 deaths within 5 years in training < 10
    assert read["events"].max() < 10
    assert read["coef"].isna().all()
    notes = read["note"].to_numpy()
    assert all(n.startswith(("too few events (9 < min_events=10)", "no non-missing values")) for n in notes)
    assert sum(n.startswith("too few events") for n in notes) > 1000


def test_q_is_bh_within_each_cancer_type(table: pd.DataFrame) -> None:
    for _, part in table.dropna(subset=["p"]).groupby(["layer", "cancer_type"]):
        expected = multipletests(part["p"].to_numpy(), method="fdr_bh")[1]
        np.testing.assert_allclose(part["q"].to_numpy(), expected, rtol=0, atol=1e-14)


def test_row_matches_lifelines_refit_from_raw_tables(table: pd.DataFrame, cox_run: Path) -> None:
    from lifelines import CoxPHFitter

    from oncofm.cohort.normalize import load_normalized_expression

    train = _train(cox_run).set_index("patient_id")
    expr = load_normalized_expression(cox_run)
    kirc = train[train["cancer_type"] == "KIRC"]
    row = table[(table["cancer_type"] == "KIRC") & (table["note"] == "")].nsmallest(1, "p").iloc[0]
    t = kirc["os_days"].clip(upper=horizon_days(5)).to_numpy()
    e = ((kirc["os_event"] == 1) & (kirc["os_days"] <= horizon_days(5))).astype(int).to_numpy()
    df = pd.DataFrame({"x": expr.loc[kirc.index, row["gene"]].to_numpy(dtype=float), "t": t, "e": e})
    ref = CoxPHFitter().fit(df, "t", "e", fit_options={"precision": 1e-12, "r_precision": 0}).summary.loc["x"]
    assert row["coef"] == pytest.approx(ref["coef"], abs=1e-5)
    assert row["se"] == pytest.approx(ref["se(coef)"], abs=1e-5)


def test_plots_and_settings_written(cox_run: Path) -> None:
    cox_dir = cox_run / "cox"
    assert (cox_dir / "heatmap_top_genes.png").stat().st_size > 10_000
    assert (cox_dir / "volcano_KIRC.png").exists() and (cox_dir / "volcano_pan.png").exists()
    assert (cox_run / "settings" / "cox.yaml").exists()


def test_skip_when_done_and_refit_on_new_settings(cox_run: Path, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    before = (cox_run / "cox" / "coefficients.parquet").stat().st_mtime_ns
    with caplog.at_level(logging.INFO):
        run_cox(CoxSettings(run=str(cox_run)))
    assert (cox_run / "cox" / "coefficients.parquet").stat().st_mtime_ns == before
    assert "skipping" in caplog.text
    run = _copy_cohort(cox_run, tmp_path / "run")
    run_cox(CoxSettings(run=str(run), horizon_years=3, pan_cancer=False, plots=False))
    t3 = load_coefficients(run)
    assert (t3["horizon_years"] == 3.0).all() and PAN_CANCER not in set(t3["cancer_type"])


@pytest.mark.slow
def test_non_training_patients_do_not_change_the_table(cox_run: Path, table: pd.DataFrame, tmp_path: Path) -> None:
    """Scramble validation/test expression and survival: the coefficient table must not move."""
    run = _copy_cohort(cox_run, tmp_path / "scrambled")
    cohort = run / "cohort"
    splits = pd.read_parquet(cohort / "splits.parquet")
    other = set(splits.loc[splits["split"] != "train", "patient_id"])
    expr = pd.read_parquet(cohort / "expression.parquet")
    rows = expr.index.isin(other)
    rng = np.random.default_rng(0)
    expr.loc[rows] = rng.normal(size=(rows.sum(), expr.shape[1])).astype(np.float32) * 10
    expr.to_parquet(cohort / "expression.parquet")
    patients = pd.read_parquet(cohort / "patients.parquet")
    prow = patients["patient_id"].isin(other)
    patients.loc[prow, "os_days"] = rng.uniform(1, 4000, prow.sum())
    patients.loc[prow, "os_event"] = 1
    patients.to_parquet(cohort / "patients.parquet", index=False)
    run_cox(CoxSettings(run=str(run), plots=False))
    pd.testing.assert_frame_equal(load_coefficients(run), table)


def test_threads_do_not_change_the_table(cox_run: Path) -> None:
    from oncofm.cohort.normalize import load_normalized_expression
    from oncofm.survival.cox_stage import fit_coefficients

    train = _train(cox_run).set_index("patient_id")
    train = train[train["cancer_type"].isin(["KIRC", "LGG", "READ"])]
    expr = load_normalized_expression(cox_run).loc[train.index].iloc[:, :150]
    args = (expr, train["os_days"].to_numpy(), train["os_event"].to_numpy(), train["cancer_type"].to_numpy())
    one = fit_coefficients(*args, n_jobs=1, progress=False)
    two = fit_coefficients(*args, n_jobs=2, progress=False)
    pd.testing.assert_frame_equal(one, two)
    assert set(one["cancer_type"]) == {"KIRC", "LGG", "READ", PAN_CANCER}
