"""Pretrained encoders from local weights, loaded by ``oncofm encode --encoder-weights PATH``: a Swin in
Hugging Face format from a folder, a plain PyTorch state dict of a registered encoder; checkpoints that do not
fit are refused naming the missing and unexpected keys; ``external...`` encoders resolve in a fresh process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from oncofm.errors import OncoFMError
from oncofm.pathology.dataset import PatchDataset
from oncofm.pathology.encoders import SwinEncoder, create_encoder

CMU = ("cmu1_small_region_svs", "CMU-1-Small-Region.svs")
TINY_SWIN = dict(image_size=64, patch_size=4, embed_dim=24, depths=[2, 2], num_heads=[2, 4], window_size=4)


@pytest.fixture(scope="module")
def tiles(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few real patches of CMU-1 (2 µm/px, 112 px)."""
    from oncofm.pathology.tiling import TilingSettings, tile_slide

    slide = shared_data / "pathology" / Path(*CMU)
    out = tmp_path_factory.mktemp("weights_tiles")
    result = tile_slide(slide, TilingSettings.build(source=str(slide), out=str(out), target_mpp=2.0,
                                                    patch_size=112, min_tissue=0.5, qc=False))
    assert 5 <= result.n_patches <= 40
    return Path(result.paths["h5"])


def patches(tiles: Path) -> torch.Tensor:
    ds = PatchDataset(tiles)
    return torch.stack([ds[i] for i in range(len(ds))])


def encode_cli(tiles: Path, out: Path, encoder: str, weights: Path, *extra: str) -> tuple[np.ndarray, object]:
    from oncofm.cli import app

    result = CliRunner().invoke(app, ["encode", str(tiles), "--out", str(out), "--encoder", encoder,
                                      "--encoder-weights", str(weights), "--workers", "0", *extra])
    if result.exit_code != 0:
        return np.zeros(0), result
    with h5py.File(out / tiles.name) as f:
        assert f.attrs["encoder_weights"] == str(weights)
        return f["features"][:], result


def test_hf_swin_folder_through_the_cli(tiles: Path, tmp_path: Path) -> None:
    from transformers import SwinConfig, SwinModel

    torch.manual_seed(3)
    SwinModel(SwinConfig(**TINY_SWIN), add_pooling_layer=True).save_pretrained(tmp_path / "tiny-swin")
    got, result = encode_cli(tiles, tmp_path / "out", "swin-hf", tmp_path / "tiny-swin", "--no-optimize")
    assert result.exit_code == 0, result.output
    # the same folder loaded by transformers itself, behind the same patch preprocessing
    ref_enc = SwinEncoder(SwinConfig(**TINY_SWIN))
    ref_enc.swin = SwinModel.from_pretrained(tmp_path / "tiny-swin", attn_implementation="eager")
    with torch.inference_mode():
        ref = ref_enc.eval()(patches(tiles)).numpy()
    assert got.shape == ref.shape == (len(ref), 48)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    # the default CPU path (TorchScript-frozen, checked against eager) gives the same features
    frozen, result = encode_cli(tiles, tmp_path / "out_frozen", "swin-hf", tmp_path / "tiny-swin")
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(frozen, ref, rtol=1e-4, atol=1e-4)
    # a preset whose geometry is not the folder's: refused, naming the differences and swin-hf
    _, bad = encode_cli(tiles, tmp_path / "bad", "swin-cpu", tmp_path / "tiny-swin")
    assert isinstance(bad.exception, OncoFMError)
    assert "embed_dim: 24 in the folder, 48 in the preset" in str(bad.exception)
    assert "--encoder swin-hf" in str(bad.exception)


def test_plain_state_dict_of_a_registered_encoder_through_the_cli(tiles: Path, tmp_path: Path) -> None:
    torch.manual_seed(4)
    mine = create_encoder("efficientnet-lite0", pretrained=False).eval()
    for m in mine.modules():  # not ImageNet's statistics, so the test sees whose weights were used
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    # as a DDP/Lightning checkpoint: nested under state_dict, every key prefixed module.
    torch.save({"state_dict": {f"module.{k}": v for k, v in mine.state_dict().items()}, "epoch": 3},
               tmp_path / "ckpt.pt")
    got, result = encode_cli(tiles, tmp_path / "out", "efficientnet-lite0", tmp_path / "ckpt.pt", "--no-optimize")
    assert result.exit_code == 0, result.output
    x = patches(tiles)
    with torch.inference_mode():
        ref = mine(x).numpy()
        imagenet = create_encoder("efficientnet-lite0").eval()(x).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert np.abs(got - imagenet).mean() > 10 * np.abs(got - ref).max()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in mine.state_dict().items()}, str(tmp_path / "w.safetensors"))
    again, result = encode_cli(tiles, tmp_path / "out2", "efficientnet-lite0", tmp_path / "w.safetensors")
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(again, ref, rtol=1e-3, atol=1e-3)


def test_mismatched_checkpoints_name_missing_and_unexpected_keys(tiles: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    swin = create_encoder("swin-cpu")
    save_file({k: v.contiguous() for k, v in swin.swin.state_dict().items()}, str(tmp_path / "swin.safetensors"))
    _, result = encode_cli(tiles, tmp_path / "out", "efficientnet-lite0", tmp_path / "swin.safetensors")
    msg = str(result.exception)
    assert isinstance(result.exception, OncoFMError) and "do not fit the efficientnet-lite0 encoder" in msg
    assert "missing keys: _conv_stem.weight, _bn0.weight" in msg
    assert "unexpected keys: embeddings.norm.bias" in msg and "encoder.layers.0.blocks.0.attention" in msg
    # one tensor renamed, one dropped: exactly those are named
    state = create_encoder("efficientnet-lite0", pretrained=False).state_dict()
    state["_conv_head.kernel"] = state.pop("_conv_head.weight")
    del state["_bn1.running_var"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(OncoFMError, match=r"2 missing keys: _conv_head.weight, _bn1.running_var; "
                                          r"1 unexpected keys: _conv_head.kernel"):
        create_encoder("efficientnet-lite0", weights=tmp_path / "partial.pth")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "partial.pth").read_bytes()[:5000])
    with pytest.raises(OncoFMError, match="not a readable PyTorch checkpoint"):
        create_encoder("efficientnet-lite0", weights=tmp_path / "cut.pt")
    with pytest.raises(OncoFMError, match="do not exist"):
        create_encoder("swin-cpu", weights=tmp_path / "nowhere")
    with pytest.raises(OncoFMError, match="needs --encoder-weights FOLDER"):
        create_encoder("swin-hf")


def test_external_encoder_resolves_in_a_fresh_process() -> None:
    """Moved from feature_bags into the encoder registry: a new CLI process builds `external-uni` without
    anyone registering it first."""
    code = ("from oncofm.pathology.encoders import create_encoder, list_encoders; "
            "e = create_encoder('external-uni', dim=16); print(e.name, e.dim, 'external' in list_encoders())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["external-uni", "16", "True"]
    from oncofm.pathology import encoders, feature_bags

    assert feature_bags.ExternalFeatureEncoder is encoders.ExternalFeatureEncoder
    assert feature_bags.register_external_encoder("external-x") == "external-x"
    with pytest.raises(OncoFMError, match="cannot encode pixels"):
        create_encoder("external-y", dim=8)(torch.rand(1, 3, 8, 8))
