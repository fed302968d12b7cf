"""Per-slide stages over many slides on the local process pool or a Ray cluster.

:func:`tile_many` runs the tiling stage's own per-slide worker
(:func:`oncofm.pathology.tiling._process_one`: skip a finished slide, take the slide's lock file, tile, write
``<slide>.h5`` and ``<slide>_qc.png`` atomically, turn an error into a ``failed`` result) as one task per
slide through :func:`oncofm.distributed.executor.run_per_item`, then merges the batch into ``failures.csv``
with the tiling stage's :func:`~oncofm.pathology.tiling.record_outcomes`. So a slide tiled on Ray and a slide
tiled by ``oncofm tile`` on a laptop produce the same files, and either can finish the other's batch.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from oncofm.distributed.executor import BatchResult, ExecutorSettings, run_per_item

if TYPE_CHECKING:
    from oncofm.pathology.tiling import TilingResult, TilingSettings

log = logging.getLogger(__name__)


def tile_many(
    paths: Sequence[str | Path],
    out_dir: str | Path,
    settings: TilingSettings,
    executor: str | ExecutorSettings = "local",
    workers: int | None = None,
    address: str | None = None,
    *,
    progress: bool = True,
) -> list[TilingResult]:
    """Tile ``paths`` into ``out_dir``, one task per slide, on ``executor`` (``local`` or ``ray``).

    Parameters
    ----------
    paths
        Slide files. On a multi-node Ray cluster they, and ``out_dir``, must be on a filesystem every node
        mounts at the same path.
    settings
        The tiling settings (``settings.source`` is ignored; ``settings.out`` is replaced by ``out_dir``;
        ``settings.workers`` is the default for ``workers``).
    executor, workers, address
        See :func:`oncofm.distributed.executor.run_per_item`.

    Returns
    -------
    list[TilingResult]
        One per slide, in the order of ``paths``: ``done``, ``skipped`` (output existed), ``busy`` (another
        worker holds the slide's lock) or ``failed`` (also listed in ``out_dir/failures.csv``).
    """
    from oncofm.pathology.tiling import TilingResult, _process_one, record_outcomes

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = settings.model_copy(update={"out": str(out)})
    settings.save(out / "tiles_settings.yaml")
    task = functools.partial(_process_one, settings_json=settings.model_dump_json())
    batch = run_per_item(task, [str(p) for p in paths], executor=_executor_settings(executor, workers, address,
                                                                                     settings.workers),
                         description="tiling", progress=progress)
    results = [o.value if o.status == "ok" else TilingResult(slide=str(o.item), status="failed", reason=o.reason)
               for o in batch.outcomes]
    record_outcomes(out, results)
    _log_summary(results, batch, out)
    return results


def _executor_settings(executor: str | ExecutorSettings, workers: int | None, address: str | None,
                       default_workers: int | None) -> ExecutorSettings:
    if isinstance(executor, ExecutorSettings):
        return executor
    return ExecutorSettings.build(executor=executor, workers=workers or default_workers, address=address)


def _log_summary(results: list[TilingResult], batch: BatchResult, out: Path) -> None:
    counts = {s: sum(r.status == s for r in results) for s in ("done", "skipped", "busy", "failed")}
    log.info("tiling on %s (%d workers): %s (%d patches) in %.1f s -> %s", batch.executor, batch.workers,
             ", ".join(f"{v} {k}" for k, v in counts.items() if v), sum(r.n_patches for r in results),
             batch.seconds, out)


# ----------------------------------------------------------------------------------------------------------
# frozen-encoder feature extraction
@functools.lru_cache(maxsize=2)
def _cached_encoder(name: str, options_json: str, device: str):  # noqa: ANN202 - nn.Module
    """One encoder per worker process (built on its first slide, reused for the next ones)."""
    import json

    import torch

    from oncofm.pathology.encoders import create_encoder

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return create_encoder(name, **json.loads(options_json)).to(device).eval()


def _extract_one(tiles_h5: str, *, out_dir: str, encoder: str, options_json: str, device: str,
                 batch_size: int, slide_mpp: float | None, redo: bool) -> str:
    """Worker entry point: features of one tiled slide (skips when cached; atomic write; raises on error)."""
    from oncofm.pathology.slide_model import extract_features

    target = Path(out_dir) / Path(tiles_h5).with_suffix(".h5").name
    model = _cached_encoder(encoder, options_json, device)
    return str(extract_features(model, tiles_h5, target, batch_size=batch_size, slide_mpp=slide_mpp, redo=redo,
                                encoder_name=encoder))


def extract_many(
    tiles: Sequence[str | Path],
    out_dir: str | Path,
    encoder: str,
    *,
    encoder_options: dict | None = None,
    batch_size: int = 64,
    device: str = "auto",
    slide_mpp: float | None = None,
    redo: bool = False,
    executor: str | ExecutorSettings = "local",
    workers: int | None = None,
    address: str | None = None,
    gpus_per_item: float = 0.0,
    progress: bool = True,
) -> BatchResult:
    """Frozen-encoder features of many tiled slides, one task per slide (``local`` or ``ray``).

    Writes ``out_dir/<slide_stem>.h5`` with the slide model's own
    :func:`oncofm.pathology.slide_model.extract_features` (the layout ``oncofm train slide`` reads from
    ``models/slide/features/<encoder>/``, so it reuses them), and ``out_dir/failures.csv``
    (``item, reason``). Each worker process builds the encoder once. On Ray, ``gpus_per_item=0.25`` packs
    four slides onto each GPU; ``device="auto"`` uses the GPU Ray assigned, else the CPU.

    Returns
    -------
    BatchResult
        ``values`` are the feature file paths (None for failed slides).
    """
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    task = functools.partial(_extract_one, out_dir=str(out), encoder=encoder,
                             options_json=json.dumps(encoder_options or {}, sort_keys=True), device=device,
                             batch_size=batch_size, slide_mpp=slide_mpp, redo=redo)
    settings = executor if isinstance(executor, ExecutorSettings) else ExecutorSettings.build(
        executor=executor, workers=workers, address=address, gpus_per_item=gpus_per_item)
    batch = run_per_item(task, [str(t) for t in tiles], executor=settings, description="encoding slides",
                         progress=progress)
    batch.write_failures(out / "failures.csv")
    return batch
