"""Macenko stain normalisation (Macenko et al., ISBI 2009) in numpy.

An H&E image is modelled in optical density (OD = -ln(I / I0), natural log as in the original code) as ``OD = C @ S.T``: per pixel, the
concentrations ``C`` (n, 2) of two stains whose unit OD vectors are the columns of ``S`` (3, 2). Macenko
estimates ``S`` from the plane of the two largest principal directions of the (non-background) OD cloud,
taking the extreme angles (``alpha`` and ``100 - alpha`` percentiles) in that plane as the two stains, and
normalises an image by re-expressing its concentrations, scaled to the reference's 99th percentile, with
the reference stain vectors.

Defaults are the reference stain matrix and maximum concentrations used by the original implementation
(and by most re-implementations), so ``MacenkoNormalizer()`` works without fitting a target image.
"""

from __future__ import annotations

import numpy as np

from oncofm.errors import OncoFMError

#: Reference H&E stain vectors (columns: hematoxylin, eosin) and 99th-percentile concentrations.
REFERENCE_STAINS = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])
REFERENCE_MAX_C = np.array([1.9705, 1.0308])


def rgb_to_od(rgb: np.ndarray, io: float = 240.0) -> np.ndarray:
    """Optical density (natural log) (..., 3) float64 of uint8 RGB; ``io`` is the background (glass) intensity."""
    return -np.log((rgb.astype(np.float64) + 1.0) / io)


def estimate_stains(rgb: np.ndarray, io: float = 240.0, beta: float = 0.15, alpha: float = 1.0
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Stain vectors (3, 2) (hematoxylin, eosin columns; unit norm) and max concentrations (2,) of ``rgb``.

    Raises
    ------
    OncoFMError
        Too few stained pixels (e.g. a blank patch) to estimate the stains.
    """
    od = rgb_to_od(rgb.reshape(-1, 3), io)  # (n, 3)
    tissue = od[np.all(od > beta, axis=1)]
    if len(tissue) < 100:
        raise OncoFMError(f"only {len(tissue)} stained pixels; Macenko needs tissue to estimate stains")
    _, eigvecs = np.linalg.eigh(np.cov(tissue.T))
    plane = eigvecs[:, 1:3]  # (3, 2): two largest principal directions
    proj = tissue @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, alpha), np.percentile(phi, 100 - alpha)
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    v1, v2 = (v1 if v1.sum() >= 0 else -v1), (v2 if v2.sum() >= 0 else -v2)  # OD vectors are positive
    # Hematoxylin absorbs red most strongly relative to eosin: larger first (R) component.
    stains = np.stack([v1, v2], axis=1) if v1[0] > v2[0] else np.stack([v2, v1], axis=1)
    stains /= np.linalg.norm(stains, axis=0, keepdims=True)
    conc = np.linalg.lstsq(stains, tissue.T, rcond=None)[0]  # (2, n)
    max_c = np.percentile(conc, 99, axis=1)
    return stains, max_c


class MacenkoNormalizer:
    """Map images onto a reference H&E appearance.

    Examples
    --------
    >>> norm = MacenkoNormalizer()            # standard reference
    >>> norm.fit(target_rgb)                  # doctest: +SKIP  (or a chosen target image)
    >>> out = norm.transform(patch_rgb)       # doctest: +SKIP  (h, w, 3) uint8
    """

    def __init__(self, io: float = 240.0, beta: float = 0.15, alpha: float = 1.0) -> None:
        self.io, self.beta, self.alpha = io, beta, alpha
        self.stains_ = REFERENCE_STAINS.copy()
        self.max_c_ = REFERENCE_MAX_C.copy()

    def fit(self, target_rgb: np.ndarray) -> MacenkoNormalizer:
        """Use ``target_rgb``'s stains and concentrations as the reference."""
        self.stains_, self.max_c_ = estimate_stains(target_rgb, self.io, self.beta, self.alpha)
        return self

    def transform(self, rgb: np.ndarray, fallback: bool = True) -> np.ndarray:
        """Normalised copy of ``rgb`` (h, w, 3) uint8. With ``fallback``, images without enough stained
        pixels (background patches) are returned unchanged instead of raising."""
        try:
            stains, max_c = estimate_stains(rgb, self.io, self.beta, self.alpha)
        except OncoFMError:
            if fallback:
                return rgb
            raise
        h, w, _ = rgb.shape
        od = rgb_to_od(rgb.reshape(-1, 3), self.io)  # (n, 3)
        conc = np.linalg.lstsq(stains, od.T, rcond=None)[0]  # (2, n)
        conc *= (self.max_c_ / np.maximum(max_c, 1e-6))[:, None]
        out = self.io * np.exp(-(self.stains_ @ conc))  # (3, n)
        return np.clip(out.T, 0, 255).reshape(h, w, 3).astype(np.uint8)
