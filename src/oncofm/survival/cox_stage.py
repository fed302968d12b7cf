"""The ``cox`` stage: univariate Cox per gene per cancer type on the training split -> coefficients.parquet.

For each cancer type, every gene's normalised expression (per-cancer-type robust z-scores from
``cohort/normalization.parquet``, so a coefficient is a log hazard ratio per robust SD within that
cancer type) is fitted against overall survival administratively censored at the horizon
(:func:`oncofm.survival.endpoints.censor_at_horizon`), with :class:`~oncofm.survival.cox.BatchedCoxPH`.
A pan-cancer row per gene (``cancer_type == "__pan__"``) comes from the same model stratified by cancer
type. q-values are Benjamini–Hochberg within each cancer type (and within ``__pan__``).
Only training-split patients are used: the table never sees validation or test outcomes.

Layers (``layer`` column): ``expression`` as above; ``cnv`` — the cohort's copy number as given (tcga13:
GISTIC-style levels −2..2, so a coefficient is the log hazard ratio per copy-number level) — and
``mutation`` — 0/1 mutation status (a coefficient is the log hazard ratio of carriers vs. non-carriers).
For ``cnv`` and ``mutation``: a feature a cancer type's cohort does not measure has no row; fewer than
``min_carriers`` patients with a non-zero value (carriers, or patients with a copy-number change) gives
NaN with the note ``too few carriers``; a separated fit (the plain likelihood monotone, e.g. no carrier
died) is re-estimated with Firth's penalised partial likelihood (``separation="firth"``, note ``firth: ...``,
penalised likelihood-ratio p) or left NaN (``separation="exclude"``). q is BH within layer and cancer type.
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
from oncofm.survival.cox import (
    NOTE_FEW_CARRIERS,
    NOTE_FIRTH,
    NOTE_MISSING,
    NOTE_SEPARATION,
    BatchedCoxPH,
    ConvergenceWarning,
    firth_cox,
)
from oncofm.survival.endpoints import censor_at_horizon
from oncofm.survival.fdr import bh_by_group

log = logging.getLogger(__name__)

COLUMNS = ("gene", "layer", "cancer_type", "horizon_years", "coef", "se", "z", "p", "q", "n", "events",
           "converged", "note")
LAYERS = ("expression", "cnv", "mutation")
EXPRESSION = "expression"


def layer_rows(table: pd.DataFrame, layer: str = EXPRESSION) -> pd.DataFrame:
    """The rows of one layer (a table written before layers existed is all expression)."""
    if "layer" not in table.columns:
        if layer != EXPRESSION:
            return table.iloc[0:0]
        return table
    return table[table["layer"].astype(str) == layer]


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
    layers: list[Literal["expression", "cnv", "mutation"]] = Field(
        default_factory=lambda: list(LAYERS), description="omics layers to screen (those the cohort has)")
    min_carriers: int = Field(10, ge=1, description="cnv/mutation: fewer patients with a non-zero value gives NaN")
    separation: Literal["firth", "exclude"] = Field(
        "firth", description="cnv/mutation: a separated fit is re-estimated with Firth's penalised likelihood "
        "or excluded (NaN)")
    redo: bool = False


def fit_coefficients(expression: pd.DataFrame, time: np.ndarray, event: np.ndarray, cancer_types: np.ndarray,
                     *, horizon_years: float | None = 5.0, ties: str = "efron", min_events: int = 10,
                     pan_cancer: bool = True, tol: float = 1e-9, max_iter: int = 50, memory_mb: float = 512.0,
                     n_jobs: int = 1, progress: bool = True, layer: str = EXPRESSION,
                     min_carriers: int | None = None, separation: str | None = None) -> pd.DataFrame:
    """The coefficient table (columns :data:`COLUMNS`) for patients × features ``expression`` of one ``layer``.

    ``min_carriers``: features with fewer patients with a non-zero value (within the fit) get NaN and the
    note ``too few carriers``; ``separation="firth"`` re-estimates separated fits with
    :func:`~oncofm.survival.cox.firth_cox`, ``"exclude"`` leaves them NaN; ``None`` (expression) does neither.

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
        strata = cancer_types[rows] if stratified else None
        res = BatchedCoxPH(**est).fit(x, t[rows], e[rows], strata=strata)
        s = res.summary_.reset_index(drop=True)
        if min_carriers is not None or separation is not None:
            s = _rare_and_separated(s, x, t[rows], e[rows], strata, min_carriers, separation, ties)
        s.insert(0, "gene", genes[cols])
        s.insert(1, "layer", layer)
        s.insert(2, "cancer_type", label)
        return s

    with warnings.catch_warnings():  # set once for every thread; counted below instead
        warnings.simplefilter("ignore", ConvergenceWarning)
        with ThreadPoolExecutor(max_workers=max(1, n_jobs)) as pool:
            parts = list(track(pool.map(fit, tasks), "Cox fits (per cancer type, then pan-cancer blocks)",
                               total=len(tasks), enabled=progress))
    table = pd.concat(parts, ignore_index=True)
    if layer != EXPRESSION:  # a feature the cancer type's cohort does not measure: no row
        table = table[~table["note"].astype(str).str.startswith(NOTE_MISSING)].reset_index(drop=True)
    table.insert(3, "horizon_years", float(horizon_years) if horizon_years is not None else np.nan)
    table["q"] = bh_by_group(table, "cancer_type")
    table = table[list(COLUMNS)]
    table["n"] = table["n"].astype(np.int64)
    table["events"] = table["events"].astype(np.int64)
    notes = Counter(str(n).split(" (")[0] for n in table["note"] if n)
    if notes:
        detail = ", ".join(f"{c} {k}" for k, c in notes.most_common())
        log.warning("%s: %d of %d feature × cancer-type fits have a note (NaN unless 'firth'): %s",
                    layer, sum(notes.values()), len(table), detail)
    return table


def _rare_and_separated(s: pd.DataFrame, x: np.ndarray, t: np.ndarray, e: np.ndarray, strata: np.ndarray | None,
                        min_carriers: int | None, separation: str | None, ties: str) -> pd.DataFrame:
    """Rare features → NaN with a note; separated ones → Firth estimates (or NaN, 'exclude'), with notes."""
    s = s.copy()
    note = s["note"].astype(str).to_numpy(dtype=object)
    measured = ~pd.Series(note).astype(str).str.startswith(NOTE_MISSING).to_numpy()
    if min_carriers is not None:
        carriers = (np.nan_to_num(np.asarray(x, dtype=np.float64), nan=0.0) != 0).sum(axis=0)
        few = (carriers < min_carriers) & measured
        for col in ("coef", "se", "z", "p"):
            s.loc[few, col] = np.nan
        s.loc[few, "converged"] = False
        note[few] = [f"{NOTE_FEW_CARRIERS} ({int(k)} < min_carriers={min_carriers})" for k in carriers[few]]
    sep = pd.Series(note).str.startswith(NOTE_SEPARATION).to_numpy()
    if sep.any() and separation == "firth":
        fit = firth_cox(np.asarray(x)[:, sep], t, e, strata, ties=ties)
        ok = np.isfinite(fit.coef)
        idx = np.flatnonzero(sep)
        for col, values in (("coef", fit.coef), ("se", fit.se), ("z", fit.z), ("p", fit.p)):
            s.loc[idx[ok], col] = values[ok]
        s.loc[idx[ok], "converged"] = True
        note[idx[ok]] = [f"{NOTE_FIRTH}: {n} -> Firth-penalised estimate, penalised likelihood-ratio p"
                         for n in note[idx[ok]]]
    elif sep.any() and separation == "exclude":
        note[sep] = [f"{n}; excluded (separation=exclude)" for n in note[sep]]
    s["note"] = note.astype(str)
    return s


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
    common = dict(horizon_years=settings.horizon_years, ties=settings.ties, min_events=settings.min_events,
                  pan_cancer=settings.pan_cancer, tol=settings.tol, max_iter=settings.max_iter,
                  memory_mb=settings.memory_mb, n_jobs=settings.n_jobs)
    parts = []
    for layer in settings.layers:
        if layer == EXPRESSION:
            x, p = expression, patients
        else:
            x, p = _layer_inputs(settings.run, layer, patients)
            if x is None:
                log.info("layer %s: the cohort has no %s table; skipped", layer, layer)
                continue
        ev = p[Col.OS_EVENT].to_numpy(dtype=float)
        log.info("layer %s: fitting %d features × %d cancer types on %d training patients (%d deaths), OS "
                 "censored at %g years", layer, x.shape[1], p[Col.CANCER].nunique(), len(p), int(ev.sum()),
                 settings.horizon_years)
        extra = {} if layer == EXPRESSION else dict(min_carriers=settings.min_carriers,
                                                    separation=settings.separation)
        parts.append(fit_coefficients(x, p[Col.OS_DAYS].to_numpy(dtype=float), ev, p[Col.CANCER].to_numpy(),
                                      layer=layer, **common, **extra))
    if not parts:
        raise OncoFMError(f"no layer to fit: the cohort has none of {settings.layers}; import expression first")
    table = pd.concat(parts, ignore_index=True)
    if table["coef"].notna().sum() == 0:
        raise OncoFMError("no Cox model could be fitted (every gene × cancer type failed; see the notes "
                          f"in the log); lower --min-events (now {settings.min_events}) or check the survival data")
    out = {"coefficients": write_parquet(table, layout.coefficients, index=False)}
    if settings.plots:
        from oncofm.survival.plots import plot_heatmap, plot_volcanoes

        expr_rows = layer_rows(table, EXPRESSION)
        if len(expr_rows):
            out.update(plot_volcanoes(expr_rows, layout.cox_dir))
            out["heatmap"] = plot_heatmap(expr_rows, layout.cox_dir / "heatmap_top_genes.png",
                                          n_genes=settings.heatmap_genes)
    settings.save(settings_path)
    for (layer, ct), part in table.groupby(["layer", "cancer_type"]):
        log.info("%-10s %-8s %4d features with q < 0.05 (n=%d, events=%d)", layer, ct, int((part["q"] < 0.05).sum()),
                 int(part["n"].max()), int(part["events"].max()))
    return out


def significant_counts(table: pd.DataFrame, q_max: float = 0.05) -> pd.DataFrame:
    """Features with ``q < q_max`` per layer (rows) and cancer type (columns), with a ``total`` of distinct features."""
    t = table if "layer" in table else table.assign(layer=EXPRESSION)
    sig = t[t["q"] < q_max]
    counts = sig.groupby(["layer", "cancer_type"]).size().unstack(fill_value=0)
    counts["any type (distinct)"] = sig.groupby("layer")["gene"].nunique()
    return counts.reindex([lay for lay in LAYERS if lay in t["layer"].unique()]).fillna(0).astype(int)


def _layer_inputs(run: str | Path, layer: str, patients: pd.DataFrame) -> tuple[pd.DataFrame | None, pd.DataFrame]:
    """The training patients' raw ``cnv`` / ``mutation`` matrix (rows the cohort has) and their patient rows."""
    from oncofm.cohort.importing import load_matrix

    layout = RunLayout(run)
    if not getattr(layout, layer).exists():
        return None, patients
    m = load_matrix(run, layer)
    ids = patients.index.intersection(m.index)
    if len(ids) == 0:
        return None, patients
    x = m.loc[ids]
    if layer == "mutation":
        values = x.to_numpy()
        bad = np.isfinite(values) & ~np.isin(values, (0.0, 1.0))
        if bad.any():
            r, c = np.nonzero(bad)
            raise DataValidationError("mutation status must be 0/1 (or missing)", file=str(layout.mutation),
                                      column=str(x.columns[c[0]]), rows=[str(x.index[i]) for i in r[:5]])
    return x, patients.loc[ids]


def load_coefficients(run: str | Path, layer: str | None = EXPRESSION) -> pd.DataFrame:
    """The run's coefficient table (raises with a hint when ``oncofm cox`` has not run).

    ``layer``: the rows of one layer — ``"expression"`` by default, so readers written before layers existed
    keep getting one row per gene and cancer type — or ``None`` for every layer.
    """
    layout = RunLayout(run)
    layout.require(layout.coefficients, "Run `oncofm cox --run RUN` first.")
    table = pd.read_parquet(layout.coefficients)
    return table if layer is None else layer_rows(table, layer).reset_index(drop=True)
