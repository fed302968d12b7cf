"""QC image of a tiled slide: thumbnail, tissue outline (green), ink outline (red), areas ink encloses
(yellow), kept patches (blue)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from oncofm.io import atomic_path

if TYPE_CHECKING:
    from oncofm.pathology.reader import SlideReader
    from oncofm.pathology.tiling import GridPlan
    from oncofm.pathology.tissue import TissueMask


def write_qc_png(slide: SlideReader, masks: TissueMask, coords: np.ndarray, plan: GridPlan, target: Path,
                 max_size: int = 1024) -> Path:
    """Thumbnail with the tissue outline (green), ink (red), what ink encloses (yellow) and the kept patch grid
    (blue boxes)."""
    from PIL import Image, ImageDraw
    from scipy import ndimage as ndi

    ds = max(1.0, max(slide.dimensions) / max_size)
    thumb = Image.fromarray(slide.read_scaled(ds))
    tw, th = thumb.size

    def outline(mask: np.ndarray) -> np.ndarray:
        small = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((tw, th), Image.NEAREST)) > 0
        return small & ~ndi.binary_erosion(small, iterations=2)

    arr = np.asarray(thumb).copy()
    arr[outline(masks.tissue)] = (0, 200, 0)
    arr[outline(masks.ink)] = (230, 0, 0)
    if masks.enclosed is not None and masks.enclosed.any():
        arr[outline(masks.enclosed)] = (240, 200, 0)
    img = Image.fromarray(arr)
    draw = ImageDraw.Draw(img)
    side = plan.level0_size / ds
    for x, y in coords:
        x0, y0 = x / ds, y / ds
        draw.rectangle([x0, y0, x0 + side, y0 + side], outline=(30, 60, 230))
    with atomic_path(target, suffix=".png") as tmp:
        img.save(tmp, format="PNG", compress_level=1)  # fast; QC images are not archived
    return target
