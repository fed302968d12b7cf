"""The slide model's one inference path: the training stage's exports and ``oncofm explain``.

:class:`SlidePredictor` owns every step from a slide file to the slide model's output:

1. :meth:`~SlidePredictor.tile` opens the slide (mpp from the file or the user), finds tissue and lays
   the patch grid with the run's tiling settings (``tiles/<stem>.h5``; a cohort slide already tiled with
   the same settings is reused);
2. :meth:`~SlidePredictor.predict_tiles` encodes every patch with the model's own encoder and runs the
   attention-MIL aggregator and head over all of them (:meth:`~SlidePredictor.predict_features`);
3. :func:`patch_summary` reads the most attended patches and a seeded sample of the slide's patches and
   measures their morphometrics, the image findings of the evidence record.

``oncofm train slide`` exports its predictions, embeddings and attention through
:meth:`~SlidePredictor.predict_features` and the reasoning stage measures its image findings through
:func:`patch_summary`, so a new patient's slide goes through exactly the code that was trained and
tested (a contract test checks that ``predict`` reproduces the stored outputs).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from oncofm.cohort.patient import PatientInput
from oncofm.errors import OncoFMError
from oncofm.io import model_version
from oncofm.pathology.artifacts import SlideArtifacts
from oncofm.pathology.slide_model import SlideResult, predict_slides
from oncofm.paths import RunLayout

log = logging.getLogger(__name__)

__all__ = ["PatchFinding", "PatchSummary", "SlidePredictor", "SlideResult", "TiledSlide", "patch_summary",
           "stored_patch_summary", "stored_slide_results", "tile_patient_slide",
           "read_tiles", "tiling_geometry"]

TRAIN_HINT = "Run `oncofm train slide --run RUN` first."


@dataclass
class TiledSlide:
    """A slide's patch grid (``tiles/<stem>.h5``) with the slide's geometry and a thumbnail."""

    path: Path
    h5: Path
    coords: np.ndarray  # (N, 2) level-0 x, y
    patch_side_level0: float  # patch side in level-0 pixels
    level0_size: tuple[int, int]  # (width, height)
    read_level: int
    read_size: int
    mpp: float  # level 0
    read_mpp: float  # of the patches as read (level read_level)
    thumbnail: np.ndarray | None  # (h, w, 3) uint8; None when not asked for


@dataclass
class PatchFinding:
    rank: int
    x: int
    y: int
    attention: float
    image: np.ndarray  # (S, S, 3) uint8
    morphometrics: dict[str, float]
    cells: dict[str, int] | None = None  # the cell model's counts per class in this patch (None: no cell model)


@dataclass
class PatchSummary:
    patches: list[PatchFinding]  # the most attended, rank order
    slide_mean: dict[str, float]  # morphometrics averaged over a seeded sample of the slide's patches
    #: the cell model's measures of the top patches against the sampled slide patches (``compare_findings``:
    #: key -> {key, description, unit, top, slide, ratio}); None without a cell model
    cells: dict[str, dict] | None = None


def load_cell_model(layout: RunLayout) -> Any:
    """The run's cell-type model (``RUN/models/cells``, trained with ``oncofm cells train --out RUN/models/cells``),
    or None when the run has none."""
    from oncofm.pathology.cells.model import CONFIG, CellModel

    folder = layout.model_dir("cells")
    return CellModel.load(folder) if (folder / CONFIG).exists() else None


def read_tiles(h5: str | Path, slide_path: str | Path | None = None, *, mpp: float | None = None,
               thumbnail: np.ndarray | None = None) -> TiledSlide:
    """A :class:`TiledSlide` from a tiles HDF5 file (docs/CONTRACTS.md, tiles); slide and mpp from its
    attributes unless given."""
    import h5py

    with h5py.File(h5, "r") as f:
        coords = np.asarray(f["coords"], dtype=np.int64)  # (N, 2)
        a = dict(f.attrs)
    slide_path = Path(slide_path) if slide_path is not None else Path(str(a["slide_path"]))
    if len(coords) == 0:
        raise OncoFMError(f"no tissue found in {slide_path.name}: the slide has no patch with enough tissue. "
                          "Give an H&E slide with tissue.")
    mpp = float(a["slide_mpp"]) if mpp is None else float(mpp)
    return TiledSlide(path=slide_path, h5=Path(h5), coords=coords, patch_side_level0=float(a["level0_size"]),
                      level0_size=(int(a["width"]), int(a["height"])), read_level=int(a["read_level"]),
                      read_size=int(a["read_size"]), mpp=mpp, read_mpp=mpp * float(a.get("downsample", 1.0)),
                      thumbnail=thumbnail)


def tiling_geometry(layout: RunLayout) -> dict[str, float]:
    """The run's tiling settings that a new slide must be tiled with (``settings/tiles.yaml``; else the
    tiler's defaults)."""
    import yaml

    from oncofm.pathology.tiling import TilingSettings

    defaults = TilingSettings.model_fields
    saved: dict[str, Any] = {}
    path = layout.settings_file("tiles")
    if path.exists():
        saved = yaml.safe_load(path.read_text()) or {}
    keys = ("target_mpp", "patch_size", "min_tissue")
    return {k: saved.get(k, defaults[k].default) for k in keys}


def patch_summary(tiled: TiledSlide, attention: np.ndarray, *, top_k: int = 8, sample: int = 32, seed: int = 0,
                  cell_model: Any = None, cell_top: int | None = None) -> PatchSummary:
    """The ``top_k`` most attended patches (pixels at the read level, morphometrics) and the slide's mean
    morphometrics over a seeded random sample of ``sample`` patches (the reference for "more than average").
    With a ``cell_model`` (:func:`load_cell_model`), the cells of each top patch are counted and the cell
    measures of the first ``cell_top`` (default all) top patches are compared with the sampled patches'.

    Ties in attention keep grid order (a stable sort), so training and inference pick the same patches.
    """
    from oncofm.pathology.morphometrics import patch_morphometrics
    from oncofm.pathology.reader import open_slide

    attention = np.asarray(attention, dtype=np.float64).ravel()
    if len(attention) != len(tiled.coords):
        raise OncoFMError(f"{len(attention)} attention values for {len(tiled.coords)} patches of "
                          f"{tiled.path.name}: the slide model's output does not match the tiles")
    order = np.argsort(-attention, kind="stable")[:top_k]
    rng = np.random.default_rng(seed)
    ref_idx = rng.choice(len(tiled.coords), size=min(sample, len(tiled.coords)), replace=False)
    size = (tiled.read_size, tiled.read_size)
    with open_slide(tiled.path, mpp=tiled.mpp) as handle:
        def read(i: int) -> np.ndarray:
            x, y = (int(v) for v in tiled.coords[i])
            return np.asarray(handle.read_region((x, y), tiled.read_level, size))[..., :3]

        patches = []
        for rank, i in enumerate(order, start=1):
            rgb = read(int(i))
            m = {key: float(v) for key, v in patch_morphometrics(rgb, mpp=tiled.read_mpp).items()}
            patches.append(PatchFinding(rank=rank, x=int(tiled.coords[i][0]), y=int(tiled.coords[i][1]),
                                        attention=float(attention[i]), image=rgb, morphometrics=m))
        ref_images = [read(int(i)) for i in ref_idx]
        ref = pd.DataFrame([patch_morphometrics(im, mpp=tiled.read_mpp) for im in ref_images])
    summary = PatchSummary(patches=patches, slide_mean={c: float(ref[c].mean()) for c in ref.columns})
    if cell_model is not None and patches:
        from oncofm.pathology.cells.findings import cell_findings, compare_findings

        top = cell_findings(cell_model, [p.image for p in patches], tiled.read_mpp)
        for p, f in zip(patches, top, strict=True):
            p.cells = dict(f.counts)
        slide = cell_findings(cell_model, ref_images, tiled.read_mpp)
        n = len(patches) if cell_top is None else max(1, min(cell_top, len(patches)))
        summary.cells = {k: m.to_dict() for k, m in compare_findings(top[:n], slide).items()}
    return summary


class SlidePredictor:
    """A trained slide model (encoder + attention MIL + head) and the tiling it expects."""

    def __init__(self, model: Any, settings: Any, *, geometry: dict[str, float] | None = None,
                 version: str = "unsaved") -> None:
        self.model = model  # SlideClassifier with its encoder, eval mode
        self.settings = settings  # SlideTrainSettings
        self.geometry = geometry or {"target_mpp": 0.5, "patch_size": 224, "min_tissue": 0.5}
        self.version = version

    @classmethod
    def from_run(cls, layout: RunLayout) -> SlidePredictor | None:
        """The run's trained slide model, or ``None`` when the run has none (the caller notes it)."""
        if not SlideArtifacts.of(layout.root).weights.exists():
            return None
        return cls.load(layout.root)

    @classmethod
    def load(cls, run: str | Path) -> SlidePredictor:
        from oncofm.pathology.slide_train import load_slide_model

        layout, arts = RunLayout(run), SlideArtifacts.of(run)
        layout.require(arts.weights, TRAIN_HINT)
        model, settings = load_slide_model(run)
        return cls(model, settings, geometry=tiling_geometry(layout), version=model_version(arts.dir))

    # ------------------------------------------------------------------ the model
    def predict_features(self, bags: Sequence[np.ndarray]) -> list[SlideResult]:
        """The aggregator and head over every patch of each bag of features ((N_i, D) arrays)."""
        return predict_slides(self.model, bags, version=self.version)

    def encode(self, tiles_h5: Path, out_h5: Path, *, redo: bool = False, encoder_name: str | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Features (N, D) and coords (N, 2) of every patch of a tiled slide, with the model's encoder."""
        from oncofm.pathology.slide_model import extract_features, load_patch_features

        if self.model.encoder is None:
            raise OncoFMError("this slide model was saved without its encoder; retrain with `oncofm train slide --redo`")
        h5 = extract_features(self.model.encoder, tiles_h5, out_h5, batch_size=self.settings.feature_batch,
                              slide_mpp=self.settings.slide_mpp, redo=redo,
                              encoder_name=encoder_name or self.settings.encoder)
        return load_patch_features(h5)

    def predict_tiles(self, tiled: TiledSlide) -> SlideResult:
        """Encode every patch of ``tiled`` (features in a temporary file, never in the run) and predict."""
        with tempfile.TemporaryDirectory(prefix="oncofm-slide-") as tmp:
            feats, coords = self.encode(tiled.h5, Path(tmp) / "features.h5", redo=True)
        if not np.array_equal(coords, tiled.coords):
            raise OncoFMError("the slide model's features do not line up with the slide's patches")
        return self.predict_features([feats])[0]

    # ------------------------------------------------------------------ a slide file
    def tile(self, patient: PatientInput, layout: RunLayout, workdir: Path, *, thumb_size: int = 1024) -> TiledSlide:
        """Open the patient's slide and lay the patch grid with the run's tiling settings.

        A cohort patient's slide already tiled in the run with the same settings is reused. Raises
        OncoFMError for an unreadable slide, a slide without mpp (and no ``--mpp``) and one without tissue.
        """
        return tile_patient_slide(patient, layout, workdir, geometry=self.geometry, thumb_size=thumb_size)

    def predict(self, patient: PatientInput, workdir: Path, layout: RunLayout | None = None
                ) -> tuple[TiledSlide, SlideResult] | None:
        """Tile and predict the patient's slide; ``None`` when the patient has no slide."""
        if patient.slide is None:
            return None
        tiled = self.tile(patient, layout or RunLayout(workdir), workdir)
        return tiled, self.predict_tiles(tiled)


def tile_patient_slide(patient: PatientInput, layout: RunLayout, workdir: Path, *,
                       geometry: dict[str, float] | None = None, thumb_size: int = 1024) -> TiledSlide:
    """The patient's slide tiled with ``geometry`` (default: the run's tiling settings), with a thumbnail."""
    from oncofm.pathology.reader import MPP_FLAG, open_slide
    from oncofm.pathology.tiling import EmptySlideError, TilingSettings, tile_slide

    if patient.slide is None:
        raise OncoFMError("the patient has no slide to tile")
    geometry = geometry or tiling_geometry(layout)
    try:
        with open_slide(patient.slide, mpp=patient.mpp) as slide:
            thumbnail = np.asarray(slide.thumbnail(thumb_size))[..., :3]
            mpp = float(slide.mpp)
        h5 = _existing_tiles(patient, layout, geometry)
        if h5 is None:
            settings = TilingSettings(source=str(patient.slide), out=str(workdir / "tiles"),
                                      target_mpp=float(geometry["target_mpp"]), patch_size=int(geometry["patch_size"]),
                                      min_tissue=float(geometry["min_tissue"]), slide_mpp=patient.mpp, qc=False)
            h5 = Path(tile_slide(patient.slide, settings).paths["h5"])
    except EmptySlideError as exc:
        raise OncoFMError(f"no tissue found in {patient.slide.name}: {exc}. Give an H&E slide with tissue.") from None
    except OncoFMError as exc:
        raise OncoFMError(str(exc).replace(MPP_FLAG, "--mpp")) from None
    return read_tiles(h5, patient.slide, mpp=mpp, thumbnail=thumbnail)


def _existing_tiles(patient: PatientInput, layout: RunLayout, geometry: dict[str, float]) -> Path | None:
    """The run's own tiles of this slide, when they were made with the same target mpp and patch size."""
    import h5py

    from oncofm.pathology.reader import slide_stem

    if patient.source != "cohort" or patient.slide is None:
        return None
    h5 = layout.tiles_dir / f"{slide_stem(patient.slide)}.h5"
    if not h5.exists():
        return None
    with h5py.File(h5, "r") as f:
        same = (abs(float(f.attrs["target_mpp"]) - float(geometry["target_mpp"])) < 1e-9
                and int(f.attrs["patch_size"]) == int(geometry["patch_size"])
                and Path(str(f.attrs["slide_path"])).resolve() == patient.slide.resolve())
    return h5 if same else None


def stored_slide_results(layout: RunLayout) -> dict[str, tuple[SlideResult, str]]:
    """The slide stage's stored exports (made by :meth:`SlidePredictor.predict_features`) as one
    ``(SlideResult, slide stem)`` per patient.

    A patient with several slides gets the mean of their probabilities, the patient's stored embedding
    (the mean of the slide embeddings) and the attention of the first slide (whose stem is returned, for
    its image findings). A slide whose attention file is missing gives no result.
    """
    from oncofm.pathology.reader import slide_stem

    arts = SlideArtifacts.of(layout.root)
    if not arts.predictions.exists():
        return {}
    preds = pd.read_parquet(arts.predictions)
    emb = pd.read_parquet(arts.embeddings) if arts.embeddings.exists() else None
    if emb is not None and "patient_id" in emb.columns:
        emb = emb.set_index("patient_id")
    version = model_version(arts.dir)
    results: dict[str, tuple[SlideResult, str]] = {}
    for pid, rows in preds.groupby("patient_id", sort=False):
        stem = slide_stem(str(rows["slide_id"].iloc[0])) if "slide_id" in rows else str(pid)
        att_file = arts.attention(stem)
        attention = (pd.read_parquet(att_file)["attention"].to_numpy(np.float64) if att_file.exists()
                     else np.zeros(0))
        embedding = (emb.loc[str(pid)].to_numpy(np.float32) if emb is not None and str(pid) in emb.index
                     else np.zeros(0, np.float32))
        results[str(pid)] = (SlideResult(prob=float(rows["prob"].mean()), logit=float("nan"), embedding=embedding,
                                         attention=attention, version=version), stem)
    return results


def stored_patch_summary(layout: RunLayout, stem: str, attention: np.ndarray, *, top_k: int, sample: int,
                         seed: int, cell_model: Any = None) -> PatchSummary | None:
    """:func:`patch_summary` of a slide tiled in the run (``tiles/<stem>.h5``); ``None`` (logged) when its
    tiles or the slide file are not there."""
    h5 = layout.tiles_dir / f"{stem}.h5"
    if not h5.exists() or len(attention) == 0:
        return None
    try:
        return patch_summary(read_tiles(h5), attention, top_k=top_k, sample=sample, seed=seed,
                             cell_model=cell_model)
    except (OncoFMError, OSError) as exc:
        log.info("no morphometrics for %s: %s", stem, exc)
        return None
