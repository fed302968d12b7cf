"""Lazy patch datasets over tiles ``.h5`` files, safe in DataLoader worker processes.

:class:`PatchDataset` reads patch ``i`` from the slide on demand at the grid's read level (see
:mod:`oncofm.pathology.tiling`) and returns a ``(3, S, S)`` float32 tensor in [0, 1]. The slide handle is
opened lazily and is keyed by process id, so each DataLoader worker (fork or spawn) opens its own handle and
none is pickled. Optional Macenko stain normalisation (numpy, on the uint8 patch) and augmentation
(:class:`PatchAugment`: flips, 90° rotations, colour jitter, on the tensor) are applied in that order, then
``transform`` (e.g. the encoder's mean/std normalisation).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from oncofm.pathology.stain import MacenkoNormalizer
from oncofm.pathology.tiling import load_grid


class PatchAugment:
    """Random flips, 90° rotations and colour jitter on a (3, S, S) float tensor in [0, 1].

    Uses torch's global RNG, which DataLoader seeds differently in every worker.

    Parameters
    ----------
    flip, rotate
        Random horizontal/vertical flips; random multiple of 90° rotation.
    brightness, contrast, saturation
        Maximum relative change (a factor drawn from [1 - v, 1 + v]).
    hue
        Maximum shift of the hue, as a rotation of the colour around the grey axis (fraction of a turn).
    """

    def __init__(self, flip: bool = True, rotate: bool = True, brightness: float = 0.1, contrast: float = 0.1,
                 saturation: float = 0.1, hue: float = 0.02) -> None:
        for name, v in {"brightness": brightness, "contrast": contrast, "saturation": saturation}.items():
            if not 0 <= v < 1:
                raise ValueError(f"{name} must be in [0, 1), got {name}={v}")
        if not 0 <= hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {hue=}")
        self.flip, self.rotate = flip, rotate
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue

    @staticmethod
    def _factor(v: float) -> float:
        import torch

        return float(1.0 + (torch.rand(()) * 2 - 1) * v) if v > 0 else 1.0

    def __call__(self, x: Any) -> Any:
        import torch

        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-2)
        if self.rotate:
            k = int(torch.randint(0, 4, ()))
            if k:
                x = torch.rot90(x, k, dims=(-2, -1))
        if self.brightness > 0:
            x = x * self._factor(self.brightness)
        if self.contrast > 0 or self.saturation > 0:
            gray = 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]  # (S, S)
            if self.contrast > 0:
                x = (x - gray.mean()) * self._factor(self.contrast) + gray.mean()
            if self.saturation > 0:
                x = (x - gray) * self._factor(self.saturation) + gray
        if self.hue > 0:
            x = _rotate_hue(x, float((torch.rand(()) * 2 - 1) * self.hue))
        return x.clamp(0, 1).contiguous()


def _rotate_hue(x: Any, turn: float) -> Any:
    """Rotate colours of (3, S, S) ``x`` around the grey axis by ``turn`` of a full turn (Rodrigues)."""
    import math

    import torch

    theta = 2 * math.pi * turn
    cos, sin = math.cos(theta), math.sin(theta)
    k = 1 / math.sqrt(3)
    # Rotation about the unit vector (1, 1, 1)/sqrt(3).
    a = cos + (1 - cos) / 3
    b = (1 - cos) / 3 - k * sin
    c = (1 - cos) / 3 + k * sin
    rot = torch.tensor([[a, b, c], [c, a, b], [b, c, a]], dtype=x.dtype)
    return torch.einsum("ij,jhw->ihw", rot, x)


class PatchDataset:
    """Patches of one slide, read lazily from the coordinates in a tiles ``.h5``.

    Parameters
    ----------
    h5_path
        A ``<slide>.h5`` written by ``oncofm tile``.
    transform
        Callable applied last to the (3, S, S) float tensor.
    stain_normalizer
        A :class:`~oncofm.pathology.stain.MacenkoNormalizer` (``True`` = the standard reference).
    augment
        A :class:`PatchAugment` (``True`` = defaults), for training.
    slide_mpp
        Level-0 µm/px to open the slide with when its file has none (default: the value saved at tiling).
    as_uint8
        Items as ``(3, S, S)`` uint8 tensors (no augmentation or transform): a quarter of the bytes to pass
        from DataLoader workers; the encoder converts them (feature extraction, :mod:`oncofm.pathology.extract`).

    Items are ``(3, S, S)`` float32 tensors in [0, 1]; :attr:`coords` holds the matching level-0 (x, y).
    """

    def __init__(self, h5_path: str | Path, transform: Callable[[Any], Any] | None = None,
                 stain_normalizer: MacenkoNormalizer | bool | None = None,
                 augment: PatchAugment | bool | None = None, slide_mpp: float | None = None,
                 as_uint8: bool = False) -> None:
        if as_uint8 and (transform is not None or augment):
            raise ValueError("as_uint8 patches take no transform or augmentation (they work on float tensors)")
        self.as_uint8 = as_uint8
        self.grid = load_grid(h5_path)
        self.transform = transform
        self.stain_normalizer = MacenkoNormalizer() if stain_normalizer is True else (stain_normalizer or None)
        self.augment = PatchAugment() if augment is True else (augment or None)
        self.slide_mpp = slide_mpp
        self._slide: Any = None
        self._pid: int | None = None

    @property
    def coords(self) -> np.ndarray:
        """(N, 2) int64 level-0 (x, y)."""
        return self.grid.coords

    @property
    def patch_size(self) -> int:
        return int(self.grid.attrs["patch_size"])

    def __len__(self) -> int:
        return len(self.grid)

    def _handle(self) -> Any:
        pid = os.getpid()
        if self._slide is None or self._pid != pid:
            self._slide = self.grid.open(self.slide_mpp)  # one handle per process (DataLoader worker)
            self._pid = pid
        return self._slide

    def read_rgb(self, index: int) -> np.ndarray:
        """Patch ``index`` as (S, S, 3) uint8, stain-normalised when configured (no augmentation)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"patch index {index} out of range for {len(self)} patches")
        rgb = self.grid.read(self._handle(), int(index) % len(self))
        if self.stain_normalizer is not None:
            rgb = self.stain_normalizer.transform(rgb)
        return rgb

    def __getitem__(self, index: int) -> Any:
        import torch

        rgb = self.read_rgb(index)
        if self.as_uint8:
            return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))  # (3, S, S) uint8
        x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float().div_(255.0)  # (3, S, S)
        if self.augment is not None:
            x = self.augment(x)
        if self.transform is not None:
            x = self.transform(x)
        return x

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_slide"], state["_pid"] = None, None  # never pickle an open slide into a worker
        return state

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()
            self._slide = None
