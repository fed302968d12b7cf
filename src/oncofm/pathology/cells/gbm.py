"""Design ``log-gbm``: LoG nucleus candidates on the hematoxylin channel, classified by gradient boosting.

Candidates are the LoG peaks of :func:`~oncofm.pathology.cells.detect.nucleus_candidates` (a low threshold:
about 97% of annotated cells have one within 6 µm). Each candidate is described by 36 features read
at its centre: hematoxylin, eosin and RGB averaged at scales of 1-16 px (nucleus, its surroundings, the
tissue around), local contrast and spread of hematoxylin, LoG responses per scale, Hessian eigenvalues of
hematoxylin (elongated stromal nuclei versus round ones), and the density of neighbouring candidates.
A histogram gradient-boosting classifier labels each one background (no annotated cell within
``label_radius_px``) or one of the three classes; a candidate's class is the most probable cell class and its
score that class's probability.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from oncofm.errors import OncoFMError
from oncofm.pathology.cells.data import CLASSES, AnnotatedImage
from oncofm.pathology.cells.designs import Detections, register_design
from oncofm.pathology.cells.detect import find_peaks, stain_channels
from oncofm.pathology.cells.metrics import match_points

SCALES = (1.0, 2.0, 4.0, 8.0, 16.0)
LOG_SIGMAS = (2.0, 3.0, 4.0, 5.5)


def _maps(rgb: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Feature maps (each (h, w) float32) and the candidate response map of one image."""
    h, e = stain_channels(rgb)
    h1 = ndi.gaussian_filter(h, 1.0)
    maps: list[np.ndarray] = []
    gray = rgb.astype(np.float32).mean(axis=2) / 255.0
    for s in SCALES:
        gh = ndi.gaussian_filter(h, s)
        maps += [gh, ndi.gaussian_filter(e, s), ndi.gaussian_filter(gray, s)]
        if s <= 4:
            maps.append(np.sqrt(np.clip(ndi.gaussian_filter(h * h, s) - gh * gh, 0, None)))  # local spread
    for c in range(3):
        maps.append(ndi.gaussian_filter(rgb[..., c].astype(np.float32) / 255.0, 2.0))
    logs = [-(s ** 2) * ndi.gaussian_laplace(h1, s) for s in LOG_SIGMAS]
    maps += logs
    for s in (2.0, 3.5):  # Hessian eigenvalues of hematoxylin: elongation and size of the blob
        hxx = ndi.gaussian_filter(h, s, order=(0, 2))
        hyy = ndi.gaussian_filter(h, s, order=(2, 0))
        hxy = ndi.gaussian_filter(h, s, order=(1, 1))
        root = np.sqrt(((hxx - hyy) / 2) ** 2 + hxy ** 2)
        l1, l2 = (hxx + hyy) / 2 + root, (hxx + hyy) / 2 - root
        maps += [s * s * l1, s * s * l2, np.abs(l1) / (np.abs(l2) + 1e-3)]
    gy, gx = np.gradient(h1)
    maps.append(ndi.gaussian_filter(np.hypot(gx, gy), 2.0))
    return [m.astype(np.float32) for m in maps], np.max(logs[:3], axis=0)


def candidates_and_features(rgb: np.ndarray, threshold: float, min_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Candidate points (n, 2) (x, y) and their features (n, f) of one RGB uint8 image."""
    maps, response = _maps(rgb)
    pts = find_peaks(response, threshold, min_distance)
    if len(pts) == 0:
        return pts, np.zeros((0, len(maps) + 3), np.float32)
    xs, ys = pts[:, 0].astype(int), pts[:, 1].astype(int)
    feats = [m[ys, xs] for m in maps]
    seeds = np.zeros(rgb.shape[:2], np.float32)
    seeds[ys, xs] = 1.0
    for s in (8.0, 16.0, 32.0):  # neighbouring candidates per 100 px² around each one
        feats.append(ndi.gaussian_filter(seeds, s)[ys, xs] * 100.0)
    feats.append(response[ys, xs])
    return pts, np.stack(feats, axis=1).astype(np.float32)


def _full_proba(proba: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """Probabilities (n, 1 + classes) over background + every class (0 for a class absent in training)."""
    full = np.zeros((len(proba), 1 + len(CLASSES)))
    full[:, np.asarray(seen, int)] = proba
    return full


@register_design("log-gbm")
class LogGbmDesign:
    """LoG candidates + :class:`sklearn.ensemble.HistGradientBoostingClassifier` (background + 3 classes)."""

    name = "log-gbm"

    def __init__(self, classifier: Any, candidate_threshold: float, min_distance: int) -> None:
        self.classifier = classifier
        self.candidate_threshold = float(candidate_threshold)
        self.min_distance = int(min_distance)

    @classmethod
    def fit(cls, train: list[AnnotatedImage], val: list[AnnotatedImage], settings: Any, work_dir: Path,
            ) -> LogGbmDesign:
        """Fit on ``train`` (``val`` is used only for the boosting's early stopping)."""
        from sklearn.ensemble import HistGradientBoostingClassifier

        gs = settings.gbm

        def table(images: list[AnnotatedImage]) -> tuple[np.ndarray, np.ndarray]:
            xs, ys = [], []
            for a in images:
                pts, f = candidates_and_features(a.image, gs.candidate_threshold, gs.min_distance)
                y = np.zeros(len(pts), np.int64)  # 0: background
                pi, gi = match_points(pts, a.points, gs.label_radius_px)
                y[pi] = a.labels[gi] + 1
                xs.append(f)
                ys.append(y)
            return np.concatenate(xs), np.concatenate(ys)

        x_train, y_train = table(train)
        x_val, y_val = table(val)
        clf = HistGradientBoostingClassifier(
            max_iter=gs.max_iter, learning_rate=gs.learning_rate, max_leaf_nodes=gs.max_leaf_nodes,
            l2_regularization=1.0, early_stopping=False, random_state=settings.seed)
        # early stopping on the validation images' candidates: refit with the best number of trees
        clf.fit(x_train, y_train)
        losses = []
        for proba in clf.staged_predict_proba(x_val):
            full = _full_proba(proba, clf.classes_)
            losses.append(-np.mean(np.log(np.clip(full[np.arange(len(y_val)), y_val], 1e-9, None))))
        best = int(np.argmin(losses)) + 1
        if best < gs.max_iter:
            clf.set_params(max_iter=best)
            clf.fit(x_train, y_train)
        return cls(clf, gs.candidate_threshold, gs.min_distance)

    def predict(self, images: list[np.ndarray], min_score: float = 0.0) -> list[Detections]:
        out = []
        for rgb in images:
            pts, f = candidates_and_features(rgb, self.candidate_threshold, self.min_distance)
            if len(pts) == 0:
                out.append(Detections.empty())
                continue
            proba = _full_proba(self.classifier.predict_proba(f), self.classifier.classes_)[:, 1:]  # no background
            lab = proba.argmax(axis=1)
            score = proba[np.arange(len(lab)), lab]
            keep = score >= min_score
            out.append(Detections(pts[keep], lab[keep].astype(np.int64), score[keep]))
        return out

    def params(self) -> dict[str, Any]:
        return {"candidate_threshold": self.candidate_threshold, "min_distance": self.min_distance,
                "n_trees": int(self.classifier.n_iter_), "classes": list(CLASSES)}

    def save(self, directory: Path) -> None:
        from oncofm.io import atomic_path

        with atomic_path(Path(directory) / "classifier.pkl") as tmp:
            tmp.write_bytes(pickle.dumps(self.classifier))

    @classmethod
    def load(cls, directory: Path, params: dict[str, Any]) -> LogGbmDesign:
        path = Path(directory) / "classifier.pkl"
        if not path.exists():
            raise OncoFMError(f"{path} is missing: the cell model folder is incomplete; retrain it with "
                              "`oncofm cells train --out DIR`")
        return cls(pickle.loads(path.read_bytes()), params["candidate_threshold"], params["min_distance"])
