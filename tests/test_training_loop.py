"""The shared training loop: learns a planted signal, stops early, checkpoints and resumes."""

from __future__ import annotations

import json

import torch

from oncofm.training import TrainSettings, fit


class _Task:
    def loss(self, model, batch):
        x, y = batch
        return torch.nn.functional.binary_cross_entropy_with_logits(model(x).squeeze(-1), y)

    def evaluate(self, model, loader):
        losses, correct, n = [], 0, 0
        for x, y in loader:
            logits = model(x).squeeze(-1)
            losses.append(float(torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="sum")))
            correct += int(((logits > 0).float() == y).sum())
            n += len(y)
        return {"val_loss": float(sum(losses)) / n, "val_acc": correct / n}


def _data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    y = (x[:, 0] - x[:, 1] > 0).float()  # planted rule
    return torch.utils.data.TensorDataset(x, y)


def test_fit_learns_and_restores_best(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 1)
    settings = TrainSettings(epochs=15, batch_size=32, lr=0.05, patience=3, progress=False)
    result = fit(model, _data(400, 0), _data(200, 1), _Task(), settings, tmp_path)
    assert result.best_epoch >= 1
    with torch.no_grad():
        acc = _Task().evaluate(model, torch.utils.data.DataLoader(_data(300, 2), batch_size=100))["val_acc"]
    assert acc > 0.9
    lines = (tmp_path / "history.jsonl").read_text().strip().splitlines()
    assert len(lines) == result.epochs_run
    assert {"train_loss", "val_loss", "val_acc", "lr"} <= set(json.loads(lines[0]))


class _Interrupt(_Task):
    def __init__(self, at_call: int):
        self.calls, self.at_call = 0, at_call

    def loss(self, model, batch):
        self.calls += 1
        if self.calls == self.at_call:
            raise KeyboardInterrupt
        return super().loss(model, batch)


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path):
    settings = TrainSettings(epochs=5, batch_size=32, lr=0.01, patience=10, progress=False)
    torch.manual_seed(0)
    try:  # 200 samples / 32 = 7 batches per epoch: interrupt in epoch 4
        fit(torch.nn.Linear(5, 1), _data(200, 0), _data(100, 1), _Interrupt(7 * 3 + 2), settings, tmp_path)
        raise AssertionError("expected an interruption")
    except KeyboardInterrupt:
        pass
    state = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())
    assert state["epoch"] == 2  # epochs 1-3 finished and checkpointed
    torch.manual_seed(123)  # a different fresh init: resume must overwrite it from the checkpoint
    resumed = fit(torch.nn.Linear(5, 1), _data(200, 0), _data(100, 1), _Task(), settings, tmp_path)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4, 5]
    torch.manual_seed(0)
    straight = fit(torch.nn.Linear(5, 1), _data(200, 0), _data(100, 1), _Task(), settings, tmp_path / "straight")
    for a, b in zip(resumed.history, straight.history, strict=True):
        assert abs(a["val_loss"] - b["val_loss"]) < 1e-6


def test_checkpoints_hold_only_trainable_weights_of_a_partly_frozen_model(tmp_path):
    torch.manual_seed(0)
    frozen = torch.nn.Linear(5, 5)
    for p in frozen.parameters():
        p.requires_grad_(False)
    model = torch.nn.Sequential(frozen, torch.nn.Linear(5, 1))
    before = frozen.weight.clone()
    settings = TrainSettings(epochs=2, batch_size=32, lr=0.01, patience=5, progress=False)
    fit(model, _data(100, 0), _data(50, 1), _Task(), settings, tmp_path)
    blob = torch.load(tmp_path / "checkpoint" / "state.pt", weights_only=False)
    assert set(blob["model"]) == {"1.weight", "1.bias"}
    assert set(torch.load(tmp_path / "best_model.pt", weights_only=True)) == {"1.weight", "1.bias"}
    assert torch.equal(frozen.weight, before)
    # resuming a finished run restores the trainable part and leaves the frozen part alone
    again = fit(model, _data(100, 0), _data(50, 1), _Task(), settings, tmp_path)
    assert again.epochs_run == 2


def test_mixed_precision_auto_resolves_to_what_the_hardware_runs(tmp_path):
    from oncofm.training import native_bf16, resolve_precision

    assert resolve_precision(TrainSettings(mixed_precision="no")) == "no"
    assert resolve_precision(TrainSettings(mixed_precision="bf16")) == "bf16"
    auto = resolve_precision(TrainSettings(mixed_precision="auto", device="cpu"))
    assert auto == ("bf16" if native_bf16("cpu") else "no")
    # and the loop trains under it (bf16 autocast on an AMX / AVX512-BF16 CPU)
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 1)
    settings = TrainSettings(epochs=6, batch_size=32, lr=0.05, patience=6, progress=False, mixed_precision="auto",
                             device="cpu")
    fit(model, _data(400, 0), _data(200, 1), _Task(), settings, tmp_path)
    with torch.no_grad():
        acc = _Task().evaluate(model, torch.utils.data.DataLoader(_data(300, 2), batch_size=100))["val_acc"]
    assert acc > 0.9


def test_inference_dtype_rejects_unknown_precision():
    import pytest

    from oncofm.errors import OncoFMError
    from oncofm.fusion.train import inference_dtype

    assert inference_dtype("fp32") == torch.float32
    assert inference_dtype("bf16") == torch.bfloat16
    with pytest.raises(OncoFMError, match="auto, fp32 or bf16"):
        inference_dtype("half")
