"""Importer for GDAC Firehose "RSEM genes normalized" matrices joined to the TCGA-CDR clinical table.

The Firehose file (``<COHORT>.rnaseqv2__illuminahiseq_rnaseqv2__unc_edu__Level_3__RSEM_genes_normalized__
data.data.txt``) is tab-separated, genes as rows::

    Hybridization REF   TCGA-A1-A0SB-01A-11R-A144-07   TCGA-A1-A0SD-01A-11R-A115-07 ...
    gene_id             normalized_count               normalized_count ...
    ?|100130426         0.0000                         0.0000
    A1BG|1              197.1807                       237.3844

Gene IDs are ``SYMBOL|ENTREZID`` (``?|ENTREZID`` when there is no symbol: dropped, counted). Only
primary-tumour samples (sample type ``01``) are kept, one per patient (the barcode that sorts first
when a patient has several aliquots; counted in the notes), and joined to ``--clinical`` (TCGA-CDR,
Liu et al. 2018) on the patient barcode (first 12 characters). ``--source`` is one file or a folder of
them (one per cohort; genes missing from some cohorts become NaN). Values are RSEM upper-quartile
normalised counts, so ``--log-transform auto`` applies log2(x+1).
"""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import pandas as pd

from oncofm.cohort.importers.common import (
    dedupe_symbols,
    maybe_log2,
    primary_tumour_one_per_patient,
    read_cdr,
)
from oncofm.cohort.importers.registry import ImportedCohort, register_importer
from oncofm.cohort.schema import Col
from oncofm.errors import DataValidationError, OncoFMError
from oncofm.logging_utils import track

log = logging.getLogger(__name__)

FIRST_CELL = "Hybridization REF"
SECOND_CELL = "gene_id"


def _open_text(path: Path):  # noqa: ANN202
    return gzip.open(path, "rt") if path.name.endswith(".gz") else open(path)  # noqa: SIM115


def read_firehose_matrix(path: Path, notes: list[str]) -> pd.DataFrame:
    """One Firehose RSEM matrix → primary-tumour patients × gene symbols (values as in the file)."""
    with _open_text(path) as fh:
        first = fh.readline().rstrip("\n").split("\t")
        second = fh.readline().rstrip("\n").split("\t")
    if first[0] != FIRST_CELL or second[0] != SECOND_CELL:
        raise DataValidationError(
            f"not a Firehose RSEM matrix: expected the first column to start with '{FIRST_CELL}' then "
            f"'{SECOND_CELL}', found {first[0]!r}, {second[0] if second else ''!r}", file=str(path))
    samples = first[1:]
    dup = sorted({s for s in samples if samples.count(s) > 1}) if len(set(samples)) < len(samples) else []
    if dup:
        raise DataValidationError("duplicate sample barcodes in the header", file=str(path),
                                  column=FIRST_CELL, rows=dup)
    raw = pd.read_csv(path, sep="\t", skiprows=2, header=None, index_col=0, low_memory=False,
                      dtype={0: str})
    if raw.shape[1] != len(samples):
        raise DataValidationError(f"{raw.shape[1]} value columns but {len(samples)} sample barcodes",
                                  file=str(path))
    raw.columns = samples
    gene_ids = raw.index.astype(str)
    if gene_ids.has_duplicates:
        raise DataValidationError("duplicated genes", file=str(path), column=SECOND_CELL,
                                  rows=sorted(set(gene_ids[gene_ids.duplicated()])))
    symbols = gene_ids.str.split("|").str[0]
    no_symbol = (symbols == "?") | (symbols == "")
    if no_symbol.any():
        notes.append(f"{path.name}: {int(no_symbol.sum())} genes without a symbol ('?|id') dropped")
    raw = raw.loc[~no_symbol]
    raw.index = symbols[~no_symbol]
    keep = primary_tumour_one_per_patient(samples, notes, str(path))
    expr = raw[list(keep.values())].T
    expr.index = pd.Index(list(keep.keys()), name=Col.PATIENT)
    return dedupe_symbols(expr, notes)


def _files(source: Path) -> list[Path]:
    if source.is_file():
        return [source]
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if "RSEM_genes_normalized" in p.name
                       and p.name.endswith((".txt", ".txt.gz", ".tsv", ".tsv.gz")))
        if files:
            return files
        raise OncoFMError(f"{source} has no '*RSEM_genes_normalized*.txt' Firehose files")
    raise OncoFMError(f"--source {source} does not exist")


@register_importer("firehose")
def import_firehose(settings) -> ImportedCohort:  # noqa: ANN001 - ImportSettings (import cycle)
    if not settings.clinical:
        raise OncoFMError("the firehose format needs --clinical (the TCGA-CDR clinical table, "
                          "e.g. ../shared/data/tcga_cdr/tcga_cdr_clinical.csv)")
    notes: list[str] = []
    files = _files(Path(settings.source))
    mats = [read_firehose_matrix(f, notes) for f in track(files, "reading Firehose matrices",
                                                           enabled=len(files) > 1)]
    expr = mats[0] if len(mats) == 1 else pd.concat(mats, axis=0, join="outer")
    if len(mats) > 1:
        in_all = set.intersection(*(set(m.columns) for m in mats))
        if len(in_all) < expr.shape[1]:
            notes.append(f"{expr.shape[1] - len(in_all)} genes missing in some cohort files (NaN there)")
    expr = maybe_log2(expr, settings.log_transform, str(settings.source), notes)
    patients = read_cdr(settings.clinical, notes, settings.options.get("missing_survival", "error"),
                        covariates=getattr(settings, "covariates", True))
    patients = patients.assign(**{Col.SOURCE: "firehose+tcga_cdr"})
    matched = patients[Col.PATIENT].isin(expr.index)
    if matched.any():
        # TCGA-CDR covers all 33 projects: its rows of other cohorts are not a problem worth a note
        patients = patients[matched]
    return ImportedCohort(patients=patients, expression=expr,
                          notes=notes, files={"clinical": str(settings.clinical),
                                              "expression": str(settings.source)})
