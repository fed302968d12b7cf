"""Nucleus candidates from the hematoxylin channel, and peak finding in heatmaps.

The hematoxylin concentration comes from colour deconvolution with the reference H&E stain vectors of
:mod:`oncofm.pathology.stain` (optical density projected on the stain matrix's pseudo-inverse). Nuclei
are dark blobs of hematoxylin about 6-16 px (3-8 µm) across at 0.5 µm/px: the scale-normalised
Laplacian of Gaussian (LoG), maximised over a few scales, peaks at their centres.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from oncofm.pathology.stain import REFERENCE_STAINS, rgb_to_od

_UNMIX = np.linalg.pinv(REFERENCE_STAINS)  # (2, 3): OD -> (hematoxylin, eosin) concentrations


def stain_channels(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hematoxylin and eosin concentration maps (h, w) float32 of an RGB uint8 image (reference stains)."""
    od = rgb_to_od(rgb).astype(np.float32)
    conc = od @ _UNMIX.T.astype(np.float32)
    return np.clip(conc[..., 0], 0, None), np.clip(conc[..., 1], 0, None)


def log_response(channel: np.ndarray, sigmas: tuple[float, ...] = (2.5, 3.5, 4.5)) -> np.ndarray:
    """Blob response (h, w): the largest ``-sigma**2 * LoG`` over ``sigmas`` (bright blobs of ``channel``)."""
    channel = channel.astype(np.float32)
    return np.max([-(s ** 2) * ndi.gaussian_laplace(channel, s) for s in sigmas], axis=0)


def find_peaks(heat: np.ndarray, threshold: float, min_distance: int = 3) -> np.ndarray:
    """(x, y) pixel coordinates (n, 2) of the local maxima of ``heat`` above ``threshold``.

    A pixel is a peak when it equals the maximum of its ``(2 * min_distance + 1)`` square; of a flat plateau
    only the first pixel in raster order is kept.
    """
    heat = np.asarray(heat, np.float32)
    size = 2 * int(min_distance) + 1
    peak = (heat == ndi.maximum_filter(heat, size=size, mode="constant", cval=-np.inf)) & (heat > threshold)
    lab, n = ndi.label(peak)
    if n == 0:
        return np.zeros((0, 2), np.float64)
    if n == int(peak.sum()):
        ys, xs = np.nonzero(peak)
    else:  # plateaus: one point per connected flat maximum
        idx = ndi.minimum(np.arange(peak.size).reshape(peak.shape), lab, index=np.arange(1, n + 1))
        ys, xs = np.unravel_index(np.asarray(idx, np.int64), peak.shape)
    return np.stack([xs, ys], axis=1).astype(np.float64)


def nucleus_candidates(rgb: np.ndarray, threshold: float = 0.15, min_distance: int = 4,
                       sigmas: tuple[float, ...] = (2.5, 3.5, 4.5)) -> np.ndarray:
    """Candidate nucleus centres (n, 2) as (x, y): LoG peaks of the hematoxylin channel above ``threshold``."""
    h, _ = stain_channels(rgb)
    return find_peaks(log_response(ndi.gaussian_filter(h, 1.0), sigmas), threshold, min_distance)
