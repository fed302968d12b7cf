"""The `features` stage: gene selection rule, the (N, G, 2) tensor, patient order, unseen-type fallback."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from oncofm.omics.features import FeatureSettings, build_pairs, load_pair_features, run_features, select_genes
from oncofm.survival.cox_stage import PAN_CANCER, CoxSettings, load_coefficients, run_cox


@pytest.fixture(scope="module")
def feat_run(tcga13_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("features_run")
    shutil.copytree(tcga13_run / "cohort", run / "cohort")
    run_cox(CoxSettings(run=str(run), plots=False))
    run_features(FeatureSettings(run=str(run), top_k=64))
    return run


def _table(rows: list[tuple[str, str, float, float]]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=["gene", "cancer_type", "z", "q"])
    df["coef"] = df["z"] / 10
    df["horizon_years"] = 5.0
    return df


def test_selection_rule_on_a_planted_table() -> None:
    nan = np.nan
    table = _table([
        ("A", "T1", 3.0, 0.01), ("A", "T2", 2.5, 0.04), ("A", PAN_CANCER, 3.5, 0.001),   # 3 rows pass
        ("B", "T1", 6.0, 1e-6), ("B", "T2", 0.1, 0.9), ("B", PAN_CANCER, 1.0, 0.3),       # 1 row, tiny q
        ("C", "T1", 2.8, 0.03), ("C", "T2", 2.0, 0.2), ("C", PAN_CANCER, 2.9, 0.02),      # 2 rows
        ("D", "T1", 1.0, 0.3), ("D", "T2", -1.9, 0.06), ("D", PAN_CANCER, 0.5, 0.7),      # none; best q 0.06
        ("E", "T1", nan, nan), ("E", "T2", nan, nan), ("E", PAN_CANCER, nan, nan),        # failed everywhere
        ("F", "T1", 0.2, 0.8), ("F", "T2", 0.1, 0.95), ("F", PAN_CANCER, 0.1, 0.9),
    ])
    assert select_genes(table, top_k=3, q_max=0.05).index.tolist() == ["A", "C", "B"]
    filled = select_genes(table, top_k=5, q_max=0.05)
    assert filled.index.tolist() == ["A", "C", "B", "D", "F"] and filled["passed"].sum() == 3
    assert select_genes(table, top_k=5, q_max=0.05, fill=False).index.tolist() == ["A", "C", "B"]
    with pytest.raises(ValueError, match="top_k"):
        select_genes(table, top_k=0)


def test_tensor_shape_order_and_values(feat_run: Path) -> None:
    from oncofm.cohort.normalize import load_normalized_expression

    pairs, genes, patients = load_pair_features(feat_run)
    cohort = pd.read_parquet(feat_run / "cohort" / "patients.parquet")
    assert pairs.dtype == np.float32 and pairs.shape == (len(cohort), 64, 2)
    assert patients == cohort["patient_id"].tolist()                  # every patient, cohort order
    assert len(genes) == len(set(genes)) == 64
    selection = pd.read_parquet(feat_run / "features" / "selection.parquet")
    assert selection["gene"].tolist() == genes
    assert np.isfinite(pairs).all()
    expr = load_normalized_expression(feat_run).loc[patients, genes].to_numpy(dtype=np.float32)
    np.testing.assert_array_equal(pairs[..., 0], np.nan_to_num(expr, nan=0.0))
    coef = load_coefficients(feat_run).pivot(index="cancer_type", columns="gene", values="coef")
    rng = np.random.default_rng(0)
    types = cohort["cancer_type"].to_numpy()
    for i in rng.choice(len(patients), 25, replace=False):
        key = types[i] if coef.loc[types[i]].notna().any() else PAN_CANCER
        expected = np.nan_to_num(coef.loc[key, genes].to_numpy(dtype=np.float32), nan=0.0)
        np.testing.assert_array_equal(pairs[i, :, 1], expected)


def test_type_without_coefficients_falls_back_to_pan(feat_run: Path, caplog: pytest.LogCaptureFixture) -> None:
    pairs, genes, patients = load_pair_features(feat_run)
    coef = load_coefficients(feat_run)
    pan = coef[coef["cancer_type"] == PAN_CANCER].set_index("gene").loc[genes, "coef"].to_numpy(np.float32)
    cohort = pd.read_parquet(feat_run / "cohort" / "patients.parquet").set_index("patient_id")
    read = [i for i, p in enumerate(patients) if cohort.loc[p, "cancer_type"] == "READ"]  # too few events
    np.testing.assert_array_equal(pairs[read, :, 1], np.broadcast_to(np.nan_to_num(pan), (len(read), len(genes))))
    # a new patient of a cancer type never seen in training
    expr = pd.DataFrame(np.ones((2, len(genes))), index=["NEW-1", "NEW-2"], columns=genes)
    types = pd.Series(["UVM", "KIRC"], index=expr.index)
    with caplog.at_level(logging.WARNING):
        new = build_pairs(expr, types, coef, genes)
    assert "UVM" in caplog.text and "pan-cancer" in caplog.text
    np.testing.assert_array_equal(new[0, :, 1], np.nan_to_num(pan))
    kirc = coef[coef["cancer_type"] == "KIRC"].set_index("gene").loc[genes, "coef"].to_numpy(np.float32)
    np.testing.assert_array_equal(new[1, :, 1], np.nan_to_num(kirc))
    assert (new[..., 0] == 1).all()


def test_features_skip_when_done(feat_run: Path, caplog: pytest.LogCaptureFixture) -> None:
    target = feat_run / "features" / "pairs.npy"
    before = target.stat().st_mtime_ns
    with caplog.at_level(logging.INFO):
        run_features(FeatureSettings(run=str(feat_run), top_k=64))
    assert target.stat().st_mtime_ns == before and "skipping" in caplog.text


@pytest.mark.slow
def test_selection_uses_training_patients_only(feat_run: Path, tmp_path: Path) -> None:
    """Scrambling validation/test expression and outcomes changes neither the genes nor the coefficients."""
    run = tmp_path / "scrambled"
    shutil.copytree(feat_run / "cohort", run / "cohort")
    cohort = run / "cohort"
    splits = pd.read_parquet(cohort / "splits.parquet")
    other = set(splits.loc[splits["split"] != "train", "patient_id"])
    expr = pd.read_parquet(cohort / "expression.parquet")
    rows = expr.index.isin(other)
    expr.loc[rows] = np.random.default_rng(1).normal(size=(rows.sum(), expr.shape[1])).astype(np.float32) * 5
    expr.to_parquet(cohort / "expression.parquet")
    patients = pd.read_parquet(cohort / "patients.parquet")
    patients.loc[patients["patient_id"].isin(other), "os_event"] = 0
    patients.to_parquet(cohort / "patients.parquet", index=False)
    run_cox(CoxSettings(run=str(run), plots=False))
    run_features(FeatureSettings(run=str(run), top_k=64))
    pairs_a, genes_a, patients_a = load_pair_features(feat_run)
    pairs_b, genes_b, patients_b = load_pair_features(run)
    assert genes_a == genes_b and patients_a == patients_b
    np.testing.assert_array_equal(pairs_a[..., 1], pairs_b[..., 1])     # same coefficients for everyone
    train = ~np.isin(patients_a, list(other))
    np.testing.assert_array_equal(pairs_a[train, :, 0], pairs_b[train, :, 0])
    assert not np.array_equal(pairs_a[~train, :, 0], pairs_b[~train, :, 0])
