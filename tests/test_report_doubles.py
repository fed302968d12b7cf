"""Shared helpers of the product tests: a small prepared run and TEST DOUBLES of absent model steps.

The run is the bundled real demo cohort imported and split (once per test session, in a temp folder).
Where an upstream model is not in the run, the web and browser tests swap in the clearly labelled test
doubles below (through ``InferenceSteps``); the product itself never uses them. The doubles compute
their numbers from the real input (patch darkness on the real H&E image), so the report shows
something that varies with the slide, but every text they write starts with ``[TEST DOUBLE]``.
"""

from __future__ import annotations

import dataclasses
import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from oncofm.report import steps as S
from oncofm.report.explain import InferenceSteps

DOUBLE_TAG = "[TEST DOUBLE]"


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


def double_pairs(norm, patient, layout) -> np.ndarray:  # noqa: ANN001
    """TEST DOUBLE of the Cox pair builder: (expression, 0) pairs, shape (1, G, 2)."""
    z = np.nan_to_num(norm.values.to_numpy(np.float32))
    return np.stack([z, np.zeros_like(z)], axis=-1)[None]


def double_omics_model(pairs, norm, patient, layout) -> S.OmicsResult:  # noqa: ANN001
    """TEST DOUBLE of the omics model: attribution = 0.01 × normalised expression; prob from their sum."""
    z = pairs[0, :, 0]
    attr = pd.DataFrame({"gene": list(norm.values.index), "attribution": 0.01 * z, "expression_z": z})
    attr = attr.reindex(attr["attribution"].abs().sort_values(ascending=False).index).reset_index(drop=True)
    prob = float(1 / (1 + np.exp(-attr["attribution"].head(50).sum())))
    return S.OmicsResult(prob=prob, embedding=None, attributions=attr, version="TEST-DOUBLE")


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


def double_slide_model(tiled: S.TiledSlide, layout) -> S.SlideResult:  # noqa: ANN001
    """TEST DOUBLE of the slide model: attention ∝ darkness of each patch on the thumbnail."""
    thumb = tiled.thumbnail.astype(np.float32).mean(axis=2)
    h, w = thumb.shape
    sx, sy = w / tiled.level0_size[0], h / tiled.level0_size[1]
    side = max(1, int(tiled.patch_side_level0 * sx))
    dark = np.array([255.0 - thumb[int(y * sy):int(y * sy) + side, int(x * sx):int(x * sx) + side].mean()
                     for x, y in tiled.coords])
    att = np.exp((dark - dark.max()) / 8.0)
    return S.SlideResult(prob=float(np.clip(dark.mean() / 255.0, 0, 1)), embedding=None,
                         attention=att / att.sum(), version="TEST-DOUBLE")


def double_fusion(evidence, omics, slide, layout) -> S.FusionResult:  # noqa: ANN001
    """TEST DOUBLE of the fusion LLM: the reasoning stage's template text for the evidence."""
    from oncofm.fusion.templates import render_target

    risk = evidence.get("omics_prob") or evidence.get("slide_prob") or 0.5
    text = f"{DOUBLE_TAG} " + render_target(evidence, death=risk >= 0.5, risk=risk, seed=evidence["cancer_type"])
    outcome, parsed = S.parse_prediction(text)
    return S.FusionResult(text=text, risk=parsed, prediction=outcome, version="TEST-DOUBLE")


def double_steps(omics: bool = False) -> InferenceSteps:
    """The real steps, with the slide model and fusion LLM (and, if asked, Cox pairs + omics model) replaced
    by the test doubles."""
    steps = dataclasses.replace(InferenceSteps(), run_slide_model=double_slide_model, run_fusion=double_fusion)
    if omics:
        steps = dataclasses.replace(steps, build_pairs=double_pairs, run_omics_model=double_omics_model)
    return steps


def test_doubles_are_labelled():
    text = double_fusion({"cancer_type": "KIRC", "slide_prob": 0.7, "missing": ["omics"]},
                         None, None, None).text
    assert text.startswith(DOUBLE_TAG)
    assert S.parse_prediction(text) == ("death within 5 years", 0.7)
