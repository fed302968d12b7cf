"""Explanation jobs for the web app: one folder per job (a server-made UUID), a thread pool, progress.

A client never names a path: uploads are saved under ``<jobs>/<uuid>/inputs/`` with fixed names chosen
from their detected content type, and the report goes to ``<jobs>/<uuid>/report/``. Two jobs therefore
never share a file.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oncofm.errors import OncoFMError

log = logging.getLogger(__name__)

JOB_ID_RE = re.compile(r"^[0-9a-f]{32}$")

# (magic bytes at offset, extension) of the slide formats accepted as a single uploaded file
_SLIDE_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\xff\xd8\xff", ".jpg"),
    (0, b"\x89PNG\r\n\x1a\n", ".png"),
    (0, b"II*\x00", ".tiff"),
    (0, b"MM\x00*", ".tiff"),
    (0, b"II+\x00", ".tiff"),  # BigTIFF
    (0, b"MM\x00+", ".tiff"),
    (128, b"DICM", ".dcm"),
)


def slide_extension(head: bytes, filename: str | None = None) -> str:
    """The file extension for an uploaded slide, from its content (magic bytes), not its name.

    Aperio SVS, Hamamatsu NDPI, Leica SCN and plain TIFFs share the TIFF signature; the client's suffix is
    kept for those (OpenSlide picks its driver by content and suffix) when it is one of them.
    """
    for offset, magic, ext in _SLIDE_MAGIC:
        if head[offset:offset + len(magic)] == magic:
            if ext == ".tiff" and filename:
                suffix = Path(filename).suffix.lower()
                if suffix in {".svs", ".ndpi", ".scn", ".tif", ".tiff", ".bif"}:
                    return suffix
            return ext
    raise OncoFMError("the uploaded slide is not a recognised image: expected a TIFF-based whole-slide image "
                      "(SVS, NDPI, SCN, TIFF), DICOM, JPEG or PNG")


@dataclass
class Job:
    """One explanation request and its state."""

    id: str
    dir: Path
    params: dict[str, Any]
    status: str = "queued"  # queued | running | done | failed
    progress: float = 0.0
    step: str = "queued"
    error: str | None = None
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
    seconds: float | None = None

    @property
    def report_dir(self) -> Path:
        return self.dir / "report"

    def public(self) -> dict[str, Any]:
        """The job as the API shows it (no server paths)."""
        out: dict[str, Any] = {"id": self.id, "status": self.status, "progress": round(self.progress, 3),
                               "step": self.step, "error": self.error, "created": self.created,
                               "seconds": self.seconds}
        if self.status == "done":
            out["report_url"] = f"/api/jobs/{self.id}/report"
            out["explanation_url"] = f"/api/jobs/{self.id}/explanation.json"
            if (self.report_dir / "heatmap.png").exists():
                out["heatmap_url"] = f"/api/jobs/{self.id}/heatmap.png"
        return out


class JobManager:
    """Runs explanations in a thread pool, each in its own folder under ``root``."""

    def __init__(self, run: str | Path, root: str | Path, workers: int = 2, predictors: Any = None) -> None:
        self.run = str(run)
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.predictors = predictors
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="oncofm-job")

    def new_job_dir(self) -> tuple[str, Path]:
        job_id = uuid.uuid4().hex
        job_dir = self.root / job_id
        (job_dir / "inputs").mkdir(parents=True)
        return job_id, job_dir

    def submit(self, job_id: str, job_dir: Path, params: dict[str, Any]) -> Job:
        job = Job(id=job_id, dir=job_dir, params=params)
        with self._lock:
            self._jobs[job_id] = job
        (job_dir / "params.json").write_text(json.dumps(params, default=str))
        self._pool.submit(self._run, job)
        return job

    def get(self, job_id: str) -> Job | None:
        if not JOB_ID_RE.match(job_id):
            return None
        with self._lock:
            return self._jobs.get(job_id)

    def _run(self, job: Job) -> None:
        from oncofm.explain.pipeline import ExplainSettings, explain_patient

        job.status, job.step = "running", "starting"
        t0 = time.perf_counter()

        def progress(step: str, frac: float) -> None:
            job.step, job.progress = step, frac

        try:
            settings = ExplainSettings.build(run=self.run, out=str(job.report_dir), **job.params)
            explain_patient(settings, predictors=self.predictors, progress=progress)
            job.status, job.step, job.progress = "done", "done", 1.0
        except OncoFMError as exc:
            job.status, job.error = "failed", str(exc)
        except Exception as exc:  # a bug must not kill the worker thread; the page shows it
            log.exception("job %s failed", job.id)
            job.status, job.error = "failed", f"internal error: {type(exc).__name__}: {exc}"
        finally:
            job.seconds = round(time.perf_counter() - t0, 2)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
