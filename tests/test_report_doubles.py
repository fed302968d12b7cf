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
import tempfile
from pathlib import Path

import numpy as np

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

    risk = evidence.get("slide_prob", evidence.get("omics_prob", 0.5))
    text = f"{DOUBLE_TAG} " + render_target(evidence, death=risk >= 0.5, risk=risk, seed=evidence["patient_id"])
    outcome, parsed = S.parse_prediction(text)
    return S.FusionResult(text=text, risk=parsed, prediction=outcome, version="TEST-DOUBLE")


def double_steps() -> InferenceSteps:
    """The real steps, with the slide model and fusion LLM replaced by the test doubles."""
    return dataclasses.replace(InferenceSteps(), run_slide_model=double_slide_model, run_fusion=double_fusion)


def test_doubles_are_labelled():
    text = double_fusion({"patient_id": "p", "cancer_type": "KIRC", "slide_prob": 0.7, "missing": ["omics"]},
                         None, None, None).text
    assert text.startswith(DOUBLE_TAG)
    assert S.parse_prediction(text) == ("death within 5 years", 0.7)
