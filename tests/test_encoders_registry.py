"""Contract tests over every registered patch encoder, plus Swin attention maps and weight loading."""

from __future__ import annotations

import pytest
import torch

from oncofm.errors import OncoFMError
from oncofm.pathology.encoders import create_encoder, list_encoders

LARGE = {"swin-small", "swin-base"}  # 50-90 M parameters: built in the slow run only
#: encoders that cannot be built bare: swin-hf takes its geometry from a weights folder, external stands in
#: for another tool's features and refuses pixels (both in tests/test_encoder_weights.py), cells reads a trained
#: cell-type model's folder (its contract test below trains one on planted nuclei)
NEEDS_INPUT = {"swin-hf", "external", "cells"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in LARGE else n
                                  for n in list_encoders() if n not in NEEDS_INPUT])
def test_every_registered_encoder_builds_and_encodes(name: str) -> None:
    torch.manual_seed(0)
    enc = create_encoder(name).eval()
    x = torch.rand(2, 3, 48, 48)  # any patch side: resized to the encoder's input size
    with torch.no_grad():
        out = enc(x)
    assert out.shape == (2, enc.dim)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1])  # different patches, different features


def test_unknown_encoder_names_the_choices() -> None:
    with pytest.raises(OncoFMError, match="swin-cpu"):
        create_encoder("resnet-999")


def test_swin_attention_map_is_a_distribution_over_the_last_stage_grid() -> None:
    enc = create_encoder("swin-cpu").eval()
    with torch.no_grad():
        maps = enc.attention_map(torch.rand(3, 3, 112, 112))
    assert maps.shape == (3, 7, 7)  # 112 / 4 / 2 / 2
    assert torch.all(maps >= 0)
    torch.testing.assert_close(maps.sum(dim=(1, 2)), torch.ones(3))


def test_swin_attention_map_with_several_windows() -> None:
    """224 px with 2 stages: a 28 x 28 last-stage grid in 16 windows of 7 x 7, reassembled in place."""
    enc = create_encoder("swin-cpu", image_size=112, depths=[2, 2], num_heads=[2, 4]).eval()
    with torch.no_grad():
        maps = enc.attention_map(torch.rand(1, 3, 112, 112))
    assert maps.shape == (1, 14, 14)
    torch.testing.assert_close(maps.sum(), torch.tensor(1.0))


def test_swin_loads_local_weights(tmp_path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(1)
    a = create_encoder("swin-cpu").eval()
    save_file({k: v.contiguous() for k, v in a.swin.state_dict().items()}, str(tmp_path / "w.safetensors"))
    a.swin.save_pretrained(tmp_path / "hf")
    torch.manual_seed(2)
    x = torch.rand(2, 3, 112, 112)
    for weights in (tmp_path / "w.safetensors", tmp_path / "hf"):
        b = create_encoder("swin-cpu", weights=weights).eval()
        with torch.no_grad():
            torch.testing.assert_close(a(x), b(x))
    with pytest.raises(OncoFMError, match="do not fit the swin-tiny encoder .*missing keys.*other shapes"):
        create_encoder("swin-tiny", weights=tmp_path / "w.safetensors")


def test_efficientnet_lite0_imagenet_weights_are_loaded() -> None:
    """The shipped ImageNet weights load strictly into the Lite0 definition, and its BatchNorm statistics
    fit the activations they were trained on: a random init would not match the stored running stats."""
    enc = create_encoder("efficientnet-lite0").eval()
    rand = create_encoder("efficientnet-lite0", pretrained=False).eval()
    assert not torch.allclose(enc._conv_stem.weight, rand._conv_stem.weight)
    x = torch.rand(4, 3, 224, 224)
    with torch.no_grad():
        probs = torch.softmax(enc.logits(x), dim=1)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(4))
    # BN after the stem: stored running variance is of the order of the real activation variance
    with torch.no_grad():
        stem = enc._conv_stem(enc.prepare(torch.rand(8, 3, 224, 224)))
    ratio = stem.var(dim=(0, 2, 3)).mean() / enc._bn0.running_var.mean()
    assert 0.05 < float(ratio) < 20


def test_efficientnet_multiscale_features_are_the_stage_averages_then_the_head_is_unchanged() -> None:
    head = create_encoder("efficientnet-lite0", pretrained=False).eval()
    multi = create_encoder("efficientnet-lite0", pretrained=False, layers="multiscale").eval()
    multi.load_state_dict(head.state_dict())
    assert (head.dim, multi.dim) == (1280, 80 + 112 + 192 + 320)
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        f = multi(x)
        h = multi._bn0(multi._conv_stem(multi.prepare(x))).clamp(0, 6)
        for block in multi._blocks[:8]:  # stages 1-4 are the first 1 + 2 + 2 + 3 blocks
            h = block(h)
        torch.testing.assert_close(f[:, :80], h.mean(dim=(2, 3)))
        torch.testing.assert_close(multi.logits(x), head.logits(x))  # the ImageNet check ignores `layers`
    assert f.shape == (2, multi.dim)
    with pytest.raises(ValueError, match="layers"):
        create_encoder("efficientnet-lite0", pretrained=False, layers="stage9")


def test_cell_model_encoder_meets_the_contract(tmp_path) -> None:
    """The cell-type model as a registered patch encoder: a trained model's folder as its weights, (B, 7)
    finite features (log1p densities, fractions), different patches give different features, and the
    features are the cell findings of each patch. (A model of the fast LoG + boosting design: one that finds
    the planted nuclei after seconds of training; every design's own contract is in tests/test_cells.py.)"""
    import math

    import numpy as np

    from oncofm.pathology.cells import CellModel, cell_findings
    from oncofm.pathology.cells.registry import design_class
    from test_cells import _tiny_settings, planted

    torch.manual_seed(0)
    fitted = design_class("log-gbm").fit([planted(1), planted(2)], [planted(3)], _tiny_settings(tmp_path), tmp_path / "w")
    CellModel(fitted, [0.05, 0.05, 0.05]).save(tmp_path / "cells")
    with pytest.raises(OncoFMError, match="trained cell-type model"):
        create_encoder("cells")
    enc = create_encoder("cells", weights=tmp_path / "cells").eval()
    sparse = planted(4, n=3).image
    dense = planted(5, n=14).image
    x = torch.from_numpy(np.stack([sparse, dense])).permute(0, 3, 1, 2)  # uint8 (B, 3, S, S)
    with torch.no_grad():
        out = enc(x)
        again = enc(x.float() / 255.0)
    assert out.shape == (2, enc.dim) and enc.dim == 7
    assert torch.isfinite(out).all() and torch.equal(out, again)
    assert not torch.allclose(out[0], out[1])
    f = cell_findings(CellModel.load(tmp_path / "cells"), [sparse, dense], 0.5)
    want = [math.log1p(f[1].densities_per_mm2["all"]), f[1].fractions["stromal"]]
    got = [float(out[1, enc.measures.index("cell_density")]), float(out[1, enc.measures.index("stromal_fraction")])]
    assert got == pytest.approx(want, rel=1e-6)
