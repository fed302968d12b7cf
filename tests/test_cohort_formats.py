"""The firehose and generic importers, on small files written in their layouts from real tcga13 data,
joined with the real TCGA-CDR clinical table.

Planted answer: the tcga13 z-scores z become counts-like values 2**(z + 8) - 1 (positive, max >> 100),
so after the importer's log2(x+1) the expression must equal z + 8.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from oncofm.cohort.importing import ImportSettings, import_cohort, load_matrix, load_patients
from oncofm.cohort.schema import Col

N_GENES = 40
OFFSET = 8.0


@pytest.fixture(scope="module")
def real_subset(shared_data):
    """40 KIRP + 30 GBM real patients × 40 genes with no missing values (z-scores) and their tcga13 rows."""
    t13 = shared_data / "tcga13"
    patients = pd.read_csv(t13 / "patients.csv")
    pick = pd.concat([patients[patients.tcga_project == "KIRP"].head(40),
                      patients[patients.tcga_project == "GBM"].head(30)])
    # the demo cohort's expression file holds the same tcga13 rows (KIRP and GBM included), and reads faster
    from oncofm.data import demo_data_dir

    expr = pd.read_csv(demo_data_dir() / "expression_zscore.csv.gz", index_col=0)
    expr = expr.loc[expr.index.intersection(pick.case_id)]
    expr = expr.loc[:, expr.notna().all()].iloc[:, :N_GENES].clip(-6, 6)
    pick = pick[pick.case_id.isin(expr.index)]
    assert len(pick) >= 50 and expr.shape[1] == N_GENES
    return pick.reset_index(drop=True), expr.loc[pick.case_id]


def write_firehose(path, z: pd.DataFrame, extra_samples: bool = True) -> dict:
    """A Firehose RSEM_genes_normalized file: genes as rows, 'Hybridization REF' + sample barcodes."""
    counts = np.power(2.0, z + OFFSET) - 1.0  # patients × genes
    cols = {f"{p}-01A-11R-A000-07": counts.loc[p].to_numpy() for p in z.index}
    planted = {}
    if extra_samples:
        p0, p1, p2 = z.index[:3]
        cols[f"{p0}-11A-01R-A000-07"] = np.full(z.shape[1], 5000.0)  # solid normal: dropped
        cols[f"{p1}-06A-11R-A000-07"] = np.full(z.shape[1], 5000.0)  # metastasis: dropped
        cols[f"{p2}-01B-11R-A000-07"] = np.full(z.shape[1], 5000.0)  # 2nd primary aliquot: sorts after 01A
        planted = {"normal": p0, "metastasis": p1, "duplicate": p2}
    body = pd.DataFrame(cols, index=[f"{g}|{1000 + i}" for i, g in enumerate(z.columns)])
    body.loc["?|100130426"] = 1.0  # no symbol: dropped
    with open(path, "w") as fh:
        fh.write("Hybridization REF\t" + "\t".join(body.columns) + "\n")
        fh.write("gene_id\t" + "\t".join(["normalized_count"] * body.shape[1]) + "\n")
        for gene, row in body.iterrows():
            fh.write(gene + "\t" + "\t".join(f"{v:.4f}" for v in row) + "\n")
    return planted


def test_firehose_import_joined_with_real_cdr(tmp_path, real_subset, shared_data):
    pick, z = real_subset
    src = tmp_path / "KIRP.rnaseqv2__illuminahiseq_rnaseqv2__unc_edu__Level_3__RSEM_genes_normalized__data.data.txt"
    planted = write_firehose(src, z)
    cdr_path = shared_data / "tcga_cdr" / "tcga_cdr_clinical.csv"
    run = tmp_path / "run"
    import_cohort(ImportSettings(format="firehose", source=str(src), clinical=str(cdr_path), run=str(run)))
    patients, expr = load_patients(run), load_matrix(run)
    # every patient kept once (normal / metastasis / 2nd aliquot columns dropped), genes by symbol
    assert sorted(expr.index) == sorted(z.index)
    assert list(expr.columns) == list(z.columns)
    # log2(x+1) undoes the planted transform (values written with 4 decimals)
    np.testing.assert_allclose(expr.loc[z.index].to_numpy(), (z + OFFSET).to_numpy(), atol=2e-3)
    assert expr.loc[planted["duplicate"]].max() < 13  # not the 01B aliquot's log2(5001) = 12.3 everywhere
    assert not np.allclose(expr.loc[planted["duplicate"]], np.log2(5001.0))
    # clinical: the real CDR rows of these patients (OS in days, cancer type from 'type')
    cdr = pd.read_csv(cdr_path).set_index("bcr_patient_barcode").loc[patients[Col.PATIENT]]
    np.testing.assert_allclose(patients[Col.OS_DAYS].to_numpy(), cdr["OS.time"].to_numpy())
    np.testing.assert_array_equal(patients[Col.OS_EVENT].to_numpy(), cdr["OS"].to_numpy())
    assert patients[Col.CANCER].tolist() == cdr["type"].tolist()
    assert set(patients[Col.CANCER]) == {"KIRP", "GBM"}
    assert {"dss_days", "pfi_event"} <= set(patients.columns)
    # and they agree with tcga13's survival (both TCGA-CDR overall survival)
    t13 = pick.set_index("case_id").loc[patients[Col.PATIENT]]
    assert (t13["event"].to_numpy() == patients[Col.OS_EVENT].to_numpy()).mean() > 0.95
    notes = " ".join(pd.read_json(run / "cohort" / "import_notes.json", typ="series")["notes"])
    assert "2 non-primary-tumour samples" in notes and "1 extra primary-tumour aliquots" in notes
    assert "log2(x+1)" in notes and "without a symbol" in notes


def test_firehose_log_transform_no_keeps_values(tmp_path, real_subset, shared_data):
    _, z = real_subset
    src = tmp_path / "x.RSEM_genes_normalized__data.data.txt"
    write_firehose(src, z, extra_samples=False)
    run = tmp_path / "run"
    import_cohort(ImportSettings(format="firehose", source=str(src), run=str(run), log_transform="no",
                                 clinical=str(shared_data / "tcga_cdr" / "tcga_cdr_clinical.csv")))
    expr = load_matrix(run)
    np.testing.assert_allclose(expr.loc[z.index].to_numpy(), np.power(2.0, z + OFFSET).to_numpy() - 1,
                               rtol=1e-4, atol=1e-3)


def _clinical(pick: pd.DataFrame) -> pd.DataFrame:
    """A clinical table with other column names: months, text events."""
    return pd.DataFrame({"sample": pick.case_id, "project": pick.tcga_project,
                         "months": pick.survival_months,
                         "vital": pick.event.map({1: "Dead", 0: "Alive"}), "years_old": pick.age,
                         "gender": pick.is_female.map({1.0: "F", 0.0: "M"})})


OPTIONS = {"patient_id": "sample", "cancer_type": "project", "os_days": "months", "time_unit": "months",
           "os_event": "vital", "event_values": "Dead:1,Alive:0", "age": "years_old", "sex": "gender"}


@pytest.mark.parametrize("orientation,suffix", [("genes-as-columns", ".csv"), ("genes-as-rows", ".tsv"),
                                                ("genes-as-rows", ".parquet"), ("genes-as-columns", ".parquet")])
def test_generic_detects_orientation(tmp_path, real_subset, orientation, suffix):
    pick, z = real_subset
    clin = tmp_path / "clinical.csv"
    _clinical(pick).to_csv(clin, index=False)
    table = z.rename_axis("id") if orientation == "genes-as-columns" else z.T.rename_axis("gene")
    src = tmp_path / f"expr{suffix}"
    if suffix == ".parquet" and orientation == "genes-as-columns":
        table.to_parquet(src)  # the patient IDs saved as a pandas index
    elif suffix == ".parquet":
        table.reset_index().to_parquet(src, index=False)
    else:
        table.to_csv(src, sep="," if suffix == ".csv" else "\t")
    run = tmp_path / "run"
    import_cohort(ImportSettings(format="generic", source=str(src), clinical=str(clin), run=str(run),
                                 options=OPTIONS))
    patients, expr = load_patients(run), load_matrix(run)
    np.testing.assert_allclose(expr.loc[z.index, z.columns].to_numpy(), z.to_numpy(), atol=1e-6)  # no log
    ref = pick.set_index("case_id").loc[patients[Col.PATIENT]]
    np.testing.assert_allclose(patients[Col.OS_DAYS], ref.survival_months * 30.4375)
    assert (patients[Col.OS_EVENT].to_numpy() == ref.event.to_numpy()).all()
    assert (patients[Col.SEX] == ref.is_female.map({1.0: "female", 0.0: "male"}).to_numpy()).all()
    notes = pd.read_json(run / "cohort" / "import_notes.json", typ="series")["notes"]
    assert f"expression orientation detected: {orientation}" in notes


def test_generic_yaml_config_and_sample_barcodes(tmp_path, real_subset):
    """Mapping from a YAML file; expression keyed by sample barcodes cut to 12 characters; counts logged."""
    from typer.testing import CliRunner

    from oncofm.cli import app

    pick, z = real_subset
    clin = tmp_path / "clinical.tsv"
    _clinical(pick).to_csv(clin, sep="\t", index=False)
    counts = np.power(2.0, z + OFFSET) - 1
    counts.index = [f"{p}-01A" for p in counts.index]
    src = tmp_path / "expr.csv.gz"
    counts.T.rename_axis("gene").to_csv(src)
    cfg = tmp_path / "mapping.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump({"options": {**OPTIONS, "patient_id_chars": 12, "orientation": "genes-as-rows"}}))
    run = tmp_path / "run"
    res = CliRunner().invoke(app, ["cohort", "import", "--format", "generic", "--source", str(src),
                                   "--clinical", str(clin), "--config", str(cfg), "--run", str(run)])
    assert res.exit_code == 0, res.output
    expr = load_matrix(run)
    np.testing.assert_allclose(expr.loc[z.index, z.columns].to_numpy(), (z + OFFSET).to_numpy(), atol=1e-4)
    saved = (run / "settings" / "cohort_import.yaml").read_text()
    assert "patient_id_chars" in saved and "time_unit: months" in saved


def test_firehose_folder_of_cohorts(tmp_path, real_subset, shared_data):
    """One file per cohort in a folder: stacked; a gene absent from one file is NaN there and counted."""
    pick, z = real_subset
    kirp = pick.loc[pick.tcga_project == "KIRP", "case_id"]
    gbm = pick.loc[pick.tcga_project == "GBM", "case_id"]
    folder = tmp_path / "firehose"
    folder.mkdir()
    write_firehose(folder / "KIRP.rnaseqv2__RSEM_genes_normalized__data.data.txt", z.loc[kirp], extra_samples=False)
    write_firehose(folder / "GBM.rnaseqv2__RSEM_genes_normalized__data.data.txt", z.loc[gbm].iloc[:, 1:],
                   extra_samples=False)
    run = tmp_path / "run"
    import_cohort(ImportSettings(format="firehose", source=str(folder), run=str(run),
                                 clinical=str(shared_data / "tcga_cdr" / "tcga_cdr_clinical.csv")))
    expr = load_matrix(run)
    assert len(expr) == len(pick) and expr.loc[gbm, z.columns[0]].isna().all()
    assert expr.loc[kirp, z.columns[0]].notna().all()
    notes = pd.read_json(run / "cohort" / "import_notes.json", typ="series")
    assert "1 genes missing in some cohort files (NaN there)" in notes["notes"]
    assert notes["soft_problems"]["genes_missing_in_some_cohorts"] == 1
