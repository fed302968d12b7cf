"""`train omics`, `evaluate` and `predict_patient` end to end on a small slice of the real tcga13 cohort."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

SLICE = ("KIRC", "LGG", "BLCA")


@pytest.fixture(scope="module")
def trained_slice(tcga13_run, tmp_path_factory):  # noqa: ANN001, ANN201
    """Real patients of three cancer types: cohort → cox → features (16 genes) → a small omics model."""
    from oncofm.omics.features import FeatureSettings, run_features
    from oncofm.omics.train import OmicsTrainSettings, train_omics
    from oncofm.survival.cox_stage import CoxSettings, run_cox

    run = tmp_path_factory.mktemp("omics_slice")
    (run / "cohort").mkdir()
    patients = pd.read_parquet(tcga13_run / "cohort" / "patients.parquet")
    patients = patients[patients["cancer_type"].isin(SLICE)]
    keep = set(patients["patient_id"])
    patients.to_parquet(run / "cohort" / "patients.parquet")
    expr = pd.read_parquet(tcga13_run / "cohort" / "expression.parquet")
    expr[expr.index.isin(keep)].to_parquet(run / "cohort" / "expression.parquet")
    splits = pd.read_parquet(tcga13_run / "cohort" / "splits.parquet")
    splits[splits["patient_id"].isin(keep)].to_parquet(run / "cohort" / "splits.parquet")
    shutil.copy(tcga13_run / "cohort" / "normalization.parquet", run / "cohort" / "normalization.parquet")
    run_cox(CoxSettings(run=str(run), plots=False))
    run_features(FeatureSettings(run=str(run), top_k=16))
    settings = OmicsTrainSettings(run=str(run), d_model=16, n_layers=1, n_heads=2, epochs=2, batch_size=64,
                                  n_boot=50, ig_steps=4, threads=1, progress=False)
    paths = train_omics(settings)
    return run, paths, settings


def test_train_stage_writes_the_contract(trained_slice) -> None:  # noqa: ANN001
    from oncofm.omics.artifacts import OmicsArtifacts
    from oncofm.omics.train import MODEL_LABEL

    run, paths, _ = trained_slice
    arts = OmicsArtifacts.of(run)
    for p in paths.values():
        assert p.exists() and p.stat().st_size > 0, p
    metrics = json.loads(arts.metrics.read_text())
    assert [r["model"] for r in metrics["comparison"]] == [MODEL_LABEL, "clinical", "logistic_l2", "coxnet", "hgb"]
    n_test = metrics["data"]["n_test"]
    for name, res in metrics["test"].items():
        pooled = res["pooled"]
        assert pooled["n"] == n_test and pooled["n_labelled"] + pooled["n_unlabelled"] == n_test, name
        assert 0 <= pooled["auc_lo"] <= pooled["auc"] <= pooled["auc_hi"] <= 1, name
        assert 0.5 < pooled["c_index"] <= 1, name  # real signal: cancer type alone separates LGG/KIRC/BLCA
        assert set(res["per_cancer_type"]) == set(SLICE)
    pred = pd.read_parquet(arts.predictions)
    n = len(pd.read_parquet(run / "cohort" / "patients.parquet"))
    assert len(pred) == n and pred["prob"].between(0, 1).all()
    assert np.allclose(pred["prob"], 1 / (1 + np.exp(-pred["risk"])))
    attr = pd.read_parquet(arts.attributions)
    assert list(attr.columns) == ["patient_id", "gene", "attribution"] and len(attr) == n * 16
    emb = pd.read_parquet(arts.embeddings)
    assert emb.index.name == "patient_id" and emb.shape == (n, 16 + 1)  # CLS state + the anchor's logit
    assert (run / "settings" / "train_omics.yaml").exists()


def test_cli_train_skips_finished_and_predict_patient_matches(trained_slice) -> None:  # noqa: ANN001
    from typer.testing import CliRunner

    from oncofm.cli import app
    from oncofm.omics.artifacts import OmicsArtifacts
    from oncofm.omics.predict import OmicsPredictor

    run, _, s = trained_slice
    before = OmicsArtifacts.of(run).weights.stat().st_mtime_ns
    res = CliRunner().invoke(app, ["train", "omics", "--run", str(run), "--d-model", "16", "--n-layers", "1",
                                   "--n-heads", "2", "--epochs", "2", "--batch-size", "64", "--n-boot", "50",
                                   "--ig-steps", "4", "--threads", "1", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert OmicsArtifacts.of(run).weights.stat().st_mtime_ns == before  # same settings: nothing retrained
    # one new patient from raw expression gives the same probability as the stage's predictions
    predictor = OmicsPredictor.load(run)
    patients = pd.read_parquet(run / "cohort" / "patients.parquet").set_index("patient_id")
    pid = patients.index[5]
    raw = pd.read_parquet(run / "cohort" / "expression.parquet").loc[pid]
    out = predictor.predict_expression(raw, cancer_type=patients.loc[pid, "cancer_type"],
                                       age=patients.loc[pid, "age"], sex=patients.loc[pid, "sex"])
    arts = OmicsArtifacts.of(run)
    stage_prob = pd.read_parquet(arts.predictions).set_index("patient_id").loc[pid, "prob"]
    assert out.prob == pytest.approx(stage_prob, abs=1e-5)
    assert out.coverage == 1.0 and len(out.attributions) == 16 and out.embedding.shape == (17,)
    assert out.attributions["attribution"].abs().is_monotonic_decreasing
    # the same integrated gradients (same steps, read from the model's config) as the stage's export
    stored = pd.read_parquet(arts.attributions)
    stored = stored[stored["patient_id"] == pid].set_index("gene")["attribution"]
    got = out.attributions.set_index("gene")["attribution"]
    assert np.allclose(got.reindex(stored.index).to_numpy(), stored.to_numpy(), atol=1e-5)


def test_evaluate_other_cohort_coverage_and_unseen_types(trained_slice, tmp_path) -> None:  # noqa: ANN001
    from oncofm.errors import OncoFMError
    from oncofm.omics.evaluate import OmicsEvaluateSettings, evaluate_cohort

    run, _, _ = trained_slice
    genes = (run / "features" / "genes.txt").read_text().split()
    other = tmp_path / "other"
    shutil.copytree(run / "cohort", other / "cohort")
    patients = pd.read_parquet(other / "cohort" / "patients.parquet")
    patients["cancer_type"] = patients["cancer_type"].replace({"KIRC": "KIRX"})  # a type unseen in training
    patients.to_parquet(other / "cohort" / "patients.parquet")
    expr = pd.read_parquet(other / "cohort" / "expression.parquet")
    expr.drop(columns=genes[:4]).to_parquet(other / "cohort" / "expression.parquet")  # 75% coverage
    paths = evaluate_cohort(OmicsEvaluateSettings(run=str(run), cohort=str(other), n_boot=50))
    out = json.loads(paths["metrics"].read_text())
    assert out["gene_coverage"] == pytest.approx(0.75)
    assert sorted(out["missing_genes"]) == sorted(genes[:4])
    assert out["unseen_cancer_types"] == ["KIRX"]
    assert out["n_patients"] == len(patients)
    assert 0.5 < out["metrics"]["pooled"]["c_index"] <= 1
    with pytest.raises(OncoFMError, match="min-coverage"):
        evaluate_cohort(OmicsEvaluateSettings(run=str(run), cohort=str(other), min_coverage=0.9, n_boot=10))


def _outside_cohort(run, tmp_path, name, transform):  # noqa: ANN001, ANN202
    """A copy of the slice's cohort without split statistics (an outside cohort), values transformed."""
    other = tmp_path / name
    (other / "cohort").mkdir(parents=True)
    for f in ("patients.parquet",):
        shutil.copy(run / "cohort" / f, other / "cohort" / f)
    expr = pd.read_parquet(run / "cohort" / "expression.parquet")
    transform(expr).astype("float32").to_parquet(other / "cohort" / "expression.parquet")
    return other


def test_evaluate_cohort_on_another_scale_uses_its_own_statistics(trained_slice, tmp_path) -> None:  # noqa: ANN001
    """`evaluate --normalization auto` on a cohort without split statistics: real z-scores keep the model's
    statistics; the same patients as log2(RSEM+1)-like values or counts are z-scored with the cohort's own
    statistics (and metrics.json says so); `--normalization model` refuses them with the units message."""
    from oncofm.errors import OncoFMError
    from oncofm.omics.evaluate import OmicsEvaluateSettings, evaluate_cohort
    from test_units import counts_like, log2_rsem_like

    run, _, _ = trained_slice
    results = {}
    for name, transform in (("zscores", lambda e: e), ("log2", log2_rsem_like), ("counts", counts_like)):
        other = _outside_cohort(run, tmp_path, name, transform)
        paths = evaluate_cohort(OmicsEvaluateSettings(run=str(run), cohort=str(other), n_boot=20))
        results[name] = json.loads(paths["metrics"].read_text())
        if name != "zscores":
            with pytest.raises(OncoFMError, match=r"looks like (log-scale values|counts).*trained on per-cohort "
                                                  r"RNA-seq z-scores.*--normalization auto"):
                evaluate_cohort(OmicsEvaluateSettings(run=str(run), cohort=str(other), n_boot=20,
                                                      normalization="model"))
    z, lg, ct = results["zscores"], results["log2"], results["counts"]
    assert z["normalization"].startswith("model") and z["units"]["ok"] and z["units"]["units"] == "z-scores"
    assert lg["normalization"].startswith("cohort (own statistics of all its patients: values are on another scale")
    assert lg["units"]["units"] == "log-scale" and not lg["units"]["ok"] and lg["units"]["gene_location"] > 10
    assert ct["normalization"].endswith("; counts, log2(x+1) first)") and ct["units"]["units"] == "counts"
    for res in (lg, ct):  # the per-cohort z-score recovers the real signal
        assert res["n_patients"] == z["n_patients"]
        assert res["metrics"]["pooled"]["c_index"] > 0.5
        assert abs(res["metrics"]["pooled"]["c_index"] - z["metrics"]["pooled"]["c_index"]) < 0.1


def test_predict_expression_refuses_a_log_scale_profile(trained_slice) -> None:  # noqa: ANN001
    from oncofm.errors import OncoFMError
    from oncofm.omics.predict import OmicsPredictor
    from test_units import log2_rsem_like

    run, _, _ = trained_slice
    predictor = OmicsPredictor.load(run)
    patients = pd.read_parquet(run / "cohort" / "patients.parquet").set_index("patient_id")
    expr = pd.read_parquet(run / "cohort" / "expression.parquet")
    pid = patients.index[patients["cancer_type"] == "KIRC"][0]
    assert 0 < predictor.predict_expression(expr.loc[pid], cancer_type="KIRC").prob < 1
    logged = log2_rsem_like(expr).loc[pid]
    with pytest.raises(OncoFMError, match=r"^the expression profile looks like log-scale values .* against the "
                                          r"KIRC training statistics.*trained on per-cohort RNA-seq z-scores"):
        predictor.predict_expression(logged, cancer_type="KIRC")
    # normalised input skips the check (the caller vouches for its units)
    assert predictor.predict_expression(expr.loc[pid].fillna(0).clip(-5, 5), cancer_type="KIRC",
                                        normalized=True).prob > 0
