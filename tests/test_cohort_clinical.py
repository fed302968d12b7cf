"""Stage / grade mapping of messy clinical text (oncofm.cohort.clinical) and its import into patients.parquet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from oncofm.cohort.clinical import parse_grade, parse_grades, parse_stage, parse_stages, stage_label
from oncofm.errors import DataValidationError


@pytest.mark.parametrize(("text", "stage"), [
    ("Stage I", 1), ("Stage IA", 1), ("Stage IB", 1), ("stage i", 1), ("Stage 1", 1), ("IB", 1),
    ("Stage II", 2), ("Stage IIA", 2), ("Stage IIB", 2), ("Stage IIC", 2), ("II", 2),
    ("Stage III", 3), ("Stage IIIA", 3), ("Stage IIIB", 3), ("Stage IIIC", 3), ("  STAGE IIIC ", 3), ("3", 3),
    ("Stage IV", 4), ("Stage IVA", 4), ("Stage IVB", 4), ("Stage IVC", 4), ("Stage IIIC1", 3),
    ("Stage 0", 1), ("IS", 1), ("Tis", 1),
])
def test_stage_substages_collapse(text: str, stage: int) -> None:
    assert parse_stage(text) == stage


@pytest.mark.parametrize("text", ["[Not Available]", "[Discrepancy]", "[Not Applicable]", "[Unknown]",
                                  "[Not Evaluated]", "Stage X", "I/II NOS", "Not Reported", "--", "", None,
                                  float("nan")])
def test_stage_missing_codes_are_unknown(text: object) -> None:
    assert np.isnan(parse_stage(text))


@pytest.mark.parametrize(("text", "grade"), [("G1", 1), ("G2", 2), ("G3", 3), ("G4", 4), ("g3", 3),
                                               ("Grade 2", 2), ("2", 2), ("High Grade", 3), ("Low Grade", 1)])
def test_grade_values(text: str, grade: int) -> None:
    assert parse_grade(text) == grade


@pytest.mark.parametrize("text", ["GX", "GB", "[Not Available]", "[Unknown]", "[Discrepancy]", "Not Reported",
                                  None, ""])
def test_grade_missing_codes_are_unknown(text: object) -> None:
    assert np.isnan(parse_grade(text))


def test_unrecognised_values_stop_with_their_names() -> None:
    with pytest.raises(DataValidationError, match="Stage V.*|unrecognised stage") as exc:
        parse_stages(["Stage II", "Stage V", "Stage 5"], file="clin.csv", column="ajcc")
    assert "Stage V" in str(exc.value) and "ajcc" in str(exc.value) and "clin.csv" in str(exc.value)
    with pytest.raises(DataValidationError, match="unrecognised grade"):
        parse_grades(["G2", "very bad"])


def test_stage_label() -> None:
    assert [stage_label(v) for v in (1.0, 2.0, 3.0, 4.0, np.nan, None)] == ["I", "II", "III", "IV", "unknown",
                                                                          "unknown"]


def test_every_tcga_cdr_value_is_mapped(shared_data: Path) -> None:
    from oncofm.cohort.clinical import covariates_from_cdr

    raw = pd.read_csv(shared_data / "tcga_cdr" / "tcga_cdr_clinical.csv", low_memory=False)
    notes: list[str] = []
    cov = covariates_from_cdr(raw, notes)  # raises on any unmapped code
    assert len(cov) == len(raw)
    assert set(cov["stage"].dropna().unique()) == {1.0, 2.0, 3.0, 4.0}
    # real planted answers: TCGA-OR-A5J1 (ACC) is "Stage II", grade "[Not Available]"
    assert cov.loc["TCGA-OR-A5J1", "stage"] == 2 and np.isnan(cov.loc["TCGA-OR-A5J1", "grade"])


def test_tcga13_import_has_stage_and_grade(tcga13_run: Path, shared_data: Path) -> None:
    patients = pd.read_parquet(tcga13_run / "cohort" / "patients.parquet").set_index("patient_id")
    raw = pd.read_csv(shared_data / "tcga_cdr" / "tcga_cdr_clinical.csv", low_memory=False).set_index(
        "bcr_patient_barcode")
    for col in ("stage", "grade", "histology"):
        assert col in patients
    # GBM/LGG have no AJCC stage; LGG has grades G2/G3; BLCA has High/Low grade
    assert patients.loc[patients.cancer_type.isin(["GBM", "LGG"]), "stage"].isna().all()
    lgg = patients[patients.cancer_type == "LGG"]
    assert set(lgg["grade"].dropna().unique()) == {2.0, 3.0}
    blca = patients[patients.cancer_type == "BLCA"]
    hi = raw.loc[blca.index, "histological_grade"] == "High Grade"
    assert (blca.loc[hi[hi].index, "grade"] == 3).all()
    # sub-stages collapsed, patient by patient
    ids = patients.index[:300]
    expected = [parse_stage(v) for v in raw.loc[ids, "ajcc_pathologic_tumor_stage"]]
    clin = [parse_stage(v) for v in raw.loc[ids, "clinical_stage"]]
    expected = [c if np.isnan(e) else e for e, c in zip(expected, clin, strict=True)]
    np.testing.assert_array_equal(patients.loc[ids, "stage"].to_numpy(), np.asarray(expected))
    assert patients["stage"].notna().mean() > 0.7


def test_generic_importer_maps_stage_and_grade(tmp_path: Path) -> None:
    from oncofm.cohort.importing import ImportSettings, import_cohort

    clin = pd.DataFrame({"patient_id": ["P1", "P2", "P3"], "cancer_type": "X", "os_days": [10, 20, 30],
                         "os_event": [1, 0, 1], "ajcc": ["Stage IIIA", "[Not Available]", "Stage IB"],
                         "g": ["G3", "High Grade", "[Discrepancy]"]})
    clin.to_csv(tmp_path / "clin.csv", index=False)
    pd.DataFrame({"patient_id": ["P1", "P2", "P3"], "A": [1.0, 2, 3], "B": [0.5, 0.1, 0.2]}).to_csv(
        tmp_path / "expr.csv", index=False)
    import_cohort(ImportSettings(format="generic", source=str(tmp_path / "expr.csv"), clinical=str(tmp_path / "clin.csv"),
                                 run=str(tmp_path / "run"), options={"stage": "ajcc", "grade": "g"}))
    p = pd.read_parquet(tmp_path / "run" / "cohort" / "patients.parquet").set_index("patient_id")
    assert p["stage"].tolist()[0] == 3 and np.isnan(p.loc["P2", "stage"]) and p.loc["P3", "stage"] == 1
    assert p.loc["P1", "grade"] == 3 and p.loc["P2", "grade"] == 3 and np.isnan(p.loc["P3", "grade"])


def test_gdc_case_records_map_stage_and_grade() -> None:
    from oncofm.cohort.gdc import _case_row
    from oncofm.cohort.importers.gdc import clinical_to_patients

    hits = [{"submitter_id": "TCGA-AA-0001", "demographic": {"vital_status": "Dead", "days_to_death": 100,
                                                             "gender": "female", "age_at_index": 60},
             "diagnoses": [{"ajcc_pathologic_stage": "Stage IVA", "tumor_grade": "G2"}]},
            {"submitter_id": "TCGA-AA-0002", "demographic": {"vital_status": "Alive", "gender": "male"},
             "diagnoses": [{"days_to_last_follow_up": 900, "ajcc_pathologic_stage": "Not Reported",
                            "tumor_grade": "Not Reported"}]}]
    clinical = pd.DataFrame([_case_row(h) for h in hits])
    out = clinical_to_patients(clinical, "BRCA", [])
    assert out["stage"].iloc[0] == 4 and out["grade"].iloc[0] == 2
    assert np.isnan(out["stage"].iloc[1]) and np.isnan(out["grade"].iloc[1])
