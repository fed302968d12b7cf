"""Cell detection scores against annotated dots: one-to-one matching within a radius, per class.

A prediction of class ``c`` is a true positive when it is matched to an annotated cell of class ``c`` no
farther than ``radius`` pixels away. Matching is one-to-one and minimises the total distance (Hungarian,
``scipy.optimize.linear_sum_assignment``) among the pairs within the radius. Counts are summed over images,
then precision = TP / (TP + FP), recall = TP / (TP + FN), F1 their harmonic mean; macro F1 is the mean of
the per-class F1s. ``all`` scores detection alone (every class pooled, class ignored).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree

from oncofm.pathology.cells.data import CLASSES


def match_points(pred: np.ndarray, gt: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(pred_idx, gt_idx)`` of the one-to-one matches within ``radius`` with least total distance.

    ``pred`` (n, 2) and ``gt`` (m, 2) are (x, y) coordinates. Among matchings of the largest size the one
    of least total distance is found: each pair's cost is its distance minus a constant larger than any
    sum of distances, so one more match always wins.
    """
    pred = np.asarray(pred, np.float64).reshape(-1, 2)
    gt = np.asarray(gt, np.float64).reshape(-1, 2)
    if len(pred) == 0 or len(gt) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    pairs = cKDTree(pred).sparse_distance_matrix(cKDTree(gt), radius, output_type="coo_matrix")
    if pairs.nnz == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    # only rows/columns that have a candidate pair take part (keeps the dense problem small)
    rows, cols = np.unique(pairs.row), np.unique(pairs.col)
    ri, ci = np.searchsorted(rows, pairs.row), np.searchsorted(cols, pairs.col)
    big = radius * (min(len(rows), len(cols)) + 1) + 1.0
    cost = np.full((len(rows), len(cols)), big * 2)  # no pair: worse than leaving both unmatched
    cost[ri, ci] = pairs.data - big
    r, c = linear_sum_assignment(cost)
    keep = cost[r, c] < 0
    return rows[r[keep]], cols[c[keep]]


def _prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return {"tp": int(tp), "fp": int(fp), "fn": int(fn), "precision": p, "recall": r, "f1": f}


def detection_scores(preds: Sequence[tuple[np.ndarray, np.ndarray]], gts: Sequence[tuple[np.ndarray, np.ndarray]],
                     radius: float, classes: Sequence[str] = CLASSES) -> dict[str, dict[str, float] | float]:
    """Per-class and class-agnostic detection scores over images.

    Parameters
    ----------
    preds, gts
        Per image ``(points (n, 2) xy, labels (n,))``, labels indexing ``classes``.
    radius
        Largest distance in pixels between a prediction and the annotated cell it counts for.

    Returns
    -------
    dict
        ``{class: {tp, fp, fn, precision, recall, f1}, ..., "all": {...}, "macro_f1": float}``.
    """
    if len(preds) != len(gts):
        raise ValueError(f"{len(preds)} predictions for {len(gts)} annotated images")
    counts = {name: [0, 0, 0] for name in [*classes, "all"]}
    for (pp, pl), (gp, gl) in zip(preds, gts, strict=True):
        pp, gp = np.asarray(pp).reshape(-1, 2), np.asarray(gp).reshape(-1, 2)
        pl, gl = np.asarray(pl), np.asarray(gl)
        groups = [(name, pl == k, gl == k) for k, name in enumerate(classes)]
        groups.append(("all", np.ones(len(pp), bool), np.ones(len(gp), bool)))
        for name, pm, gm in groups:
            m, _ = match_points(pp[pm], gp[gm], radius)
            tp = len(m)
            counts[name][0] += tp
            counts[name][1] += int(pm.sum()) - tp
            counts[name][2] += int(gm.sum()) - tp
    out: dict[str, dict[str, float] | float] = {name: _prf(*c) for name, c in counts.items()}
    out["macro_f1"] = float(np.mean([out[name]["f1"] for name in classes]))
    return out


def format_table(scores: dict, classes: Sequence[str] = CLASSES, title: str = "") -> str:
    """The scores as a fixed-width text table (one row per class, ``all``, then macro F1)."""
    lines = [title] if title else []
    lines.append(f"{'class':<14}{'n_true':>8}{'n_pred':>8}{'TP':>7}{'precision':>11}{'recall':>8}{'F1':>7}")
    for name in [*classes, "all"]:
        s = scores[name]
        lines.append(f"{name:<14}{s['tp'] + s['fn']:>8}{s['tp'] + s['fp']:>8}{s['tp']:>7}"
                     f"{s['precision']:>11.3f}{s['recall']:>8.3f}{s['f1']:>7.3f}")
    lines.append(f"{'macro F1':<14}{'':>41}{scores['macro_f1']:>7.3f}")
    return "\n".join(lines)


def tune_thresholds(raw: Sequence[Any], gts: Sequence[tuple[np.ndarray, np.ndarray]], radius: float,
                    grid: Sequence[float] | None = None) -> tuple[np.ndarray, dict[str, list[float]]]:
    """Per class, the score threshold that maximises that class's F1 on ``gts`` (validation images);
    ``raw`` holds per image the design's ``Detections`` (points, labels, scores) before any threshold.

    Each class's F1 depends only on that class's predictions, so the per-class maxima also maximise the
    macro F1. Returns the thresholds (one per class) and, per class, the F1 at every grid value.
    """
    grid = list(np.round(np.arange(0.05, 0.951, 0.025), 3)) if grid is None else list(grid)
    curves: dict[str, list[float]] = {c: [] for c in CLASSES}
    for t in grid:
        dets = [(d.points[d.scores >= t], d.labels[d.scores >= t]) for d in raw]
        s = detection_scores(dets, gts, radius)
        for c in CLASSES:
            curves[c].append(float(s[c]["f1"]))
    best = np.array([grid[int(np.argmax(curves[c]))] for c in CLASSES], np.float64)
    return best, {"grid": [float(g) for g in grid], **curves}
