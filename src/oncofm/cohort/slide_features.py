"""Slide-level features as a cohort input: ``RUN/cohort/slide_features.parquet`` (+ ``slide_features.json``).

A slide-level feature is one number per slide: a human-interpretable image feature (the hif2gene HIF table:
cell densities, region areas, ...) or one element of a slide embedding that another pipeline wrote (TRIDENT's
per-slide ``.h5`` files). :func:`import_slide_features` reads such a source, matches it to the cohort's
patients, combines several slides of one patient and writes one row per matched patient.

Sources (``SlideFeatureSettings.source``)
-----------------------------------------
- **a table** (``.csv``, ``.tsv``, ``.txt``, optionally ``.gz``; ``.parquet``): one row per slide (or per
  patient), a barcode column, optional metadata columns, and every other column a numeric feature, named as
  in the file. Metadata columns (never features): the barcode and slide columns, :data:`METADATA_COLUMNS`
  (``cancer_type``, ``stain_suffix``, ``slide_key``, ...) and ``exclude_columns``.
- **slide-embedding files**: a folder of ``.h5`` files (or a list of them, or one), one per slide, each with a
  dataset ``features`` (TRIDENT ``run_batch_of_slides.py --task feat --slide_encoder ...`` writes
  ``features`` of shape (D,) with ``coords`` beside it) or ``feats`` (STAMP's slide/patient encodings, (1, D)),
  of shape (D,) or (1, D). The slide name is the file stem (``TCGA-AA-3512-01Z-00-DX1.<uuid>.h5`` →
  ``TCGA-AA-3512-01Z-00-DX1.<uuid>``). Features are named ``<encoder>_<i>`` when the files carry an
  ``encoder``/``extractor`` attribute (TRIDENT puts it on the ``features`` dataset, STAMP on the file),
  else ``f<i>``; every file must have the same width and encoder. A (N, D) bag of patch features is refused
  (that is :mod:`oncofm.pathology.feature_bags`' input).

Keys (``key``)
--------------
- ``patient``: the barcode is a patient (case) barcode, ``TCGA-XX-XXXX``; a longer TCGA barcode is cut to its
  first 12 characters. Several rows of one patient are several slides only when a slide column
  (``slide_column``; auto: ``slide_key``, ``slide_id``, ``slide``, ...) tells them apart (the HIF table:
  ``patient_id`` + ``slide_key``).
- ``slide``: the barcode names a slide (``TCGA-XX-XXXX-01Z-00-DX1``, optionally ``.<uuid>`` and a file
  suffix). Its patient is the one ``cohort/slides.parquet`` lists it under (by file stem, or by the part
  before the first ``.``), else the first 12 characters of a TCGA barcode.
- ``auto`` (default): ``slide`` when the barcode column is named like a slide (``slide*``, ``file*``) or any
  barcode is a TCGA barcode longer than 12 characters; else ``patient``.

Combining several slides of one patient (``combine``)
-----------------------------------------------------
- ``mean`` (default): each feature is the mean over the patient's slides, ignoring missing values (a
  feature missing on every slide of the patient stays missing);
- ``first``: the values of the patient's first slide by slide identifier (sorted: ``DX1`` before ``DX2``).
Either way ``n_slides`` records how many slides the patient had in the source.

Missing values are kept as NaN (the hif2gene table has 0.07 % missing): a model fitted on these features must
impute them, e.g. with the training split's medians. Infinite values are an error.

Bad input stops the import with one message and writes nothing: an empty table, no barcode column, a missing
barcode, non-numeric or infinite values in a feature column, a duplicated row (the same slide twice; for the
HIF table the same ``patient_id`` + ``slide_key`` twice), no barcode that matches a cohort patient, and a
feature set that differs from ``expected_features`` (:func:`check_feature_set`). Barcodes that match no patient
(while some do) are counted, logged and recorded in ``slide_features.json``.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from oncofm.config import StageSettings, artifact_version, check_stage, write_stamp
from oncofm.errors import DataValidationError, OncoFMError
from oncofm.io import first_dataset, open_h5
from oncofm.paths import RunLayout

log = logging.getLogger(__name__)

__all__ = ["METADATA_COLUMNS", "N_SLIDES", "SlideFeatureSettings", "check_feature_set", "import_slide_features",
           "load_feature_names", "load_slide_features", "read_slide_feature_source", "slide_feature_names"]

#: The column of ``slide_features.parquet`` that counts each patient's slides in the source.
N_SLIDES = "n_slides"
#: Barcode columns looked for, in this order, when ``barcode_column`` is not set (case-insensitive).
BARCODE_COLUMNS = ("patient_id", "case_id", "case_submitter_id", "submitter_id", "bcr_patient_barcode",
                   "slide_id", "slide_barcode", "slide", "slide_name", "filename", "file_name", "barcode")
#: Slide columns looked for beside a patient barcode column when ``slide_column`` is not set.
SLIDE_COLUMNS = ("slide_key", "slide_id", "slide_barcode", "slide", "slide_name", "filename", "file_name")
#: Columns that are never features (case-insensitive), besides the barcode and slide columns.
METADATA_COLUMNS = frozenset({
    *BARCODE_COLUMNS, *SLIDE_COLUMNS, "cancer_type", "project", "project_id", "tcga_project", "cohort",
    "stain_suffix", "stain", "sample_id", "sample", "split", "source", "site", "tss"})
#: Dataset names of a slide embedding in an ``.h5`` file: TRIDENT / CLAM-style ``features``, STAMP ``feats``.
H5_FEATURE_KEYS = ("features", "feats")
_FILE_SUFFIXES = (".h5", ".hdf5", ".pt", ".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".bif",
                  ".czi", ".dcm", ".isyntax", ".png", ".jpg", ".jpeg")
_TCGA = re.compile(r"^TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}", re.IGNORECASE)
_SHOWN = 5


class SlideFeatureSettings(StageSettings):
    """Settings of :func:`import_slide_features` (see the module docstring for the rules)."""

    stage: ClassVar[str] = "slide_features"

    run: str = Field(..., description="run directory with an imported cohort")
    source: str | list[str] = Field(..., description="a table (.csv/.tsv/.txt[.gz]/.parquet) of slide-level "
                                    "features, or a folder / list of per-slide .h5 embedding files")
    key: Literal["auto", "patient", "slide"] = Field("auto", description="what the barcodes name: patients "
                                                     "(TCGA-XX-XXXX) or slides (TCGA-XX-XXXX-01Z-00-DX1)")
    combine: Literal["mean", "first"] = Field("mean", description="several slides of a patient: the NaN-aware "
                                              "mean of each feature, or the first slide (sorted by slide id)")
    barcode_column: str | None = Field(None, description="the barcode column (auto: "
                                       + ", ".join(BARCODE_COLUMNS[:3]) + ", ...)")
    slide_column: str | None = Field(None, description="the column telling a patient's slides apart (auto: "
                                     "slide_key, slide_id, ...)")
    exclude_columns: list[str] = Field(default_factory=list, description="further non-feature columns")
    expected_features: str | None = Field(None, description="a file naming the feature set a model was trained "
                                          "on (.txt: one per line; .csv/.tsv: column 'feature' or the first; "
                                          ".parquet: its columns): the import stops when the source differs")
    redo: bool = False


@dataclass
class SlideFeatureRows:
    """A source read and checked, before matching: one row per slide (or patient) of the source."""

    features: pd.DataFrame  # float64, the original feature names, a RangeIndex
    barcodes: pd.Series  # normalised barcode per row
    slides: pd.Series  # the slide identifier per row (for duplicates and ``first``)
    key: str  # patient | slide
    meta: dict[str, Any] = field(default_factory=dict)  # format, barcode_column, slide_column, metadata, ...


# ----------------------------------------------------------------------------------------------------------
# feature sets
def check_feature_set(names: Iterable[str], expected: Iterable[str], *,
                      what: str = "the slide features") -> list[str]:
    """Stop unless ``names`` is the feature set ``expected`` (order aside); returns ``expected``'s order.

    For a model trained on one feature set and applied to another cohort: the message names the missing
    features (expected, absent) and the unexpected ones (present, not expected), each counted with examples.
    """
    names, expected = [str(n) for n in names], [str(e) for e in expected]
    have, want = set(names), set(expected)
    missing = [e for e in expected if e not in have]
    unexpected = [n for n in names if n not in want]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_examples(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_examples(unexpected)})")
        raise DataValidationError(
            f"{what} ({len(names)}) are not the {len(expected)} features the model was trained on: "
            + "; ".join(parts) + ". Give features computed the same way (same tool, version and names) as the "
            "training cohort's, or retrain the model on these features.")
    return expected


def load_feature_names(path: str | Path) -> list[str]:
    """The feature names in ``path``: ``.txt`` one per line; ``.csv``/``.tsv`` the column ``feature`` (else the
    first column); ``.parquet`` its columns (``n_slides`` left out, e.g. another run's slide_features.parquet)."""
    path = Path(path)
    if not path.exists():
        raise OncoFMError(f"feature list {path} does not exist")
    name = path.name.lower().removesuffix(".gz")
    if name.endswith((".parquet", ".pq")):
        import pyarrow.parquet as pq

        return [c for c in pq.read_schema(path).names if c not in (N_SLIDES, "patient_id", "__index_level_0__")]
    if name.endswith((".csv", ".tsv")):
        table = pd.read_csv(path, sep="\t" if name.endswith(".tsv") else ",", dtype=str)
        col = next((c for c in table.columns if str(c).lower() == "feature"), table.columns[0])
        return table[col].dropna().astype(str).tolist()
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------------------
# reading a source
def _examples(items: Sequence[Any], n: int = _SHOWN) -> str:
    shown = ", ".join(repr(str(i)) for i in list(items)[:n])
    return shown + (f", ... and {len(items) - n} more" if len(items) > n else "")


def _normalise_barcode(value: Any) -> str:
    """Strip blanks and a file suffix (``.h5``, ``.svs``, ...); upper-case TCGA barcodes."""
    text = str(value).strip()
    for _ in range(2):  # "x.h5.gz"-like double suffixes are not expected; ".svs" after a uuid is
        low = text.lower()
        suffix = next((s for s in _FILE_SUFFIXES if low.endswith(s)), None)
        if suffix is None:
            break
        text = text[: -len(suffix)]
    return text.upper() if _TCGA.match(text) else text


def _key_text(series: pd.Series) -> pd.Series:
    """Identifiers as text: integral numbers without ``.0`` (a numeric slide_key column with gaps), NaN → ''."""
    if pd.api.types.is_numeric_dtype(series):
        def fmt(v: Any) -> str:
            if pd.isna(v):
                return ""
            return str(int(v)) if float(v).is_integer() else str(v)
        return series.map(fmt).astype(str)
    return series.map(lambda v: "" if pd.isna(v) else str(v).strip()).astype(str)


def _pick(columns: Sequence[str], wanted: Sequence[str]) -> str | None:
    lower = {str(c).lower(): c for c in columns}
    return next((lower[w] for w in wanted if w in lower), None)


def _looks_like_slide(column: str, barcodes: pd.Series) -> bool:
    name = column.lower()
    if name.startswith(("slide", "file")):
        return True
    return bool(barcodes.map(lambda b: bool(_TCGA.match(b)) and len(b) > 12).any())


def _read_table(path: Path) -> pd.DataFrame:
    name = path.name.lower().removesuffix(".gz")
    if name.endswith((".parquet", ".pq")):
        return pd.read_parquet(path)
    if name.endswith((".csv", ".tsv", ".txt")):
        sep = "," if name.endswith(".csv") else "\t"
        try:
            header = pd.read_csv(path, sep=sep, nrows=0).columns
            ids = [c for c in header if str(c).lower() in METADATA_COLUMNS]
            return pd.read_csv(path, sep=sep, dtype={c: str for c in ids}, low_memory=False)
        except pd.errors.EmptyDataError:
            return pd.DataFrame()
    raise OncoFMError(f"{path}: unknown table format (use .csv, .tsv, .txt, optionally .gz, or .parquet), or "
                      "give a folder of per-slide .h5 embedding files")


def _numeric_features(table: pd.DataFrame, feature_cols: list[str], barcodes: pd.Series, file: str
                      ) -> pd.DataFrame:
    """The feature columns as float64; stops on non-numeric or infinite values (every offending column named)."""
    out: dict[str, pd.Series] = {}
    bad_cols: list[str] = []
    bad_rows: list[str] = []
    for col in feature_cols:
        values = table[col]
        if pd.api.types.is_bool_dtype(values) or not (pd.api.types.is_numeric_dtype(values)
                                                     or values.dtype == object or pd.api.types.is_string_dtype(values)):
            bad_cols.append(str(col))
            bad_rows.append(f"{barcodes.iloc[0]} (row 1): {values.iloc[0]!r}")
            continue
        if pd.api.types.is_numeric_dtype(values):
            out[col] = values.astype(np.float64)
            continue
        coerced = pd.to_numeric(values, errors="coerce")
        blank = values.isna() | values.astype(str).str.strip().isin(["", "NA", "NaN", "nan", "null", "None"])
        wrong = coerced.isna() & ~blank
        if wrong.any():
            bad_cols.append(str(col))
            bad_rows += [f"{barcodes.iloc[i]} (row {i + 1}): {values.iloc[i]!r}" for i in np.flatnonzero(wrong)[:3]]
            continue
        out[col] = coerced.astype(np.float64)
    if bad_cols:
        raise DataValidationError(
            f"non-numeric values in {len(bad_cols)} feature column(s) {_examples(bad_cols)}: feature columns must "
            "hold numbers (empty or NA for missing); if a column is not a feature, name it in exclude_columns",
            file=file, column=bad_cols[0], rows=bad_rows)
    features = pd.DataFrame(out, index=table.index)
    values = features.to_numpy()
    inf = np.isinf(values)
    if inf.any():
        rows_i, cols_i = np.nonzero(inf)
        cols = list(dict.fromkeys(features.columns[cols_i]))
        raise DataValidationError(
            f"infinite values in {len(cols)} feature column(s) {_examples(cols)} ({int(inf.sum())} values): "
            "replace them with finite numbers, or leave them empty for missing",
            file=file, column=str(cols[0]),
            rows=[f"{barcodes.iloc[r]} (row {r + 1}): {features.columns[c]}={values[r, c]}"
                  for r, c in zip(rows_i, cols_i, strict=True)])
    return features


def _source_files(source: str | list[str]) -> tuple[str, list[Path]]:
    """``("table", [path])`` or ``("h5", [paths])``."""
    if isinstance(source, list):
        paths = [Path(s) for s in source]
        if not paths:
            raise OncoFMError("no slide-feature source given (an empty list)")
    else:
        paths = [Path(source)]
    for p in paths:
        if not p.exists():
            raise OncoFMError(f"slide-feature source {p} does not exist")
    if len(paths) == 1 and paths[0].is_dir():
        files = sorted(p for p in paths[0].iterdir() if p.is_file() and p.suffix.lower() in (".h5", ".hdf5")
                       and not p.name.startswith("."))
        if not files:
            raise OncoFMError(f"{paths[0]} holds no .h5 slide-embedding files (one per slide, with a dataset "
                              f"{' or '.join(H5_FEATURE_KEYS)}); give a folder of them or a feature table")
        return "h5", files
    if all(p.suffix.lower() in (".h5", ".hdf5") for p in paths):
        return "h5", paths
    if len(paths) == 1:
        return "table", paths
    raise OncoFMError("a list of sources must be .h5 slide-embedding files; give one table or a folder of .h5 files")


def _read_h5_embeddings(files: list[Path]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """A table ``slide`` + features from per-slide embedding files (validated: layout, width, encoder)."""

    vectors: list[np.ndarray] = []
    names: list[str] = []
    encoders: dict[str, list[str]] = {}
    widths: dict[int, list[str]] = {}
    for path in files:
        handle = open_h5(path)
        with handle as f:
            key = first_dataset(f, H5_FEATURE_KEYS)
            if key is None:
                raise DataValidationError(f"no slide-embedding dataset: expected {' or '.join(map(repr, H5_FEATURE_KEYS))}"
                                          f" of shape (D,) or (1, D); the file holds {sorted(f.keys())}", file=str(path))
            ds = f[key]
            if ds.dtype.kind not in "fiu":
                raise DataValidationError(f"non-numeric slide embedding (dtype {ds.dtype})", file=str(path),
                                          column=key)
            shape = ds.shape
            if len(shape) == 2 and shape[0] > 1:
                raise DataValidationError(
                    f"{key!r} has shape {shape}: a bag of {shape[0]} patch features, not one slide embedding; "
                    "import patch features with oncofm.pathology.feature_bags.import_feature_bags", file=str(path))
            if len(shape) not in (1, 2) or (len(shape) == 2 and shape[0] != 1):
                raise DataValidationError(f"{key!r} has shape {shape}; a slide embedding is (D,) or (1, D)",
                                          file=str(path))
            vec = np.asarray(ds[()], dtype=np.float64).reshape(-1)
            enc = ds.attrs.get("encoder", f.attrs.get("encoder", f.attrs.get("extractor", "")))
            enc = enc.decode() if isinstance(enc, bytes) else str(enc)
        if vec.size == 0:
            raise DataValidationError("empty slide embedding (TRIDENT writes one for a slide without tissue "
                                      "patches): leave the file out", file=str(path))
        if np.isinf(vec).any():
            raise DataValidationError(f"infinite values in the slide embedding ({int(np.isinf(vec).sum())} of "
                                      f"{vec.size})", file=str(path))
        vectors.append(vec)
        names.append(path.name)
        encoders.setdefault("" if enc in ("", "None") else enc, []).append(path.name)
        widths.setdefault(vec.size, []).append(path.name)
    if len(widths) > 1:
        common = max(widths, key=lambda w: len(widths[w]))
        other = [f"{n} ({w})" for w, ns in widths.items() if w != common for n in ns]
        raise DataValidationError(f"the slide embeddings differ in width: {len(widths[common])} files have "
                                  f"{common} features, {len(other)} others ({_examples(other)}); every file must "
                                  "come from the same slide encoder")
    if len(encoders) > 1:
        parts = [f"{e or '(none)'}: {len(ns)} files (e.g. {ns[0]})" for e, ns in encoders.items()]
        raise DataValidationError("the slide embeddings come from different encoders (" + "; ".join(parts)
                                  + "); import one encoder's files at a time")
    encoder = next(iter(encoders))
    prefix = re.sub(r"[^A-Za-z0-9]+", "_", encoder).strip("_") + "_" if encoder else "f"
    width = next(iter(widths))
    table = pd.DataFrame(np.stack(vectors), columns=[f"{prefix}{i}" for i in range(width)])
    table.insert(0, "slide", names)
    return table, {"encoder": encoder or None, "h5_files": len(files)}


def read_slide_feature_source(settings: SlideFeatureSettings) -> SlideFeatureRows:
    """Read ``settings.source`` and check the table itself (everything but the match to the cohort)."""
    kind, files = _source_files(settings.source)
    file = str(files[0]) if kind == "table" else str(Path(files[0]).parent)
    meta: dict[str, Any] = {"format": kind}
    if kind == "table":
        table = _read_table(files[0])
    else:
        table, extra = _read_h5_embeddings(files)
        meta.update(extra)
    if table.empty or len(table) == 0:
        raise DataValidationError("the slide-feature table is empty (no rows): give a table with one row per "
                                  "slide (or patient)", file=file)
    table = table.reset_index(drop=True)
    table.columns = [str(c) for c in table.columns]
    if table.columns.duplicated().any():
        dups = list(dict.fromkeys(table.columns[table.columns.duplicated()]))
        raise DataValidationError(f"duplicated column names {_examples(dups)}: every feature needs its own name",
                                  file=file)
    barcode_col = settings.barcode_column or _pick(table.columns, BARCODE_COLUMNS)
    if barcode_col is None or barcode_col not in table.columns:
        wanted = repr(settings.barcode_column) if settings.barcode_column else \
            f"one of {', '.join(BARCODE_COLUMNS)}"
        raise DataValidationError(f"no barcode column: expected {wanted} (patient TCGA-XX-XXXX or slide "
                                  f"TCGA-XX-XXXX-01Z-00-DX1 barcodes; set barcode_column to name another); the "
                                  f"table's columns are {_examples(list(table.columns))}", file=file)
    raw = _key_text(table[barcode_col])
    blank = raw == ""
    if blank.any():
        raise DataValidationError(f"{int(blank.sum())} row(s) without a barcode: every row needs the patient or "
                                  "slide it belongs to", file=file, column=barcode_col,
                                  rows=[f"row {i + 1}" for i in np.flatnonzero(blank)])
    barcodes = raw.map(_normalise_barcode)
    key = settings.key if settings.key != "auto" else ("slide" if _looks_like_slide(barcode_col, barcodes)
                                                       else "patient")
    slide_col = settings.slide_column
    if slide_col is not None and slide_col not in table.columns:
        raise DataValidationError(f"slide column {slide_col!r} is not in the table (columns: "
                                  f"{_examples(list(table.columns))})", file=file)
    if slide_col is None and key == "patient":
        slide_col = _pick([c for c in table.columns if c != barcode_col], SLIDE_COLUMNS)
    if key == "slide":
        slides = barcodes.copy()
        if slide_col is not None and slide_col != barcode_col:
            slides = barcodes + ":" + _key_text(table[slide_col])
    else:
        barcodes = barcodes.map(lambda b: b[:12] if _TCGA.match(b) else b)
        slides = barcodes + ":" + _key_text(table[slide_col]) if slide_col else barcodes.copy()
    dup = slides.duplicated(keep=False)
    if dup.any():
        first = slides[dup].drop_duplicates()
        what = f"{barcode_col}" + (f" + {slide_col}" if slide_col and slide_col != barcode_col else "")
        hint = ("" if slide_col or key == "slide" else
                f"; the table has no slide column ({', '.join(SLIDE_COLUMNS[:3])}, ...) to tell a patient's "
                "slides apart: add one, or keep one row per patient")
        raise DataValidationError(
            f"duplicated rows: {len(first)} slide(s) appear more than once (the same {what}){hint}",
            file=file, column=barcode_col,
            rows=[f"{s} (rows {', '.join(str(i + 1) for i in np.flatnonzero(slides.to_numpy() == s)[:4])})"
                  for s in first])
    excluded_lower = {c.lower() for c in settings.exclude_columns}
    unknown_excl = [c for c in settings.exclude_columns if c not in table.columns]
    if unknown_excl:
        raise DataValidationError(f"exclude_columns names columns that are not in the table: "
                                  f"{_examples(unknown_excl)}", file=file)
    metadata = [c for c in table.columns if c in (barcode_col, slide_col) or c.lower() in METADATA_COLUMNS
                or c.lower() in excluded_lower]
    feature_cols = [c for c in table.columns if c not in metadata]
    if not feature_cols:
        raise DataValidationError(f"no feature columns: every column is a barcode or metadata column "
                                  f"({_examples(metadata)})", file=file)
    if N_SLIDES in feature_cols:
        raise DataValidationError(f"a feature is named {N_SLIDES!r}, the column that counts each patient's "
                                  "slides: rename it or name it in exclude_columns", file=file)
    features = _numeric_features(table, feature_cols, barcodes, file)
    meta.update({"barcode_column": barcode_col, "slide_column": slide_col, "metadata_columns": metadata})
    if "cancer_type" in {c.lower() for c in metadata}:
        col = next(c for c in metadata if c.lower() == "cancer_type")
        meta["cancer_type"] = _key_text(table[col])
    return SlideFeatureRows(features=features, barcodes=barcodes, slides=slides, key=key, meta=meta)


# ----------------------------------------------------------------------------------------------------------
# matching and combining
def _slide_patient_lookup(layout: RunLayout) -> dict[str, str]:
    """Slide name → patient from ``cohort/slides.parquet``: by file stem and by the part before the first dot
    (the slide barcode of ``TCGA-...-DX1.<uuid>.svs``), the latter only when unique."""
    if not layout.slides_table.exists():
        return {}
    table = pd.read_parquet(layout.slides_table)
    if not {"patient_id", "slide_id"} <= set(table.columns):
        return {}
    lookup: dict[str, str] = {}
    short: dict[str, set[str]] = {}
    for patient, slide in zip(table["patient_id"].astype(str), table["slide_id"].astype(str), strict=True):
        stem = _normalise_barcode(Path(slide).name)
        lookup[stem.upper()] = patient
        short.setdefault(stem.split(".")[0].upper(), set()).add(patient)
    for name, patients in short.items():
        if len(patients) == 1:
            lookup.setdefault(name, next(iter(patients)))
    return lookup


def _patients_of(rows: SlideFeatureRows, layout: RunLayout) -> pd.Series:
    """The cohort-independent patient barcode of each row (before checking it is a cohort patient)."""
    if rows.key == "patient":
        return rows.barcodes
    lookup = _slide_patient_lookup(layout)

    def patient(slide: str) -> str:
        up = slide.upper()
        if up in lookup:
            return lookup[up]
        if up.split(".")[0] in lookup:
            return lookup[up.split(".")[0]]
        return slide[:12].upper() if _TCGA.match(slide) else slide

    return rows.barcodes.map(patient)


def combine_slides(features: pd.DataFrame, patients: pd.Series, slides: pd.Series, rule: str) -> pd.DataFrame:
    """One row per patient (index ``patient_id``, sorted): ``mean`` (NaN-aware) or ``first`` (first slide by
    sorted slide id) of each feature, plus ``n_slides``."""
    frame = features.copy()
    frame["_patient"], frame["_slide"] = patients.to_numpy(), slides.to_numpy()
    frame = frame.sort_values(["_patient", "_slide"], kind="stable")
    groups = frame.groupby("_patient", sort=True)
    counts = groups.size()
    cols = list(features.columns)
    if rule == "mean":
        out = groups[cols].mean()  # skips NaN; all-NaN stays NaN
    elif rule == "first":
        out = frame.drop_duplicates("_patient", keep="first").set_index("_patient")[cols]  # one slide's row
    else:
        raise OncoFMError(f"unknown combine rule {rule!r}; choose mean or first")
    out = out.astype(np.float32)
    out[N_SLIDES] = counts.reindex(out.index).astype(np.int32)
    out.index.name = "patient_id"
    return out


def feature_names_hash(names: Sequence[str]) -> str:
    """sha256 of the feature names in order, one per line."""
    return hashlib.sha256("\n".join(map(str, names)).encode()).hexdigest()


def _source_version(source: str | list[str]) -> str:
    items = source if isinstance(source, list) else [source]
    return hashlib.sha256("\n".join(artifact_version(s) for s in items).encode()).hexdigest()


def _summary_path(layout: RunLayout) -> Path:
    return layout.slide_features.with_suffix(".json")


def import_slide_features(settings: SlideFeatureSettings) -> dict[str, Path]:
    """Import slide-level features into ``settings.run``; returns ``{"features": parquet, "summary": json}``.

    Writes ``RUN/cohort/slide_features.parquet`` (index ``patient_id``, float32 features under their original
    names, ``n_slides``) and ``RUN/cohort/slide_features.json`` (source, counts, unmatched barcodes, feature
    count and names hash, missing share, the combine rule); reuses them when the settings, the source and
    the cohort's patients are unchanged (``redo`` to force). Nothing is written when the input is bad.
    """
    from oncofm.io import write_json, write_parquet

    layout = RunLayout(settings.run)
    layout.require(layout.patients, "Import a cohort first (`oncofm cohort import --run RUN ...`).")
    outputs = {"features": layout.slide_features, "summary": _summary_path(layout)}
    stamp = layout.settings_file(settings.stage)
    inputs = {"source": _source_version(settings.source), "patients": artifact_version(layout.patients)}
    if check_stage(settings, stamp, list(outputs.values()), inputs=inputs, on_change="redo",
                   what="the slide features"):
        log.info("slide features in %s are up to date (redo to re-import)", layout.slide_features)
        return outputs

    rows = read_slide_feature_source(settings)
    names = list(rows.features.columns)
    if settings.expected_features:
        check_feature_set(names, load_feature_names(settings.expected_features),
                          what=f"the features of {settings.source}")
    cohort = pd.read_parquet(layout.patients, columns=["patient_id", "cancer_type"])
    known = set(cohort["patient_id"].astype(str))
    patients = _patients_of(rows, layout)
    matched = patients.isin(known)
    file = str(settings.source if not isinstance(settings.source, list) else Path(settings.source[0]).parent)
    unmatched_barcodes = list(dict.fromkeys(rows.barcodes[~matched]))
    if not matched.any():
        raise DataValidationError(
            f"none of the {len(rows.barcodes)} barcodes ({rows.key} key) matches a patient of the cohort in "
            f"{layout.root} ({len(known)} patients, e.g. {_examples(sorted(known)[:3])}): check that the table "
            "belongs to this cohort and that key / barcode_column are right", file=file,
            rows=unmatched_barcodes)
    if unmatched_barcodes:
        log.warning("slide features: %d of %d barcodes match no cohort patient and are left out (e.g. %s)",
                    len(unmatched_barcodes), rows.barcodes.nunique(), _examples(unmatched_barcodes, 3))
    idx = np.flatnonzero(matched.to_numpy())
    combined = combine_slides(rows.features.iloc[idx].reset_index(drop=True),
                              patients.iloc[idx].reset_index(drop=True),
                              rows.slides.iloc[idx].reset_index(drop=True), settings.combine)
    values = combined[names].to_numpy()
    summary: dict[str, Any] = {
        "source": settings.source, "format": rows.meta["format"], "key": rows.key,
        "barcode_column": rows.meta["barcode_column"], "slide_column": rows.meta["slide_column"],
        "metadata_columns": rows.meta["metadata_columns"], "encoder": rows.meta.get("encoder"),
        "n_rows_read": int(len(rows.barcodes)), "n_rows_matched": int(matched.sum()),
        "n_patients_matched": int(len(combined)), "n_patients_in_cohort": int(len(known)),
        "n_barcodes_unmatched": len(unmatched_barcodes), "unmatched_examples": unmatched_barcodes[:10],
        "n_patients_several_slides": int((combined[N_SLIDES] > 1).sum()),
        "max_slides_per_patient": int(combined[N_SLIDES].max()),
        "combine": settings.combine,
        "combine_rule": ("NaN-aware mean of each feature over the patient's slides" if settings.combine == "mean"
                         else "the values of the patient's first slide by sorted slide id"),
        "n_features": len(names), "feature_names_sha256": feature_names_hash(names),
        "missing_share": float(np.isnan(values).mean()) if values.size else 0.0,
        "missing_share_rows": float(np.isnan(rows.features.iloc[idx].to_numpy()).mean()),
        "missing_values": "kept as NaN; impute with training-split statistics when fitting a model",
    }
    if "cancer_type" in rows.meta:
        theirs = rows.meta["cancer_type"].iloc[idx].to_numpy()
        ours = patients.iloc[idx].map(cohort.set_index("patient_id")["cancer_type"].astype(str)).to_numpy()
        differ = (theirs != "") & (theirs != ours)
        summary["cancer_type_mismatches"] = int(differ.sum())
        if differ.any():
            log.warning("slide features: %d rows name another cancer type than the cohort", int(differ.sum()))
    write_parquet(combined, outputs["features"])
    write_json(summary, outputs["summary"])
    write_stamp(settings, stamp, inputs=inputs)
    log.info("slide features: %d features of %d patients (%d rows; %d barcodes unmatched) -> %s", len(names),
             len(combined), int(matched.sum()), len(unmatched_barcodes), outputs["features"])
    return outputs


def slide_feature_names(table: pd.DataFrame) -> list[str]:
    """The feature columns of a ``slide_features.parquet`` table (``n_slides`` left out)."""
    return [c for c in table.columns if c != N_SLIDES]


def load_slide_features(run: str | Path, expected: Iterable[str] | None = None) -> pd.DataFrame:
    """``RUN/cohort/slide_features.parquet``; with ``expected`` (a model's feature names) checked by
    :func:`check_feature_set` and returned with the features in that order (then ``n_slides``)."""
    layout = RunLayout(run)
    layout.require(layout.slide_features, "Import slide features first "
                                          "(oncofm.cohort.slide_features.import_slide_features).")
    table = pd.read_parquet(layout.slide_features)
    if expected is None:
        return table
    order = check_feature_set(slide_feature_names(table), expected, what=f"the slide features of {run}")
    return table[[*order, N_SLIDES]]
