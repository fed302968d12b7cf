"""Instance dropout and the instance-level (mi-Net / CLAM-style) loss of the slide model."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def test_instance_dropout_keeps_share_of_patches() -> None:
    from oncofm.pathology.slide_model import FeatureBagDataset

    bags = [np.arange(20 * 3, dtype=np.float32).reshape(20, 3), np.ones((1, 3), np.float32)]
    ds = FeatureBagDataset(bags, [1, 0], drop=0.4)
    torch.manual_seed(0)
    x = ds[0]["x"]
    assert x.shape == (12, 3)  # 60 % of 20 kept
    rows = {tuple(r.tolist()) for r in x}
    assert len(rows) == 12 and rows <= {tuple(r) for r in bags[0].tolist()}  # distinct original patches
    assert ds[1]["x"].shape == (1, 3)  # a single patch is never dropped
    with pytest.raises(ValueError, match="instance dropout"):
        FeatureBagDataset(bags, [1, 0], drop=1.0)


def test_instance_loss_matches_hand_computation() -> None:
    from oncofm.pathology.slide_model import SlideTask

    bce = torch.nn.functional.binary_cross_entropy_with_logits
    logits = torch.tensor([[3.0, -1.0, 0.5, 9.0], [0.2, -0.4, 1.0, 0.0]])  # (B, N)
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])  # padded 9.0 must be ignored
    y = torch.tensor([1.0, 0.0])
    got = SlideTask(instance_weight=1.0, instance_k=2)._instance_loss(logits, mask, y)
    pos = bce(torch.tensor([3.0, 0.5]), torch.ones(2))  # top-2 real patches of the positive slide
    neg = bce(logits[1], torch.zeros(4))  # every patch of the negative slide
    assert torch.allclose(got, (pos + neg) / 2)
