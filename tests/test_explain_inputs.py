"""``oncofm explain``: bad input stops with a clear message and writes nothing; good input writes a report."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from oncofm.errors import OncoFMError
from oncofm.report.explain import ExplainSettings, explain_patient
from oncofm.report.inputs import read_expression_file
from test_report_doubles import demo_run, double_steps

PATIENT = "TCGA-B0-5698"  # KIRC, real H&E tile (MoNuSeg) in the bundled demo data


def _expression_row(patient: str = PATIENT) -> pd.Series:
    return pd.read_parquet(demo_run() / "cohort" / "expression.parquet").loc[patient]


def _explain(tmp_path, **kw):
    out = tmp_path / "out"
    settings = ExplainSettings(run=str(demo_run()), out=str(out), **kw)
    return out, lambda: explain_patient(settings, steps=double_steps())


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


def test_unknown_cancer_type(tmp_path):
    f = tmp_path / "expr.csv"
    _expression_row().rename("value").rename_axis("gene").reset_index().to_csv(f, index=False)
    out, run = _explain(tmp_path, expression=str(f), cancer_type="XYZ")
    with pytest.raises(OncoFMError, match=r"unknown cancer type 'XYZ'.*BLCA, GBM, KIRC, KIRP, LGG"):
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
    assert any("no slide was given" in n for n in rec["notes"])
    html = (out / "report.html").read_text()
    assert "Research use only" in html and "no slide was given" in html
