"""Cell-model designs: a registry of detectors that find nuclei and classify them.

Every design maps RGB uint8 images at :data:`~oncofm.pathology.cells.data.DATA_MPP` to, per image,
``Detections``: points (n, 2) as (x, y) pixels, class indices (n,) into
:data:`~oncofm.pathology.cells.data.CLASSES` and scores (n,) in [0, 1]. It returns every candidate with a
score above ``min_score``; the per-class score thresholds chosen on validation are applied by
:class:`~oncofm.pathology.cells.model.CellModel`, so they are shared by every design.

Designs register here (:func:`register_design`); :mod:`oncofm.pathology.cells.registry` lists and builds
them. A design registers a class with ``fit(train, val, settings, work_dir)`` (a classmethod),
``predict(images, min_score)``, ``save(dir)``, ``load(dir, params)`` (a classmethod) and ``params()``
(its JSON-able configuration, saved in ``config.yaml``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np


@dataclass
class Detections:
    """Cells found in one image: ``points`` (n, 2) (x, y) pixels, ``labels`` (n,) class index, ``scores`` (n,)."""

    points: np.ndarray
    labels: np.ndarray
    scores: np.ndarray

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros((0, 2)), np.zeros(0, np.int64), np.zeros(0))

    def select(self, keep: np.ndarray) -> Detections:
        return Detections(self.points[keep], self.labels[keep], self.scores[keep])

    def __len__(self) -> int:
        return len(self.labels)


class CellDesign(Protocol):
    name: str

    def predict(self, images: list[np.ndarray], min_score: float = 0.0) -> list[Detections]: ...

    def save(self, directory: Path) -> None: ...

    def params(self) -> dict[str, Any]: ...


_DESIGNS: dict[str, type] = {}


def register_design(name: str) -> Callable[[type], type]:
    """Class decorator: register a design under ``name``."""

    def deco(cls: type) -> type:
        if name in _DESIGNS:
            raise ValueError(f"cell design {name!r} is already registered")
        cls.name = name
        _DESIGNS[name] = cls
        return cls

    return deco
