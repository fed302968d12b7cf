"""The benchmark recipe as a preset of ``oncofm train slide``, and feature standardisation inside the model.

``bench/slide_mil.py`` (the README's slide numbers) builds its models from ``SlideTrainSettings.preset(
"benchmark")`` through ``_build_model``; these tests pin the recipe and check that the standardisation
statistics live in the model: set from the training patches, saved in its state dict, applied to every bag
the model sees (so ``predict_bags``/the predictor get it without knowing about it).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oncofm.errors import OncoFMError


def _preset(**kw):
    from oncofm.pathology.slide_train import SlideTrainSettings

    return SlideTrainSettings.preset("benchmark", run="RUN", **kw)


def test_benchmark_preset_is_the_benchmark_recipe() -> None:
    s = _preset()
    assert (s.encoder, s.encoder_options) == ("efficientnet-lite0", {"input_size": 224, "layers": "multiscale"})
    assert s.standardize_features and s.mode == "features" and s.aggregator == "gated-attention"
    assert (s.hidden, s.dropout, s.max_patches) == (32, 0.25, 0)
    assert (s.instance_drop, s.instance_weight, s.instance_k) == (0.4, 1.0, 1)
    t = s.train
    assert (t.epochs, t.batch_size, t.lr, t.weight_decay, t.patience, t.monitor, t.mode) == (
        30, 8, 1e-3, 5e-2, 8, "val_auc", "max")
    # the stage's own defaults are unchanged
    from oncofm.pathology.slide_train import SlideTrainSettings

    d = SlideTrainSettings(run="RUN")
    assert (d.encoder, d.standardize_features, d.instance_k, d.max_patches) == ("swin-cpu", False, 2, 512)


def test_preset_overrides_merge_and_errors() -> None:
    from oncofm.training import TrainSettings

    s = _preset(aggregator="mean", hidden=None, train={"epochs": 3})
    assert s.aggregator == "mean" and s.hidden == 32  # None: keep the preset's
    assert (s.train.epochs, s.train.patience, s.train.monitor) == (3, 8, "val_auc")  # merged field by field
    assert _preset(train=TrainSettings(seed=5)).train.seed == 5
    assert _preset(train=TrainSettings(seed=5)).train.lr == 1e-3  # only the set fields of a TrainSettings
    with pytest.raises(OncoFMError, match="unknown slide-model preset"):
        from oncofm.pathology.slide_train import SlideTrainSettings

        SlideTrainSettings.preset("nope", run="RUN")
    with pytest.raises(OncoFMError, match="standardize_features"):
        _preset(mode="end-to-end")


def _bags(rng: np.random.Generator, n: int = 6, d: int = 5) -> list[np.ndarray]:
    return [(rng.normal(3.0, 2.0, size=(int(rng.integers(2, 9)), d)) * np.arange(1, d + 1)).astype(np.float32)
            for _ in range(n)]


def test_feature_stats_match_the_stacked_mean_and_std() -> None:
    from oncofm.pathology.slide_model import feature_stats

    bags = _bags(np.random.default_rng(0))
    mean, std = feature_stats(bags)
    stack = np.concatenate(bags).astype(np.float64)
    np.testing.assert_allclose(mean, stack.mean(0), rtol=1e-6)
    np.testing.assert_allclose(std, stack.std(0) + 1e-6, rtol=1e-6)
    assert mean.dtype == std.dtype == np.float32
    with pytest.raises(OncoFMError):
        feature_stats([])


def test_model_standardises_its_input_and_saves_the_statistics(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    from oncofm.pathology.slide_model import FeatureBagDataset, feature_stats, predict_bags
    from oncofm.pathology.slide_train import _build_model

    rng = np.random.default_rng(1)
    bags = _bags(rng)
    mean, std = feature_stats(bags[:4])
    settings = _preset(hidden=8)
    torch.manual_seed(0)
    model, encoder = _build_model(settings, with_encoder=False, in_dim=5)
    assert encoder is None and model.encoder is None  # in_dim: no encoder built at all
    model.set_feature_stats(mean, std)
    # the same weights without standardisation, fed features z-scored beforehand
    plain, _ = _build_model(_preset(hidden=8, standardize_features=False), with_encoder=False, in_dim=5)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("feature_")}
    plain.load_state_dict(state)
    assert "feature_mean" not in plain.state_dict()  # models without it keep their old state dict
    got = predict_bags(model, FeatureBagDataset(bags, [0.0] * len(bags)), batch_size=3)  # padded batches
    want = predict_bags(plain, FeatureBagDataset([(b - mean) / std for b in bags], [0.0] * len(bags)), batch_size=1)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g["logit"], w["logit"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(g["attention"], w["attention"], rtol=1e-5, atol=1e-7)
    # saved in the state dict (model.safetensors) and restored by a freshly built model
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "m.safetensors"))
    fresh, _ = _build_model(settings, with_encoder=False, in_dim=5)
    fresh.load_state_dict(load_file(str(tmp_path / "m.safetensors")))
    np.testing.assert_array_equal(fresh.feature_mean.numpy(), mean)
    np.testing.assert_array_equal(fresh.feature_std.numpy(), std)
    again = predict_bags(fresh, FeatureBagDataset(bags, [0.0] * len(bags)))
    np.testing.assert_allclose([a["logit"] for a in again], [g["logit"] for g in got], rtol=1e-6)
    with pytest.raises(OncoFMError):
        plain.set_feature_stats(mean, std)
    with pytest.raises(OncoFMError):
        model.set_feature_stats(mean[:3], std[:3])
