"""The demo pipeline: every stage in order on the bundled demo cohort, reusing finished stages.

Each stage is one small function ``(run, redo) -> None`` that calls its stage's library function; the
stage functions themselves skip work whose outputs exist, so a second run reuses them. A stage whose code
is not in this installation is reported as unavailable and the demo goes on (the explain step then
notes the missing model in the report); any other error stops the demo. Wall time per stage goes to
``RUN/demo_timings.json``.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from oncofm.data import demo_data_dir
from oncofm.errors import OncoFMError
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


class StageUnavailable(Exception):  # noqa: N818 - a status, not an error
    """The stage's library code is not part of this installation."""


def _need(module: str, *names: str) -> list[Any]:
    """Import ``names`` from ``module`` or declare the stage unavailable."""
    try:
        mod = importlib.import_module(module)
        return [getattr(mod, n) for n in names]
    except (ImportError, AttributeError) as exc:
        raise StageUnavailable(f"{module}: {exc}") from None


# ---------------------------------------------------------------------------------------------------------
# one function per stage (the seams the lead connects when a stage's API settles)
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
    settings_cls, fn = _need("oncofm.survival.cox_stage", "CoxSettings", "run_cox")
    fn(settings_cls.build(run=str(run), redo=redo))


def stage_features(run: Path, redo: bool) -> None:
    settings_cls, fn = _need("oncofm.omics.features", "FeatureSettings", "run_features")
    fn(settings_cls.build(run=str(run), redo=redo))


def stage_train_omics(run: Path, redo: bool) -> None:
    settings_cls, fn = _need("oncofm.omics.train", "OmicsTrainSettings", "train_omics")
    fn(settings_cls.build(run=str(run), redo=redo))


def stage_tiles(run: Path, redo: bool) -> None:
    """Tile each demo patient's real H&E image (with its own mpp from images.csv) into RUN/tiles/."""
    settings_cls, tile_slides = _need("oncofm.pathology.tiling", "TilingSettings", "tile_slides")
    from oncofm.report.inputs import image_table

    layout = RunLayout(run)
    images = image_table(layout)
    for row in images.itertuples():
        tile_slides(settings_cls.build(source=row.path, out=str(layout.tiles_dir), slide_mpp=row.mpp, redo=redo),
                    progress=False)
    log.info("tiled %d demo images into %s", len(images), layout.tiles_dir)


def stage_register_images(run: Path, redo: bool) -> None:
    """Add the demo patients' real H&E images (``images.csv``) to ``cohort/slides.parquet``.

    The tcga13 slide table names GDC diagnostic slides that are not on this machine; the images that are
    here become the slides the slide model trains on (rows added once; existing rows kept).
    """
    import pandas as pd

    from oncofm.io import write_parquet
    from oncofm.report.inputs import image_table

    layout = RunLayout(run)
    images = image_table(layout)
    if images.empty:
        raise StageUnavailable("the cohort's source has no images.csv")
    new = pd.DataFrame({"patient_id": images["patient_id"], "slide_id": images["path"]})
    if layout.slides_table.exists():
        old = pd.read_parquet(layout.slides_table)
        new = new[~new["slide_id"].isin(old["slide_id"].astype(str))]
        if new.empty:
            return
        new = pd.concat([old, new], ignore_index=True)
    write_parquet(new, layout.slides_table, index=False)


def stage_train_slide(run: Path, redo: bool) -> None:
    settings_cls, fn = _need("oncofm.pathology.slide_train", "SlideTrainSettings", "train_slide_model")
    fn(settings_cls.build(run=str(run), redo=redo), progress=False)


def stage_reasoning(run: Path, redo: bool) -> None:
    settings_cls, fn = _need("oncofm.fusion.reasoning", "ReasoningSettings", "build_reasoning_dataset")
    fn(settings_cls.build(run=str(run), redo=redo))


def stage_train_fusion(run: Path, redo: bool) -> None:
    settings_cls, fn = _need("oncofm.fusion.train", "FusionSettings", "train_fusion")
    from oncofm.training import TrainSettings

    fn(settings_cls.build(run=str(run), redo=redo, **DEMO_FUSION,
                          train=TrainSettings(epochs=1, batch_size=8, lr=1e-3, weight_decay=0.0, patience=1,
                                               mixed_precision="auto")))


def stage_evaluate_fusion(run: Path, redo: bool) -> None:
    """Generate explanations for a sample of test patients and score them (parse rate, AUC, faithfulness)."""
    settings_cls, fn, fmt = _need("oncofm.fusion.evaluate", "EvaluateSettings", "evaluate_fusion", "format_metrics")
    metrics_file = RunLayout(run).model_dir("fusion") / "metrics.json"
    if metrics_file.exists() and not redo:
        return
    metrics = fn(settings_cls.build(run=str(run), max_eval_patients=DEMO_FUSION["max_eval_patients"],
                                    timed_alone=DEMO_TIMED_ALONE))
    for line in fmt(metrics):
        log.info("fusion: %s", line)


def demo_patient(run: Path) -> str:
    """The demo patient to explain: one with a real H&E image and expression, preferring the test split."""
    from oncofm.web.app import demo_patients

    patients = demo_patients(run)
    if not patients:
        raise StageUnavailable("no demo patient with a real H&E image in this run")
    test = [p for p in patients if p["split"] == "test"]
    return (test or patients)[0]["patient_id"]


def stage_explain(run: Path, redo: bool) -> Path:
    from oncofm.report.explain import ExplainSettings, explain_patient

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
    unavailable: list[str] = []
    for name, fn in STAGES:
        t0 = time.perf_counter()
        try:
            result = fn(run, redo)
            status = "done"
        except StageUnavailable as exc:
            result, status = None, f"unavailable ({exc})"
            unavailable.append(name)
            log.warning("stage %s is not available in this installation: %s", name, exc)
        except OncoFMError as exc:  # e.g. a MissingArtifactError from a stage whose input stage is absent
            if not unavailable:
                raise
            result, status = None, f"skipped: needs the output of {', '.join(unavailable)} ({exc})"
            unavailable.append(name)
            log.warning("stage %s skipped: %s", name, status)
        seconds = round(time.perf_counter() - t0, 2)
        record["stages"][name] = {"seconds": seconds, "status": status}
        log.info("stage %-12s %7.1f s  %s", name, seconds, status)
        if name == "explain" and result is not None:
            record["report"] = str(result)
        write_json(record, run / TIMINGS_FILE)
    record["total_seconds"] = round(time.perf_counter() - t_all, 2)
    write_json(record, run / TIMINGS_FILE)
    return record
