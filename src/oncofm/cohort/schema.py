"""The cohort schema and its validation.

``patients.parquet`` has one row per patient with the columns in :class:`Col` (required ones first);
``expression.parquet`` (and ``cnv``/``mutation``) is a patients × genes float32 table whose index is
``patient_id`` and whose columns are HGNC symbols. Validation raises
:class:`~oncofm.errors.DataValidationError` naming the file, the column and a few offending rows.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from oncofm.errors import DataValidationError
from oncofm.survival.endpoints import horizon_label

#: The one pan-cancer key: the Cox table's stratified rows and the normalisation statistics of all training
#: patients both use it; a cancer type unseen in training falls back to it.
PAN_CANCER = "__pan__"
#: Written by runs made before the two keys were one (normalisation only); read as PAN_CANCER.
LEGACY_PAN_KEYS = ("__all__",)


class Col:
    """Column names of ``patients.parquet`` (one place, no scattered literals)."""

    PATIENT = "patient_id"
    CANCER = "cancer_type"
    AGE = "age"
    SEX = "sex"  # "female" / "male" / missing
    OS_DAYS = "os_days"
    OS_EVENT = "os_event"
    # optional further endpoints (days / 0-1 event)
    DSS_DAYS, DSS_EVENT = "dss_days", "dss_event"
    PFI_DAYS, PFI_EVENT = "pfi_days", "pfi_event"
    DFI_DAYS, DFI_EVENT = "dfi_days", "dfi_event"
    SOURCE = "source"
    # optional clinical covariates (oncofm.cohort.clinical): ordinal 1-4, NaN = unknown; histology as text
    STAGE = "stage"
    GRADE = "grade"
    HISTOLOGY = "histology"

    REQUIRED = (PATIENT, CANCER, OS_DAYS, OS_EVENT)
    ORDER = (PATIENT, CANCER, AGE, SEX, OS_DAYS, OS_EVENT, DSS_DAYS, DSS_EVENT, PFI_DAYS, PFI_EVENT,
             DFI_DAYS, DFI_EVENT, SOURCE, STAGE, GRADE, HISTOLOGY)
    COVARIATES = (STAGE, GRADE)


SPLIT_COL = "split"
FOLD_COL = "fold"
SPLITS = ("train", "val", "test")


def validate_patients(df: pd.DataFrame, file: str = "patients") -> pd.DataFrame:
    """Check the patient table; return it with canonical dtypes and column order."""
    missing = [c for c in Col.REQUIRED if c not in df.columns]
    if missing:
        raise DataValidationError(f"missing required column(s) {missing}; found {list(df.columns)[:12]}",
                                  file=file)
    pid = df[Col.PATIENT].astype("string")
    if pid.isna().any():
        raise DataValidationError("missing patient IDs", file=file, column=Col.PATIENT,
                                  rows=df.index[pid.isna()].tolist())
    dup = pid[pid.duplicated(keep=False)]
    if len(dup):
        raise DataValidationError("duplicate patient IDs", file=file, column=Col.PATIENT,
                                  rows=sorted(set(dup.tolist())))
    ct = df[Col.CANCER]
    if ct.isna().any():
        raise DataValidationError("missing cancer type", file=file, column=Col.CANCER,
                                  rows=pid[ct.isna()].tolist())
    time = pd.to_numeric(df[Col.OS_DAYS], errors="coerce")
    bad = time.isna() | ~np.isfinite(time.fillna(0)) | (time < 0)
    if bad.any():
        raise DataValidationError("survival times must be present, finite and >= 0 (for missing ones, "
                                  "--option missing_survival=drop leaves those patients out)", file=file,
                                  column=Col.OS_DAYS, rows=[f"{p}={v}" for p, v in
                                                            zip(pid[bad], df[Col.OS_DAYS][bad], strict=True)])
    ev = pd.to_numeric(df[Col.OS_EVENT], errors="coerce")
    bad = ~ev.isin([0, 1])
    if bad.any():
        raise DataValidationError("events must be 0 or 1", file=file, column=Col.OS_EVENT,
                                  rows=[f"{p}={v}" for p, v in zip(pid[bad], df[Col.OS_EVENT][bad], strict=True)])
    out = df.copy()
    out[Col.PATIENT] = pid.astype(str)
    out[Col.CANCER] = ct.astype(str)
    out[Col.OS_DAYS] = time.astype(float)
    out[Col.OS_EVENT] = ev.astype(int)
    if Col.AGE in out:
        out[Col.AGE] = pd.to_numeric(out[Col.AGE], errors="coerce").astype(float)
    for col in Col.COVARIATES:
        if col in out:
            v = pd.to_numeric(out[col], errors="coerce").astype(float)
            bad = v.notna() & ~v.isin([1.0, 2.0, 3.0, 4.0])
            if bad.any():
                raise DataValidationError(f"{col} must be 1-4 or missing (map text with oncofm.cohort.clinical)",
                                          file=file, column=col,
                                          rows=[f"{p}={x}" for p, x in zip(pid[bad], out[col][bad], strict=True)])
            out[col] = v
    cols = [c for c in Col.ORDER if c in out.columns] + [c for c in out.columns if c not in Col.ORDER]
    return out[cols].reset_index(drop=True)


def validate_matrix(df: pd.DataFrame, file: str = "expression", kind: str = "expression") -> pd.DataFrame:
    """Check a patients × genes matrix (index = patient_id); return it as float32."""
    if df.index.has_duplicates:
        raise DataValidationError("duplicate patient IDs", file=file, column=Col.PATIENT,
                                  rows=sorted(set(df.index[df.index.duplicated()].astype(str))))
    if df.columns.has_duplicates:
        raise DataValidationError("duplicated genes", file=file,
                                  rows=sorted(set(df.columns[df.columns.duplicated()].astype(str))))
    if df.shape[1] == 0:
        raise DataValidationError(f"no gene columns in the {kind} table", file=file)
    non_numeric = [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
    if non_numeric:
        # object columns can still hold numbers only (e.g. after a transpose): convert those
        converted = df[non_numeric].apply(pd.to_numeric, errors="coerce")
        bad_cells = converted.isna() & df[non_numeric].notna()
        if bad_cells.to_numpy().any():
            col = bad_cells.columns[bad_cells.any(axis=0).to_numpy()][0]
            bad = bad_cells[col].to_numpy()
            raise DataValidationError(
                f"non-numeric {kind} values", file=file, column=str(col),
                rows=[f"{p}={v!r}" for p, v in zip(df.index[bad], df[col][bad], strict=True)])
        df = df.copy()
        df[non_numeric] = converted
    values = df.to_numpy(dtype=np.float64)
    inf = np.isinf(values)
    if inf.any():
        r, c = np.nonzero(inf)
        raise DataValidationError(f"infinite {kind} values", file=file, column=str(df.columns[c[0]]),
                                  rows=[str(df.index[i]) for i in r])
    out = df.astype(np.float32)
    out.index = out.index.astype(str)
    out.index.name = Col.PATIENT
    out.columns = out.columns.astype(str)
    return out


def five_year_labels(patients: pd.DataFrame, years: float = 5.0) -> pd.Series:
    """The binary horizon label per patient (1 death by ``years``, 0 alive beyond, NaN censored before)."""
    return pd.Series(horizon_label(patients[Col.OS_DAYS], patients[Col.OS_EVENT], years),
                     index=patients[Col.PATIENT].to_numpy(), name=f"label_{years:g}y")


LOW_GENE_OVERLAP = 0.5  # below this share of genes measured in every cancer type, the overlap is "low"


def soft_problems(patients: pd.DataFrame, expression: pd.DataFrame, years: float = 5.0) -> dict[str, float | int]:
    """Counts of problems that do not stop an import but matter to the models (saved and summarised).

    - ``patients_without_5y_label``: censored before the horizon (kept for survival metrics);
    - ``genes_missing_in_some_cohorts``: genes entirely missing (all NaN) in at least one cancer type;
    - ``gene_overlap_fraction``: share of genes measured in every cancer type; ``low_gene_overlap`` is 1
      when it is below ``LOW_GENE_OVERLAP``;
    - ``missing_expression_values``: NaN cells of the expression matrix.
    """
    label = five_year_labels(patients, years)
    ct = patients.set_index(Col.PATIENT)[Col.CANCER].reindex(expression.index)
    measured = expression.notna().groupby(ct.to_numpy()).any()  # cancer types × genes
    in_all = measured.all(axis=0)
    overlap = float(in_all.mean()) if expression.shape[1] else 0.0
    return {
        "patients_without_5y_label": int(label.isna().sum()),
        "genes_missing_in_some_cohorts": int((~in_all).sum()),
        "gene_overlap_fraction": round(overlap, 4),
        "low_gene_overlap": int(overlap < LOW_GENE_OVERLAP),
        "missing_expression_values": int(expression.isna().to_numpy().sum()),
    }
