"""The OncoFM web app: a JSON API over ``explain`` and one static page.

Endpoints
---------
- ``GET /``: the page (static HTML with inline CSS/JS; no CDN, works offline)
- ``GET /api/info``: the run and its cancer types
- ``GET /api/patients``: the demo patients (cohort patients with a real H&E image)
- ``POST /api/explain``: multipart ``patient_id`` or ``expression`` and/or ``slide`` files (+ ``cancer_type``,
  ``mpp``); returns ``{"id": ...}`` (202)
- ``GET /api/jobs/{id}``: status, progress, step, error, report URL
- ``GET /api/jobs/{id}/report``, ``/heatmap.png``, ``/explanation.json``: the job's outputs
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

from fastapi import FastAPI, File, Form, HTTPException, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from pydantic import Field

from oncofm.cohort.images import demo_patients
from oncofm.config import StageSettings
from oncofm.errors import OncoFMError
from oncofm.paths import RunLayout

log = logging.getLogger(__name__)

CHUNK = 1 << 20


class WebSettings(StageSettings):
    """Settings of ``oncofm serve``."""

    stage: ClassVar[str] = "serve"

    run: str
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    max_upload_mb: float = Field(512.0, gt=0, description="largest accepted upload (each file), MB")
    workers: int = Field(2, ge=1, le=16, description="explanations run at the same time")
    jobs_dir: str | None = Field(None, description="where job folders go (default: a temporary folder)")


async def _save_upload(upload: Any, target_stem: Path, max_bytes: int, kind: str) -> tuple[Path, bytes]:
    """Stream an upload to ``target_stem`` (a server-chosen name); refuse it past ``max_bytes``."""
    size = 0
    head = b""
    tmp = target_stem.with_suffix(".part")
    with open(tmp, "wb") as fh:
        while chunk := await upload.read(CHUNK):
            if len(head) < 512:
                head += chunk[: 512 - len(head)]
            size += len(chunk)
            if size > max_bytes:
                fh.close()
                tmp.unlink(missing_ok=True)
                raise _TooLarge(f"the {kind} file is larger than the limit of {max_bytes / 2**20:.0f} MB")
            fh.write(chunk)
    if size == 0:
        tmp.unlink(missing_ok=True)
        raise OncoFMError(f"the uploaded {kind} file is empty")
    return tmp, head


class _TooLarge(OncoFMError):
    pass


async def _save_table_upload(upload: Any, stem: Path, max_bytes: int, kind: str) -> Path:
    """Save an uploaded table under a server-chosen name whose suffix is read from its content (parquet
    magic bytes, a tab in its head: TSV, else CSV)."""
    tmp, _ = await _save_upload(upload, stem, max_bytes, kind)
    head = tmp.read_bytes()[:4096]
    suffix = ".parquet" if head[:4] == b"PAR1" else ".tsv" if b"\t" in head else ".csv"
    return tmp.rename(stem.with_name(f"{stem.name}{suffix}"))


async def _job_params(settings: WebSettings, max_bytes: int, job_dir: Path, patient_id: str | None, cancer_type: str | None, mpp: float | None,
                      expression: Any, slide: Any, slide_features: Any = None, cnv: Any = None) -> dict[str, Any]:
    """Save the uploads under server-chosen names and check their content; the job's explain settings."""
    from oncofm.explain.inputs import (
        check_cancer_type,
        read_cnv_file,
        read_expression_file,
        read_slide_features_file,
    )
    from oncofm.web.jobs import slide_extension

    if cancer_type:  # explain's policy: a type unseen in training runs pan-cancer with a note; a non-code is a 400
        check_cancer_type(cancer_type, RunLayout(settings.run))
    params: dict[str, Any] = {"patient_id": patient_id or None, "cancer_type": cancer_type or None, "mpp": mpp}
    if patient_id and patient_id not in {p["patient_id"] for p in demo_patients(settings.run)}:
        raise OncoFMError(f"unknown demo patient {patient_id!r}")
    inputs = job_dir / "inputs"
    for name, upload, reader in (("expression", expression, read_expression_file),
                                 ("slide_features", slide_features, read_slide_features_file),
                                 ("cnv", cnv, read_cnv_file)):
        if upload is not None:
            kind = {"slide_features": "slide features", "cnv": "copy-number"}.get(name, name)
            path = await _save_table_upload(upload, inputs / name, max_bytes, kind)
            reader(path)  # parses, or OncoFMError saying what is wrong
            params[name] = str(path)
    if slide is not None:
        tmp, head = await _save_upload(slide, inputs / "slide", max_bytes, "slide")
        ext = slide_extension(head, slide.filename)
        params["slide"] = str(tmp.rename(inputs / f"slide{ext}"))
    return params


def create_app(settings: WebSettings, predictors: Any = None):  # noqa: ANN201 - FastAPI
    """Build the FastAPI app for ``settings.run`` (``predictors``: the models to run, for tests; default: the run's own)."""
    from oncofm.explain.inputs import known_cancer_types
    from oncofm.web.jobs import JobManager

    layout = RunLayout(settings.run)
    if not layout.patients.exists():
        raise OncoFMError(f"{settings.run} has no imported cohort; run `oncofm demo` or the pipeline first")
    jobs_root = Path(settings.jobs_dir) if settings.jobs_dir else Path(tempfile.mkdtemp(prefix="oncofm-jobs-"))
    manager = JobManager(settings.run, jobs_root, workers=settings.workers, predictors=predictors)
    max_bytes = int(settings.max_upload_mb * 2**20)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any):  # noqa: ANN202
        yield
        manager.shutdown()

    app = FastAPI(title="OncoFM", version="0.1", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.jobs = manager

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return (resources.files("oncofm.web") / "static" / "index.html").read_text(encoding="utf-8")

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return {"run": Path(settings.run).name, "cancer_types": known_cancer_types(layout),
                "max_upload_mb": settings.max_upload_mb}

    @app.get("/api/patients")
    def patients() -> list[dict[str, Any]]:
        return demo_patients(settings.run)

    @app.post("/api/explain", status_code=202)
    async def explain(patient_id: str | None = Form(None), cancer_type: str | None = Form(None),
                      mpp: float | None = Form(None), age: float | None = Form(None),
                      sex: str | None = Form(None), stage: str | None = Form(None),
                      grade: str | None = Form(None), expression: UploadFile | None = File(None),
                      slide: UploadFile | None = File(None),
                      slide_features: UploadFile | None = File(None), cnv: UploadFile | None = File(None),
                      mutations: str | None = Form(None)) -> JSONResponse:
        expression = expression if expression is not None and expression.filename else None
        cnv = cnv if cnv is not None and cnv.filename else None
        mutations = mutations if mutations is not None and mutations.strip() else None
        slide = slide if slide is not None and slide.filename else None
        slide_features = slide_features if slide_features is not None and slide_features.filename else None
        if not patient_id and expression is None and slide is None and slide_features is None:
            raise HTTPException(400, "choose a demo patient, or upload an expression file, a slide and/or slide "
                                     "features")
        if patient_id and (expression is not None or slide is not None or slide_features is not None
                           or cnv is not None or mutations is not None):
            raise HTTPException(400, "give either a demo patient or uploaded files, not both")
        if (cnv is not None or mutations is not None) and expression is None:
            raise HTTPException(400, "a copy-number profile or mutation list goes with an expression file: the "
                                     "omics model reads them beside the expression profile")
        job_id, job_dir = manager.new_job_dir()
        try:
            params = await _job_params(settings, max_bytes, job_dir, patient_id, cancer_type, mpp, expression, slide,
                                       slide_features, cnv)
            from oncofm.explain.inputs import parse_clinical_input, parse_mutations

            if mutations is not None:  # a list of symbols, never a path on the server
                params["mutations"] = parse_mutations([g for g in re.split(r"[,;\s]+", mutations) if g])

            parse_clinical_input(stage, "stage")  # a 400 naming the accepted forms, before the job starts
            parse_clinical_input(grade, "grade")
            params.update(age=age, sex=sex or None, stage=stage or None, grade=grade or None)
        except _TooLarge as exc:
            shutil.rmtree(job_dir, ignore_errors=True)
            raise HTTPException(413, str(exc)) from None
        except OncoFMError as exc:
            shutil.rmtree(job_dir, ignore_errors=True)
            raise HTTPException(400, str(exc)) from None
        job = manager.submit(job_id, job_dir, params)
        return JSONResponse(job.public(), status_code=202)

    _add_job_routes(app, manager)
    return app


def _add_job_routes(app: Any, manager: Any) -> None:
    """GET /api/jobs/{id} and the job's outputs (report, heatmap, explanation)."""
    def _job_or_404(job_id: str):  # noqa: ANN202
        job = manager.get(job_id)
        if job is None:
            raise HTTPException(404, "no such job")
        return job

    @app.get("/api/jobs/{job_id}")
    def job_status(job_id: str) -> dict[str, Any]:
        return _job_or_404(job_id).public()

    def _output(job_id: str, name: str, media: str) -> FileResponse:
        job = _job_or_404(job_id)
        path = job.report_dir / name
        if job.status != "done" or not path.exists():
            raise HTTPException(404, f"{name} is not available for this job")
        return FileResponse(path, media_type=media)

    @app.get("/api/jobs/{job_id}/report")
    def job_report(job_id: str) -> FileResponse:
        return _output(job_id, "report.html", "text/html")

    @app.get("/api/jobs/{job_id}/heatmap.png")
    def job_heatmap(job_id: str) -> FileResponse:
        return _output(job_id, "heatmap.png", "image/png")

    @app.get("/api/jobs/{job_id}/explanation.json")
    def job_explanation(job_id: str) -> FileResponse:
        return _output(job_id, "explanation.json", "application/json")


def serve(settings: WebSettings, predictors: Any = None) -> None:
    """Run the app with uvicorn (blocking)."""
    import uvicorn

    app = create_app(settings, predictors=predictors)
    if settings.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: the app has no authentication; anyone who can reach this address can "
                    "use it", settings.host)
    log.info("OncoFM web app on http://%s:%d (run %s)", settings.host, settings.port, settings.run)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")
