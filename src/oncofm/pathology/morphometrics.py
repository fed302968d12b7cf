"""Per-patch morphometrics: interpretable numbers used later as words in the explanation.

For an RGB H&E patch at a known resolution (µm/px), :func:`patch_morphometrics` returns

- ``tissue_fraction`` — share of the patch's pixels that are tissue (HSV saturation > ``sat_threshold`` and
  not near-white), in [0, 1];
- ``hematoxylin_od`` / ``eosin_od`` — mean optical density of the hematoxylin (nuclei, blue-purple) and eosin
  (cytoplasm/stroma, pink) channels over tissue pixels, from Ruifrok & Johnston colour deconvolution
  (:func:`skimage.color.rgb2hed`; units are those of ``rgb2hed``: OD = -log10(I/255) projected onto the
  stain vectors, ≈ 0 for glass, ~0.05–0.3 for typical H&E);
- ``hematoxylin_fraction`` — share of tissue pixels whose hematoxylin OD exceeds the nuclear threshold
  (nuclear area fraction);
- ``nuclei_count`` — connected components of the thresholded hematoxylin channel with a nucleus-like area
  (``min_nucleus_um2``–``max_nucleus_um2``; touching nuclei count once, so this is a lower-bound proxy);
- ``nuclei_density`` — ``nuclei_count`` per mm² of tissue (NaN when the patch has no tissue). Cellular
  tumour regions typically give several thousand per mm², stroma a few hundred.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

#: Keys returned by :func:`patch_morphometrics`, in a stable order.
MORPHOMETRIC_KEYS = ("tissue_fraction", "hematoxylin_od", "eosin_od", "hematoxylin_fraction", "nuclei_count",
                     "nuclei_density")


def patch_morphometrics(rgb: np.ndarray, mpp: float = 0.5, *, sat_threshold: float = 0.07,
                        white_value: float = 0.92, nuclear_od: float | None = None,
                        min_nucleus_um2: float = 12.0, max_nucleus_um2: float = 500.0) -> dict[str, float]:
    """Morphometrics of one patch (see module docstring).

    Parameters
    ----------
    rgb
        (h, w, 3) uint8 RGB patch.
    mpp
        Microns per pixel of the patch (the tiling target mpp).
    nuclear_od
        Hematoxylin OD above which a pixel is nuclear; default: Otsu on the tissue pixels' hematoxylin OD,
        clamped to [0.04, 0.15] so a patch without nuclei does not split its stroma in two.
    """
    from scipy import ndimage as ndi
    from skimage.color import rgb2hed
    from skimage.filters import threshold_otsu

    from oncofm.pathology.tissue import rgb_to_hsv

    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"expected an (h, w, 3) RGB patch, got shape {rgb.shape}")
    _, sat, val = rgb_to_hsv(rgb)
    tissue = (sat > sat_threshold) & ~((val > white_value) & (sat < 2 * sat_threshold))
    n_tissue = int(tissue.sum())
    out: dict[str, float] = dict.fromkeys(MORPHOMETRIC_KEYS, 0.0)
    out["tissue_fraction"] = n_tissue / tissue.size
    if n_tissue == 0:
        out["nuclei_density"] = math.nan
        return out
    hed = rgb2hed(rgb)  # (h, w, 3): hematoxylin, eosin, DAB optical densities
    h_od, e_od = hed[..., 0], hed[..., 1]
    out["hematoxylin_od"] = float(h_od[tissue].mean())
    out["eosin_od"] = float(e_od[tissue].mean())
    if nuclear_od is None:
        vals = h_od[tissue]
        thr = float(threshold_otsu(vals)) if np.ptp(vals) > 0 else 0.15
        nuclear_od = min(max(thr, 0.04), 0.15)
    nuclear = (h_od > nuclear_od) & tissue
    out["hematoxylin_fraction"] = float(nuclear.sum() / n_tissue)
    nuclear = ndi.binary_opening(nuclear, structure=np.ones((2, 2), bool))
    labels, n = ndi.label(nuclear)
    if n:
        areas = np.bincount(labels.ravel())[1:] * mpp**2  # µm²
        count = int(((areas >= min_nucleus_um2) & (areas <= max_nucleus_um2)).sum())
    else:
        count = 0
    out["nuclei_count"] = float(count)
    out["nuclei_density"] = count / (n_tissue * (mpp / 1000.0) ** 2)
    return out


def grid_morphometrics(h5_path: str, indices: Any = None, mpp: float | None = None) -> Any:
    """Morphometrics of the patches of a tiles ``.h5`` (all, or ``indices``) as a DataFrame with ``x, y``."""
    import pandas as pd

    from oncofm.pathology.tiling import load_grid

    grid = load_grid(h5_path)
    idx = np.arange(len(grid)) if indices is None else np.asarray(indices)
    rows = []
    with grid.open(mpp) as slide:
        for i in idx:
            m = patch_morphometrics(grid.read(slide, int(i)), mpp=float(grid.attrs["target_mpp"]))
            rows.append({"x": int(grid.coords[i, 0]), "y": int(grid.coords[i, 1]), **m})
    return pd.DataFrame(rows, columns=["x", "y", *MORPHOMETRIC_KEYS])
