"""``oncofm cohort import``: run an importer, validate everything, then write the cohort atomically.

Nothing is written unless every table validates, so a bad input leaves no partial cohort behind.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
from pydantic import Field

from oncofm.cohort.importers import ImportedCohort, get_importer
from oncofm.cohort.schema import Col, soft_problems, validate_matrix, validate_patients
from oncofm.config import StageSettings
from oncofm.errors import DataValidationError
from oncofm.io import write_json, write_parquet
from oncofm.paths import RunLayout

log = logging.getLogger(__name__)


class ImportSettings(StageSettings):
    """Settings of ``oncofm cohort import``."""

    stage: ClassVar[str] = "cohort_import"

    format: str = Field(description="importer name: tcga13, firehose, generic, gdc")
    source: str = Field(description="path (file or folder) the importer reads; for gdc a project ID")
    run: str
    clinical: str | None = Field(None, description="clinical table (firehose: TCGA-CDR; generic: any)")
    include_multiomics: bool = True
    covariates: bool = Field(True, description="import stage, grade and histology (oncofm.cohort.clinical); "
                             "tcga13 reads them from the TCGA-CDR table: --clinical, else ../tcga_cdr/"
                             "tcga_cdr_clinical.csv beside --source when it exists")
    log_transform: str = Field("auto", pattern="^(auto|yes|no)$",
                               description="log2(x+1) raw counts-like values: auto detects them")
    options: dict[str, Any] = Field(default_factory=dict, description="format-specific options")
    redo: bool = False


def _file(cohort: ImportedCohort, source: str, what: str) -> str:
    return cohort.files.get(what) or f"{source} ({what})"


def _align(cohort: ImportedCohort, source: str) -> ImportedCohort:
    """Keep patients that have both clinical data and expression; note the rest."""
    pids = pd.Index(cohort.patients[Col.PATIENT].astype(str))
    expr_ids = pd.Index(cohort.expression.index.astype(str))
    both = pids.intersection(expr_ids)
    if len(both) == 0:
        raise DataValidationError(
            f"the clinical table matches no expression rows (clinical IDs like {list(pids[:3])}, "
            f"expression IDs like {list(expr_ids[:3])}); check that both use the same patient barcodes",
            file=_file(cohort, source, "clinical"), column=Col.PATIENT)
    if len(both) < len(pids):
        cohort.notes.append(f"{len(pids) - len(both)} clinical patients have no expression row and were left out")
    if len(both) < len(expr_ids):
        cohort.notes.append(f"{len(expr_ids) - len(both)} expression rows have no clinical record and were left out")
    both_set = set(both)
    order = [p for p in pids if p in both_set]
    cohort.patients = cohort.patients[cohort.patients[Col.PATIENT].astype(str).isin(both)]
    cohort.expression = cohort.expression.loc[order]
    for name in ("cnv", "mutation"):
        m = getattr(cohort, name)
        if m is not None:
            setattr(cohort, name, m.loc[m.index.intersection(pd.Index(order))])
    return cohort


def import_cohort(settings: ImportSettings) -> dict[str, Path]:
    """Import a cohort into ``settings.run``; return the written paths (skips if already imported)."""
    layout = RunLayout(settings.run)
    settings_path = layout.settings_file(settings.stage)
    if (not settings.redo and layout.patients.exists() and layout.expression.exists()
            and settings.same_as_saved(settings_path, ignore=("redo",))):
        log.info("cohort already imported in %s (same settings); skipping", layout.cohort_dir)
        return {"patients": layout.patients, "expression": layout.expression}
    t0 = time.perf_counter()
    cohort = get_importer(settings.format)(settings)
    cohort = _align(cohort, settings.source)
    patients = validate_patients(cohort.patients, file=_file(cohort, settings.source, "clinical"))
    expression = validate_matrix(cohort.expression, file=_file(cohort, settings.source, "expression"))
    extra = {}
    for name in ("cnv", "mutation"):
        m = getattr(cohort, name)
        if m is not None and m.shape[1] > 0:
            extra[name] = validate_matrix(m, file=_file(cohort, settings.source, name), kind=name)
    soft = soft_problems(patients, expression)
    if any(c in patients for c in Col.COVARIATES):
        from oncofm.cohort.clinical import covariate_note

        cohort.notes.append(covariate_note(patients))
    # everything validated: now write
    paths = {"patients": write_parquet(patients, layout.patients, index=False),
             "expression": write_parquet(expression, layout.expression)}
    for name, m in extra.items():
        paths[name] = write_parquet(m, getattr(layout, name))
    if cohort.slides is not None:
        paths["slides"] = write_parquet(cohort.slides, layout.slides_table, index=False)
    notes_path = layout.cohort_dir / "import_notes.json"
    write_json({"notes": cohort.notes, "soft_problems": soft, "n_patients": len(patients),
                "n_genes": expression.shape[1], "seconds": round(time.perf_counter() - t0, 2)}, notes_path)
    paths["notes"] = notes_path
    settings.save(settings_path)
    log.info("imported %d patients × %d genes (%s) in %.1f s", len(patients), expression.shape[1],
             ", ".join(f"{k}: {v.shape[1]} genes" for k, v in extra.items()) or "no cnv/mutation",
             time.perf_counter() - t0)
    for note in cohort.notes:
        log.warning(note)
    for key, value in soft.items():
        if value and key != "gene_overlap_fraction":
            log.warning("soft problem: %s = %s", key, value)
    return paths


def load_patients(run: str | Path) -> pd.DataFrame:
    layout = RunLayout(run)
    layout.require(layout.patients, "Run `oncofm cohort import --run RUN ...` first.")
    return pd.read_parquet(layout.patients)


def load_matrix(run: str | Path, name: str = "expression") -> pd.DataFrame:
    layout = RunLayout(run)
    path = getattr(layout, name)
    layout.require(path, "Run `oncofm cohort import --run RUN ...` first.")
    return pd.read_parquet(path)
