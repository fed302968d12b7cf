"""The slide model: patch encoder (optional) + MIL aggregator + a linear head, trained from slide labels.

Two ways of feeding it, one model class:

- **features** (frozen encoder): patch features are computed once per slide (:func:`extract_features`,
  cached in HDF5) and :class:`FeatureBagDataset` serves bags of features (B, N, D); only the aggregator and
  head train — fast, for large cohorts.
- **end-to-end**: :class:`PatchBagDataset` samples ``k`` patches of a slide per step (B, k, 3, S, S); the
  encoder trains with the aggregator.

Both go through :func:`oncofm.training.fit` with :class:`SlideTask` (binary cross-entropy on the slide label;
validation loss and AUC).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from oncofm.errors import OncoFMError

log = logging.getLogger(__name__)

__all__ = ["FeatureBagDataset", "PatchBagDataset", "SlideClassifier", "SlideOutput", "SlideTask",
           "collate_bags", "extract_features", "feature_stats", "load_patch_features", "predict_bags"]


@dataclass
class SlideOutput:
    logit: torch.Tensor  # (B,)
    embedding: torch.Tensor  # (B, H) slide embedding before the head
    attention: torch.Tensor  # (B, N) sums to 1 over each slide's real patches
    patch_logits: torch.Tensor  # (B, N) the head applied to each projected patch (instance scores)


class SlideClassifier(nn.Module):
    """``encoder`` (optional; None when fed cached features) → ``aggregator`` → linear head.

    ``feature_dim``: standardise the patch features before the aggregator, ``(x - feature_mean) /
    feature_std`` with per-feature statistics of this width (non-trainable buffers, saved in the state dict;
    identity until :meth:`set_feature_stats`, e.g. with :func:`feature_stats` of the training patches). It
    applies to cached features and to the encoder's output alike, so every caller of the model gets it.
    """

    def __init__(self, aggregator: nn.Module, encoder: nn.Module | None = None,
                 feature_dim: int | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.aggregator = aggregator
        self.head = nn.Linear(aggregator.out_dim, 1)
        self.feature_mean: torch.Tensor | None
        self.feature_std: torch.Tensor | None
        self.register_buffer("feature_mean", None if feature_dim is None else torch.zeros(feature_dim))
        self.register_buffer("feature_std", None if feature_dim is None else torch.ones(feature_dim))

    def set_feature_stats(self, mean: np.ndarray | torch.Tensor, std: np.ndarray | torch.Tensor) -> None:
        """Set the standardisation statistics (D,) of a model built with ``feature_dim=D``."""
        if self.feature_mean is None or self.feature_std is None:
            raise OncoFMError("this slide model standardises no features (build it with feature_dim)")
        mean, std = (torch.as_tensor(np.asarray(v, dtype=np.float32)) for v in (mean, std))
        if mean.shape != self.feature_mean.shape or std.shape != self.feature_std.shape:
            raise OncoFMError(f"feature statistics of shape {tuple(mean.shape)}/{tuple(std.shape)} do not fit "
                              f"features of width {self.feature_mean.shape[0]}")
        if not bool((std > 0).all()):
            raise OncoFMError("feature standard deviations must be positive")
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std)

    def standardize(self, feats: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, D) features → standardised (unchanged without statistics); padded positions stay 0."""
        if self.feature_mean is None or self.feature_std is None:
            return feats
        z = (feats - self.feature_mean) / self.feature_std
        return z if mask is None else z.masked_fill(~mask.unsqueeze(-1), 0.0)

    def encode(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """(B, N, 3, S, S) patches → (B, N, D) features (only real patches go through the encoder)."""
        if self.encoder is None:
            raise OncoFMError("this slide model has no encoder; feed it cached features (B, N, D)")
        b, n = x.shape[:2]
        flat = x.flatten(0, 1)  # (B*N, 3, S, S)
        keep = mask.flatten() if mask is not None else torch.ones(b * n, dtype=torch.bool, device=x.device)
        feats = torch.zeros(b * n, self.encoder.dim, device=x.device, dtype=torch.float32)
        feats[keep] = self.encoder(flat[keep]).float()
        return feats.view(b, n, -1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> SlideOutput:
        feats = self.standardize(self.encode(x, mask) if x.ndim == 5 else x, mask)  # (B, N, D)
        embedding, attention = self.aggregator(feats, mask)
        logit = self.head(embedding).squeeze(-1)
        patch_logits = self.head(self.aggregator.project(feats)).squeeze(-1)  # (B, N)
        return SlideOutput(logit=logit, embedding=embedding, attention=attention, patch_logits=patch_logits)


# --------------------------------------------------------------------------------------------------------
# data
class FeatureBagDataset(torch.utils.data.Dataset):
    """Bags of cached features. ``bags[i]``: (N_i, D) array; ``sample``: draw this many patches per call
    (random subset, for training) instead of the whole bag; ``drop``: instance dropout — each call keeps a
    random ``1 - drop`` share of the (sampled) patches, at least one (training only)."""

    def __init__(self, bags: Sequence[np.ndarray], labels: Sequence[float], sample: int | None = None,
                 drop: float = 0.0) -> None:
        if len(bags) != len(labels):
            raise ValueError(f"{len(bags)=} differs from {len(labels)=}")
        if not 0.0 <= drop < 1.0:
            raise ValueError(f"instance dropout must be in [0, 1), got {drop}")
        self.bags = [torch.as_tensor(np.asarray(b, dtype=np.float32)) for b in bags]
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.float32))
        self.sample = sample
        self.drop = float(drop)

    def __len__(self) -> int:
        return len(self.bags)

    def __getitem__(self, i: int) -> dict[str, Any]:
        x = self.bags[i]
        if self.sample and len(x) > self.sample:
            x = x[torch.randperm(len(x))[: self.sample]]
        if self.drop > 0 and len(x) > 1:
            keep = max(1, int(round(len(x) * (1.0 - self.drop))))
            x = x[torch.randperm(len(x))[:keep]]
        return {"x": x, "y": self.labels[i], "index": i}


class PatchBagDataset(torch.utils.data.Dataset):
    """End-to-end bags: ``k`` random patches (k, 3, S, S) in [0, 1] of a tiled slide per call.

    ``tiles``: paths of ``tiles/<slide>.h5`` files (docs/CONTRACTS.md). The slide is opened lazily, once per
    worker process.
    """

    def __init__(self, tiles: Sequence[str | Path], labels: Sequence[float], k: int = 16,
                 slide_mpp: float | None = None) -> None:
        from oncofm.pathology.tiling import load_grid

        self.grids = [load_grid(p) for p in tiles]
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.float32))
        self.k = int(k)
        self.slide_mpp = slide_mpp
        self._open: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.grids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        grid = self.grids[i]
        if i not in self._open:
            self._open[i] = grid.open(self.slide_mpp)
        idx = torch.randperm(len(grid))[: self.k].sort().values.numpy()
        patches = np.stack([grid.read(self._open[i], int(j)) for j in idx])  # (k, S, S, 3) uint8
        x = torch.from_numpy(patches).permute(0, 3, 1, 2).float() / 255.0  # (k, 3, S, S)
        return {"x": x, "y": self.labels[i], "index": i}


def collate_bags(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Pad bags to the longest: ``x`` (B, N, ...), ``mask`` (B, N) bool, ``y`` (B,), ``index`` (B,)."""
    n = max(len(it["x"]) for it in items)
    first = items[0]["x"]
    x = torch.zeros((len(items), n, *first.shape[1:]), dtype=first.dtype)
    mask = torch.zeros((len(items), n), dtype=torch.bool)
    for b, it in enumerate(items):
        x[b, : len(it["x"])] = it["x"]
        mask[b, : len(it["x"])] = True
    return {"x": x, "mask": mask, "y": torch.stack([torch.as_tensor(it["y"]) for it in items]).float(),
            "index": torch.as_tensor([it["index"] for it in items])}


# --------------------------------------------------------------------------------------------------------
# the task for the shared training loop
class SlideTask:
    """Binary cross-entropy on the slide label; validation: ``val_loss`` and ``val_auc``.

    ``instance_weight`` > 0 adds an instance-level loss (mi-Net / CLAM-style pseudo-labels, valid under the
    MIL assumption): every patch of a negative slide is a negative instance; the ``instance_k`` highest-scoring
    patches of a positive slide are pseudo-labelled positive. It trains the per-patch score
    (``patch_logits``) directly, which the slide logit of both aggregators is a weighted mean of.
    """

    def __init__(self, pos_weight: float | None = None, instance_weight: float = 0.0, instance_k: int = 2) -> None:
        self.pos_weight = pos_weight
        self.instance_weight = float(instance_weight)
        self.instance_k = int(instance_k)

    def _instance_loss(self, patch_logits: torch.Tensor, mask: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``patch_logits``, ``mask``: (B, N); ``y``: (B,)."""
        bce = nn.functional.binary_cross_entropy_with_logits
        losses = []
        for b in range(len(y)):
            s = patch_logits[b][mask[b]]  # (n_b,)
            if float(y[b]) > 0.5:
                top = s.topk(min(self.instance_k, len(s))).values
                losses.append(bce(top, torch.ones_like(top)))
            else:
                losses.append(bce(s, torch.zeros_like(s)))
        return torch.stack(losses).mean()

    def _loss(self, logit: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        pw = None if self.pos_weight is None else torch.tensor(self.pos_weight, device=logit.device)
        return nn.functional.binary_cross_entropy_with_logits(logit, y.to(logit.device), pos_weight=pw)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = model(batch["x"], batch["mask"])
        loss = self._loss(out.logit, batch["y"])
        if self.instance_weight > 0:
            loss = loss + self.instance_weight * self._instance_loss(out.patch_logits, batch["mask"], batch["y"])
        return loss

    def evaluate(self, model: nn.Module, loader: torch.utils.data.DataLoader) -> dict[str, float]:
        from oncofm.survival.metrics import auc_score

        device = next(model.parameters()).device
        logits, ys = [], []
        for batch in loader:
            out = model(batch["x"].to(device), batch["mask"].to(device))
            logits.append(out.logit.float().cpu())
            ys.append(batch["y"].float())
        logit, y = torch.cat(logits), torch.cat(ys)
        return {"val_loss": float(self._loss(logit, y)), "val_auc": auc_score(y.numpy(), logit.numpy())}


@torch.no_grad()
def predict_bags(model: SlideClassifier, dataset: torch.utils.data.Dataset, batch_size: int = 8
                 ) -> list[dict[str, np.ndarray | float]]:
    """Per slide: ``prob``, ``logit``, ``embedding`` (H,), ``attention`` (N,), ``patch_logits`` (N,)."""
    model.eval()
    device = next(model.parameters()).device
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_bags)
    results: list[dict[str, np.ndarray | float]] = []
    for batch in loader:
        out = model(batch["x"].to(device), batch["mask"].to(device))
        for b in range(len(batch["y"])):
            n = int(batch["mask"][b].sum())
            results.append({"logit": float(out.logit[b]), "prob": float(torch.sigmoid(out.logit[b])),
                            "embedding": out.embedding[b].cpu().numpy(),
                            "attention": out.attention[b, :n].cpu().numpy(),
                            "patch_logits": out.patch_logits[b, :n].cpu().numpy()})
    return results


@dataclass
class SlideResult:
    """The slide model's output for one slide."""

    prob: float
    logit: float
    embedding: np.ndarray  # (d,)
    attention: np.ndarray  # (N,) sums to 1, aligned with the tiles' coords
    version: str


def predict_slides(model: SlideClassifier, bags: Sequence[np.ndarray], version: str = "unsaved") -> list[SlideResult]:
    """The aggregator and head over every patch of each bag of features ((N_i, D) arrays): the one function
    behind the training stage's exports and a new slide's prediction (:class:`oncofm.pathology.predict.SlidePredictor`)."""
    encoder = model.encoder
    model.encoder = None  # fed features, not pixels
    try:
        outs = predict_bags(model, FeatureBagDataset(list(bags), [0.0] * len(bags)))
    finally:
        model.encoder = encoder
    results = []
    for out in outs:
        attention = np.asarray(out["attention"], dtype=np.float64).ravel()
        results.append(SlideResult(prob=float(out["prob"]), logit=float(out["logit"]),
                                   embedding=np.asarray(out["embedding"], dtype=np.float32).ravel(),
                                   attention=attention / attention.sum(), version=version))
    return results


# --------------------------------------------------------------------------------------------------------
# frozen-encoder feature caching
def extract_features(encoder: nn.Module, tiles_h5: str | Path, out_h5: str | Path, *, batch_size: int = 64,
                     slide_mpp: float | None = None, redo: bool = False, encoder_name: str = "") -> Path:
    """Encode every patch of a tiled slide once and cache ``features`` (N, D) float16 + ``coords`` in HDF5.

    Skips the slide when ``out_h5`` exists for the same encoder and patch count (unless ``redo``).
    """
    import h5py

    from oncofm.io import atomic_path
    from oncofm.pathology.tiling import load_grid

    out_h5 = Path(out_h5)
    grid = load_grid(tiles_h5)
    if out_h5.exists() and not redo:
        with h5py.File(out_h5, "r") as f:
            if f.attrs.get("encoder") == encoder_name and len(f["features"]) == len(grid):
                return out_h5
    encoder.eval()
    device = next(encoder.parameters()).device
    feats = np.zeros((len(grid), encoder.dim), np.float16)
    with grid.open(slide_mpp) as slide, torch.no_grad():
        for start in range(0, len(grid), batch_size):
            idx = range(start, min(start + batch_size, len(grid)))
            patches = np.stack([grid.read(slide, i) for i in idx])  # (b, S, S, 3) uint8
            x = torch.from_numpy(patches).permute(0, 3, 1, 2).float().div_(255.0).to(device)
            feats[start:start + len(idx)] = encoder(x).float().cpu().numpy()
    with atomic_path(out_h5, suffix=".h5.tmp") as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=feats)
        f.create_dataset("coords", data=grid.coords)
        f.attrs["encoder"] = encoder_name
        f.attrs["tiles"] = str(Path(tiles_h5).resolve())
        f.attrs["patch_level0_size"] = int(grid.attrs["level0_size"])
    return out_h5


def feature_stats(bags: Sequence[np.ndarray], eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and standard deviation (+ ``eps``) over every patch of ``bags`` ((N_i, D) arrays,
    e.g. the training slides'), float32 (D,) each — the statistics :meth:`SlideClassifier.set_feature_stats`
    takes. Accumulated per bag in float64 (Chan et al.'s pairwise update), so no stack of all patches is built.
    """
    n, mean, m2 = 0, None, None
    for bag in bags:
        x = np.asarray(bag, dtype=np.float64)
        if x.ndim != 2 or not len(x):
            continue
        n_b, mean_b = len(x), x.mean(axis=0)
        m2_b = ((x - mean_b) ** 2).sum(axis=0)
        if mean is None:
            n, mean, m2 = n_b, mean_b, m2_b
            continue
        delta = mean_b - mean
        total = n + n_b
        mean = mean + delta * (n_b / total)
        m2 = m2 + m2_b + delta ** 2 * (n * n_b / total)
        n = total
    if mean is None:
        raise OncoFMError("no patch features to compute standardisation statistics from")
    return mean.astype(np.float32), (np.sqrt(m2 / n) + eps).astype(np.float32)


def load_patch_features(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, D) float32, coords (N, 2) int64) of a cached feature file."""
    import h5py

    with h5py.File(path, "r") as f:
        return f["features"][:].astype(np.float32), f["coords"][:]
