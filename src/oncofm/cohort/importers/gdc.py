"""Importer for a GDC project (``--source TCGA-BRCA``, ``CPTAC-3``, ...) through the GDC REST API.

1. ``/files``: the open STAR-Counts gene-expression files of the project, primary tumours only (one
   per patient: the sample barcode that sorts first), and its diagnostic slides;
2. ``/cases`` (``expand=demographic,diagnoses``): vital status, days to death, days to last follow-up
   (the largest over the case's diagnoses), age and gender; AJCC pathologic stage and tumour grade (the
   first diagnosis recording one; mapped by :mod:`oncofm.cohort.clinical`);
3. ``/data/{file_id}``: each expression file, resumable and md5-verified, kept under
   ``RUN/downloads/gdc/<project>/`` (a rerun downloads nothing twice);
4. STAR counts → TPM per gene symbol (protein-coding genes; ``--option gene_type=all`` keeps all) →
   log2(TPM + 1).

Overall survival: dead → ``days_to_death`` with event 1; alive → ``days_to_last_follow_up`` with event 0.
The diagnostic slides are listed in ``slides.parquet`` and ``slides_manifest.tsv`` (gdc-client format)
but not downloaded (hundreds of MB each). Options: every :class:`~oncofm.cohort.gdc.GDCSettings` field
(``base_url``, ``timeout_s``, ``retries``, ``backoff_s``, ``page_size``...), ``max_files`` (a quick
subset), ``gene_type``, ``cancer_type`` (default: the project ID without ``TCGA-``; for other projects each case's
``primary_site``), ``download_dir``,
``missing_survival=error|drop``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from oncofm.cohort.gdc import (
    GDCClient,
    GDCSettings,
    iter_downloads,
    read_star_counts,
    write_gdc_manifest,
)
from oncofm.cohort.importers.registry import ImportedCohort, register_importer
from oncofm.cohort.schema import Col
from oncofm.errors import OncoFMError
from oncofm.paths import RunLayout

log = logging.getLogger(__name__)

OWN_OPTIONS = ("max_files", "gene_type", "cancer_type", "download_dir", "missing_survival")


def _split_options(options: dict) -> tuple[GDCSettings, dict]:
    fields = set(GDCSettings.model_fields)
    unknown = sorted(set(options) - fields - set(OWN_OPTIONS))
    if unknown:
        raise OncoFMError(f"unknown gdc option(s) {unknown}; known: {', '.join([*sorted(fields), *OWN_OPTIONS])}")
    return GDCSettings.build(**{k: v for k, v in options.items() if k in fields}), \
        {k: v for k, v in options.items() if k in OWN_OPTIONS}


def clinical_to_patients(clinical: pd.DataFrame, cancer_type: str | None, notes: list[str],
                         missing_survival: str = "error") -> pd.DataFrame:
    """GDC case records → the cohort's patient table (overall survival in days).

    ``cancer_type=None`` takes each case's ``primary_site`` (multi-cancer projects such as CPTAC-3),
    falling back to its project ID.
    """
    if cancer_type is None:
        cancer = clinical["primary_site"].where(clinical["primary_site"].notna(), clinical["project"])
    else:
        cancer = cancer_type
    vital = clinical["vital_status"].astype("string").str.lower()
    dead = vital == "dead"
    alive = vital == "alive"
    death = pd.to_numeric(clinical["days_to_death"], errors="coerce")
    follow = pd.to_numeric(clinical["days_to_last_follow_up"], errors="coerce")
    os_days = np.where(dead, death, np.where(alive, follow, np.nan))
    out = pd.DataFrame({
        Col.PATIENT: clinical["patient_id"].astype(str),
        Col.CANCER: cancer,
        Col.AGE: pd.to_numeric(clinical["age"], errors="coerce"),
        Col.SEX: clinical["gender"].astype("string").str.lower().where(
            clinical["gender"].astype("string").str.lower().isin(["female", "male"])),
        Col.OS_DAYS: os_days,
        Col.OS_EVENT: np.where(dead, 1.0, np.where(alive, 0.0, np.nan)),
        Col.SOURCE: "gdc",
    })
    from oncofm.cohort.clinical import parse_grades, parse_stages

    for col, parse, field in ((Col.STAGE, parse_stages, "diagnoses.ajcc_pathologic_stage"),
                              (Col.GRADE, parse_grades, "diagnoses.tumor_grade")):
        if col in clinical:
            out[col] = parse(clinical[col], file="GDC /cases", column=field)
    if missing_survival == "drop":
        miss = out[Col.OS_DAYS].isna() | out[Col.OS_EVENT].isna()
        if miss.any():
            notes.append(f"{int(miss.sum())} GDC cases without vital status or survival days left out")
            out = out[~miss]
    return out


@register_importer("gdc")
def import_gdc(settings) -> ImportedCohort:  # noqa: ANN001 - ImportSettings (import cycle)
    project = str(settings.source)
    gdc_settings, opts = _split_options(dict(settings.options))
    folder = Path(opts.get("download_dir") or RunLayout(settings.run).downloads_dir / "gdc" / project)
    # TCGA projects are one cancer type each; others (CPTAC-3) mix them: per-case primary site
    cancer = opts.get("cancer_type") or (project.split("-", 1)[1] if project.startswith("TCGA-") else None)
    gene_type = opts.get("gene_type", "protein_coding")
    notes: list[str] = []
    with GDCClient(gdc_settings) as client:
        log.info("querying GDC %s for %s", gdc_settings.base_url, project)
        manifest = client.expression_manifest(project)
        if manifest.empty:
            raise OncoFMError(f"GDC has no open STAR-Counts expression files for project {project!r} "
                              f"(check the project ID, e.g. TCGA-BRCA or CPTAC-3)")
        primary = manifest[manifest["sample_type"] == "Primary Tumor"].sort_values(["patient_id", "sample"])
        if len(primary) < len(manifest):
            notes.append(f"{len(manifest) - len(primary)} non-primary-tumour expression files skipped")
        one = primary.drop_duplicates("patient_id")
        if len(one) < len(primary):
            notes.append(f"{len(primary) - len(one)} extra primary-tumour files of the same patient skipped")
        if opts.get("max_files"):
            one = one.head(int(opts["max_files"]))
        write_gdc_manifest(one, folder / "expression_manifest.tsv")
        one.to_csv(folder / "expression_files.csv", index=False)
        clinical = client.clinical(project)
        if clinical.empty:
            raise OncoFMError(f"GDC returned no cases for project {project!r}")
        slides = client.slide_manifest(project)
        if not slides.empty:
            write_gdc_manifest(slides, folder / "slides_manifest.tsv")
        columns = {}
        for row, path in iter_downloads(client, one, folder):
            columns[row["patient_id"]] = read_star_counts(path, gene_type=None if gene_type == "all" else gene_type)
    expr = pd.DataFrame(columns).T  # patients × genes (TPM)
    expr.index.name = Col.PATIENT
    if settings.log_transform != "no":
        expr = np.log2(expr + 1.0)
        notes.append("expression is log2(TPM + 1) of GDC STAR-Counts tpm_unstranded")
    patients = clinical_to_patients(clinical, cancer, notes, opts.get("missing_survival", "error"))
    patients = patients[patients[Col.PATIENT].isin(expr.index)] if patients[Col.PATIENT].isin(expr.index).any() \
        else patients
    slide_table = (pd.DataFrame({Col.PATIENT: slides["patient_id"].astype(str), "slide_id": slides["file_name"]})
                   if not slides.empty else None)
    return ImportedCohort(patients=patients, expression=expr, slides=slide_table, notes=notes,
                          files={"clinical": f"GDC /cases ({project})",
                                 "expression": f"GDC STAR-Counts files ({folder})"})
