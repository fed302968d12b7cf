"""The guardrail: every generated explanation is checked before it is shown; one that fails is flagged in
the report, ``explanation.json`` and the page, with its failing statements, beside a deterministic evidence
summary, and the headline prediction then comes from the unimodal models."""

from __future__ import annotations

import json

from oncofm.explain.pipeline import ExplainSettings, Predictors, explain_patient
from oncofm.fusion.evidence import Evidence
from oncofm.fusion.parse import parse_prediction
from oncofm.fusion.predict import FusionResult
from test_report_doubles import DOUBLE_TAG, DoubleFusion, double_predictors, run_with_double_omics_predictions

PATIENT = "TCGA-HE-7129"  # KIRP, a real H&E image in the bundled demo data


class LoopingFusion(DoubleFusion):
    """TEST DOUBLE of a fusion LLM gone wrong: a protective gene called a risk gene, a sentence repeated, a
    risk far from the omics model's."""

    def predict(self, evidence: Evidence, omics, slide, patient_id: str = "patient") -> FusionResult:  # noqa: ANN001
        gene = evidence.protective_genes[0]["gene"]
        text = (f"{DOUBLE_TAG} This is a {evidence.cancer_type} patient. Genes that raise the risk: {gene}. "
                "The slide model probability is high. The slide model probability is high.\n"
                "Prediction: alive at 5 years (risk 0.02)")
        return FusionResult(text=text, parsed=parse_prediction(text), version="TEST-DOUBLE")


def _explain(tmp_path, fusion) -> tuple[dict, str]:  # noqa: ANN001
    run = run_with_double_omics_predictions(tmp_path)
    base = double_predictors(run, omics=True)
    predictors = Predictors(omics=base.omics, slide=base.slide, fusion=fusion)
    paths = explain_patient(ExplainSettings(run=str(run), out=str(tmp_path / "out"), patient_id=PATIENT),
                            predictors=predictors)
    return json.loads(paths["explanation"].read_text()), paths["report"].read_text().replace("'", '"')


def test_a_sound_explanation_is_shown_as_checked(tmp_path):
    rec, html = _explain(tmp_path, DoubleFusion())
    assert rec["text_status"] == "passed" and rec["check"]["passed"] and rec["check"]["failures"] == []
    assert rec["prediction"]["source"] == "fusion LLM"
    assert 'id="check-passed"' in html and 'id="explanation-flag"' not in html
    assert rec["evidence_summary"].startswith("This is a KIRP patient.") and 'id="evidence-summary"' in html


def test_a_failing_explanation_is_flagged_with_its_statements(tmp_path):
    rec, html = _explain(tmp_path, LoopingFusion())
    assert rec["text_status"] == "flagged" and not rec["check"]["passed"]
    rules = {f["rule"] for f in rec["check"]["failures"]}
    assert {"wrong_direction", "repeated_sentence", "verdict_vs_models"} <= rules
    assert all(f["statement"] for f in rec["check"]["failures"])
    # never shown as if it were sound: the headline falls back to a unimodal model, the report says why
    assert rec["prediction"]["source"] == "omics model"
    assert any("failed the automatic check" in n for n in rec["notes"])
    assert 'id="explanation-flag"' in html and 'id="check-failures"' in html and "wrong_direction" in html
    assert 'id="evidence-summary"' in html and rec["evidence_summary"] in html.replace("&#x27;", "'")
