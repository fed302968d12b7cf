"""The web app in a real headless Chromium (Debian's package, driven by Playwright): demo patient → report.

Needs /usr/bin/chromium (scripts/install_browser.sh installs it; `make test` calls it). The server runs
in a thread on a free 127.0.0.1 port, with the slide model and fusion LLM replaced by the labelled test
doubles of tests/test_report_doubles.py while the run has no trained models.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from test_report_doubles import DOUBLE_TAG, demo_run, double_predictors

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def server(tmp_path):
    import uvicorn

    from oncofm.web.app import WebSettings, create_app

    port = _free_port()
    app = create_app(WebSettings(run=str(demo_run()), jobs_dir=str(tmp_path / "jobs"), port=port),
                     predictors=double_predictors())
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    t0 = time.time()
    while not srv.started:
        if time.time() - t0 > 30:
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.mark.slow
def test_browser_demo_patient_report(server):
    if not CHROMIUM.exists():
        pytest.fail("/usr/bin/chromium is missing: run scripts/install_browser.sh (as root)")
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1600})
        page.goto(server)
        expect(page.locator("#patient option[value='TCGA-B0-5698']")).to_have_count(1, timeout=20_000)
        page.select_option("#patient", "TCGA-B0-5698")
        page.click("#demo-button")
        expect(page.locator("#result")).to_be_visible(timeout=120_000)
        explanation = page.locator("#explanation")
        expect(explanation).to_contain_text(DOUBLE_TAG)
        expect(explanation).to_contain_text("Prediction:")
        heatmap = page.locator("#heatmap")
        expect(heatmap).to_be_visible()
        page.wait_for_function("document.getElementById('heatmap').naturalWidth > 0", timeout=20_000)
        assert heatmap.evaluate("img => img.naturalWidth") > 100
        # wheel zoom scales the heatmap
        heatmap.hover()
        page.mouse.wheel(0, -300)
        assert "scale(" in heatmap.evaluate("img => img.style.transform")
        # the full report is shown in the frame, with its own heatmap
        frame = page.frame_locator("#report")
        expect(frame.locator("#explanation")).to_contain_text("Prediction:", timeout=20_000)
        expect(frame.locator("#notice")).to_contain_text("Research use only")
        page.screenshot(path=str(ARTIFACTS / "browser_demo_report.png"), full_page=True)
        browser.close()
    assert (ARTIFACTS / "browser_demo_report.png").stat().st_size > 10_000


@pytest.mark.slow
def test_browser_failed_job_shows_its_error(server, tmp_path):
    """An uploaded image without tissue: the page shows the job's error message."""
    import numpy as np
    from PIL import Image
    from playwright.sync_api import expect, sync_playwright

    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((600, 600, 3), 245, np.uint8)).save(blank)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(server)
        expect(page.locator("#cancer_type option[value='KIRC']")).to_have_count(1, timeout=20_000)
        page.set_input_files("#slide", str(blank))
        page.select_option("#cancer_type", "KIRC")
        page.fill("#mpp", "0.5")
        page.click("#upload-button")
        expect(page.locator("#error")).to_contain_text("no tissue found", timeout=60_000)
        expect(page.locator("#result")).to_be_hidden()
        browser.close()
