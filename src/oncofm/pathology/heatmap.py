"""Attention heatmaps over the slide thumbnail, and a gallery of the most attended patches.

Everything is computed at thumbnail resolution: the per-patch scores are splatted onto a (h, w) grid of
the thumbnail (overlapping patches averaged: a running sum and a count), so memory is bounded by the
thumbnail size whatever the slide's size (a 100,000 x 100,000 slide costs the same as a small one).

Scores are percentile-normalised (robust to a few extreme patches), optionally blurred (normalised
convolution, so the tissue edge is not darkened), coloured with a colour map and blended over the
thumbnail with transparency; pixels that no patch covers (background) are left clear. A colour bar is the
legend.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from oncofm.config import StageSettings
from oncofm.errors import OncoFMError

log = logging.getLogger(__name__)

__all__ = ["HeatmapSettings", "draw_heatmap", "normalise_scores", "patch_gallery", "score_grid"]


class HeatmapSettings(StageSettings):
    """How a heatmap is drawn."""

    stage: ClassVar[str] = "heatmap"

    thumb_size: int = Field(1536, ge=64, le=8192, description="longer side of the thumbnail in pixels")
    low_percentile: float = Field(1.0, ge=0, lt=100)
    high_percentile: float = Field(99.0, gt=0, le=100)
    blur: float = Field(0.0, ge=0, description="Gaussian blur sigma, in patch widths (0 = none)")
    cmap: str = "inferno"
    alpha: float = Field(0.55, ge=0, le=1, description="opacity of the colours over the tissue")
    top_k: int = Field(8, ge=0, le=64, description="patches in the gallery")


def score_grid(coords: np.ndarray, scores: np.ndarray, patch_level0: float, level0_dims: tuple[int, int],
               grid_shape: tuple[int, int]) -> np.ndarray:
    """Average per-patch ``scores`` onto a (h, w) grid covering the slide; NaN where no patch lies.

    Parameters
    ----------
    coords
        (N, 2) level-0 (x, y) of each patch's top-left corner.
    patch_level0
        Patch side in level-0 pixels.
    level0_dims
        (width, height) of the slide's level 0.
    grid_shape
        (h, w) of the output (the thumbnail's shape).
    """
    coords = np.asarray(coords, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] != 2 or len(coords) != len(scores):
        raise ValueError(f"coords must be (N, 2) and scores (N,); got {coords.shape} and {scores.shape}")
    h, w = grid_shape
    sx, sy = w / level0_dims[0], h / level0_dims[1]
    total = np.zeros((h, w), np.float64)
    count = np.zeros((h, w), np.float32)
    x0 = np.clip(np.floor(coords[:, 0] * sx).astype(np.int64), 0, w - 1)
    y0 = np.clip(np.floor(coords[:, 1] * sy).astype(np.int64), 0, h - 1)
    x1 = np.clip(np.ceil((coords[:, 0] + patch_level0) * sx).astype(np.int64), x0 + 1, w)
    y1 = np.clip(np.ceil((coords[:, 1] + patch_level0) * sy).astype(np.int64), y0 + 1, h)
    for a, b, c, d, s in zip(y0, y1, x0, x1, scores, strict=True):
        total[a:b, c:d] += s
        count[a:b, c:d] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (total / count).astype(np.float32)
    out[count == 0] = np.nan
    return out


def normalise_scores(values: np.ndarray, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    """Map ``values`` to [0, 1] between their ``low`` and ``high`` percentiles (NaN kept)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return values
    lo, hi = np.percentile(finite, [low, high])
    if hi - lo < 1e-12:
        return np.where(np.isfinite(values), 0.5, np.nan).astype(np.float32)
    return np.clip((values - lo) / (hi - lo), 0, 1).astype(np.float32)


def _blur(grid: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a NaN-holed grid by normalised convolution (background stays NaN)."""
    from scipy.ndimage import gaussian_filter

    valid = np.isfinite(grid)
    num = gaussian_filter(np.where(valid, grid, 0.0), sigma)
    den = gaussian_filter(valid.astype(np.float32), sigma)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (num / den).astype(np.float32)
    out[~valid] = np.nan
    return out


def overlay(thumb: np.ndarray, values01: np.ndarray, cmap: str = "inferno", alpha: float = 0.55) -> np.ndarray:
    """Blend colour-mapped ``values01`` (h, w) over ``thumb`` (h, w, 3); NaN pixels keep the thumbnail."""
    import matplotlib

    colours = matplotlib.colormaps[cmap](np.nan_to_num(values01, nan=0.0))[..., :3]  # (h, w, 3) in [0, 1]
    a = np.where(np.isfinite(values01), alpha, 0.0)[..., None]
    out = thumb.astype(np.float32) / 255.0 * (1 - a) + colours * a
    return (np.clip(out, 0, 1) * 255).astype(np.uint8)


def draw_heatmap(slide: Any, coords: np.ndarray, scores: np.ndarray, patch_level0: float, out_png: str | Path,
                 settings: HeatmapSettings | None = None, *, title: str = "", label: str = "attention",
                 extra_panels: Sequence[tuple[str, np.ndarray]] = ()) -> Path:
    """Draw ``scores`` over ``slide``'s thumbnail and save a PNG (thumbnail | heatmap | extra panels).

    Parameters
    ----------
    slide
        An open slide (:func:`oncofm.pathology.reader.open_slide`): needs ``dimensions`` and ``thumbnail``.
    extra_panels
        (title, (h, w) or (h, w, 3) image) pairs drawn beside the heatmap (e.g. a ground-truth mask).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    from oncofm.io import save_figure

    settings = settings or HeatmapSettings()
    if len(coords) == 0:
        raise OncoFMError("no patches to draw; the slide has no tiles")
    thumb = np.asarray(slide.thumbnail(settings.thumb_size))  # (h, w, 3), bounded by thumb_size
    h, w = thumb.shape[:2]
    grid = score_grid(coords, scores, patch_level0, tuple(slide.dimensions), (h, w))
    if settings.blur > 0:
        px = patch_level0 * w / slide.dimensions[0]
        grid = _blur(grid, settings.blur * px)
    values = normalise_scores(grid, settings.low_percentile, settings.high_percentile)
    blended = overlay(thumb, values, settings.cmap, settings.alpha)

    panels = [("slide", thumb), (label, blended), *extra_panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 5 * h / max(w, 1) + 0.8), squeeze=False)
    for ax, (name, img) in zip(axes[0], panels, strict=True):
        ax.imshow(img, cmap="gray" if np.ndim(img) == 2 else None, interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    bar = fig.colorbar(ScalarMappable(norm=Normalize(0, 1), cmap=settings.cmap), ax=axes[0, 1],
                       fraction=0.046, pad=0.02)
    bar.set_label(f"{label} (percentile {settings.low_percentile:g}–{settings.high_percentile:g}, scaled)")
    if title:
        fig.suptitle(title)
    save_figure(fig, out_png, dpi=100, bbox_inches="tight")
    return Path(out_png)


def patch_gallery(patches: np.ndarray, scores: np.ndarray, out_png: str | Path, *, encoder: Any = None,
                  title: str = "most attended patches") -> Path:
    """A row of the given patches (k, S, S, 3) uint8 with their scores; when ``encoder`` has an
    ``attention_map`` (Swin), a second row shows the encoder's own last-stage attention inside each patch."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import torch

    from oncofm.io import save_figure

    k = len(patches)
    if k == 0:
        raise OncoFMError("no patches for the gallery")
    maps = None
    if encoder is not None and hasattr(encoder, "attention_map"):
        encoder.eval()
        with torch.no_grad():
            x = torch.from_numpy(np.ascontiguousarray(patches)).permute(0, 3, 1, 2).float() / 255.0
            x = x.to(next(encoder.parameters()).device)
            fine = encoder.attention_map(x)[:, None]  # (k, 1, h, w)
            size = patches.shape[1]
            maps = torch.nn.functional.interpolate(fine, size=(size, size), mode="bilinear",
                                                   align_corners=False)[:, 0].cpu().numpy()
    rows = 2 if maps is not None else 1
    fig, axes = plt.subplots(rows, k, figsize=(2.2 * k, 2.4 * rows), squeeze=False)
    for i in range(k):
        axes[0, i].imshow(patches[i])
        axes[0, i].set_title(f"#{i + 1}  {scores[i]:.3g}", fontsize=8)
        axes[0, i].axis("off")
        if maps is not None:
            m = normalise_scores(maps[i], 1, 99)
            axes[1, i].imshow(overlay(patches[i], m, "inferno", 0.5))
            axes[1, i].set_title("Swin attention", fontsize=8)
            axes[1, i].axis("off")
    fig.suptitle(title)
    save_figure(fig, out_png, dpi=100, bbox_inches="tight")
    return Path(out_png)


def heatmaps_for_run(run: str | Path, slides: Sequence[str] | None = None, settings: HeatmapSettings | None = None,
                     out_dir: str | Path | None = None, progress: bool = True) -> list[Path]:
    """Heatmap + top-patch gallery of every (or each named) slide of a run's trained slide model.

    Reads ``models/slide/attention/<slide>.parquet`` and ``tiles/<slide>.h5``; writes
    ``<out_dir>/<slide>_heatmap.png`` and ``<out_dir>/<slide>_top.png`` (default out_dir:
    ``models/slide/heatmaps``). The gallery's second row is the Swin encoder's own last-stage attention
    inside each patch (when the model's encoder is a Swin).
    """
    import pandas as pd

    from oncofm.logging_utils import track
    from oncofm.pathology.slide_train import load_slide_model
    from oncofm.pathology.tiling import load_grid
    from oncofm.paths import RunLayout

    settings = settings or HeatmapSettings()
    layout = RunLayout(run)
    model_dir = layout.model_dir("slide")
    att_dir = layout.require(model_dir / "attention", "Run `oncofm train slide --run RUN` first.")
    out_dir = Path(out_dir) if out_dir else model_dir / "heatmaps"
    stems = list(slides) if slides else sorted(p.stem for p in att_dir.glob("*.parquet"))
    unknown = [s for s in stems if not (att_dir / f"{s}.parquet").exists()]
    if unknown:
        raise OncoFMError(f"no attention for slide(s) {unknown}; known: "
                          f"{', '.join(sorted(p.stem for p in att_dir.glob('*.parquet'))[:10])}")
    model, model_settings = load_slide_model(run)
    written: list[Path] = []
    for stem in track(stems, "heatmaps", enabled=progress):
        att = pd.read_parquet(att_dir / f"{stem}.parquet")
        grid = load_grid(layout.tiles_dir / f"{stem}.h5")
        coords = att[["x", "y"]].to_numpy()
        scores = att["attention"].to_numpy()
        with grid.open(model_settings.slide_mpp) as slide:
            written.append(draw_heatmap(slide, coords, scores, float(grid.attrs["level0_size"]),
                                        out_dir / f"{stem}_heatmap.png", settings, title=stem))
            if settings.top_k:
                lookup = {(int(x), int(y)): i for i, (x, y) in enumerate(grid.coords)}
                top = np.argsort(-scores)[: settings.top_k]
                patches = np.stack([grid.read(slide, lookup[(int(coords[i, 0]), int(coords[i, 1]))])
                                    for i in top])
                written.append(patch_gallery(patches, scores[top], out_dir / f"{stem}_top.png",
                                             encoder=model.encoder, title=f"{stem}: most attended patches"))
    return written
