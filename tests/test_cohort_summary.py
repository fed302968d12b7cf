"""`cohort summary` on the real tcga13 cohort: the table, soft problems, KM plots (checked against lifelines)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from rich.console import Console

from oncofm.cohort.importing import load_patients
from oncofm.cohort.schema import Col
from oncofm.cohort.summary import kaplan_meier, summarize_cohort


def test_kaplan_meier_matches_lifelines(tcga13_run):
    from lifelines import KaplanMeierFitter

    patients = load_patients(tcga13_run)
    for cancer in ("BRCA", "GBM", "KIRP"):
        g = patients[patients[Col.CANCER] == cancer]
        t, s = kaplan_meier(g[Col.OS_DAYS].to_numpy(), g[Col.OS_EVENT].to_numpy())
        ref = KaplanMeierFitter().fit(g[Col.OS_DAYS], g[Col.OS_EVENT]).survival_function_at_times(t[1:])
        np.testing.assert_allclose(s[1:], ref.to_numpy(), atol=1e-12)


def test_summary_writes_table_soft_problems_and_km_grid(tcga13_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tcga13_run, run)
    console = Console(record=True, width=200)
    table = summarize_cohort(run, console=console).set_index(Col.CANCER)
    assert table.loc["ALL", "patients"] == 4191 and len(table) == 16
    text = console.export_text()
    assert "Soft problems" in text and "patients_without_5y_label=2341" in text
    soft = json.loads((run / "cohort" / "soft_problems.json").read_text())["soft_problems"]
    assert soft["patients_without_5y_label"] == 4191 - 1850
    assert soft["genes_missing_in_some_cohorts"] == 1608 - 1526  # genes_in_all_13_cohorts.txt has 1,526
    assert soft["gene_overlap_fraction"] == pytest.approx(1526 / 1608, abs=1e-4)
    from PIL import Image

    with Image.open(run / "cohort" / "km_by_cancer_type.png") as im:
        assert im.size[0] > 1000 and im.size[1] > 600  # 5 × 3 panels
