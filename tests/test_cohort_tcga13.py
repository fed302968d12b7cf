"""Import of the real tcga13 cohort, splits and normalisation."""

from __future__ import annotations

import numpy as np
import pandas as pd

from oncofm.cohort.importing import load_matrix, load_patients
from oncofm.cohort.normalize import load_normalized_expression
from oncofm.cohort.schema import PAN_CANCER, Col, five_year_labels
from oncofm.cohort.splits import SplitSettings, make_splits
from oncofm.cohort.summary import summary_table


def test_tcga13_counts_match_source(tcga13_run, shared_data):
    patients = load_patients(tcga13_run)
    assert len(patients) == 4191
    assert patients[Col.CANCER].nunique() == 15
    ref = pd.read_csv(shared_data / "tcga13" / "summary_by_project.csv").set_index("tcga_project")
    table = summary_table(patients, load_matrix(tcga13_run)).set_index(Col.CANCER)
    for project, row in ref.iterrows():
        assert table.loc[project, "patients"] == row["patients"]
        assert table.loc[project, "deaths"] == row["deaths"]
        assert table.loc[project, "label_5y_known"] == row["known_5y"]
        assert table.loc[project, "dead_by_5y"] == row["dead_by_5y"]
    assert table.loc["ALL", "label_5y_known"] == 1850
    assert table.loc["ALL", "dead_by_5y"] == 1207


def test_tcga13_matrices(tcga13_run):
    expr = load_matrix(tcga13_run)
    assert expr.shape == (4191, 1608)
    assert expr.dtypes.unique().tolist() == [np.dtype("float32")]
    assert "TP53" in expr.columns
    cnv = load_matrix(tcga13_run, "cnv")
    mut = load_matrix(tcga13_run, "mutation")
    assert cnv.shape[1] > 200 and mut.shape[1] > 300
    assert set(np.unique(mut.to_numpy()[~np.isnan(mut.to_numpy())])) <= {0.0, 1.0}


def test_splits_are_stratified_and_reproducible(tcga13_run):
    patients = load_patients(tcga13_run)
    s1 = make_splits(patients, SplitSettings(run="x", seed=3, folds=5))
    s2 = make_splits(patients, SplitSettings(run="x", seed=3, folds=5))
    s3 = make_splits(patients, SplitSettings(run="x", seed=4, folds=5))
    pd.testing.assert_frame_equal(s1, s2)
    assert not s1["split"].equals(s3["split"])
    assert s1[Col.PATIENT].is_unique and len(s1) == len(patients)
    # every cancer type's test share is close to 20%, and so is each label status's
    merged = s1.merge(patients, on=Col.PATIENT)
    share = merged.groupby(Col.CANCER)["split"].apply(lambda s: (s == "test").mean())
    assert share.between(0.15, 0.25).all(), share
    label = five_year_labels(patients).to_numpy()
    for status in (1.0, 0.0):
        sel = label == status
        assert abs((merged.loc[sel, "split"] == "test").mean() - 0.2) < 0.02
    # folds only on non-test patients, balanced
    non_test = s1[s1["split"] != "test"]
    assert (non_test["fold"] >= 0).all() and (s1.loc[s1["split"] == "test", "fold"] == -1).all()
    counts = non_test["fold"].value_counts()
    assert counts.max() - counts.min() <= 0.05 * counts.mean()


def test_normalization_uses_training_statistics_only(tcga13_run):
    from oncofm.cohort.splits import load_splits

    stats = pd.read_parquet(tcga13_run / "cohort" / "normalization.parquet")
    splits = load_splits(tcga13_run)
    n_train = (splits["split"] == "train").sum()
    assert stats.loc[stats[Col.CANCER] == PAN_CANCER, "n_train"].iloc[0] == n_train
    z = load_normalized_expression(tcga13_run)
    assert np.nanmax(np.abs(z.to_numpy())) <= 5.0
    train = splits.loc[splits["split"] == "train", Col.PATIENT]
    patients = load_patients(tcga13_run).set_index(Col.PATIENT)
    brca = [p for p in train if patients.loc[p, Col.CANCER] == "BRCA"]
    med = np.nanmedian(z.loc[brca].to_numpy(), axis=0)
    assert np.nanmax(np.abs(med)) < 1e-5  # median of training z-scores is 0 per cancer type
