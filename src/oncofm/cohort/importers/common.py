"""Helpers shared by the importers: reading tables, the log2(x+1) decision, TCGA barcodes, TCGA-CDR."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from oncofm.cohort.schema import Col
from oncofm.errors import DataValidationError, OncoFMError

log = logging.getLogger(__name__)

TABLE_SUFFIXES = (".csv", ".tsv", ".txt", ".parquet", ".csv.gz", ".tsv.gz", ".txt.gz")
# auto log-transform: non-negative values whose maximum exceeds this are counts-like (log2 values of
# RNA-seq stay below ~25; z-scores are negative somewhere)
COUNTS_LIKE_MAX = 100.0


def table_kind(path: Path) -> str:
    """``csv``, ``tsv`` or ``parquet`` from the file name; an error for anything else."""
    name = path.name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".csv", ".csv.gz")):
        return "csv"
    if name.endswith((".tsv", ".tsv.gz", ".txt", ".txt.gz")):
        return "tsv"
    raise DataValidationError(f"unknown table format (expected one of {', '.join(TABLE_SUFFIXES)})",
                              file=str(path))


def read_table(path: str | Path, *, what: str = "table", **kwargs) -> pd.DataFrame:  # noqa: ANN003
    """Read a CSV/TSV (optionally gzipped) or parquet table; clear errors for missing or unreadable files."""
    path = Path(path)
    if not path.is_file():
        raise OncoFMError(f"{what} {path} does not exist (or is not a file)")
    kind = table_kind(path)
    try:
        if kind == "parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path, sep="," if kind == "csv" else "\t", low_memory=False, **kwargs)
    except (ValueError, OSError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise DataValidationError(f"cannot be read as {kind}: {exc}", file=str(path)) from None


def require_columns(df: pd.DataFrame, columns: list[str], file: str, hint: str = "") -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataValidationError(
            f"missing required column(s) {missing}; found {list(map(str, df.columns))[:12]}{hint}",
            file=file, column=missing[0])


def is_counts_like(values: np.ndarray) -> bool:
    """True for non-negative values with a maximum above ``COUNTS_LIKE_MAX`` (raw or normalised counts, TPM)."""
    finite = values[np.isfinite(values)]
    return bool(finite.size) and float(finite.min()) >= 0 and float(finite.max()) > COUNTS_LIKE_MAX


def _numeric(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with non-numeric cells as NaN (no per-column work when every column is numeric already)."""
    if all(pd.api.types.is_numeric_dtype(t) for t in df.dtypes):
        return df
    return df.apply(pd.to_numeric, errors="coerce")


def maybe_log2(expr: pd.DataFrame, mode: str, file: str, notes: list[str]) -> pd.DataFrame:
    """Apply log2(x+1) when ``mode`` is ``yes``, or ``auto`` and the values are counts-like.

    Non-numeric cells are left for validation to report (they become NaN only in the detection).
    """
    if mode == "no":
        return expr
    numeric = _numeric(expr)
    values = numeric.to_numpy(dtype=np.float64)
    if mode == "auto" and not is_counts_like(values):
        log.info("expression does not look like counts (min %.3g, max %.3g); no log transform",
                 np.nanmin(values) if np.isfinite(values).any() else np.nan,
                 np.nanmax(values) if np.isfinite(values).any() else np.nan)
        return expr
    if (values < 0).any():
        r, c = np.nonzero(values < 0)
        raise DataValidationError("log2(x+1) needs non-negative values (use --log-transform no for data "
                                  "already on a log or z-score scale)", file=file,
                                  column=str(expr.columns[c[0]]),
                                  rows=[f"{expr.index[i]}={values[i, j]:.3g}" for i, j in zip(r, c, strict=True)])
    if numeric.isna().to_numpy().sum() != expr.isna().to_numpy().sum():
        return expr  # non-numeric cells: validation reports them with their values
    notes.append(f"expression log2(x+1)-transformed ({'requested' if mode == 'yes' else 'counts-like values detected'})")
    return np.log2(numeric + 1.0)


def patient_of(barcode: str) -> str:
    """The patient (case) barcode: the first 12 characters of a TCGA sample/aliquot barcode."""
    return str(barcode)[:12]


def sample_type(barcode: str) -> str:
    """The two-digit TCGA sample type code (``01`` primary tumour, ``11`` solid normal, ...) or ``''``."""
    b = str(barcode)
    return b[13:15] if len(b) >= 15 and b.startswith("TCGA-") else ""


def primary_tumour_one_per_patient(samples: list[str], notes: list[str], file: str) -> dict[str, str]:
    """Map patient → the one primary-tumour sample (type 01) kept.

    Other sample types (normals 10/11, metastases 06, recurrences 02, ...) are dropped. A patient with
    several primary-tumour aliquots keeps the one whose barcode sorts first (vial A before B, then the
    lowest portion/analyte/plate), a deterministic choice; the number of dropped duplicates is noted.
    """
    typed = [(s, sample_type(s)) for s in samples]
    bad = [s for s, t in typed if t == ""]
    if bad:
        raise DataValidationError("sample columns are not TCGA sample barcodes (TCGA-XX-XXXX-NN...)",
                                  file=file, rows=bad)
    primary = sorted(s for s, t in typed if t == "01")
    other = len(samples) - len(primary)
    keep: dict[str, str] = {}
    dups = 0
    for s in primary:
        p = patient_of(s)
        if p in keep:
            dups += 1
            continue
        keep[p] = s
    if other:
        notes.append(f"{other} non-primary-tumour samples (sample type != 01) dropped")
    if dups:
        notes.append(f"{dups} extra primary-tumour aliquots of the same patient dropped (kept the first barcode)")
    return keep


def read_cdr(path: str | Path, notes: list[str], missing_survival: str = "error",
             covariates: bool = True) -> pd.DataFrame:
    """Patients from the TCGA-CDR clinical table (Liu et al. 2018): OS/OS.time and DSS/PFI/DFI in days.

    ``covariates`` adds ``stage``, ``grade`` and ``histology`` (:func:`oncofm.cohort.clinical.covariates_from_cdr`).

    ``missing_survival="drop"`` leaves out patients without OS or OS.time (noted); ``"error"`` lets
    validation stop the import on them (for patients that have expression).
    """
    path = Path(path)
    raw = read_table(path, what="clinical table")
    require_columns(raw, ["bcr_patient_barcode", "type", "OS", "OS.time"], str(path),
                    " (expected the TCGA-CDR table, Liu et al. 2018)")
    out = pd.DataFrame({
        Col.PATIENT: raw["bcr_patient_barcode"].astype(str),
        Col.CANCER: raw["type"],
        Col.AGE: pd.to_numeric(raw.get("age_at_initial_pathologic_diagnosis"), errors="coerce")
        if "age_at_initial_pathologic_diagnosis" in raw else np.nan,
        Col.SEX: raw["gender"].str.lower().where(raw["gender"].str.upper().isin(["MALE", "FEMALE"]))
        if "gender" in raw else None,
        Col.OS_DAYS: raw["OS.time"],
        Col.OS_EVENT: raw["OS"],
    })
    for name in ("DSS", "PFI", "DFI"):
        if name in raw and f"{name}.time" in raw:
            out[f"{name.lower()}_days"] = pd.to_numeric(raw[f"{name}.time"], errors="coerce")
            out[f"{name.lower()}_event"] = pd.to_numeric(raw[name], errors="coerce")
    out[Col.SOURCE] = "tcga_cdr"
    if covariates:
        from oncofm.cohort.clinical import covariates_from_cdr

        cov = covariates_from_cdr(raw, notes, file=str(path))
        for col in cov.columns:
            out[col] = cov[col].to_numpy()
    if missing_survival == "drop":
        miss = pd.to_numeric(out[Col.OS_DAYS], errors="coerce").isna() | out[Col.OS_EVENT].isna()
        if miss.any():
            notes.append(f"{int(miss.sum())} clinical patients without OS/OS.time left out")
            out = out[~miss]
    return out


def dedupe_symbols(expr: pd.DataFrame, notes: list[str]) -> pd.DataFrame:
    """Genes (columns) that share a symbol after stripping IDs: keep the one with the highest mean."""
    if not expr.columns.has_duplicates:
        return expr
    means = _numeric(expr).mean(axis=0).to_numpy()
    order = np.argsort(-np.nan_to_num(means, nan=-np.inf), kind="stable")
    seen: set[str] = set()
    keep_pos = []
    for pos in order:  # most expressed first
        name = expr.columns[pos]
        if name not in seen:
            seen.add(name)
            keep_pos.append(pos)
    n = expr.shape[1] - len(keep_pos)
    notes.append(f"{n} gene rows with a symbol already seen (different Entrez/Ensembl ID) dropped; "
                 "kept the most expressed")
    return expr.iloc[:, sorted(keep_pos)]
