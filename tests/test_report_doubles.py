"""Shared helpers of the product tests: a small prepared run and TEST DOUBLES of absent models.

The run is the bundled real demo cohort imported and split (once per test session, in a temp folder).
Where a model is not in the run, the report, web and browser tests pass the clearly labelled doubles below
to ``explain_patient(predictors=...)``: each implements the predictor interface of
:class:`oncofm.explain.pipeline.Predictors` (the real pipeline, tiling, evidence builder, cohort context
and report all run; only the model's numbers are stand-ins). The product itself never uses them. The
doubles compute their numbers from the real input (normalised expression; patch darkness on the real H&E
image), so the report shows something that varies with the patient, and every text they write starts with
``[TEST DOUBLE]``. The end-to-end test with the real models is ``tests/test_explain_pipeline.py``.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from oncofm.cohort.patient import PatientInput
from oncofm.explain.pipeline import Predictors
from oncofm.fusion.evidence import Evidence, EvidenceSettings
from oncofm.fusion.predict import FusionResult
from oncofm.omics.predict import OmicsResult
from oncofm.pathology.predict import SlideResult, TiledSlide, tile_patient_slide
from oncofm.paths import RunLayout

DOUBLE_TAG = "[TEST DOUBLE]"
VERSION = "TEST-DOUBLE"


@functools.lru_cache(maxsize=1)
def demo_run() -> Path:
    """The bundled demo cohort imported + split in a temp folder (built once per session; read-only)."""
    from oncofm.cohort.importing import ImportSettings, import_cohort
    from oncofm.cohort.splits import SplitSettings, split_cohort
    from oncofm.data import demo_data_dir

    run = Path(tempfile.mkdtemp(prefix="oncofm-product-run-")) / "run"
    import_cohort(ImportSettings(format="tcga13", source=str(demo_data_dir()), run=str(run)))
    split_cohort(SplitSettings(run=str(run)))
    return run


class DoubleOmics:
    """TEST DOUBLE of the omics predictor: the run's real gene-coverage and units checks and normalisation, then
    attribution = 0.01 × normalised expression and a probability from their sum."""

    version = VERSION

    def __init__(self, layout: RunLayout, min_gene_fraction: float = 0.5) -> None:
        from oncofm.cohort.schema import PAN_CANCER

        self.stats = pd.read_parquet(layout.normalization)
        self.genes = self.stats.loc[self.stats["cancer_type"] == PAN_CANCER, "gene"].astype(str).tolist()
        self.min_gene_fraction = min_gene_fraction

    def predict(self, patient: PatientInput, workdir: Path | None = None) -> OmicsResult | None:
        from oncofm.cohort.normalize import apply_normalizer
        from oncofm.omics.predict import attribution_table, check_gene_coverage

        if patient.expression is None:
            return None
        from oncofm.cohort.units import require_units

        n_present, missing = check_gene_coverage(self.genes, patient.expression, self.min_gene_fraction)
        require_units(patient.expression, self.stats, patient.cancer_type, what="the expression profile")
        frame = pd.DataFrame([patient.expression.reindex(self.genes).to_numpy()], columns=self.genes, index=["p"])
        z = apply_normalizer(frame, pd.Series({"p": patient.cancer_type}), self.stats).iloc[0]
        attr = 0.01 * np.nan_to_num(z.to_numpy(float))
        table = attribution_table(self.genes, attr, z, pd.DataFrame(columns=["gene", "coef", "q"]))
        prob = float(1 / (1 + np.exp(-table["attribution"].head(50).sum())))
        return OmicsResult(prob=prob, logit=float(np.log(prob / (1 - prob))), embedding=np.zeros(0, np.float32),
                           attributions=table, n_present=n_present, n_model_genes=len(self.genes),
                           missing_genes=missing, version=VERSION)


class DoubleSlide:
    """TEST DOUBLE of the slide predictor: the real tiler (64-px patches, for speed), then attention ∝
    darkness of each patch on the thumbnail."""

    version = VERSION
    geometry = {"target_mpp": 0.5, "patch_size": 64, "min_tissue": 0.5}

    def tile(self, patient: PatientInput, layout: RunLayout, workdir: Path) -> TiledSlide:
        return tile_patient_slide(patient, layout, workdir, geometry=self.geometry)

    def predict_tiles(self, tiled: TiledSlide) -> SlideResult:
        thumb = tiled.thumbnail.astype(np.float32).mean(axis=2)
        h, w = thumb.shape
        sx, sy = w / tiled.level0_size[0], h / tiled.level0_size[1]
        side = max(1, int(tiled.patch_side_level0 * sx))
        dark = np.array([255.0 - thumb[int(y * sy):int(y * sy) + side, int(x * sx):int(x * sx) + side].mean()
                         for x, y in tiled.coords])
        att = np.exp((dark - dark.max()) / 8.0)
        prob = float(np.clip(dark.mean() / 255.0, 0, 1))
        return SlideResult(prob=prob, logit=float("nan"), embedding=np.zeros(0, np.float32),
                           attention=att / att.sum(), version=VERSION)


class DoubleFusion:
    """TEST DOUBLE of the fusion predictor: the reasoning stage's template text for the evidence."""

    version = VERSION
    evidence_settings = EvidenceSettings()

    def predict(self, evidence: Evidence, omics: OmicsResult | None, slide: SlideResult | None,
                patient_id: str = "patient") -> FusionResult:
        from oncofm.fusion.parse import parse_prediction
        from oncofm.fusion.templates import render_target

        risk = evidence.omics_prob or evidence.slide_prob or 0.5
        text = f"{DOUBLE_TAG} " + render_target(evidence.to_dict(), death=risk >= 0.5, risk=risk,
                                                seed=evidence.cancer_type)
        return FusionResult(text=text, parsed=parse_prediction(text), version=VERSION)


def double_predictors(run: Path | None = None, omics: bool = False) -> Predictors:
    """Doubles of the slide model and fusion LLM (and, if asked, of the omics model) for ``run``."""
    layout = RunLayout(run or demo_run())
    return Predictors(omics=DoubleOmics(layout) if omics else None, slide=DoubleSlide(), fusion=DoubleFusion())


def run_with_double_omics_predictions(tmp: Path) -> Path:
    """A copy of the demo run with a TEST DOUBLE ``models/omics/predictions.parquet`` (for the cohort section)."""
    run = tmp / "run"
    shutil.copytree(demo_run(), run)
    expr = pd.read_parquet(run / "cohort" / "expression.parquet")
    splits = pd.read_parquet(run / "cohort" / "splits.parquet")
    score = expr.fillna(0).to_numpy().mean(axis=1)
    prob = 1 / (1 + np.exp(-(score - score.mean()) / (score.std() + 1e-9)))
    preds = pd.DataFrame({"patient_id": expr.index, "prob": prob}).merge(splits[["patient_id", "split"]])
    (run / "models" / "omics").mkdir(parents=True)
    preds.to_parquet(run / "models" / "omics" / "predictions.parquet", index=False)
    return run


def test_doubles_are_labelled():
    from oncofm.fusion.evidence import Evidence

    result = DoubleFusion().predict(Evidence(cancer_type="KIRC", slide_prob=0.7, missing=["omics"]), None, None)
    assert result.text.startswith(DOUBLE_TAG)
    assert (result.prediction, result.risk) == ("death within 5 years", 0.7)
