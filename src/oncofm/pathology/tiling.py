"""Patch grids at a target magnification, written per slide as ``<slide>.h5`` (see docs/CONTRACTS.md).

One slide (:func:`tile_slide`):

1. open it (:func:`~oncofm.pathology.reader.open_slide`) and work out the patch side at level 0
   (``patch_size * target_mpp / slide_mpp``) and the **read level**: the coarsest pyramid level whose mpp is
   ≤ the target (1 % tolerance), so a patch is read as ``read_size`` pixels there and resized to
   ``patch_size`` — never from level 0 when a lower level will do;
2. detect tissue and ink on a low-resolution image (:mod:`oncofm.pathology.tissue`);
3. lay a non-overlapping grid over the slide, measure each cell's tissue and ink fraction from the masks
   (summed-area tables, so any grid size costs the same), keep cells with tissue ≥ ``min_tissue`` and no
   ink (tissue that ink encloses counts as tissue); count why every other cell was dropped
   (:func:`grid_patches_explained`: the ``grid_summary`` attribute, and the line ``oncofm tile`` prints);
4. write ``<slide>.h5`` and ``<slide>_qc.png`` atomically.

A folder (:func:`tile_slides`): N spawn-safe worker processes; finished slides are skipped; each slide is
guarded by a lock file created with ``O_CREAT | O_EXCL`` (stale locks — dead process on this host, or older
than ``stale_lock_hours`` — are broken), so several workers or machines can share one output folder; a slide
that fails is written to ``failures.csv`` (``slide, reason``) and the batch goes on.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import json
import logging
import os
import socket
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from oncofm.config import StageSettings, StageStamp, artifact_version, check_stamp
from oncofm.errors import OncoFMError
from oncofm.io import atomic_path, open_h5
from oncofm.pathology.qc import write_qc_png
from oncofm.pathology.reader import SlideReader, find_slides, open_slide, slide_stem
from oncofm.pathology.tissue import TissueMask, TissueSettings, detect_tissue

log = logging.getLogger(__name__)

FAILURES_FILE = "failures.csv"
LOCK_SUFFIX = ".lock"
#: Largest allowed upsampling (slide mpp / target mpp) before the target is refused as too fine.
MAX_UPSAMPLE = 1.1


class EmptySlideError(OncoFMError):
    """The slide has no patch with enough tissue."""


class TilingSettings(StageSettings):
    """Settings of ``oncofm tile``."""

    stage = "tiles"

    source: str = Field(..., description="A slide file or a folder of slides.")
    out: str = Field(..., description="Output folder for <slide>.h5, <slide>_qc.png, failures.csv.")
    target_mpp: float = Field(0.5, gt=0, description="Patch resolution in µm/px (0.5 ≈ 20x, 0.25 ≈ 40x).")
    patch_size: int = Field(224, ge=8, le=8192, description="Patch side in pixels after resizing.")
    min_tissue: float = Field(0.5, ge=0, le=1, description="Keep patches with at least this tissue fraction.")
    max_ink: float = Field(0.0, ge=0, le=1, description="Drop patches with more than this ink fraction.")
    slide_mpp: float | None = Field(None, gt=0, description="Level-0 µm/px for slides without metadata.")
    workers: int = Field(1, ge=1, le=256)
    redo: bool = False
    qc: bool = Field(True, description="Write <slide>_qc.png.")
    qc_size: int = Field(1024, ge=64)
    stale_lock_hours: float = Field(6.0, gt=0)
    tissue: TissueSettings = Field(default_factory=TissueSettings)


@dataclass
class GridPlan:
    """Where and how a slide's patches are read."""

    level0_size: int  # patch side at level 0 (px)
    read_level: int
    read_size: int  # patch side at read_level (px)
    downsample: float  # of read_level
    cols: int
    rows: int


@dataclass
class TilingResult:
    """Outcome of one slide in a batch."""

    slide: str
    status: str  # done | skipped | busy | failed
    n_patches: int = 0
    reason: str = ""
    seconds: float = 0.0
    worker: str = ""
    paths: dict[str, str] = field(default_factory=dict)
    summary: dict[str, int] = field(default_factory=dict)  # grid_patches_explained's counts (done/skipped)


# ----------------------------------------------------------------------------------------------------------
# geometry
def plan_grid(slide: SlideReader, target_mpp: float, patch_size: int) -> GridPlan:
    """Level-0 patch side, read level and read size for ``patch_size`` pixels at ``target_mpp``."""
    target_ds = target_mpp / slide.mpp
    if target_ds < 1 / MAX_UPSAMPLE:
        raise OncoFMError(f"{slide.path.name} is scanned at {slide.mpp:.4g} µm/px, coarser than the target "
                          f"{target_mpp} µm/px; pass a larger --mpp (at least {slide.mpp:.3g})")
    level0_size = int(round(patch_size * target_ds))
    if level0_size < 1:
        raise OncoFMError(f"patch of {patch_size} px at {target_mpp} µm/px is below one level-0 pixel")
    read_level = slide.best_level_for_downsample(target_ds)
    ds = slide.level_downsamples[read_level]
    read_size = max(1, int(round(level0_size / ds)))
    width, height = slide.dimensions
    return GridPlan(level0_size=level0_size, read_level=read_level, read_size=read_size, downsample=ds,
                    cols=width // level0_size, rows=height // level0_size)


def _box_fractions(mask: np.ndarray, x0: np.ndarray, y0: np.ndarray, side: float) -> np.ndarray:
    """Mean of ``mask`` over boxes [x0, x0+side) × [y0, y0+side) in mask pixels (summed-area table)."""
    h, w = mask.shape
    dtype = np.int32 if mask.size < 2**31 else np.int64
    sat = np.zeros((h + 1, w + 1), dtype)
    np.cumsum(np.cumsum(mask, axis=0, dtype=dtype), axis=1, out=sat[1:, 1:])
    xa = np.clip(np.round(x0).astype(np.int64), 0, w)
    ya = np.clip(np.round(y0).astype(np.int64), 0, h)
    xb = np.clip(np.round(x0 + side).astype(np.int64), 0, w)
    yb = np.clip(np.round(y0 + side).astype(np.int64), 0, h)
    xb, yb = np.maximum(xb, np.minimum(xa + 1, w)), np.maximum(yb, np.minimum(ya + 1, h))
    total = sat[yb, xb].astype(np.int64) - sat[ya, xb] - sat[yb, xa] + sat[ya, xa]
    area = np.maximum((xb - xa) * (yb - ya), 1)
    return (total / area).astype(np.float32)


def grid_patches(plan: GridPlan, masks: TissueMask, min_tissue: float, max_ink: float = 0.0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (N, 2) int64 level-0 (x, y) and tissue fractions (N,) float32 of the kept grid cells."""
    coords, fractions, _ = grid_patches_explained(plan, masks, min_tissue, max_ink)
    return coords, fractions


def grid_patches_explained(plan: GridPlan, masks: TissueMask, min_tissue: float, max_ink: float = 0.0
                           ) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """:func:`grid_patches` and why each cell was kept or dropped: ``{"grid_cells", "kept", "no_tissue",
    "low_tissue", "ink", "kept_inside_ink"}`` (``ink``: enough tissue but more than ``max_ink`` ink;
    ``kept_inside_ink``: kept cells whose centre lies in an area that ink marks enclose, e.g. a circled tumour)."""
    n_cells = plan.cols * plan.rows
    summary = {"grid_cells": n_cells, "kept": 0, "no_tissue": 0, "low_tissue": 0, "ink": 0, "kept_inside_ink": 0}
    if plan.cols == 0 or plan.rows == 0:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32), summary
    gy, gx = np.mgrid[0:plan.rows, 0:plan.cols]
    xs = (gx.ravel() * plan.level0_size).astype(np.int64)
    ys = (gy.ravel() * plan.level0_size).astype(np.int64)
    side = plan.level0_size / masks.downsample
    tissue = _box_fractions(masks.tissue, xs / masks.downsample, ys / masks.downsample, side)
    enough = tissue >= max(min_tissue, 1e-6)
    keep = enough.copy()
    if masks.ink.any():
        ink = _box_fractions(masks.ink, xs / masks.downsample, ys / masks.downsample, side)
        keep &= ink <= max_ink
    coords = np.stack([xs[keep], ys[keep]], axis=1)
    summary.update(kept=int(keep.sum()), no_tissue=int((tissue < 1e-6).sum()),
                   low_tissue=int(((tissue >= 1e-6) & ~enough).sum()), ink=int((enough & ~keep).sum()))
    if masks.enclosed is not None and masks.enclosed.any() and len(coords):
        h, w = masks.enclosed.shape
        cx = np.clip(((coords[:, 0] + plan.level0_size / 2) / masks.downsample).astype(np.int64), 0, w - 1)
        cy = np.clip(((coords[:, 1] + plan.level0_size / 2) / masks.downsample).astype(np.int64), 0, h - 1)
        summary["kept_inside_ink"] = int(masks.enclosed[cy, cx].sum())
    return coords, tissue[keep], summary


def describe_grid(summary: dict[str, Any]) -> str:
    """One line: what a slide's grid kept and why the rest was dropped."""
    if not summary:
        return ""
    dropped = [f"{summary[k]} {label}" for k, label in (("no_tissue", "without tissue"),
               ("low_tissue", "with too little tissue"), ("ink", "with pen/ink")) if summary.get(k)]
    text = f"{summary.get('kept', 0)} of {summary.get('grid_cells', 0)} grid cells kept"
    if summary.get("kept_inside_ink"):
        text += f" ({summary['kept_inside_ink']} inside ink marks)"
    return text + (f"; dropped {', '.join(dropped)}" if dropped else "")


def read_patch(slide: SlideReader, x: int, y: int, read_level: int, read_size: int, patch_size: int
               ) -> np.ndarray:
    """One patch (patch_size, patch_size, 3) uint8 at level-0 (x, y), read at ``read_level`` and resized."""
    from PIL import Image

    region = slide.read_region((int(x), int(y)), read_level, (read_size, read_size))
    if read_size != patch_size:
        region = np.asarray(Image.fromarray(region).resize((patch_size, patch_size), Image.BILINEAR))
    return region


# ----------------------------------------------------------------------------------------------------------
# one slide
def tile_slide(path: str | Path, settings: TilingSettings) -> TilingResult:
    """Tile one slide into ``settings.out`` (no locking; see :func:`tile_slides`). Raises on failure."""
    import h5py

    t0 = time.perf_counter()
    path = Path(path)
    out = Path(settings.out)
    stem = slide_stem(path)
    with open_slide(path, mpp=settings.slide_mpp) as slide:
        plan = plan_grid(slide, settings.target_mpp, settings.patch_size)
        # At least 8 mask pixels across a patch, so tissue fractions are measured, not guessed.
        masks = detect_tissue(slide, settings.tissue, max_downsample=plan.level0_size / 8)
        coords, fractions, summary = grid_patches_explained(plan, masks, settings.min_tissue, settings.max_ink)
        if len(coords) == 0:
            raise EmptySlideError(f"no patch with ≥{settings.min_tissue:.0%} tissue and no ink (tissue covers "
                                  f"{masks.fraction:.1%} of the slide; {describe_grid(summary)})")
        attrs: dict[str, Any] = {
            "slide_path": str(path.resolve()), "read_level": plan.read_level, "read_size": plan.read_size,
            "patch_size": settings.patch_size, "target_mpp": settings.target_mpp, "slide_mpp": slide.mpp,
            "level0_size": plan.level0_size, "downsample": plan.downsample,
            "width": slide.dimensions[0], "height": slide.dimensions[1], "vendor": slide.vendor,
            "backend": slide.backend, "level_count": slide.level_count,
            "level_downsamples": np.asarray(slide.level_downsamples, np.float64),
            "mpp_source": "metadata" if slide.metadata_mpp is not None and abs(slide.metadata_mpp - slide.mpp)
            < 1e-9 else "user",
            "grid_cols": plan.cols, "grid_rows": plan.rows, "min_tissue": settings.min_tissue,
            "mask_downsample": masks.downsample, "slide_tissue_fraction": masks.fraction,
            "tissue_settings": json.dumps(settings.tissue.model_dump()),
            "grid_summary": json.dumps(summary), "ink_fraction": float(masks.ink.mean()),
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), "worker": _worker_id(),
        }
        stamp = StageStamp.of(settings, GRID_IGNORE, _slide_inputs(path))
        attrs.update({"settings_hash": stamp.settings_hash, "stage_stamp": json.dumps(stamp.to_dict())})
        h5_path = out / f"{stem}.h5"
        with atomic_path(h5_path, suffix=".h5.tmp") as tmp, h5py.File(tmp, "w") as f:
            f.create_dataset("coords", data=coords.astype(np.int64))
            f.create_dataset("tissue_fraction", data=fractions.astype(np.float32))
            for key, value in attrs.items():
                f.attrs[key] = value
        paths = {"h5": str(h5_path)}
        if settings.qc:
            paths["qc"] = str(write_qc_png(slide, masks, coords, plan, out / f"{stem}_qc.png", settings.qc_size))
    return TilingResult(slide=str(path), status="done", n_patches=int(len(coords)),
                       seconds=time.perf_counter() - t0, worker=_worker_id(), paths=paths, summary=summary)


# ----------------------------------------------------------------------------------------------------------
# locks and failures
def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire_lock(lock: Path, stale_after_s: float) -> bool:
    """Create ``lock`` exclusively (O_CREAT|O_EXCL). Breaks it first when stale. True when we hold it."""
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if _lock_is_stale(lock, stale_after_s):
                log.warning("breaking stale lock %s", lock)
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()
                continue
            return False
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}))
        return True
    return False


def _lock_is_stale(lock: Path, stale_after_s: float) -> bool:
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return True
    if age > stale_after_s:
        return True
    try:
        info = json.loads(lock.read_text() or "{}")
    except (OSError, ValueError):
        return False
    return info.get("host") == socket.gethostname() and not _pid_alive(int(info.get("pid", -1)))


def release_lock(lock: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        lock.unlink()


def record_outcomes(out: Path, results: list[TilingResult], stale_after_s: float = 60.0) -> Path:
    """Update ``failures.csv``: add this batch's failures, drop slides that now succeeded (under a lock)."""
    target = out / FAILURES_FILE
    lock = out / (FAILURES_FILE + LOCK_SUFFIX)
    deadline = time.time() + 60
    while not acquire_lock(lock, stale_after_s):
        if time.time() > deadline:
            raise OncoFMError(f"could not lock {lock} for 60 s; delete it if no tiling job is running")
        time.sleep(0.05)
    try:
        rows: dict[str, str] = {}
        if target.exists():
            with open(target, newline="") as fh:
                rows = {r["slide"]: r["reason"] for r in csv.DictReader(fh)}
        for r in results:
            if r.status == "failed":
                rows[r.slide] = r.reason
            elif r.status == "done":
                rows.pop(r.slide, None)
        if rows or target.exists():
            with atomic_path(target, suffix=".csv") as tmp, open(tmp, "w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(["slide", "reason"])
                writer.writerows(sorted(rows.items()))
    finally:
        release_lock(lock)
    return target


# ----------------------------------------------------------------------------------------------------------
# stamps: an existing .h5 is reused only when it was tiled with the same settings from the same slide
#: Tiling settings that do not change a slide's grid (left out of the comparison with its stamp).
GRID_IGNORE: tuple[str, ...] = ("source", "out", "workers", "redo", "qc", "qc_size", "stale_lock_hours")


def _slide_inputs(path: str | Path) -> dict[str, str]:
    # name and size only: a slide copied elsewhere (new mtime) is the same slide
    return {"slide": artifact_version(path, mtime=False)}


def read_slide_stamp(h5_path: str | Path) -> StageStamp | None:
    """The stamp (``stage_stamp`` attribute) of a tiles ``.h5``; ``None`` for one written before stamps."""
    import h5py

    try:
        with h5py.File(h5_path, "r") as f:
            raw = f.attrs.get("stage_stamp")
    except OSError:
        return None
    if raw is None:
        return None
    return StageStamp.from_dict(json.loads(raw.decode() if isinstance(raw, bytes) else str(raw)))


def tiles_up_to_date(path: str | Path, h5_path: str | Path, settings: TilingSettings) -> bool:
    """True when ``h5_path`` holds the grid these settings would make of slide ``path``; False under
    ``settings.redo``. Raises :class:`OncoFMError` naming each changed setting (and ``--redo``) otherwise."""
    return check_stamp(settings, read_slide_stamp(h5_path), f"tiles {h5_path}", ignore=GRID_IGNORE,
                       inputs=_slide_inputs(path), on_change="stop")


def _existing(path: str, h5: Path, settings: TilingSettings) -> TilingResult:
    """An existing .h5: skipped when up to date, else failed naming the changes (:func:`tile_slides` stops
    before this; it catches another job writing the folder with other settings meanwhile)."""
    try:
        tiles_up_to_date(path, h5, settings)
    except OncoFMError as exc:
        return TilingResult(slide=path, status="failed", reason=str(exc).replace("\n", " "), worker=_worker_id())
    summary: dict[str, int] = {}
    n = 0
    with contextlib.suppress(OncoFMError, KeyError, ValueError), open_h5(h5) as f:
        n = int(len(f["coords"]))
        raw = f.attrs.get("grid_summary")
        summary = json.loads(raw.decode() if isinstance(raw, bytes) else str(raw)) if raw is not None else {}
    return TilingResult(slide=path, status="skipped", worker=_worker_id(), n_patches=n, summary=summary)



# ----------------------------------------------------------------------------------------------------------
# batch
def _process_one(path: str, settings_json: str) -> TilingResult:
    """Worker entry point (top level, so it pickles under ``spawn``): lock, tile, unlock; never raises."""
    settings = TilingSettings.model_validate_json(settings_json)
    out = Path(settings.out)
    stem = slide_stem(path)
    h5 = out / f"{stem}.h5"
    if h5.exists() and not settings.redo:
        return _existing(path, h5, settings)
    lock = out / f"{stem}.h5{LOCK_SUFFIX}"
    if not acquire_lock(lock, settings.stale_lock_hours * 3600):
        return TilingResult(slide=path, status="busy", reason="locked by another worker", worker=_worker_id())
    try:
        if h5.exists() and not settings.redo:  # finished by someone else between our check and our lock
            return _existing(path, h5, settings)
        return tile_slide(path, settings)
    except Exception as exc:  # one bad slide must not stop the batch; the reason goes to failures.csv
        reason = str(exc) if isinstance(exc, OncoFMError) else \
            f"reading failed ({type(exc).__name__}: {exc}); the file may be corrupt or truncated"
        log.debug("slide %s failed", path, exc_info=True)
        return TilingResult(slide=path, status="failed", reason=reason.replace("\n", " "), worker=_worker_id())
    finally:
        release_lock(lock)


def tile_slides(settings: TilingSettings, progress: bool = True) -> list[TilingResult]:
    """Tile a slide or every slide in a folder (see module docstring). Returns one result per slide."""
    from oncofm.logging_utils import make_progress

    slides = find_slides(settings.source)
    out = Path(settings.out)
    for path in slides:  # stop before any work (and before the saved settings change) on tiles made otherwise
        h5 = out / f"{slide_stem(path)}.h5"
        if not settings.redo and h5.exists():
            tiles_up_to_date(path, h5, settings)
    out.mkdir(parents=True, exist_ok=True)
    settings.save(out / "tiles_settings.yaml")
    if out.name == "tiles":  # RUN/tiles: also where every stage keeps its settings
        from oncofm.paths import RunLayout

        settings.save(RunLayout(out.parent).settings_file(settings.stage))
    payload = settings.model_dump_json()
    results: list[TilingResult] = []
    with make_progress() as bar:
        task = bar.add_task("tiling", total=len(slides), visible=progress)
        if settings.workers == 1 or len(slides) == 1:
            for path in slides:
                results.append(_process_one(str(path), payload))
                bar.advance(task)
        else:
            import multiprocessing as mp

            ctx = mp.get_context("spawn")
            with ProcessPoolExecutor(max_workers=min(settings.workers, len(slides)), mp_context=ctx) as pool:
                futures = [pool.submit(_process_one, str(p), payload) for p in slides]
                for fut in as_completed(futures):
                    results.append(fut.result())
                    bar.advance(task)
    record_outcomes(out, results)
    counts = {s: sum(r.status == s for r in results) for s in ("done", "skipped", "busy", "failed")}
    log.info("tiling: %s (%d patches) -> %s", ", ".join(f"{v} {k}" for k, v in counts.items() if v),
             sum(r.n_patches for r in results), out)
    for r in results:
        if r.status == "failed":
            log.warning("failed: %s — %s", Path(r.slide).name, r.reason)
    return results


# ----------------------------------------------------------------------------------------------------------
# reading a grid back
@dataclass
class PatchGrid:
    """A tiles ``.h5`` loaded: coordinates, tissue fractions and the attributes of the contract."""

    path: Path
    coords: np.ndarray  # (N, 2) int64 level-0 (x, y)
    tissue_fraction: np.ndarray  # (N,) float32
    attrs: dict[str, Any]

    def __len__(self) -> int:
        return len(self.coords)

    @property
    def slide_path(self) -> Path:
        return Path(str(self.attrs["slide_path"]))

    def open(self, mpp: float | None = None) -> SlideReader:
        """Open the slide with the mpp recorded at tiling time."""
        return open_slide(self.slide_path, mpp=mpp if mpp is not None else float(self.attrs["slide_mpp"]))

    def read(self, slide: SlideReader, index: int) -> np.ndarray:
        """Patch ``index`` as (patch_size, patch_size, 3) uint8."""
        x, y = self.coords[index]
        return read_patch(slide, int(x), int(y), int(self.attrs["read_level"]), int(self.attrs["read_size"]),
                          int(self.attrs["patch_size"]))


def load_grid(h5_path: str | Path) -> PatchGrid:
    """Read a tiles ``.h5`` written by :func:`tile_slide`."""
    import h5py

    h5_path = Path(h5_path)
    if not h5_path.exists():
        raise OncoFMError(f"{h5_path} does not exist; run `oncofm tile` first")
    with h5py.File(h5_path, "r") as f:
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
        return PatchGrid(path=h5_path, coords=f["coords"][:], tissue_fraction=f["tissue_fraction"][:],
                         attrs=attrs)
