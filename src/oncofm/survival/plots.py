"""Plots of the Cox table: a volcano plot per cancer type and a heatmap of top genes across cancer types."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from oncofm.cohort.schema import PAN_CANCER
from oncofm.io import save_figure

__all__ = ["plot_heatmap", "plot_volcano", "plot_volcanoes", "top_genes"]


def _pyplot():  # noqa: ANN202 - matplotlib's module
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "type"


def plot_volcano(part: pd.DataFrame, path: str | Path, title: str, q_max: float = 0.05,
                 n_labels: int = 8) -> Path:
    """Volcano plot of one cancer type's rows: coef (log HR per SD) vs -log10 p, q < q_max highlighted."""
    plt = _pyplot()
    ok = part.dropna(subset=["coef", "p"])
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=110)
    y = -np.log10(np.clip(ok["p"].to_numpy(), 1e-300, 1))
    sig = (ok["q"] < q_max).to_numpy()
    ax.scatter(ok["coef"][~sig], y[~sig], s=6, c="0.65", lw=0, label=f"q ≥ {q_max:g}")
    ax.scatter(ok["coef"][sig], y[sig], s=9, c=np.where(ok["coef"][sig] > 0, "#c0392b", "#2471a3"), lw=0,
               label=f"q < {q_max:g} ({int(sig.sum())})")
    for _, row in ok.assign(y=y).nsmallest(n_labels, "p").iterrows():
        ax.annotate(row["gene"], (row["coef"], row["y"]), fontsize=7, xytext=(3, 2), textcoords="offset points")
    ax.axvline(0, c="0.8", lw=0.8)
    failed = len(part) - len(ok)
    ax.set_xlabel("Cox coefficient (log hazard ratio per SD of expression)")
    ax.set_ylabel("-log10 p (Wald)")
    n = int(part["n"].max()) if len(part) else 0
    ev = int(part["events"].max()) if len(part) else 0
    ax.set_title(f"{title}: n={n}, events={ev}, {len(ok)} genes fitted, {failed} failed", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", frameon=False)
    fig.tight_layout()
    path = Path(path)
    save_figure(fig, path)
    return path


def plot_volcanoes(table: pd.DataFrame, out_dir: str | Path) -> dict[str, Path]:
    """One ``volcano_<cancer type>.png`` per cancer type (and ``__pan__``) of a coefficient table."""
    out = {}
    for ct, part in table.groupby("cancer_type", sort=True):
        out[f"volcano_{ct}"] = plot_volcano(part, Path(out_dir) / f"volcano_{_safe(str(ct))}.png", str(ct))
    return out


def top_genes(table: pd.DataFrame, n: int, q_max: float = 0.05) -> list[str]:
    """``n`` genes for the heatmap, balanced across cancer types.

    Round-robin over cancer types: each takes its next most significant gene (smallest q, then largest
    |z|) with q < ``q_max`` not yet chosen; when no type has one left, the list is topped up with the
    genes of smallest q anywhere.
    """
    per = table[table["cancer_type"] != PAN_CANCER].dropna(subset=["q"])
    if per.empty:
        per = table.dropna(subset=["q"])
    ranked = per.assign(absz=per["z"].abs()).sort_values(["q", "absz"], ascending=[True, False])
    queues = {ct: part.loc[part["q"] < q_max, "gene"].tolist() for ct, part in ranked.groupby("cancer_type")}
    chosen: list[str] = []
    while len(chosen) < n and any(queues.values()):
        for ct in sorted(queues):
            queue = queues[ct]
            while queue and queue[0] in chosen:
                queue.pop(0)
            if queue and len(chosen) < n:
                chosen.append(queue.pop(0))
    for gene in ranked["gene"]:
        if len(chosen) >= n:
            break
        if gene not in chosen:
            chosen.append(gene)
    return chosen


def plot_heatmap(table: pd.DataFrame, path: str | Path, n_genes: int = 40) -> Path:
    """Heatmap of coefficients, top genes × cancer types; significant cells (q < 0.05) marked with a dot."""
    plt = _pyplot()
    genes = top_genes(table, n_genes)
    coef = table.pivot_table(index="gene", columns="cancer_type", values="coef", aggfunc="first", dropna=False)
    q = table.pivot_table(index="gene", columns="cancer_type", values="q", aggfunc="first", dropna=False)
    cols = sorted(c for c in coef.columns if c != PAN_CANCER) + ([PAN_CANCER] if PAN_CANCER in coef.columns else [])
    coef = coef.reindex(index=genes, columns=cols)
    q = q.reindex(index=genes, columns=cols)
    vmax = float(np.nanpercentile(np.abs(coef.to_numpy()), 98)) if np.isfinite(coef.to_numpy()).any() else 1.0
    fig, ax = plt.subplots(figsize=(1.0 + 0.38 * len(cols), 1.5 + 0.2 * len(genes)), dpi=110)
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="0.85")
    im = ax.imshow(np.ma.masked_invalid(coef.to_numpy()), cmap=cmap, vmin=-vmax, vmax=vmax, aspect="auto")
    yy, xx = np.nonzero(q.to_numpy() < 0.05)
    ax.scatter(xx, yy, s=6, c="k", marker="o", lw=0)
    ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=7)
    ax.set_yticks(range(len(genes)), genes, fontsize=6)
    ax.set_title("Cox coefficient (log HR per SD); genes: most significant per cancer type, in turn;\n"
                 "• q < 0.05; grey = no estimate", fontsize=8)
    fig.colorbar(im, ax=ax, shrink=0.5)
    fig.tight_layout()
    path = Path(path)
    save_figure(fig, path)
    return path
