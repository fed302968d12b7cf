"""Expression normalisation: per-cancer-type robust z-scores with training-split statistics, clipped.

For each cancer type and gene, ``center`` is the median and ``scale`` is 1.4826 × MAD of the training
patients (the standard deviation when the MAD is 0, 1 when both are 0); values become
``clip((x - center) / scale, -clip, +clip)``. Robust statistics matter here: the TCGA z-scores have
values up to 3.7e4 that would dominate a mean and SD. A pan-cancer row (``cancer_type == PAN_CANCER``, ``"__pan__"``)
serves cancer types unseen in training. Missing values stay NaN (a gene a cohort lacks); models fill
them with 0, the training median.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from oncofm.cohort.schema import LEGACY_PAN_KEYS, PAN_CANCER, Col

log = logging.getLogger(__name__)

def _robust_stats(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            center = np.nanmedian(values, axis=0)
            mad = 1.4826 * np.nanmedian(np.abs(values - center), axis=0)
            std = np.nanstd(values, axis=0)
    scale = np.where(mad > 1e-8, mad, np.where(std > 1e-8, std, 1.0))
    center = np.where(np.isfinite(center), center, 0.0)
    scale = np.where(np.isfinite(scale), scale, 1.0)
    return center, scale


def fit_normalizer(expression: pd.DataFrame, patients: pd.DataFrame, train_ids: pd.Series | list,
                   clip: float = 5.0) -> pd.DataFrame:
    """Statistics per (cancer type, gene) from training patients only, long format."""
    train_ids = pd.Index(list(train_ids)).intersection(expression.index)
    ct = patients.set_index(Col.PATIENT)[Col.CANCER]
    rows = []
    groups = [(PAN_CANCER, train_ids)] + [
        (t, train_ids[ct.reindex(train_ids).to_numpy() == t]) for t in sorted(ct.reindex(train_ids).unique())]
    for cancer, ids in groups:
        center, scale = _robust_stats(expression.loc[ids].to_numpy(dtype=np.float64))
        rows.append(pd.DataFrame({Col.CANCER: cancer, "gene": expression.columns, "center": center,
                                  "scale": scale, "n_train": len(ids), "clip": clip}))
    return pd.concat(rows, ignore_index=True)


def apply_normalizer(expression: pd.DataFrame, cancer_types: pd.Series, stats: pd.DataFrame) -> pd.DataFrame:
    """Normalise ``expression`` (patients × genes) with saved ``stats``.

    ``cancer_types`` is indexed by patient. Cancer types without statistics use the pan-cancer row (a
    warning counts them). Genes without statistics are returned as NaN.
    """
    stats = stats.assign(**{Col.CANCER: stats[Col.CANCER].astype(str).replace(
        {k: PAN_CANCER for k in LEGACY_PAN_KEYS})})
    clip = float(stats["clip"].iloc[0])
    genes = expression.columns
    out = np.full(expression.shape, np.nan, dtype=np.float32)
    known = set(stats[Col.CANCER])
    ct = cancer_types.reindex(expression.index).astype(str).to_numpy()
    unseen = sorted(set(ct) - known)
    if unseen:
        log.warning("cancer type(s) %s have no training statistics; using pan-cancer normalisation", unseen)
    values = expression.to_numpy(dtype=np.float64)
    for cancer in np.unique(ct):
        key = cancer if cancer in known else PAN_CANCER
        s = stats[stats[Col.CANCER] == key].set_index("gene").reindex(genes)
        rows = ct == cancer
        z = (values[rows] - s["center"].to_numpy()) / s["scale"].to_numpy()
        out[rows] = np.clip(z, -clip, clip)
    return pd.DataFrame(out, index=expression.index, columns=genes)


def load_normalized_expression(run: str | Path, name: str = "expression") -> pd.DataFrame:
    """The run's expression, normalised with its saved training statistics."""
    from oncofm.cohort.importing import load_matrix, load_patients
    from oncofm.paths import RunLayout

    layout = RunLayout(run)
    layout.require(layout.normalization, "Run `oncofm cohort split --run RUN` first.")
    stats = pd.read_parquet(layout.normalization)
    expr = load_matrix(run, name)
    patients = load_patients(run).set_index(Col.PATIENT)
    return apply_normalizer(expr, patients[Col.CANCER], stats)
