"""A tiny slide model trained through `train_slide_model` on generated slides learns a planted signal.

The slides are pyramidal TIFFs of pink "tissue" on glass; positive slides carry a contiguous block of
dark hematoxylin-like patches (the planted signal), negatives none; labels are slide-level only (5-year
outcome of the slide's patient). The known answer: positives rank above negatives, and the attention of a
positive slide concentrates on the planted block.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

# Trains real (tiny) models through the shared loop: minutes on the loaded shared machine, so marked slow.
pytestmark = pytest.mark.slow

CELL, GRID = 32, 10  # 10 x 10 cells of 32 px at 0.5 µm/px; the outer ring is glass


def _write_slide(path: Path, positive: bool, rng: np.random.Generator) -> np.ndarray:
    import tifffile

    img = np.full((GRID * CELL, GRID * CELL, 3), 240, np.uint8)
    inner = slice(CELL, (GRID - 1) * CELL)
    tissue = np.clip(rng.normal((225, 140, 185), 18, size=((GRID - 2) * CELL, (GRID - 2) * CELL, 3)), 0, 255)
    img[inner, inner] = tissue.astype(np.uint8)
    region = np.zeros((GRID, GRID), bool)
    if positive:
        r, c = rng.integers(1, GRID - 3, size=2)
        region[r:r + 2, c:c + 3] = True
        for rr, cc in np.argwhere(region):
            block = np.clip(rng.normal((70, 40, 120), 25, size=(CELL, CELL, 3)), 0, 255)
            img[rr * CELL:(rr + 1) * CELL, cc * CELL:(cc + 1) * CELL] = block.astype(np.uint8)
    with tifffile.TiffWriter(path) as tif:
        res = (2e4, 2e4)  # 0.5 µm/px in pixels per cm
        for level in (img, img[::2, ::2]):
            tif.write(level, tile=(128, 128), photometric="rgb", compression="zlib", resolution=res,
                      resolutionunit="CENTIMETER")
            res = (res[0] / 2, res[1] / 2)
    return region


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    from oncofm.pathology.tiling import TilingSettings, tile_slides

    run = tmp_path_factory.mktemp("slide_run")
    slides_dir = run / "slides"
    slides_dir.mkdir()
    rng = np.random.default_rng(0)
    rows, patients, splits, regions = [], [], [], {}
    split_of = ["train"] * 12 + ["val"] * 4 + ["test"] * 4 + ["test"]
    for i, split in enumerate(split_of):
        positive = i % 2 == 1
        pid = f"TCGA-ZZ-{i:04d}"
        name = f"slide_{i:02d}.tif"
        regions[f"slide_{i:02d}"] = _write_slide(slides_dir / name, positive, rng)
        censored = i == len(split_of) - 1  # censored before 5 years: no label, still gets outputs
        patients.append({"patient_id": pid, "cancer_type": "TEST", "age": 60.0, "sex": "female",
                         "os_days": 300.0 if censored else (400.0 if positive else 2500.0),
                         "os_event": 0 if censored else int(positive)})
        splits.append({"patient_id": pid, "split": split})
        rows.append({"patient_id": pid, "slide_id": name})
    (run / "cohort").mkdir()
    pd.DataFrame(patients).to_parquet(run / "cohort" / "patients.parquet")
    pd.DataFrame(splits).to_parquet(run / "cohort" / "splits.parquet")
    pd.DataFrame(rows).to_parquet(run / "cohort" / "slides.parquet")
    tile_slides(TilingSettings(source=str(slides_dir), out=str(run / "tiles"), target_mpp=0.5, patch_size=CELL,
                               min_tissue=0.5, qc=False), progress=False)
    return run, regions


def _settings(run: Path, **kw):
    from oncofm.pathology.slide_train import SlideTrainSettings
    from oncofm.training import TrainSettings

    train = TrainSettings(epochs=kw.pop("epochs", 15), batch_size=4, lr=3e-3, patience=15, progress=False,
                          device="cpu", seed=0)
    return SlideTrainSettings(run=str(run), encoder="swin-cpu", encoder_options={"image_size": 32, "window_size": 2},
                              hidden=32, train=train, **kw)


def _check_outputs(run: Path, regions: dict[str, np.ndarray]) -> dict:
    import json

    out = run / "models" / "slide"
    preds = pd.read_parquet(out / "predictions.parquet")
    assert list(preds.columns) == ["patient_id", "slide_id", "split", "prob"]
    assert len(preds) == len(regions)
    emb = pd.read_parquet(out / "embeddings.parquet")
    assert emb.index.name == "patient_id" and list(emb.columns[:2]) == ["e0", "e1"] and len(emb) == len(regions)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_unlabelled_slides"] == 1
    assert "too few" in metrics["test"]["note"]  # 2 + 2 labelled test slides: said plainly
    # the planted signal: positives above negatives on every labelled slide
    labelled = preds[preds["patient_id"] != "TCGA-ZZ-0020"]
    y = labelled["slide_id"].str.slice(6, 8).astype(int) % 2
    from oncofm.survival.metrics import auc_score

    assert auc_score(y, labelled["prob"]) >= 0.95
    # attention: a distribution that concentrates on the planted block of positive slides
    ratios = []
    for stem, region in regions.items():
        att = pd.read_parquet(out / "attention" / f"{stem}.parquet")
        np.testing.assert_allclose(att["attention"].sum(), 1.0, rtol=1e-5)
        if region.any():
            inside = region[att["y"] // CELL, att["x"] // CELL]
            ratios.append(att["attention"][inside].mean() / att["attention"][~inside].mean())
    return {"metrics": metrics, "attention_ratio": float(np.median(ratios))}


def test_features_mode_learns_the_planted_signal(planted_run) -> None:
    from oncofm.pathology.slide_train import train_slide_model

    run, regions = planted_run
    paths = train_slide_model(_settings(run), progress=False)
    result = _check_outputs(run, regions)
    assert result["attention_ratio"] > 2.0  # planted patches get > 2x the attention of the others
    # a second call with the same settings reuses the outputs
    mtime = paths["metrics"].stat().st_mtime
    train_slide_model(_settings(run), progress=False)
    assert paths["metrics"].stat().st_mtime == mtime


def test_heatmaps_for_a_trained_run(planted_run) -> None:
    from oncofm.pathology.heatmap import HeatmapSettings, heatmaps_for_run
    from oncofm.pathology.slide_train import SlideTrainSettings

    run, _ = planted_run
    if not (run / "models" / "slide" / "metrics.json").exists():
        from oncofm.pathology.slide_train import train_slide_model

        train_slide_model(_settings(run), progress=False)
    assert SlideTrainSettings.from_yaml(run / "models" / "slide" / "config.yaml").encoder == "swin-cpu"
    written = heatmaps_for_run(run, ["slide_01"], HeatmapSettings(top_k=4, thumb_size=256, blur=0.5),
                               progress=False)
    assert [p.name for p in written] == ["slide_01_heatmap.png", "slide_01_top.png"]
    assert all(p.stat().st_size > 5000 for p in written)


def test_end_to_end_mode_learns_the_planted_signal(planted_run, tmp_path) -> None:
    import shutil

    from oncofm.pathology.slide_train import train_slide_model

    src, regions = planted_run
    run = tmp_path / "run"
    shutil.copytree(src / "cohort", run / "cohort")
    shutil.copytree(src / "tiles", run / "tiles")
    train_slide_model(_settings(run, mode="end-to-end", bag_size=16, epochs=6), progress=False)
    assert (run / "models" / "slide" / "features" / "swin-cpu-finetuned").is_dir()
    _check_outputs(run, regions)  # slide-level signal learned; its attention is not yet concentrated after
    # 6 epochs (measured ratio 0.8-1.1), so localisation is asserted for the frozen-feature mode only


def test_standardised_features_are_fitted_on_training_patches_and_saved(planted_run, tmp_path) -> None:
    import shutil

    from oncofm.pathology.slide_model import feature_stats, load_patch_features
    from oncofm.pathology.slide_train import load_slide_model, train_slide_model

    src, regions = planted_run
    run = tmp_path / "run"
    shutil.copytree(src / "cohort", run / "cohort")
    shutil.copytree(src / "tiles", run / "tiles")
    train_slide_model(_settings(run, standardize_features=True, instance_weight=1.0, instance_k=1,
                                instance_drop=0.25, max_patches=0), progress=False)
    _check_outputs(run, regions)  # learns the planted signal with standardised features too
    model, settings = load_slide_model(run)
    assert settings.standardize_features and model.feature_mean is not None
    train_stems = [f"slide_{i:02d}" for i in range(12)]  # the training split of the fixture
    feat_dir = run / "models" / "slide" / "features" / "swin-cpu"
    mean, std = feature_stats([load_patch_features(feat_dir / f"{s}.h5")[0] for s in train_stems])
    np.testing.assert_allclose(model.feature_mean.numpy(), mean, rtol=1e-6)
    np.testing.assert_allclose(model.feature_std.numpy(), std, rtol=1e-6)


def test_retraining_with_other_settings_does_not_resume_the_old_checkpoint(planted_run, tmp_path) -> None:
    import shutil

    from oncofm.pathology.slide_train import load_slide_model, train_slide_model

    src, _ = planted_run
    run = tmp_path / "run"
    shutil.copytree(src / "cohort", run / "cohort")
    shutil.copytree(src / "tiles", run / "tiles")
    train_slide_model(_settings(run, epochs=2), progress=False)
    assert (run / "models" / "slide" / "training" / "checkpoint").is_dir()  # left by fit()
    # other widths: resuming the first run's checkpoint used to fail with a size mismatch
    other = _settings(run, epochs=2, standardize_features=True)
    other.hidden = 16
    train_slide_model(other, progress=False)
    model, settings = load_slide_model(run)
    assert settings.hidden == 16 and model.head.in_features == 16 and model.feature_mean is not None
