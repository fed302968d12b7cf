"""The cell-model stage: train the designs on the training patients, compare them on validation, keep the
best; and the test evaluation, read once.

``train_cells`` writes into ``out``: ``split.csv`` (file, patient, split), ``validation.json`` (each design's
validation scores at its tuned thresholds, training time, the choice), ``candidates/<design>/`` (each trained
design as a model folder), the chosen model itself (``config.yaml`` + weights) and ``settings.yaml`` (the
stage stamp: resolved settings and the data's version). ``evaluate_cells`` writes ``test_metrics.json``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import pandas as pd

from oncofm.config import artifact_version, check_stage, read_settings_mapping, write_stamp
from oncofm.errors import OncoFMError
from oncofm.io import write_json, write_text
from oncofm.pathology.cells.data import (
    CLASSES,
    DATA_MPP,
    check_split,
    load_images,
    load_manifest,
    split_by_patient,
)
from oncofm.pathology.cells.metrics import detection_scores, format_table, tune_thresholds
from oncofm.pathology.cells.model import CONFIG, CellModel
from oncofm.pathology.cells.settings import CellTrainSettings

log = logging.getLogger(__name__)

SPLIT_FILE = "split.csv"
VALIDATION_FILE = "validation.json"
TEST_FILE = "test_metrics.json"
STAMP = "settings.yaml"


def _inputs(data: Path) -> dict[str, str]:
    return {"cells": artifact_version(data / "cells.csv.gz", mtime=False),
            "manifest": artifact_version(data / "MANIFEST.csv", mtime=False)}


def read_split(model_dir: str | Path) -> pd.DataFrame:
    """The by-patient split a model was trained with (``DIR/split.csv``)."""
    path = Path(model_dir) / SPLIT_FILE
    if not path.exists():
        raise OncoFMError(f"{path} not found: the model folder has no recorded split; retrain it with "
                          "`oncofm cells train --out DIR`")
    split = pd.read_csv(path)
    check_split(split)
    return split


def train_cells(settings: CellTrainSettings) -> dict[str, Path]:
    """Train every design in ``settings.designs``, pick the best validation macro F1, save it in ``out``."""
    import torch

    from oncofm.pathology.cells.registry import design_class

    data, out = Path(settings.data), Path(settings.out)
    for name in settings.designs:
        design_class(name)  # unknown names fail before any work
    paths = {"model": out, "config": out / CONFIG, "split": out / SPLIT_FILE, "validation": out / VALIDATION_FILE}
    inputs = _inputs(data)
    if check_stage(settings, out / STAMP, list(paths.values())[1:], inputs=inputs, ignore=("redo", "threads"),
                   what=f"cell model {out}"):
        log.info("cell model %s is up to date; skipping (--redo to retrain)", out)
        return paths
    torch.set_num_threads(settings.threads)
    out.mkdir(parents=True, exist_ok=True)
    for stale in (TEST_FILE, "test_table.txt", "unet.safetensors", "unet_ensemble.safetensors", "classifier.pkl"):
        (out / stale).unlink(missing_ok=True)
    split = split_by_patient(load_manifest(data), settings.val_fraction, settings.test_fraction, settings.seed)
    check_split(split)
    split.to_csv(out / SPLIT_FILE, index=False)
    files = {s: split.loc[split["split"] == s, "file"].tolist() for s in ("train", "val")}
    train, val = load_images(data, files["train"]), load_images(data, files["val"])
    log.info("BRCA-M2C split by patient: %d train images (%d cells), %d val images (%d cells), %d test held out",
             len(train), sum(len(a.labels) for a in train), len(val), sum(len(a.labels) for a in val),
             int((split["split"] == "test").sum()))
    gts = [(a.points, a.labels) for a in val]
    results: dict[str, Any] = {}
    for name in settings.designs:
        work = out / "candidates" / name
        if work.exists():
            shutil.rmtree(work)
        t0 = time.perf_counter()
        design = design_class(name).fit(train, val, settings, work / "training")
        seconds = time.perf_counter() - t0
        raw = design.predict([a.image for a in val], 0.02)
        thresholds, curves = tune_thresholds(raw, gts, settings.radius_px)
        model = CellModel(design, thresholds, DATA_MPP)
        dets = model.predict([a.image for a in val])
        scores = detection_scores([(d.points, d.labels) for d in dets], gts, settings.radius_px)
        model.info = {"validation_macro_f1": scores["macro_f1"], "radius_um": settings.radius_um}
        model.save(work)
        results[name] = {"scores": scores, "thresholds": thresholds.tolist(), "train_seconds": seconds,
                         "threshold_curves": curves}
        log.info("%s", format_table(scores, title=f"validation, design {name} (trained in {seconds:.0f} s)"))
    chosen = max(results, key=lambda n: results[n]["scores"]["macro_f1"])
    for f in (out / "candidates" / chosen).iterdir():
        if f.is_file():
            shutil.copy2(f, out / f.name)
    write_json({"radius_um": settings.radius_um, "radius_px": settings.radius_px, "chosen": chosen,
                "designs": results}, out / VALIDATION_FILE)
    write_stamp(settings, out / STAMP, ignore=("redo", "threads"), inputs=inputs)
    log.info("chosen design: %s (validation macro F1 %.3f)", chosen, results[chosen]["scores"]["macro_f1"])
    return paths


def validation_table(model_dir: str | Path) -> str:
    """The validation comparison of every trained design, as text."""
    path = Path(model_dir) / VALIDATION_FILE
    if not path.exists():
        raise OncoFMError(f"{path} not found; train with `oncofm cells train --out {model_dir}`")
    v = json.loads(path.read_text())
    parts = [format_table(r["scores"], title=f"validation: {name}{'  (chosen)' if name == v['chosen'] else ''}")
             for name, r in v["designs"].items()]
    return "\n\n".join(parts)


def evaluate_cells(model_dir: str | Path, data: str | Path | None = None, split_name: str = "test",
                   radius_um: float | None = None) -> dict[str, Any]:
    """Score the model in ``model_dir`` on the held-out ``split_name`` images of its recorded split.

    Writes ``DIR/test_metrics.json`` (for the test split) and returns the scores with ``table`` (text),
    ``radius_um``, ``n_images`` and ``n_patients``.
    """
    model_dir = Path(model_dir)
    model = CellModel.load(model_dir)
    split = read_split(model_dir)
    if data is None:
        stamp = model_dir / STAMP
        if not stamp.exists():
            raise OncoFMError(f"{stamp} not found; pass --data (the BRCA-M2C folder)")
        data = read_settings_mapping(stamp)["data"]
    if radius_um is None:
        radius_um = float(model.info.get("radius_um", 6.0))
    rows = split[split["split"] == split_name]
    if rows.empty:
        raise OncoFMError(f"the split has no {split_name!r} images; choose one of train, val, test")
    images = load_images(data, rows["file"].tolist())
    t0 = time.perf_counter()
    dets = model.predict([a.image for a in images], DATA_MPP)
    seconds = time.perf_counter() - t0
    radius_px = radius_um / DATA_MPP
    scores = detection_scores([(d.points, d.labels) for d in dets], [(a.points, a.labels) for a in images],
                              radius_px)
    title = (f"{split_name}: design {model.design_name}, {len(images)} images of {rows['patient'].nunique()} "
             f"patients, {sum(len(a.labels) for a in images)} cells; match radius {radius_um:g} µm "
             f"({radius_px:g} px at {DATA_MPP} µm/px), one-to-one (Hungarian)")
    result = {"split": split_name, "design": model.design_name, "radius_um": radius_um, "radius_px": radius_px,
              "n_images": len(images), "n_patients": int(rows["patient"].nunique()), "classes": list(CLASSES),
              "predict_seconds": seconds, "scores": scores, "table": format_table(scores, title=title)}
    if split_name == "test":
        write_json(result, model_dir / TEST_FILE)
        write_text(result["table"] + "\n", model_dir / "test_table.txt")
    return result
