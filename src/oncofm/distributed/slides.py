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
    from oncofm.pathology.tiling import SlideResult, TilingSettings

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
) -> list[SlideResult]:
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
    list[SlideResult]
        One per slide, in the order of ``paths``: ``done``, ``skipped`` (output existed), ``busy`` (another
        worker holds the slide's lock) or ``failed`` (also listed in ``out_dir/failures.csv``).
    """
    from oncofm.pathology.tiling import SlideResult, _process_one, record_outcomes

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = settings.model_copy(update={"out": str(out)})
    settings.save(out / "tiles_settings.yaml")
    task = functools.partial(_process_one, settings_json=settings.model_dump_json())
    batch = run_per_item(task, [str(p) for p in paths], executor=_executor_settings(executor, workers, address,
                                                                                     settings.workers),
                         description="tiling", progress=progress)
    results = [o.value if o.status == "ok" else SlideResult(slide=str(o.item), status="failed", reason=o.reason)
               for o in batch.outcomes]
    record_outcomes(out, results)
    _log_summary(results, batch, out)
    return results


def _executor_settings(executor: str | ExecutorSettings, workers: int | None, address: str | None,
                       default_workers: int | None) -> ExecutorSettings:
    if isinstance(executor, ExecutorSettings):
        return executor
    return ExecutorSettings.build(executor=executor, workers=workers or default_workers, address=address)


def _log_summary(results: list[SlideResult], batch: BatchResult, out: Path) -> None:
    counts = {s: sum(r.status == s for r in results) for s in ("done", "skipped", "busy", "failed")}
    log.info("tiling on %s (%d workers): %s (%d patches) in %.1f s -> %s", batch.executor, batch.workers,
             ", ".join(f"{v} {k}" for k, v in counts.items() if v), sum(r.n_patches for r in results),
             batch.seconds, out)
