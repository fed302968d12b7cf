"""The bundled demo cohort: found by demo_data_dir(), importable with the tcga13 importer, within size limits."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd

from oncofm.cohort.schema import Col
from oncofm.data import demo_data_dir


def test_demo_data_is_found_and_small():
    root = demo_data_dir()
    files = [f for f in root.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 20 * 1024 * 1024
    assert max(f.stat().st_size for f in files) <= 5 * 1024 * 1024
    assert (root / "README.md").read_text().count("Licence") >= 3


def test_demo_images_are_real_patients(shared_data):
    from PIL import Image

    root = demo_data_dir()
    images = pd.read_csv(root / "images.csv")
    patients = pd.read_csv(root / "patients.csv")
    assert len(images) == 15 and images["patient_id"].isin(patients["case_id"]).all()
    assert set(images.columns) >= {"patient_id", "file", "mpp", "source", "licence"}
    for f in images["file"]:
        with Image.open(root / "images" / f) as im:
            assert im.size[0] >= 1000 and im.mode == "RGB"
    # the demo expression rows are the source rows, restricted to the genes every cohort has
    genes = (shared_data / "tcga13" / "genes_in_all_13_cohorts.txt").read_text().split()[1:]  # header "gene"
    demo = pd.read_csv(root / "expression_zscore.csv.gz", index_col=0, nrows=5)
    assert list(demo.columns) == [g for g in genes if g in demo.columns] and demo.shape[1] == len(genes)


def test_demo_import_through_cli(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "oncofm", "cohort", "import", "--format", "tcga13",
                           "--source", str(demo_data_dir()), "--run", str(run)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    patients = pd.read_parquet(run / "cohort" / "patients.parquet")
    assert len(patients) == 1237
    assert patients[Col.CANCER].value_counts().to_dict() == {"LGG": 383, "BLCA": 298, "KIRC": 276,
                                                             "KIRP": 208, "GBM": 72}
    expr = pd.read_parquet(run / "cohort" / "expression.parquet")
    assert expr.shape == (1237, 1526)
    assert (run / "cohort" / "cnv.parquet").exists() and (run / "cohort" / "mutation.parquet").exists()
