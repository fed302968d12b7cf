"""The BRCA-M2C cell annotations: images, dots and the by-patient split.

BRCA-M2C (Abousamra et al., ICCV 2021) holds 101 H&E regions of TCGA-BRCA slides at about 0.5 µm/px with
one dot per annotated cell in three classes. The folder (``shared/data/pathology/brca_m2c_tcga_rois``) has
``MANIFEST.csv`` (file, patient barcode, ...) and ``cells.csv.gz`` (file, x, y, cell_class).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from oncofm.errors import OncoFMError

#: The cell classes, in the order of every per-class array and model output.
CLASSES: tuple[str, ...] = ("inflammatory", "epithelial", "stromal")
#: The µm per pixel of the BRCA-M2C images (40x regions resized by about 0.49) and of the models' input.
DATA_MPP = 0.5
DATASET_FOLDER = "pathology/brca_m2c_tcga_rois"
SPLITS = ("train", "val", "test")


def default_data_dir() -> Path:
    """``$ONCOFM_SHARED_DATA/pathology/brca_m2c_tcga_rois`` or the ``shared/data`` folder beside the repo."""
    root = os.environ.get("ONCOFM_SHARED_DATA")
    if root:
        return Path(root) / DATASET_FOLDER
    return Path(__file__).resolve().parents[4].parent / "shared" / "data" / DATASET_FOLDER


@dataclass
class AnnotatedImage:
    """One annotated region: RGB uint8 (h, w, 3), dot coordinates ``points`` (n, 2) as (x, y) pixels and
    class indices ``labels`` (n,) into :data:`CLASSES`."""

    file: str
    patient: str
    image: np.ndarray
    points: np.ndarray
    labels: np.ndarray


def _check_dir(data_dir: str | Path) -> Path:
    data_dir = Path(data_dir)
    for name in ("MANIFEST.csv", "cells.csv.gz"):
        if not (data_dir / name).exists():
            raise OncoFMError(f"{data_dir / name} not found: --data must be the BRCA-M2C folder "
                              f"(shared/data/{DATASET_FOLDER}) holding MANIFEST.csv and cells.csv.gz")
    return data_dir


def load_manifest(data_dir: str | Path) -> pd.DataFrame:
    """The manifest: one row per image (``file``, ``patient_barcode``, ``width``, ``height``, ...)."""
    return pd.read_csv(_check_dir(data_dir) / "MANIFEST.csv")


def load_cells(data_dir: str | Path) -> pd.DataFrame:
    """Every annotated dot: ``file``, ``x``, ``y``, ``cell_class``; unknown classes are an error."""
    cells = pd.read_csv(_check_dir(data_dir) / "cells.csv.gz")
    unknown = sorted(set(cells["cell_class"]) - set(CLASSES))
    if unknown:
        raise OncoFMError(f"cells.csv.gz has cell classes {unknown}; expected only {list(CLASSES)}")
    return cells


def read_rgb(path: str | Path) -> np.ndarray:
    """An image file as RGB uint8 (h, w, 3)."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def load_images(data_dir: str | Path, files: list[str] | None = None) -> list[AnnotatedImage]:
    """The annotated images (all, or ``files`` in that order) with their dots."""
    data_dir = _check_dir(data_dir)
    manifest = load_manifest(data_dir).set_index("file")
    cells = load_cells(data_dir)
    files = list(manifest.index) if files is None else list(files)
    missing = [f for f in files if f not in manifest.index]
    if missing:
        raise OncoFMError(f"{len(missing)} files are not in {data_dir / 'MANIFEST.csv'} (e.g. {missing[0]}); "
                          "the split file does not belong to this data folder")
    by_file = {f: g for f, g in cells.groupby("file")}
    class_index = {c: i for i, c in enumerate(CLASSES)}
    out = []
    for f in files:
        g = by_file.get(f)
        pts = (g[["x", "y"]].to_numpy(np.float64) if g is not None else np.zeros((0, 2)))
        lab = (g["cell_class"].map(class_index).to_numpy(np.int64) if g is not None
               else np.zeros(0, np.int64))
        out.append(AnnotatedImage(f, str(manifest.loc[f, "patient_barcode"]), read_rgb(data_dir / f), pts, lab))
    return out


def split_by_patient(manifest: pd.DataFrame, val_fraction: float = 0.15, test_fraction: float = 0.2,
                     seed: int = 0) -> pd.DataFrame:
    """Assign every patient (and so all of its images) to train, val or test.

    Patients are shuffled with ``seed`` and cut by fraction of patients; no patient has images in two
    splits. Returns ``file``, ``patient``, ``split`` in the manifest's order.
    """
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise OncoFMError(f"val_fraction {val_fraction} and test_fraction {test_fraction} must be in (0, 1) "
                          "and sum below 1")
    patients = np.array(sorted(manifest["patient_barcode"].astype(str).unique()))
    order = np.random.default_rng(seed).permutation(len(patients))
    n_test = max(1, round(test_fraction * len(patients)))
    n_val = max(1, round(val_fraction * len(patients)))
    if n_test + n_val >= len(patients):
        raise OncoFMError(f"{len(patients)} patients are too few for a train/val/test split")
    which = {}
    for rank, i in enumerate(order):
        which[patients[i]] = "test" if rank < n_test else ("val" if rank < n_test + n_val else "train")
    return pd.DataFrame({"file": manifest["file"].astype(str),
                         "patient": manifest["patient_barcode"].astype(str),
                         "split": manifest["patient_barcode"].astype(str).map(which)})


def check_split(split: pd.DataFrame) -> None:
    """Raise when a patient has images in more than one split or a split is empty or unknown."""
    if not {"file", "patient", "split"} <= set(split.columns):
        raise OncoFMError("a split table needs the columns file, patient, split")
    bad = sorted(set(split["split"]) - set(SPLITS))
    if bad:
        raise OncoFMError(f"unknown split names {bad}; expected {list(SPLITS)}")
    per_patient = split.groupby("patient")["split"].nunique()
    leaked = per_patient[per_patient > 1].index.tolist()
    if leaked:
        raise OncoFMError(f"patients in more than one split: {leaked[:5]}; the split must be by patient")
    for name in SPLITS:
        if not (split["split"] == name).any():
            raise OncoFMError(f"the split has no {name} images")
