"""Slide-level features as a cohort input (oncofm.cohort.slide_features): the real hif2gene HIF table into a
copy of the tcga13 cohort, TRIDENT/STAMP-style slide-embedding .h5 files, and every bad input (one message,
nothing written)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from oncofm.cohort.slide_features import (
    N_SLIDES,
    SlideFeatureSettings,
    check_feature_set,
    import_slide_features,
    load_feature_names,
    load_slide_features,
)
from oncofm.errors import DataValidationError, OncoFMError
from oncofm.paths import RunLayout


@pytest.fixture(scope="module")
def hif_run(tcga13_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("hif_run")
    shutil.copytree(tcga13_run / "cohort", run / "cohort")
    return run


@pytest.fixture(scope="module")
def cohort_ids(tcga13_run: Path) -> list[str]:
    return sorted(pd.read_parquet(tcga13_run / "cohort" / "patients.parquet")["patient_id"].astype(str))


@pytest.fixture()
def small_run(tcga13_run: Path, tmp_path: Path) -> Path:
    """A run with only the cohort's patients (all the import needs), fresh per test."""
    run = tmp_path / "run"
    (run / "cohort").mkdir(parents=True)
    shutil.copy(tcga13_run / "cohort" / "patients.parquet", run / "cohort" / "patients.parquet")
    return run


def _nothing_written(run: Path) -> None:
    layout = RunLayout(run)
    assert not layout.slide_features.exists()
    assert not layout.slide_features.with_suffix(".json").exists()
    assert not layout.settings_file("slide_features").exists()


def _table(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


# ------------------------------------------------------------------------------------------ the real HIF table
def test_real_hif_table_imports_matched_patients_and_combines_slides(hif_run: Path, shared_data: Path) -> None:
    source = shared_data / "hif2gene" / "hifs_per_slide.csv.gz"
    names = load_feature_names(shared_data / "hif2gene" / "feature_names.csv")
    paths = import_slide_features(SlideFeatureSettings(run=str(hif_run), source=str(source),
                                                       expected_features=str(shared_data / "hif2gene" /
                                                                             "feature_names.csv")))
    table = pd.read_parquet(paths["features"])
    summary = json.loads(paths["summary"].read_text())
    raw = pd.read_csv(source, dtype={"slide_key": str})
    cohort = set(pd.read_parquet(hif_run / "cohort" / "patients.parquet")["patient_id"])
    in_cohort = raw[raw["patient_id"].isin(cohort)]

    assert summary["key"] == "patient" and summary["slide_column"] == "slide_key"
    assert summary["n_rows_read"] == len(raw) == 2139
    assert summary["n_patients_matched"] == len(table) == in_cohort["patient_id"].nunique() == 1766
    assert summary["n_rows_matched"] == len(in_cohort) == 1882
    assert summary["n_barcodes_unmatched"] == raw["patient_id"].nunique() - 1766 == 253
    assert summary["n_features"] == 607 and summary["cancer_type_mismatches"] == 0
    assert list(table.columns) == [*names, N_SLIDES]  # original names, original order
    assert table.index.name == "patient_id" and table.index.is_monotonic_increasing
    assert (table.dtypes[names] == np.float32).all()
    assert 0 < summary["missing_share"] < 0.002  # kept as NaN
    assert table[names].isna().to_numpy().sum() > 0

    # several slides of one patient: the NaN-aware mean, n_slides counted
    multi = in_cohort["patient_id"].value_counts()
    assert summary["n_patients_several_slides"] == int((multi > 1).sum()) > 10
    assert table[N_SLIDES].sum() == len(in_cohort)
    pid = multi.index[0]
    rows = in_cohort[in_cohort["patient_id"] == pid][names].to_numpy(np.float64)
    assert table.loc[pid, N_SLIDES] == len(rows) == summary["max_slides_per_patient"]
    np.testing.assert_allclose(table.loc[pid, names].to_numpy(np.float64), np.nanmean(rows, axis=0), rtol=1e-6)
    assert RunLayout(hif_run).settings_file("slide_features").exists()

    # the same settings and inputs: reused; load_slide_features checks the feature set
    before = paths["features"].stat().st_mtime_ns
    import_slide_features(SlideFeatureSettings(run=str(hif_run), source=str(source),
                                               expected_features=str(shared_data / "hif2gene" / "feature_names.csv")))
    assert paths["features"].stat().st_mtime_ns == before
    assert list(load_slide_features(hif_run, expected=names[::-1]).columns) == [*names[::-1], N_SLIDES]


def test_combine_first_takes_the_first_slide_by_slide_id(small_run: Path, cohort_ids: list[str],
                                                          tmp_path: Path) -> None:
    a, b = cohort_ids[:2]
    src = _table(tmp_path / "t.csv", [
        {"patient_id": a, "slide_key": "20", "f1": 1.0, "f2": np.nan},
        {"patient_id": a, "slide_key": "10", "f1": 3.0, "f2": 4.0},
        {"patient_id": b, "slide_key": "5", "f1": 7.0, "f2": 8.0}])
    mean = pd.read_parquet(import_slide_features(SlideFeatureSettings(run=str(small_run), source=str(src)))["features"])
    assert mean.loc[a, "f1"] == 2.0 and mean.loc[a, "f2"] == 4.0  # NaN-aware
    assert mean.loc[a, N_SLIDES] == 2 and mean.loc[b, N_SLIDES] == 1
    first = pd.read_parquet(import_slide_features(SlideFeatureSettings(run=str(small_run), source=str(src),
                                                                       combine="first"))["features"])
    assert first.loc[a, "f1"] == 3.0 and first.loc[a, "f2"] == 4.0  # slide "10" sorts first; one slide's row
    assert first.loc[a, N_SLIDES] == 2


# ------------------------------------------------------------------------------------------ feature sets
def test_check_feature_set_names_missing_and_unexpected() -> None:
    assert check_feature_set(["b", "a"], ["a", "b"]) == ["a", "b"]
    with pytest.raises(DataValidationError) as err:
        check_feature_set(["a", "b", "x"], ["a", "b", "c", "d"])
    text = str(err.value)
    assert "2 missing ('c', 'd')" in text and "1 unexpected ('x')" in text and "trained on" in text


def test_import_stops_on_a_feature_set_other_than_the_models(small_run: Path, cohort_ids: list[str],
                                                              tmp_path: Path) -> None:
    src = _table(tmp_path / "t.csv", [{"patient_id": cohort_ids[0], "f1": 1.0, "f3": 2.0}])
    (tmp_path / "trained.txt").write_text("f1\nf2\n")
    with pytest.raises(DataValidationError, match=r"1 missing \('f2'\); 1 unexpected \('f3'\)"):
        import_slide_features(SlideFeatureSettings(run=str(small_run), source=str(src),
                                                   expected_features=str(tmp_path / "trained.txt")))
    _nothing_written(small_run)


# ------------------------------------------------------------------------------------------ bad input
def test_no_barcode_matching_the_cohort_is_an_error(small_run: Path, tmp_path: Path) -> None:
    src = _table(tmp_path / "t.csv", [{"patient_id": "TCGA-ZZ-0001", "f1": 1.0},
                                      {"patient_id": "TCGA-ZZ-0002", "f1": 2.0}])
    with pytest.raises(DataValidationError, match="none of the 2 barcodes .* matches a patient") as err:
        import_slide_features(SlideFeatureSettings(run=str(small_run), source=str(src)))
    assert "TCGA-ZZ-0001" in str(err.value)
    _nothing_written(small_run)


def test_unmatched_barcodes_are_counted_and_recorded(small_run: Path, cohort_ids: list[str],
                                                      tmp_path: Path) -> None:
    src = _table(tmp_path / "t.csv", [{"patient_id": cohort_ids[0], "f1": 1.0},
                                      {"patient_id": "TCGA-ZZ-0001", "f1": 2.0},
                                      {"patient_id": "TCGA-ZZ-0002", "f1": 3.0}])
    summary = json.loads(import_slide_features(SlideFeatureSettings(run=str(small_run),
                                                                    source=str(src)))["summary"].read_text())
    assert summary["n_patients_matched"] == 1 and summary["n_barcodes_unmatched"] == 2
    assert summary["unmatched_examples"] == ["TCGA-ZZ-0001", "TCGA-ZZ-0002"]


def test_non_numeric_values_are_an_error(small_run: Path, cohort_ids: list[str], tmp_path: Path) -> None:
    src = _table(tmp_path / "t.csv", [{"patient_id": cohort_ids[0], "f1": 1.0, "f2": "high"},
                                      {"patient_id": cohort_ids[1], "f1": 2.0, "f2": "3.5"}])
    with pytest.raises(DataValidationError, match="non-numeric values in 1 feature column.*'f2'") as err:
        import_slide_features(SlideFeatureSettings(run=str(small_run), source=str(src)))
    assert "'high'" in str(err.value) and "exclude_columns" in str(err.value)
    _nothing_written(small_run)


def test_infinite_values_are_an_error(small_run: Path, cohort_ids: list[str], tmp_path: Path) -> None:
    src = _table(tmp_path / "t.csv", [{"patient_id": cohort_ids[0], "f1": np.inf},
                                      {"patient_id": cohort_ids[1], "f1": 2.0}])
    with pytest.raises(DataValidationError, match="infinite values in 1 feature column"):
        import_slide_features(SlideFeatureSettings(run=str(small_run), source=str(src)))
    _nothing_written(small_run)


def test_the_same_patient_and_slide_key_twice_is_an_error(small_run: Path, cohort_ids: list[str],
                                                           tmp_path: Path) -> None:
    src = _table(tmp_path / "t.csv", [{"patient_id": cohort_ids[0], "slide_key": "7", "f1": 1.0},
                                      {"patient_id": cohort_ids[0], "slide_key": "8", "f1": 2.0},
                                      {"patient_id": cohort_ids[0], "slide_key": "7", "f1": 1.0}])
    with pytest.raises(DataValidationError, match=r"duplicated rows: 1 slide\(s\).*patient_id \+ slide_key") as err:
        import_slide_features(SlideFeatureSettings(run=str(small_run), source=str(src)))
    assert "rows 1, 3" in str(err.value)
    _nothing_written(small_run)


def test_a_slide_twice_and_a_patient_twice_without_slide_column_are_errors(small_run: Path, cohort_ids: list[str],
                                                                          tmp_path: Path) -> None:
    slide = f"{cohort_ids[0]}-01Z-00-DX1"
    src = _table(tmp_path / "s.csv", [{"slide_id": slide, "f1": 1.0}, {"slide_id": slide + ".svs", "f1": 1.0}])
    with pytest.raises(DataValidationError, match="duplicated rows"):
        import_slide_features(SlideFeatureSettings(run=str(small_run), source=str(src)))
    src = _table(tmp_path / "p.csv", [{"patient_id": cohort_ids[0], "f1": 1.0}, {"patient_id": cohort_ids[0], "f1": 2.0}])
    with pytest.raises(DataValidationError, match="no slide column"):
        import_slide_features(SlideFeatureSettings(run=str(small_run), source=str(src)))
    _nothing_written(small_run)


def test_an_empty_table_and_a_table_without_barcodes_are_errors(small_run: Path, tmp_path: Path) -> None:
    (tmp_path / "empty.csv").write_text("patient_id,f1\n")
    with pytest.raises(DataValidationError, match="empty"):
        import_slide_features(SlideFeatureSettings(run=str(small_run), source=str(tmp_path / "empty.csv")))
    (tmp_path / "blank.csv").write_text("")
    with pytest.raises(DataValidationError, match="empty"):
        import_slide_features(SlideFeatureSettings(run=str(small_run), source=str(tmp_path / "blank.csv")))
    src = _table(tmp_path / "t.csv", [{"sample": "x", "f1": 1.0}])
    with pytest.raises(DataValidationError, match="no barcode column: expected one of patient_id"):
        import_slide_features(SlideFeatureSettings(run=str(small_run), source=str(src)))
    _nothing_written(small_run)


# ------------------------------------------------------------------------------------------ slide embeddings (.h5)
def _embedding(path: Path, vec: np.ndarray, key: str = "features", encoder: str | None = "titan") -> Path:
    with h5py.File(path, "w") as f:
        ds = f.create_dataset(key, data=vec)
        f.create_dataset("coords", data=np.zeros((3, 2), np.int64))  # TRIDENT keeps the patch coords beside
        if encoder:
            ds.attrs["encoder"] = encoder
    return path


def test_trident_slide_embeddings_map_slides_to_patients(small_run: Path, cohort_ids: list[str],
                                                          tmp_path: Path) -> None:
    folder = tmp_path / "slide_features_titan"
    folder.mkdir()
    a, b = cohort_ids[:2]
    _embedding(folder / f"{a}-01Z-00-DX1.AAAA-1111.h5", np.array([1.0, 2.0, 3.0], np.float32))
    _embedding(folder / f"{a}-01Z-00-DX2.BBBB-2222.h5", np.array([[3.0, 4.0, 5.0]], np.float32))  # (1, D)
    _embedding(folder / f"{b}-01Z-00-DX1.CCCC-3333.h5", np.array([0.0, 0.0, 1.0], np.float32))
    _embedding(folder / "TCGA-ZZ-0001-01Z-00-DX1.h5", np.array([0.0, 0.0, 1.0], np.float32))
    paths = import_slide_features(SlideFeatureSettings(run=str(small_run), source=str(folder)))
    table = pd.read_parquet(paths["features"])
    summary = json.loads(paths["summary"].read_text())
    assert summary["format"] == "h5" and summary["key"] == "slide" and summary["encoder"] == "titan"
    assert list(table.columns) == ["titan_0", "titan_1", "titan_2", N_SLIDES]
    np.testing.assert_allclose(table.loc[a, ["titan_0", "titan_1", "titan_2"]], [2.0, 3.0, 4.0])
    assert table.loc[a, N_SLIDES] == 2 and len(table) == 2
    assert summary["n_barcodes_unmatched"] == 1


def test_slide_embeddings_use_the_cohorts_slide_table(small_run: Path, cohort_ids: list[str], tmp_path: Path) -> None:
    # a non-TCGA slide name, listed in cohort/slides.parquet: its patient comes from there
    pd.DataFrame({"patient_id": [cohort_ids[5]], "slide_id": ["scan_0042.svs"]}).to_parquet(
        small_run / "cohort" / "slides.parquet", index=False)
    folder = tmp_path / "emb"
    folder.mkdir()
    _embedding(folder / "scan_0042.h5", np.ones(4, np.float32), key="feats", encoder=None)  # STAMP-style
    table = pd.read_parquet(import_slide_features(SlideFeatureSettings(run=str(small_run),
                                                                       source=str(folder)))["features"])
    assert list(table.index) == [cohort_ids[5]] and list(table.columns[:2]) == ["f0", "f1"]


def test_bad_slide_embedding_files_are_refused(small_run: Path, cohort_ids: list[str], tmp_path: Path) -> None:
    a = cohort_ids[0]
    bag = _embedding(tmp_path / f"{a}-01Z-00-DX1.h5", np.ones((5, 4), np.float32))
    with pytest.raises(DataValidationError, match="a bag of 5 patch features"):
        import_slide_features(SlideFeatureSettings(run=str(small_run), source=[str(bag)]))
    one = _embedding(tmp_path / f"{a}-01Z-00-DX2.h5", np.ones(4, np.float32))
    other = _embedding(tmp_path / f"{a}-01Z-00-DX3.h5", np.ones(6, np.float32))
    with pytest.raises(DataValidationError, match="differ in width"):
        import_slide_features(SlideFeatureSettings(run=str(small_run), source=[str(one), str(other)]))
    wrong = tmp_path / f"{a}-01Z-00-DX4.h5"
    with h5py.File(wrong, "w") as f:
        f.create_dataset("embedding", data=np.ones(4))
    with pytest.raises(DataValidationError, match="no slide-embedding dataset.*'embedding'"):
        import_slide_features(SlideFeatureSettings(run=str(small_run), source=[str(wrong)]))
    with pytest.raises(OncoFMError, match="does not exist"):
        import_slide_features(SlideFeatureSettings(run=str(small_run), source=str(tmp_path / "nope.csv")))
    _nothing_written(small_run)
