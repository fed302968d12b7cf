"""Tissue detection on a low-resolution image of the slide.

Steps (all on an RGB thumbnail, typically 4–16 µm/px):

1. **Background**: tissue is coloured, glass is white/grey. A pixel is a tissue candidate when its HSV
   saturation exceeds an Otsu threshold computed on the saturation histogram, clamped to
   ``[sat_min, sat_max]`` (so an all-tissue tile or an all-glass slide do not produce nonsense
   thresholds), or when it is dark (value < ``dark_value``) and at least slightly tinted.
2. **Pen and ink**: blue and green marker (hue 0.42–0.72 on [0, 1], saturated, and green ≥ red — H&E
   hematoxylin and eosin are always redder than green), and black marker/debris (all channels dark) are
   marked as ink and cleaned of specks. Within ``ink_margin_um`` of a mark, the faint fringe of the marker
   (the same hues, half the saturation) is ink too, but tissue-coloured pixels beside the mark stay tissue.
   Ink is removed from tissue; **tissue enclosed by ink** (the holes of the ink mask — where a pathologist
   circles the tumour) is kept whole, and counted (``TissueMask.enclosed``). Otsu's threshold is computed
   without the ink pixels, so heavy marking does not shift it.
3. **Clean-up**: binary opening and closing, removal of objects smaller than ``min_area_mm2``, filling of
   holes smaller than ``max_hole_mm2`` (small lumens, cracks), all sized in physical units via the mask mpp.

:func:`detect_tissue` returns a :class:`TissueMask` holding both the tissue mask and the ink mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import Field

from oncofm.config import StageSettings


class TissueSettings(StageSettings):
    """Parameters of :func:`detect_tissue` (physical sizes in µm / mm², independent of the mask scale)."""

    stage = "tissue"

    mask_mpp: float = Field(8.0, gt=0, description="Resolution of the tissue mask (µm/px), coarser when needed.")
    max_mask_side: int = Field(4096, ge=64, description="Longest side of the mask in pixels (memory bound).")
    sat_min: float = Field(0.04, ge=0, le=1)
    sat_max: float = Field(0.10, ge=0, le=1)
    dark_value: float = Field(0.8, ge=0, le=1, description="Below this brightness, weakly tinted pixels count.")
    black_value: float = Field(0.22, ge=0, le=1, description="Max channel below this = black ink/debris.")
    ink_min_saturation: float = Field(0.30, ge=0, le=1)
    ink_margin_um: float = Field(64.0, ge=0, description="Within this distance of an ink mark (µm), faint "
                                 "ink-coloured pixels (the marker's fringe) are ink too; tissue-coloured ones not.")
    ink_edge_um: float = Field(8.0, ge=0, description="Dilation of ink marks whatever the colour (µm): the "
                               "blurred edge of a mark at the mask's resolution.")
    min_area_mm2: float = Field(0.01, ge=0, description="Tissue pieces smaller than this are dropped.")
    max_hole_mm2: float = Field(0.01, ge=0, description="Holes smaller than this are filled.")
    smooth_um: float = Field(16.0, ge=0, description="Radius of the opening/closing (µm).")


@dataclass
class TissueMask:
    """Masks at ``downsample`` relative to level 0: ``tissue``, ``ink`` and ``enclosed`` (the areas that ink
    marks enclose, e.g. a circled tumour; tissue there is kept) are (h, w) bool."""

    tissue: np.ndarray
    ink: np.ndarray
    downsample: float
    mpp: float
    enclosed: np.ndarray | None = None

    @property
    def fraction(self) -> float:
        return float(self.tissue.mean()) if self.tissue.size else 0.0


def rgb_to_hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue, saturation, value in [0, 1] as float32 (h, w) arrays (same convention as skimage's rgb2hsv,
    a third of its memory)."""
    x = rgb.astype(np.float32) / 255.0
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    val = x.max(axis=-1)
    delta = val - x.min(axis=-1)
    sat = np.divide(delta, val, out=np.zeros_like(val), where=val > 0)
    safe = np.where(delta > 0, delta, 1.0)
    hue = np.where(val == r, (g - b) / safe, np.where(val == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    hue = np.where(delta > 0, (hue / 6.0) % 1.0, 0.0).astype(np.float32)
    return hue, sat, val


def ink_mask(rgb: np.ndarray, settings: TissueSettings | None = None) -> np.ndarray:
    """Pen and ink pixels (blue, green, black) of an RGB image, (h, w) bool, before clean-up."""
    s = settings or TissueSettings()
    hue, sat, val = rgb_to_hsv(rgb)
    r, g = rgb[..., 0].astype(np.int16), rgb[..., 1].astype(np.int16)
    blue_green = (hue >= 0.42) & (hue <= 0.72) & (sat >= s.ink_min_saturation) & (g >= r)
    # Yellow-green markers (hue 0.17-0.42) with green clearly above red.
    green = (hue >= 0.17) & (hue < 0.42) & (sat >= s.ink_min_saturation) & (g > r + 10)
    black = val < s.black_value
    return blue_green | green | black


def _faint_ink(rgb: np.ndarray, settings: TissueSettings) -> np.ndarray:
    """The fringe of a blue/green marker: its hues at half the saturation (tissue is redder than green)."""
    hue, sat, _ = rgb_to_hsv(rgb)
    r, g = rgb[..., 0].astype(np.int16), rgb[..., 1].astype(np.int16)
    return (hue >= 0.17) & (hue <= 0.72) & (sat >= settings.ink_min_saturation / 2) & (g >= r)


def detect_tissue_rgb(rgb: np.ndarray, mpp: float, settings: TissueSettings | None = None,
                      return_enclosed: bool = False) -> tuple[np.ndarray, ...]:
    """Tissue and ink masks of an RGB image at ``mpp`` µm/px. Returns (tissue, ink), both (h, w) bool, and
    with ``return_enclosed`` also the areas enclosed by ink."""
    from scipy import ndimage as ndi
    from skimage import morphology
    from skimage.filters import threshold_otsu

    s = settings or TissueSettings()
    # Per-pixel colour tests in row blocks (float temporaries stay small); saturation kept as uint8 for Otsu.
    h = rgb.shape[0]
    sat8 = np.empty(rgb.shape[:2], np.uint8)
    dark = np.empty(rgb.shape[:2], bool)
    raw_ink = np.empty(rgb.shape[:2], bool)
    for y0 in range(0, h, 256):
        block = rgb[y0:y0 + 256]
        _, sat, val = rgb_to_hsv(block)
        sat8[y0:y0 + 256] = np.round(sat * 255).astype(np.uint8)
        dark[y0:y0 + 256] = val < s.dark_value
        raw_ink[y0:y0 + 256] = ink_mask(block, s)

    px_area_mm2 = (mpp / 1000.0) ** 2
    min_ink_px = max(1, int(round(0.0005 / px_area_mm2)))  # specks below 0.0005 mm² are not pen marks
    ink = morphology.remove_small_objects(raw_ink, max_size=min_ink_px)
    del raw_ink
    if ink.any():
        edge = int(round(s.ink_edge_um / mpp))
        if edge > 0:
            ink = ndi.binary_dilation(ink, structure=morphology.disk(min(edge, 50)))
        margin = int(round(s.ink_margin_um / mpp))
        if margin > 0:
            near = ndi.binary_dilation(ink, structure=morphology.disk(min(margin, 50)))
            rows = np.flatnonzero(near.any(axis=1))
            for y0 in range(int(rows.min()), int(rows.max()) + 1, 256):  # colour test only near the marks
                sl = slice(y0, y0 + 256)
                ink[sl] |= near[sl] & _faint_ink(rgb[sl], s)
            del near
        enclosed = ndi.binary_fill_holes(ink) & ~ink  # inside a circle drawn with the marker
    else:
        enclosed = np.zeros_like(ink)

    hist = np.bincount(sat8[~ink].ravel(), minlength=256)  # Otsu without the (very saturated) ink
    thr = float(threshold_otsu(hist=hist)) / 255.0 if (hist > 0).sum() > 1 else s.sat_min
    thr = min(max(thr, s.sat_min), s.sat_max)
    candidate = (sat8 > thr * 255) | (dark & (sat8 > s.sat_min * 255))  # saturated, or dark and tinted
    del sat8, dark

    tissue = candidate & ~ink
    radius = int(round(s.smooth_um / mpp))
    if radius >= 1:
        r = min(radius, 10)
        fp = morphology.disk(r)
        padded = np.pad(tissue, 2 * r, mode="reflect")  # no erosion artefacts at the image border
        padded = ndi.binary_closing(ndi.binary_opening(padded, structure=fp), structure=fp)
        tissue = padded[2 * r:-2 * r, 2 * r:-2 * r]
    max_hole_px = int(round(s.max_hole_mm2 / px_area_mm2))
    if max_hole_px > 0:
        tissue = morphology.remove_small_holes(tissue, max_size=max_hole_px)
    min_px = int(round(s.min_area_mm2 / px_area_mm2))
    if min_px > 0:
        tissue = morphology.remove_small_objects(tissue, max_size=min_px)
    tissue &= ~ink  # hole filling must not bring ink back
    if return_enclosed:
        return tissue, ink, enclosed
    return tissue, ink


def mask_downsample(slide_dims: tuple[int, int], slide_mpp: float, settings: TissueSettings | None = None,
                    max_downsample: float | None = None) -> float:
    """Downsample (relative to level 0) of the tissue mask: ``mask_mpp``, but the mask's longer side is
    at most ``max_mask_side`` and the downsample at most ``max_downsample`` (e.g. a quarter patch)."""
    s = settings or TissueSettings()
    ds = max(1.0, s.mask_mpp / slide_mpp)
    if max_downsample is not None:
        ds = min(ds, max(1.0, max_downsample))
    return max(ds, max(slide_dims) / s.max_mask_side, 1.0)


def detect_tissue(slide: object, settings: TissueSettings | None = None,
                  max_downsample: float | None = None) -> TissueMask:
    """Tissue and ink masks of a slide (a :class:`~oncofm.pathology.reader.SlideReader`), computed on a
    low-resolution image read from the best pyramid level in chunks."""
    s = settings or TissueSettings()
    ds = mask_downsample(slide.dimensions, slide.mpp, s, max_downsample)  # type: ignore[attr-defined]
    rgb = slide.read_scaled(ds)  # type: ignore[attr-defined]  # (h, w, 3)
    mpp = slide.mpp * ds  # type: ignore[attr-defined]
    tissue, ink, enclosed = detect_tissue_rgb(rgb, mpp, s, return_enclosed=True)
    return TissueMask(tissue=tissue, ink=ink, downsample=ds, mpp=mpp, enclosed=enclosed)
