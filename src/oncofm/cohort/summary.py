"""``oncofm cohort summary``: per-cancer-type counts, coverage, soft problems and Kaplan–Meier plots.

Writes ``summary.csv``/``summary.parquet`` (one row per cancer type and an ``ALL`` row),
``soft_problems.json`` and ``km_by_cancer_type.png`` (one Kaplan–Meier panel per cancer type, overall
survival in years, the 5-year horizon marked) into ``RUN/cohort/``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from oncofm.cohort.importing import load_matrix, load_patients
from oncofm.cohort.schema import Col, five_year_labels, soft_problems
from oncofm.io import atomic_path, save_figure, write_json, write_parquet
from oncofm.paths import RunLayout
from oncofm.survival.endpoints import DAYS_PER_YEAR


def summary_table(patients: pd.DataFrame, expression: pd.DataFrame) -> pd.DataFrame:
    """One row per cancer type (and a total row)."""
    label = five_year_labels(patients).to_numpy()
    df = patients.assign(_label=label)
    gene_cov = expression.notna().groupby(patients.set_index(Col.PATIENT)[Col.CANCER].reindex(expression.index)).mean()
    rows = []
    for cancer, g in [*df.groupby(Col.CANCER), ("ALL", df)]:
        known = g["_label"].notna()
        cov = gene_cov.loc[cancer] if cancer in gene_cov.index else expression.notna().mean()
        rows.append({
            Col.CANCER: cancer, "patients": len(g), "deaths": int(g[Col.OS_EVENT].sum()),
            "median_followup_days": float(np.median(g[Col.OS_DAYS])),
            "label_5y_known": int(known.sum()), "label_5y_coverage": float(known.mean()),
            "dead_by_5y": int((g["_label"] == 1).sum()),
            "genes_measured": int((cov > 0.5).sum()), "gene_coverage": float(cov.mean()),
        })
    return pd.DataFrame(rows)


def kaplan_meier(time: np.ndarray, event: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Product-limit estimate: the distinct event/censoring times (with 0 first) and S(t) just after each."""
    time = np.asarray(time, dtype=float)
    event = np.asarray(event, dtype=float)
    times = np.unique(time)
    at_risk = np.array([(time >= t).sum() for t in times])
    deaths = np.array([((time == t) & (event == 1)).sum() for t in times])
    surv = np.cumprod(1.0 - deaths / np.maximum(at_risk, 1))
    return np.concatenate([[0.0], times]), np.concatenate([[1.0], surv])


def plot_km_grid(patients: pd.DataFrame, path: str | Path, years: float = 5.0) -> Path:
    """One Kaplan–Meier panel per cancer type (overall survival), saved as one PNG grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted(patients[Col.CANCER].unique())
    ncol = min(5, len(groups))
    nrow = math.ceil(len(groups) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.6 * nrow), squeeze=False, sharey=True)
    for ax, cancer in zip(axes.ravel(), groups, strict=False):
        g = patients[patients[Col.CANCER] == cancer]
        t, s = kaplan_meier(g[Col.OS_DAYS].to_numpy() / DAYS_PER_YEAR, g[Col.OS_EVENT].to_numpy())
        ax.step(t, s, where="post", color="tab:blue", lw=1.4)
        ax.axvline(years, color="grey", ls="--", lw=0.8)
        s5 = s[np.searchsorted(t, years, side="right") - 1]
        ax.set_title(f"{cancer} (n={len(g)}, {int(g[Col.OS_EVENT].sum())} deaths)\nS({years:g}y)={s5:.2f}",
                     fontsize=9)
        ax.set_ylim(0, 1.02)
        ax.set_xlim(0, max(years * 2, 1))
        ax.grid(alpha=0.3)
        ax.set_xlabel("years", fontsize=8)
    for ax in axes.ravel()[len(groups):]:
        ax.axis("off")
    for row in axes:
        row[0].set_ylabel("overall survival", fontsize=8)
    fig.suptitle("Kaplan–Meier overall survival by cancer type", fontsize=11)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    return Path(path)


def summarize_cohort(run: str | Path, console: Console | None = None) -> pd.DataFrame:
    """Print and save the per-cancer-type summary, the soft-problem counts and the KM plot grid."""
    layout = RunLayout(run)
    patients = load_patients(run)
    expression = load_matrix(run)
    table = summary_table(patients, expression)
    write_parquet(table, layout.cohort_dir / "summary.parquet", index=False)
    with atomic_path(layout.cohort_dir / "summary.csv") as tmp:
        table.to_csv(tmp, index=False)
    soft = soft_problems(patients, expression)
    notes_path = layout.cohort_dir / "import_notes.json"
    notes = json.loads(notes_path.read_text()).get("notes", []) if notes_path.exists() else []
    write_json({"soft_problems": soft, "import_notes": notes}, layout.cohort_dir / "soft_problems.json")
    km = plot_km_grid(patients, layout.cohort_dir / "km_by_cancer_type.png")
    console = console or Console(width=max(Console().width, 150))
    t = Table(title=f"Cohort summary: {layout.root}")
    for c in table.columns:
        t.add_column(c, justify="left" if c == Col.CANCER else "right")
    for _, r in table.iterrows():
        t.add_row(*[f"{v:.3f}" if isinstance(v, float) and not float(v).is_integer() else str(v) for v in r])
    console.print(t)
    console.print("Soft problems (not fatal): " + ", ".join(f"{k}={v}" for k, v in soft.items()))
    for note in notes:
        console.print(f"  import note: {note}")
    console.print(f"Kaplan–Meier plots: {km}")
    return table
