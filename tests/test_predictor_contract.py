"""The one inference path, on a small REAL run with no test doubles.

The bundled demo cohort (real TCGA expression, survival and 15 real H&E images) goes through every stage
with small settings: Cox, features, a small omics model, tiles, a small Swin + attention-MIL slide model,
the reasoning dataset, a tiny fusion LLM (built from a config, no download) and its evaluation. Then:

- each predictor reproduces exactly what its training stage stored (omics probability, embedding and
  attributions; slide probability, embedding and per-patch attention; fusion text and risk under the same
  decoding settings);
- ``explain`` on a cohort patient builds the same evidence record as the reasoning dataset holds for that
  patient, and writes a report from the real models.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from test_report_doubles import demo_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from oncofm.cohort.images import image_table
    from oncofm.fusion.evaluate import FusionEvaluateSettings, evaluate_fusion
    from oncofm.fusion.llm import LLMSettings
    from oncofm.fusion.reasoning import ReasoningSettings, build_reasoning_dataset, read_dataset
    from oncofm.fusion.train import FusionSettings, train_fusion
    from oncofm.omics.features import FeatureSettings, run_features
    from oncofm.omics.train import OmicsTrainSettings, train_omics
    from oncofm.pathology.slide_train import SlideTrainSettings, train_slide_model
    from oncofm.pathology.tiling import TilingSettings, tile_slides
    from oncofm.paths import RunLayout
    from oncofm.pipeline import stage_register_images
    from oncofm.survival.cox_stage import CoxSettings, run_cox
    from oncofm.training import TrainSettings
    from test_fusion_model import _tiny_llm_dir

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("contract")
    run = tmp / "run"
    shutil.copytree(demo_run(), run)
    layout = RunLayout(run)
    run_cox(CoxSettings.build(run=str(run), plots=False))
    run_features(FeatureSettings.build(run=str(run), top_k=32))
    train_omics(OmicsTrainSettings.build(run=str(run), epochs=1, max_genes=16, d_model=16, n_layers=1, n_boot=0,
                                         ig_steps=4, baselines=["clinical"], progress=False))
    for row in image_table(layout).itertuples():
        tile_slides(TilingSettings(source=row.path, out=str(layout.tiles_dir), slide_mpp=row.mpp, target_mpp=1.0,
                                   patch_size=32, qc=False), progress=False)
    stage_register_images(run, redo=False)
    train_slide_model(SlideTrainSettings(
        run=str(run), encoder="swin-cpu", encoder_options={"image_size": 32, "window_size": 2}, hidden=16,
        train=TrainSettings(epochs=2, batch_size=4, lr=3e-3, patience=2, progress=False, device="cpu")),
        progress=False)
    build_reasoning_dataset(ReasoningSettings(run=str(run)))
    llm_dir = _tiny_llm_dir(read_dataset(run), tmp / "tiny_llm")
    train_fusion(FusionSettings(
        run=str(run), llm=LLMSettings(model_path=str(llm_dir)), projector="linear", n_soft_tokens=2, lora_r=4,
        lora_alpha=8, max_train_patients=24, max_val_patients=4, max_new_tokens=64,
        train=TrainSettings(epochs=1, batch_size=8, lr=1e-2, patience=1, progress=False)))
    evaluate_fusion(FusionEvaluateSettings(run=str(run), max_eval_patients=3, max_new_tokens=64, batch_size=1,
                                           precision="fp32", timed_alone=1))
    torch.set_num_threads(threads)
    return run


def _cohort_patient(run: Path, pid: str):  # noqa: ANN202
    from oncofm.explain.inputs import cohort_patient
    from oncofm.paths import RunLayout

    return cohort_patient(RunLayout(run), pid)


def test_omics_predictor_reproduces_the_stage_exports(real_run: Path) -> None:
    from oncofm.omics.predict import OmicsPredictor
    from oncofm.paths import RunLayout

    predictor = OmicsPredictor.from_run(RunLayout(real_run))
    omics = real_run / "models" / "omics"
    preds = pd.read_parquet(omics / "predictions.parquet").set_index("patient_id")
    emb = pd.read_parquet(omics / "embeddings.parquet")
    attr = pd.read_parquet(omics / "attributions.parquet")
    test_ids = preds.index[preds["split"] == "test"][:3]
    assert len(test_ids) == 3
    for pid in test_ids:
        out = predictor.predict(_cohort_patient(real_run, pid))
        assert out.prob == pytest.approx(preds.loc[pid, "prob"], abs=1e-6)
        np.testing.assert_allclose(out.embedding, emb.loc[pid].to_numpy(np.float32), atol=1e-5)
        stored = attr[attr["patient_id"] == pid].set_index("gene")["attribution"]
        got = out.attributions.set_index("gene")["attribution"].reindex(stored.index)
        np.testing.assert_allclose(got.to_numpy(), stored.to_numpy(), atol=1e-5)


def test_slide_predictor_reproduces_the_stage_exports(real_run: Path) -> None:
    from oncofm.pathology.predict import SlidePredictor
    from oncofm.pathology.reader import slide_stem
    from oncofm.paths import RunLayout

    layout = RunLayout(real_run)
    predictor = SlidePredictor.from_run(layout)
    preds = pd.read_parquet(layout.model_dir("slide") / "predictions.parquet")
    emb = pd.read_parquet(layout.model_dir("slide") / "embeddings.parquet")
    rows = preds[preds["split"] == "test"].head(2)
    assert len(rows) >= 1
    for row in rows.itertuples():
        patient = _cohort_patient(real_run, row.patient_id)
        tiled, out = predictor.predict(patient, real_run / "work", layout)
        assert tiled.h5 == layout.tiles_dir / f"{slide_stem(patient.slide)}.h5"  # the run's own tiles, reused
        stored = pd.read_parquet(layout.model_dir("slide") / "attention" / f"{slide_stem(row.slide_id)}.parquet")
        assert out.prob == pytest.approx(row.prob, abs=1e-6)
        np.testing.assert_allclose(out.attention, stored["attention"].to_numpy(), atol=1e-6)
        np.testing.assert_array_equal(tiled.coords, stored[["x", "y"]].to_numpy())
        np.testing.assert_allclose(out.embedding, emb.loc[row.patient_id].to_numpy(np.float32), atol=1e-5)


def test_fusion_predictor_reproduces_the_evaluation(real_run: Path) -> None:
    from oncofm.fusion.fuse import load_embeddings
    from oncofm.fusion.predict import FusionPredictor
    from oncofm.fusion.reasoning import read_dataset
    from oncofm.paths import RunLayout

    predictor = FusionPredictor.from_run(RunLayout(real_run))
    records = {r["patient_id"]: r for r in read_dataset(real_run)}
    gens = [json.loads(x) for x in (real_run / "models" / "fusion" / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 3
    for g in gens:
        emb = load_embeddings(real_run, [g["patient_id"]])
        out = predictor.generate([(g["patient_id"], records[g["patient_id"]]["evidence"],
                                   emb.omics[0] if emb.has_omics[0] else None,
                                   emb.slide[0] if emb.has_slide[0] else None)], max_new_tokens=64)[0]
        assert out.text == g["generated"]
        assert out.risk == g["risk"]


def test_explain_end_to_end_builds_the_training_evidence(real_run: Path, tmp_path: Path) -> None:
    """A cohort patient with expression and a real H&E image, through `explain` with the real models."""
    from oncofm.explain.pipeline import ExplainSettings, explain_patient
    from oncofm.fusion.reasoning import read_dataset

    slides = pd.read_parquet(real_run / "models" / "slide" / "predictions.parquet")
    omics = pd.read_parquet(real_run / "models" / "omics" / "predictions.parquet").set_index("patient_id")
    pid = str(slides["patient_id"].iloc[0])
    paths = explain_patient(ExplainSettings(run=str(real_run), out=str(tmp_path / "report"), patient_id=pid))
    rec = json.loads(paths["explanation"].read_text())
    assert set(paths) == {"report", "explanation", "heatmap"}
    assert rec["omics"]["prob"] == pytest.approx(omics.loc[pid, "prob"], abs=1e-6)
    assert rec["slide"]["prob"] == pytest.approx(slides.set_index("patient_id").loc[pid, "prob"], abs=1e-6)
    assert set(rec["model_versions"]) == {"omics", "slide", "fusion"}
    # every model ran: the only possible note is the guardrail's verdict on the tiny LLM's text
    assert rec["text"] and rec["text_status"] in ("passed", "flagged") and rec["check"] is not None
    assert all("failed the automatic check" in n for n in rec["notes"])
    assert rec["prediction"]["source"] == ("fusion LLM" if rec["text_status"] == "passed" else "omics model")
    # the same evidence record as the training records: one builder, the same settings
    training = next(r for r in read_dataset(real_run) if r["patient_id"] == pid)
    assert rec["evidence"] == training["evidence"]
    html = paths["report"].read_text()
    assert "id='genes'" in html and 'id="explanation"' in html and "id='heatmap'" in html
