"""``oncofm explain``: bad input stops with a clear message and writes nothing; good input writes a report."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from oncofm.errors import OncoFMError
from oncofm.explain.inputs import read_expression_file
from oncofm.explain.pipeline import ExplainSettings, explain_patient
from test_report_doubles import demo_run, double_predictors

PATIENT = "TCGA-B0-5698"  # KIRC, real H&E tile (MoNuSeg) in the bundled demo data


def _expression_row(patient: str = PATIENT) -> pd.Series:
    return pd.read_parquet(demo_run() / "cohort" / "expression.parquet").loc[patient]


def _explain(tmp_path, **kw):
    out = tmp_path / "out"
    settings = ExplainSettings(run=str(demo_run()), out=str(out), **kw)
    return out, lambda: explain_patient(settings, predictors=double_predictors(omics=True))


def _assert_nothing_written(tmp_path, out):
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_too_few_genes_says_how_many(tmp_path):
    row = _expression_row().head(40)
    f = tmp_path / "expr.csv"
    row.rename("value").rename_axis("gene").reset_index().to_csv(f, index=False)
    out, run = _explain(tmp_path, expression=str(f), cancer_type="KIRC")
    with pytest.raises(OncoFMError, match=r"has 40 of the model's 1526 genes"):
        run()
    _assert_nothing_written(tmp_path, out)


def test_cancer_type_that_is_not_a_code(tmp_path):
    """A type unseen in training is accepted with a note (tests/test_units.py); a value that is not a
    cancer type code (2–12 letters or digits) is refused."""
    f = tmp_path / "expr.csv"
    _expression_row().rename("value").rename_axis("gene").reset_index().to_csv(f, index=False)
    out, run = _explain(tmp_path, expression=str(f), cancer_type="kidney cancer")
    with pytest.raises(OncoFMError, match=r"cancer type 'kidney cancer' is not a cancer type code.*"
                                          r"trained on BLCA, GBM, KIRC, KIRP, LGG"):
        run()
    _assert_nothing_written(tmp_path, out)


def test_unreadable_slide(tmp_path):
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"II*\x00" + b"\x00garbage" * 100)
    out, run = _explain(tmp_path, slide=str(bad), cancer_type="KIRC", mpp=0.5)
    with pytest.raises(OncoFMError, match="broken.svs"):
        run()
    _assert_nothing_written(tmp_path, out)


def test_tissue_free_slide(tmp_path):
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((800, 800, 3), 245, np.uint8)).save(blank)
    out, run = _explain(tmp_path, slide=str(blank), cancer_type="KIRC", mpp=0.5)
    with pytest.raises(OncoFMError, match="no tissue found in blank.png"):
        run()
    _assert_nothing_written(tmp_path, out)


def test_slide_without_mpp_asks_for_mpp(tmp_path, shared_data):
    jpg = tmp_path / "tile.jpg"
    shutil.copy(shared_data / "pathology" / "monuseg_tcga_tiles" / "TCGA-B0-5698-01Z-00-DX1.jpg", jpg)
    out, run = _explain(tmp_path, slide=str(jpg), cancer_type="KIRC")
    with pytest.raises(OncoFMError, match=r"no microns-per-pixel metadata; pass --mpp"):
        run()
    _assert_nothing_written(tmp_path, out)


def test_expression_file_layouts_agree(tmp_path):
    row = _expression_row()
    long = tmp_path / "long.tsv"
    row.rename("value").rename_axis("gene").reset_index().to_csv(long, sep="\t", index=False)
    wide = tmp_path / "wide.csv"
    row.to_frame(PATIENT).T.rename_axis("patient_id").reset_index().to_csv(wide, index=False)
    a, b = read_expression_file(long), read_expression_file(wide)
    pd.testing.assert_series_equal(a, b, check_names=False)
    assert len(a) == 1526 and np.allclose(a.to_numpy(), row.to_numpy(), equal_nan=True)


def test_new_patient_expression_only_report(tmp_path):
    """An uploaded real expression profile without a slide: report with missing-modality notes, no heatmap."""
    f = tmp_path / "expr.csv"
    _expression_row().rename("value").rename_axis("gene").reset_index().to_csv(f, index=False)
    out, run = _explain(tmp_path, expression=str(f), cancer_type="kirc")
    paths = run()
    assert set(paths) == {"report", "explanation"}
    rec = json.loads((out / "explanation.json").read_text())
    assert rec["cancer_type"] == "KIRC" and rec["input"]["expression_genes"] == {"present": 1526, "model": 1526}
    assert any("no slide image was given" in n for n in rec["notes"])
    html = (out / "report.html").read_text()
    assert "Research use only" in html and "no slide image was given" in html


def test_unseen_cancer_type_is_explained_with_a_visible_warning(tmp_path):
    """One policy: a well-formed type the run was not trained on uses the pan-cancer statistics and the
    report says so."""
    f = tmp_path / "expr.csv"
    _expression_row().rename("value").rename_axis("gene").reset_index().to_csv(f, index=False)
    out, run = _explain(tmp_path, expression=str(f), cancer_type="LUAD")
    run()
    rec = json.loads((out / "explanation.json").read_text())
    assert rec["cancer_type"] == "LUAD"
    assert any("LUAD" in n and "pan-cancer" in n for n in rec["notes"])
    assert "pan-cancer" in (out / "report.html").read_text()


def test_log_scale_profile_is_refused_naming_the_units(tmp_path):
    """A real profile given as log-scale values instead of the training z-scores: refused, nothing written."""
    row = _expression_row()
    rng = np.random.default_rng(0)
    log_like = np.clip(rng.normal(8.5, 2.5, len(row)) + 1.2 * np.clip(row.to_numpy(), -4, 4), 0, 20)
    f = tmp_path / "expr.csv"
    pd.Series(log_like, index=row.index).rename("value").rename_axis("gene").reset_index().to_csv(f, index=False)
    out, run = _explain(tmp_path, expression=str(f), cancer_type="KIRC")
    with pytest.raises(OncoFMError, match=r"looks like log-scale values.*trained on per-cohort RNA-seq z-scores"):
        run()
    _assert_nothing_written(tmp_path, out)
