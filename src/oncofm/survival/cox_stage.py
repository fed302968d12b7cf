"""The ``cox`` stage: univariate Cox per gene per cancer type on the training split -> coefficients.parquet.

For each cancer type, every gene's normalised expression (per-cancer-type robust z-scores from
``cohort/normalization.parquet``, so a coefficient is a log hazard ratio per robust SD within that
cancer type) is fitted against overall survival administratively censored at the horizon
(:func:`oncofm.survival.endpoints.censor_at_horizon`), with :class:`~oncofm.survival.cox.BatchedCoxPH`.
A pan-cancer row per gene (``cancer_type == "__pan__"``) comes from the same model stratified by cancer
type. q-values are Benjamini–Hochberg within each cancer type (and within ``__pan__``).
Only training-split patients are used: the table never sees validation or test outcomes.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from oncofm.cohort.schema import PAN_CANCER, SPLIT_COL, Col
from oncofm.config import StageSettings
from oncofm.errors import DataValidationError, OncoFMError
from oncofm.io import write_parquet
from oncofm.logging_utils import track
from oncofm.paths import RunLayout
from oncofm.survival.cox import BatchedCoxPH, ConvergenceWarning
from oncofm.survival.endpoints import censor_at_horizon
from oncofm.survival.fdr import bh_by_group

log = logging.getLogger(__name__)

COLUMNS = ("gene", "cancer_type", "horizon_years", "coef", "se", "z", "p", "q", "n", "events", "converged",
           "note")


class CoxSettings(StageSettings):
    """Settings of ``oncofm cox``."""

    stage: ClassVar[str] = "cox"

    run: str
    horizon_years: float = Field(5.0, gt=0, le=30, description="administrative censoring horizon (3 or 5)")
    ties: Literal["efron", "breslow"] = "efron"
    min_events: int = Field(10, ge=1, description="cancer types (genes) with fewer events get NaN")
    pan_cancer: bool = Field(True, description="also fit the model stratified by cancer type (__pan__ rows)")
    tol: float = Field(1e-9, gt=0, description="Newton step below which a gene has converged")
    max_iter: int = Field(50, ge=1)
    memory_mb: float = Field(512.0, gt=0, description="working-memory budget of one gene chunk")
    n_jobs: int = Field(2, ge=1, description="threads for the per-type fits (each uses memory_mb)")
    plots: bool = True
    heatmap_genes: int = Field(40, ge=2, description="genes shown in the cross-cancer heatmap")
    redo: bool = False


def fit_coefficients(expression: pd.DataFrame, time: np.ndarray, event: np.ndarray, cancer_types: np.ndarray,
                     *, horizon_years: float | None = 5.0, ties: str = "efron", min_events: int = 10,
                     pan_cancer: bool = True, tol: float = 1e-9, max_iter: int = 50, memory_mb: float = 512.0,
                     n_jobs: int = 1, progress: bool = True) -> pd.DataFrame:
    """The coefficient table (columns :data:`COLUMNS`) for patients × genes ``expression``.

    ``time`` (days), ``event`` and ``cancer_types`` are aligned with the rows of ``expression``;
    survival is censored at ``horizon_years`` first. The per-cancer-type fits and gene blocks of the
    pan-cancer fit run on ``n_jobs`` threads (numpy releases the GIL in the array work). Failed fits
    keep NaN and a note; one warning per call counts them.
    """
    from concurrent.futures import ThreadPoolExecutor

    t, e = censor_at_horizon(time, event, horizon_years)
    cancer_types = np.asarray(cancer_types).astype(str)
    values = expression.to_numpy()
    if values.dtype not in (np.float32, np.float64):
        values = values.astype(np.float32)
    genes = expression.columns.astype(str)
    est = dict(ties=ties, min_events=min_events, tol=tol, max_iter=max_iter, memory_mb=memory_mb)

    # tasks: (label, patient rows, gene slice, stratified?)
    tasks: list[tuple[str, np.ndarray, slice, bool]] = [
        (ct, np.flatnonzero(cancer_types == ct), slice(None), False) for ct in sorted(set(cancer_types))]
    if pan_cancer:
        block = 1000
        tasks += [(PAN_CANCER, np.arange(len(t)), slice(i, i + block), True) for i in range(0, len(genes), block)]

    def fit(task: tuple[str, np.ndarray, slice, bool]) -> pd.DataFrame:
        label, rows, cols, stratified = task
        x = values[:, cols] if stratified else values[rows]
        res = BatchedCoxPH(**est).fit(x, t[rows], e[rows], strata=cancer_types[rows] if stratified else None)
        s = res.summary_.reset_index(drop=True)
        s.insert(0, "gene", genes[cols])
        s.insert(1, "cancer_type", label)
        return s

    with warnings.catch_warnings():  # set once for every thread; counted below instead
        warnings.simplefilter("ignore", ConvergenceWarning)
        with ThreadPoolExecutor(max_workers=max(1, n_jobs)) as pool:
            parts = list(track(pool.map(fit, tasks), "Cox fits (per cancer type, then pan-cancer blocks)",
                               total=len(tasks), enabled=progress))
    table = pd.concat(parts, ignore_index=True)
    table.insert(2, "horizon_years", float(horizon_years) if horizon_years is not None else np.nan)
    table["q"] = bh_by_group(table, "cancer_type")
    table = table[list(COLUMNS)]
    table["n"] = table["n"].astype(np.int64)
    table["events"] = table["events"].astype(np.int64)
    notes = Counter(str(n).split(" (")[0] for n in table["note"] if n)
    if notes:
        detail = ", ".join(f"{c} {k}" for k, c in notes.most_common())
        log.warning("%d of %d gene × cancer-type fits have no estimate (NaN, reason in 'note'): %s",
                    sum(notes.values()), len(table), detail)
    return table


def _training_inputs(run: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Normalised expression and patient rows of the training split, aligned."""
    from oncofm.cohort.importing import load_patients
    from oncofm.cohort.normalize import load_normalized_expression
    from oncofm.cohort.splits import load_splits

    patients = load_patients(run).set_index(Col.PATIENT)
    splits = load_splits(run).set_index(Col.PATIENT)
    train = splits.index[splits[SPLIT_COL] == "train"]
    expression = load_normalized_expression(run)
    train = train.intersection(expression.index).intersection(patients.index)
    if len(train) == 0:
        raise DataValidationError("no training patients with expression; check cohort/splits.parquet",
                                  file=str(RunLayout(run).splits), column=SPLIT_COL)
    return expression.loc[train], patients.loc[train]


def run_cox(settings: CoxSettings) -> dict[str, Path]:
    """Fit the table on the training split, write ``cox/coefficients.parquet`` and plots; return paths."""
    layout = RunLayout(settings.run)
    settings_path = layout.settings_file(settings.stage)
    from oncofm.config import check_stage

    if check_stage(settings, settings_path, [layout.coefficients], on_change="redo"):  # changed: warns, refits
        log.info("%s exists with the same settings; skipping (pass --redo to refit)", layout.coefficients)
        return {"coefficients": layout.coefficients}
    expression, patients = _training_inputs(settings.run)
    events = patients[Col.OS_EVENT].to_numpy(dtype=float)
    log.info("fitting %d genes × %d cancer types on %d training patients (%d deaths), OS censored at %g years",
             expression.shape[1], patients[Col.CANCER].nunique(), len(patients), int(events.sum()),
             settings.horizon_years)
    table = fit_coefficients(expression, patients[Col.OS_DAYS].to_numpy(dtype=float), events,
                             patients[Col.CANCER].to_numpy(), horizon_years=settings.horizon_years,
                             ties=settings.ties, min_events=settings.min_events, pan_cancer=settings.pan_cancer,
                             tol=settings.tol, max_iter=settings.max_iter, memory_mb=settings.memory_mb,
                             n_jobs=settings.n_jobs)
    if table["coef"].notna().sum() == 0:
        raise OncoFMError("no Cox model could be fitted (every gene × cancer type failed; see the notes "
                          f"in the log); lower --min-events (now {settings.min_events}) or check the survival data")
    out = {"coefficients": write_parquet(table, layout.coefficients, index=False)}
    if settings.plots:
        from oncofm.survival.plots import plot_heatmap, plot_volcanoes

        out.update(plot_volcanoes(table, layout.cox_dir))
        out["heatmap"] = plot_heatmap(table, layout.cox_dir / "heatmap_top_genes.png", n_genes=settings.heatmap_genes)
    settings.save(settings_path)
    for ct, part in table.groupby("cancer_type"):
        log.info("%-8s %4d genes with q < 0.05 (n=%d, events=%d)", ct, int((part["q"] < 0.05).sum()),
                 int(part["n"].max()), int(part["events"].max()))
    return out


def load_coefficients(run: str | Path) -> pd.DataFrame:
    """The run's coefficient table (raises with a hint when ``oncofm cox`` has not run)."""
    layout = RunLayout(run)
    layout.require(layout.coefficients, "Run `oncofm cox --run RUN` first.")
    return pd.read_parquet(layout.coefficients)
