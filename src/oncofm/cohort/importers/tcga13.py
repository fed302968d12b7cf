"""Importer for the TCGA-13 layout (``shared/data/tcga13``).

Files: ``patients.csv`` (case_id, tcga_project, age, is_female, survival_months, event and the
TCGA-CDR endpoints ``cdr_*``), ``expression_zscore.csv.gz`` (patients × genes, per-cohort z-scores)
and ``multiomics/tcga_<cohort>_all_clean.csv.gz`` (per-slide rows with ``<GENE>_cnv``/``<GENE>_mut``
columns; a patient's slides repeat the same values). Optional ``slides.csv`` (case_id, slide_id).

Overall survival comes from ``survival_months`` × 30.4375 days (it equals TCGA-CDR OS; 60 months is
exactly the 5-year horizon of 1826.25 days).

Stage, grade and histology (``settings.covariates``) come from the TCGA-CDR table joined on the patient
barcode: ``--clinical`` when given, else ``../tcga_cdr/tcga_cdr_clinical.csv`` beside ``--source`` when it
exists (the layout of ``shared/data``); without either the columns are absent (noted). Values are mapped
by :mod:`oncofm.cohort.clinical`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from oncofm.cohort.importers.registry import ImportedCohort, register_importer
from oncofm.cohort.schema import Col
from oncofm.errors import DataValidationError, OncoFMError
from oncofm.survival.endpoints import DAYS_PER_MONTH

log = logging.getLogger(__name__)

REQUIRED = ("case_id", "tcga_project", "survival_months", "event")


def _read_patients(path: Path) -> pd.DataFrame:
    raw = pd.read_csv(path)
    missing = [c for c in REQUIRED if c not in raw.columns]
    if missing:
        raise DataValidationError(f"missing required column(s) {missing}", file=str(path))
    out = pd.DataFrame({
        Col.PATIENT: raw["case_id"].astype("string"),
        Col.CANCER: raw["tcga_project"],
        Col.AGE: pd.to_numeric(raw.get("age"), errors="coerce") if "age" in raw else np.nan,
        Col.SEX: raw["is_female"].map({1.0: "female", 0.0: "male"})
        if "is_female" in raw else None,
        Col.OS_DAYS: pd.to_numeric(raw["survival_months"], errors="coerce") * DAYS_PER_MONTH,
        Col.OS_EVENT: raw["event"],
    })
    for name in ("DSS", "PFI", "DFI"):
        if f"cdr_{name}" in raw and f"cdr_{name}_days" in raw:
            out[f"{name.lower()}_days"] = pd.to_numeric(raw[f"cdr_{name}_days"], errors="coerce")
            out[f"{name.lower()}_event"] = pd.to_numeric(raw[f"cdr_{name}"], errors="coerce")
    out[Col.SOURCE] = "tcga13"
    return out


def _header(file: Path) -> list[str]:
    """Column names from the first line (cheaper than pandas' nrows=0 on thousands of columns)."""
    import csv
    import gzip

    with gzip.open(file, "rt", newline="") as fh:
        return next(csv.reader([fh.readline()]))


def _read_multiomics(folder: Path, suffixes: tuple[str, ...],
                     patients: pd.Index) -> dict[str, pd.DataFrame | None]:
    """``{suffix: patients × genes}`` from the per-cohort files, each file read once for all suffixes."""
    frames: dict[str, list[pd.DataFrame]] = {sfx: [] for sfx in suffixes}
    for file in sorted(folder.glob("*_all_clean.csv.gz")):
        header = _header(file)
        cols = [c for c in header if c.endswith(suffixes)]
        if not cols:
            continue
        df = pd.read_csv(file, usecols=["case_id", *cols], engine="c")
        df = df.drop_duplicates("case_id").set_index("case_id")
        for sfx in suffixes:
            part = df[[c for c in df.columns if c.endswith(sfx)]]
            part.columns = [c[: -len(sfx)] for c in part.columns]
            part = part.dropna(axis=1, how="all")
            if part.shape[1]:
                frames[sfx].append(part)
    out: dict[str, pd.DataFrame | None] = {}
    for sfx, parts in frames.items():
        if not parts:
            out[sfx] = None
            continue
        m = pd.concat(parts, axis=0, join="outer")
        m = m[~m.index.duplicated()]
        m = m.loc[m.index.intersection(patients)]
        out[sfx] = m.astype(np.float32)
    return out


def cdr_path(root: Path, clinical: str | None) -> Path | None:
    """The TCGA-CDR table for a tcga13 folder: ``clinical`` if given, else ``root/../tcga_cdr/...`` if present."""
    if clinical:
        path = Path(clinical)
        if not path.is_file():
            raise OncoFMError(f"--clinical {path} does not exist; give the TCGA-CDR table "
                              "(shared/data/tcga_cdr/tcga_cdr_clinical.csv) or leave it out")
        return path
    guess = root.parent / "tcga_cdr" / "tcga_cdr_clinical.csv"
    return guess if guess.is_file() else None


def _add_cdr_covariates(patients: pd.DataFrame, root: Path, clinical: str | None, notes: list[str]) -> pd.DataFrame:
    from oncofm.cohort.clinical import covariates_from_cdr
    from oncofm.cohort.importers.common import read_table

    path = cdr_path(root, clinical)
    if path is None:
        notes.append("no TCGA-CDR table (--clinical, or ../tcga_cdr/ beside --source): stage and grade not imported")
        return patients
    raw = read_table(path, what="TCGA-CDR clinical table")
    if "bcr_patient_barcode" not in raw:
        raise DataValidationError("missing required column ['bcr_patient_barcode'] (expected the TCGA-CDR table)",
                                  file=str(path))
    raw = raw[raw["bcr_patient_barcode"].astype(str).isin(set(patients[Col.PATIENT].astype(str)))]
    cov = covariates_from_cdr(raw.drop_duplicates("bcr_patient_barcode"), notes, file=str(path))
    unmatched = int((~patients[Col.PATIENT].astype(str).isin(cov.index)).sum())
    if unmatched:
        notes.append(f"{unmatched} patients not in the TCGA-CDR table: stage and grade unknown")
    cov = cov.reindex(patients[Col.PATIENT].astype(str))
    out = patients.copy()
    for col in cov.columns:
        out[col] = cov[col].to_numpy()
    return out


@register_importer("tcga13")
def import_tcga13(settings) -> ImportedCohort:  # noqa: ANN001 - ImportSettings (import cycle)
    root = Path(settings.source)
    if not root.is_dir():
        raise OncoFMError(f"--source {root} is not a folder in the tcga13 layout (patients.csv, "
                          "expression_zscore.csv.gz, multiomics/)")
    pfile, efile = root / "patients.csv", root / "expression_zscore.csv.gz"
    for f in (pfile, efile):
        if not f.exists():
            raise OncoFMError(f"{f} is missing: the tcga13 layout needs patients.csv and expression_zscore.csv.gz")
    patients = _read_patients(pfile)
    log.info("reading %s", efile.name)
    expr = pd.read_csv(efile, index_col=0, engine="c", dtype={0: str}, low_memory=False)
    expr.index = expr.index.astype(str)
    expr.index.name = Col.PATIENT
    notes = []
    mo = root / "multiomics"
    cnv = mut = None
    if mo.is_dir() and settings.include_multiomics:
        log.info("reading copy number and mutations from %s", mo)
        mo_tables = _read_multiomics(mo, ("_cnv", "_mut"), pd.Index(patients[Col.PATIENT].astype(str)))
        cnv, mut = mo_tables["_cnv"], mo_tables["_mut"]
    if getattr(settings, "covariates", True):
        patients = _add_cdr_covariates(patients, root, settings.clinical, notes)
    slides = None
    if (root / "slides.csv").exists():
        s = pd.read_csv(root / "slides.csv")
        slides = pd.DataFrame({Col.PATIENT: s["case_id"].astype(str), "slide_id": s["slide_id"].astype(str)})
    return ImportedCohort(patients=patients, expression=expr, cnv=cnv, mutation=mut, slides=slides,
                          notes=notes)
