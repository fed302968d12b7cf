"""The demo pipeline: every stage in order on the bundled demo cohort, reusing finished stages.

Each stage is one small function ``(run, redo) -> None`` that calls its stage's library function; the
stage functions themselves skip work whose outputs exist with the same settings, so a second run reuses
them. An error in any stage stops the demo with its message. Wall time per stage goes to
``RUN/demo_timings.json``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from oncofm.data import demo_data_dir
from oncofm.errors import OncoFMError, StageOutputsChanged
from oncofm.io import write_json
from oncofm.paths import RunLayout

log = logging.getLogger(__name__)

TIMINGS_FILE = "demo_timings.json"

# Demo-sized settings (the stages' own defaults are for full cohorts): the whole demo must finish in
# about 30 minutes on a 2-core CPU, so the LLM is fine-tuned on a seeded sample of training patients for
# one epoch and evaluated on a sample of test patients, one of them also timed alone (the demo's barely
# trained LLM writes to the token limit, so each timed explanation costs ~20 s). Every other stage uses its
# defaults.
DEMO_FUSION = {"max_train_patients": 96, "max_val_patients": 16, "max_eval_patients": 16}
DEMO_TIMED_ALONE = 1


# ---------------------------------------------------------------------------------------------------------
# one function per stage
def stage_cohort(run: Path, redo: bool) -> None:
    from oncofm.cohort.importing import ImportSettings, import_cohort

    import_cohort(ImportSettings(format="tcga13", source=str(demo_data_dir()), run=str(run), redo=redo))


def stage_split(run: Path, redo: bool) -> None:
    from oncofm.cohort.splits import SplitSettings, split_cohort

    split_cohort(SplitSettings(run=str(run), redo=redo))


def stage_summary(run: Path, redo: bool) -> None:
    from oncofm.cohort.summary import summarize_cohort

    summarize_cohort(run)


def stage_cox(run: Path, redo: bool) -> None:
    from oncofm.survival.cox_stage import CoxSettings, run_cox

    run_cox(CoxSettings.build(run=str(run), redo=redo))


def stage_features(run: Path, redo: bool) -> None:
    from oncofm.omics.features import FeatureSettings, run_features

    run_features(FeatureSettings.build(run=str(run), redo=redo))


def stage_train_omics(run: Path, redo: bool) -> None:
    from oncofm.omics.train import OmicsTrainSettings, train_omics

    train_omics(OmicsTrainSettings.build(run=str(run), redo=redo))


def stage_tiles(run: Path, redo: bool) -> None:
    """Tile each demo patient's real H&E image (with its own mpp from images.csv) into RUN/tiles/."""
    from oncofm.cohort.images import image_table
    from oncofm.pathology.tiling import TilingSettings, tile_slides

    layout = RunLayout(run)
    images = image_table(layout)
    for row in images.itertuples():
        tile_slides(TilingSettings.build(source=row.path, out=str(layout.tiles_dir), slide_mpp=row.mpp, redo=redo),
                    progress=False)
    log.info("tiled %d demo images into %s", len(images), layout.tiles_dir)


def stage_register_images(run: Path, redo: bool) -> None:
    """Add the demo patients' real H&E images (``images.csv``) to ``cohort/slides.parquet``.

    The tcga13 slide table names GDC diagnostic slides that are not on this machine; the images that are
    here become the slides the slide model trains on (rows added once; existing rows kept).
    """
    import pandas as pd

    from oncofm.cohort.images import image_table
    from oncofm.io import write_parquet

    layout = RunLayout(run)
    images = image_table(layout)
    if images.empty:
        raise OncoFMError("the demo cohort's source has no images.csv; reinstall the package (its demo_data/ is incomplete)")
    new = pd.DataFrame({"patient_id": images["patient_id"], "slide_id": images["path"]})
    if layout.slides_table.exists():
        old = pd.read_parquet(layout.slides_table)
        new = new[~new["slide_id"].isin(old["slide_id"].astype(str))]
        if new.empty:
            return
        new = pd.concat([old, new], ignore_index=True)
    write_parquet(new, layout.slides_table, index=False)


def stage_train_slide(run: Path, redo: bool) -> None:
    from oncofm.pathology.slide_train import SlideTrainSettings, train_slide_model

    train_slide_model(SlideTrainSettings.build(run=str(run), redo=redo), progress=False)


def stage_reasoning(run: Path, redo: bool) -> None:
    from oncofm.fusion.reasoning import ReasoningSettings, build_reasoning_dataset

    build_reasoning_dataset(ReasoningSettings.build(run=str(run), redo=redo))


def stage_train_fusion(run: Path, redo: bool) -> None:
    from oncofm.fusion.train import FusionSettings, train_fusion
    from oncofm.training import TrainSettings

    train_fusion(FusionSettings.build(run=str(run), redo=redo, **DEMO_FUSION,
                          train=TrainSettings(epochs=1, batch_size=8, lr=1e-3, weight_decay=0.0, patience=1,
                                               mixed_precision="auto")))


def stage_evaluate_fusion(run: Path, redo: bool) -> None:
    """Generate explanations for a sample of test patients and score them (parse rate, AUC, faithfulness)."""
    from oncofm.fusion.artifacts import FusionArtifacts
    from oncofm.fusion.evaluate import FusionEvaluateSettings, evaluate_fusion, format_metrics

    arts = FusionArtifacts.of(run)
    metrics_file = arts.dir / "metrics.json"
    # up to date only when written after the model it scores (a remade model gets a fresh evaluation)
    if metrics_file.exists() and not redo and metrics_file.stat().st_mtime >= arts.weights.stat().st_mtime:
        return
    metrics = evaluate_fusion(FusionEvaluateSettings.build(run=str(run), max_eval_patients=DEMO_FUSION["max_eval_patients"],
                                    timed_alone=DEMO_TIMED_ALONE))
    for line in format_metrics(metrics):
        log.info("fusion: %s", line)


def demo_patient(run: Path) -> str:
    """The demo patient to explain: one with a real H&E image and expression, preferring the test split."""
    from oncofm.cohort.images import demo_patients

    patients = demo_patients(run)
    if not patients:
        raise OncoFMError("no demo patient with a real H&E image in this run; reinstall the package (demo_data/images)")
    test = [p for p in patients if p["split"] == "test"]
    return (test or patients)[0]["patient_id"]


def stage_explain(run: Path, redo: bool) -> Path:
    from oncofm.explain.pipeline import ExplainSettings, explain_patient

    patient = demo_patient(run)
    out = RunLayout(run).reports_dir / patient
    paths = explain_patient(ExplainSettings(run=str(run), out=str(out), patient_id=patient))
    return paths["report"]


STAGES: tuple[tuple[str, Callable[[Path, bool], Any]], ...] = (
    ("cohort", stage_cohort),
    ("split", stage_split),
    ("summary", stage_summary),
    ("cox", stage_cox),
    ("features", stage_features),
    ("train_omics", stage_train_omics),
    ("tiles", stage_tiles),
    ("register_images", stage_register_images),
    ("train_slide", stage_train_slide),
    ("reasoning", stage_reasoning),
    ("train_fusion", stage_train_fusion),
    ("evaluate_fusion", stage_evaluate_fusion),
    ("explain", stage_explain),
)


def run_demo(run: str | Path, redo: bool = False) -> dict[str, Any]:
    """Run each stage on the demo cohort; write and return the wall time per stage (seconds).

    Returns ``{"stages": {name: {"seconds", "status"}}, "report": path or None, "total_seconds"}``.
    """
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"stages": {}, "report": None}
    t_all = time.perf_counter()
    for name, fn in STAGES:
        t0 = time.perf_counter()
        status = "done"
        try:
            result = fn(run, redo)
        except StageOutputsChanged as exc:  # the demo's own run: remake what an older version of OncoFM made
            from oncofm.config import REDO_HINT

            log.warning("stage %s: %s\nThe demo remakes it.", name, str(exc).replace(REDO_HINT, "").strip())
            result = fn(run, True)
            status = "remade"
        seconds = round(time.perf_counter() - t0, 2)
        record["stages"][name] = {"seconds": seconds, "status": status}
        log.info("stage %-12s %7.1f s  %s", name, seconds, status)
        if name == "explain" and result is not None:
            record["report"] = str(result)
        write_json(record, run / TIMINGS_FILE)
    record["total_seconds"] = round(time.perf_counter() - t_all, 2)
    write_json(record, run / TIMINGS_FILE)
    return record
