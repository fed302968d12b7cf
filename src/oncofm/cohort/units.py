"""Units check: are expression values in the units the model was trained on?

The omics model learns from expression in its training cohort's units (for tcga13 and the bundled demo
cohort: per-cohort RNA-seq z-scores), normalised per cancer type with robust training statistics
(:mod:`oncofm.cohort.normalize`). A profile in other units (raw counts, TPM, log2(x+1)) still normalises
to numbers, but meaningless ones: a KIRC profile given as log-scale values moved the omics risk from 0.35
to 0.997. This module names the units of a set of values and compares them with the training statistics.

:func:`describe_units` names the units of values from their shape alone (rules, applied in order, to
the finite values):

- ``"counts"``: every value ≥ 0 and the maximum above 100 (the importers' ``--log-transform auto`` rule:
  raw or normalised counts, TPM, FPKM, not log-transformed);
- ``"log-scale"``: at most 5 % negative values, median ≥ 1, maximum ≤ 100 (log2(x+1) of counts or TPM:
  about 0–20);
- ``"z-scores"``: median within ±1, at least 20 % negative values and a robust spread (1.4826 × MAD) of
  0.2–5;
- ``"other"``: anything else.

:func:`check_units` compares the values with the training statistics (``center``, ``scale`` of each
patient's cancer type; the pan-cancer row for a type without statistics) through the robust z
``r = (x - center) / scale`` of every value with statistics:

- one patient (a Series, or a one-row frame): ``median_abs_z``, the median over genes of ``|r|``, and
  ``share_beyond_clip``, the share of genes with ``|r|`` above the clip value (5). The profile is *far*
  from the training distribution when ``median_abs_z > 3`` or ``share_beyond_clip > 0.5``;
- a cohort (a frame of several patients): per gene, the median of ``r`` over patients (a location
  shift, in training scales) and 1.4826 × its MAD (a spread ratio); ``gene_location`` and
  ``gene_spread`` are their medians over genes (``|location|`` for the first). The cohort is *far* when
  ``gene_location > 2`` or ``gene_spread`` is outside 0.2–5.

For a model trained on z-scores (:func:`training_units` of the statistics: median centre within ±1),
the check fails when the values are log-scale- or counts-shaped (a log2 profile of lowly expressed values,
median about 1.5, lies within 3 training scales of the z-score centres, yet is no z-score profile), or
far and not z-score-shaped (a z-score profile far from the training centres is an unusual patient, not a
units problem). For a model trained on other units (e.g. a Firehose log2 cohort) it fails when the values
are far. Fewer than 10 genes with statistics are not checked. On the real
tcga13 cohort, with the training-split statistics of ``cohort split`` (seed 0), every one of the 4,191
patients passes: ``median_abs_z`` 0.64 on average, at most 1.35; ``share_beyond_clip`` at most 0.25
(docs/cohort.md has the measured numbers for log-scale and counts-like profiles).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from oncofm.cohort.schema import LEGACY_PAN_KEYS, PAN_CANCER, Col
from oncofm.errors import OncoFMError

__all__ = ["UnitsReport", "check_profiles", "check_units", "describe_units", "require_units", "training_units", "value_summary"]

COUNTS_MAX = 100.0  # the importers' counts-like rule (oncofm.cohort.importers.common.COUNTS_LIKE_MAX)
PATIENT_MAX_MEDIAN_ABS_Z = 3.0
PATIENT_MAX_SHARE_BEYOND_CLIP = 0.5
COHORT_MAX_LOCATION = 2.0
COHORT_SPREAD_RANGE = (0.2, 5.0)
MIN_GENES = 10

UNITS_TEXT = {
    "counts": "counts (raw or normalised counts, TPM or FPKM, not log-transformed)",
    "log-scale": "log-scale values (e.g. log2(x+1) of counts or TPM)",
    "z-scores": "z-scores",
    "other": "values in unrecognised units",
}
TRAINING_TEXT = {
    "z-scores": "per-cohort RNA-seq z-scores (each gene centred near 0 with a spread of about 1 within its cohort)",
    "log-scale": "log-scale values (log2(x+1) of counts or TPM)",
    "counts": "counts-like values (not log-transformed)",
    "other": "the units of its training cohort",
}
CONVERT_TEXT = {
    "z-scores": ("z-score each gene within its cohort — (x - the gene's mean) / its standard deviation over "
                 "the cohort's patients, after log2(x+1) for counts or TPM — as cBioPortal's 'mRNA expression "
                 "z-scores relative to all samples' are"),
    "log-scale": "apply log2(x+1) to counts or TPM (z-scores cannot be converted back)",
    "counts": "pass the values before any log transform or z-scoring",
    "other": "pass values made the same way as the training cohort's",
}


def _finite(values: Any) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).ravel()
    return arr[np.isfinite(arr)]


def describe_units(values: Any) -> str:
    """``"counts"``, ``"log-scale"``, ``"z-scores"`` or ``"other"`` for a vector or matrix (rules above)."""
    v = _finite(values)
    if v.size == 0:
        return "other"
    med, vmin, vmax = float(np.median(v)), float(v.min()), float(v.max())
    neg = float(np.mean(v < 0))
    if vmin >= 0 and vmax > COUNTS_MAX:
        return "counts"
    if neg <= 0.05 and med >= 1 and vmax <= COUNTS_MAX:
        return "log-scale"
    spread = 1.4826 * float(np.median(np.abs(v - med)))
    if abs(med) <= 1 and neg >= 0.2 and 0.2 <= spread <= 5:
        return "z-scores"
    return "other"


def value_summary(values: Any) -> str:
    """``median 7.8, range 0–16`` of the finite values."""
    v = _finite(values)
    if v.size == 0:
        return "no finite values"
    return f"median {_num(np.median(v))}, range {_num(v.min())} to {_num(v.max())}"


def _num(x: float) -> str:
    x = float(x)
    return f"{x:.3g}" if abs(x) < 1e4 else f"{x:.2e}"


def training_units(stats: pd.DataFrame) -> str:
    """The units the statistics were fitted on, named from the training centres and scales."""
    center = _finite(stats["center"])
    if center.size == 0:
        return "other"
    med = float(np.median(center))
    if center.min() >= 0 and center.max() > COUNTS_MAX:
        return "counts"
    if center.min() >= 0 and med >= 1:
        return "log-scale"
    if abs(med) <= 1 and float(np.median(_finite(stats["scale"]))) <= 5:
        return "z-scores"
    return "other"


@dataclass
class UnitsReport:
    """What :func:`check_units` found (``ok`` False: the values are not in the training units)."""

    what: str
    mode: str  # "patient" or "cohort"
    units: str  # describe_units of the input
    expected: str  # training_units of the statistics
    ok: bool
    checked: bool  # False: too few genes with statistics to check
    n_genes: int
    n_patients: int
    values: str  # value_summary of the input
    median_abs_z: float | None = None
    share_beyond_clip: float | None = None
    gene_location: float | None = None
    gene_spread: float | None = None
    cancer_types: list[str] = field(default_factory=list)

    def statistics(self) -> str:
        """The compared numbers, one line."""
        if self.mode == "patient":
            return (f"median |robust z| {self.median_abs_z:.2f} (limit {PATIENT_MAX_MEDIAN_ABS_Z:g}), "
                    f"{100 * self.share_beyond_clip:.0f}% of genes beyond the clip value "
                    f"(limit {100 * PATIENT_MAX_SHARE_BEYOND_CLIP:.0f}%)")
        lo, hi = COHORT_SPREAD_RANGE
        return (f"per-gene median {self.gene_location:.2f} training scales from the training centres "
                f"(limit {COHORT_MAX_LOCATION:g}), per-gene spread {self.gene_spread:.2f} times the training "
                f"scale (expected {lo:g}–{hi:g})")

    @property
    def message(self) -> str:
        """The refusal: what the values look like, what the model expects and how to convert."""
        types = (f"the {', '.join(self.cancer_types)}" if 0 < len(self.cancer_types) <= 3
                 else f"its {len(self.cancer_types)} cancer types'")
        return (f"{self.what} looks like {UNITS_TEXT[self.units]} ({self.values}; over {self.n_genes} genes: "
                f"{self.statistics()} against {types} training statistics), but this model was trained on "
                f"{TRAINING_TEXT[self.expected]}. Convert: {CONVERT_TEXT[self.expected]}; or pass values in "
                "the training units.")

    def as_dict(self) -> dict[str, Any]:
        keys = ("mode", "units", "expected", "ok", "checked", "n_genes", "n_patients", "values", "median_abs_z",
                "share_beyond_clip", "gene_location", "gene_spread")
        return {k: getattr(self, k) for k in keys}


def _robust_z(values: pd.DataFrame, cancer_types: pd.Series, stats: pd.DataFrame) -> pd.DataFrame:
    """Unclipped ``(x - center) / scale`` per patient's cancer type (pan-cancer row for an unknown type);
    NaN for genes without statistics."""
    key = stats[Col.CANCER].astype(str).replace({k: PAN_CANCER for k in LEGACY_PAN_KEYS})
    known = set(key)
    ct = cancer_types.reindex(values.index).astype(str).to_numpy()
    x = values.to_numpy(dtype=np.float64)
    out = np.full(x.shape, np.nan)
    for cancer in np.unique(ct):
        s = stats[key == (cancer if cancer in known else PAN_CANCER)].drop_duplicates("gene").set_index("gene")
        s = s.reindex(values.columns)
        rows = ct == cancer
        with np.errstate(all="ignore"):
            out[rows] = (x[rows] - s["center"].to_numpy(float)) / s["scale"].to_numpy(float)
    return pd.DataFrame(out, index=values.index, columns=values.columns)


def _prepare(expression: pd.Series | pd.DataFrame, stats: pd.DataFrame,
             cancer_types: str | Sequence[str] | pd.Series) -> tuple[pd.DataFrame, pd.Series, np.ndarray]:
    """The numeric frame (genes with statistics only), the cancer type per row and the robust z."""
    if isinstance(expression, pd.Series):
        frame = pd.DataFrame([pd.to_numeric(expression, errors="coerce").to_numpy()],
                             columns=expression.index.astype(str), index=["patient"])
    else:
        numeric = all(pd.api.types.is_numeric_dtype(t) for t in expression.dtypes)
        frame = expression.copy() if numeric else expression.apply(pd.to_numeric, errors="coerce")
        frame.columns = frame.columns.astype(str)
    frame = frame.loc[:, ~frame.columns.duplicated()]
    if isinstance(cancer_types, pd.Series):
        ct = cancer_types.astype(str).reindex(frame.index)
    else:
        types = [cancer_types] if isinstance(cancer_types, str) else list(cancer_types)
        if len(types) == 1:
            types = types * len(frame)
        ct = pd.Series([str(t) for t in types], index=frame.index)
    with_stats = set(stats["gene"].astype(str))
    frame = frame[[g for g in frame.columns if g in with_stats]].astype(float)
    return frame, ct, _robust_z(frame, ct, stats).to_numpy()


def _clip(stats: pd.DataFrame) -> float:
    return float(stats["clip"].iloc[0]) if "clip" in stats and len(stats) else 5.0


def _fails(far: bool, units: str, expected: str) -> bool:
    """For a z-score model: log-scale/counts-shaped, or far and not z-score-shaped; for another: far."""
    if expected == "z-scores":
        return units in ("log-scale", "counts") or (far and units != "z-scores")
    return far


def check_profiles(expression: pd.DataFrame, stats: pd.DataFrame, cancer_types: str | Sequence[str] | pd.Series,
                   *, what: str) -> list[UnitsReport]:
    """The one-patient check of :func:`check_units` for every row of ``expression`` at once (``what``
    names each row, e.g. "the expression profile")."""
    frame, ct, z = _prepare(expression, stats, cancer_types)
    expected, clip = training_units(stats), _clip(stats)
    values = frame.to_numpy()
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        absz = np.abs(z)
        n_genes = np.isfinite(z).sum(axis=1)
        med = np.nanmedian(absz, axis=1)
        beyond = np.nansum(absz > clip, axis=1) / np.maximum(n_genes, 1)
    for i in range(len(frame)):
        report = UnitsReport(what=what, mode="patient", units=describe_units(values[i]), expected=expected,
                             ok=True, checked=bool(n_genes[i] >= MIN_GENES), n_genes=int(n_genes[i]), n_patients=1,
                             values=value_summary(values[i]), cancer_types=[str(ct.iloc[i])])
        if report.checked:
            report.median_abs_z, report.share_beyond_clip = float(med[i]), float(beyond[i])
            far = (report.median_abs_z > PATIENT_MAX_MEDIAN_ABS_Z
                   or report.share_beyond_clip > PATIENT_MAX_SHARE_BEYOND_CLIP)
            report.ok = not _fails(far, report.units, report.expected)
        out.append(report)
    return out


def check_units(expression: pd.Series | pd.DataFrame, stats: pd.DataFrame,
                cancer_types: str | Sequence[str] | pd.Series, *, what: str) -> UnitsReport:
    """Compare ``expression`` (one patient: a gene → value Series or a one-row frame; a cohort: patients ×
    genes) with the training ``stats`` of ``cancer_types`` (one type, or one per row / a Series indexed
    by patient). ``what`` names the input in the message ("the expression profile", "the cohort X")."""
    if isinstance(expression, pd.Series) or len(expression) == 1:
        return check_profiles(expression.to_frame().T if isinstance(expression, pd.Series) else expression,
                              stats, cancer_types, what=what)[0]
    frame, ct, z = _prepare(expression, stats, cancer_types)
    has = np.isfinite(z)
    cols = has.any(axis=0)
    n_genes = int(cols.sum())
    report = UnitsReport(what=what, mode="cohort", units=describe_units(frame.to_numpy()),
                         expected=training_units(stats), ok=True, checked=n_genes >= MIN_GENES, n_genes=n_genes,
                         n_patients=len(frame), values=value_summary(frame.to_numpy()),
                         cancer_types=sorted(set(ct.dropna())))
    if not report.checked:
        return report
    report.share_beyond_clip = float(np.mean(np.abs(z[has]) > _clip(stats)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        loc = np.nanmedian(z[:, cols], axis=0)
        spread = 1.4826 * np.nanmedian(np.abs(z[:, cols] - loc), axis=0)
    report.gene_location = float(np.median(np.abs(loc)))
    report.gene_spread = float(np.median(spread))
    lo, hi = COHORT_SPREAD_RANGE
    far = report.gene_location > COHORT_MAX_LOCATION or not (lo <= report.gene_spread <= hi)
    report.ok = not _fails(far, report.units, report.expected)
    return report


def require_units(expression: pd.Series | pd.DataFrame, stats: pd.DataFrame,
                  cancer_types: str | Sequence[str] | pd.Series, *, what: str) -> UnitsReport:
    """:func:`check_units`, raising :class:`~oncofm.errors.OncoFMError` with its message when it fails."""
    report = check_units(expression, stats, cancer_types, what=what)
    if not report.ok:
        raise OncoFMError(report.message)
    return report
