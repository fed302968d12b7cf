"""Patch-feature extraction that keeps the encoder busy: ``oncofm encode``.

:func:`encode_slides` turns tiled slides (``tiles/<slide>.h5``, see docs/CONTRACTS.md) into one bag of patch
features per slide, in the CLAM / TRIDENT ``.h5`` layout, so other tools read OncoFM's features and OncoFM
(:func:`oncofm.pathology.feature_bags.read_feature_bag`, ``oncofm train slide``) reads them:

- dataset ``features`` (N, D) (float32, or float16 with ``features_dtype``), dataset ``coords`` (N, 2) int64:
  level-0 (x, y) of each patch's top-left corner, in the order of the tiles file;
- attributes (on the file and on ``coords``, as TRIDENT): ``patch_size`` (pixels fed to the encoder),
  ``patch_level`` (pyramid level read), ``patch_size_level0``, ``level0_magnification`` /
  ``target_magnification`` (10 / µm-per-pixel), plus ``encoder``, ``tiles``, ``patch_level0_size`` (what
  ``oncofm train slide``'s feature cache checks, so it reuses these files), ``slide_path``, ``slide_mpp``,
  ``target_mpp``, ``encoder_weights``, ``precision``, ``settings_hash``, ``encode_settings``.

How one slide runs (:func:`encode_slide`):

1. a :class:`torch.utils.data.DataLoader` over the slide's patch grid: ``workers`` processes each open the
   slide once and read patches as uint8 (a quarter of float32's inter-process traffic), ``prefetch`` batches
   ahead, pinned memory on a GPU (default, :func:`default_workers`: on a GPU half the cores; on a CPU none
   below 8 cores — there the encoder's threads need every core, and a reader only stalls them);
2. the main process runs the encoder on each batch under ``torch.inference_mode``: on a GPU in bf16 (fp16
   where bf16 is not supported) autocast with channels-last inputs; on a CPU in fp32, by default through a
   TorchScript-frozen copy of the encoder (batch-norm folded into the convolutions, fused kernels), used only
   after it reproduced the eager encoder on the first batch, else the eager encoder (logged);
3. the features are written to ``<out>/<slide>.h5`` through a temporary file renamed into place, under a
   per-slide lock file, so an interrupted run loses at most the slides in flight, a re-run skips finished
   slides (same settings, same tiles), and several processes or machines can share one output folder. A file
   made with other settings stops the run naming each change (``--redo`` re-encodes).

A slide that fails is written to ``<out>/failures.csv`` (``slide, reason``) and the others go on.
:class:`EncodeResult` says per slide what was encoded, skipped or failed, and why.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from oncofm.config import StageSettings, artifact_version, settings_hash
from oncofm.errors import OncoFMError
from oncofm.io import atomic_path, open_h5

log = logging.getLogger(__name__)

__all__ = ["EncodeResult", "EncodeSettings", "EncoderRunner", "default_workers", "encode_many", "encode_slide",
           "encode_slides", "find_tiles"]

#: Settings that change how extraction runs, never the features it writes (left out of the comparison).
RUN_ONLY: tuple[str, ...] = ("tiles", "out", "batch_size", "workers", "prefetch", "device", "optimize", "redo",
                             "stale_lock_hours", "progress")


def cpu_cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)


def default_workers(device_type: str = "cpu") -> int:
    """Reader processes for this machine. GPU: half the cores, 1 to 8 (the GPU encodes faster than one process
    reads). CPU: the encoder's threads use every core and reading is ~5 % of the work, so a reader process
    only steals time slices from them (each op then waits for its slowest thread: a third slower on 2
    cores): none below 8 cores, else 1 (and one thread fewer for the encoder)."""
    cores = cpu_cores()
    if device_type == "cuda":
        return max(1, min(8, cores // 2))
    return 0 if cores < 8 else 1


class EncodeSettings(StageSettings):
    """Settings of ``oncofm encode``."""

    stage = "encode"

    tiles: str = Field(..., description="A tiles .h5 (from `oncofm tile`) or a folder of them.")
    out: str = Field(..., description="Output folder for <slide>.h5 feature bags and failures.csv.")
    encoder: str = Field("efficientnet-lite0", description="A registered patch encoder (oncofm.pathology.encoders).")
    encoder_weights: str | None = Field(None, description="Local pretrained weights: a Hugging Face folder or a "
                                        ".safetensors/.pt/.pth/.bin state dict.")
    encoder_options: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the encoder.")
    batch_size: int = Field(64, ge=1, le=4096)
    workers: int | None = Field(None, ge=0, le=64,
                                description="DataLoader processes reading patches (0: the main process); default: "
                                "default_workers() — GPU: half the cores (1-8); CPU: 0 below 8 cores, else 1.")
    prefetch: int = Field(4, ge=1, le=64, description="Batches each worker reads ahead.")
    device: str = Field("auto", description="auto (cuda when available), cpu, cuda, cuda:1, ...")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 autocast on a GPU that supports it (else fp16), fp32 on a CPU.")
    optimize: bool = Field(True, description="CPU: run a TorchScript-frozen copy of the encoder once it "
                           "reproduced the eager one.")
    features_dtype: Literal["float32", "float16"] = "float32"
    slide_mpp: float | None = Field(None, gt=0, description="Level-0 µm/px for slides whose files do not say.")
    redo: bool = False
    stale_lock_hours: float = Field(6.0, gt=0)


@dataclass
class EncodeResult:
    """Outcome of one slide."""

    slide: str  # the tiles .h5
    status: str  # done | skipped | busy | failed
    n_patches: int = 0
    seconds: float = 0.0
    reason: str = ""
    path: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def patches_per_s(self) -> float:
        return self.n_patches / self.seconds if self.seconds > 0 else float("nan")

    def describe(self) -> str:
        """One line for the console: what was encoded, skipped or failed, and why."""
        name = Path(self.slide).stem
        if self.status == "done":
            return (f"done     {name}  {self.n_patches} patches -> {self.details.get('dim', '?')}-d features in "
                    f"{self.seconds:.1f} s ({self.patches_per_s:.1f} patches/s, {self.details.get('engine', '')})")
        if self.status == "skipped":
            return f"skipped  {name}  {self.n_patches} patches already encoded with these settings"
        return f"{self.status:8s} {name}  {self.reason}"


def find_tiles(source: str | Path) -> list[Path]:
    """A tiles ``.h5`` or every ``*.h5`` in a folder (sorted), the patch grids ``oncofm tile`` wrote."""
    source = Path(source)
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise OncoFMError(f"{source} is neither a tiles .h5 nor a folder of them; run `oncofm tile` first")
    found = sorted(p for p in source.glob("*.h5") if not p.name.startswith("."))
    if not found:
        raise OncoFMError(f"{source} holds no tiles .h5 files; run `oncofm tile SLIDES --out {source}` first")
    return found


# ----------------------------------------------------------------------------------------------------------
# the encoder side
def resolve_device(device: str = "auto") -> torch.device:
    """``auto``: the GPU when one is visible, else the CPU; otherwise the named device (checked)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise OncoFMError(f"--device {device!r} is not a device ({exc}); use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OncoFMError(f"--device {device}: no CUDA GPU is visible here; use --device cpu (or auto)")
    return dev


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None = fp32) for ``precision`` on ``device``."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type != "cuda" and precision == "fp16":
        raise OncoFMError("--precision fp16 needs a GPU; on a CPU use fp32 (or bf16 on CPUs with AVX512-BF16/AMX)")
    return torch.bfloat16 if precision == "bf16" else torch.float16


class _Features(torch.nn.Module):
    """``encoder.features`` as a module, for tracing (``prepare`` — resizing, normalising — stays eager)."""

    def __init__(self, encoder: Any) -> None:
        super().__init__()
        self.enc = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.enc.features(x)


class EncoderRunner:
    """Runs a :class:`~oncofm.pathology.encoders.PatchEncoder` on batches of uint8 patches (B, 3, S, S).

    On a GPU: channels-last, bf16/fp16 autocast. On a CPU with ``optimize``: a TorchScript-frozen copy of
    ``encoder.features``, adopted only when it matches the eager encoder on the first batch (max difference
    ≤ 1e-3 of the features' scale) — otherwise, or when tracing fails, the eager encoder, with a log line.
    """

    def __init__(self, encoder: Any, device: str | Any = "auto", precision: str = "auto",
                 optimize: bool = True) -> None:
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.autocast = resolve_precision(precision, self.device)
        self.encoder = encoder.eval().to(self.device)
        if self.device.type == "cuda":
            self.encoder = self.encoder.to(memory_format=torch.channels_last)
        self.dim = int(encoder.dim)
        self._optimize = bool(optimize) and self.device.type == "cpu" and self.autocast is None
        self._frozen: Any = None
        self.engine = "eager"
        self.freeze_seconds = 0.0  # time spent tracing, freezing and checking the TorchScript copy

    @property
    def precision(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.autocast]

    def _try_freeze(self, x: torch.Tensor) -> None:
        self._optimize = False  # one attempt
        t0 = time.perf_counter()
        try:
            self._freeze(x)
        finally:
            self.freeze_seconds = time.perf_counter() - t0

    def _freeze(self, x: torch.Tensor) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                example = x[:2]
                traced = torch.jit.trace(_Features(self.encoder), example, strict=False, check_trace=False)
                frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
                probe = x[: min(len(x), 3)]  # another batch size than the example: the graph must not fix it
                ref = self.encoder.features(probe).float()
                frozen(probe)  # the first calls of a frozen graph profile and optimise it
                got = frozen(probe).float()
        except Exception as exc:  # TorchScript cannot trace every model: the eager one is always right
            log.info("encoder %s runs eagerly (TorchScript tracing failed: %s)", getattr(self.encoder, "name", ""),
                     str(exc).splitlines()[0][:200])
            return
        scale = float(ref.abs().max().clamp_min(1.0))
        diff = float((got - ref).abs().max())
        if got.shape != ref.shape or not diff <= 1e-3 * scale:
            log.warning("encoder %s runs eagerly: its TorchScript copy differs by %.3g (scale %.3g)",
                        getattr(self.encoder, "name", ""), diff, scale)
            return
        self._frozen = frozen
        self.engine = "torchscript-frozen"
        log.debug("encoder %s: TorchScript-frozen copy adopted (max difference %.2g)", self.encoder.name, diff)

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        """Features (B, dim) float32 of a batch of patches ((B, 3, S, S) uint8 or float in [0, 1])."""
        with torch.inference_mode():
            x = batch.to(self.device, non_blocking=True)
            x = self.encoder.prepare(x)
            if self._optimize:
                self._try_freeze(x)
            if self._frozen is None:  # eager convolutions are faster on channels-last inputs (CPU: 1.5x here)
                x = x.contiguous(memory_format=torch.channels_last)
            if self.autocast is not None:
                with torch.autocast(self.device.type, dtype=self.autocast):
                    feats = self.encoder.features(x)
            elif self._frozen is not None:
                feats = self._frozen(x)
            else:
                feats = self.encoder.features(x)
            return feats.float().cpu().numpy()


# ----------------------------------------------------------------------------------------------------------
# one slide
def _stamp(settings: EncodeSettings) -> tuple[str, dict[str, Any]]:
    """The settings hash of what changes the features (the encoder's weights by name, size and time)."""
    data = settings.model_dump(mode="json")
    for key in RUN_ONLY:
        data.pop(key, None)
    if settings.encoder_weights:
        data["encoder_weights_version"] = artifact_version(settings.encoder_weights)
    return settings_hash(data, ignore=()), data


def _changes(saved: dict[str, Any], mine: dict[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(mine))
    return [f"{k}: {saved.get(k, '(none)')} -> {mine.get(k, '(none)')}" for k in keys if saved.get(k) != mine.get(k)]


def _up_to_date(out_h5: Path, grid: Any, tiles_h5: Path, settings: EncodeSettings) -> int | None:
    """Patch count of an existing bag made from these tiles with these settings; None when there is none.
    Raises naming each changed setting (and ``--redo``) when it was made otherwise."""
    if not out_h5.exists() or settings.redo:
        return None
    digest, mine = _stamp(settings)
    try:
        with open_h5(out_h5) as f:
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
            n = int(len(f["features"]))
    except (OncoFMError, KeyError):
        log.warning("%s is unreadable; encoding the slide again", out_h5)
        return None
    if attrs.get("settings_hash") != digest:
        saved = json.loads(attrs.get("encode_settings", "{}"))
        changed = _changes(saved, mine) or ["(made by another tool or an older OncoFM)"]
        raise OncoFMError(f"{out_h5} was encoded with other settings ({'; '.join(changed)}); pass --redo to "
                          "encode again, or choose another --out")
    if n != len(grid) or attrs.get("tiles_settings_hash", "") != str(grid.attrs.get("settings_hash", "")):
        log.info("%s: the tiles changed since it was encoded; encoding again", out_h5.name)
        return None
    return n


def encode_slide(tiles_h5: str | Path, out_h5: str | Path, runner: EncoderRunner, settings: EncodeSettings,
                 progress: Any = None) -> EncodeResult:
    """Encode every patch of one tiled slide into ``out_h5`` (see the module docstring); raises on failure."""
    import h5py
    from torch.utils.data import DataLoader

    from oncofm.pathology.dataset import PatchDataset
    from oncofm.pathology.tiling import load_grid

    t0 = time.perf_counter()
    tiles_h5, out_h5 = Path(tiles_h5), Path(out_h5)
    grid = load_grid(tiles_h5)
    done = _up_to_date(out_h5, grid, tiles_h5, settings)
    if done is not None:
        return EncodeResult(slide=str(tiles_h5), status="skipped", n_patches=done, path=str(out_h5))
    if len(grid) == 0:
        raise OncoFMError(f"{tiles_h5} has no patches; nothing to encode (re-tile with a lower --min-tissue)")
    dataset = PatchDataset(tiles_h5, slide_mpp=settings.slide_mpp, as_uint8=True)
    wanted = settings.workers if settings.workers is not None else default_workers(runner.device.type)
    workers = min(wanted, max(0, -(-len(grid) // settings.batch_size)))
    loader = DataLoader(dataset, batch_size=settings.batch_size, shuffle=False, num_workers=workers,
                        pin_memory=runner.device.type == "cuda", prefetch_factor=settings.prefetch if workers else None,
                        persistent_workers=False)
    feats = np.empty((len(grid), runner.dim), np.float16 if settings.features_dtype == "float16" else np.float32)
    task = progress.add_task(f"encoding {tiles_h5.stem}", total=len(grid)) if progress is not None else None
    start = 0
    try:
        for batch in loader:
            out = runner(batch)
            if not np.isfinite(out).all():
                raise OncoFMError(f"the encoder gave NaN/inf features for patches {start}-{start + len(out) - 1} of "
                                  f"{tiles_h5.name} (precision {runner.precision}); try --precision fp32")
            feats[start:start + len(out)] = out
            start += len(out)
            if task is not None:
                progress.advance(task, len(out))
    finally:
        dataset.close()
        if task is not None:
            progress.remove_task(task)
    seconds = time.perf_counter() - t0
    digest, stamp = _stamp(settings)
    a = grid.attrs
    slide_mpp, target_mpp = float(a.get("slide_mpp", np.nan)), float(a.get("target_mpp", np.nan))
    common: dict[str, Any] = {
        "patch_size": int(a["patch_size"]), "patch_level": int(a["read_level"]),
        "patch_size_level0": int(a["level0_size"]),
        "level0_magnification": 10.0 / slide_mpp if slide_mpp > 0 else np.nan,
        "target_magnification": 10.0 / target_mpp if target_mpp > 0 else np.nan,
    }
    attrs: dict[str, Any] = {
        **common, "encoder": settings.encoder, "tiles": str(tiles_h5.resolve()),
        "patch_level0_size": int(a["level0_size"]), "read_size": int(a["read_size"]),
        "slide_path": str(a.get("slide_path", "")), "slide_mpp": slide_mpp, "target_mpp": target_mpp,
        "encoder_weights": settings.encoder_weights or "", "precision": runner.precision,
        "features_dtype": settings.features_dtype, "feature_dim": runner.dim, "n_patches": len(grid),
        "engine": runner.engine, "device": str(runner.device), "reader_processes": workers, "settings_hash": digest,
        "encode_settings": json.dumps(stamp, sort_keys=True), "tiles_settings_hash": str(a.get("settings_hash", "")),
        "extractor": "oncofm encode", "seconds": seconds,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    with atomic_path(out_h5, suffix=".h5.tmp") as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=feats)
        coords = f.create_dataset("coords", data=grid.coords.astype(np.int64))
        for k, v in common.items():
            coords.attrs[k] = v
        for k, v in attrs.items():
            f.attrs[k] = v
    return EncodeResult(slide=str(tiles_h5), status="done", n_patches=len(grid), seconds=seconds, path=str(out_h5),
                        details={"dim": runner.dim, "freeze_seconds": runner.freeze_seconds,
                                 "engine": f"{runner.engine}, {runner.precision}, "
                                 f"{runner.device}, {workers or 'no'} reader process{'' if workers == 1 else 'es'}"})


# ----------------------------------------------------------------------------------------------------------
# many slides
def build_encoder(settings: EncodeSettings) -> Any:
    """The encoder of ``settings`` (``encoder_weights`` loaded through the registry)."""
    from oncofm.pathology.encoders import create_encoder

    kw = dict(settings.encoder_options)
    if settings.encoder_weights:
        kw["weights"] = settings.encoder_weights
    return create_encoder(settings.encoder, **kw)


@contextlib.contextmanager
def _restore_threads(n: int) -> Any:
    try:
        yield
    finally:
        torch.set_num_threads(n)


def encode_slides(settings: EncodeSettings, progress: bool = True, encoder: Any = None) -> list[EncodeResult]:
    """Encode every tiled slide of ``settings.tiles`` into ``settings.out``; one result per slide.

    ``encoder``: a built :class:`~oncofm.pathology.encoders.PatchEncoder` to use instead of building
    ``settings.encoder`` (the name is still what the files record).
    """
    from oncofm.logging_utils import make_progress
    from oncofm.pathology.tiling import acquire_lock, record_outcomes, release_lock

    tiles = find_tiles(settings.tiles)
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    runner = EncoderRunner(encoder if encoder is not None else build_encoder(settings), settings.device,
                           settings.precision, settings.optimize)
    settings.save(out / "encode_settings.yaml")
    results: list[EncodeResult] = []
    threads = torch.get_num_threads()
    readers = settings.workers if settings.workers is not None else default_workers(runner.device.type)
    if runner.device.type == "cpu" and readers > 0:  # leave the readers their cores
        torch.set_num_threads(max(1, min(threads, cpu_cores() - readers)))
    with _restore_threads(threads), make_progress() as bar:
        slides = bar.add_task("slides", total=len(tiles), visible=progress)
        for tiles_h5 in tiles:
            target = out / tiles_h5.name
            lock = out / f"{tiles_h5.name}.lock"
            if not acquire_lock(lock, settings.stale_lock_hours * 3600):
                results.append(EncodeResult(slide=str(tiles_h5), status="busy", reason="locked by another worker"))
                bar.advance(slides)
                continue
            try:
                results.append(encode_slide(tiles_h5, target, runner, settings, bar if progress else None))
            except OncoFMError as exc:
                if "encoded with other settings" in str(exc):
                    raise
                results.append(EncodeResult(slide=str(tiles_h5), status="failed", reason=str(exc).replace("\n", " ")))
            except Exception as exc:  # one bad slide must not stop the batch; the reason goes to failures.csv
                log.debug("encoding %s failed", tiles_h5, exc_info=True)
                results.append(EncodeResult(slide=str(tiles_h5), status="failed",
                                            reason=f"{type(exc).__name__}: {exc}".replace("\n", " ")))
            finally:
                release_lock(lock)
            bar.advance(slides)
    with contextlib.suppress(OncoFMError):
        record_outcomes(out, results)  # type: ignore[arg-type]  # same slide/status/reason fields
    done = [r for r in results if r.status == "done"]
    if done:
        n, s = sum(r.n_patches for r in done), sum(r.seconds for r in done)
        log.info("encoded %d slides, %d patches in %.1f s (%.1f patches/s) -> %s", len(done), n, s, n / s, out)
    for r in results:
        if r.status == "failed":
            log.warning("failed: %s — %s", Path(r.slide).name, r.reason)
    return results


# ----------------------------------------------------------------------------------------------------------
# one task per slide on a process pool or a Ray cluster
_RUNNERS: dict[str, EncoderRunner] = {}


def _encode_one(tiles_h5: str, settings_json: str) -> dict[str, Any]:
    """Worker entry point (top level, so it pickles): one slide, under its lock; the encoder is built once per
    worker process and reused for its next slides. Raises on failure (the executor records it)."""
    from oncofm.pathology.tiling import acquire_lock, release_lock

    settings = EncodeSettings.model_validate_json(settings_json)
    key = json.dumps([settings.encoder, settings.encoder_weights, settings.encoder_options, settings.device,
                      settings.precision, settings.optimize], sort_keys=True, default=str)
    if key not in _RUNNERS:
        _RUNNERS[key] = EncoderRunner(build_encoder(settings), settings.device, settings.precision,
                                      settings.optimize)
    out = Path(settings.out)
    lock = out / f"{Path(tiles_h5).name}.lock"
    if not acquire_lock(lock, settings.stale_lock_hours * 3600):
        return EncodeResult(slide=tiles_h5, status="busy", reason="locked by another worker").__dict__
    try:
        return encode_slide(tiles_h5, out / Path(tiles_h5).name, _RUNNERS[key], settings).__dict__
    finally:
        release_lock(lock)


def encode_many(settings: EncodeSettings, *, executor: str = "local", workers: int | None = None,
                address: str | None = None, gpus_per_item: float = 0.0, cpus_per_item: float = 1.0,
                progress: bool = True) -> list[EncodeResult]:
    """:func:`encode_slides` with one task per slide on ``executor`` (``local`` process pool or ``ray``):
    the same files, locks, skips and ``failures.csv``. On Ray, ``gpus_per_item=0.25`` packs four slide tasks
    onto each GPU and ``cpus_per_item`` reserves the CPUs of each task's readers (``settings.workers``)."""
    import functools

    from oncofm.distributed.executor import ExecutorSettings, run_per_item

    tiles = find_tiles(settings.tiles)
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    settings.save(out / "encode_settings.yaml")
    exe = ExecutorSettings.build(executor=executor, workers=workers, address=address, gpus_per_item=gpus_per_item,
                                 cpus_per_item=cpus_per_item)
    batch = run_per_item(functools.partial(_encode_one, settings_json=settings.model_dump_json()),
                         [str(t) for t in tiles], executor=exe, description="encoding slides", progress=progress)
    results = [EncodeResult(**o.value) if o.status == "ok" and isinstance(o.value, dict)
               else EncodeResult(slide=str(o.item), status="failed", reason=o.reason) for o in batch.outcomes]
    from oncofm.pathology.tiling import record_outcomes

    with contextlib.suppress(OncoFMError):
        record_outcomes(out, results)  # type: ignore[arg-type]
    return results
