"""``oncofm cohort summary``: per-cancer-type counts, coverage and Kaplan–Meier plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from oncofm.cohort.importing import load_matrix, load_patients
from oncofm.cohort.schema import Col, five_year_labels
from oncofm.io import write_parquet
from oncofm.paths import RunLayout


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


def summarize_cohort(run: str | Path, console: Console | None = None) -> pd.DataFrame:
    layout = RunLayout(run)
    patients = load_patients(run)
    expression = load_matrix(run)
    table = summary_table(patients, expression)
    write_parquet(table, layout.cohort_dir / "summary.parquet", index=False)
    table.to_csv(layout.cohort_dir / "summary.csv", index=False)
    console = console or Console()
    t = Table(title=f"Cohort summary: {layout.root}")
    for c in table.columns:
        t.add_column(c, justify="left" if c == Col.CANCER else "right")
    for _, r in table.iterrows():
        t.add_row(*[f"{v:.3f}" if isinstance(v, float) and not float(v).is_integer() else str(v) for v in r])
    console.print(t)
    return table
