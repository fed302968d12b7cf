"""The ``features`` stage: gene selection from the training-split Cox table, and the (N, G, 2) pair tensor.

Each patient becomes ``G`` tokens, one per selected gene: ``(expression_g, coef_{g, cancer type})`` —
the patient's normalised expression of the gene and that gene's univariate Cox coefficient in the
patient's cancer type (``oncofm cox``). The tensor and its orders are the omics model's input
(docs/CONTRACTS.md):

- ``features/pairs.npy``: float32 (N, G, 2); ``[..., 0]`` expression (NaN -> 0, the training median),
  ``[..., 1]`` coefficient (NaN, i.e. a failed fit, -> 0: no evidence);
- ``features/genes.txt`` (G lines, tensor order), ``features/patients.txt`` (N lines, every patient);
- ``features/selection.parquet``: the ranking that chose the genes.

Gene selection (:func:`select_genes`) uses only the coefficient table, which ``oncofm cox`` fits on the
training split, so validation and test patients never influence which genes are used. A gene is
*prognostic in a cancer type* when its q-value there is ``<= q_max``; genes are ranked by

1. the number of cancer types (counting the stratified pan-cancer model as one more) where they are
   prognostic, descending;
2. their smallest q over those rows, ascending;
3. their largest |z|, descending (then the gene name, for a deterministic order),

and the first ``top_k`` are kept. When fewer than ``top_k`` genes are prognostic anywhere, ``fill``
(the default) tops the list up with the next genes of the same ranking, and the log says how many
passed. The tensor lists the genes in this rank order.

A patient whose cancer type has no coefficients (unseen in training, or every fit failed there, e.g.
too few events) gets the pan-cancer coefficients (``__pan__`` rows), with a warning that counts them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
from pydantic import Field

from oncofm.cohort.schema import PAN_CANCER, Col
from oncofm.config import StageSettings
from oncofm.errors import DataValidationError, OncoFMError
from oncofm.io import atomic_path, write_parquet, write_text
from oncofm.paths import RunLayout

log = logging.getLogger(__name__)

__all__ = ["FeatureSettings", "build_pairs", "feature_paths", "load_pair_features", "run_features", "select_genes"]



class FeatureSettings(StageSettings):
    """Settings of ``oncofm features``."""

    stage: ClassVar[str] = "features"

    run: str
    top_k: int = Field(256, ge=1, description="number of genes (tokens per patient)")
    q_max: float = Field(0.05, gt=0, le=1, description="q-value at or below which a gene counts as prognostic")
    fill: bool = Field(True, description="top up with next-best genes when fewer than top_k pass q_max")
    redo: bool = False


def feature_paths(run: str | Path) -> dict[str, Path]:
    """Where the stage writes: pairs, genes, patients, selection."""
    d = RunLayout(run).features_dir
    return {"pairs": d / "pairs.npy", "genes": d / "genes.txt", "patients": d / "patients.txt",
            "selection": d / "selection.parquet"}


def _check_table(coefficients: pd.DataFrame) -> None:
    need = {"gene", "cancer_type", "coef", "z", "q"}
    missing = need - set(coefficients.columns)
    if missing:
        raise DataValidationError(f"coefficient table lacks column(s) {sorted(missing)}", file="coefficients")
    if "horizon_years" in coefficients and coefficients["horizon_years"].nunique() > 1:
        raise DataValidationError("coefficient table mixes horizons "
                                  f"{sorted(coefficients['horizon_years'].unique())}; keep one horizon's rows",
                                  file="coefficients", column="horizon_years")


def select_genes(coefficients: pd.DataFrame, top_k: int = 256, q_max: float = 0.05,
                 fill: bool = True) -> pd.DataFrame:
    """Rank genes by prognostic evidence across cancer types; return the selected ones, best first.

    Returns a DataFrame (index ``gene``, in selection order) with ``n_prognostic`` (cancer types, plus
    the pan-cancer row, with q <= q_max), ``min_q``, ``max_abs_z``, ``passed`` (n_prognostic >= 1)
    and ``rank`` (0-based). See the module docstring for the rule.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k=}")
    if not 0 < q_max <= 1:
        raise ValueError(f"q_max must lie in (0, 1], got {q_max=}")
    _check_table(coefficients)
    ok = coefficients.dropna(subset=["q", "z"])
    if ok.empty:
        raise OncoFMError("the coefficient table has no fitted genes (every fit failed); rerun `oncofm cox` "
                          "with a lower --min-events or check the survival data")
    stats = ok.assign(sig=ok["q"] <= q_max, absz=ok["z"].abs()).groupby("gene").agg(
        n_prognostic=("sig", "sum"), min_q=("q", "min"), max_abs_z=("absz", "max"))
    stats["n_prognostic"] = stats["n_prognostic"].astype(int)
    stats["passed"] = stats["n_prognostic"] >= 1
    order = stats.reset_index().sort_values(["n_prognostic", "min_q", "max_abs_z", "gene"],
                                            ascending=[False, True, False, True], kind="mergesort")
    n_pass = int(stats["passed"].sum())
    if n_pass < top_k:
        msg = f"{n_pass} genes have q <= {q_max:g} in some cancer type (asked for {top_k})"
        if fill:
            log.warning("%s; filling up with the next-best genes by smallest q", msg)
        else:
            log.warning("%s; keeping only those (pass --fill to top up)", msg)
            order = order[order["passed"]]
    chosen = order.head(top_k).set_index("gene")
    chosen["rank"] = np.arange(len(chosen))
    if chosen.empty:
        raise OncoFMError(f"no gene has q <= {q_max:g} in any cancer type; raise --q-max or pass --fill")
    return chosen


def build_pairs(expression_normalized: pd.DataFrame, cancer_types: pd.Series, coefficients: pd.DataFrame,
                genes: list[str], *, layer: str = "expression", fill: bool = True) -> np.ndarray:
    """The (N, G, 2) float32 pair tensor for any patients (training, test, or new at inference).

    Parameters
    ----------
    expression_normalized : DataFrame (patients × genes)
        Normalised expression (``oncofm.cohort.normalize``); genes it lacks become 0 (with a warning).
    cancer_types : Series
        Cancer type per patient, indexed like ``expression_normalized``.
    coefficients : DataFrame
        The ``cox/coefficients.parquet`` table (one horizon).
    genes : list of str
        Gene order of the tensor (``features/genes.txt``).

    layer : str
        The coefficient table's layer to pair with (``expression``; ``cnv`` / ``mutation`` for their matrices).
    fill : bool
        ``True``: missing values become 0 (expression: the training median); ``False`` keeps NaN (the omics
        model masks those tokens: cnv / mutation not measured).

    Returns
    -------
    ndarray of shape (N, G, 2), float32
        ``[..., 0]`` expression (NaN -> 0), ``[..., 1]`` coefficient for the patient's cancer type
        (NaN -> 0; a type without coefficients uses ``__pan__``).
    """
    from oncofm.survival.cox_stage import layer_rows

    coefficients = layer_rows(coefficients, layer)
    _check_table(coefficients)
    genes = list(genes)
    absent = [g for g in genes if g not in expression_normalized.columns]
    if absent and fill:
        log.warning("%d of %d genes are missing from the expression (set to 0): %s", len(absent), len(genes),
                    ", ".join(absent[:10]))
    x = expression_normalized.reindex(columns=genes).to_numpy(dtype=np.float32)        # (N, G)
    coef = coefficients.pivot_table(index="cancer_type", columns="gene", values="coef", aggfunc="first",
                                    dropna=False).reindex(columns=genes)                # (types, G)
    fitted = [c for c in coef.index if c != PAN_CANCER and coef.loc[c].notna().any()]
    types = cancer_types.reindex(expression_normalized.index)
    types = types.astype(object).where(types.notna(), "<missing>").astype(str).to_numpy()
    unseen = sorted(set(types) - set(fitted))
    if unseen:
        counts = {t: int((types == t).sum()) for t in unseen}
        if PAN_CANCER in coef.index:
            log.warning("cancer type(s) without coefficients %s (patients: %s): using the pan-cancer "
                        "coefficients", unseen, counts)
        else:
            log.warning("cancer type(s) without coefficients %s (patients: %s) and no pan-cancer row: "
                        "coefficients set to 0", unseen, counts)
    lookup = {t: i for i, t in enumerate(coef.index)}
    table = np.nan_to_num(coef.to_numpy(dtype=np.float32), nan=0.0)                      # (types, G)
    table = np.vstack([table, np.zeros((1, len(genes)), np.float32)])                      # last row: zeros
    fallback = lookup.get(PAN_CANCER, len(table) - 1)
    row = np.array([lookup[t] if t in fitted else fallback for t in types], dtype=np.int64)  # (N,)
    out = np.empty((len(x), len(genes), 2), dtype=np.float32)                              # (N, G, 2)
    out[..., 0] = np.nan_to_num(x, nan=0.0) if fill else x
    out[..., 1] = table[row]
    return out


def run_features(settings: FeatureSettings) -> dict[str, Path]:
    """Select genes from the run's Cox table and write the pair tensor for every patient."""
    from oncofm.cohort.importing import load_patients
    from oncofm.cohort.normalize import load_normalized_expression
    from oncofm.survival.cox_stage import load_coefficients

    layout = RunLayout(settings.run)
    paths = feature_paths(settings.run)
    settings_path = layout.settings_file(settings.stage)
    from oncofm.config import check_stage

    if check_stage(settings, settings_path, list(paths.values()), on_change="redo"):
        log.info("features exist with the same settings; skipping (pass --redo to rebuild)")
        return paths
    from oncofm.survival.cox_stage import layer_rows

    coefficients = layer_rows(load_coefficients(settings.run), "expression")
    selection = select_genes(coefficients, settings.top_k, settings.q_max, settings.fill)
    genes = selection.index.tolist()
    patients = load_patients(settings.run).set_index(Col.PATIENT)
    expression = load_normalized_expression(settings.run)
    ids = [p for p in patients.index if p in expression.index]
    if len(ids) < len(patients):
        log.warning("%d patients have no expression row and are left out", len(patients) - len(ids))
    pairs = build_pairs(expression.loc[ids], patients.loc[ids, Col.CANCER], coefficients, genes)
    with atomic_path(paths["pairs"]) as tmp, open(tmp, "wb") as fh:
        np.save(fh, pairs)
    write_text("\n".join(genes) + "\n", paths["genes"])
    write_text("\n".join(ids) + "\n", paths["patients"])
    write_parquet(selection.reset_index(), paths["selection"], index=False)
    settings.save(settings_path)
    log.info("features: %d patients × %d genes × 2 (%d genes prognostic at q <= %g)", pairs.shape[0],
             pairs.shape[1], int(selection["passed"].sum()), settings.q_max)
    return paths


def load_pair_features(run: str | Path) -> tuple[np.ndarray, list[str], list[str]]:
    """``(pairs (N, G, 2), genes, patient_ids)`` of a run (raises with a hint when missing)."""
    layout = RunLayout(run)
    paths = feature_paths(run)
    for p in paths.values():
        layout.require(p, "Run `oncofm features --run RUN` first.")
    pairs = np.load(paths["pairs"])
    genes = paths["genes"].read_text().split()
    patients = paths["patients"].read_text().split()
    return pairs, genes, patients
