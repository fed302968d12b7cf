"""Bags of patch features from other tools (CLAM, TRIDENT, STAMP), for the attention-MIL slide model.

A user who already extracted patch features with a foundation model (UNI, CONCH, Virchow, ...) should not have
to tile and encode again. :func:`read_feature_bag` reads one slide's bag; :func:`import_feature_bags` writes a
folder of them into a run in the layout ``oncofm train slide`` reads, so training, ``oncofm heatmap`` and the
attention export run unchanged on them.

Accepted ``.h5`` layouts (one file per slide)
---------------------------------------------
- **features**: dataset ``features`` (N, D) — CLAM ``extract_features_fp.py`` (``h5_files/<slide>.h5``) and
  TRIDENT (``features_<encoder>/<slide>.h5``) — or ``feats`` (N, D) — STAMP / KatherLab (e.g. mopadi's
  example bags). Float; NaN or infinite values are an error.
- **coords**: dataset ``coords`` (N, 2), the (x, y) of each patch's top-left corner in level-0 pixels (CLAM,
  TRIDENT, mopadi), or in µm when the file says ``unit = "um"`` (STAMP ≥ 2: then ``slide_mpp`` or the slide
  file converts them). Required: without coordinates there is no heatmap.
- **patch size** in level-0 pixels, the first that applies: the ``patch_size_level0`` argument; the attribute
  ``patch_size_level0`` (TRIDENT, on ``coords``); ``patch_size`` × ``level0_magnification`` /
  ``target_magnification`` (TRIDENT); ``patch_size`` × ``downsample`` (CLAM's patch ``.h5``); ``patch_size`` at
  ``patch_level`` 0 (CLAM); STAMP's ``tile_size_um`` / mpp; else the **grid step** of the coordinates (the
  most common distance between neighbouring x or y values — right for CLAM's features files, which carry no
  attributes, and non-overlapping grids; logged as a fallback). Attributes are read from the file, the
  ``coords`` dataset and the ``features`` dataset.
- The slide name is the file stem, or, for ``<slide>/features.h5`` (mopadi's layout), the folder's name.

Refused, each with one message: a missing ``features``/``feats`` or ``coords`` dataset, a (D,) slide embedding
(that is :mod:`oncofm.cohort.slide_features`' input), shapes that do not fit ((N, D) and (N, 2) with the same
N), an empty bag (TRIDENT writes one for a slide without tissue), NaN or infinite values, negative coordinates.

What :func:`import_feature_bags` writes (nothing when a bag is bad)
------------------------------------------------------------------
- ``models/slide/features/<encoder>/<stem>.h5``: the feature cache of ``train slide`` (``features``,
  ``coords``, attrs ``encoder``, ``tiles``, ``patch_level0_size``; plus ``source_path``, ``source_layout``,
  ``patch_size_source``), so ``extract_features`` finds every slide encoded and skips it;
- ``tiles/<stem>.h5``: the patch grid from the bag's coordinates (``coords``; ``tissue_fraction`` NaN —
  unknown; the contract's attributes, with the slide's geometry when ``slides`` names a folder holding the
  slide file, else from the bag's attributes and coordinates; ``source = "feature_bag"``);
- ``cohort/slides.parquet``: rows added for bags of cohort patients it does not list yet (a bag is matched to
  a listed slide by its stem, or by the slide barcode before the first ``.``; else to the patient of its
  TCGA barcode's first 12 characters); bags of no cohort patient are counted and left out (an error when
  none matches);
- ``models/slide/features/<encoder>/import.json``: per bag its layout, patch count and patch size, the width D.

The encoder name must start with ``external`` (default ``external``): :class:`ExternalFeatureEncoder`, a
placeholder of width D that refuses pixels, stands in for the tool's encoder, so the slide model is built for
D-wide features and never re-encodes. :func:`feature_bag_train_settings` gives the training settings.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import Field, field_validator

from oncofm.config import StageSettings, artifact_version, check_stage, write_stamp
from oncofm.errors import DataValidationError, OncoFMError
from oncofm.io import first_dataset, open_h5
from oncofm.pathology.encoders import EXTERNAL, ExternalFeatureEncoder, register_external_encoder

log = logging.getLogger(__name__)

__all__ = ["FEATURE_KEYS", "ExternalFeatureEncoder", "FeatureBag", "FeatureBagSettings", "bag_heatmap",
           "bag_name", "feature_bag_train_settings", "find_feature_bags", "import_feature_bags",
           "read_feature_bag", "register_external_encoder"]

#: Names of the patch-feature dataset: CLAM / TRIDENT ``features``, STAMP / KatherLab ``feats``.
FEATURE_KEYS = ("features", "feats")
COORDS_KEY = "coords"
#: The ``source`` attribute of the tiles files this module writes (and may overwrite).
TILES_SOURCE = "feature_bag"


# ----------------------------------------------------------------------------------------------------------
# one bag
@dataclass
class FeatureBag:
    """One slide's patch features from another tool."""

    path: Path
    name: str  # the slide name (file stem, or the folder of <slide>/features.h5)
    features: np.ndarray  # (N, D) float32 (float16 kept as float16)
    coords: np.ndarray  # (N, 2) int64 level-0 (x, y) of each patch's top-left corner
    patch_size_level0: int  # patch side in level-0 pixels
    attrs: dict[str, Any] = field(default_factory=dict)  # the file's attributes + layout, features_key,
    # patch_size_source

    def __len__(self) -> int:
        return len(self.features)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])


def bag_name(path: str | Path) -> str:
    """The slide a bag file belongs to: the folder for ``<slide>/features.h5``, else the file stem."""
    path = Path(path)
    return path.parent.name if path.name.lower() in ("features.h5", "feats.h5") else path.stem


def find_feature_bags(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """Bag files of ``source``: a file, a list of files, or a folder of ``.h5`` files and/or of
    ``<slide>/features.h5`` sub-folders (sorted by slide name)."""
    if isinstance(source, str | Path):
        root = Path(source)
        if root.is_file():
            return [root]
        if not root.is_dir():
            raise OncoFMError(f"feature bags {root} do not exist")
        found = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in (".h5", ".hdf5")
                 and not p.name.startswith(".")]
        found += [p / "features.h5" for p in root.iterdir() if p.is_dir() and (p / "features.h5").is_file()]
        if not found:
            raise OncoFMError(f"{root} holds no patch-feature bags (<slide>.h5 files with 'features' and "
                              "'coords', or <slide>/features.h5 folders)")
        return sorted(found, key=bag_name)
    paths = [Path(p) for p in source]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing or not paths:
        raise OncoFMError(f"feature bag file(s) do not exist: {', '.join(missing[:5]) or '(none given)'}")
    return paths


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, np.ndarray):
        return value.tolist() if value.size > 1 else value.reshape(-1)[0].item() if value.size else None
    if isinstance(value, np.generic):
        return value.item()
    return value


def _number(attrs: dict[str, Any], key: str) -> float | None:
    value = attrs.get(key)
    if isinstance(value, list | tuple):
        value = value[0] if value else None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) and number > 0 else None


def grid_step(coords: np.ndarray) -> int | None:
    """The most common positive distance between neighbouring distinct x (and y) values; None without one."""
    steps: list[int] = []
    for axis in (0, 1):
        values = np.unique(coords[:, axis])
        diffs = np.diff(values)
        steps += [int(d) for d in diffs if d > 0]
    if not steps:
        return None
    return Counter(steps).most_common(1)[0][0]


def _patch_size(attrs: dict[str, Any], coords_px: np.ndarray, override: int | None, mpp: float | None
                ) -> tuple[int, str]:
    if override:
        return int(override), "argument patch_size_level0"
    if (v := _number(attrs, "patch_size_level0")) is not None:
        return int(round(v)), "attribute patch_size_level0"
    size = _number(attrs, "patch_size")
    src, dst = _number(attrs, "level0_magnification"), _number(attrs, "target_magnification")
    if size is not None and src is not None and dst is not None:
        return int(round(size * src / dst)), "patch_size x level0_magnification / target_magnification"
    if size is not None and (ds := _number(attrs, "downsample")) is not None:
        return int(round(size * ds)), "patch_size x downsample"
    if size is not None and str(attrs.get("patch_level", "")).strip() in ("0", "0.0"):
        return int(round(size)), "patch_size at patch_level 0"
    if (um := _number(attrs, "tile_size_um")) is not None and mpp is not None:
        return int(round(um / mpp)), "tile_size_um / slide mpp"
    step = grid_step(coords_px)
    if step is None:
        raise OncoFMError("cannot tell the patch size: the file has no patch_size_level0 / patch_size attributes "
                          "and its coordinates no grid step; pass patch_size_level0 (the patch side in level-0 "
                          "pixels)")
    return step, "grid step of the coordinates"


def _check_shapes(key: str, fds: Any, cds: Any, file: str) -> None:
    """(N, D) numeric features and (N, 2) coordinates of the same N > 0 patches, else one clear error."""
    if fds.ndim == 1 or (fds.ndim == 2 and fds.shape[0] == 1 and len(cds.shape) == 2 and cds.shape[0] != 1):
        raise DataValidationError(f"{key!r} has shape {fds.shape}: one slide embedding, not a bag of patch "
                                  "features; import slide embeddings with "
                                  "oncofm.cohort.slide_features.import_slide_features", file=file)
    if fds.ndim != 2:
        raise DataValidationError(f"{key!r} has shape {fds.shape}; patch features are (N, D)", file=file)
    if fds.dtype.kind not in "fiu":
        raise DataValidationError(f"{key!r} is not numeric (dtype {fds.dtype})", file=file)
    if cds.ndim != 2 or cds.shape[1] != 2 or cds.shape[0] != fds.shape[0]:
        raise DataValidationError(f"shape mismatch: {key!r} is {fds.shape} but 'coords' is {cds.shape}; "
                                  "expected (N, D) features and (N, 2) coordinates of the same N patches",
                                  file=file)
    if fds.shape[0] == 0 or fds.shape[1] == 0:
        raise DataValidationError(f"empty bag: {key!r} has shape {fds.shape} (a slide without tissue "
                                  "patches?); leave the file out", file=file)


def read_feature_bag(path: str | Path, *, patch_size_level0: int | None = None,
                     slide_mpp: float | None = None) -> FeatureBag:
    """Read and check one bag of patch features (see the module docstring for the accepted layouts).

    Parameters
    ----------
    patch_size_level0
        The patch side in level-0 pixels, when the file does not say (it overrides the file).
    slide_mpp
        Level-0 µm/px, to convert STAMP's µm coordinates (and ``tile_size_um``) into level-0 pixels.
    """
    import h5py

    path = Path(path)
    file = str(path)
    if not path.is_file():
        raise OncoFMError(f"feature bag {path} does not exist")
    handle = open_h5(path)
    with handle as f:
        key = first_dataset(f, FEATURE_KEYS)
        if key is None:
            raise DataValidationError(f"no patch-feature dataset: expected 'features' (CLAM, TRIDENT) or 'feats' "
                                      f"(STAMP) of shape (N, D); the file holds {sorted(f.keys())}", file=file)
        if COORDS_KEY not in f or not isinstance(f[COORDS_KEY], h5py.Dataset):
            raise DataValidationError(f"no 'coords' dataset (N, 2) of level-0 patch positions beside {key!r}: "
                                      f"without coordinates there is no heatmap; the file holds "
                                      f"{sorted(f.keys())}. Re-extract with CLAM/TRIDENT, which write them",
                                      file=file)
        fds, cds = f[key], f[COORDS_KEY]
        attrs = {k: _plain(v) for src in (f.attrs, cds.attrs, fds.attrs) for k, v in src.items()}
        _check_shapes(key, fds, cds, file)
        feats = fds[()]
        coords = np.asarray(cds[()])
    feats = feats.astype(np.float16 if feats.dtype == np.float16 else np.float32, copy=False)
    bad = ~np.isfinite(feats)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        kind = "NaN" if np.isnan(feats).any() else "infinite"
        raise DataValidationError(f"{kind} values in the patch features ({int(bad.sum())} values in {len(rows)} of "
                                  f"{len(feats)} patches): re-extract the slide, or drop those patches",
                                  file=file, rows=[f"patch {r}" for r in rows])
    if coords.dtype.kind not in "fiu" or not np.isfinite(coords.astype(np.float64)).all():
        raise DataValidationError("'coords' must be finite numbers", file=file)
    unit = str(attrs.get("unit", "")).lower()
    layout = "stamp" if key == "feats" else ("trident" if "patch_size_level0" in attrs
                                             or "target_magnification" in attrs else "clam")
    if unit in ("um", "µm", "micron", "microns"):
        if not slide_mpp:
            raise OncoFMError(f"{path}: the coordinates are in µm (STAMP); pass slide_mpp (level-0 µm/px), or the "
                              "folder of the slides so that it is read from the slide")
        coords = coords.astype(np.float64) / float(slide_mpp)
        attrs["coords_unit"] = "um (converted with slide mpp)"
    coords = np.rint(coords).astype(np.int64)
    if (coords < 0).any():
        raise DataValidationError("negative coordinates: 'coords' must be level-0 pixel offsets (x, y) >= 0",
                                  file=file)
    size, source = _patch_size(attrs, coords, patch_size_level0, slide_mpp)
    if source.startswith("grid step"):
        log.info("%s: no patch-size attributes; using the coordinates' grid step, %d level-0 px", path.name, size)
    attrs.update({"layout": layout, "features_key": key, "patch_size_source": source})
    return FeatureBag(path=path, name=bag_name(path), features=feats, coords=coords, patch_size_level0=int(size),
                      attrs=attrs)


# ----------------------------------------------------------------------------------------------------------
# the placeholder encoder (ExternalFeatureEncoder, register_external_encoder) lives in the encoder registry,
# oncofm.pathology.encoders, so that every `external...` name resolves in any process; re-exported here.


# ----------------------------------------------------------------------------------------------------------
# importing bags into a run
class FeatureBagSettings(StageSettings):
    """Settings of :func:`import_feature_bags`."""

    stage: ClassVar[str] = "feature_bags"

    run: str = Field(..., description="run directory with an imported cohort")
    source: str | list[str] = Field(..., description="a folder of <slide>.h5 bags (CLAM h5_files/, TRIDENT "
                                    "features_<encoder>/) or of <slide>/features.h5 folders, or a list of files")
    encoder: str = Field(EXTERNAL, description="the name the features are cached and trained under "
                         "(external, external-uni, ...)")
    slides: str | None = Field(None, description="folder of the slide files: their geometry goes into the tiles "
                               "files, so `oncofm heatmap` draws on the slide")
    patch_size_level0: int | None = Field(None, ge=1, description="patch side in level-0 pixels when the bags "
                                          "do not say")
    slide_mpp: float | None = Field(None, gt=0, description="level-0 µm/px (STAMP µm coordinates; slides "
                                    "without mpp metadata)")
    redo: bool = False

    @field_validator("encoder")
    @classmethod
    def _external(cls, value: str) -> str:
        if not value.startswith(EXTERNAL):
            raise ValueError(f"must start with {EXTERNAL!r} (e.g. external-uni), so it is never taken for a "
                             "pixel encoder")
        return value


def _slide_files(folder: str | None) -> dict[str, Path]:
    if not folder:
        return {}
    from oncofm.pathology.reader import find_slides, slide_stem

    return {slide_stem(p).upper(): p for p in find_slides(folder)}


class _Index:
    """Look a slide up by name (case-insensitive), else by its slide barcode (the part before the first dot),
    when exactly one entry has that barcode (``TCGA-...-DX1`` finds ``TCGA-...-DX1.<uuid>``)."""

    def __init__(self, table: dict[str, Any]) -> None:
        self.exact = {k.upper(): v for k, v in table.items()}
        short: dict[str, list[Any]] = {}
        for k, v in self.exact.items():
            short.setdefault(k.split(".")[0], []).append(v)
        self.short = {k: vs[0] for k, vs in short.items() if len(vs) == 1}

    def get(self, name: str) -> Any:
        up = name.upper()
        return self.exact[up] if up in self.exact else self.short.get(up.split(".")[0])


@dataclass
class _Planned:
    bag: Path
    name: str
    stem: str
    patient: str
    slide_file: Path | None
    new_row: dict[str, str] | None
    mpp: float | None = None
    n: int = 0
    dim: int = 0
    size: int = 0
    info: dict[str, Any] = field(default_factory=dict)


def _tiles_attrs(bag: FeatureBag, slide_file: Path | None, settings: FeatureBagSettings) -> dict[str, Any]:
    """The tiles-contract attributes of a grid made from ``bag`` (with the slide's geometry when known)."""
    a = bag.attrs
    size = bag.patch_size_level0
    patch_px = _number(a, "patch_size") or _number(a, "tile_size_px") or float(size)
    attrs: dict[str, Any] = {"source": TILES_SOURCE, "feature_bag": str(bag.path.resolve()),
                             "encoder": settings.encoder, "patch_size_source": a["patch_size_source"],
                             "level0_size": int(size), "patch_size": int(round(patch_px)), "min_tissue": 0.0}
    if slide_file is not None:
        from oncofm.pathology.reader import open_slide

        with open_slide(slide_file, mpp=settings.slide_mpp) as slide:
            ds_target = size / patch_px
            level = slide.best_level_for_downsample(ds_target)
            ds = float(slide.level_downsamples[level])
            attrs.update({"slide_path": str(slide_file.resolve()), "read_level": int(level),
                          "read_size": max(1, int(round(size / ds))), "downsample": ds,
                          "slide_mpp": float(slide.mpp), "target_mpp": float(slide.mpp) * ds_target,
                          "width": int(slide.dimensions[0]), "height": int(slide.dimensions[1]),
                          "vendor": str(slide.vendor), "backend": str(slide.backend)})
        return attrs
    mpp = settings.slide_mpp
    if mpp is None and (mag := _number(a, "level0_magnification")) is not None:
        mpp = 10.0 / mag  # 40x ≈ 0.25 µm/px, 20x ≈ 0.5 (an approximation; the slide's own value is better)
    width = _number(a, "level0_width") or float(bag.coords[:, 0].max() + size)
    height = _number(a, "level0_height") or float(bag.coords[:, 1].max() + size)
    attrs.update({"slide_path": "", "read_level": 0, "read_size": int(size), "downsample": 1.0,
                  "slide_mpp": float(mpp) if mpp else float("nan"),
                  "target_mpp": float(mpp) * size / patch_px if mpp else float("nan"),
                  "width": int(width), "height": int(height), "vendor": "unknown (no slide file)"})
    return attrs


def _check_existing(path: Path, settings: FeatureBagSettings, kind: str) -> None:
    """Refuse to overwrite a tiles or feature file that this module did not write (unless ``redo``)."""
    import h5py

    if not path.exists() or settings.redo:
        return
    try:
        with h5py.File(path, "r") as f:
            ours = _plain(f.attrs.get("source", "")) == TILES_SOURCE or "source_layout" in f.attrs
    except OSError:
        ours = False
    if not ours:
        raise OncoFMError(f"{path} exists and was not made from a feature bag ({kind}); the imported bag's "
                          "coordinates must be the grid the slide model reads: remove it, or pass redo=True to "
                          "replace it")


def _plan_bags(files: list[Path], settings: FeatureBagSettings, patients: set[str],
               by_stem: dict[str, tuple[str, str]], layout: Any, feat_dir: Path
               ) -> tuple[list[_Planned], list[str], dict[int, list[str]]]:
    """Read and check every bag; where each goes (stem, patient, new slides.parquet row); the unmatched ones."""
    from oncofm.pathology.reader import slide_stem

    slide_files = _Index(_slide_files(settings.slides))
    stems = _Index(by_stem)
    planned: list[_Planned] = []
    unmatched: list[str] = []
    names_seen: dict[str, Path] = {}
    dims: dict[int, list[str]] = {}
    for path in files:
        name = bag_name(path)
        if name.upper() in names_seen:
            raise DataValidationError(f"two bags for slide {name!r}: {names_seen[name.upper()]} and {path}",
                                      file=str(path))
        names_seen[name.upper()] = path
        slide_file = slide_files.get(name)
        mpp = settings.slide_mpp
        if mpp is None and slide_file is not None:
            from oncofm.pathology.reader import open_slide

            try:
                with open_slide(slide_file) as s:
                    mpp = float(s.mpp)
            except OncoFMError:  # no mpp metadata: fine unless the coordinates are in µm (then read_feature_bag says so)
                mpp = None
        bag = read_feature_bag(path, patch_size_level0=settings.patch_size_level0, slide_mpp=mpp)
        dims.setdefault(bag.dim, []).append(name)
        hit = stems.get(name)
        if hit is not None:
            patient, stem = hit
            new_row = None
        else:
            up = name.upper()
            patient = up[:12] if up.startswith("TCGA-") else name
            stem = slide_stem(slide_file) if slide_file is not None else name
            new_row = {"patient_id": patient, "slide_id": slide_file.name if slide_file is not None else f"{name}.h5"}
        if patient not in patients:
            unmatched.append(name)
            continue
        tiles = layout.tiles_dir / f"{stem}.h5"
        _check_existing(tiles, settings, "tiles from `oncofm tile`?")
        _check_existing(feat_dir / f"{stem}.h5", settings, "features from `oncofm train slide`?")
        planned.append(_Planned(bag=path, name=name, stem=stem, patient=patient, slide_file=slide_file,
                                new_row=new_row, mpp=mpp, n=len(bag), dim=bag.dim, size=bag.patch_size_level0,
                                info={k: bag.attrs[k] for k in ("layout", "features_key", "patch_size_source")}))
        del bag
    return planned, unmatched, dims


def import_feature_bags(settings: FeatureBagSettings) -> dict[str, Path]:
    """Write bags of patch features from another tool into ``settings.run`` (see the module docstring).

    Returns ``{"features_dir", "tiles_dir", "slides_table", "summary"}``. Every bag is read and checked
    before the first file is written; the import is reused when its settings and the bags are unchanged.
    """
    import h5py
    import pandas as pd

    from oncofm.io import atomic_path, write_json, write_parquet
    from oncofm.pathology.artifacts import SlideArtifacts
    from oncofm.pathology.reader import slide_stem
    from oncofm.paths import RunLayout

    layout = RunLayout(settings.run)
    layout.require(layout.patients, "Import a cohort first (`oncofm cohort import --run RUN ...`).")
    feat_dir = SlideArtifacts.of(settings.run).features_dir / settings.encoder
    summary_path = feat_dir / "import.json"
    outputs = {"features_dir": feat_dir, "tiles_dir": layout.tiles_dir, "slides_table": layout.slides_table,
               "summary": summary_path}
    files = find_feature_bags(settings.source)
    stamp = layout.settings_file(f"{settings.stage}_{settings.encoder}")
    inputs = {"bags": artifact_version(files[0].parent if len(files) > 1 else files[0]),
              "patients": artifact_version(layout.patients)}
    register_external_encoder(settings.encoder)
    if check_stage(settings, stamp, [summary_path], inputs=inputs, on_change="redo",
                   what=f"the feature bags in {feat_dir}"):
        log.info("feature bags in %s are up to date (redo to re-import)", feat_dir)
        return outputs

    patients = set(pd.read_parquet(layout.patients, columns=["patient_id"])["patient_id"].astype(str))
    listed = pd.read_parquet(layout.slides_table) if layout.slides_table.exists() else None
    by_stem: dict[str, tuple[str, str]] = {}
    if listed is not None:
        for pid, sid in zip(listed["patient_id"].astype(str), listed["slide_id"].astype(str), strict=True):
            stem = slide_stem(sid)
            by_stem[stem.upper()] = (pid, stem)

    # pass 1: read and check every bag; plan where it goes
    planned, unmatched, dims = _plan_bags(files, settings, patients, by_stem, layout, feat_dir)
    if len(dims) > 1:
        common = max(dims, key=lambda d: len(dims[d]))
        other = [f"{n} ({d})" for d, ns in dims.items() if d != common for n in ns]
        raise DataValidationError(f"the bags differ in feature width: {len(dims[common])} have {common} features, "
                                  f"others {', '.join(other[:5])}; every bag must come from the same patch encoder")
    if not planned:
        raise DataValidationError(f"none of the {len(files)} bags belongs to a patient of the cohort in "
                                  f"{layout.root} (matched by cohort/slides.parquet, else by the TCGA barcode's "
                                  "first 12 characters)", rows=unmatched)
    if unmatched:
        log.warning("%d of %d feature bags match no cohort patient and are left out (e.g. %s)", len(unmatched),
                    len(files), ", ".join(unmatched[:3]))

    # pass 2: write
    for item in planned:
        bag = read_feature_bag(item.bag, patch_size_level0=settings.patch_size_level0, slide_mpp=item.mpp)
        tiles = layout.tiles_dir / f"{item.stem}.h5"
        attrs = _tiles_attrs(bag, item.slide_file, settings)
        with atomic_path(tiles, suffix=".h5.tmp") as tmp, h5py.File(tmp, "w") as f:
            f.create_dataset("coords", data=bag.coords)
            f.create_dataset("tissue_fraction", data=np.full(len(bag), np.nan, np.float32))
            for k, v in attrs.items():
                f.attrs[k] = v
        with atomic_path(feat_dir / f"{item.stem}.h5", suffix=".h5.tmp") as tmp, h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=bag.features)
            f.create_dataset("coords", data=bag.coords)
            f.attrs["encoder"] = settings.encoder
            f.attrs["tiles"] = str(tiles.resolve())
            f.attrs["patch_level0_size"] = int(bag.patch_size_level0)
            f.attrs["source_path"] = str(item.bag.resolve())
            f.attrs["source_layout"] = bag.attrs["layout"]
            f.attrs["patch_size_source"] = bag.attrs["patch_size_source"]
    new_rows = [p.new_row for p in planned if p.new_row is not None]
    if new_rows:
        add = pd.DataFrame(new_rows)
        table = add if listed is None else pd.concat([listed, add], ignore_index=True)
        write_parquet(table, layout.slides_table, index=False)
    dim = planned[0].dim
    write_json({"encoder": settings.encoder, "dim": dim, "source": settings.source, "n_bags": len(files),
                "n_imported": len(planned), "n_unmatched": len(unmatched), "unmatched_examples": unmatched[:10],
                "n_slides_added_to_slides_table": len(new_rows),
                "slides": [{"name": p.name, "stem": p.stem, "patient_id": p.patient, "n_patches": p.n,
                            "patch_size_level0": p.size, "slide_file": str(p.slide_file or ""), **p.info}
                           for p in planned]}, summary_path)
    write_stamp(settings, stamp, inputs=inputs)
    log.info("imported %d feature bags (%d-d, %d patches) into %s; %d unmatched", len(planned), dim,
             sum(p.n for p in planned), feat_dir, len(unmatched))
    return outputs


def feature_bag_train_settings(run: str | Path, encoder: str = EXTERNAL, preset: str | None = None,
                               **values: Any) -> Any:
    """``SlideTrainSettings`` for a slide model on imported bags: ``encoder`` and its width from
    ``import.json``, ``mode`` features; ``values`` (and ``preset``) as for ``SlideTrainSettings``."""
    from oncofm.pathology.artifacts import SlideArtifacts
    from oncofm.pathology.slide_train import SlideTrainSettings

    summary = SlideArtifacts.of(run).features_dir / encoder / "import.json"
    if not summary.exists():
        raise OncoFMError(f"{summary} does not exist: import the feature bags first (import_feature_bags)")
    dim = int(json.loads(summary.read_text())["dim"])
    register_external_encoder(encoder)
    fixed = {"run": str(run), "encoder": encoder, "encoder_options": {"dim": dim}, "mode": "features"}
    if preset:
        return SlideTrainSettings.preset(preset, **{**values, **fixed})
    return SlideTrainSettings.build(**{**values, **fixed})


# ----------------------------------------------------------------------------------------------------------
# heatmaps without the slide file
class _Canvas:
    """A blank stand-in for a slide (``dimensions``, ``thumbnail``) when only the coordinates are known."""

    def __init__(self, width: int, height: int) -> None:
        self.dimensions = (int(width), int(height))

    def thumbnail(self, max_size: int) -> np.ndarray:
        w, h = self.dimensions
        scale = max_size / max(w, h)
        return np.full((max(1, round(h * scale)), max(1, round(w * scale)), 3), 245, np.uint8)


def bag_heatmap(run: str | Path, stem: str, out_png: str | Path | None = None, settings: Any = None) -> Path:
    """The attention heatmap of an imported slide from its coordinates: drawn over the slide when the tiles
    file names a readable slide (as ``oncofm heatmap`` does), else over a blank canvas of the slide's size."""
    import pandas as pd

    from oncofm.pathology.artifacts import SlideArtifacts
    from oncofm.pathology.heatmap import draw_heatmap
    from oncofm.pathology.tiling import load_grid
    from oncofm.paths import RunLayout

    layout = RunLayout(run)
    arts = SlideArtifacts.of(run)
    att = pd.read_parquet(layout.require(arts.attention(stem), "Train the slide model first (train_slide_model)."))
    grid = load_grid(layout.tiles_dir / f"{stem}.h5")
    out_png = Path(out_png) if out_png else arts.dir / "heatmaps" / f"{stem}_heatmap.png"
    coords, scores = att[["x", "y"]].to_numpy(), att["attention"].to_numpy()
    size = float(grid.attrs["level0_size"])
    slide_path = str(grid.attrs.get("slide_path", ""))
    if slide_path and Path(slide_path).is_file():
        with grid.open() as slide:
            return draw_heatmap(slide, coords, scores, size, out_png, settings, title=stem)
    canvas = _Canvas(int(grid.attrs["width"]), int(grid.attrs["height"]))
    return draw_heatmap(canvas, coords, scores, size, out_png, settings, title=f"{stem} (no slide file: positions only)")
