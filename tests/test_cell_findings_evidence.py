"""Cell findings of the most attended patches through the one path: patch_summary (real CMU-1 patches, a real
cell model of a registered design trained for a few steps) -> the evidence record -> the text -> the checker
-> the report's gallery."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from oncofm.fusion.checker import check_explanation
from oncofm.fusion.evidence import CELL_MEASURES, EvidenceSettings, build_evidence
from oncofm.fusion.templates import render_target
from oncofm.pathology.predict import SlideResult, load_cell_model, patch_summary, read_tiles
from oncofm.paths import RunLayout

CMU = ("cmu1_small_region_svs", "CMU-1-Small-Region.svs")


@pytest.fixture(scope="module")
def tiled(shared_data: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    from oncofm.pathology.tiling import TilingSettings, tile_slide

    slide = shared_data / "pathology" / Path(*CMU)
    out = tmp_path_factory.mktemp("cell_tiles")
    result = tile_slide(slide, TilingSettings.build(source=str(slide), out=str(out), target_mpp=1.0,
                                                    patch_size=112, min_tissue=0.5, qc=False))
    return read_tiles(result.paths["h5"])


@pytest.fixture(scope="module")
def cell_model(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    from oncofm.pathology.cells.model import CellModel
    from oncofm.pathology.cells.registry import design_class
    from test_cells import _tiny_settings, planted

    tmp = tmp_path_factory.mktemp("cells")
    design = design_class("log-gbm").fit([planted(1), planted(2)], [planted(3)], _tiny_settings(tmp), tmp / "w")
    run = tmp / "run"
    CellModel(design, [0.05, 0.05, 0.05]).save(RunLayout(run).model_dir("cells"))
    return load_cell_model(RunLayout(run))


def test_run_without_a_cell_model_has_none(tmp_path: Path) -> None:
    assert load_cell_model(RunLayout(tmp_path)) is None


def test_cell_findings_enter_the_evidence_the_text_and_the_checker(tiled, cell_model) -> None:  # noqa: ANN001
    n = len(tiled.coords)
    attention = np.linspace(1.0, 0.1, n)
    attention /= attention.sum()
    summary = patch_summary(tiled, attention, top_k=3, sample=n, seed=0, cell_model=cell_model)
    assert all(p.cells is not None and set(p.cells) == {"inflammatory", "epithelial", "stromal"}
               for p in summary.patches)
    assert summary.cells is not None and set(CELL_MEASURES) <= set(summary.cells)
    top = summary.cells["inflammatory_density"]
    counted = sum(p.cells["inflammatory"] for p in summary.patches)
    area = sum(p.image.shape[0] * p.image.shape[1] for p in summary.patches) * (tiled.read_mpp * 1e-3) ** 2
    assert top["top"] == pytest.approx(counted / area)  # the pooled density of exactly these patches
    slide = SlideResult(prob=0.4, logit=-0.4, embedding=np.zeros(4, np.float32), attention=attention, version="t")
    ev = build_evidence("BRCA", 55.0, None, slide, summary, EvidenceSettings(top_patches=3)).to_dict()
    cited = ev["image"].get("cells", [])
    expected = [k for k in CELL_MEASURES if summary.cells[k]["ratio"] is not None]
    assert expected, summary.cells  # the planted-trained model finds cells in real tissue
    assert [c["measure"] for c in cited] == expected
    text = render_target(ev, death=False, risk=0.4, seed=0)
    for c in cited:
        assert c["name"] in text and f"{c['ratio']:.2f}" in text
    assert check_explanation(text, ev, set()).passed
    if cited:  # a changed ratio is a number the record does not hold
        wrong = text.replace(f"{cited[0]['ratio']:.2f}", f"{cited[0]['ratio'] + 1.37:.2f}", 1)
        assert "number_not_in_evidence" in check_explanation(wrong, ev, set()).rules
