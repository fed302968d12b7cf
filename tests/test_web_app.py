"""The web app's API with FastAPI's TestClient: patients, jobs, uploads, limits, content checks, isolation."""

from __future__ import annotations

import io
import re
import time

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from oncofm.web.app import WebSettings, create_app
from test_report_doubles import DOUBLE_TAG, demo_run, double_predictors


@pytest.fixture()
def client(tmp_path):
    settings = WebSettings(run=str(demo_run()), jobs_dir=str(tmp_path / "jobs"), max_upload_mb=2.0, workers=2)
    app = create_app(settings, predictors=double_predictors())
    with TestClient(app) as c:
        yield c


def _wait(client, job_id, timeout=90.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        job = client.get(f"/api/jobs/{job_id}").json()
        if job["status"] in ("done", "failed"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish: {job}")


def _png_bytes(value=245, size=600):
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_page_is_offline_and_default_host_is_local(client):
    page = client.get("/").text
    assert "<script>" in page and "Research use only" in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page), "the page must not load external assets"
    assert WebSettings(run="x").host == "127.0.0.1"


def test_patients_are_the_demo_patients_with_images(client):
    patients = client.get("/api/patients").json()
    assert len(patients) == 15
    assert {"patient_id": "TCGA-B0-5698", "cancer_type": "KIRC"}.items() <= patients[
        [p["patient_id"] for p in patients].index("TCGA-B0-5698")].items()
    assert client.get("/api/info").json()["cancer_types"] == ["BLCA", "GBM", "KIRC", "KIRP", "LGG"]


def test_demo_patient_job_gives_report_and_heatmap(client):
    r = client.post("/api/explain", data={"patient_id": "TCGA-B0-5698"})
    assert r.status_code == 202
    job = _wait(client, r.json()["id"])
    assert job["status"] == "done", job
    report = client.get(job["report_url"])
    assert report.status_code == 200 and "TCGA-B0-5698" in report.text and DOUBLE_TAG in report.text
    heat = client.get(job["heatmap_url"])
    assert heat.status_code == 200 and heat.content[:8] == b"\x89PNG\r\n\x1a\n"
    ex = client.get(job["explanation_url"]).json()
    assert ex["prediction"]["risk"] is not None and ex["text"].startswith(DOUBLE_TAG)


def test_two_simultaneous_jobs_do_not_mix(client):
    ids = {}
    for pid in ("TCGA-B0-5698", "TCGA-HE-7129"):
        ids[pid] = client.post("/api/explain", data={"patient_id": pid}).json()["id"]
    assert len(set(ids.values())) == 2
    for pid, job_id in ids.items():
        job = _wait(client, job_id)
        assert job["status"] == "done", job
        ex = client.get(job["explanation_url"]).json()
        assert ex["patient_id"] == pid
        assert pid in client.get(job["report_url"]).text
    jobs_root = client.app.state.jobs.root
    assert sorted(p.name for p in jobs_root.iterdir()) == sorted(ids.values())


def test_upload_too_large_is_refused(client):
    big = b"\xff\xd8\xff" + b"0" * (3 * 2**20)
    r = client.post("/api/explain", files={"slide": ("big.jpg", big, "image/jpeg")}, data={"cancer_type": "KIRC"})
    assert r.status_code == 413 and "larger than the limit" in r.json()["detail"]


def test_slide_content_is_checked_not_the_extension(client):
    r = client.post("/api/explain", files={"slide": ("slide.svs", b"this is not a slide" * 50, "image/tiff")},
                    data={"cancer_type": "KIRC", "mpp": "0.5"})
    assert r.status_code == 400 and "not a recognised image" in r.json()["detail"]


def test_expression_content_is_checked(client):
    r = client.post("/api/explain", files={"expression": ("expr.csv", b"\x00\x01\x02binary", "text/csv")},
                    data={"cancer_type": "KIRC"})
    assert r.status_code == 400


def test_client_file_name_is_never_a_path(client):
    row = pd.read_parquet(demo_run() / "cohort" / "expression.parquet").loc["TCGA-B0-5698"]
    csv = row.rename("value").rename_axis("gene").reset_index().to_csv(index=False).encode()
    r = client.post("/api/explain", files={"expression": ("../../../../tmp/evil.csv", csv, "text/csv")},
                    data={"cancer_type": "KIRC"})
    assert r.status_code == 202
    job = _wait(client, r.json()["id"])
    assert job["status"] == "done", job
    inputs = client.app.state.jobs.root / job["id"] / "inputs"
    assert [p.name for p in inputs.iterdir()] == ["expression.csv"]
    assert client.get("/api/jobs/..%2F..%2Fetc").status_code == 404
    assert client.get("/api/jobs/not-a-job").status_code == 404


def test_failed_job_reports_its_error(client):
    r = client.post("/api/explain", files={"slide": ("blank.png", _png_bytes(), "image/png")},
                    data={"cancer_type": "KIRC", "mpp": "0.5"})
    assert r.status_code == 202
    job = _wait(client, r.json()["id"])
    assert job["status"] == "failed" and "no tissue found" in job["error"]
    assert "report_url" not in job
    assert client.get(f"/api/jobs/{job['id']}/report").status_code == 404


def test_request_without_input_is_refused(client):
    assert client.post("/api/explain", data={}).status_code == 400
    assert client.post("/api/explain", data={"patient_id": "TCGA-XX-0000"}).status_code == 400


def test_slide_features_and_clinical_inputs_are_checked(client):
    csv = b"feature,value\nDENSITY [LYMPHOCYTE CELLS] IN [STROMA],high\n"
    r = client.post("/api/explain", files={"slide_features": ("hif.csv", csv, "text/csv")},
                    data={"cancer_type": "KIRC"})
    assert r.status_code == 400 and "not numbers" in r.json()["detail"]
    ok = b"feature,value\nDENSITY [LYMPHOCYTE CELLS] IN [STROMA],412.5\n"
    r = client.post("/api/explain", files={"slide_features": ("hif.csv", ok, "text/csv")},
                    data={"cancer_type": "KIRC", "stage": "severe"})
    assert r.status_code == 400 and "--stage 'severe'" in r.json()["detail"]


def test_cnv_and_mutation_inputs_are_checked_and_reach_the_job(client):
    expr = b"gene,value\nHMMR,1.2\nCDK1,0.4\n"
    hif = b"feature,value\nDENSITY [LYMPHOCYTE CELLS] IN [STROMA],412.5\n"
    r = client.post("/api/explain", files={"cnv": ("cnv.csv", b"gene,level\nCDKN2A,-2\n", "text/csv"),
                                           "slide_features": ("hif.csv", hif, "text/csv")},
                    data={"cancer_type": "KIRC", "mutations": "TP53"})
    assert r.status_code == 400 and "goes with an expression file" in r.json()["detail"]
    r = client.post("/api/explain", files={"expression": ("e.csv", expr, "text/csv"),
                                           "cnv": ("cnv.csv", b"gene,level\nCDKN2A,deleted\n", "text/csv")},
                    data={"cancer_type": "KIRC"})
    assert r.status_code == 400 and "must be numbers" in r.json()["detail"]
    r = client.post("/api/explain", files={"expression": ("e.csv", expr, "text/csv")},
                    data={"cancer_type": "KIRC", "mutations": "TP53, ../../etc/passwd"})
    assert r.status_code == 400 and "gene symbols" in r.json()["detail"]
    r = client.post("/api/explain", files={"expression": ("e.csv", expr, "text/csv"),
                                           "cnv": ("cnv.csv", b"gene,level\nCDKN2A,-2\nEGFR,2\n", "text/csv")},
                    data={"cancer_type": "KIRC", "mutations": "TP53 IDH1"})
    assert r.status_code == 202, r.text
    job = client.app.state.jobs.get(r.json()["id"])
    assert job.params["mutations"] == ["IDH1", "TP53"] and job.params["cnv"].endswith("cnv.csv")
