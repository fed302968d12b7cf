"""Clinical covariates: AJCC stage and histological grade from messy clinical text, in one place.

Every importer that finds stage or grade (tcga13 and Firehose through the TCGA-CDR table, generic through
``--option stage=COLUMN grade=COLUMN``, GDC through its ``diagnoses`` records) maps them here, so the
patients table has the same two ordinal columns whatever the source:

``stage`` — AJCC stage as a number 1–4 (I–IV), NaN = unknown. Sub-stages are collapsed to their main
stage; the text is matched case-insensitively, with or without the word "stage":

================================================  ========  ===========================================
text                                              stage     why
================================================  ========  ===========================================
``Stage I``, ``Stage IA``, ``IB``, ``Stage 1``    1         sub-stages (A, B, C, 1, 2) collapsed
``Stage IIA``, ``Stage IIC``, ``II``, ``2``       2
``Stage IIIA`` … ``IIIC``, ``3``                  3
``Stage IV``, ``IVA``, ``IVB``, ``IVC``, ``4``    4
``Stage 0``, ``0is``, ``IS``, ``Tis``             1         in situ (7 of 11,160 TCGA-CDR patients): counted with I
``Stage X``                                       unknown   "cannot be assessed"
``I/II NOS``                                      unknown   ambiguous between two stages
``[Not Available]``, ``[Not Applicable]``,        unknown   TCGA's missing-value codes (GBM and LGG
``[Unknown]``, ``[Not Evaluated]``,                         have no AJCC stage at all)
``[Discrepancy]``, ``Not Reported``, ``--``,
empty, NaN
================================================  ========  ===========================================

``grade`` — histological grade as a number 1–4, NaN = unknown:

================================================  ========  ===========================================
text                                              grade     why
================================================  ========  ===========================================
``G1`` … ``G4``, ``Grade 2``, ``2``               1–4       the four-tier grade
``Low Grade``                                     1         two-tier systems (TCGA-BLCA): low grade ~ G1–2,
``High Grade``                                    3         high grade ~ G3–4; coded at the lower end of each
``GX``                                            unknown   "cannot be assessed"
``GB`` (borderline)                               unknown
``[Not Available]``, ``[Unknown]``,               unknown   missing-value codes
``[Discrepancy]``, ``Not Reported``, empty, NaN
================================================  ========  ===========================================

Text that matches none of these raises :class:`~oncofm.errors.DataValidationError` naming the column and
the unrecognised values (so a new code is added to this table instead of silently becoming unknown).

Other TCGA-CDR fields (checked on tcga13): ``clinical_stage`` fills ``stage`` where the pathologic stage
is missing (a dozen HNSC/KIRP patients); ``histological_type`` is kept as text (``histology``, not a model
input); ``tumor_status``, ``treatment_outcome_first_course``, ``new_tumor_event_*`` describe follow-up
after diagnosis (using them would leak the outcome) and ``residual_tumor``/``margin_status`` cover under
10 % of tcga13 patients: not imported.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np
import pandas as pd

from oncofm.errors import DataValidationError

__all__ = ["GRADE", "HISTOLOGY", "STAGE", "STAGE_LABELS", "clean_text", "covariates_from_cdr", "parse_grade",
           "parse_grades", "parse_stage", "parse_stages", "stage_label"]

STAGE = "stage"
GRADE = "grade"
HISTOLOGY = "histology"
STAGE_LABELS = {1: "I", 2: "II", 3: "III", 4: "IV"}

#: Missing-value codes (compared after lower-casing and stripping brackets and spaces).
MISSING_CODES = frozenset({"", "nan", "none", "na", "n/a", "--", "'--", "not available", "not applicable",
                           "unknown", "not evaluated", "discrepancy", "not reported", "unk", "missing", "null"})
_ROMAN = {"i": 1, "ii": 2, "iii": 3, "iv": 4}
_STAGE_RE = re.compile(r"^(?:ajcc\s*)?(?:stage\s*)?(iv|iii|ii|i|[0-4])(?:[abc][0-9]?|[0-9])?(?:\s*nos)?$")
_GRADE_RE = re.compile(r"^(?:grade\s*|g\s*)?([1-4]|iv|iii|ii|i)$")


def clean_text(value: object) -> str:
    """Lower-cased, stripped text with TCGA's square brackets removed (``"[Not Available]"`` → ``"not available"``)."""
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return ""
    return str(value).strip().strip("[]").strip().lower()


def _is_missing(text: str) -> bool:
    return text in MISSING_CODES


def parse_stage(value: object) -> float | None:
    """AJCC stage text → 1–4, ``nan`` for unknown, ``None`` when the text is not recognised (see the module table)."""
    text = clean_text(value)
    if _is_missing(text):
        return np.nan
    text = re.sub(r"\s+", " ", text)
    if text in ("stage x", "x", "stage x nos"):
        return np.nan
    if "/" in text or " or " in text:  # "I/II NOS": two stages
        return np.nan
    if text in ("stage 0", "0", "stage 0is", "0is", "is", "stage is", "tis", "stage 0a", "in situ"):
        return 1.0
    m = _STAGE_RE.match(text)
    if not m:
        return None
    token = m.group(1)
    number = _ROMAN[token] if token in _ROMAN else int(token)
    return float(max(number, 1))  # stage 0 counted with I


def parse_grade(value: object) -> float | None:
    """Histological grade text → 1–4, ``nan`` for unknown, ``None`` when not recognised (see the module table)."""
    text = re.sub(r"\s+", " ", clean_text(value))
    if _is_missing(text) or text in ("gx", "grade x", "x", "gb", "borderline"):
        return np.nan
    if text in ("low grade", "low", "low-grade"):
        return 1.0
    if text in ("high grade", "high", "high-grade"):
        return 3.0
    m = _GRADE_RE.match(text)
    if not m:
        return None
    token = m.group(1)
    return float(_ROMAN[token] if token in _ROMAN else int(token))


def _parse_all(values: Iterable[object], parser, what: str, file: str, column: str) -> np.ndarray:  # noqa: ANN001
    values = list(values)
    parsed = [parser(v) for v in values]
    bad = sorted({str(v) for v, p in zip(values, parsed, strict=True) if p is None})
    if bad:
        raise DataValidationError(
            f"unrecognised {what} value(s); known forms are listed in oncofm/cohort/clinical.py (add the new "
            f"code there, or map the column to missing values first)", file=file, column=column, rows=bad)
    return np.asarray(parsed, dtype=float)


def parse_stages(values: Iterable[object], *, file: str = "clinical", column: str = STAGE) -> np.ndarray:
    """Vectorised :func:`parse_stage`; raises naming the unrecognised values."""
    return _parse_all(values, parse_stage, "stage", file, column)


def parse_grades(values: Iterable[object], *, file: str = "clinical", column: str = GRADE) -> np.ndarray:
    """Vectorised :func:`parse_grade`; raises naming the unrecognised values."""
    return _parse_all(values, parse_grade, "grade", file, column)


def stage_label(stage: float | None) -> str:
    """``1.0`` → ``"I"`` … ``4.0`` → ``"IV"``; NaN/None → ``"unknown"``."""
    if stage is None or not np.isfinite(stage):
        return "unknown"
    return STAGE_LABELS.get(int(stage), "unknown")


def _histology(values: pd.Series) -> pd.Series:
    text = values.astype("string").str.strip()
    missing = np.array([_is_missing(clean_text(None if v is pd.NA else v)) for v in text], dtype=bool)
    return text.where(~missing)


def covariates_from_cdr(raw: pd.DataFrame, notes: list[str], file: str = "tcga_cdr") -> pd.DataFrame:
    """``stage``, ``grade``, ``histology`` per patient (index: ``bcr_patient_barcode``) from a TCGA-CDR table.

    The pathologic stage (``ajcc_pathologic_tumor_stage``) is used, the clinical stage (``clinical_stage``)
    where it is missing; the counts of each source and of unknowns are appended to ``notes``.
    """
    out = pd.DataFrame(index=pd.Index(raw["bcr_patient_barcode"].astype(str), name="patient_id"))
    stage = np.full(len(raw), np.nan)
    if "ajcc_pathologic_tumor_stage" in raw:
        stage = parse_stages(raw["ajcc_pathologic_tumor_stage"], file=file, column="ajcc_pathologic_tumor_stage")
    if "clinical_stage" in raw:
        clin = parse_stages(raw["clinical_stage"], file=file, column="clinical_stage")
        fill = np.isnan(stage) & ~np.isnan(clin)
        if fill.any():
            notes.append(f"stage: clinical stage used for {int(fill.sum())} patients without a pathologic stage")
        stage = np.where(np.isnan(stage), clin, stage)
    out[STAGE] = stage
    out[GRADE] = (parse_grades(raw["histological_grade"], file=file, column="histological_grade")
                  if "histological_grade" in raw else np.nan)
    if "histological_type" in raw:
        out[HISTOLOGY] = _histology(raw["histological_type"]).to_numpy()
    return out


def covariate_note(patients: pd.DataFrame) -> str:
    """One line counting known stage / grade values (for the import notes)."""
    parts = []
    for col in (STAGE, GRADE):
        if col in patients:
            v = pd.to_numeric(patients[col], errors="coerce")
            counts = v.value_counts().sort_index()
            parts.append(f"{col} known for {int(v.notna().sum())} of {len(v)} patients ("
                         + ", ".join(f"{int(k)}: {int(c)}" for k, c in counts.items()) + ")")
    return "; ".join(parts)
