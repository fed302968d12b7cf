"""The one training loop that every OncoFM model uses (omics transformer, slide MIL, fusion LLM).

Built on Hugging Face Accelerate, so the same code runs on one CPU, several GPUs or several machines
(``accelerate launch`` / ``torchrun``: DDP). It provides seeding, early stopping on a validation metric,
checkpoints after every epoch with resume after an interruption, progress bars, per-epoch metrics in
``history.jsonl``, and restores the best epoch's weights at the end.

A model plugs in through a :class:`TrainTask`: ``loss(model, batch)`` for a training step and
``evaluate(model, loader)`` returning validation metrics (a dict that contains ``settings.monitor``).

Examples
--------
>>> result = fit(model, train_ds, val_ds, task, TrainSettings(epochs=20), out_dir)  # doctest: +SKIP
>>> result.best_epoch, result.best_metric  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

import torch
from pydantic import Field

from oncofm.config import StageSettings
from oncofm.errors import OncoFMError
from oncofm.io import write_json

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "trainer_state.json"
BEST_WEIGHTS = "best_model.pt"
HISTORY_FILE = "history.jsonl"


class TrainSettings(StageSettings):
    """Optimisation settings shared by every model (each model adds its own architecture settings)."""

    stage: ClassVar[str] = "train"

    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=1, description="global batch size: under DDP (accelerate launch / torchrun) "
                            "each of the N processes takes batch_size / N of every batch")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_fraction: float = Field(0.05, ge=0, lt=1, description="linear warm-up, then cosine decay")
    grad_clip: float | None = Field(1.0, gt=0)
    grad_accum: int = Field(1, ge=1)
    patience: int = Field(5, ge=1, description="epochs without improvement before stopping")
    monitor: str = Field("val_loss", description="metric returned by TrainTask.evaluate to select epochs")
    mode: Literal["min", "max"] = "min"
    seed: int = 0
    num_workers: int = Field(0, ge=0)
    mixed_precision: Literal["no", "bf16", "fp16", "auto"] = Field(
        "no", description="auto: bf16 autocast where the hardware runs it natively (a CUDA GPU with bf16, or a "
        "CPU with AMX / AVX512-BF16), else no")
    device: Literal["auto", "cpu"] = Field("auto", description="auto: GPU when present, else CPU")
    resume: bool = True
    progress: bool = True


class TrainTask(Protocol):
    """What a model provides to the loop."""

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """Scalar training loss of one batch."""
        ...

    def evaluate(self, model: torch.nn.Module, loader: torch.utils.data.DataLoader) -> dict[str, float]:
        """Validation metrics (must include ``settings.monitor``); called with the model in eval mode."""
        ...


@dataclass
class FitResult:
    best_epoch: int
    best_metric: float
    epochs_run: int
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False
    seconds: float = 0.0


def _better(a: float, b: float, mode: str) -> bool:
    if math.isnan(a):
        return False
    if math.isnan(b):
        return True
    return a < b if mode == "min" else a > b


def native_bf16(device: str = "auto") -> bool:
    """Whether bf16 matrix products run natively here: a CUDA GPU with bf16 (unless ``device`` is ``cpu``), else
    a CPU with AMX or AVX512-BF16 (Linux ``/proc/cpuinfo`` flags; elsewhere False)."""
    if device != "cpu" and torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(settings: TrainSettings) -> str:
    """``settings.mixed_precision`` with ``auto`` resolved (see :func:`native_bf16`)."""
    if settings.mixed_precision != "auto":
        return settings.mixed_precision
    return "bf16" if native_bf16(settings.device) else "no"


def make_accelerator(settings: TrainSettings):  # noqa: ANN201 - accelerate.Accelerator
    """The Accelerator for ``settings`` (device and mixed precision from one place)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DataLoaderConfiguration

    precision = resolve_precision(settings)
    if AcceleratorState._shared_state.get("_mixed_precision", precision) != precision:
        # one process may train several models with different precisions (the demo: omics in fp32, then the
        # fusion LLM in bf16); accelerate keeps one process-wide state and refuses a change, so drop its
        # per-run part (the distributed set-up, PartialState, is kept)
        AcceleratorState._reset_state(reset_partial_state=False)
    # split_batches: batch_size is the global batch, so N processes see exactly the batches one process
    # would (each takes a 1/N slice) and the learning-rate schedule and metrics do not depend on N.
    return Accelerator(cpu=settings.device == "cpu", mixed_precision=precision,
                       gradient_accumulation_steps=settings.grad_accum,
                       dataloader_config=DataLoaderConfiguration(split_batches=True))


def _lr_lambda(total_steps: int, warmup: int) -> Callable[[int], float]:
    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return fn


def fit(
    model: torch.nn.Module,
    train_data: torch.utils.data.Dataset,
    val_data: torch.utils.data.Dataset | None,
    task: TrainTask,
    settings: TrainSettings,
    out_dir: str | Path,
    *,
    collate_fn: Callable | None = None,
    train_sampler: torch.utils.data.Sampler | None = None,
    parameters: list[torch.nn.Parameter] | None = None,
    accelerator: Any = None,
) -> FitResult:
    """Train ``model`` with early stopping; checkpoint every epoch; resume when a checkpoint exists.

    Parameters
    ----------
    parameters
        The parameters to optimise (default: every parameter with ``requires_grad``).
    train_sampler
        Optional sampler for the training loader (e.g. class-balanced); shuffling otherwise.

    Returns
    -------
    FitResult
        The model is left holding the best epoch's weights (on the CPU-side unwrapped module).
    """
    from accelerate.utils import set_seed

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = out_dir / CHECKPOINT_DIR
    accelerator = accelerator or make_accelerator(settings)
    if settings.batch_size % accelerator.num_processes:
        raise OncoFMError(f"batch_size {settings.batch_size} is the global batch and must be divisible by the "
                          f"{accelerator.num_processes} training processes; set --batch-size to a multiple")
    set_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    train_loader = torch.utils.data.DataLoader(
        train_data, batch_size=settings.batch_size, shuffle=train_sampler is None, sampler=train_sampler,
        collate_fn=collate_fn, num_workers=settings.num_workers, generator=generator, drop_last=False)
    val_loader = None
    if val_data is not None:
        val_loader = torch.utils.data.DataLoader(val_data, batch_size=settings.batch_size, shuffle=False,
                                                 collate_fn=collate_fn, num_workers=settings.num_workers)
    params = parameters if parameters is not None else [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise OncoFMError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    steps_per_epoch = max(1, math.ceil(len(train_loader) / settings.grad_accum))
    total = steps_per_epoch * settings.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(total, int(settings.warmup_fraction * total)))
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)

    state = {"epoch": -1, "best_epoch": -1, "best_metric": float("nan"), "bad_epochs": 0, "history": []}
    if settings.resume and (ckpt / STATE_FILE).exists():
        state = json.loads((ckpt / STATE_FILE).read_text())
        state["best_metric"] = float("nan") if state["best_metric"] is None else state["best_metric"]
        _load_checkpoint(ckpt, accelerator.unwrap_model(model), optimizer, scheduler)
        log.info("resuming from %s after epoch %d", ckpt, state["epoch"])

    t0 = time.perf_counter()
    stopped_early = False
    unwrapped = accelerator.unwrap_model(model)
    for epoch in range(state["epoch"] + 1, settings.epochs):
        if state["bad_epochs"] >= settings.patience:
            stopped_early = True
            break
        generator.manual_seed(settings.seed + epoch)  # shuffling depends on (seed, epoch) only: exact resume
        show = settings.progress and accelerator.is_main_process
        train_loss = _train_epoch(model, train_loader, task, optimizer, scheduler, accelerator, params,
                                  settings, f"epoch {epoch + 1}/{settings.epochs}", show)
        record: dict[str, float] = {"epoch": epoch + 1, "train_loss": train_loss,
                                    "lr": float(scheduler.get_last_lr()[0])}
        if val_loader is not None:
            model.eval()
            with torch.no_grad():
                metrics = task.evaluate(unwrapped, _OnDevice(val_loader, accelerator.device))
                record.update({k: float(v) for k, v in metrics.items()})
        metric = record.get(settings.monitor, record["train_loss"] if settings.monitor == "train_loss" else None)
        if metric is None:
            raise OncoFMError(f"monitor metric '{settings.monitor}' is not among the validation metrics "
                              f"{sorted(record)}; set --monitor to one of them")
        improved = _better(float(metric), state["best_metric"], settings.mode)
        if improved:
            state.update(best_epoch=epoch + 1, best_metric=float(metric), bad_epochs=0)
            if accelerator.is_main_process:
                _atomic_torch_save(trainable_state_dict(unwrapped), out_dir / BEST_WEIGHTS)
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch
        state["history"].append(record)
        if accelerator.is_main_process:
            log.info("epoch %d: %s%s", epoch + 1,
                     ", ".join(f"{k}={v:.4f}" for k, v in record.items() if k != "epoch"),
                     "  *best*" if improved else "")
            _save_checkpoint(ckpt, state, unwrapped, optimizer, scheduler)
            with open(out_dir / HISTORY_FILE, "a") as fh:
                fh.write(json.dumps(record) + "\n")
        accelerator.wait_for_everyone()
    if state["bad_epochs"] >= settings.patience:
        stopped_early = True
    accelerator.wait_for_everyone()
    if (out_dir / BEST_WEIGHTS).exists():
        best = torch.load(out_dir / BEST_WEIGHTS, map_location="cpu", weights_only=True)  # copied onto the device
        unwrapped.load_state_dict(best, strict=_all_trainable(unwrapped))
    return FitResult(best_epoch=state["best_epoch"], best_metric=state["best_metric"],
                     epochs_run=state["epoch"] + 1, history=state["history"], stopped_early=stopped_early,
                     seconds=time.perf_counter() - t0)


def _train_epoch(model: Any, loader: Any, task: TrainTask, optimizer: Any, scheduler: Any, accelerator: Any,
                 params: list, settings: TrainSettings, description: str, show: bool) -> float:
    """One pass over the training data; returns the mean batch loss."""
    from oncofm.logging_utils import track

    model.train()
    total_loss, n_batches = torch.zeros((), device=accelerator.device), 0
    for batch in track(loader, description, enabled=show):
        with accelerator.accumulate(model):
            loss = task.loss(model, batch)
            if not torch.isfinite(loss):
                raise OncoFMError(f"training loss became {loss.item()} ({description}); lower the learning "
                                  "rate (--lr) or check the inputs for extreme values")
            accelerator.backward(loss)
            if settings.grad_clip and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(params, settings.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        total_loss += loss.detach().float()  # summed on the device: no host sync per step
        n_batches += 1
    if accelerator.num_processes > 1:  # every process saw 1/N of each batch: average over all of them
        sums = accelerator.reduce(torch.stack([total_loss, torch.tensor(float(n_batches), device=accelerator.device)]),
                                  "sum")
        return float(sums[0]) / max(1, int(sums[1]))
    return float(total_loss) / max(1, n_batches)


def _atomic_torch_save(obj: Any, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    torch.save(obj, tmp)
    tmp.replace(target)


class _OnDevice:
    """Iterate a loader with every tensor of each batch moved to ``device`` (validation on the GPU too)."""

    def __init__(self, loader: Any, device: Any) -> None:
        self.loader, self.device = loader, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):  # noqa: ANN204
        from accelerate.utils import send_to_device

        for batch in self.loader:
            yield send_to_device(batch, self.device)

    def __getattr__(self, name: str) -> Any:  # dataset, batch_size, ... of the wrapped loader
        return getattr(self.loader, name)


def _all_trainable(model: torch.nn.Module) -> bool:
    return all(p.requires_grad for p in model.parameters())


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state, or only its trainable parameters when part of it is frozen.

    A frozen LLM under LoRA is hundreds of MB that never change: checkpoints keep the adapters, the
    projector and buffers only.
    """
    state = model.state_dict()
    if _all_trainable(model):
        return state
    keep = {n for n, p in model.named_parameters() if p.requires_grad}
    keep |= {n for n, _ in model.named_buffers()}
    return {k: v for k, v in state.items() if k in keep}


def _rng_state() -> dict[str, Any]:
    import random

    import numpy as np

    out: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def _set_rng_state(rng: dict[str, Any]) -> None:
    import random

    import numpy as np

    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _save_checkpoint(ckpt: Path, state: dict, model: torch.nn.Module, optimizer: Any, scheduler: Any) -> None:
    """Write the training state to a temp folder, then swap it in (never a half-written checkpoint).

    Holds the trainable weights (see :func:`trainable_state_dict`), optimizer and scheduler state, the RNG
    states of the main process and ``trainer_state.json`` (epoch, best metric, history).
    """
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    torch.save({"model": trainable_state_dict(model), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": _rng_state()}, tmp / "state.pt")
    write_json(state, tmp / STATE_FILE)
    old = ckpt.with_name(ckpt.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if ckpt.exists():
        ckpt.rename(old)
    tmp.rename(ckpt)
    if old.exists():
        shutil.rmtree(old)


def _load_checkpoint(ckpt: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any) -> None:
    blob = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
    model.load_state_dict(blob["model"], strict=_all_trainable(model))
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    _set_rng_state(blob["rng"])


def clear_checkpoint(out_dir: str | Path) -> None:
    """Remove a finished run's checkpoint (keeps best weights and history)."""
    ckpt = Path(out_dir) / CHECKPOINT_DIR
    if ckpt.exists():
        shutil.rmtree(ckpt)
