"""`oncofm tile --executor ray` gives the same tiles as the local path and skips finished slides."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest

pytest.importorskip("ray")


@pytest.mark.slow
def test_tile_cli_on_ray_matches_local(shared_data, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from oncofm.cli import app

    src = tmp_path / "slides"
    src.mkdir()
    shutil.copy(shared_data / "pathology" / "cmu1_small_region_svs" / "CMU-1-Small-Region.svs", src)
    (src / "broken.svs").write_bytes(b"not a slide")
    runner = CliRunner()
    local = runner.invoke(app, ["tile", str(src), "--out", str(tmp_path / "local"), "--no-qc"])
    ray = runner.invoke(app, ["tile", str(src), "--out", str(tmp_path / "ray"), "--no-qc", "--executor", "ray",
                              "--workers", "2"])
    assert local.exit_code == 0 and ray.exit_code == 0, (local.output, ray.output)
    with h5py.File(tmp_path / "local" / "CMU-1-Small-Region.h5") as a, \
            h5py.File(tmp_path / "ray" / "CMU-1-Small-Region.h5") as b:
        np.testing.assert_array_equal(a["coords"][:], b["coords"][:])
    assert "broken.svs" in (tmp_path / "ray" / "failures.csv").read_text()
    again = runner.invoke(app, ["tile", str(src), "--out", str(tmp_path / "ray"), "--no-qc", "--executor", "ray"])
    assert "skipped" in again.output
