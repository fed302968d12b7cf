"""A client for the NCI Genomic Data Commons REST API (https://api.gdc.cancer.gov).

Endpoints used, as the GDC API documentation describes them:

- ``POST /files`` and ``POST /cases`` with a JSON body ``{"filters": ..., "fields": "a,b", "expand":
  "demographic,diagnoses", "format": "JSON", "size": N, "from": K}``; the answer is
  ``{"data": {"hits": [...], "pagination": {"count", "total", "size", "from", "page", "pages"}},
  "warnings": {}}``. Filters are nested ``{"op": "and"|"in"|"=", "content": ...}`` objects.
- ``GET /data/{file_id}`` streams one file; a ``Range: bytes=N-`` header resumes it (``206 Partial
  Content``).

Downloads are resumable and verified: bytes go to ``<name>.part``; after a timeout, a connection error,
a 5xx/429 answer or a truncated body the next attempt asks for the missing range; a finished file whose
md5 differs from the manifest's is deleted and fetched again. Every loop is bounded (``retries``), with
exponential backoff between attempts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
from pydantic import Field

from oncofm.config import StageSettings
from oncofm.errors import OncoFMError

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.gdc.cancer.gov"
STAR_COUNTS = {"data_type": "Gene Expression Quantification", "analysis.workflow_type": "STAR - Counts"}
DIAGNOSTIC_SLIDES = {"data_type": "Slide Image", "experimental_strategy": "Diagnostic Slide"}
FILE_FIELDS = ("file_id", "file_name", "md5sum", "file_size", "cases.submitter_id", "cases.case_id",
               "cases.samples.submitter_id", "cases.samples.sample_type")
CASE_FIELDS = ("case_id", "submitter_id", "project.project_id", "primary_site", "disease_type",
               "demographic.vital_status", "demographic.days_to_death", "demographic.gender",
               "demographic.age_at_index", "diagnoses.days_to_last_follow_up", "diagnoses.age_at_diagnosis",
               "diagnoses.ajcc_pathologic_stage", "diagnoses.tumor_grade")


class GDCSettings(StageSettings):
    """How to talk to the GDC (every field can be given as ``--option KEY=VALUE`` to ``cohort import``)."""

    stage: ClassVar[str] = "gdc"

    base_url: str = Field(DEFAULT_BASE_URL, description="GDC API root (tests point it at a local server)")
    timeout_s: float = Field(60.0, gt=0, description="connect/read timeout of one request")
    retries: int = Field(6, ge=0, le=50, description="extra attempts after a failed request or download")
    backoff_s: float = Field(1.0, ge=0, description="first wait between attempts; doubles each time")
    backoff_max_s: float = Field(60.0, ge=0)
    page_size: int = Field(500, ge=1, le=10000, description="hits per /files or /cases page")


class _Retryable(Exception):
    """A transient failure (5xx, 429, truncated body): try again."""


def filters_for(project: str, **equals: str | list[str]) -> dict[str, Any]:
    """A GDC filter: files (or cases) of ``project`` whose fields equal the given values."""
    content = [{"op": "in", "content": {"field": "cases.project.project_id", "value": [project]}}]
    for field, value in equals.items():
        content.append({"op": "in", "content": {"field": field, "value": value if isinstance(value, list)
                                                 else [value]}})
    return {"op": "and", "content": content}


def md5_of(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()  # noqa: S324 - GDC publishes md5 checksums
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


class GDCClient:
    """Query and download from the GDC API (``with GDCClient(settings) as gdc: ...``)."""

    def __init__(self, settings: GDCSettings | None = None) -> None:
        import httpx

        self.settings = settings or GDCSettings()
        self._http = httpx.Client(base_url=self.settings.base_url.rstrip("/"),
                                  timeout=httpx.Timeout(self.settings.timeout_s),
                                  headers={"User-Agent": "oncofm"}, follow_redirects=True)

    def __enter__(self) -> GDCClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # --- retries -------------------------------------------------------------------------------
    def _sleep(self, attempt: int) -> None:
        time.sleep(min(self.settings.backoff_s * (2 ** attempt), self.settings.backoff_max_s))

    def _transient(self) -> tuple[type[BaseException], ...]:
        import httpx

        return (httpx.TimeoutException, httpx.TransportError, _Retryable)

    def _post_json(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        last: BaseException | None = None
        for attempt in range(self.settings.retries + 1):
            try:
                r = self._http.post(f"/{endpoint}", json=body)
                if r.status_code >= 500 or r.status_code == 429:
                    raise _Retryable(f"HTTP {r.status_code}")
                if r.status_code >= 400:
                    raise OncoFMError(f"GDC /{endpoint} refused the query (HTTP {r.status_code}): {r.text[:300]}")
                return r.json()
            except self._transient() as exc:
                last = exc
                log.warning("GDC /%s failed (%s); attempt %d of %d", endpoint, exc, attempt + 1,
                            self.settings.retries + 1)
                if attempt < self.settings.retries:
                    self._sleep(attempt)
            except json.JSONDecodeError as exc:
                raise OncoFMError(f"GDC /{endpoint} answered with something that is not JSON: {exc}") from None
        raise OncoFMError(f"GDC /{endpoint} failed after {self.settings.retries + 1} attempts "
                          f"({last}); check --option base_url={self.settings.base_url} and the network")

    # --- queries -------------------------------------------------------------------------------
    def query(self, endpoint: str, filters: dict[str, Any], fields: tuple[str, ...],
              expand: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """All hits of ``/files`` or ``/cases`` for ``filters``, page by page (bounded by the reported total)."""
        hits: list[dict[str, Any]] = []
        start, total = 0, None
        while total is None or start < total:
            body = {"filters": filters, "fields": ",".join(fields), "format": "JSON",
                    "size": self.settings.page_size, "from": start}
            if expand:
                body["expand"] = expand
            data = self._post_json(endpoint, body).get("data")
            if not isinstance(data, dict) or "hits" not in data or "pagination" not in data:
                raise OncoFMError(f"GDC /{endpoint}: unexpected answer (no data.hits / data.pagination)")
            page = data["hits"]
            total = int(data["pagination"].get("total", len(page)))
            hits.extend(page)
            if not page or (limit is not None and len(hits) >= limit):
                break
            start += len(page)
        return hits[:limit] if limit is not None else hits

    def expression_manifest(self, project: str, limit: int | None = None) -> pd.DataFrame:
        """STAR-Counts files of ``project``: file_id, file_name, md5sum, file_size, patient_id, sample, sample_type."""
        hits = self.query("files", filters_for(project, access="open", **STAR_COUNTS), FILE_FIELDS,
                          limit=limit)
        return pd.DataFrame([_file_row(h) for h in hits],
                            columns=["file_id", "file_name", "md5sum", "file_size", "patient_id", "sample",
                                     "sample_type"])

    def slide_manifest(self, project: str) -> pd.DataFrame:
        """Diagnostic slides of ``project`` (not downloaded here: hundreds of MB each)."""
        hits = self.query("files", filters_for(project, **DIAGNOSTIC_SLIDES), FILE_FIELDS)
        return pd.DataFrame([_file_row(h) for h in hits],
                            columns=["file_id", "file_name", "md5sum", "file_size", "patient_id", "sample",
                                     "sample_type"])

    def clinical(self, project: str) -> pd.DataFrame:
        """One row per case: patient_id, project, vital_status, days_to_death, days_to_last_follow_up, age, sex."""
        flt = {"op": "in", "content": {"field": "project.project_id", "value": [project]}}
        hits = self.query("cases", flt, CASE_FIELDS, expand="demographic,diagnoses")
        return pd.DataFrame([_case_row(h) for h in hits])

    # --- downloads -----------------------------------------------------------------------------
    def download(self, file_id: str, dest: Path, md5: str | None = None, size: int | None = None) -> Path:
        """Fetch ``/data/{file_id}`` to ``dest`` with resume and md5 check; skip when ``dest`` is already good."""
        dest = Path(dest)
        if dest.exists() and (md5 is None or md5_of(dest) == md5):
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        problems: list[str] = []
        for attempt in range(self.settings.retries + 1):
            try:
                self._fetch_into(file_id, part, size)
            except self._transient() as exc:
                problems.append(f"{type(exc).__name__}: {exc}")
                log.warning("download of %s interrupted (%s); %d bytes kept, resuming", file_id, exc,
                            part.stat().st_size if part.exists() else 0)
                if attempt < self.settings.retries:
                    self._sleep(attempt)
                continue
            have = part.stat().st_size
            if size is not None and have < size:
                problems.append(f"truncated ({have} of {size} bytes)")
                log.warning("download of %s truncated at %d of %d bytes; resuming", file_id, have, size)
                continue
            if md5 is not None and md5_of(part) != md5:
                problems.append("md5 mismatch")
                log.warning("download of %s has the wrong md5; fetching it again", file_id)
                part.unlink()
                if attempt < self.settings.retries:
                    self._sleep(attempt)
                continue
            part.replace(dest)
            return dest
        raise OncoFMError(f"could not download GDC file {file_id} after {self.settings.retries + 1} attempts: "
                          + "; ".join(problems[-3:]))

    def _fetch_into(self, file_id: str, part: Path, size: int | None) -> None:
        have = part.stat().st_size if part.exists() else 0
        if size is not None and have > size:
            part.unlink()
            have = 0
        if size is not None and have == size:
            return  # complete already; the caller checks the md5
        headers = {"Range": f"bytes={have}-"} if have else {}
        with self._http.stream("GET", f"/data/{file_id}", headers=headers) as r:
            if r.status_code >= 500 or r.status_code == 429:
                raise _Retryable(f"HTTP {r.status_code}")
            if r.status_code == 416:  # the range starts at the end: nothing left to fetch
                return
            if r.status_code >= 400:
                raise OncoFMError(f"GDC /data/{file_id} refused the download (HTTP {r.status_code})")
            mode = "ab" if (have and r.status_code == 206) else "wb"  # 200 = whole file again
            with open(part, mode) as fh:
                # iter_raw yields bytes as they arrive (a chunk size would buffer, losing data on an error)
                for block in r.iter_raw():
                    fh.write(block)


def _file_row(hit: dict[str, Any]) -> dict[str, Any]:
    case = (hit.get("cases") or [{}])[0]
    sample = (case.get("samples") or [{}])[0]
    return {"file_id": hit.get("file_id") or hit.get("id"), "file_name": hit.get("file_name"),
            "md5sum": hit.get("md5sum"), "file_size": hit.get("file_size"),
            "patient_id": case.get("submitter_id"), "sample": sample.get("submitter_id"),
            "sample_type": sample.get("sample_type")}


def _case_row(hit: dict[str, Any]) -> dict[str, Any]:
    demo = hit.get("demographic") or {}
    diagnoses = hit.get("diagnoses") or []
    follow = [d.get("days_to_last_follow_up") for d in diagnoses if d.get("days_to_last_follow_up") is not None]
    age_days = [d.get("age_at_diagnosis") for d in diagnoses if d.get("age_at_diagnosis") is not None]
    # stage/grade: the first diagnosis that records one (mapped later by oncofm.cohort.clinical)
    stage = next((d.get("ajcc_pathologic_stage") for d in diagnoses if d.get("ajcc_pathologic_stage")), None)
    grade = next((d.get("tumor_grade") for d in diagnoses if d.get("tumor_grade")), None)
    age = demo.get("age_at_index")
    if age is None and age_days:
        age = min(age_days) / 365.25
    return {"patient_id": hit.get("submitter_id"), "case_id": hit.get("case_id") or hit.get("id"),
            "project": (hit.get("project") or {}).get("project_id"), "primary_site": hit.get("primary_site"),
            "disease_type": hit.get("disease_type"), "vital_status": demo.get("vital_status"),
            "days_to_death": demo.get("days_to_death"),
            "days_to_last_follow_up": max(follow) if follow else None,
            "age": age, "gender": demo.get("gender"), "stage": stage, "grade": grade}


def read_star_counts(path: str | Path, value: str = "tpm_unstranded",
                     gene_type: str | None = "protein_coding") -> pd.Series:
    """A GDC STAR-Counts TSV → one value per gene symbol (TPM by default).

    The file has a ``# gene-model: ...`` comment line, a header ``gene_id gene_name gene_type unstranded
    stranded_first stranded_second tpm_unstranded fpkm_unstranded fpkm_uq_unstranded``, four ``N_``
    summary rows (dropped) and one row per Ensembl gene. Several Ensembl IDs with one symbol (e.g. the
    PAR_Y copies) are summed (TPM of the symbol). ``gene_type=None`` keeps every gene type.
    """
    from oncofm.errors import DataValidationError

    path = Path(path)
    try:
        df = pd.read_csv(path, sep="\t", comment="#", low_memory=False)
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise DataValidationError(f"cannot be read as a STAR-Counts TSV: {exc}", file=str(path)) from None
    need = ["gene_id", "gene_name", "gene_type", value]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise DataValidationError(f"not a STAR-Counts file: missing column(s) {missing}", file=str(path),
                                  column=missing[0])
    df = df[~df["gene_id"].astype(str).str.startswith("N_") & df["gene_name"].notna()]
    if gene_type:
        df = df[df["gene_type"] == gene_type]
    vals = pd.to_numeric(df[value], errors="coerce")
    bad = vals.isna() | (vals < 0)
    if bad.any():
        raise DataValidationError(f"non-numeric or negative {value}", file=str(path), column=value,
                                  rows=[f"{g}={v!r}" for g, v in zip(df.loc[bad, "gene_id"], df.loc[bad, value],
                                                                     strict=True)])
    return vals.groupby(df["gene_name"].to_numpy()).sum()


def iter_downloads(client: GDCClient, manifest: pd.DataFrame, folder: Path) -> Iterator[tuple[dict, Path]]:
    """Download every manifest row into ``folder/<file_id>/<file_name>`` (with a progress bar)."""
    from oncofm.logging_utils import track

    rows = manifest.to_dict("records")
    for row in track(rows, "downloading from GDC", enabled=len(rows) > 1):
        size = int(row["file_size"]) if pd.notna(row.get("file_size")) else None
        path = client.download(row["file_id"], folder / row["file_id"] / row["file_name"], row.get("md5sum"), size)
        yield row, path


def write_gdc_manifest(manifest: pd.DataFrame, path: Path) -> Path:
    """The manifest in the gdc-client format (``id filename md5 size state``)."""
    from oncofm.io import write_text

    out = pd.DataFrame({"id": manifest["file_id"], "filename": manifest["file_name"], "md5": manifest["md5sum"],
                        "size": manifest["file_size"], "state": "released"})
    return write_text(out.to_csv(sep="\t", index=False), path)
