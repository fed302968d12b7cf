"""Batch tiling: failures recorded not raised, finished slides skipped, locks, two concurrent workers."""

from __future__ import annotations

import csv
import json
import multiprocessing as mp
import os
import shutil
import socket
from pathlib import Path

import numpy as np
from PIL import Image

from oncofm.pathology.tiling import TilingSettings, acquire_lock, load_grid, tile_slides

PATHO = "pathology"


def _failures(out: Path) -> dict[str, str]:
    with open(out / "failures.csv", newline="") as fh:
        return {Path(r["slide"]).name: r["reason"] for r in csv.DictReader(fh)}


def test_bad_slides_go_to_failures_csv(shared_data: Path, tmp_path: Path) -> None:
    src = tmp_path / "slides"
    src.mkdir()
    svs = shared_data / PATHO / "cmu1_small_region_svs" / "CMU-1-Small-Region.svs"
    derived = shared_data / PATHO / "cmu1_small_region_svs" / "CMU-1-Small-Region_DERIVED_pyramid.tif"
    shutil.copy(svs, src / "good.svs")
    data = svs.read_bytes()
    (src / "truncated.svs").write_bytes(data[: len(data) * 6 // 10])
    dd = derived.read_bytes()
    (src / "truncated_pyramid.tif").write_bytes(dd[: len(dd) // 2])
    rng = np.random.default_rng(0)
    corrupt = bytearray(data)
    corrupt[8:200_000] = rng.integers(0, 256, 200_000 - 8, dtype=np.uint8).tobytes()  # header kept, IFDs garbled
    (src / "corrupt.svs").write_bytes(bytes(corrupt))
    (src / "random.ndpi").write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    (src / "unsupported.czi").write_bytes(b"ZISRAWFILE" + bytes(100))
    Image.fromarray(np.full((600, 600, 3), 245, np.uint8)).save(src / "blank.png")  # no tissue

    out = tmp_path / "tiles"
    results = tile_slides(TilingSettings(source=str(src), out=str(out), slide_mpp=0.5, qc=False), progress=False)
    status = {Path(r.slide).name: r.status for r in results}
    assert status.pop("good.svs") == "done"
    failures = _failures(out)
    assert set(failures) == set(status) and set(status.values()) == {"failed"}, status
    assert "no patch" in failures["blank.png"]
    assert all(reason for reason in failures.values())
    assert not list(out.glob("*.lock")) and not list(out.glob(".*tmp"))  # locks released, no temp files left
    assert sorted(p.name for p in out.glob("*.h5")) == ["good.h5"]

    # Rerun: the finished slide is skipped, failures are retried and stay recorded once.
    again = tile_slides(TilingSettings(source=str(src), out=str(out), slide_mpp=0.5, qc=False), progress=False)
    assert {Path(r.slide).name: r.status for r in again}["good.svs"] == "skipped"
    assert set(_failures(out)) == set(failures)
    # A fixed slide disappears from failures.csv.
    (src / "blank.png").unlink()
    shutil.copy(svs, src / "blank.svs")
    tile_slides(TilingSettings(source=str(src), out=str(out), slide_mpp=0.5, qc=False), progress=False)
    assert "blank.png" in _failures(out) and "blank.svs" not in _failures(out)


def test_locks_busy_and_stale(shared_data: Path, tmp_path: Path) -> None:
    svs = shared_data / PATHO / "cmu1_small_region_svs" / "CMU-1-Small-Region.svs"
    out = tmp_path / "tiles"
    out.mkdir()
    lock = out / "CMU-1-Small-Region.h5.lock"
    # A live holder (this process) -> busy, nothing written.
    assert acquire_lock(lock, stale_after_s=3600)
    res = tile_slides(TilingSettings(source=str(svs), out=str(out), qc=False), progress=False)
    assert res[0].status == "busy" and not (out / "CMU-1-Small-Region.h5").exists()
    # A dead holder on this host -> stale, broken, slide tiled.
    proc = mp.get_context("spawn").Process(target=os.getpid)
    proc.start()
    proc.join()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": proc.pid, "time": 0}))
    res = tile_slides(TilingSettings(source=str(svs), out=str(out), qc=False), progress=False)
    assert res[0].status == "done" and not lock.exists()
    # An old lock from another machine -> stale by age.
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "time": 0}))
    os.utime(lock, (0, 0))
    res = tile_slides(TilingSettings(source=str(svs), out=str(out), qc=False, redo=True), progress=False)
    assert res[0].status == "done"


def _worker(source: str, out: str, barrier: mp.synchronize.Barrier, queue: mp.Queue) -> None:
    from oncofm.pathology.tiling import TilingSettings, tile_slides

    barrier.wait(timeout=120)
    results = tile_slides(TilingSettings(source=source, out=out, slide_mpp=0.25, qc=False), progress=False)
    queue.put([(Path(r.slide).name, r.status, r.worker) for r in results])


def test_two_concurrent_workers_produce_each_slide_once(shared_data: Path, tmp_path: Path) -> None:
    src = tmp_path / "slides"
    src.mkdir()
    tiles = sorted((shared_data / PATHO / "monuseg_tcga_tiles").glob("*.jpg"))[:10]
    for t in tiles:
        shutil.copy(t, src / t.name)
    out = tmp_path / "tiles"
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(str(src), str(out), barrier, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    reports = [queue.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    done: dict[str, list[str]] = {}
    for report in reports:
        for name, status, worker in report:
            assert status in {"done", "skipped", "busy"}, (name, status)
            if status == "done":
                done.setdefault(name, []).append(worker)
    assert sorted(done) == sorted(t.name for t in tiles)
    assert all(len(w) == 1 for w in done.values()), done  # each slide tiled by exactly one worker
    for name, (worker,) in done.items():
        h5 = out / (Path(name).stem + ".h5")
        assert load_grid(h5).attrs["worker"] == worker
    assert not list(out.glob("*.lock"))


def test_process_pool_workers(shared_data: Path, tmp_path: Path) -> None:
    src = shared_data / PATHO / "pathomicfusion_gbmlgg_rois"
    res = tile_slides(TilingSettings(source=str(src), out=str(tmp_path), slide_mpp=0.5, workers=2, qc=False),
                      progress=False)
    assert [r.status for r in res] == ["done"] * 3
    assert len({r.worker for r in res}) >= 1 and all(r.worker.split(":")[1] != str(os.getpid()) for r in res)


def test_cli_tile_command(shared_data: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from oncofm.cli import app

    folder = shared_data / PATHO / "tcga_cr7395_hnsc_svs"
    runner = CliRunner()
    # No mpp in the SVS and no --slide-mpp: the slide fails with a message naming the flag.
    res = runner.invoke(app, ["tile", str(folder), "--run", str(tmp_path), "--no-qc"])
    assert res.exit_code != 0
    assert "--slide-mpp" in _failures(tmp_path / "tiles")["TCGA-CR-7395-01A-01-TS1_histolab-fixture.svs"]
    res = runner.invoke(app, ["tile", str(folder), "--run", str(tmp_path), "--slide-mpp", "0.5", "--mpp", "1.0",
                              "--size", "224", "--min-tissue", "0.6", "--no-qc"])
    assert res.exit_code == 0, res.output
    assert "done" in res.output and (tmp_path / "settings" / "tiles.yaml").exists()
    g = load_grid(tmp_path / "tiles" / "TCGA-CR-7395-01A-01-TS1_histolab-fixture.h5")
    assert int(g.attrs["read_level"]) == 1 and (g.tissue_fraction >= 0.6).all()
    assert _failures(tmp_path / "tiles") == {}
