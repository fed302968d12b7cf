"""The report: one self-contained HTML file; the heatmap puts the attention where it is; the cohort figure."""

from __future__ import annotations

import json
import re

import numpy as np

from oncofm.explain.context import CohortContext
from oncofm.explain.pipeline import ExplainSettings, explain_patient
from oncofm.pathology.predict import TiledSlide
from oncofm.report import plots
from test_report_doubles import DOUBLE_TAG, demo_run, double_predictors, run_with_double_omics_predictions


def test_report_is_self_contained(tmp_path):
    out = tmp_path / "report"
    paths = explain_patient(ExplainSettings(run=str(demo_run()), out=str(out), patient_id="TCGA-HE-7129"),
                            predictors=double_predictors())
    assert set(paths) == {"report", "explanation", "heatmap"}
    html = paths["report"].read_text()
    srcs = re.findall(r"""\bsrc=['"]([^'"]+)""", html)
    assert srcs and all(s.startswith("data:image/") for s in srcs), "every image is embedded"
    assert "<link" not in html and not re.search(r"""(href|src)=['"]?(https?:)?//""", html)
    assert "Research use only" in html and DOUBLE_TAG in html
    assert 'id="heatmap"' in html.replace("'", '"') and 'id="patches"' in html.replace("'", '"')
    rec = json.loads(paths["explanation"].read_text())
    assert rec["prediction"]["source"] == "fusion LLM"
    assert rec["slide"]["n_patches"] > 8 and len(rec["top_patches"]) == 8
    assert set(rec["seconds"]) >= {"tile_slide", "slide_model", "top_patches", "evidence", "fusion", "total"}
    assert any("the run has no omics model" in n for n in rec["notes"])
    assert rec["evidence"]["missing"] == ["omics"] and rec["evidence"]["image"]["n_patches"] > 8
    assert paths["heatmap"].read_bytes()[:4] == b"\x89PNG"


def test_attention_map_places_planted_patch():
    """One patch holds most attention: its pixels get the top percentile, uncovered pixels stay clear."""
    thumb = np.full((100, 200, 3), 230, np.uint8)
    coords = np.array([[x, y] for y in range(0, 800, 200) for x in range(0, 1600, 200)])  # level 0 = 1600x800
    att = np.full(len(coords), 0.01)
    hot = 10
    att[hot] = 1.0
    tiled = TiledSlide(path=None, h5=None, coords=coords, patch_side_level0=100, level0_size=(1600, 800),
                       read_level=0, read_size=100, mpp=0.5, read_mpp=0.5, thumbnail=thumb)
    scores, covered = plots.attention_map(tiled, att / att.sum())
    x, y = coords[hot] // 8
    assert scores[y:y + 12, x:x + 12].min() == scores.max() == 1.0
    assert not covered[y + 13:y + 25, x:x + 12].any()  # the gap between patches is left clear
    assert covered.mean() < 0.3


def test_cohort_figure_renders():
    rng = np.random.default_rng(0)
    risks = rng.uniform(size=120)
    times = rng.exponential(1500, size=120) * (1.5 - risks)
    ctx = CohortContext(cancer_type="KIRC", model="omics", patient_risk=0.7, risks=risks, times_days=times,
                        events=rng.integers(0, 2, size=120), percentile=float((risks < 0.7).mean()))
    png = plots.cohort_png(ctx)
    assert png[:4] == b"\x89PNG" and len(png) > 20_000


def test_full_report_has_every_section(tmp_path):
    """With (labelled) doubles for every model: genes chart, cohort histogram + KM, heatmap, patches, text."""
    run = run_with_double_omics_predictions(tmp_path)
    out = tmp_path / "full"
    paths = explain_patient(ExplainSettings(run=str(run), out=str(out), patient_id="TCGA-HE-7129"),
                            predictors=double_predictors(run, omics=True))
    html = paths["report"].read_text().replace("'", '"')
    for section in ('id="explanation"', 'id="heatmap"', 'id="thumbnail"', 'id="patches"', 'id="genes"',
                    'id="cohort"', 'id="notice"'):
        assert section in html, section
    rec = json.loads(paths["explanation"].read_text())
    assert rec["evidence"]["missing"] == [] and len(rec["evidence"]["risk_genes"]) == 3
    assert rec["cohort"]["model"] == "omics" and rec["cohort"]["n_train"] > 100
    assert 0 <= rec["cohort"]["percentile"] <= 1
    assert rec["top_genes"][0]["gene"] in rec["text"] or rec["evidence"]["risk_genes"][0]["gene"] in rec["text"]
