"""Design ``unet``: a small point-detection U-Net with a cell heatmap and per-pixel class logits.

The network (3 poolings, ``base_channels`` doubling per level; about 0.47 M parameters at 16) maps an RGB
image at 0.5 µm/px to 4 maps of the same size: a cell-centre heatmap (sigmoid; target: a Gaussian of
``sigma`` px at every dot, trained with CenterNet's penalty-reduced focal loss) and 3 class logits
(softmax; trained with cross-entropy on the pixels within ``class_radius_px`` of a dot, which take that
dot's class). Cells are the heatmap's local maxima (``min_distance`` px apart); a cell's class is the
most probable class averaged over its 3 x 3 neighbourhood, its score the heatmap peak times that
probability. Training uses random crops with flips, 90° rotations and stain (optical density) jitter, in
the one training loop (:func:`oncofm.training.fit`), selecting the epoch by validation macro F1 at
that epoch's best per-class score thresholds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from oncofm.errors import OncoFMError
from oncofm.pathology.cells.data import CLASSES, AnnotatedImage
from oncofm.pathology.cells.designs import Detections, register_design

WEIGHTS = "unet.safetensors"
ENSEMBLE_WEIGHTS = "unet_ensemble.safetensors"


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class PointUNet(nn.Module):
    """U-Net: (b, 3, h, w) in [0, 1] -> (b, 1 + n_classes, h, w) logits; h and w multiples of 8."""

    def __init__(self, base_channels: int = 16, n_classes: int = len(CLASSES)) -> None:
        super().__init__()
        c = [base_channels * 2 ** i for i in range(4)]
        self.enc = nn.ModuleList([_block(3, c[0]), _block(c[0], c[1]), _block(c[1], c[2])])
        self.mid = _block(c[2], c[3])
        self.up = nn.ModuleList([nn.ConvTranspose2d(c[i + 1], c[i], 2, stride=2) for i in (2, 1, 0)])
        self.dec = nn.ModuleList([_block(2 * c[i], c[i]) for i in (2, 1, 0)])
        self.head = nn.Conv2d(c[0], 1 + n_classes, 1)
        nn.init.constant_(self.head.bias[:1], -2.19)  # prior 0.1 on the heatmap (CenterNet)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - 0.5) / 0.25
        skips = []
        for enc in self.enc:
            x = enc(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.mid(x)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips), strict=True):
            x = dec(torch.cat([up(x), skip], dim=1))
        return self.head(x)


def targets(shape: tuple[int, int], points: np.ndarray, labels: np.ndarray, sigma: float, class_radius: float
            ) -> tuple[np.ndarray, np.ndarray]:
    """Heatmap target (h, w) float32 (1 at each dot's pixel, a Gaussian around it) and class map (h, w) int64
    (the nearest dot's class within ``class_radius``, else -1)."""
    from scipy import ndimage as ndi

    h, w = shape
    heat = np.zeros((h, w), np.float32)
    cls = np.full((h, w), -1, np.int64)
    if len(points) == 0:
        return heat, cls
    xs = np.clip(np.round(points[:, 0]).astype(int), 0, w - 1)
    ys = np.clip(np.round(points[:, 1]).astype(int), 0, h - 1)
    seeds = np.zeros((h, w), bool)
    seeds[ys, xs] = True
    dist, (iy, ix) = ndi.distance_transform_edt(~seeds, return_indices=True)
    seed_label = np.full((h, w), -1, np.int64)
    seed_label[ys, xs] = labels
    near = dist <= class_radius
    cls[near] = seed_label[iy[near], ix[near]]
    r = int(np.ceil(3 * sigma))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    for x, y in zip(xs, ys, strict=True):
        y0, y1, x0, x1 = max(0, y - r), min(h, y + r + 1), max(0, x - r), min(w, x + r + 1)
        dy, dx = yy[y0 - y + r:y1 - y + r, x0 - x + r:x1 - x + r], xx[y0 - y + r:y1 - y + r, x0 - x + r:x1 - x + r]
        np.maximum(heat[y0:y1, x0:x1], np.exp(-(dx ** 2 + dy ** 2) / (2 * sigma ** 2)), out=heat[y0:y1, x0:x1])
    heat[ys, xs] = 1.0
    return heat, cls


def focal_loss(logit: torch.Tensor, target: torch.Tensor, alpha: float = 2.0, beta: float = 4.0) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss, normalised by the number of centre pixels (target == 1)."""
    p = torch.sigmoid(logit).clamp(1e-4, 1 - 1e-4)
    pos = target.eq(1).float()
    pos_loss = -torch.log(p) * (1 - p) ** alpha * pos
    neg_loss = -torch.log(1 - p) * p ** alpha * (1 - target) ** beta * (1 - pos)
    return (pos_loss.sum() + neg_loss.sum()) / pos.sum().clamp(min=1.0)


class _Crops(torch.utils.data.Dataset):
    """``length`` random augmented crops of the training images (drawn anew each epoch)."""

    def __init__(self, images: list[np.ndarray], heats: list[np.ndarray], classes: list[np.ndarray], crop: int,
                 length: int, stain_jitter: float, hed_jitter: float = 0.0, focus_fraction: float = 0.0,
                 dots: list[tuple[np.ndarray, np.ndarray]] | None = None) -> None:
        self.images, self.heats, self.classes = images, heats, classes
        self.crop, self.length, self.jitter = crop, length, stain_jitter
        self.hed_jitter, self.focus = hed_jitter, focus_fraction
        self.weights = np.array([im.shape[0] * im.shape[1] for im in images], np.float64)
        self.weights /= self.weights.sum()
        # class-balanced sampling: per class, every (image, x, y) dot of that class
        self.by_class: list[np.ndarray] = []
        if dots is not None:
            rows = [np.column_stack([np.full(len(lab), i), pts[:, 0], pts[:, 1], lab])
                    for i, (pts, lab) in enumerate(dots) if len(lab)]
            table = np.concatenate(rows) if rows else np.zeros((0, 4))
            self.by_class = [table[table[:, 3] == c, :3] for c in range(len(CLASSES))]
            self.by_class = [t for t in self.by_class if len(t)]
        if hed_jitter:
            from oncofm.pathology.stain import REFERENCE_STAINS

            h, e = REFERENCE_STAINS[:, 0], REFERENCE_STAINS[:, 1]
            r = np.cross(h, e)
            m = np.stack([h, e, r / np.linalg.norm(r)])  # rows: unit OD vectors of H, E, residual
            self.hed, self.hed_inv = m, np.linalg.inv(m)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng(int(torch.randint(0, 2 ** 31 - 1, (1,))))
        if self.by_class and rng.random() < self.focus:  # a crop around a dot of a uniformly drawn class
            table = self.by_class[int(rng.integers(len(self.by_class)))]
            i, cx, cy = table[int(rng.integers(len(table)))]
            i = int(i)
            h, w = self.heats[i].shape
            off = rng.integers(-self.crop // 4, self.crop // 4 + 1, 2)
            x0 = int(np.clip(round(cx) - self.crop // 2 + off[0], 0, w - self.crop))
            y0 = int(np.clip(round(cy) - self.crop // 2 + off[1], 0, h - self.crop))
        else:
            i = int(rng.choice(len(self.images), p=self.weights))
            h, w = self.heats[i].shape
            y0, x0 = rng.integers(0, h - self.crop + 1), rng.integers(0, w - self.crop + 1)
        im, heat, cls = self.images[i], self.heats[i], self.classes[i]
        sl = (slice(y0, y0 + self.crop), slice(x0, x0 + self.crop))
        x, t, c = im[sl].astype(np.float32) / 255.0, heat[sl], cls[sl]
        if self.jitter:  # optical density scaled and shifted per channel: stain and scanner variation
            od = -np.log(np.clip(x, 1 / 255, 1))
            od = od * rng.uniform(1 - self.jitter, 1 + self.jitter, 3) + rng.uniform(-self.jitter, self.jitter, 3) * 0.1
            x = np.exp(-np.clip(od, 0, None)).astype(np.float32)
        if self.hed_jitter:  # stain concentrations scaled and shifted: H, E and residual separately
            s = self.hed_jitter
            od = -np.log(np.clip(x, 1 / 255, 1)).reshape(-1, 3)
            conc = od @ self.hed_inv
            conc = conc * rng.uniform(1 - s, 1 + s, 3) + rng.uniform(-s, s, 3) * 0.1
            x = np.exp(-np.clip(conc @ self.hed, 0, None)).reshape(x.shape).astype(np.float32)
        k = int(rng.integers(4))
        x, t, c = np.rot90(x, k), np.rot90(t, k), np.rot90(c, k)
        if rng.random() < 0.5:
            x, t, c = x[:, ::-1], t[:, ::-1], c[:, ::-1]
        return (torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))),
                torch.from_numpy(np.ascontiguousarray(t))[None], torch.from_numpy(np.ascontiguousarray(c)))


class _Task:
    def __init__(self, val: list[AnnotatedImage], radius_px: float, class_weight: torch.Tensor,
                 min_distance: int, ema_decay: float = 0.0, tta: int = 1) -> None:
        self.val, self.radius, self.class_weight, self.min_distance = val, radius_px, class_weight, min_distance
        self.ema_decay, self.tta = ema_decay, tta
        self.ema: nn.Module | None = None
        self.ema_steps = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_metric = -np.inf

    @torch.no_grad()
    def _update_ema(self, model: nn.Module) -> None:
        """EMA of the weights (buffers copied), updated from the weights the last optimiser step left."""
        import copy

        if self.ema is None:
            self.ema = copy.deepcopy(model).eval()
            return
        self.ema_steps += 1
        d = min(self.ema_decay, (1 + self.ema_steps) / (10 + self.ema_steps))
        for e, p in zip(self.ema.parameters(), model.parameters(), strict=True):
            e.mul_(d).add_(p.detach(), alpha=1 - d)
        for e, b in zip(self.ema.buffers(), model.buffers(), strict=True):
            e.copy_(b)

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        if self.ema_decay:
            self._update_ema(model)
        x, heat, cls = batch
        out = model(x)
        ce = F.cross_entropy(out[:, 1:], cls, weight=self.class_weight.to(out.device), ignore_index=-1)
        return focal_loss(out[:, :1], heat) + ce

    def evaluate(self, model: nn.Module, loader: Any) -> dict[str, float]:
        from oncofm.pathology.cells.metrics import detection_scores, tune_thresholds

        gts = [(a.points, a.labels) for a in self.val]
        if self.ema_decay:
            self._update_ema(model)
            model = self.ema  # type: ignore[assignment]
        raw = _predict(model, [a.image for a in self.val], 0.1, self.min_distance, tta=self.tta)
        # the epoch is chosen at its best per-class thresholds (a coarse grid), as the final model is tuned
        thresholds, _ = tune_thresholds(raw, gts, self.radius, grid=np.arange(0.1, 0.81, 0.05))
        dets = [d.select(d.scores >= thresholds[d.labels]) for d in raw]
        s = detection_scores([(d.points, d.labels) for d in dets], gts, self.radius)
        if self.ema_decay and s["macro_f1"] > self.best_metric:  # the loop keeps the raw weights' best epoch
            self.best_metric = float(s["macro_f1"])
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return {"val_macro_f1": float(s["macro_f1"]), "val_detection_f1": float(s["all"]["f1"])}


#: Test-time transforms, in the order ``tta`` takes them, as (transpose, flipped dims): identity, 180°
#: rotation, horizontal flip, vertical flip, then the same four of the transposed input. The output is
#: mapped back by undoing the flip, then the transpose.
_TTA = [(False, ()), (False, (2, 3)), (False, (3,)), (False, (2,)),
        (True, ()), (True, (2, 3)), (True, (3,)), (True, (2,))]


def _averaged_maps(model: nn.Module | list[nn.Module], x: torch.Tensor, tta: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Heatmap (b, h, w) and class probabilities (b, c, h, w), averaged over ``tta`` transforms and over the
    networks when ``model`` is a list of them (an ensemble)."""
    models = model if isinstance(model, list) else [model]
    heat = probs = None
    for net in models:
        for transpose, dims in _TTA[:tta]:
            xt = x.transpose(2, 3) if transpose else x
            xt = xt.flip(dims) if dims else xt
            logits = net(xt)
            logits = logits.flip(dims) if dims else logits
            logits = logits.transpose(2, 3) if transpose else logits
            h, p = torch.sigmoid(logits[:, 0]), torch.softmax(logits[:, 1:], dim=1)
            heat, probs = (h, p) if heat is None else (heat + h, probs + p)
    n = tta * len(models)
    return heat / n, probs / n  # type: ignore[operator]


@torch.no_grad()
def _predict(model: nn.Module | list[nn.Module], images: list[np.ndarray], min_score: float, min_distance: int,
             batch_size: int = 16, tta: int = 1) -> list[Detections]:
    models = model if isinstance(model, list) else [model]
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    device = next(models[0].parameters()).device
    out: list[Detections | None] = [None] * len(images)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(im.shape, []).append(i)
    for shape, idx in groups.items():
        h, w = shape[:2]
        ph, pw = (-h) % 8, (-w) % 8
        for start in range(0, len(idx), batch_size):
            chunk = idx[start:start + batch_size]
            x = torch.from_numpy(np.stack([images[i] for i in chunk])).to(device).permute(0, 3, 1, 2).float() / 255
            if ph or pw:
                x = F.pad(x, (0, pw, 0, ph), mode="reflect")
            heat, probs = _averaged_maps(model, x, tta)
            heat, probs = heat[:, :h, :w], probs[:, :, :h, :w]
            probs = F.avg_pool2d(probs, 3, stride=1, padding=1)
            k = 2 * min_distance + 1
            peak = (heat == F.max_pool2d(heat[:, None], k, stride=1, padding=min_distance)[:, 0]) & (heat > min_score)
            for j, i in enumerate(chunk):
                ys, xs = torch.nonzero(peak[j], as_tuple=True)
                p = probs[j][:, ys, xs]  # (3, n)
                conf, lab = p.max(dim=0)
                score = heat[j, ys, xs] * conf
                keep = score >= min_score
                pts = torch.stack([xs, ys], dim=1)[keep].double().cpu().numpy()
                out[i] = Detections(pts, lab[keep].cpu().numpy().astype(np.int64), score[keep].double().cpu().numpy())
    for m, training in zip(models, was_training, strict=True):
        m.train(training)
    return out  # type: ignore[return-value]


@register_design("unet")
class UNetDesign:
    """:class:`PointUNet` heatmap peaks + per-pixel classes."""

    name = "unet"

    def __init__(self, model: PointUNet, base_channels: int, min_distance: int, tta: int = 1) -> None:
        self.model = model.eval()
        self.base_channels, self.min_distance, self.tta = int(base_channels), int(min_distance), int(tta)

    @classmethod
    def fit(cls, train: list[AnnotatedImage], val: list[AnnotatedImage], settings: Any, work_dir: Path) -> UNetDesign:
        from oncofm.training import fit

        us = settings.unet
        seed = settings.seed if us.init_seed is None else us.init_seed
        torch.manual_seed(seed)
        small = [a for a in train if min(a.image.shape[:2]) < us.crop]
        if small:
            raise OncoFMError(f"{small[0].file} is smaller than the {us.crop} px training crop; set unet.crop lower")
        tg = [targets(a.image.shape[:2], a.points, a.labels, us.sigma, us.class_radius_px) for a in train]
        counts = np.bincount(np.concatenate([a.labels for a in train]), minlength=len(CLASSES)).astype(np.float64)
        weight = torch.tensor((counts.sum() / np.maximum(counts, 1)) ** 0.5, dtype=torch.float32)
        weight = weight / weight.mean()
        data = _Crops([a.image for a in train], [t[0] for t in tg], [t[1] for t in tg], us.crop,
                      us.steps_per_epoch * us.train.batch_size, us.stain_jitter, us.hed_jitter, us.focus_fraction,
                      [(a.points, a.labels) for a in train])
        model = PointUNet(us.base_channels)
        task = _Task(val, settings.radius_px, weight, us.min_distance, us.ema_decay, us.tta)
        train_settings = us.train.model_copy(update={"monitor": "val_macro_f1", "mode": "max", "seed": seed})
        fit(model, data, torch.utils.data.TensorDataset(torch.zeros(1)), task, train_settings, work_dir)
        if task.best_state is not None:  # the weight average of the best validation epoch
            model.load_state_dict(task.best_state)
        return cls(model.cpu(), us.base_channels, us.min_distance, us.tta)

    def predict(self, images: list[np.ndarray], min_score: float = 0.0) -> list[Detections]:
        return _predict(self.model, list(images), max(min_score, 0.02), self.min_distance, tta=self.tta)

    def params(self) -> dict[str, Any]:
        return {"base_channels": self.base_channels, "min_distance": self.min_distance, "tta": self.tta,
                "classes": list(CLASSES)}

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        from oncofm.io import atomic_path

        with atomic_path(Path(directory) / WEIGHTS) as tmp:
            save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, str(tmp))

    @classmethod
    def load(cls, directory: Path, params: dict[str, Any]) -> UNetDesign:
        from safetensors.torch import load_file

        path = _weights_path(directory, WEIGHTS, "")
        model = PointUNet(params["base_channels"])
        model.load_state_dict(load_file(str(path)))
        return cls(model, params["base_channels"], params["min_distance"], int(params.get("tta", 1)))


def _weights_path(directory: Path, name: str, design_option: str) -> Path:
    """The weights file ``name`` of a cell model folder; raises saying how to remake a folder without it."""
    path = Path(directory) / name
    if not path.exists():
        raise OncoFMError(f"{path} is missing: the cell model folder is incomplete; retrain it with "
                          f"`oncofm cells train --out DIR{design_option}`")
    return path


@register_design("unet-ensemble")
class UNetEnsembleDesign:
    """``unet.members`` :class:`PointUNet` s, each trained as design ``unet`` with its own init seed (seed,
    seed + 1, ...; each member's epoch chosen on validation), their heatmaps and class probabilities averaged
    before the peaks are taken."""

    name = "unet-ensemble"

    def __init__(self, models: list[PointUNet], base_channels: int, min_distance: int, tta: int = 1) -> None:
        self.models = [m.eval() for m in models]
        self.base_channels, self.min_distance, self.tta = int(base_channels), int(min_distance), int(tta)

    @classmethod
    def fit(cls, train: list[AnnotatedImage], val: list[AnnotatedImage], settings: Any,
            work_dir: Path) -> UNetEnsembleDesign:
        us = settings.unet
        base = settings.seed if us.init_seed is None else us.init_seed
        members = []
        for k in range(us.members):
            member_settings = settings.model_copy(update={"unet": us.model_copy(update={"init_seed": base + k})})
            members.append(UNetDesign.fit(train, val, member_settings, Path(work_dir) / f"member{k}").model)
        return cls(members, us.base_channels, us.min_distance, us.tta)

    @classmethod
    def from_members(cls, members: list[UNetDesign], tta: int | None = None) -> UNetEnsembleDesign:
        """The ensemble of already trained ``unet`` designs (same architecture)."""
        if len({(m.base_channels, m.min_distance) for m in members}) != 1:
            raise OncoFMError("ensemble members must share base_channels and min_distance")
        m0 = members[0]
        return cls([m.model for m in members], m0.base_channels, m0.min_distance, m0.tta if tta is None else tta)

    def predict(self, images: list[np.ndarray], min_score: float = 0.0) -> list[Detections]:
        return _predict(self.models, list(images), max(min_score, 0.02), self.min_distance, tta=self.tta)

    def params(self) -> dict[str, Any]:
        return {"base_channels": self.base_channels, "min_distance": self.min_distance, "tta": self.tta,
                "members": len(self.models), "classes": list(CLASSES)}

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        from oncofm.io import atomic_path

        with atomic_path(Path(directory) / ENSEMBLE_WEIGHTS) as tmp:
            save_file({f"member{k}.{n}": v.contiguous() for k, m in enumerate(self.models)
                       for n, v in m.state_dict().items()}, str(tmp))

    @classmethod
    def load(cls, directory: Path, params: dict[str, Any]) -> UNetEnsembleDesign:
        from safetensors.torch import load_file

        path = _weights_path(directory, ENSEMBLE_WEIGHTS, " --design unet-ensemble")
        state = load_file(str(path))
        models = []
        for k in range(int(params["members"])):
            prefix = f"member{k}."
            m = PointUNet(params["base_channels"])
            m.load_state_dict({n[len(prefix):]: v for n, v in state.items() if n.startswith(prefix)})
            models.append(m)
        return cls(models, params["base_channels"], params["min_distance"], int(params.get("tta", 1)))
