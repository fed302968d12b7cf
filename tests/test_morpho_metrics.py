"""Patch morphometrics: planted nuclei counts, stain optical densities, real TCGA tiles."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.color import hed2rgb, rgb2hed

from oncofm.pathology.morphometrics import MORPHOMETRIC_KEYS, patch_morphometrics


def _stain(h: np.ndarray, e: np.ndarray) -> np.ndarray:
    """RGB from hematoxylin/eosin concentration maps (Ruifrok vectors, skimage's inverse)."""
    hed = np.stack([h, e, np.zeros_like(h)], axis=-1)
    return (np.clip(hed2rgb(hed), 0, 1) * 255).round().astype(np.uint8)


def test_planted_nuclei_are_counted() -> None:
    rng = np.random.default_rng(0)
    size, mpp = 256, 0.5
    h = np.zeros((size, size))
    e = np.full((size, size), 0.08)  # eosin stroma everywhere
    yy, xx = np.mgrid[0:size, 0:size]
    centres = [(y, x) for y in range(20, size - 10, 40) for x in range(20, size - 10, 40)]  # 36, well separated
    for y, x in centres:
        r = rng.uniform(5, 8)  # 5-8 px = 2.5-4 µm radius: 20-50 µm²
        h[(yy - y) ** 2 + (xx - x) ** 2 <= r * r] = 0.25
    m = patch_morphometrics(_stain(h, e), mpp=mpp)
    assert set(m) == set(MORPHOMETRIC_KEYS)
    assert m["tissue_fraction"] == pytest.approx(1.0)
    assert m["nuclei_count"] == len(centres)
    area_mm2 = (size * mpp / 1000) ** 2
    assert m["nuclei_density"] == pytest.approx(len(centres) / area_mm2)
    assert m["hematoxylin_fraction"] == pytest.approx((h > 0).mean(), abs=0.02)


def test_stain_densities_follow_the_stain() -> None:
    ones = np.ones((64, 64))
    hema = patch_morphometrics(_stain(0.2 * ones, 0.01 * ones))
    eosin = patch_morphometrics(_stain(0.01 * ones, 0.2 * ones))
    assert hema["hematoxylin_od"] > 5 * hema["eosin_od"]
    assert eosin["eosin_od"] > 5 * eosin["hematoxylin_od"]
    # Same numbers as skimage's deconvolution on the same pixels.
    rgb = _stain(0.12 * ones, 0.05 * ones)
    ref = rgb2hed(rgb)
    m = patch_morphometrics(rgb)
    assert m["hematoxylin_od"] == pytest.approx(ref[..., 0].mean(), rel=1e-6)
    assert m["eosin_od"] == pytest.approx(ref[..., 1].mean(), rel=1e-6)


def test_blank_patch() -> None:
    m = patch_morphometrics(np.full((64, 64, 3), 250, np.uint8))
    assert m["tissue_fraction"] == 0 and m["nuclei_count"] == 0 and math.isnan(m["nuclei_density"])
    with pytest.raises(ValueError, match="RGB"):
        patch_morphometrics(np.zeros((8, 8), np.uint8))


def test_real_tcga_tiles_give_plausible_numbers(shared_data: Path) -> None:
    """MoNuSeg tiles (40x, 0.25 µm/px, TCGA): nuclei densities in the range of real tissue."""
    tiles = sorted((shared_data / "pathology" / "monuseg_tcga_tiles").glob("*.jpg"))[:8]
    densities = []
    for t in tiles:
        rgb = np.asarray(Image.open(t).convert("RGB"))[:500, :500]
        m = patch_morphometrics(rgb, mpp=0.25)
        assert m["tissue_fraction"] > 0.5 and m["hematoxylin_od"] > 0
        densities.append(m["nuclei_density"])
    assert 500 < np.median(densities) < 20_000, densities


def test_grid_morphometrics_on_a_tiled_svs(shared_data: Path, tmp_path: Path) -> None:
    from oncofm.pathology.morphometrics import grid_morphometrics
    from oncofm.pathology.tiling import TilingSettings, load_grid, tile_slides

    svs = shared_data / "pathology" / "cmu1_small_region_svs" / "CMU-1-Small-Region.svs"
    res = tile_slides(TilingSettings(source=str(svs), out=str(tmp_path), qc=False), progress=False)
    h5 = res[0].paths["h5"]
    df = grid_morphometrics(h5, indices=[0, 1, 2])
    assert list(df.columns) == ["x", "y", *MORPHOMETRIC_KEYS] and len(df) == 3
    np.testing.assert_array_equal(df[["x", "y"]].to_numpy(), load_grid(h5).coords[:3])
    assert (df["tissue_fraction"] > 0.3).all() and (df["nuclei_density"] > 0).all()
