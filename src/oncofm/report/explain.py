"""``oncofm explain``: run the whole inference path for one patient and write the report.

The output folder is written as a whole or not at all: everything goes into a temporary sibling
folder that is renamed onto ``--out`` at the end, so bad input never leaves a partial report.

Outputs (``OUT/``): ``report.html`` (one self-contained file), ``explanation.json`` (prediction, risk,
text, evidence record, model versions, seconds per step), ``heatmap.png`` (when a slide model ran) and
``settings.yaml`` (the resolved settings).
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from oncofm.config import StageSettings
from oncofm.errors import OncoFMError
from oncofm.io import write_json
from oncofm.paths import RunLayout
from oncofm.report import steps as S
from oncofm.report.inputs import PatientInput, resolve_patient

log = logging.getLogger(__name__)

NOTICE = "Research use only. Not for clinical decisions."


class ExplainSettings(StageSettings):
    """Settings of ``oncofm explain``."""

    stage: ClassVar[str] = "explain"

    run: str
    out: str
    patient_id: str | None = None
    expression: str | None = Field(None, description="expression file (CSV/TSV/parquet) of a new patient")
    cancer_type: str | None = None
    age: float | None = Field(None, ge=0, le=120, description="age at diagnosis of a new patient (years)")
    sex: str | None = Field(None, description="female / male, for a new patient")
    slide: str | None = None
    mpp: float | None = Field(None, description="microns per pixel, for slides that do not store it")
    min_gene_fraction: float = Field(0.5, gt=0, le=1, description="share of the model's genes required")
    top_genes: int = Field(15, ge=1, le=100)
    top_patches: int = Field(8, ge=1, le=32)
    target_mpp: float | None = Field(None, gt=0, description="patch mpp; default: as the run's tiling (0.5)")
    patch_size: int | None = Field(None, ge=16, description="patch side; default: as the run's tiling (224)")
    min_tissue: float = Field(0.5, ge=0, le=1)
    overwrite: bool = True


@dataclass
class InferenceSteps:
    """The swappable step functions (defaults: the real library steps in :mod:`oncofm.report.steps`)."""

    normalise_expression: Callable[..., Any] = S.normalise_expression
    build_pairs: Callable[..., Any] = S.build_pairs
    run_omics_model: Callable[..., Any] = S.run_omics_model
    stored_omics_result: Callable[..., Any] = S.stored_omics_result
    tile_slide: Callable[..., Any] = S.tile_slide
    run_slide_model: Callable[..., Any] = S.run_slide_model
    top_patches: Callable[..., Any] = S.top_patches
    build_evidence: Callable[..., Any] = S.build_evidence
    run_fusion: Callable[..., Any] = S.run_fusion
    cohort_context: Callable[..., Any] = S.cohort_context

    def names(self) -> list[str]:
        return [f.name for f in fields(self)]


@dataclass
class Explanation:
    """Everything the report shows, for one patient."""

    patient: PatientInput
    settings: ExplainSettings
    norm: S.NormalisedExpression | None = None
    omics: S.OmicsResult | None = None
    tiled: S.TiledSlide | None = None
    slide: S.SlideResult | None = None
    patch_summary: S.PatchSummary | None = None
    evidence: dict[str, Any] = field(default_factory=dict)
    fusion: S.FusionResult | None = None
    cohort: S.CohortContext | None = None
    log: S.StepLog = field(default_factory=S.StepLog)
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))

    @property
    def patches(self) -> list[S.PatchFinding]:
        return [] if self.patch_summary is None else self.patch_summary.patches

    # --- the final prediction: the fusion LLM's parsed risk, else the unimodal models' ---
    def final(self) -> tuple[str | None, float | None, str | None]:
        """(outcome, risk, which model) of the headline prediction; all None when no model ran."""
        if self.fusion is not None and self.fusion.risk is not None:
            return self.fusion.prediction, self.fusion.risk, "fusion LLM"
        for name, res in (("omics model", self.omics), ("slide model", self.slide)):
            if res is not None:
                outcome = "death within 5 years" if res.prob >= 0.5 else "alive at 5 years"
                return outcome, res.prob, name
        return None, None, None

    def model_versions(self) -> dict[str, str]:
        out = {}
        for name, res in (("omics", self.omics), ("slide", self.slide), ("fusion", self.fusion)):
            if res is not None:
                out[name] = res.version
        return out


class _Runner:
    """Runs the steps in order, timing each and turning StepSkipped into a note."""

    def __init__(self, log_: S.StepLog, progress: Callable[[str, float], None] | None) -> None:
        self.log = log_
        self.progress = progress

    def __call__(self, name: str, fn: Callable[..., Any], *args: Any, frac: float = 0.0, **kwargs: Any) -> Any:
        if self.progress is not None:
            self.progress(name, frac)
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        except S.StepSkipped as note:
            self.log.notes.append(str(note))
            log.info("%s: %s", name, note)
            return None
        finally:
            self.log.seconds[name] = round(time.perf_counter() - t0, 3)


def infer(settings: ExplainSettings, workdir: Path, steps: InferenceSteps | None = None,
          progress: Callable[[str, float], None] | None = None) -> Explanation:
    """Run every inference step for the patient in ``settings`` (no report written)."""
    steps = steps or InferenceSteps()
    layout = RunLayout(settings.run)
    if not layout.root.is_dir():
        raise OncoFMError(f"run directory {layout.root} does not exist (run `oncofm demo` or the pipeline first)")
    patient = resolve_patient(layout, patient_id=settings.patient_id, expression=settings.expression,
                              cancer_type=settings.cancer_type, slide=settings.slide, mpp=settings.mpp,
                              age=settings.age, sex=settings.sex)
    ex = Explanation(patient=patient, settings=settings)
    run = _Runner(ex.log, progress)
    ex.norm = run("normalise_expression", steps.normalise_expression, patient, layout,
                  min_gene_fraction=settings.min_gene_fraction, frac=0.05)
    pairs = run("build_pairs", steps.build_pairs, ex.norm, patient, layout, frac=0.1) if ex.norm else None
    if pairs is not None:
        ex.omics = run("run_omics_model", steps.run_omics_model, pairs, ex.norm, patient, layout, frac=0.2)
    if ex.omics is None and ex.norm is not None:
        ex.omics = run("stored_omics_result", steps.stored_omics_result, patient, layout, ex.norm, frac=0.25)
        if ex.omics is not None:
            ex.log.notes.append("omics: the model could not be applied here; its stored output for this "
                                "cohort patient is shown")
    target_mpp, patch_size = tiling_geometry(settings, layout)
    ex.tiled = run("tile_slide", steps.tile_slide, patient, layout, workdir, target_mpp=target_mpp,
                   patch_size=patch_size, min_tissue=settings.min_tissue, frac=0.3)
    if ex.tiled is not None:
        ex.slide = run("run_slide_model", steps.run_slide_model, ex.tiled, layout, frac=0.45)
    if ex.slide is not None:
        ex.patch_summary = run("top_patches", steps.top_patches, ex.tiled, ex.slide, k=settings.top_patches,
                               frac=0.6)
    ex.evidence = run("build_evidence", steps.build_evidence, patient, ex.omics, ex.slide, ex.patch_summary,
                      frac=0.65) or {}
    if ex.omics is not None or ex.slide is not None:
        ex.fusion = run("run_fusion", steps.run_fusion, ex.evidence, ex.omics, ex.slide, layout, frac=0.7)
    else:
        ex.log.notes.append("no model could be applied to this patient: no prediction is made")
    if ex.fusion is not None and ex.fusion.risk is None:
        ex.log.notes.append("the fusion LLM's text has no parseable prediction line; the headline prediction "
                            "comes from the unimodal models")
    ex.cohort = run("cohort_context", steps.cohort_context, patient, ex.omics, ex.slide, layout, frac=0.85)
    return ex


def tiling_geometry(settings: ExplainSettings, layout: RunLayout) -> tuple[float, int]:
    """Patch mpp and size: the settings', else those the run's slides were tiled with, else 0.5 µm/px, 224."""
    import yaml

    saved: dict[str, Any] = {}
    path = layout.settings_file("tiles")
    if path.exists():
        saved = yaml.safe_load(path.read_text()) or {}
    target = settings.target_mpp or float(saved.get("target_mpp", 0.5))
    size = settings.patch_size or int(saved.get("patch_size", 224))
    return target, size


def explanation_record(ex: Explanation) -> dict[str, Any]:
    """The content of ``explanation.json``."""
    outcome, risk, source = ex.final()
    rec: dict[str, Any] = {
        "patient_id": ex.patient.patient_id, "cancer_type": ex.patient.cancer_type,
        "input": {"source": ex.patient.source, "split": ex.patient.split,
                  "expression_genes": None if ex.norm is None else
                  {"present": ex.norm.n_present, "model": ex.norm.n_model_genes},
                  "slide": None if ex.patient.slide is None else ex.patient.slide.name,
                  "mpp": ex.patient.mpp},
        "prediction": {"outcome": outcome, "risk": risk, "source": source},
        "omics": None if ex.omics is None else {"prob": ex.omics.prob, "source": ex.omics.source},
        "slide": None if ex.slide is None else {"prob": ex.slide.prob, "n_patches": int(len(ex.slide.attention))},
        "text": None if ex.fusion is None else ex.fusion.text,
        "evidence": ex.evidence,
        "top_genes": [] if ex.omics is None else
        ex.omics.attributions.head(ex.settings.top_genes).to_dict("records"),
        "top_patches": [{"rank": p.rank, "x": p.x, "y": p.y, "attention": p.attention, **p.morphometrics}
                        for p in ex.patches],
        "slide_mean_morphometrics": None if ex.patch_summary is None else ex.patch_summary.slide_mean,
        "cohort": None if ex.cohort is None else
        {"model": ex.cohort.model, "n_train": int(len(ex.cohort.risks)), "percentile": ex.cohort.percentile},
        "model_versions": ex.model_versions(),
        "notes": ex.log.notes,
        "seconds": ex.log.seconds,
        "created": ex.created,
        "notice": NOTICE,
    }
    return rec


def explain_patient(settings: ExplainSettings, steps: InferenceSteps | None = None,
                    progress: Callable[[str, float], None] | None = None) -> dict[str, Path]:
    """Explain one patient; write ``report.html``, ``explanation.json`` (and ``heatmap.png``) to ``out``.

    Returns the written paths. Bad input raises :class:`OncoFMError` and leaves ``out`` untouched.
    """
    from oncofm.report.html import render_report
    from oncofm.report.plots import save_heatmap_png

    out = Path(settings.out).resolve()
    if out.exists() and not settings.overwrite:
        raise OncoFMError(f"{out} exists; choose another --out or allow overwriting")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        t0 = time.perf_counter()
        ex = infer(settings, tmp / "work", steps=steps, progress=progress)
        if progress is not None:
            progress("report", 0.9)
        t1 = time.perf_counter()
        heatmap = None
        if ex.tiled is not None and ex.slide is not None:
            heatmap = save_heatmap_png(ex.tiled, ex.slide.attention, tmp / "heatmap.png")
        (tmp / "report.html").write_text(render_report(ex), encoding="utf-8")
        ex.log.seconds["report"] = round(time.perf_counter() - t1, 3)
        ex.log.seconds["total"] = round(time.perf_counter() - t0, 3)
        write_json(explanation_record(ex), tmp / "explanation.json")
        settings.save(tmp / "settings.yaml")
        shutil.rmtree(tmp / "work", ignore_errors=True)
        tmp.chmod(0o755)
        for f in tmp.iterdir():
            f.chmod(0o644)
        _replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    paths = {"report": out / "report.html", "explanation": out / "explanation.json"}
    if heatmap is not None:
        paths["heatmap"] = out / "heatmap.png"
    log.info("report written: %s", paths["report"])
    return paths


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename ``src`` onto ``dst`` (replacing an old report folder as a whole)."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def risk_label(risk: float | None) -> str:
    return "—" if risk is None or not np.isfinite(risk) else f"{risk:.2f}"
