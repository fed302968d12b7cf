"""``oncofm explain``: one patient through the models' own predictors, then the report.

:func:`infer` calls the predictors in order — omics, slide (tiling, encoding, attention), the evidence
record (:func:`oncofm.fusion.evidence.build_evidence`, the builder of the training records), the fusion
LLM, the training-cohort context — and :func:`explain_patient` writes what they returned. Each predictor
is the one its model package owns (``omics/predict.py``, ``pathology/predict.py``, ``fusion/predict.py``)
and the one its training stage exports through, so a new patient goes through exactly the code that was
trained and tested. A missing modality or model becomes a note in the report, never an invented number;
bad input raises :class:`~oncofm.errors.OncoFMError` and nothing is written.

Outputs (``OUT/``), written as a whole or not at all (a temporary sibling folder renamed onto ``--out``):
``report.html`` (one self-contained file), ``explanation.json`` (prediction, risk, text, evidence record,
model versions, seconds per step), ``heatmap.png`` (when a slide model ran) and ``settings.yaml``.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import yaml
from pydantic import Field

from oncofm.cohort.patient import PatientInput
from oncofm.config import StageSettings
from oncofm.errors import OncoFMError
from oncofm.explain.context import CohortContext, cohort_context
from oncofm.explain.inputs import layer_input_notes, resolve_patient
from oncofm.fusion.checker import CheckResult, check_explanation
from oncofm.fusion.evidence import Evidence, EvidenceSettings, build_evidence
from oncofm.fusion.predict import FusionPredictor, FusionResult
from oncofm.fusion.templates import evidence_summary
from oncofm.io import write_json
from oncofm.omics.predict import OmicsPredictor, OmicsResult
from oncofm.pathology.feature_model import SlideFeaturePredictor, SlideFeatureResult
from oncofm.pathology.predict import (
    PatchFinding,
    PatchSummary,
    SlidePredictor,
    SlideResult,
    TiledSlide,
    load_cell_model,
    patch_summary,
    tile_patient_slide,
)
from oncofm.paths import RunLayout
from oncofm.report.html import NOTICE

log = logging.getLogger(__name__)

__all__ = ["ExplainSettings", "Explanation", "Predictors", "explain_patient", "explanation_record", "infer"]



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
    slide_features: str | None = Field(None, description="slide-level image features of a new patient (CSV/TSV/"
                                       "parquet: feature,value rows or one row of feature columns)")
    mpp: float | None = Field(None, description="microns per pixel, for slides that do not store it")
    stage: str | None = Field(None, description="AJCC stage of a new patient (I-IV, 'Stage IIIA', ...)")
    grade: str | None = Field(None, description="histological grade of a new patient (1-4, G1-G4, ...)")
    cnv: str | None = Field(None, description="copy-number profile of a new patient (CSV/TSV/parquet: gene,level "
                            "rows or one row of gene columns; levels as the cohort's, e.g. GISTIC -2..2)")
    mutations: str | list[str] | None = Field(None, description="mutated genes of a new patient: a list, a "
                                              "comma-separated string (TP53,KRAS), or a file with one gene per "
                                              "line or a Hugo_Symbol column (MAF)")
    min_gene_fraction: float = Field(0.5, gt=0, le=1, description="share of the model's genes required")
    top_genes: int = Field(15, ge=1, le=100, description="genes shown in the contribution chart")
    top_patches: int = Field(8, ge=1, le=32, description="most attended patches shown in the gallery")
    overwrite: bool = True


# ----------------------------------------------------------------------------------------------------
# the predictors (their interface; test doubles implement it)
class OmicsModel(Protocol):
    version: str

    def predict(self, patient: PatientInput, workdir: Path | None = None) -> OmicsResult | None: ...


class SlideModel(Protocol):
    version: str

    def tile(self, patient: PatientInput, layout: RunLayout, workdir: Path) -> TiledSlide: ...

    def predict_tiles(self, tiled: TiledSlide) -> SlideResult: ...


class SlideFeatureModel(Protocol):
    version: str

    def predict(self, features: Any, cancer_type: str) -> SlideFeatureResult: ...


class FusionModel(Protocol):
    version: str
    evidence_settings: EvidenceSettings
    slide_branch: str

    def predict(self, evidence: Evidence, omics: OmicsResult | None, slide: SlideResult | None,
                patient_id: str = "patient") -> FusionResult: ...


@dataclass
class Predictors:
    """The models a patient goes through; ``None`` = the run has no such model (a note in the report)."""

    omics: OmicsModel | None
    slide: SlideModel | None
    fusion: FusionModel | None
    slide_features: SlideFeatureModel | None = None
    cells: Any = None  # the cell-type model (RUN/models/cells): cell findings of the attended patches

    @classmethod
    def from_run(cls, layout: RunLayout, *, min_gene_fraction: float = 0.5) -> Predictors:
        return cls(omics=OmicsPredictor.from_run(layout, min_gene_fraction=min_gene_fraction),
                   slide=SlidePredictor.from_run(layout), fusion=FusionPredictor.from_run(layout),
                   slide_features=SlideFeaturePredictor.from_run(layout), cells=load_cell_model(layout))


@dataclass
class StepLog:
    """Wall time of each step and the notes of what could not run (for explanation.json)."""

    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def timed(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.seconds[name] = round(time.perf_counter() - t0, 3)

    def note(self, text: str) -> None:
        self.notes.append(text)
        log.info("%s", text)


@dataclass
class Explanation:
    """Everything the report shows, for one patient."""

    patient: PatientInput
    settings: ExplainSettings
    omics: OmicsResult | None = None
    tiled: TiledSlide | None = None
    slide: SlideResult | None = None
    slide_features: SlideFeatureResult | None = None  # the slide-feature model (slide-level image features)
    fusion_branch: str | None = None  # the slide branch the run's fusion model was trained on (None: no model)
    patch_summary: PatchSummary | None = None
    evidence: Evidence | None = None
    fusion: FusionResult | None = None
    check: CheckResult | None = None  # the checker's verdict on the fusion text (None: no text)
    cohort: CohortContext | None = None
    log: StepLog = field(default_factory=StepLog)
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))

    @property
    def patches(self) -> list[PatchFinding]:
        return [] if self.patch_summary is None else self.patch_summary.patches

    def final(self) -> tuple[str | None, float | None, str | None]:
        """(outcome, risk, which model) of the headline prediction: the fusion LLM's parsed risk, else the
        unimodal models'; all None when no model ran."""
        if self.fusion is not None and self.fusion.risk is not None and self.text_passed:
            return self.fusion.prediction, self.fusion.risk, "fusion LLM"
        for name, res in (("omics model", self.omics), ("slide model", self.slide),
                          ("slide-feature model", self.slide_features)):
            if res is not None:
                outcome = "death within 5 years" if res.prob >= 0.5 else "alive at 5 years"
                return outcome, res.prob, name
        return None, None, None

    @property
    def text_passed(self) -> bool:
        """Whether the generated text passed the checker (False when there is none or it failed)."""
        return self.fusion is not None and self.check is not None and self.check.passed

    def model_versions(self) -> dict[str, str]:
        return {name: res.version for name, res in (("omics", self.omics), ("slide", self.slide),
                                                       ("slide_features", self.slide_features),
                                                       ("fusion", self.fusion)) if res is not None}

    @property
    def slide_for_fusion(self) -> SlideResult | SlideFeatureResult | None:
        """The slide branch's result that enters the evidence and the fusion model: the one the fusion model
        was trained on (``slide_branch``); without a fusion model, the MIL result, else the feature result."""
        branch = self.fusion_branch
        if branch == "features" or (branch is None and self.slide is None):
            return self.slide_features
        return self.slide


def evidence_settings(layout: RunLayout, fusion: FusionModel | None) -> EvidenceSettings:
    """The settings the training records were built with: the fusion model's, else the reasoning stage's
    saved ones, else the defaults."""
    if fusion is not None:
        return fusion.evidence_settings
    path = layout.settings_file("reasoning")
    saved = (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}
    return EvidenceSettings(**(saved.get("evidence") or {}))


def gene_vocabulary(layout: RunLayout, evidence: Evidence) -> set[str]:
    """Gene symbols a text could name: the run's expression genes and the record's own."""
    vocab = set(evidence.genes)
    if layout.expression.exists():
        import pyarrow.parquet as pq

        vocab |= {str(c) for c in pq.read_schema(layout.expression).names if not str(c).startswith("__")}
    return vocab


def _slide_feature_step(ex: Explanation, models: Predictors, layout: RunLayout) -> str | None:
    """Run the slide-feature model when the patient has slide-level features; note which slide result the
    fusion model takes. Returns the fusion model's slide branch (None: no fusion model)."""
    patient, step = ex.patient, ex.log
    if patient.slide_features is not None:
        if models.slide_features is None:
            step.note(f"slide-level image features were given but the run has no slide-feature model "
                      f"({layout.model_dir('slide_features')}): run `oncofm train slide-features`")
        else:
            ex.slide_features = step.timed("slide_feature_model", models.slide_features.predict,
                                           patient.slide_features, patient.cancer_type)
    fusion_branch = getattr(models.fusion, "slide_branch", None) if models.fusion is not None else None
    if fusion_branch == "features" and ex.slide is not None and ex.slide_features is None:
        step.note("the fusion model was trained on slide-level image features, not on patches: the slide "
                  "model's result is shown but does not enter the generated explanation")
    if fusion_branch == "mil" and ex.slide_features is not None:
        step.note("the fusion model was trained on the patch-level slide model: the slide-feature model's result "
                  "is shown but does not enter the generated explanation")

    return fusion_branch


def infer(settings: ExplainSettings, workdir: Path, predictors: Predictors | None = None,
          progress: Callable[[str, float], None] | None = None) -> Explanation:
    """Run the predictors for the patient in ``settings`` (no report written)."""
    layout = RunLayout(settings.run)
    if not layout.root.is_dir():
        raise OncoFMError(f"run directory {layout.root} does not exist (run `oncofm demo` or the pipeline first)")
    patient = resolve_patient(layout, patient_id=settings.patient_id, expression=settings.expression,
                              cancer_type=settings.cancer_type, slide=settings.slide, mpp=settings.mpp,
                              age=settings.age, sex=settings.sex, slide_features=settings.slide_features,
                              stage=settings.stage, grade=settings.grade, cnv=settings.cnv,
                              mutations=settings.mutations)
    models = predictors or Predictors.from_run(layout, min_gene_fraction=settings.min_gene_fraction)
    ex = Explanation(patient=patient, settings=settings)
    step = ex.log
    for note in patient.notes:  # e.g. the pan-cancer fallback of a cancer type unseen in training
        step.note(note)

    def tell(name: str, frac: float) -> None:
        if progress is not None:
            progress(name, frac)

    tell("omics", 0.05)
    if patient.expression is None:
        step.note("no expression profile was given: the omics model was not run")
    elif models.omics is None:
        step.note(f"the run has no omics model ({layout.model_dir('omics')}): run `oncofm train omics`")
    else:
        ex.omics = step.timed("omics", models.omics.predict, patient, workdir)
        for note in layer_input_notes(patient, getattr(models.omics, "layer_features", {})):
            step.note(note)

    tell("slide", 0.3)
    if patient.slide is None:
        step.note("no slide image was given: the patch-level slide model was not run" +
                  (" (the slide-feature model runs on the slide-level image features)"
                   if patient.slide_features is not None else ""))
    elif models.slide is None:
        ex.tiled = step.timed("tile_slide", tile_patient_slide, patient, layout, workdir)
        step.note(f"the run has no slide model ({layout.model_dir('slide')}): run `oncofm train slide`; "
                  "no heatmap")
    else:
        ex.tiled = step.timed("tile_slide", models.slide.tile, patient, layout, workdir)
        tell("slide model", 0.45)
        ex.slide = step.timed("slide_model", models.slide.predict_tiles, ex.tiled)

    fusion_branch = _slide_feature_step(ex, models, layout)
    ev_settings = evidence_settings(layout, models.fusion)
    if ex.slide is not None:
        tell("top patches", 0.6)
        k = max(settings.top_patches, ev_settings.top_patches)
        ex.patch_summary = step.timed("top_patches", patch_summary, ex.tiled, ex.slide.attention, top_k=k,
                                      sample=ev_settings.sample_patches, seed=ev_settings.seed,
                                      cell_model=models.cells, cell_top=ev_settings.top_patches)
    evidence_patches = (None if ex.patch_summary is None else
                        PatchSummary(ex.patch_summary.patches[: ev_settings.top_patches], ex.patch_summary.slide_mean,
                                     ex.patch_summary.cells))
    ex.fusion_branch = fusion_branch
    slide_in = ex.slide_for_fusion
    ex.evidence = step.timed("evidence", build_evidence, patient.cancer_type, patient.age, ex.omics, slide_in,
                             evidence_patches if slide_in is ex.slide else None, ev_settings,
                             stage=patient.stage, grade=patient.grade)

    tell("fusion", 0.7)
    if ex.omics is None and slide_in is None:
        step.note("no model could be applied to this patient: no prediction is made")
    elif models.fusion is None:
        step.note(f"the run has no fusion model ({layout.model_dir('fusion')}): run `oncofm train fusion`; "
                  "no generated explanation")
    else:
        ex.fusion = step.timed("fusion", models.fusion.predict, ex.evidence, ex.omics, slide_in, patient.patient_id)
        # the guardrail: no generated text is shown as sound before it passes the checker
        ex.check = step.timed("check", check_explanation, ex.fusion.text, ex.evidence.to_dict(),
                              gene_vocabulary(layout, ex.evidence))
        if not ex.check.passed:
            rules = sorted({f.rule for f in ex.check.failures})
            step.note(f"the generated explanation failed the automatic check ({', '.join(rules)}): it is shown "
                      "flagged, with the failing statements and an evidence summary; the headline prediction "
                      "comes from the unimodal models")

    tell("cohort", 0.85)
    ex.cohort = step.timed("cohort_context", cohort_context, patient, ex.omics, ex.slide, layout)
    if ex.cohort is None and (ex.omics is not None or ex.slide is not None):
        step.note(f"no stored training-cohort predictions of the omics or slide model for {patient.cancer_type}: "
                  "the cohort comparison is left out")
    return ex


def explanation_record(ex: Explanation) -> dict[str, Any]:
    """The content of ``explanation.json``."""
    outcome, risk, source = ex.final()
    omics = ex.omics
    return {
        "patient_id": ex.patient.patient_id, "cancer_type": ex.patient.cancer_type,
        "input": {"source": ex.patient.source, "split": ex.patient.split,
                  "expression_genes": None if omics is None else
                  {"present": omics.n_present, "model": omics.n_model_genes},
                  "slide": None if ex.patient.slide is None else ex.patient.slide.name,
                  "mpp": ex.patient.mpp},
        "prediction": {"outcome": outcome, "risk": risk, "source": source},
        "omics": None if omics is None else {"prob": omics.prob},
        "slide": None if ex.slide is None else {"prob": ex.slide.prob, "n_patches": int(len(ex.slide.attention))},
        "slide_features": None if ex.slide_features is None else
        {"prob": ex.slide_features.prob, "reference_type": ex.slide_features.reference_type,
         "top_features": ex.slide_features.attributions.head(ex.settings.top_genes).to_dict("records")},
        "text": None if ex.fusion is None else ex.fusion.text,
        # "passed": the text passed the checker; "flagged": it failed (failures below); null: no text
        "text_status": None if ex.fusion is None else ("passed" if ex.text_passed else "flagged"),
        "check": None if ex.check is None else ex.check.as_dict(),
        "evidence_summary": None if ex.evidence is None else evidence_summary(ex.evidence.to_dict()),
        "evidence": None if ex.evidence is None else ex.evidence.to_dict(),
        "top_genes": [] if omics is None else omics.attributions.head(ex.settings.top_genes).to_dict("records"),
        "top_patches": [{"rank": p.rank, "x": p.x, "y": p.y, "attention": p.attention, **p.morphometrics}
                        for p in ex.patches[: ex.settings.top_patches]],
        "slide_mean_morphometrics": None if ex.patch_summary is None else ex.patch_summary.slide_mean,
        "cohort": None if ex.cohort is None else
        {"model": ex.cohort.model, "n_train": int(len(ex.cohort.risks)), "percentile": ex.cohort.percentile},
        "model_versions": ex.model_versions(),
        "notes": ex.log.notes,
        "seconds": ex.log.seconds,
        "created": ex.created,
        "notice": NOTICE,
    }


def explain_patient(settings: ExplainSettings, predictors: Predictors | None = None,
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
        ex = infer(settings, tmp / "work", predictors=predictors, progress=progress)
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

