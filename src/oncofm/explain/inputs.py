"""Reading one patient's input for ``oncofm explain`` and the web app: a cohort patient, or an uploaded expression file.

Everything here validates user input and raises :class:`~oncofm.errors.OncoFMError` with a message that
says what to fix; nothing is written.
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from oncofm.cohort.images import image_table, import_source
from oncofm.cohort.patient import PatientInput
from oncofm.cohort.schema import Col
from oncofm.errors import OncoFMError
from oncofm.paths import RunLayout

log = logging.getLogger(__name__)

EXPRESSION_SUFFIXES = (".csv", ".tsv", ".txt", ".parquet", ".csv.gz", ".tsv.gz")
PLAIN_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def known_cancer_types(layout: RunLayout) -> list[str]:
    """Cancer types the run was trained on (those with normalisation statistics)."""
    layout.require(layout.normalization, "Run `oncofm cohort split --run RUN` first.")
    stats = pd.read_parquet(layout.normalization, columns=[Col.CANCER])
    return sorted(t for t in stats[Col.CANCER].unique() if not str(t).startswith("__"))


#: A cancer type the run was not trained on must look like a cancer type code: 2–12 letters or digits,
#: starting with a letter (TCGA project codes such as LUAD, OV, COADREAD; a leading ``TCGA-`` is dropped).
CANCER_CODE = re.compile(r"^[A-Z][A-Z0-9]{1,11}$")


def resolve_cancer_type(cancer_type: str, layout: RunLayout, *, check_format: bool = True) -> tuple[str, bool]:
    """``(cancer type, seen in training)``: a type the run was trained on in the run's spelling (case and a
    ``TCGA-`` prefix ignored), else the code upper-cased and ``False``: the one policy for unseen types in
    ``explain``, the web app and ``evaluate`` is a pan-cancer fallback with a warning
    (:func:`unseen_cancer_type_note`). Raises, listing the known types, for a value that is not a cancer
    type code (:data:`CANCER_CODE`; ``check_format=False`` for the run's own cohort records)."""
    known = known_cancer_types(layout)
    lookup = {k.upper(): k for k in known}
    key = str(cancer_type).strip().upper()
    if key.startswith("TCGA-"):
        key = key[5:]
    if key in lookup:
        return lookup[key], True
    if not check_format:
        return str(cancer_type), False
    if not CANCER_CODE.match(key):
        raise OncoFMError(f"cancer type {cancer_type!r} is not a cancer type code: give a TCGA project code "
                          f"(2–12 letters or digits, e.g. KIRC or TCGA-KIRC); this run was trained on "
                          f"{', '.join(known)} (other codes are accepted with a pan-cancer fallback and a warning)")
    return key, False


def check_cancer_type(cancer_type: str, layout: RunLayout) -> str:
    """The cancer type in the run's spelling (a trained type) or as an upper-cased code (an unseen one);
    raises for a value that is not a cancer type code (see :func:`resolve_cancer_type`)."""
    return resolve_cancer_type(cancer_type, layout)[0]


def unseen_cancer_type_note(cancer_type: str, known: list[str]) -> str:
    """The warning for a cancer type the model was not trained on (report, web app and ``evaluate`` log)."""
    close = difflib.get_close_matches(str(cancer_type).upper(), [k.upper() for k in known], n=1, cutoff=0.75)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return (f"cancer type {cancer_type} was not seen in training{hint} (trained on {', '.join(known)}): the "
            "omics model uses the pan-cancer normalisation statistics and Cox coefficients and its "
            "unknown-cancer-type embedding, so this prediction is less reliable than for a trained type")


def read_expression_file(path: str | Path) -> pd.Series:
    """Read one patient's expression profile.

    Accepted layouts (CSV, TSV or parquet): two columns ``gene, value`` (one row per gene, a header row
    optional), or one row per patient with gene columns (the first row is used; a first text column is
    taken as the patient ID). Values must be in the same units as the run's cohort (for tcga13: the
    per-cohort RNA-seq z-scores).
    """
    path = Path(path)
    if not path.is_file():
        raise OncoFMError(f"expression file {path} does not exist")
    df = _read_table(path)
    if df.shape[1] == 2 and not _is_numeric(df.iloc[:, 0]):
        series = pd.Series(pd.to_numeric(df.iloc[:, 1], errors="coerce").to_numpy(),
                           index=df.iloc[:, 0].astype(str).str.strip())
    else:
        if df.shape[0] == 0:
            raise OncoFMError(f"{path}: no rows; expected one patient row with gene columns or gene,value rows")
        first = df.iloc[0]
        if not _is_numeric(df.iloc[:, 0]):
            first = first.iloc[1:]
        series = pd.to_numeric(first, errors="coerce")
        series.index = series.index.astype(str).str.strip()
    series = series[~series.index.duplicated()].astype(float)
    series = series.replace([np.inf, -np.inf], np.nan)
    if series.notna().sum() == 0:
        raise OncoFMError(f"{path}: no numeric expression values found; expected gene,value rows or one "
                          "patient row with gene columns")
    series.name = "expression"
    return series


def read_slide_features_file(path: str | Path) -> pd.Series:
    """Read one patient's slide-level image features: ``feature, value`` rows, or one row with a column per
    feature (e.g. that patient's row of the hif2gene table; metadata columns such as ``patient_id``,
    ``cancer_type``, ``slide_key`` are left out). Empty values are missing; text or infinite values are an
    error. The feature set is checked against the model's when it runs."""
    from oncofm.cohort.slide_features import METADATA_COLUMNS

    path = Path(path)
    raw = _one_patient_table(path, "slide-feature", "feature",
                             lambda row: row[[c for c in row.index if str(c).strip().lower() not in METADATA_COLUMNS]])
    values, bad = _numbers(raw)
    if bad:
        raise OncoFMError(f"{path}: {len(bad)} slide features are not numbers (e.g. {bad[:3]}); give numbers, or "
                          "leave a value empty when it is missing")
    if np.isinf(values.to_numpy(dtype=float)).any():
        raise OncoFMError(f"{path}: infinite slide-feature values; give finite numbers or leave them empty")
    if raw.index.duplicated().any():
        raise OncoFMError(f"{path}: feature {raw.index[raw.index.duplicated()][0]!r} is given twice")
    return values.astype(float).rename("slide_features")


def read_cnv_file(path: str | Path) -> pd.Series:
    """Read one patient's copy-number profile: ``gene, level`` rows, or one row with a column per gene (a
    first text column taken as the patient ID). Levels as in the training cohort (tcga13: GISTIC thresholded
    -2 deep deletion .. 2 amplification); empty = not measured; the values are checked when the model runs
    (:func:`oncofm.omics.predict.validate_layer_inputs`)."""
    path = Path(path)
    raw = _one_patient_table(path, "copy-number", "gene", value="level",  # a first text column: the patient ID
                             trim=lambda row: row.iloc[1:] if pd.isna(pd.to_numeric(row.iloc[0], errors="coerce")) else row)
    values, bad = _numbers(raw)
    if bad:
        raise OncoFMError(f"{path}: copy-number levels must be numbers (e.g. -2..2); not for {', '.join(bad[:5])}")
    if raw.index.duplicated().any():
        raise OncoFMError(f"{path}: gene {raw.index[raw.index.duplicated()][0]!r} is given twice")
    if values.notna().sum() == 0:
        raise OncoFMError(f"{path}: no copy-number levels found; expected gene,level rows")
    return values.astype(float).rename("cnv")


#: a gene symbol as a mutation list may name it (HGNC-like: letters, digits, '-', '.', '_')
GENE_SYMBOL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,30}$")


def parse_mutations(value: str | Path | list[str]) -> list[str]:
    """A new patient's mutated genes: a list of symbols, a comma- (or space-) separated string (``TP53,KRAS``),
    or a file with one gene per line, a ``Hugo_Symbol`` column (a MAF) or a ``gene`` column (a string is read
    as a file only by the command line; the web app passes lists). Genes not listed count as wild-type. An
    empty list is allowed (every gene wild-type)."""
    text = "" if isinstance(value, list | tuple) else str(value).strip()
    path = Path(text)
    if isinstance(value, list | tuple):
        genes = [str(g).strip() for g in value if str(g).strip()]
    elif path.suffix.lower() in (".csv", ".tsv", ".txt", ".maf", ".gz", ".parquet") or path.is_file():
        if not path.is_file():
            raise OncoFMError(f"mutation file {path} does not exist")
        if path.name.lower().endswith((".csv", ".tsv", ".maf", ".parquet", ".csv.gz", ".tsv.gz", ".maf.gz")):
            df = (pd.read_parquet(path) if path.suffix.lower() == ".parquet" else
                  pd.read_csv(path, sep="," if ".csv" in path.name.lower() else "\t", comment="#", dtype=str))
            cols = {str(c).lower(): c for c in df.columns}
            col = cols.get("hugo_symbol") or cols.get("gene") or cols.get("symbol")
            if col is None:
                raise OncoFMError(f"{path}: no Hugo_Symbol or gene column (columns: {', '.join(map(str, df.columns[:8]))})")
            genes = df[col].dropna().astype(str).str.strip().tolist()
        else:
            genes = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    else:
        genes = [g for g in re.split(r"[,;\s]+", text) if g]
    bad = [g for g in genes if not GENE_SYMBOL.match(g)]
    if bad:
        raise OncoFMError(f"mutations: {', '.join(repr(b) for b in bad[:5])} do not look like gene symbols; give HGNC "
                          "symbols such as TP53,KRAS (or a file with one per line)")
    return sorted(set(genes))


def layer_input_notes(patient: PatientInput, features: dict[str, list[str]]) -> list[str]:
    """Notes for the report on a new patient's CNV / mutation input: inputs an expression-only model ignores,
    and listed genes that are not among the model's features (they cannot change its prediction)."""
    notes = []
    given = {"cnv": patient.cnv, "mutation": patient.mutation}
    for layer, value in given.items():
        if value is None or patient.source == "cohort":
            continue
        what = "copy-number profile" if layer == "cnv" else "mutation list"
        if layer not in features:
            notes.append(f"the {what} was not used: this run's omics model was trained without {layer} input")
            continue
        names = list(value) if isinstance(value, list) else [str(g) for g in pd.Series(value).dropna().index]
        model = set(features[layer])
        unused, used = sorted(set(names) - model), sorted(set(names) & model)
        if unused:
            rest = ("; the model's other mutation features count as wild-type" if layer == "mutation" else
                    "; the model's other copy-number features count as not measured")
            notes.append(f"{what}: {len(used)} of the listed genes are among the model's {len(model)} {layer} "
                         f"features ({', '.join(used[:8]) or 'none'}); {len(unused)} are not and were not used "
                         f"({', '.join(unused[:8])}{', ...' if len(unused) > 8 else ''}){rest}")
    return notes


def _one_patient_table(path: Path, what: str, key: str, trim: Callable[[pd.Series], pd.Series],
                       value: str = "value") -> pd.Series:
    """One patient's values as read (text kept): ``key, value`` rows, or the single row of a table with a
    column per ``key`` (``trim`` drops its non-value columns); raises for a missing file or several rows."""
    if not path.is_file():
        raise OncoFMError(f"{what} file {path} does not exist")
    df = _read_table(path, what=what)
    if df.shape[1] == 2 and not _is_numeric(df.iloc[:, 0]):
        return pd.Series(df.iloc[:, 1].to_numpy(), index=df.iloc[:, 0].astype(str).str.strip())
    if df.shape[0] != 1:
        raise OncoFMError(f"{path}: {df.shape[0]} rows; give one patient: {key},{value} rows or one row with a "
                          f"column per {key}")
    raw = trim(df.iloc[0])
    raw.index = raw.index.astype(str).str.strip()
    return raw


def _numbers(raw: pd.Series) -> tuple[pd.Series, list[str]]:
    """``raw`` as numbers (empty = NaN), and the keys whose value is text."""
    values = pd.to_numeric(raw, errors="coerce")
    bad = [str(k) for k, v in raw.items() if pd.isna(values[k]) and not (pd.isna(v) or str(v).strip() == "")]
    return values, bad


def _read_table(path: Path, what: str = "expression") -> pd.DataFrame:
    name = path.name.lower()
    try:
        if name.endswith(".parquet"):
            return pd.read_parquet(path)
        sep = "\t" if name.endswith((".tsv", ".tsv.gz", ".txt")) else ","
        df = pd.read_csv(path, sep=sep)
        if df.shape[1] == 1 and sep == ",":  # perhaps tab-separated after all
            df = pd.read_csv(path, sep="\t")
        return df
    except (ValueError, OSError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise OncoFMError(f"cannot read {what} file {path}: {exc}. Expected CSV, TSV or parquet.") from None


def _is_numeric(col: pd.Series) -> bool:
    return pd.to_numeric(col, errors="coerce").notna().mean() > 0.9


def cohort_patient(layout: RunLayout, patient_id: str) -> PatientInput:
    """A patient of the run's cohort: cancer type, raw expression row and slide (if any)."""
    layout.require(layout.patients, "Run `oncofm cohort import --run RUN ...` first.")
    patients = pd.read_parquet(layout.patients).set_index(Col.PATIENT)
    if patient_id not in patients.index:
        examples = ", ".join(patients.index[:3])
        raise OncoFMError(f"patient {patient_id!r} is not in {layout.patients} (IDs look like {examples})")
    cancer = str(patients.loc[patient_id, Col.CANCER])
    expression = None
    if layout.expression.exists():
        expr = pd.read_parquet(layout.expression)
        if patient_id in expr.index:
            expression = expr.loc[patient_id].astype(float)
    split = None
    if layout.splits.exists():
        sp = pd.read_parquet(layout.splits).set_index(Col.PATIENT)
        split = str(sp.loc[patient_id, "split"]) if patient_id in sp.index else None
    slide, mpp = cohort_slide_path(layout, patient_id)
    features = None
    if layout.slide_features.exists():
        from oncofm.cohort.slide_features import slide_feature_names

        table = pd.read_parquet(layout.slide_features)
        if patient_id in table.index:
            features = table.loc[patient_id, slide_feature_names(table)].astype(float)
    layers = {}
    for name, path in (("cnv", layout.cnv), ("mutation", layout.mutation)):  # what a multi-omics model reads
        if path.exists():
            matrix = pd.read_parquet(path)
            if patient_id in matrix.index:
                layers[name] = matrix.loc[patient_id].astype(float)
    age = patients.loc[patient_id].get(Col.AGE)
    sex = patients.loc[patient_id].get(Col.SEX)
    stage, grade = patients.loc[patient_id].get(Col.STAGE), patients.loc[patient_id].get(Col.GRADE)
    return PatientInput(patient_id=patient_id, cancer_type=cancer, expression=expression,
                        slide=slide, mpp=mpp, source="cohort", split=split,
                        age=float(age) if age is not None and pd.notna(age) else None,
                        sex=str(sex) if sex is not None and pd.notna(sex) else None, slide_features=features,
                        cnv=layers.get("cnv"), mutation=layers.get("mutation"),
                        stage=float(stage) if stage is not None and pd.notna(stage) else None,
                        grade=float(grade) if grade is not None and pd.notna(grade) else None)


def cohort_slide_path(layout: RunLayout, patient_id: str) -> tuple[Path | None, float | None]:
    """The H&E image of a cohort patient that exists on disk, with its mpp when known.

    Looks first in ``images.csv`` of the import source (``patient_id, file, mpp``: the bundled demo
    cohort's real H&E images), then in ``cohort/slides.parquet`` (``patient_id, slide_id``).
    """
    for row in image_table(layout).itertuples():
        if row.patient_id == patient_id and Path(row.path).is_file():
            return Path(row.path), (float(row.mpp) if pd.notna(row.mpp) else None)
    if not layout.slides_table.exists():
        return None, None
    slides = pd.read_parquet(layout.slides_table)
    ids = slides.loc[slides[Col.PATIENT].astype(str) == patient_id, "slide_id"].astype(str).tolist()
    for slide_id in ids:
        for folder in _slide_folders(layout):
            cand = Path(slide_id) if Path(slide_id).is_absolute() else folder / slide_id
            if cand.is_file():
                return cand, None
    return None, None


def _slide_folders(layout: RunLayout) -> list[Path]:
    """Folders where relative slide IDs are looked up: the run, and the import source (+ slides/, images/)."""
    folders = [layout.root, layout.cohort_dir]
    src = import_source(layout)
    if src is not None:
        folders += [src, src / "slides", src / "images"]
    return folders


def parse_clinical_input(value: str | None, kind: str) -> float | None:
    """``--stage`` / ``--grade`` of a new patient as 1-4 (None: not given or unknown); unrecognised text stops."""
    from oncofm.cohort.clinical import parse_grade, parse_stage

    if value is None or str(value).strip() == "":
        return None
    level = (parse_stage if kind == "stage" else parse_grade)(value)
    if level is None:
        examples = "I, II, IIIA, IV, 'Stage IIB'" if kind == "stage" else "1-4, G1-G4, 'High Grade'"
        raise OncoFMError(f"--{kind} {value!r} is not a {kind} OncoFM reads; give e.g. {examples} (or leave it out)")
    return None if np.isnan(level) else float(level)


def _check_sex(sex: str | None) -> str | None:
    if sex is None or sex == "":
        return None
    value = sex.strip().lower()
    value = {"f": "female", "m": "male"}.get(value, value)
    if value not in ("female", "male"):
        raise OncoFMError(f"--sex {sex!r}: expected female or male (or leave it out)")
    return value


def _new_patient(cancer_type: str, *, expression: str | Path | None, age: float | None, sex: str | None,
                 slide_features: str | Path | None, stage: str | None, grade: str | None, cnv: str | Path | None,
                 mutations: str | Path | list[str] | None) -> PatientInput:
    """A new patient from uploaded files and values, each read and validated."""
    patient = PatientInput(patient_id="new-patient", cancer_type=cancer_type, expression=None,
                           slide=None, mpp=None, source="upload", age=age, sex=_check_sex(sex))
    if expression:
        patient.expression = read_expression_file(expression)
        patient.patient_id = Path(expression).name.split(".")[0] or "new-patient"
    if slide_features:
        patient.slide_features = read_slide_features_file(slide_features)
    patient.stage, patient.grade = parse_clinical_input(stage, "stage"), parse_clinical_input(grade, "grade")
    if cnv:
        patient.cnv = read_cnv_file(cnv)
    if mutations is not None:
        patient.mutation = parse_mutations(mutations)
    return patient


def resolve_patient(layout: RunLayout, *, patient_id: str | None, expression: str | Path | None,
                    cancer_type: str | None, slide: str | Path | None, mpp: float | None,
                    age: float | None = None, sex: str | None = None,
                    slide_features: str | Path | None = None, stage: str | None = None,
                    grade: str | None = None, cnv: str | Path | None = None,
                    mutations: str | Path | list[str] | None = None) -> PatientInput:
    """Turn the command-line choices into one :class:`PatientInput`, validating each."""
    if patient_id and (expression or slide_features or cnv or mutations is not None):
        raise OncoFMError("give either --patient-id (a patient of the run) or a new patient's files "
                          "(--expression / --slide / --slide-features / --cnv / --mutations), not both")
    if (cnv or mutations is not None) and not expression:
        raise OncoFMError("--cnv / --mutations go with --expression: the omics model reads them beside a "
                          "patient's expression profile")
    if not patient_id and not expression and not slide and not slide_features:
        raise OncoFMError("nothing to explain: give --patient-id, or --expression FILE, --slide FILE and/or "
                          "--slide-features FILE")
    if mpp is not None and not (0.01 <= mpp <= 100):
        raise OncoFMError(f"--mpp {mpp} is not a plausible microns-per-pixel value (0.01–100; 0.25 = 40x, 0.5 = 20x)")
    if patient_id:
        patient = cohort_patient(layout, patient_id)
        if cancer_type:
            check = check_cancer_type(cancer_type, layout)
            if check.upper() != patient.cancer_type.upper():
                raise OncoFMError(f"--cancer-type {cancer_type} contradicts the cohort record of {patient_id} "
                                  f"({patient.cancer_type}); leave it out")
    else:
        if not cancer_type:
            raise OncoFMError("--cancer-type is required with --expression/--slide/--slide-features (one of "
                              f"{', '.join(known_cancer_types(layout))})")
        patient = _new_patient(cancer_type, expression=expression, age=age, sex=sex, slide_features=slide_features,
                               stage=stage, grade=grade, cnv=cnv, mutations=mutations)
    patient.cancer_type, seen = resolve_cancer_type(patient.cancer_type, layout, check_format=not patient_id)
    if not seen:
        note = unseen_cancer_type_note(patient.cancer_type, known_cancer_types(layout))
        log.warning("%s", note)
        patient.notes.append(note)
    if slide:
        slide = Path(slide)
        if not slide.is_file():
            raise OncoFMError(f"slide file {slide} does not exist")
        patient.slide = slide
    if mpp is not None:
        patient.mpp = float(mpp)
    return patient
