"""``CellModel``: a trained cell design with its per-class score thresholds, saved in and loaded from a folder.

The folder holds ``config.yaml`` (design name and parameters, thresholds, µm/px, classes, validation
scores), the design's weights (``unet.safetensors``, ``unet_ensemble.safetensors`` or ``classifier.pkl``), ``split.csv`` (the by-patient
split it was trained on) and ``settings.yaml`` (the training stage's resolved settings).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from oncofm.errors import OncoFMError
from oncofm.pathology.cells.data import CLASSES, DATA_MPP
from oncofm.pathology.cells.designs import CellDesign, Detections

CONFIG = "config.yaml"


class CellModel:
    """Detect and classify cells (inflammatory / epithelial / stromal) in RGB images.

    Examples
    --------
    >>> model = CellModel.load("/tmp/cells_run/model")                      # doctest: +SKIP
    >>> dets = model.predict([patch_rgb], mpp=0.5)[0]                       # doctest: +SKIP
    >>> dets.points, dets.labels                                            # doctest: +SKIP
    """

    def __init__(self, design: CellDesign, thresholds: Sequence[float], mpp: float = DATA_MPP,
                 info: dict[str, Any] | None = None) -> None:
        if len(thresholds) != len(CLASSES):
            raise OncoFMError(f"{len(thresholds)} score thresholds for {len(CLASSES)} classes {list(CLASSES)}")
        self.design = design
        self.thresholds = np.asarray(thresholds, np.float64)
        self.mpp = float(mpp)
        self.info = dict(info or {})
        self.classes = CLASSES

    @property
    def design_name(self) -> str:
        return self.design.name

    def predict(self, images: Sequence[np.ndarray], mpp: float | None = None) -> list[Detections]:
        """Cells per image, in that image's pixel coordinates.

        ``images`` are RGB uint8 (h, w, 3) at ``mpp`` µm/px (default: the model's, 0.5); other
        resolutions are resampled to the model's and the points mapped back.
        """
        images = [_check_rgb(im, i) for i, im in enumerate(images)]
        mpp = self.mpp if mpp is None else float(mpp)
        if mpp <= 0:
            raise OncoFMError(f"mpp must be positive µm per pixel, got {mpp}")
        factor = mpp / self.mpp  # > 1: the input is coarser than the model's: upsample
        if abs(factor - 1) > 0.05:
            resized = [_resize(im, factor) for im in images]
        else:
            factor, resized = 1.0, images
        raw = self.design.predict(resized, float(self.thresholds.min()))
        out = []
        for d in raw:
            d = d.select(d.scores >= self.thresholds[d.labels]) if len(d) else d
            if factor != 1.0:
                d = Detections(d.points / factor, d.labels, d.scores)
            out.append(d)
        return out

    def save(self, directory: str | Path) -> Path:
        """Write ``config.yaml`` and the design's weights into ``directory``."""
        from oncofm.io import write_text

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.design.save(directory)
        config = {"design": self.design.name, "params": self.design.params(), "classes": list(CLASSES),
                  "mpp": self.mpp, "thresholds": [float(t) for t in self.thresholds], "info": self.info}
        write_text(yaml.safe_dump(_plain(config), sort_keys=False), directory / CONFIG)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> CellModel:
        """The model saved in ``directory`` (by ``oncofm cells train --out DIR`` or :meth:`save`)."""
        from oncofm.pathology.cells.registry import design_class

        directory = Path(directory)
        path = directory / CONFIG
        if not path.exists():
            raise OncoFMError(f"{path} not found: {directory} is not a cell model folder; train one with "
                              "`oncofm cells train --out DIR`")
        config = yaml.safe_load(path.read_text()) or {}
        if list(config.get("classes", [])) != list(CLASSES):
            raise OncoFMError(f"{path} has classes {config.get('classes')}, this code expects {list(CLASSES)}; "
                              "retrain the cell model")
        design = design_class(config["design"]).load(directory, config["params"])
        return cls(design, config["thresholds"], config.get("mpp", DATA_MPP), config.get("info"))


def _check_rgb(im: np.ndarray, i: int) -> np.ndarray:
    im = np.asarray(im)
    if im.ndim != 3 or im.shape[2] != 3 or im.dtype != np.uint8:
        raise OncoFMError(f"patch {i}: expected an RGB uint8 array (h, w, 3), got {im.dtype} {im.shape}; "
                          "drop an alpha channel with rgb[..., :3] and convert with .astype(np.uint8)")
    if min(im.shape[:2]) < 8:
        raise OncoFMError(f"patch {i} is {im.shape[1]} x {im.shape[0]} px; cells need patches of 8 px or more")
    return im


def _resize(im: np.ndarray, factor: float) -> np.ndarray:
    from PIL import Image

    h, w = im.shape[:2]
    size = (max(8, round(w * factor)), max(8, round(h * factor)))
    return np.asarray(Image.fromarray(im).resize(size, Image.BILINEAR))


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
