"""Tokens per omics layer (CNV, mutation) and clinical covariate tokens in the omics model, on real tcga13 patients.

Masked (not zero-filled) absent layers, selection from the training-split Cox table only, the predictor's
one inference path for a new patient with every optional input, input validation, the baselines' covariates,
and expression-only models unchanged.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from oncofm.errors import OncoFMError

SLICE = ("KIRC", "LGG", "BLCA")


def _slice_run(src: Path, dst: Path) -> Path:
    (dst / "cohort").mkdir(parents=True)
    patients = pd.read_parquet(src / "cohort" / "patients.parquet")
    patients = patients[patients["cancer_type"].isin(SLICE)]
    keep = set(patients["patient_id"])
    patients.to_parquet(dst / "cohort" / "patients.parquet")
    for name in ("expression", "cnv", "mutation"):
        m = pd.read_parquet(src / "cohort" / f"{name}.parquet")
        m[m.index.isin(keep)].dropna(axis=1, how="all").to_parquet(dst / "cohort" / f"{name}.parquet")
    splits = pd.read_parquet(src / "cohort" / "splits.parquet")
    splits[splits["patient_id"].isin(keep)].to_parquet(dst / "cohort" / "splits.parquet")
    shutil.copy(src / "cohort" / "normalization.parquet", dst / "cohort" / "normalization.parquet")
    return dst


@pytest.fixture(scope="module")
def layered(tcga13_run: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    from oncofm.omics.features import FeatureSettings, run_features
    from oncofm.omics.train import OmicsTrainSettings, train_omics
    from oncofm.survival.cox_stage import CoxSettings, run_cox

    run = _slice_run(tcga13_run, tmp_path_factory.mktemp("layers_slice"))
    run_cox(CoxSettings(run=str(run), plots=False))
    run_features(FeatureSettings(run=str(run), top_k=16))
    settings = OmicsTrainSettings(run=str(run), max_genes=16, cnv_features=8, mutation_features=8,
                                  covariates=["stage", "grade"], d_model=16, n_layers=1, n_heads=2, epochs=2,
                                  batch_size=64, n_boot=20, ig_steps=2, threads=1, progress=False,
                                  baselines=["clinical", "coxnet"])
    train_omics(settings)
    return run, settings


@pytest.mark.slow
def test_layered_model_predicts_a_new_patient_as_the_stage_exported(layered) -> None:  # noqa: ANN001
    import yaml

    from oncofm.cohort.patient import PatientInput
    from oncofm.omics.artifacts import OmicsArtifacts
    from oncofm.omics.predict import OmicsPredictor
    from oncofm.survival.cox_stage import load_coefficients

    run, _ = layered
    arts = OmicsArtifacts.of(run)
    config = yaml.safe_load(arts.config.read_text())
    assert set(config["layers"]) == {"cnv", "mutation"} and config["architecture"]["covariates"] == ["stage", "grade"]
    for layer, feats in config["layers"].items():  # selected from the (training-split) Cox table, q <= 0.05
        rows = load_coefficients(run, layer=layer)
        assert set(feats) <= set(rows.loc[rows["q"] <= 0.05, "gene"]) and 0 < len(feats) <= 8
    assert "IDH1" in config["layers"]["mutation"]  # the planted real answer in LGG
    stored = pd.read_parquet(arts.predictions).set_index("patient_id")
    patients = pd.read_parquet(run / "cohort" / "patients.parquet").set_index("patient_id")
    expr = pd.read_parquet(run / "cohort" / "expression.parquet")
    cnv = pd.read_parquet(run / "cohort" / "cnv.parquet")
    mut = pd.read_parquet(run / "cohort" / "mutation.parquet")
    predictor = OmicsPredictor.load(run)
    test_ids = stored.index[stored["split"] == "test"][:4]
    for pid in test_ids:
        p = patients.loc[pid]
        patient = PatientInput(patient_id=pid, cancer_type=p["cancer_type"], expression=expr.loc[pid], slide=None,
                               mpp=None, source="cohort", age=p["age"], sex=p["sex"],
                               cnv=cnv.loc[pid] if pid in cnv.index else None, mutation=mut.loc[pid],
                               stage=None if np.isnan(p["stage"]) else float(p["stage"]),
                               grade=None if np.isnan(p["grade"]) else float(p["grade"]))
        out = predictor.predict(patient)
        assert out.prob == pytest.approx(stored.loc[pid, "prob"], abs=1e-5)
        li = out.layer_inputs.set_index(["layer", "feature"])
        for f in config["layers"]["mutation"]:
            want = mut.loc[pid].get(f, np.nan)
            got = li.loc[("mutation", f), "value"]
            assert (np.isnan(want) and np.isnan(got)) or got == want
        assert out.covariates["stage"] == pytest.approx(p["stage"], nan_ok=True)
    # a mutation list: listed genes mutated, the model's other mutation features wild-type
    pid = test_ids[0]
    p = patients.loc[pid]
    listed = predictor.predict_expression(expr.loc[pid], cancer_type=p["cancer_type"], mutation=["IDH1"])
    li = listed.layer_inputs.set_index(["layer", "feature"])["value"]
    assert li[("mutation", "IDH1")] == 1 and (li["mutation"].drop("IDH1") == 0).all()


@pytest.mark.slow
def test_stored_exports_and_explain_give_the_same_alterations(layered, tmp_path) -> None:  # noqa: ANN001
    """One inference path: a cohort patient's layer inputs, attributions and covariate effects as the
    reasoning stage reads them (the stage's exports) equal those ``explain`` computes, and so do the
    alterations of their evidence records; the report shows each input's contribution."""
    import json

    from oncofm.explain.pipeline import ExplainSettings, explain_patient
    from oncofm.fusion.evidence import EvidenceSettings, build_evidence
    from oncofm.omics.artifacts import OmicsArtifacts
    from oncofm.omics.predict import stored_omics_results
    from oncofm.paths import RunLayout

    run, _ = layered
    arts = OmicsArtifacts.of(run)
    rows = pd.read_parquet(arts.layer_attributions)
    assert set(rows["layer"]) == {"cnv", "mutation", "covariate"}
    # unaltered values carry no attribution
    assert (rows.loc[(rows["layer"] != "covariate") & (rows["value"] == 0), "attribution"] == 0).all()
    patients = pd.read_parquet(run / "cohort" / "patients.parquet")
    stored = stored_omics_results(RunLayout(run), patients)
    mut = pd.read_parquet(run / "cohort" / "mutation.parquet")
    lgg = patients[(patients["cancer_type"] == "LGG") & patients["patient_id"].isin(mut.index[mut["IDH1"] == 1])]
    pid = str(lgg["patient_id"].iloc[0])
    out = tmp_path / "report"
    explain_patient(ExplainSettings(run=str(run), out=str(out), patient_id=pid))
    rec = json.loads((out / "explanation.json").read_text())
    s = stored[pid]
    assert rec["omics"]["prob"] == pytest.approx(s.prob, abs=1e-5)
    settings = EvidenceSettings(gene_rule="attribution")
    want = build_evidence("LGG", None, s, None, None, settings).alterations
    from oncofm.explain.pipeline import infer

    ex = infer(ExplainSettings(run=str(run), out=str(tmp_path / "x"), patient_id=pid), tmp_path)
    got = ex.omics.layer_inputs
    pd.testing.assert_frame_equal(got[["layer", "feature", "value"]], s.layer_inputs[["layer", "feature", "value"]])
    np.testing.assert_allclose(got["attribution"], s.layer_inputs["attribution"], atol=1e-5)
    assert ex.omics.covariate_effects == pytest.approx(s.covariate_effects, abs=1e-5)
    assert build_evidence("LGG", None, ex.omics, None, None, settings).alterations == want
    idh1 = got.set_index("feature").loc["IDH1"]
    assert idh1["value"] == 1 and idh1["attribution"] != 0
    assert rec["evidence"]["alterations"] == build_evidence(
        "LGG", rec["evidence"]["age"], s, None, None, EvidenceSettings()).alterations
    html = (out / "report.html").read_text()
    assert "id='layers'" in html and "Genomic and clinical inputs" in html


@pytest.mark.slow
def test_absent_layer_is_masked_not_zero_filled(layered) -> None:  # noqa: ANN001
    import torch

    from oncofm.omics.predict import OmicsPredictor

    run, _ = layered
    predictor = OmicsPredictor.load(run)
    expr = pd.read_parquet(run / "cohort" / "expression.parquet")
    cnv = pd.read_parquet(run / "cohort" / "cnv.parquet")
    patients = pd.read_parquet(run / "cohort" / "patients.parquet").set_index("patient_id")
    pid = next(p for p in cnv.index if patients.loc[p, "cancer_type"] == "LGG")
    kwargs = dict(cancer_type="LGG", age=50.0)
    absent = predictor.predict_expression(expr.loc[pid], **kwargs).prob
    diploid = predictor.predict_expression(expr.loc[pid], cnv=pd.Series(0.0, index=predictor.layer_features["cnv"]),
                                           **kwargs).prob
    assert absent != pytest.approx(diploid, abs=1e-7)  # absent is not "measured and 0"
    # a masked token's contents cannot reach the output: change its coefficient, nothing moves
    model = predictor.model
    table = predictor.make_table(expr.loc[[pid]], patients.loc[[pid]])
    from oncofm.omics.data import OmicsDataset
    from oncofm.omics.model import model_inputs

    batch = torch.utils.data.default_collate([OmicsDataset(table, predictor.encoder)[0]])
    args = model_inputs(batch)
    extra = dict(args[4])
    v = extra["layer_cnv"].clone()
    v[..., 0] = float("nan")
    extra["layer_cnv"] = v
    a = model(*args[:4], extra)[0]
    v2 = v.clone()
    v2[..., 1] = 123.0
    extra["layer_cnv"] = v2
    b = model(*args[:4], extra)[0]
    assert torch.equal(a, b)


def test_new_patient_inputs_are_validated() -> None:
    from oncofm.omics.predict import validate_layer_inputs

    feats = {"mutation": ["IDH1", "TP53"], "cnv": ["CDKN2A"]}
    layers, covs = validate_layer_inputs(feats, cnv={"CDKN2A": -2}, mutation=["TP53"], stage="Stage IIIA", grade="G3")
    assert layers["cnv"]["CDKN2A"] == -2 and layers["mutation"].to_dict() == {"IDH1": 0.0, "TP53": 1.0}
    assert covs == {"stage": 3.0, "grade": 3.0}
    assert validate_layer_inputs(feats)[1] == {}
    with pytest.raises(OncoFMError, match="mutation status must be 0"):
        validate_layer_inputs(feats, mutation={"TP53": 2})
    with pytest.raises(OncoFMError, match="copy-number values must be numbers"):
        validate_layer_inputs(feats, cnv={"CDKN2A": "deleted"})
    with pytest.raises(OncoFMError, match="levels"):
        validate_layer_inputs(feats, cnv={"CDKN2A": 250.0})
    with pytest.raises(OncoFMError, match="stage 'Stage V' is not recognised"):
        validate_layer_inputs(feats, stage="Stage V")
    with pytest.raises(OncoFMError, match="grade 7"):
        validate_layer_inputs(feats, grade=7)


def test_baselines_and_encoder_get_the_covariates() -> None:
    from oncofm.omics.data import ClinicalEncoder, OmicsTable

    n = 6
    table = OmicsTable(patient_ids=np.array([f"P{i}" for i in range(n)]), genes=["A"],
                       pairs=np.zeros((n, 1, 2), np.float32), cancer_type=np.array(["X", "Y"] * 3),
                       age=np.full(n, 60.0), sex=np.array(["female"] * n), time=np.full(n, 100.0),
                       event=np.ones(n), split=np.array(["train"] * n),
                       covariates={"stage": np.array([1, 2, 3, 4, np.nan, 2.0]), "grade": np.full(n, np.nan)})
    enc = ClinicalEncoder.fit(table)
    assert enc.covariates == ["stage", "grade"]
    parts = enc.design_parts(table)
    np.testing.assert_array_equal(parts["covariates"][:, :5], np.eye(5)[[0, 1, 2, 3, 4, 1]])  # I-IV, unknown
    assert (parts["covariates"][:, 9] == 1).all()                                              # grade unknown
    assert enc.design(table).shape[1] == 2 + 2 + 2 + 10
    assert ClinicalEncoder.from_dict(enc.to_dict()) == enc
    old = ClinicalEncoder(cancer_types=["<unknown>", "X"], age_mean=0.0, age_std=1.0)
    assert "covariates" not in old.to_dict() and old.design(table).shape[1] == 1 + 2 + 2


def test_expression_only_model_keeps_its_parameters_and_config() -> None:
    from oncofm.omics.model import create_model

    arch = {"n_genes": 4, "n_cancer_types": 3, "d_model": 8, "n_layers": 1, "n_heads": 2, "linear_skip": True}
    model = create_model(**arch)
    keys = set(model.state_dict())
    assert not any(k.startswith(("layer_", "covariate_")) for k in keys)
    assert {k.split(".")[1] for k in keys if k.startswith("skip.")} == {"genes", "cancer", "clinical"}
    assert "layers" not in model.config and "covariates" not in model.config
    layered = create_model(**arch, layers={"cnv": 3}, covariates=["stage"])
    assert keys < set(layered.state_dict())
    with pytest.raises(ValueError, match="pass extra="):
        import torch

        layered(torch.zeros(2, 4, 2), torch.zeros(2, dtype=torch.long), torch.zeros(2), torch.zeros(2, dtype=torch.long))
