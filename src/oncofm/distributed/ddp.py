"""Data-parallel training (DDP) with the existing launchers: ``torchrun`` and ``accelerate launch``.

OncoFM's training loop (:func:`oncofm.training.fit`) runs on Hugging Face Accelerate, so any training
command runs unchanged under a launcher: each process trains a replica on its slice of every batch and DDP
averages the gradients (NCCL on GPUs, gloo on CPUs). ``TrainSettings.batch_size`` is the *global* batch
(split across processes), so one process and N processes take the same optimisation steps.

This module builds launcher command lines (:func:`launch_command`, :func:`launch`) and holds a small
real-data training check (:func:`train_probe`, ``python -m oncofm.distributed.ddp``) that a user runs on
a new cluster to see that 1 and N processes agree before starting a long job::

    torchrun --nproc_per_node 8 -m oncofm.distributed.ddp --data probe.npz --out runs/ddp-check
    accelerate launch --num_processes 8 -m oncofm train omics --run runs/tcga
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from oncofm.errors import OncoFMError

log = logging.getLogger(__name__)

Launcher = Literal["torchrun", "accelerate"]


def launch_command(args: Sequence[str], num_processes: int, launcher: Launcher = "torchrun",
                   cpu: bool = True) -> list[str]:
    """The command line that runs ``python -m <args>`` in ``num_processes`` DDP processes on this machine.

    ``args`` starts with a module name (``["oncofm", "train", "omics", ...]``) or a ``.py`` script. Multi-node runs add the
    launcher's own ``--nnodes/--node_rank/--rdzv_endpoint`` (torchrun) or ``--num_machines/
    --machine_rank/--main_process_ip`` (accelerate) on every node.
    """
    if num_processes < 1:
        raise OncoFMError(f"num_processes must be at least 1, got {num_processes}")
    module, *rest = args
    target = [module, *rest] if module.endswith(".py") else ["-m", module, *rest]  # a script or a module
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={num_processes}",
                *target]
    if launcher == "accelerate":
        # accelerate's --cpu flag means ONE process; --multi_gpu runs torchrun underneath, and without GPUs
        # (or with TrainSettings.device="cpu") every process falls back to CPU + gloo (MULTI_CPU).
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        cmd += ["--multi_gpu"] if num_processes > 1 else (["--cpu"] if cpu else [])
        return [*cmd, *target]
    raise OncoFMError(f"unknown launcher '{launcher}'; choose torchrun or accelerate")


def launch(args: Sequence[str], num_processes: int, *, launcher: Launcher = "torchrun",
           threads_per_process: int = 1, timeout: float | None = None, env: dict[str, str] | None = None
           ) -> subprocess.CompletedProcess:
    """Run ``python -m <args>`` under ``launcher`` with ``num_processes`` processes; raise on failure.

    ``threads_per_process`` sets ``OMP_NUM_THREADS`` so N CPU processes do not oversubscribe the cores.
    """
    full_env = {**os.environ, **(env or {}), "OMP_NUM_THREADS": str(threads_per_process),
                "MKL_NUM_THREADS": str(threads_per_process)}
    cmd = launch_command(args, num_processes, launcher)
    log.info("launching: %s", " ".join(cmd))
    proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise OncoFMError(f"{launcher} with {num_processes} processes failed (exit {proc.returncode}):\n"
                          f"{proc.stderr[-3000:]}")
    return proc


def all_gather_with_grad(x: Any) -> Any:
    """Concatenate ``x`` (B_local, ...) from every DDP process along dim 0, keeping the autograd graph.

    For losses that are not a mean of per-item terms — the Cox partial likelihood (risk sets span the batch),
    a mean over the labelled items of a batch, contrastive losses — each process must see the *global* batch.
    Compute the loss on the gathered outputs on every process: the gather's backward sums the gradient
    that every process sends to this process's items, and DDP's gradient averaging divides by N again, so
    the update equals the one-process update on the same global batch. Without a process group (one
    process) this returns ``x`` unchanged. Items are gathered in process order, which with
    ``split_batches`` is the order of the global batch.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x.contiguous())  # (B_global, ...)


def _gather_function() -> Any:
    """The autograd function behind :func:`all_gather_with_grad` (built lazily: torch is imported late).

    Forward: ``dist.all_gather`` of every process's items (sizes may differ; they are exchanged first).
    Backward: the gradient of the whole gathered batch is summed over processes with ``all_reduce`` and each
    process keeps its own rows. Both collectives are ones gloo supports, and neither goes through the
    deprecated ``torch.distributed.nn.functional`` path, whose backward thread aborted a CPU process at exit.
    """
    import torch
    import torch.distributed as dist

    class GatherWithGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Any) -> Any:
            world = dist.get_world_size()
            size = torch.tensor([x.shape[0]], dtype=torch.long)
            sizes = [torch.zeros_like(size) for _ in range(world)]
            dist.all_gather(sizes, size)
            counts = [int(s) for s in sizes]
            longest = max(counts)
            padded = torch.zeros((longest, *x.shape[1:]), dtype=x.dtype)
            padded[: x.shape[0]] = x
            parts = [torch.empty_like(padded) for _ in range(world)]
            dist.all_gather(parts, padded)
            rank = dist.get_rank()
            ctx.start, ctx.stop = sum(counts[:rank]), sum(counts[: rank + 1])
            return torch.cat([p[:n] for p, n in zip(parts, counts, strict=True)], dim=0)

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            grad = grad.contiguous().clone()
            dist.all_reduce(grad)  # every process's gradient for every item, summed
            return grad[ctx.start: ctx.stop]

    return GatherWithGrad


class _LazyGather:
    _fn: Any = None

    def apply(self, x: Any) -> Any:
        if _LazyGather._fn is None:
            _LazyGather._fn = _gather_function()
        return _LazyGather._fn.apply(x)


_GatherWithGrad = _LazyGather()


# ----------------------------------------------------------------------------------------------------------
# a small real-data training run through the shared loop, used by the DDP test and bench/scale.py
class _BinaryTask:
    """Binary cross-entropy on (x, y) batches; validation loss and AUC."""

    def loss(self, model: Any, batch: Any) -> Any:
        import torch

        x, y = batch
        return torch.nn.functional.binary_cross_entropy_with_logits(model(x).squeeze(-1), y)

    def evaluate(self, model: Any, loader: Any) -> dict[str, float]:
        import torch
        from sklearn.metrics import roc_auc_score

        logits, ys = [], []
        for x, y in loader:
            logits.append(model(x).squeeze(-1))
            ys.append(y)
        z, y = torch.cat(logits), torch.cat(ys)  # (n_val,), (n_val,)
        loss = float(torch.nn.functional.binary_cross_entropy_with_logits(z, y))
        return {"val_loss": loss, "val_auc": float(roc_auc_score(y.numpy(), z.numpy()))}


def train_probe(data: str | Path, out: str | Path, *, epochs: int = 4, batch_size: int = 64, lr: float = 1e-3,
                hidden: int = 64, seed: int = 0) -> dict[str, Any]:
    """Train a 2-layer MLP on ``data`` (npz: x_train, y_train, x_val, y_val) with :func:`oncofm.training.fit`.

    Every process builds the same initial weights (seeded), trains under whatever launcher started it, and
    the main process writes ``out/metrics.json`` (per-epoch history, best epoch, final weights' checksum).
    """
    import torch

    from oncofm.io import write_json
    from oncofm.training import TrainSettings, fit, make_accelerator

    arrays = np.load(data)
    x_tr, y_tr = torch.from_numpy(arrays["x_train"]), torch.from_numpy(arrays["y_train"])  # (n, g), (n,)
    x_va, y_va = torch.from_numpy(arrays["x_val"]), torch.from_numpy(arrays["y_val"])
    settings = TrainSettings(epochs=epochs, batch_size=batch_size, lr=lr, patience=epochs, seed=seed,
                             progress=False, resume=False, device="cpu")
    accelerator = make_accelerator(settings)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(x_tr.shape[1], hidden), torch.nn.GELU(),
                                torch.nn.Linear(hidden, 1))
    result = fit(model, torch.utils.data.TensorDataset(x_tr, y_tr), torch.utils.data.TensorDataset(x_va, y_va),
                 _BinaryTask(), settings, out, accelerator=accelerator)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    metrics = {"num_processes": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type),
               "best_epoch": result.best_epoch, "best_val_loss": result.best_metric, "history": result.history,
               "weights_l2": float(flat.norm()), "weights_sum": float(flat.sum()), "seconds": result.seconds,
               "samples_per_s": len(x_tr) * result.epochs_run / max(result.seconds, 1e-9),
               "n_train": len(x_tr), "batch_size": batch_size}
    if accelerator.is_main_process:
        write_json(metrics, Path(out) / "metrics.json")
    accelerator.wait_for_everyone()
    return metrics


def write_probe_data(run: str | Path, target: str | Path, max_genes: int | None = None) -> Path:
    """Real probe data from an imported, split cohort: normalised expression → 5-year label.

    Writes ``target`` (npz: x_train, y_train, x_val, y_val, float32); patients without a known 5-year status
    are left out (docs/ARCHITECTURE.md). ``max_genes`` keeps the first genes (smaller, faster checks).
    """
    import pandas as pd

    from oncofm.cohort.normalize import load_normalized_expression
    from oncofm.cohort.schema import five_year_labels
    from oncofm.io import atomic_path
    from oncofm.paths import RunLayout

    layout = RunLayout(run)
    patients = pd.read_parquet(layout.require(layout.patients, "run `oncofm cohort import` first"))
    splits = pd.read_parquet(layout.require(layout.splits, "run `oncofm cohort split` first"))
    expr = load_normalized_expression(run).fillna(0.0)
    if max_genes:
        expr = expr.iloc[:, :max_genes]
    labels = five_year_labels(patients)
    split = splits.set_index("patient_id")["split"]
    arrays = {}
    for name in ("train", "val"):
        ids = [p for p in split.index[split == name] if p in expr.index and not np.isnan(labels.get(p, np.nan))]
        arrays[f"x_{name}"] = expr.loc[ids].to_numpy(np.float32)  # (n, g)
        arrays[f"y_{name}"] = labels.loc[ids].to_numpy(np.float32)  # (n,)
    with atomic_path(target, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)
    return Path(target)


def fit_omics(run: str | Path, out: str | Path, *, epochs: int = 1, batch_size: int = 128, d_model: int = 32,
              n_layers: int = 2, cox_weight: float = 0.5, seed: int = 0) -> dict[str, Any]:
    """The training loop alone on the omics model of ``run`` (no export): throughput under any launcher.

    Uses the omics stage's own pieces (table, clinical encoder, model factory, task), so it measures what
    ``train_omics`` spends in :func:`oncofm.training.fit`. The main process writes ``out/throughput.json``.
    """
    import torch

    from oncofm.io import write_json
    from oncofm.omics.data import ClinicalEncoder, OmicsDataset, load_omics_table
    from oncofm.omics.model import create_model
    from oncofm.omics.train import OmicsTask
    from oncofm.training import TrainSettings, fit, make_accelerator

    table = load_omics_table(run)
    train, val = table.where_split("train"), table.where_split("val")
    encoder = ClinicalEncoder.fit(train)
    settings = TrainSettings(epochs=epochs, batch_size=batch_size, patience=epochs, monitor="val_score",
                             mode="max", seed=seed, progress=False, resume=False, device="cpu")
    accelerator = make_accelerator(settings)
    torch.manual_seed(seed)
    model = create_model("ft_transformer", n_genes=len(table.genes), n_cancer_types=len(encoder.cancer_types),
                         d_model=d_model, n_layers=n_layers, n_heads=4)
    result = fit(model, OmicsDataset(train, encoder), OmicsDataset(val, encoder), OmicsTask(cox_weight), settings,
                 out, accelerator=accelerator)
    stats = {"num_processes": accelerator.num_processes, "threads_per_process": torch.get_num_threads(),
             "n_train": len(train), "n_val": len(val), "n_genes": len(table.genes), "epochs": result.epochs_run,
             "fit_seconds": result.seconds, "samples_per_s": len(train) * result.epochs_run / result.seconds,
             "history": result.history}
    if accelerator.is_main_process:
        write_json(stats, Path(out) / "throughput.json")
    accelerator.wait_for_everyone()
    return stats


def train_stage(stage: str, settings_file: str | Path) -> None:
    """Run a training stage's library function from a settings YAML (so a launcher can start it)."""
    if stage != "omics":
        raise OncoFMError(f"unknown training stage '{stage}'; this entry point knows: omics")
    from oncofm.omics.train import OmicsTrainSettings, train_omics

    train_omics(OmicsTrainSettings.from_yaml(settings_file))


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point for launchers: ``python -m oncofm.distributed.ddp probe|omics ...``."""
    parser = argparse.ArgumentParser(prog="python -m oncofm.distributed.ddp",
                                     description="DDP checks with the shared training loop")
    sub = parser.add_subparsers(dest="command", required=True)
    probe = sub.add_parser("probe", help="train a small MLP on a probe npz (write_probe_data)")
    probe.add_argument("--data", required=True, help="npz with x_train, y_train, x_val, y_val")
    probe.add_argument("--out", required=True)
    probe.add_argument("--epochs", type=int, default=4)
    probe.add_argument("--batch-size", type=int, default=64, help="global batch size")
    probe.add_argument("--lr", type=float, default=1e-3)
    probe.add_argument("--hidden", type=int, default=64)
    probe.add_argument("--seed", type=int, default=0)
    stage = sub.add_parser("omics", help="train the omics model (train_omics) from a settings YAML")
    stage.add_argument("--settings", required=True, help="OmicsTrainSettings YAML (settings.save(...))")
    fo = sub.add_parser("omics-fit", help="the training loop alone on the omics model (throughput)")
    fo.add_argument("--run-dir", required=True, help="run with cohort, splits and features")
    fo.add_argument("--out", required=True)
    fo.add_argument("--epochs", type=int, default=1)
    fo.add_argument("--batch-size", type=int, default=128, help="global batch size")
    fo.add_argument("--d-model", type=int, default=32)
    fo.add_argument("--n-layers", type=int, default=2)
    a = parser.parse_args(argv)
    if a.command == "omics-fit":
        fit_omics(a.run_dir, a.out, epochs=a.epochs, batch_size=a.batch_size, d_model=a.d_model, n_layers=a.n_layers)
    elif a.command == "probe":
        train_probe(a.data, a.out, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, hidden=a.hidden,
                    seed=a.seed)
    else:
        train_stage(a.command, a.settings)


if __name__ == "__main__":
    main()
