"""``explain`` against the real upstream stages: the inference path reproduces what the stages computed.

A small omics model is trained on the bundled demo cohort (real Cox table, real features, few epochs);
explaining a cohort patient must give exactly the probability the omics stage stored for that patient,
because both go through the same normalisation, Cox pairs and model.
"""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from test_report_doubles import demo_run


@pytest.mark.slow
def test_explain_reproduces_the_omics_stage(tmp_path):
    from oncofm.explain.pipeline import ExplainSettings, explain_patient
    from oncofm.omics.features import FeatureSettings, run_features
    from oncofm.omics.train import OmicsTrainSettings, train_omics
    from oncofm.survival.cox_stage import CoxSettings, run_cox

    run = tmp_path / "run"
    shutil.copytree(demo_run(), run)
    run_cox(CoxSettings.build(run=str(run), plots=False))
    run_features(FeatureSettings.build(run=str(run), top_k=32))
    train_omics(OmicsTrainSettings.build(run=str(run), epochs=1, max_genes=16, d_model=16, n_layers=1,
                                         n_boot=0, ig_steps=2, baselines=["clinical"], progress=False))
    stored = pd.read_parquet(run / "models" / "omics" / "predictions.parquet").set_index("patient_id")
    pid = "TCGA-HE-7130"  # KIRP, in the demo data with a real H&E image
    out = tmp_path / "report"
    explain_patient(ExplainSettings(run=str(run), out=str(out), patient_id=pid))
    rec = json.loads((out / "explanation.json").read_text())
    assert rec["omics"]["prob"] == pytest.approx(float(stored.loc[pid, "prob"]), abs=1e-5)
    assert rec["input"]["expression_genes"] == {"present": 16, "model": 16}
    assert rec["cohort"]["model"] == "omics" and rec["cohort"]["n_train"] > 50
    assert rec["prediction"]["source"] == "omics model"  # no fusion model in this run
    assert any("no fusion model" in n for n in rec["notes"]) and any("no slide model" in n for n in rec["notes"])
    html = (out / "report.html").read_text()
    assert "id='genes'" in html and "id='cohort'" in html
