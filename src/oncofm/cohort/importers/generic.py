"""Importer for any expression table plus a clinical table, with a column mapping.

``--source`` is the expression table (CSV, TSV/TXT, optionally gzipped, or parquet), with patients as
rows and genes as columns or the transpose (``orientation``: detected from which side matches the
clinical patient IDs, or given). ``--clinical`` is the clinical table. The mapping comes from
``--option KEY=VALUE`` flags or the ``options:`` mapping of a ``--config`` YAML file::

    options:
      patient_id: sample          # clinical column with the patient ID        (default patient_id)
      cancer_type: project        # clinical column with the cancer type       (default cancer_type)
      cancer_type_value: BRCA     # or one cancer type for every patient
      os_days: OS.time            # survival time column                       (default os_days)
      time_unit: days             # days | months | years                      (default days)
      os_event: OS                # event column: 1 death, 0 censored          (default os_event)
      event_values: "Dead:1,Alive:0"   # map text events to 0/1
      age: age                    # optional
      sex: gender                 # optional (female/male, F/M)
      stage: ajcc_stage           # optional AJCC stage text ("Stage IIIA", "[Not Available]", ...)
      grade: grade                # optional grade text ("G3", "High Grade", ...); see oncofm.cohort.clinical
      id_column: gene             # expression ID column (default: the first column)
      orientation: auto           # auto | genes-as-rows | genes-as-columns
      patient_id_chars: 12        # cut expression IDs to their first N characters (TCGA sample → patient)
"""

from __future__ import annotations

import csv
import gzip
import io
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from oncofm.cohort.importers.common import maybe_log2, read_table, require_columns, table_kind
from oncofm.cohort.importers.registry import ImportedCohort, register_importer
from oncofm.cohort.schema import Col
from oncofm.errors import DataValidationError, OncoFMError
from oncofm.survival.endpoints import DAYS_PER_MONTH, DAYS_PER_YEAR

log = logging.getLogger(__name__)

DEFAULTS: dict[str, str | None] = {
    "patient_id": Col.PATIENT, "cancer_type": Col.CANCER, "cancer_type_value": None,
    "os_days": Col.OS_DAYS, "time_unit": "days", "os_event": Col.OS_EVENT, "event_values": None,
    "age": None, "sex": None, "stage": None, "grade": None, "id_column": None, "orientation": "auto", "patient_id_chars": None,
    "missing_survival": "error",
}
ORIENTATIONS = ("auto", "genes-as-rows", "genes-as-columns")
UNIT_DAYS = {"days": 1.0, "months": DAYS_PER_MONTH, "years": DAYS_PER_YEAR}
SEX = {"female": "female", "f": "female", "male": "male", "m": "male"}


def _options(raw: dict) -> dict[str, str | None]:
    unknown = sorted(set(raw) - set(DEFAULTS))
    if unknown:
        raise OncoFMError(f"unknown generic option(s) {unknown}; known: {', '.join(DEFAULTS)}")
    opts = {**DEFAULTS, **{k: (None if v is None else str(v)) for k, v in raw.items()}}
    if opts["orientation"] not in ORIENTATIONS:
        raise OncoFMError(f"orientation must be one of {ORIENTATIONS}, got {opts['orientation']!r}")
    if opts["time_unit"] not in UNIT_DAYS:
        raise OncoFMError(f"time_unit must be one of {list(UNIT_DAYS)}, got {opts['time_unit']!r}")
    return opts


def _header(path: Path) -> list[str]:
    """The header cells as written (pandas renames duplicates to ``X.1``, hiding them)."""
    kind = table_kind(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", newline="") as fh:
        line = fh.readline()
    return next(csv.reader(io.StringIO(line), delimiter="," if kind == "csv" else "\t"))


def _events(series: pd.Series, mapping: str | None, file: str, column: str) -> pd.Series:
    if not mapping:
        return series
    table: dict[str, float] = {}
    for item in mapping.split(","):
        if ":" not in item:
            raise OncoFMError(f"event_values expects TEXT:0/1 pairs like 'Dead:1,Alive:0', got {mapping!r}")
        k, v = item.rsplit(":", 1)
        table[k.strip().lower()] = float(v)
    mapped = series.astype("string").str.strip().str.lower().map(table)
    return mapped.where(series.notna(), np.nan).astype(float)


def read_clinical(path: str | Path, opts: dict, notes: list[str]) -> pd.DataFrame:
    """The clinical table mapped onto the cohort schema."""
    path = Path(path)
    raw = read_table(path, what="clinical table")
    need = [opts["patient_id"], opts["os_days"], opts["os_event"]]
    if not opts["cancer_type_value"]:
        need.append(opts["cancer_type"])
    require_columns(raw, need, str(path), " (map your columns with --option patient_id=... os_days=... "
                    "os_event=... cancer_type=... or a --config YAML)")
    time = pd.to_numeric(raw[opts["os_days"]], errors="coerce")
    bad_text = time.isna() & raw[opts["os_days"]].notna()
    if bad_text.any():
        raise DataValidationError("non-numeric survival times", file=str(path), column=opts["os_days"],
                                  rows=[f"{p}={v!r}" for p, v in zip(raw.loc[bad_text, opts["patient_id"]],
                                                                     raw.loc[bad_text, opts["os_days"]],
                                                                     strict=True)])
    out = pd.DataFrame({
        Col.PATIENT: raw[opts["patient_id"]].astype("string"),
        Col.CANCER: opts["cancer_type_value"] if opts["cancer_type_value"] else raw[opts["cancer_type"]],
        Col.OS_DAYS: time * UNIT_DAYS[opts["time_unit"]],
        Col.OS_EVENT: _events(raw[opts["os_event"]], opts["event_values"], str(path), opts["os_event"]),
    })
    if opts["age"]:
        require_columns(raw, [opts["age"]], str(path))
        out[Col.AGE] = pd.to_numeric(raw[opts["age"]], errors="coerce")
    if opts["sex"]:
        require_columns(raw, [opts["sex"]], str(path))
        out[Col.SEX] = raw[opts["sex"]].astype("string").str.strip().str.lower().map(SEX)
    from oncofm.cohort.clinical import parse_grades, parse_stages

    if opts["stage"]:
        require_columns(raw, [opts["stage"]], str(path))
        out[Col.STAGE] = parse_stages(raw[opts["stage"]], file=str(path), column=opts["stage"])
    if opts["grade"]:
        require_columns(raw, [opts["grade"]], str(path))
        out[Col.GRADE] = parse_grades(raw[opts["grade"]], file=str(path), column=opts["grade"])
    out[Col.SOURCE] = "generic"
    if opts["missing_survival"] == "drop":
        miss = out[Col.OS_DAYS].isna() | out[Col.OS_EVENT].isna()
        if miss.any():
            notes.append(f"{int(miss.sum())} clinical patients without survival time or event left out")
            out = out[~miss]
    return out


def read_expression(path: str | Path, opts: dict, clinical_ids: set[str], notes: list[str]) -> pd.DataFrame:
    """The expression table as patients × genes (values as in the file), orientation detected or given."""
    path = Path(path)
    if table_kind(path) == "parquet":
        table = read_table(path, what="expression table")
        if not isinstance(table.index, pd.RangeIndex):  # a pandas index saved in the file
            table = table.reset_index()
        header = [str(c) for c in table.columns]
    else:
        header = _header(path)
        table = read_table(path, what="expression table", dtype={0: str})
    id_col = opts["id_column"] or table.columns[0]
    if id_col not in table.columns:
        raise DataValidationError(f"ID column {id_col!r} not found; found {list(table.columns)[:8]}",
                                  file=str(path), column=id_col)
    ids = table[id_col].astype(str)
    rest = [str(c) for c in header if str(c) != str(id_col)]
    cut = int(opts["patient_id_chars"]) if opts["patient_id_chars"] else None

    def _cut(values: list[str]) -> list[str]:
        return [v[:cut] for v in values] if cut else list(values)

    orientation = opts["orientation"]
    if orientation == "auto":
        as_rows = len(set(_cut(ids.tolist())) & clinical_ids)  # patients are rows
        as_cols = len(set(_cut(rest)) & clinical_ids)  # patients are columns
        if as_rows or as_cols:
            orientation = "genes-as-columns" if as_rows >= as_cols else "genes-as-rows"
        else:
            orientation = "genes-as-rows" if len(ids) > len(rest) else "genes-as-columns"
        log.info("expression orientation detected: %s", orientation)
        notes.append(f"expression orientation detected: {orientation}")
    header_dups = sorted({c for c in rest if rest.count(c) > 1}) if len(set(rest)) < len(rest) else []
    if orientation == "genes-as-columns":
        if header_dups:
            raise DataValidationError("duplicated genes", file=str(path), column="(header)", rows=header_dups)
        expr = table.set_index(id_col)
        expr.index = pd.Index(_cut(ids.tolist()), name=Col.PATIENT)
    else:
        if header_dups:
            raise DataValidationError("duplicate patient IDs", file=str(path), column="(header)",
                                      rows=header_dups)
        if ids.duplicated().any():
            raise DataValidationError("duplicated genes", file=str(path), column=str(id_col),
                                      rows=sorted(set(ids[ids.duplicated()])))
        expr = table.set_index(id_col).T
        expr.columns = pd.Index(ids.tolist())
        expr.index = pd.Index(_cut([str(i) for i in expr.index]), name=Col.PATIENT)
    if expr.columns.has_duplicates:
        raise DataValidationError("duplicated genes", file=str(path),
                                  rows=sorted(set(expr.columns[expr.columns.duplicated()].astype(str))))
    if expr.index.has_duplicates:
        raise DataValidationError("duplicate patient IDs" + (f" (after cutting IDs to {cut} characters)"
                                                             if cut else ""), file=str(path),
                                  column=str(id_col) if orientation == "genes-as-columns" else "(header)",
                                  rows=sorted(set(expr.index[expr.index.duplicated()])))
    expr.columns = expr.columns.astype(str)
    return expr


@register_importer("generic")
def import_generic(settings) -> ImportedCohort:  # noqa: ANN001 - ImportSettings (import cycle)
    if not settings.clinical:
        raise OncoFMError("the generic format needs --clinical (a table with patient ID, cancer type, "
                          "survival time and event columns)")
    opts = _options(settings.options)
    notes: list[str] = []
    patients = read_clinical(settings.clinical, opts, notes)
    expr = read_expression(settings.source, opts, set(patients[Col.PATIENT].dropna().astype(str)), notes)
    expr = maybe_log2(expr, settings.log_transform, str(settings.source), notes)
    return ImportedCohort(patients=patients, expression=expr, notes=notes,
                          files={"clinical": str(settings.clinical), "expression": str(settings.source)})
