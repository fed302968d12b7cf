"""The GDC client and importer against a local HTTP server shaped like the GDC API, with failures.

The server answers ``POST /files``, ``POST /cases`` (JSON ``data.hits`` + ``data.pagination``, paged) and
``GET /data/{id}`` (with ``Range`` → 206) the way the GDC API documents them. The STAR-Counts files hold
real tcga13 KIRC expression turned into TPM = 2**(z + 5) - 1 (planted: the import must give z + 5), and
the cases carry the real TCGA-CDR survival of those patients. Each download meets one failure first: a
timeout before the headers, two 5xx answers, a truncated body, a wrong-md5 body, a stall mid-body.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pandas as pd
import pytest

from oncofm.cohort.gdc import GDCClient, GDCSettings, read_star_counts
from oncofm.cohort.importing import ImportSettings, import_cohort, load_matrix, load_patients
from oncofm.cohort.schema import Col
from oncofm.errors import OncoFMError

PROJECT = "TCGA-KIRC"
OFFSET = 5.0
CLIENT_TIMEOUT = 0.5
STALL = 1.5  # > CLIENT_TIMEOUT: the client gives up and resumes


def star_counts_text(tpm: pd.Series, rng: np.random.Generator) -> str:
    lines = ["# gene-model: GENCODE v36",
             "gene_id\tgene_name\tgene_type\tunstranded\tstranded_first\tstranded_second\ttpm_unstranded"
             "\tfpkm_unstranded\tfpkm_uq_unstranded"]
    for n in ("N_unmapped", "N_multimapping", "N_noFeature", "N_ambiguous"):
        c = int(rng.integers(1e5, 3e6))
        lines.append(f"{n}\t\t\t{c}\t{c}\t{c}\t\t\t")
    for i, (gene, v) in enumerate(tpm.items()):
        c = int(v * 40)
        lines.append(f"ENSG{i:011d}.1\t{gene}\tprotein_coding\t{c}\t{c // 2}\t{c // 2}\t{v:.4f}\t{v / 3:.4f}\t{v / 2:.4f}")
    lines.append("ENSG99999999999.1\tLINC-TEST\tlncRNA\t10\t5\t5\t3.0000\t1.0\t1.0")  # not protein coding
    first = tpm.index[0]  # a PAR_Y copy with 0 TPM: summed into the same symbol
    lines.append(f"ENSG00000000000.1_PAR_Y\t{first}\tprotein_coding\t0\t0\t0\t0.0000\t0.0\t0.0")
    return "\n".join(lines) + "\n"


class FakeGDC:
    """State of the fake GDC: hits, file bodies, scripted failures and a log of requests."""

    def __init__(self, files: dict, file_hits: list, slide_hits: list, case_hits: list, faults: dict,
                 api_faults: list):
        self.files, self.file_hits, self.slide_hits, self.case_hits = files, file_hits, slide_hits, case_hits
        self.faults, self.api_faults = faults, api_faults
        self.log: list[tuple] = []
        self.lock = threading.Lock()

    def next_fault(self, key):
        with self.lock:
            queue = self.faults.get(key) if key != "api" else self.api_faults
            return queue.pop(0) if queue else None


class Handler(BaseHTTPRequestHandler):
    """Answers like the GDC API; ``self.server.state`` is the FakeGDC."""
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def _json(self, code: int, obj: dict) -> None:
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):  # noqa: N802
        state = self.server.state
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        endpoint = self.path.strip("/").split("?")[0]
        state.log.append(("POST", endpoint, body.get("from")))
        if state.next_fault("api") == "503":
            return self._json(503, {"message": "Service Unavailable"})
        flt = json.dumps(body.get("filters", {}))
        if PROJECT not in flt:
            hits = []
        elif endpoint == "cases":
            hits = state.case_hits
        elif endpoint == "files" and "Slide Image" in flt:
            hits = state.slide_hits
        elif endpoint == "files" and "STAR - Counts" in flt:
            hits = state.file_hits
        else:
            return self._json(400, {"message": f"unexpected query {flt}"})
        start, size = int(body.get("from", 0)), int(body.get("size", 10))
        page = hits[start:start + size]
        self._json(200, {"data": {"hits": page, "pagination": {
            "count": len(page), "total": len(hits), "size": size, "from": start, "sort": "",
            "page": start // size + 1, "pages": max(1, -(-len(hits) // size))}}, "warnings": {}})

    def do_GET(self):  # noqa: N802
        state = self.server.state
        fid = self.path.split("/data/", 1)[-1].split("?")[0]
        data = state.files.get(fid)
        rng = self.headers.get("Range")
        state.log.append(("GET", fid, rng))
        if data is None:
            return self._json(404, {"message": "not found"})
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        part = data[start:]
        fault = state.next_fault(fid)
        if fault == "timeout":  # nothing at all before the client's timeout
            time.sleep(STALL)
            self.close_connection = True
            return
        if fault == "500":
            return self._json(500, {"message": "Internal Server Error"})
        if fault == "corrupt":
            part = bytes(b ^ 0x20 if i % 7 == 0 else b for i, b in enumerate(part))
        self.send_response(206 if rng else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(part)))
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Disposition", f"attachment; filename={fid}.tsv")
        self.end_headers()
        if fault in ("truncate", "stall"):
            self.wfile.write(part[: len(part) // 3])
            self.wfile.flush()
            if fault == "stall":
                time.sleep(STALL)
            self.close_connection = True
            return
        self.wfile.write(part)


@pytest.fixture
def serve():
    """Start a FakeGDC on 127.0.0.1:<free port>; always stopped (and by a watchdog after 90 s)."""
    servers = []

    def start(state: FakeGDC) -> str:
        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.state = state
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        watchdog = threading.Timer(90, server.shutdown)
        watchdog.daemon = True
        watchdog.start()
        servers.append((server, watchdog))
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server, watchdog in servers:
        watchdog.cancel()
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def kirc(shared_data):
    """6 real KIRC patients × 30 genes (z-scores) and their real TCGA-CDR rows."""
    from oncofm.data import demo_data_dir

    patients = pd.read_csv(demo_data_dir() / "patients.csv")
    ids = patients.loc[patients.tcga_project == "KIRC", "case_id"].head(7).tolist()
    expr = pd.read_csv(demo_data_dir() / "expression_zscore.csv.gz", index_col=0).loc[ids]
    expr = expr.loc[:, expr.notna().all()].iloc[:, :30].clip(-5, 5)
    cdr = pd.read_csv(shared_data / "tcga_cdr" / "tcga_cdr_clinical.csv").set_index("bcr_patient_barcode").loc[ids]
    assert cdr["OS.time"].notna().all()
    return expr, cdr


def build_state(kirc, faults_by_index: dict[int, list[str]], api_faults: list[str]) -> tuple[FakeGDC, dict]:
    expr, cdr = kirc
    rng = np.random.default_rng(0)
    files, file_hits, case_hits, slide_hits, faults, planted = {}, [], [], [], {}, {}
    ids = list(expr.index)
    for i, pid in enumerate(ids):
        case_uuid = str(uuid.UUID(int=i + 1))
        row = cdr.loc[pid]
        dead = row["OS"] == 1
        case_hits.append({
            "id": case_uuid, "case_id": case_uuid, "submitter_id": pid, "project": {"project_id": PROJECT},
            "primary_site": "Kidney", "disease_type": "Adenomas and Adenocarcinomas",
            "demographic": {"vital_status": "Dead" if dead else "Alive",
                            "days_to_death": float(row["OS.time"]) if dead else None,
                            "gender": str(row["gender"]).lower(), "age_at_index": row["age_at_initial_pathologic_diagnosis"]},
            "diagnoses": [{"days_to_last_follow_up": None if dead else float(row["OS.time"]), "age_at_diagnosis": 20000},
                          {"days_to_last_follow_up": None if dead else 10.0}]})
        if i == len(ids) - 1:
            continue  # the last case has no expression file: left out of the cohort
        tpm = np.power(2.0, expr.loc[pid] + OFFSET) - 1.0
        body = star_counts_text(tpm, rng).encode()
        fid = str(uuid.UUID(int=1000 + i))
        files[fid] = body
        file_hits.append({"id": fid, "file_id": fid, "file_name": f"{fid}.rna_seq.augmented_star_gene_counts.tsv",
                          "md5sum": hashlib.md5(body).hexdigest(), "file_size": len(body),
                          "cases": [{"submitter_id": pid, "case_id": case_uuid,
                                     "samples": [{"submitter_id": f"{pid}-01A", "sample_type": "Primary Tumor"}]}]})
        slide_hits.append({"id": str(uuid.uuid4()), "file_id": str(uuid.UUID(int=5000 + i)),
                           "file_name": f"{pid}-01Z-00-DX1.{uuid.UUID(int=5000 + i)}.svs", "md5sum": "0" * 32,
                           "file_size": 123456789, "cases": [{"submitter_id": pid, "case_id": case_uuid,
                                                              "samples": [{"submitter_id": f"{pid}-01Z",
                                                                           "sample_type": "Primary Tumor"}]}]})
        if i in faults_by_index:
            faults[fid] = list(faults_by_index[i])
            planted[faults_by_index[i][0]] = fid
    # a metastatic sample's file: listed, not downloaded
    mfid = str(uuid.UUID(int=9999))
    file_hits.append({**file_hits[0], "id": mfid, "file_id": mfid,
                      "cases": [{**file_hits[0]["cases"][0],
                                 "samples": [{"submitter_id": f"{ids[0]}-06A", "sample_type": "Metastatic"}]}]})
    return FakeGDC(files, file_hits, slide_hits, case_hits, faults, list(api_faults)), planted


def client_options(url: str, retries: int = 4) -> dict:
    return {"base_url": url, "timeout_s": CLIENT_TIMEOUT, "retries": retries, "backoff_s": 0.01, "page_size": 2}


def test_gdc_import_survives_every_failure(tmp_path, serve, kirc):
    faults = {0: ["timeout"], 1: ["500", "500"], 2: ["truncate"], 3: ["corrupt"], 4: ["stall"]}
    state, planted = build_state(kirc, faults, api_faults=["503"])
    url = serve(state)
    run = tmp_path / "run"
    import_cohort(ImportSettings(format="gdc", source=PROJECT, run=str(run), options=client_options(url)))
    expr_z, cdr = kirc
    patients, expr = load_patients(run), load_matrix(run)
    got = sorted(expr.index)
    assert got == sorted(expr_z.index[:-1])  # the case without a file is left out
    np.testing.assert_allclose(expr.loc[got, expr_z.columns].to_numpy(), (expr_z.loc[got] + OFFSET).to_numpy(),
                               atol=1e-3)
    assert "LINC-TEST" not in expr.columns  # protein-coding genes only
    ref = cdr.loc[patients[Col.PATIENT]]
    np.testing.assert_allclose(patients[Col.OS_DAYS].to_numpy(), ref["OS.time"].to_numpy())
    np.testing.assert_array_equal(patients[Col.OS_EVENT].to_numpy(), ref["OS"].to_numpy())
    assert (patients[Col.CANCER] == "KIRC").all()
    # every file on disk is complete and verified; no partial files left
    folder = run / "downloads" / "gdc" / PROJECT
    for fid, body in state.files.items():
        assert (folder / fid / f"{fid}.rna_seq.augmented_star_gene_counts.tsv").read_bytes() == body
    assert not list(folder.rglob("*.part"))
    # resumed with Range after the truncation and the stall; the corrupt file fetched again from byte 0
    gets = [e for e in state.log if e[0] == "GET"]
    for kind in ("truncate", "stall"):
        ranges = [r for (_, f, r) in gets if f == planted[kind]]
        assert ranges[0] is None and ranges[1] == f"bytes={len(state.files[planted[kind]]) // 3}-"
    assert [r for (_, f, r) in gets if f == planted["corrupt"]] == [None, None]
    assert len([1 for (_, f, _) in gets if f == planted["500"]]) == 3
    # paging: 7 cases at 2 per page → 4 POSTs to /cases, and the first /files call was retried after a 503
    assert [e[2] for e in state.log if e[:2] == ("POST", "cases")] == [0, 2, 4, 6]
    slides = pd.read_parquet(run / "cohort" / "slides.parquet")
    assert len(slides) == 6 and slides["slide_id"].str.endswith(".svs").all()
    assert (folder / "expression_manifest.tsv").read_text().startswith("id\tfilename\tmd5\tsize\tstate")
    notes = pd.read_json(run / "cohort" / "import_notes.json", typ="series")["notes"]
    assert any("non-primary-tumour" in n for n in notes)


def test_download_resumes_an_existing_part_file(tmp_path, serve, kirc):
    state, _ = build_state(kirc, {}, [])
    url = serve(state)
    fid, body = next(iter(state.files.items()))
    dest = tmp_path / "x.tsv"
    (tmp_path / "x.tsv.part").write_bytes(body[:100])  # left over from an interrupted run
    with GDCClient(GDCSettings(**client_options(url))) as gdc:
        gdc.download(fid, dest, hashlib.md5(body).hexdigest(), len(body))
        assert dest.read_bytes() == body
        assert state.log[-1] == ("GET", fid, "bytes=100-")
        n = len(state.log)
        gdc.download(fid, dest, hashlib.md5(body).hexdigest(), len(body))  # already there: no request
        assert len(state.log) == n
    tpm = read_star_counts(dest)
    assert tpm.index.is_unique and "LINC-TEST" not in tpm.index


def test_download_gives_up_cleanly_through_the_cli(tmp_path, serve, kirc):
    """Permanent 5xx: bounded retries, one message, exit 2, no cohort files."""
    import subprocess
    import sys

    state, _ = build_state(kirc, {i: ["500"] * 50 for i in range(6)}, [])
    url = serve(state)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "oncofm", "cohort", "import", "--format", "gdc", "--source", PROJECT,
           "--run", str(run)] + [x for k, v in client_options(url, retries=2).items() for x in ("-o", f"{k}={v}")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "could not download GDC file" in proc.stderr and "after 3 attempts" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (run / "cohort").exists() or not any((run / "cohort").iterdir())


def test_gdc_unknown_option_is_an_error():
    with pytest.raises(OncoFMError, match="unknown gdc option"):
        from oncofm.cohort.importers.gdc import _split_options

        _split_options({"base_ulr": "x"})


def test_clinical_records_to_patients():
    """Dead → days_to_death, event 1; alive → days_to_last_follow_up, event 0; CPTAC: per-case primary site."""
    from oncofm.cohort.importers.gdc import clinical_to_patients

    clinical = pd.DataFrame({
        "patient_id": ["C3L-00001", "C3L-00002", "C3N-00003"], "project": "CPTAC-3",
        "primary_site": ["Kidney", None, "Bronchus and lung"], "vital_status": ["Dead", "Alive", "Not Reported"],
        "days_to_death": [400.0, None, None], "days_to_last_follow_up": [None, 900.0, 30.0],
        "age": [61.0, 55.0, None], "gender": ["male", "female", "not reported"]})
    notes: list[str] = []
    p = clinical_to_patients(clinical, None, notes, missing_survival="drop")
    assert p[Col.PATIENT].tolist() == ["C3L-00001", "C3L-00002"]
    assert p[Col.OS_DAYS].tolist() == [400.0, 900.0] and p[Col.OS_EVENT].tolist() == [1.0, 0.0]
    assert p[Col.CANCER].tolist() == ["Kidney", "CPTAC-3"] and p[Col.SEX].tolist() == ["male", "female"]
    assert notes == ["1 GDC cases without vital status or survival days left out"]
