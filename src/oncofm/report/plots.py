"""Figures of the report (matplotlib, Agg backend): attention heatmap, gene bars, cohort risk + KM.

Every function returns PNG bytes (to embed as a data URI) or writes a PNG. The heatmap works at
thumbnail resolution only, so memory stays bounded whatever the slide's size.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from oncofm.explain.context import CohortContext
    from oncofm.pathology.predict import TiledSlide

RISK_COLOR = "#c0392b"
PROTECTIVE_COLOR = "#2471a3"


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:  # noqa: ANN001
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def attention_map(tiled: TiledSlide, attention: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel attention at thumbnail resolution (the slide stage's ``score_grid`` + ``normalise_scores``).

    Overlapping patches are averaged, values are scaled between their 1st and 99th percentiles. Returns
    ``(scores, covered)``: float (h, w) in [0, 1] (0 where uncovered) and a bool mask of covered pixels.
    """
    from oncofm.pathology.heatmap import normalise_scores, score_grid

    h, w = tiled.thumbnail.shape[:2]
    grid = score_grid(tiled.coords, np.asarray(attention, dtype=np.float64), tiled.patch_side_level0,
                      tiled.level0_size, (h, w))  # (h, w), NaN where no patch lies
    values = normalise_scores(grid)
    covered = np.isfinite(values)
    return np.where(covered, values, 0.0), covered


def heatmap_figure(tiled: TiledSlide, attention: np.ndarray, with_thumbnail: bool = False,
                   cmap: str = "inferno", alpha: float = 0.55):  # noqa: ANN201
    """The attention overlaid on the thumbnail (background left clear) with a colour bar."""
    plt = _plt()
    scores, covered = attention_map(tiled, attention)
    ncols = 2 if with_thumbnail else 1
    aspect = tiled.thumbnail.shape[1] / tiled.thumbnail.shape[0]
    fig, axes = plt.subplots(1, ncols, figsize=(5.2 * aspect * ncols + 0.8, 5.2), squeeze=False)
    if with_thumbnail:
        axes[0, 0].imshow(tiled.thumbnail)
        axes[0, 0].set_title("H&E")
    ax = axes[0, -1]
    ax.imshow(tiled.thumbnail)
    masked = np.ma.masked_where(~covered, scores)
    im = ax.imshow(masked, cmap=cmap, alpha=alpha, vmin=0, vmax=1, interpolation="nearest")
    ax.set_title("attention (scaled within slide)")
    for a in axes.ravel():
        a.set_axis_off()
    cb = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    cb.set_label("attention (1st–99th percentile, scaled)")
    return fig


def heatmap_overlay_png(tiled: TiledSlide, attention: np.ndarray) -> bytes:
    return _png(heatmap_figure(tiled, attention))


def save_heatmap_png(tiled: TiledSlide, attention: np.ndarray, path: str | Path) -> Path:
    """``heatmap.png``: the slide stage's heatmap (:func:`oncofm.pathology.heatmap.draw_heatmap`): the
    thumbnail beside the attention overlay, with a colour bar."""
    from oncofm.pathology.heatmap import HeatmapSettings, draw_heatmap
    from oncofm.pathology.reader import open_slide

    with open_slide(tiled.path, mpp=tiled.mpp) as slide:
        return draw_heatmap(slide, tiled.coords, np.asarray(attention, dtype=np.float64), tiled.patch_side_level0,
                            Path(path), HeatmapSettings(thumb_size=1024), title=f"{tiled.path.name}: attention")


def thumbnail_jpeg(tiled: TiledSlide, quality: int = 88) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(tiled.thumbnail[..., :3])).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def gene_bars_png(attributions: pd.DataFrame, top: int = 15, *, label: str = "gene",
                  title: str = "Top contributing genes: red raises risk, blue lowers it") -> bytes:
    """Signed horizontal bars of the rows with the largest |attribution| (red: towards death), labelled by
    the ``label`` column (genes; image features in words)."""
    plt = _plt()
    df = attributions.head(top).iloc[::-1]
    names = [n if len(n) <= 60 else n[:57] + "..." for n in df[label].astype(str)]
    fig, ax = plt.subplots(figsize=(6.4 if label == "gene" else 8.4, 0.32 * len(df) + 1.2))
    colors = [RISK_COLOR if v > 0 else PROTECTIVE_COLOR for v in df["attribution"]]
    ax.barh(names, df["attribution"], color=colors)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("contribution to 5-year death risk (attribution)")
    ax.set_title(title, fontsize=10)
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)


def layer_bars_png(contributions: pd.DataFrame) -> bytes:
    """One signed bar per input of the omics model (``input, contribution``: expression, copy number,
    mutations summed over their features; stage and grade by occlusion), on the logit scale."""
    plt = _plt()
    labels = {"expression": "gene expression", "cnv": "copy number", "mutation": "mutations", "stage": "stage",
              "grade": "grade"}
    df = contributions.iloc[::-1]
    fig, ax = plt.subplots(figsize=(6.4, 0.42 * len(df) + 1.2))
    ax.barh([labels.get(str(n), str(n)) for n in df["input"]], df["contribution"],
            color=[RISK_COLOR if v > 0 else PROTECTIVE_COLOR for v in df["contribution"]])
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("contribution to the 5-year death logit")
    ax.set_title("Contribution of each input: red raises risk, blue lowers it", fontsize=10)
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)


def cohort_png(ctx: CohortContext) -> bytes:
    """Left: the training cohort's risk distribution with the patient marked. Right: KM split at that risk."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10.5, 3.8))
    ax1.hist(ctx.risks, bins=min(30, max(8, len(ctx.risks) // 8)), color="#95a5a6", edgecolor="white")
    ax1.plot(ctx.risks, np.full(len(ctx.risks), -0.02 * ax1.get_ylim()[1]), "|", color="#555555",
             markersize=6, alpha=0.5, clip_on=False)
    ax1.axvline(ctx.patient_risk, color=RISK_COLOR, lw=2, label=f"this patient ({ctx.patient_risk:.2f})")
    ax1.set_xlabel(f"{ctx.model} model: P(death within 5 years)")
    ax1.set_ylabel("training patients")
    ax1.set_title(f"{ctx.cancer_type} training cohort (n={len(ctx.risks)}); "
                  f"higher than {100 * ctx.percentile:.0f}%", fontsize=10)
    ax1.legend(frameon=False, fontsize=8)
    _km_panel(ax2, ctx)
    fig.tight_layout()
    return _png(fig)


def _km_panel(ax, ctx: CohortContext) -> None:  # noqa: ANN001
    from lifelines import KaplanMeierFitter

    years = ctx.times_days / 365.25
    high = ctx.risks >= ctx.patient_risk
    for mask, label, color in ((~high, "risk below this patient's", PROTECTIVE_COLOR),
                               (high, "risk at or above this patient's", RISK_COLOR)):
        if mask.sum() == 0:
            continue
        kmf = KaplanMeierFitter()
        kmf.fit(years[mask], ctx.events[mask], label=f"{label} (n={int(mask.sum())})")
        kmf.plot_survival_function(ax=ax, ci_show=mask.sum() >= 10, color=color)
    ax.axvline(5, color="#555555", ls=":", lw=1)
    ax.set_xlabel("years since diagnosis")
    ax.set_ylabel("overall survival")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"Kaplan–Meier, {ctx.cancer_type} training cohort split at this patient's risk", fontsize=10)
    ax.legend(frameon=False, fontsize=8, loc="lower left")


def patch_jpeg(rgb: np.ndarray, size: int = 160) -> bytes:
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(rgb[..., :3])).resize((size, size))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()
