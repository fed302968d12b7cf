"""The slide branch on slide-level image features (oncofm.pathology.feature_model) with a planted answer, its
features in words, the image findings of the evidence record and the checker's image rules, the stacked fused
head and the side-by-side comparison."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from oncofm.errors import DataValidationError, OncoFMError
from oncofm.fusion.checker import check_explanation
from oncofm.fusion.evidence import EvidenceSettings, build_evidence, ordinal
from oncofm.fusion.reasoning import apply_stacked_head, fit_stacked_head
from oncofm.fusion.templates import render_target
from oncofm.pathology.feature_model import (
    FeaturePreprocessor,
    SlideFeatureArtifacts,
    SlideFeatureNet,
    SlideFeaturePredictor,
    SlideFeatureSettings,
    feature_percentiles,
    integrated_gradients,
    stored_feature_results,
    train_slide_feature_model,
)
from oncofm.pathology.feature_names import describe_feature
from oncofm.paths import RunLayout
from oncofm.training import TrainSettings

PLANTED = "DENSITY [LYMPHOCYTE CELLS] IN [STROMA]"  # lowers the risk
PLANTED_UP = "AREA (MM2) OF [NECROSIS] IN [TISSUE]"  # raises the risk


def test_feature_names_in_words() -> None:
    cases = {
        "DENSITY [LYMPHOCYTE CELLS] IN [STROMA]": "lymphocyte density in stroma",
        "DENSITY RATIO [LYMPHOCYTE CELLS] IN [[STROMA] OVER [TUMOR]]": "lymphocyte density in stroma relative to "
                                                                       "tumor",
        "DENSITY RATIO [[LYMPHOCYTE CELLS] OVER [CANCER CELLS]] IN [TUMOR]": "ratio of lymphocyte to cancer cell "
                                                                             "density in tumor",
        "COUNT PROP [[CANCER CELLS] OVER [[CANCER CELLS] SELECTED BY [PLASMA_RADIUS_80]]] IN [EPITHELIAL]":
            "cancer cells as a share of cancer cells within 80 µm of plasma cells in epithelium",
        "TOTAL [CANCER CELLS] IN [TUMOR] SELECTED BY [FIBROBLAST_RADIUS_80]":
            "number of cancer cells in tumor within 80 µm of fibroblasts",
        "AREA (MM2) OF [ESI_0080] IN [TISSUE]": "area of the epithelium-stroma interface (mm²)",
        "CELL CLUSTERING PROPERTIES: CLUSTER SIZE MEAN OF LYMPHOCYTE IN STROMA": "lymphocyte cluster size mean in "
                                                                                "stroma",
        "REGION PROPERTIES: NUMBER OF REGIONS OF NECROSIS": "number of regions of necrosis",
        "uni_v2_17": "uni_v2_17",  # outside the grammar: as given
    }
    for name, words in cases.items():
        assert describe_feature(name) == words


def test_every_real_hif_name_is_described_uniquely_without_list_separators(shared_data: Path) -> None:
    names = pd.read_csv(shared_data / "hif2gene" / "feature_names.csv")["feature"].tolist()
    words = [describe_feature(n) for n in names]
    assert len(set(words)) == len(names) == 607
    assert not [w for w in words if any(c in w for c in ":;,")]
    assert all(w != n.lower() for w, n in zip(words, names, strict=True))  # none fell back to the raw name


def test_preprocessor_logs_skewed_counts_imputes_and_clips() -> None:
    rng = np.random.default_rng(0)
    x = np.stack([rng.lognormal(3, 1.5, 500), rng.normal(0, 1, 500)], axis=1)
    x[3, 0] = np.nan
    pre = FeaturePreprocessor.fit(x, ["count", "ratio"], clip=3.0)
    assert pre.log.tolist() == [True, False]
    z = pre.transform(x)
    assert np.isfinite(z).all() and np.abs(z).max() <= 3.0
    assert z[3, 0] == pytest.approx((pre.median[0] - pre.mean[0]) / pre.std[0], abs=1e-5)  # median-imputed
    back = FeaturePreprocessor.from_dict(pre.to_dict())
    np.testing.assert_array_equal(back.transform(x), z)
    with pytest.raises(DataValidationError, match="expected 2 slide features"):
        pre.transform(x[:, :1])


def test_integrated_gradients_add_up_to_the_logit_change() -> None:
    torch.manual_seed(0)
    model = SlideFeatureNet(6, hidden=8).eval()
    z = np.random.default_rng(1).normal(size=(5, 6)).astype(np.float32)
    attr = integrated_gradients(model, z, steps=64)
    with torch.no_grad():
        logit = model(torch.as_tensor(z))[0].numpy()
        base = model(torch.zeros(1, 6))[0].numpy()
    np.testing.assert_allclose(attr.sum(1), logit - base, atol=2e-3)


def test_percentiles_are_within_the_cancer_type() -> None:
    ref = pd.DataFrame({"cancer_type": ["A"] * 10 + ["B"] * 10, "f": list(range(10)) + list(range(100, 110))})
    assert feature_percentiles(np.array([4.0]), "A", ref, ["f"])[0] == pytest.approx(45.0)  # 4 below + 1/2 tie
    assert feature_percentiles(np.array([4.0]), "B", ref, ["f"])[0] == 0.0
    assert feature_percentiles(np.array([4.0]), "C", ref, ["f"])[0] == pytest.approx(22.5)  # unseen: all
    assert np.isnan(feature_percentiles(np.array([np.nan]), "A", ref, ["f"])[0])
    assert [ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 92)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "92nd"]


# ----------------------------------------------------------------------------------------------------------
# a planted cohort: two features decide the outcome, the rest is noise
def _planted_run(root: Path, n: int = 480, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    ids = [f"TCGA-PL-{i:04d}" for i in range(n)]
    types = np.where(np.arange(n) % 2 == 0, "LUAD", "BRCA")
    noise = {f"DENSITY [MACROPHAGE CELLS] IN [{r}]": rng.lognormal(2, 1, n) for r in ("TUMOR", "EPITHELIAL")}
    noise.update({f"DENSITY [PLASMA CELLS] IN [{r}]": rng.lognormal(1, 1, n) for r in ("TUMOR", "STROMA")})
    lymph = rng.lognormal(3, 0.8, n)
    necrosis = rng.lognormal(0, 1.0, n)
    score = -1.8 * (np.log1p(lymph) - np.log1p(lymph).mean()) + 1.5 * (np.log1p(necrosis) - np.log1p(necrosis).mean())
    death = rng.random(n) < 1 / (1 + np.exp(-2.5 * score))
    layout = RunLayout(root)
    layout.cohort_dir.mkdir(parents=True)
    pd.DataFrame({"patient_id": ids, "cancer_type": types, "os_days": np.where(death, 400.0, 3000.0),
                  "os_event": death.astype(int), "age": 60.0}).to_parquet(layout.patients)
    split = np.array(["train"] * n, dtype=object)
    split[int(0.6 * n): int(0.8 * n)] = "val"
    split[int(0.8 * n):] = "test"
    pd.DataFrame({"patient_id": ids, "split": split}).to_parquet(layout.splits)
    feats = pd.DataFrame({PLANTED: lymph, PLANTED_UP: necrosis, **noise}, index=pd.Index(ids, name="patient_id"))
    feats.iloc[5, 2] = np.nan  # a missing value
    feats["n_slides"] = 1
    feats.to_parquet(layout.slide_features)
    return root


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = _planted_run(tmp_path_factory.mktemp("planted") / "run")
    settings = SlideFeatureSettings(run=str(run), hidden=8, train=TrainSettings(
        epochs=60, batch_size=64, lr=3e-3, weight_decay=1e-3, patience=15, monitor="val_auc", mode="max",
        warmup_fraction=0.0, progress=False))
    train_slide_feature_model(settings)
    return run


def test_planted_features_are_learned_and_attributed(planted: Path) -> None:
    import json

    arts = SlideFeatureArtifacts.of(planted)
    metrics = json.loads(arts.metrics.read_text())
    assert metrics["splits"]["test"]["pooled"]["auc"] > 0.75  # the planted signal, on held-out patients
    attr = pd.read_parquet(arts.attributions)
    top = attr[attr["rank"] < 2].groupby("patient_id")["feature"].apply(set)
    both = top.apply(lambda s: s == {PLANTED, PLANTED_UP}).mean()
    assert both > 0.8  # the two planted features are the two largest attributions for most patients
    # direction: high lymphocyte density lowers the risk
    lym = attr[attr["feature"] == PLANTED]
    corr = np.corrcoef(np.log1p(lym["value"]), lym["attribution"])[0, 1]
    assert corr < -0.8
    assert set(lym["name"]) == {"lymphocyte density in stroma"}


def test_stored_results_are_the_predictors_results(planted: Path) -> None:
    layout = RunLayout(planted)
    stored = stored_feature_results(layout)
    predictor = SlideFeaturePredictor.from_run(layout)
    table = pd.read_parquet(layout.slide_features)
    pid = table.index[7]  # a BRCA patient (odd index)
    fresh = predictor.predict(table.loc[pid].drop("n_slides"), "BRCA")
    assert fresh.prob == pytest.approx(stored[pid].prob, abs=1e-6)
    np.testing.assert_allclose(fresh.embedding, stored[pid].embedding, atol=1e-6)
    pd.testing.assert_frame_equal(fresh.attributions.reset_index(drop=True),
                                  stored[pid].attributions.reset_index(drop=True), check_dtype=False, atol=1e-5)
    assert stored[pid].reference_type == fresh.reference_type == "BRCA"  # percentiles within the type


def test_predictor_refuses_another_feature_set_and_text(planted: Path) -> None:
    predictor = SlideFeaturePredictor.from_run(RunLayout(planted))
    table = pd.read_parquet(RunLayout(planted).slide_features).drop(columns="n_slides")
    row = table.iloc[0]
    with pytest.raises(DataValidationError, match="1 missing"):
        predictor.predict(row.drop(PLANTED), "LUAD")
    bad = row.astype(object)
    bad[PLANTED] = "high"
    with pytest.raises(DataValidationError, match="not numbers"):
        predictor.predict(bad, "LUAD")


def test_training_needs_labelled_val_patients(tmp_path: Path) -> None:
    run = _planted_run(tmp_path / "run", n=60)
    splits = pd.read_parquet(RunLayout(run).splits)
    splits["split"] = splits["split"].replace({"val": "train"})
    splits.to_parquet(RunLayout(run).splits)
    with pytest.raises(OncoFMError, match="val split has 0 labelled"):
        train_slide_feature_model(SlideFeatureSettings(run=str(run)))


# ----------------------------------------------------------------------------------------------------------
# the evidence record, the text and the checker
def _evidence(planted: Path) -> dict:
    stored = stored_feature_results(RunLayout(planted))
    res = next(iter(stored.values()))
    return build_evidence("LUAD", 60.0, None, res, None, EvidenceSettings()).to_dict()


def test_evidence_cites_image_features_in_words_with_percentiles(planted: Path) -> None:
    ev = _evidence(planted)
    assert ev["slide_source"] == "features" and ev["missing"] == ["omics"]
    feats = ev["image_features"]
    assert 1 <= len(feats) <= 4 and {f["effect"] for f in feats} <= {"raises", "lowers"}
    assert all(1 <= f["percentile"] <= 99 and f["reference"] in ("LUAD", "all") for f in feats)
    text = render_target(ev, death=True, risk=0.7, seed=1)
    for f in feats:
        assert f["name"] in text and f"{ordinal(f['percentile'])} percentile" in text
    result = check_explanation(text, ev, set())
    assert result.passed, result.failures
    assert result.image_features == len(feats) == result.image_features_ok


def test_checker_catches_wrong_image_statements(planted: Path) -> None:
    ev = _evidence(planted)
    f = ev["image_features"][0]
    good = render_target(ev, death=True, risk=0.7, seed=1)
    wrong_pct = good.replace(f"{ordinal(f['percentile'])} percentile", f"{ordinal(100 - f['percentile'] // 2)} "
                                                                          "percentile", 1)
    assert "image_feature_wrong" in check_explanation(wrong_pct, ev, set()).rules
    wrong_type = good.replace(f"percentile of {f['reference']} patients", "percentile of SKCM patients", 1)
    assert "image_feature_wrong" in check_explanation(wrong_type, ev, set()).rules
    invented = good.replace(f["name"], "plasma cell density in necrosis", 1)
    assert "image_feature_not_in_evidence" in check_explanation(invented, ev, set()).rules
    # the feature moved to the other direction's sentence
    flipped = dict(ev, image_features=[dict(x, effect="lowers" if x["effect"] == "raises" else "raises")
                                       for x in ev["image_features"]])
    assert "image_feature_wrong" in check_explanation(good, flipped, set()).rules


# ----------------------------------------------------------------------------------------------------------
# the stacked fused head
def test_stacked_head_is_fitted_on_validation_and_keeps_the_omics_ranking_without_a_slide() -> None:
    rng = np.random.default_rng(0)
    n = 600
    signal = rng.normal(size=n)
    labels = (rng.random(n) < 1 / (1 + np.exp(-2 * signal))).astype(float)
    p_omics = 1 / (1 + np.exp(-(signal + rng.normal(scale=1.0, size=n))))
    p_slide = 1 / (1 + np.exp(-(signal + rng.normal(scale=1.0, size=n))))
    p_slide[::3] = np.nan  # a third have no slide
    split = np.array(["train", "val", "test"] * (n // 3), dtype=object)
    prob, oof, head = fit_stacked_head(p_omics, p_slide, labels, split)
    assert oof.sum() == (split == "val").sum()  # validation patients out-of-fold, nobody else
    assert head["coef"][0] > 0.3 and head["coef"][1] > 0.3  # both informative models get weight
    no_slide = np.isnan(p_slide) & (split == "test")
    order = np.argsort(p_omics[no_slide])
    assert np.all(np.diff(prob[no_slide][order]) >= 0)  # a monotone function of the omics probability
    np.testing.assert_allclose(apply_stacked_head(head, p_omics, p_slide)[split == "test"], prob[split == "test"])
    with pytest.raises(OncoFMError, match="validation"):
        fit_stacked_head(p_omics, p_slide, labels, np.array(["train"] * n, dtype=object))


# ----------------------------------------------------------------------------------------------------------
# every model unchanged on another cohort, and the side-by-side table
def test_other_cohort_gets_the_slide_feature_model_and_the_saved_fused_head(planted: Path, tmp_path: Path) -> None:
    import json
    import shutil

    from oncofm.fusion.reasoning import HEAD_MODEL_FILE
    from oncofm.omics.evaluate import OmicsEvaluateSettings, _other_models

    layout = RunLayout(planted)
    head = {"kind": "stacked", "coef": [1.0, 0.5, 0.0, 0.0], "intercept": 0.0}
    layout.reasoning_dir.mkdir(exist_ok=True)
    (layout.reasoning_dir / HEAD_MODEL_FILE).write_text(json.dumps(head))
    other = tmp_path / "other"
    shutil.copytree(layout.cohort_dir, other / "cohort")
    patients = pd.read_parquet(layout.patients).set_index("patient_id")
    ids = patients.index.tolist()
    rng = np.random.default_rng(0)
    p_omics = rng.uniform(0.05, 0.95, len(ids))
    settings = OmicsEvaluateSettings(run=str(planted), cohort=str(other), n_boot=50)
    paths = _other_models(settings, ids, p_omics, patients, tmp_path / "out")
    frame = pd.read_parquet(tmp_path / "out" / "modalities_predictions.parquet").set_index("patient_id")
    stored = stored_feature_results(layout)
    assert frame.loc[ids[3], "slide"] == pytest.approx(stored[ids[3]].prob, abs=1e-6)  # the same model, unchanged
    np.testing.assert_allclose(frame["fused head"], apply_stacked_head(head, p_omics, frame["slide"].to_numpy()))
    table = paths["modalities"].read_text()
    assert "both modalities" in table and "fused head" in table
    # another feature set: one clear message
    feats = pd.read_parquet(RunLayout(other).slide_features).drop(columns=[PLANTED])
    feats.to_parquet(RunLayout(other).slide_features)
    with pytest.raises(DataValidationError, match="1 missing"):
        _other_models(settings, ids, p_omics, patients, tmp_path / "out2")


def test_side_by_side_comparison_on_the_planted_run(planted: Path) -> None:
    from oncofm.fusion.compare import compare_modalities
    from oncofm.fusion.reasoning import HEAD_FILE

    layout = RunLayout(planted)
    preds = pd.read_parquet(SlideFeatureArtifacts.of(planted).predictions)
    rng = np.random.default_rng(1)
    omics = preds[["patient_id", "split"]].assign(prob=rng.uniform(0.05, 0.95, len(preds)))
    layout.model_dir("omics").mkdir(parents=True, exist_ok=True)
    omics.to_parquet(layout.model_dir("omics") / "predictions.parquet")
    fused = preds[["patient_id", "split", "label"]].assign(prob=0.5 * preds["prob"] + 0.5 * omics["prob"], oof=False)
    layout.reasoning_dir.mkdir(exist_ok=True)
    fused.to_parquet(layout.reasoning_dir / HEAD_FILE)
    out = compare_modalities(planted, split="test", n_boot=100)
    both = out["groups"]["both modalities"]
    assert set(both["models"]) == {"omics", "slide", "fused head"}
    assert both["fused_vs_best"]["best_single"] == "slide"  # the planted signal is in the slide features
    assert both["models"]["omics"]["auc"] < 0.7 < both["models"]["slide"]["auc"]
    d, lo, hi = both["fused_vs_best"]["auc_diff"]
    assert lo <= d <= hi
    assert Path(out["paths"]["md"]).read_text().startswith("Split: test")


def test_stage_and_grade_enter_the_record_the_text_and_the_checker() -> None:
    from oncofm.explain.inputs import parse_clinical_input

    ev = build_evidence("LUAD", 70.0, None, None, None, EvidenceSettings(), stage="Stage IIIA", grade="G2").to_dict()
    assert (ev["stage"], ev["grade"]) == (3, 2)
    text = render_target(ev, death=False, risk=0.3, seed=0)
    assert "stage III, grade 2" in text
    assert check_explanation(text, ev, set()).passed
    assert build_evidence("LUAD", None, None, None, None, EvidenceSettings(), stage=float("nan")).stage is None
    assert parse_clinical_input("IIB", "stage") == 2.0 and parse_clinical_input("[Not Available]", "stage") is None
    with pytest.raises(OncoFMError, match="--grade 'severe'"):
        parse_clinical_input("severe", "grade")
