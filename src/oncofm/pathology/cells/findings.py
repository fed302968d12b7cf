"""Cell findings of patches: counts, densities and fractions per class, and the top patches against the slide.

``cell_findings`` runs a :class:`~oncofm.pathology.cells.model.CellModel` on patches and measures each one;
``compare_findings`` pools the most attended patches and all of a slide's patches (counts summed, areas
summed: a density is cells per mm² of the pooled patch area) and gives each measure's ratio to the slide.
These are the model's estimates; its measured accuracy is in ``docs/cells.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from oncofm.errors import OncoFMError
from oncofm.pathology.cells.data import CLASSES


@dataclass
class CellFindings:
    """Cells in one patch (or pooled over patches): ``counts`` per class, the patch ``area_mm2``,
    ``densities_per_mm2`` per class (and ``all``), ``fractions`` per class (of all detected cells; 0 when
    there are none) and ``n_patches`` pooled."""

    counts: dict[str, int]
    area_mm2: float
    densities_per_mm2: dict[str, float] = field(default_factory=dict)
    fractions: dict[str, float] = field(default_factory=dict)
    n_patches: int = 1

    @classmethod
    def from_counts(cls, counts: dict[str, int], area_mm2: float, n_patches: int = 1) -> CellFindings:
        if area_mm2 <= 0:
            raise OncoFMError(f"patch area must be positive, got {area_mm2} mm²")
        total = sum(counts.values())
        dens = {c: counts[c] / area_mm2 for c in CLASSES}
        dens["all"] = total / area_mm2
        frac = {c: (counts[c] / total if total else 0.0) for c in CLASSES}
        return cls(dict(counts), float(area_mm2), dens, frac, n_patches)

    @property
    def n_cells(self) -> int:
        return int(sum(self.counts.values()))

    def to_dict(self) -> dict:
        return {**asdict(self), "n_cells": self.n_cells}


def cell_findings(model: object, patches: Sequence[np.ndarray], mpp: float) -> list[CellFindings]:
    """Per patch: cells counted per class, densities per mm² and class fractions.

    Parameters
    ----------
    model
        A loaded :class:`~oncofm.pathology.cells.model.CellModel`.
    patches
        RGB uint8 arrays (h, w, 3), e.g. a slide's most attended 224 px patches.
    mpp
        Their µm per pixel (0.5 for the tiler's default patches); the model resamples other resolutions.
    """
    if not hasattr(model, "predict"):
        raise OncoFMError(f"cell_findings needs a CellModel (CellModel.load(dir)), got {type(model).__name__}")
    if mpp is None or not mpp > 0:
        raise OncoFMError(f"mpp must be the patches' positive µm per pixel, got {mpp}")
    patches = list(patches)
    if not patches:
        return []
    dets = model.predict(patches, mpp)
    out = []
    for patch, d in zip(patches, dets, strict=True):
        h, w = patch.shape[:2]
        area = h * w * (mpp * 1e-3) ** 2  # mm²
        counts = {c: int(np.sum(d.labels == k)) for k, c in enumerate(CLASSES)}
        out.append(CellFindings.from_counts(counts, area))
    return out


def pool_findings(findings: Sequence[CellFindings]) -> CellFindings:
    """The findings of several patches as one region: counts and areas summed."""
    if not findings:
        raise OncoFMError("no patch findings to pool; pass the findings of at least one patch")
    counts = {c: sum(f.counts[c] for f in findings) for c in CLASSES}
    return CellFindings.from_counts(counts, sum(f.area_mm2 for f in findings),
                                    sum(f.n_patches for f in findings))


#: (key, what it measures in words, unit, how to read it from pooled findings)
MEASURES: tuple[tuple[str, str, str], ...] = (
    ("inflammatory_density", "inflammatory cells (lymphocytes, plasma cells) per mm²", "cells/mm²"),
    ("epithelial_fraction", "tumour-cell (epithelial) fraction of cells", "fraction"),
    ("stromal_fraction", "stromal-cell fraction of cells", "fraction"),
    ("inflammatory_fraction", "inflammatory-cell fraction of cells", "fraction"),
    ("epithelial_density", "tumour (epithelial) cells per mm²", "cells/mm²"),
    ("stromal_density", "stromal cells per mm²", "cells/mm²"),
    ("cell_density", "cells per mm² (all classes)", "cells/mm²"),
)


def _measure(f: CellFindings, key: str) -> float:
    if key == "cell_density":
        return f.densities_per_mm2["all"]
    cls, kind = key.rsplit("_", 1)
    return f.densities_per_mm2[cls] if kind == "density" else f.fractions[cls]


@dataclass
class CellMeasure:
    """One measure in the top patches and in the slide, with ``ratio`` = top / slide (``None`` when the
    slide's value is 0)."""

    key: str
    description: str
    unit: str
    top: float
    slide: float
    ratio: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def compare_findings(top_patches_findings: Sequence[CellFindings], all_patches_findings: Sequence[CellFindings]
                     ) -> dict[str, CellMeasure]:
    """Each measure of :data:`MEASURES` in the pooled top patches against the pooled slide, with the ratio.

    ``all_patches_findings`` are the findings of every patch of the slide (or a sample of them), the top
    patches included; e.g. ``ratio`` 3.1 for ``inflammatory_density``: the most attended regions hold 3.1x
    the slide's density of inflammatory cells.
    """
    top, slide = pool_findings(top_patches_findings), pool_findings(all_patches_findings)
    out = {}
    for key, description, unit in MEASURES:
        a, b = _measure(top, key), _measure(slide, key)
        ratio = a / b if b > 0 and math.isfinite(a) else None
        out[key] = CellMeasure(key, description, unit, float(a), float(b), ratio)
    return out
