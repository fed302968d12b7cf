"""The feature-extraction pipeline (``oncofm encode``): the same features as today's loop on real slides, in
the CLAM/TRIDENT layout OncoFM's own readers and ``oncofm train slide`` accept, resumable per slide, atomic,
with per-slide reports; the TorchScript copy of the encoder is used only when it reproduces the encoder."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from oncofm.errors import OncoFMError
from oncofm.pathology.encoders import PatchEncoder, create_encoder
from oncofm.pathology.extract import (
    EncoderRunner,
    EncodeSettings,
    encode_slides,
    resolve_device,
    resolve_precision,
)

SLIDES = [("cmu1_small_region_svs/CMU-1-Small-Region.svs", None),
          ("tcga_cr7395_hnsc_svs/TCGA-CR-7395-01A-01-TS1_histolab-fixture.svs", 0.5)]


@pytest.fixture(scope="module")
def tiles_dir(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two real slides tiled at 2 µm/px, 112 px (a few dozen patches each)."""
    from oncofm.pathology.tiling import TilingSettings, tile_slide

    out = tmp_path_factory.mktemp("extract_tiles")
    for name, slide_mpp in SLIDES:
        path = shared_data / "pathology" / name
        tile_slide(path, TilingSettings.build(source=str(path), out=str(out), target_mpp=2.0, patch_size=112,
                                              min_tissue=0.5, slide_mpp=slide_mpp, qc=False))
    return out


class FailsAfter(PatchEncoder):
    """Wraps an encoder and raises on its ``n``-th batch (an interrupted run)."""

    def __init__(self, inner: PatchEncoder, n: int) -> None:
        super().__init__(inner.dim, inner.input_size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        self.inner, self.n, self.calls, self.name = inner, n, 0, inner.name

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.prepare(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls >= self.n:
            raise RuntimeError("simulated crash in the middle of a slide")
        return self.inner.features(x)


def test_pipeline_matches_todays_loop_in_the_clam_trident_layout(tiles_dir: Path, tmp_path: Path) -> None:
    from oncofm.pathology.feature_bags import read_feature_bag
    from oncofm.pathology.slide_model import extract_features, load_patch_features
    from oncofm.pathology.tiling import load_grid

    torch.manual_seed(0)
    encoder = create_encoder("swin-cpu").eval()
    settings = EncodeSettings.build(tiles=str(tiles_dir), out=str(tmp_path / "feats"), encoder="swin-cpu",
                                    workers=2, batch_size=16)
    results = encode_slides(settings, progress=False, encoder=encoder)
    assert [r.status for r in results] == ["done", "done"]
    for r in results:
        grid = load_grid(r.slide)
        loop = extract_features(encoder, r.slide, tmp_path / "loop" / Path(r.slide).name)
        ref, _ = load_patch_features(loop)
        bag = read_feature_bag(r.path)  # OncoFM's reader of CLAM / TRIDENT bags
        assert bag.features.shape == ref.shape == (len(grid), 192)
        np.testing.assert_allclose(bag.features, ref, atol=0.02, rtol=0.01)  # the loop stores float16
        np.testing.assert_array_equal(bag.coords, grid.coords)
        assert bag.patch_size_level0 == int(grid.attrs["level0_size"]) and bag.attrs["layout"] == "trident"
        with h5py.File(r.path) as f:  # what CLAM / TRIDENT readers look at
            assert f["features"].dtype == np.float32 and f["coords"].dtype == np.int64
            assert f.attrs["patch_size"] == 112 and f.attrs["patch_level"] == grid.attrs["read_level"]
            assert f["coords"].attrs["patch_size_level0"] == grid.attrs["level0_size"]
            assert f.attrs["engine"] == "torchscript-frozen" and f.attrs["precision"] == "fp32"
        # `oncofm train slide` finds the slide encoded and never calls its encoder
        assert extract_features(FailsAfter(encoder, 1), r.slide, r.path, encoder_name="swin-cpu") == \
            Path(r.path)
    assert "torchscript-frozen" in results[0].describe() and "patches/s" in results[0].describe()


def test_interrupted_slide_leaves_nothing_and_the_rerun_resumes(tiles_dir: Path, tmp_path: Path) -> None:
    from oncofm.pathology.tiling import FAILURES_FILE

    out = tmp_path / "feats"
    torch.manual_seed(0)
    good = create_encoder("swin-cpu").eval()
    base = dict(tiles=str(tiles_dir), out=str(out), encoder="swin-cpu", workers=1, batch_size=8)
    n_first = len(h5py.File(sorted(tiles_dir.glob("*.h5"))[0])["coords"])
    crash = FailsAfter(good, -(-n_first // 8) + 2)  # crashes on the second slide's second batch
    # eager (the frozen copy would not call the Python code that crashes); how it runs is no setting of the files
    first = encode_slides(EncodeSettings.build(**base, optimize=False), progress=False, encoder=crash)
    assert [r.status for r in first] == ["done", "failed"]
    assert "simulated crash" in first[1].reason
    names = sorted(p.name for p in out.iterdir())
    assert names == [Path(first[0].path).name, "encode_settings.yaml", FAILURES_FILE], names  # no partial file
    assert Path(first[1].slide).name in (out / FAILURES_FILE).read_text()
    stamp = Path(first[0].path).stat().st_mtime_ns

    again = encode_slides(EncodeSettings.build(**base), progress=False, encoder=good)
    assert [r.status for r in again] == ["skipped", "done"]
    assert Path(first[0].path).stat().st_mtime_ns == stamp
    assert "already encoded" in again[0].describe()
    assert Path(first[1].slide).name not in (out / FAILURES_FILE).read_text()

    with pytest.raises(OncoFMError, match=r"features_dtype: float32 -> float16.*--redo"):
        encode_slides(EncodeSettings.build(**base, features_dtype="float16"), progress=False, encoder=good)
    redo = encode_slides(EncodeSettings.build(**base, features_dtype="float16", redo=True), progress=False,
                         encoder=good)
    assert [r.status for r in redo] == ["done", "done"]
    with h5py.File(redo[0].path) as f:
        assert f["features"].dtype == np.float16


def test_cli_reports_each_slide(tiles_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from oncofm.cli import app

    args = ["encode", str(tiles_dir), "--out", str(tmp_path / "f"), "--encoder", "swin-cpu", "--workers", "1"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    lines = [ln for ln in first.output.splitlines() if ln.startswith("done")]
    assert len(lines) == 2 and all("patches -> 192-d features" in ln and "patches/s" in ln for ln in lines)
    second = CliRunner().invoke(app, args)
    assert second.output.count("already encoded with these settings") == 2


class ShapeDependent(PatchEncoder):
    """Features whose branch depends on the batch size: tracing bakes one branch in, so the TorchScript copy
    is wrong for other batch sizes and must be refused."""

    name = "shape-dependent"

    def __init__(self) -> None:
        super().__init__(3, 16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean(dim=(2, 3))
        return pooled * 2 if x.shape[0] > 2 else pooled


def test_torchscript_copy_used_only_when_it_reproduces_the_encoder() -> None:
    x = (torch.rand(5, 3, 16, 16) * 255).to(torch.uint8)
    runner = EncoderRunner(ShapeDependent(), "cpu", "fp32", optimize=True)
    out = runner(x)
    assert runner.engine == "eager"
    np.testing.assert_allclose(out, ShapeDependent().eval()(x).numpy(), atol=1e-6)
    torch.manual_seed(0)
    swin = create_encoder("swin-cpu").eval()
    runner = EncoderRunner(swin, "cpu", "fp32", optimize=True)
    got = runner(x)
    assert runner.engine == "torchscript-frozen"
    with torch.inference_mode():
        np.testing.assert_allclose(got, swin(x).numpy(), rtol=1e-4, atol=1e-4)


def test_precision_and_device_rules() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) is None and resolve_precision("fp32", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    with pytest.raises(OncoFMError, match="fp16 needs a GPU"):
        resolve_precision("fp16", cpu)
    if not torch.cuda.is_available():
        assert resolve_device("auto") == cpu
        with pytest.raises(OncoFMError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(OncoFMError, match="not a device"):
        resolve_device("tpu-9")


def test_one_task_per_slide_on_an_executor(tiles_dir: Path, tmp_path: Path) -> None:
    """encode_many (the process-pool / Ray path) writes the same bags as encode_slides and skips them after."""
    from oncofm.pathology.extract import encode_many

    base = dict(tiles=str(tiles_dir), encoder="swin-cpu", encoder_options={"image_size": 56, "window_size": 7,
                                                                           "depths": [2, 2], "num_heads": [2, 4]},
                workers=0)
    torch.manual_seed(0)
    many = encode_many(EncodeSettings.build(**base, out=str(tmp_path / "many")), executor="local", workers=1,
                       progress=False)
    assert [r.status for r in many] == ["done", "done"], [r.reason for r in many]
    again = encode_many(EncodeSettings.build(**base, out=str(tmp_path / "many")), executor="local", workers=1,
                        progress=False)
    assert [r.status for r in again] == ["skipped", "skipped"]
    with h5py.File(many[0].path) as f:
        assert f["features"].shape == (len(f["coords"]), 96)
