"""Run one function over many independent items on a local process pool or a Ray cluster.

Slide tiling, frozen-encoder feature extraction and per-cancer-type Cox fits are *embarrassingly parallel*:
one task per slide (or per cancer type), no communication between tasks. This module runs such work on an
existing engine instead of a home-made one:

- ``local`` (default) — a ``spawn`` process pool on this machine (:class:`LocalExecutor`);
- ``ray`` — tasks on a Ray cluster (``address="ray://host:10001"`` / ``"host:6379"`` / ``"auto"``), or on a
  Ray instance started on this machine when no address is given (:class:`RayExecutor`).

The contract is the same on both, so a stage is written once:

- the **per-item function** owns its outputs: it writes them atomically (:mod:`oncofm.io`) and returns
  early when they already exist (skip-finished), so a re-run, or a second worker on the same shared folder,
  only does what is missing;
- the **executor** never lets one item stop the batch: an exception raised by the function, a worker
  process that dies (segfault, out of memory) or a lost Ray task becomes one ``failed`` row of the failure
  table (:meth:`BatchResult.failures`) and the other items go on;
- outcomes come back in the order of ``items``.

Examples
--------
>>> result = run_per_item(tile_one, slide_paths, executor="ray", address="auto")  # doctest: +SKIP
>>> result.failures()  # DataFrame: item, reason  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import pandas as pd
from pydantic import Field

from oncofm.config import StageSettings
from oncofm.errors import OncoFMError

log = logging.getLogger(__name__)

Status = Literal["ok", "failed"]


class ExecutorSettings(StageSettings):
    """Where per-item work runs (``--executor``, ``--workers``, ``--address`` on the command line)."""

    stage: ClassVar[str] = "executor"

    executor: str = Field("local", description="local (process pool on this machine) or ray (a Ray cluster)")
    workers: int | None = Field(None, ge=1, description="items running at once (default: local = CPU count, "
                                "ray = what the cluster's resources allow)")
    address: str | None = Field(None, description="Ray cluster address (e.g. auto, 10.0.0.5:6379, "
                                "ray://head:10001); empty: start a Ray instance on this machine")
    cpus_per_item: float = Field(1.0, gt=0, description="Ray: CPUs reserved per task")
    gpus_per_item: float = Field(0.0, ge=0, description="Ray: GPUs reserved per task (feature extraction)")
    retries: int = Field(0, ge=0, le=10, description="re-runs of an item whose worker died (not of an item "
                         "whose function raised: that is a property of the item, it fails again)")


@dataclass
class ItemOutcome:
    """What happened to one item."""

    item: Any
    status: Status
    value: Any = None
    reason: str = ""
    seconds: float = 0.0


@dataclass
class BatchResult:
    """Outcomes of a batch, in the order of its items."""

    outcomes: list[ItemOutcome] = field(default_factory=list)
    executor: str = "local"
    workers: int = 1
    seconds: float = 0.0

    @property
    def values(self) -> list[Any]:
        """Return values of the items that succeeded (None for failed ones), in item order."""
        return [o.value for o in self.outcomes]

    @property
    def n_failed(self) -> int:
        return sum(o.status == "failed" for o in self.outcomes)

    def failures(self) -> pd.DataFrame:
        """The failure table: one row per failed item (``item, reason``)."""
        rows = [{"item": str(o.item), "reason": o.reason} for o in self.outcomes if o.status == "failed"]
        return pd.DataFrame(rows, columns=["item", "reason"])

    def write_failures(self, target: str | Path) -> Path:
        """Write :meth:`failures` as CSV atomically (an empty table with a header when nothing failed)."""
        from oncofm.io import atomic_path

        with atomic_path(target, suffix=".csv") as tmp:
            self.failures().to_csv(tmp, index=False)
        return Path(target)


def _reason(exc: BaseException) -> str:
    """One line that says what went wrong (an OncoFMError's message is already written for the user)."""
    text = str(exc) if isinstance(exc, OncoFMError) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())


def _call(fn: Callable[[Any], Any], item: Any) -> tuple[Status, Any, str, float]:
    """Run ``fn(item)`` and turn an exception into a ``failed`` outcome (runs inside the worker)."""
    t0 = time.perf_counter()
    try:
        return "ok", fn(item), "", time.perf_counter() - t0
    except Exception as exc:  # one bad item must not stop the batch; the reason goes to the failure table
        log.debug("item %r failed", item, exc_info=True)
        return "failed", None, _reason(exc), time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------------------
# registry
class Executor(ABC):
    """Runs ``fn`` over ``items``; subclasses register themselves under a name with :func:`register`."""

    name: ClassVar[str] = "base"

    def __init__(self, settings: ExecutorSettings) -> None:
        self.settings = settings

    @abstractmethod
    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[tuple[int, ItemOutcome]]:
        """Yield ``(index, outcome)`` as items finish (any order); never raises for a single item."""

    @abstractmethod
    def n_workers(self, n_items: int) -> int:
        """How many items run at once."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the executor holds (pools, cluster connections)."""


EXECUTORS: dict[str, type[Executor]] = {}


def register(cls: type[Executor]) -> type[Executor]:
    """Class decorator: make an executor available by its ``name``."""
    EXECUTORS[cls.name] = cls
    return cls


def make_executor(settings: ExecutorSettings) -> Executor:
    """The executor named by ``settings.executor``."""
    try:
        cls = EXECUTORS[settings.executor]
    except KeyError:
        raise OncoFMError(f"unknown executor '{settings.executor}'; choose one of {sorted(EXECUTORS)}") from None
    return cls(settings)


# ----------------------------------------------------------------------------------------------------------
# local process pool
@register
class LocalExecutor(Executor):
    """A ``spawn`` process pool on this machine.

    At most ``workers`` items are handed to the pool at a time, so when a worker process dies (which breaks
    a ``ProcessPoolExecutor`` for every pending item) the items that were running are known: each of them is
    run again alone in a fresh pool, and the one that kills its worker alone is failed; the rest go on.
    ``workers=1`` runs in this process (no pickling), which is what tests and debuggers want.
    """

    name = "local"

    def n_workers(self, n_items: int) -> int:
        return max(1, min(self.settings.workers or os.cpu_count() or 1, n_items))

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[tuple[int, ItemOutcome]]:
        if self.n_workers(len(items)) == 1 and self.settings.workers == 1:
            for i, item in enumerate(items):
                status, value, reason, secs = _call(fn, item)
                yield i, ItemOutcome(item, status, value, reason, secs)
            return
        yield from self._pool_map(fn, items, self.n_workers(len(items)))

    def _pool_map(self, fn: Callable[[Any], Any], items: Sequence[Any], workers: int
                  ) -> Iterator[tuple[int, ItemOutcome]]:
        ctx = mp.get_context("spawn")
        queue = list(range(len(items)))[::-1]  # pop() from the end = item order
        suspects: list[int] = []  # items running when a worker died: re-run one at a time
        crashes: dict[int, int] = {}
        while queue or suspects:
            alone = bool(suspects)
            todo = suspects if alone else queue
            width = 1 if alone else workers
            with ProcessPoolExecutor(max_workers=width, mp_context=ctx) as pool:
                running: dict[Any, int] = {}
                broken = False
                while (todo or running) and not broken:
                    while todo and len(running) < width:
                        i = todo.pop()
                        running[pool.submit(_call, fn, items[i])] = i
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for fut in done:
                        i = running.pop(fut)
                        try:
                            status, value, reason, secs = fut.result()
                        except BrokenProcessPool:
                            broken = True
                            running[fut] = i  # handled below with the others that were in flight
                            continue
                        except Exception as exc:  # e.g. a return value that does not pickle
                            status, value, reason, secs = "failed", None, _reason(exc), 0.0
                        yield i, ItemOutcome(items[i], status, value, reason, secs)
                if broken:
                    pool.shutdown(wait=True, cancel_futures=True)
                    for i in running.values():
                        if not alone:
                            suspects.append(i)
                            continue
                        crashes[i] = crashes.get(i, 0) + 1  # it died alone: this item is the cause
                        if crashes[i] > self.settings.retries:
                            yield i, ItemOutcome(items[i], "failed", reason="the worker process died while "
                                                 "running this item (crash or out of memory)")
                        else:
                            suspects.append(i)
                    if not alone:
                        log.warning("a worker process died; re-running the %d item(s) it may have held one at a "
                                    "time", len(running))


# ----------------------------------------------------------------------------------------------------------
# Ray
@register
class RayExecutor(Executor):
    """Tasks on a Ray cluster (``ray.init(address=...)``), or on a Ray instance started here.

    Each item is one Ray task reserving ``cpus_per_item`` CPUs and ``gpus_per_item`` GPUs, so Ray's scheduler
    packs tasks onto the cluster's nodes. At most ``workers`` tasks are in flight (default: twice the
    cluster's CPUs divided by ``cpus_per_item``), which bounds the driver's memory for any number of slides.
    A task whose function raised, or whose worker died, or that Ray lost, becomes a failed outcome. Every
    node must be able to import ``oncofm`` (the same environment) and read and write the paths in the items
    (a shared filesystem).
    """

    name = "ray"

    def __init__(self, settings: ExecutorSettings) -> None:
        super().__init__(settings)
        try:
            import ray
        except ImportError:
            raise OncoFMError("the ray executor needs Ray: pip install 'oncofm[cluster]' (ray==2.60.0)") from None
        self._ray = ray
        self._initialised_here = False  # then close() disconnects (and stops an instance it started)
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"log_to_driver": False}
            if settings.address:
                kwargs["address"] = settings.address
            else:  # a throw-away instance on this machine ("local": never a cluster found in /tmp/ray)
                kwargs.update(address="local", num_cpus=settings.workers or os.cpu_count() or 1,
                              include_dashboard=False)
            self._initialised_here = True
            try:
                ray.init(**kwargs)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise OncoFMError(f"could not connect to the Ray cluster at '{settings.address}': {exc}. Start "
                                  "one with `ray start --head` or omit --address for a local instance") from None

    def n_workers(self, n_items: int) -> int:
        if self.settings.workers:
            return max(1, min(self.settings.workers, n_items))
        cpus = float(self._ray.cluster_resources().get("CPU", 1))
        return max(1, min(int(2 * cpus / self.settings.cpus_per_item), n_items))

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[tuple[int, ItemOutcome]]:
        ray = self._ray
        remote = ray.remote(_call).options(num_cpus=self.settings.cpus_per_item,
                                           num_gpus=self.settings.gpus_per_item,
                                           max_retries=self.settings.retries, retry_exceptions=False)
        fn_ref = ray.put(fn)  # shipped once, not once per task
        width = self.n_workers(len(items))
        next_i, running = 0, {}
        while next_i < len(items) or running:
            while next_i < len(items) and len(running) < width:
                running[remote.remote(fn_ref, items[next_i])] = next_i
                next_i += 1
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                i = running.pop(ref)
                try:
                    status, value, reason, secs = ray.get(ref)
                except ray.exceptions.RayError as exc:  # worker died, task lost, node gone
                    status, value, reason, secs = "failed", None, _ray_reason(exc), 0.0
                yield i, ItemOutcome(items[i], status, value, reason, secs)

    def close(self) -> None:
        if self._initialised_here and self._ray.is_initialized():
            self._ray.shutdown()


def _ray_reason(exc: BaseException) -> str:
    name = type(exc).__name__
    if "WorkerCrashed" in name or "ActorDied" in name or "OutOfMemory" in name:
        return f"the Ray worker died while running this item ({name})"
    return f"Ray: {name}: {' '.join(str(exc).split())[:300]}"


# ----------------------------------------------------------------------------------------------------------
# the one entry point
def run_per_item(
    fn: Callable[[Any], Any],
    items: Sequence[Any],
    *,
    executor: str | ExecutorSettings = "local",
    workers: int | None = None,
    address: str | None = None,
    description: str = "items",
    progress: bool = True,
) -> BatchResult:
    """Run ``fn(item)`` for every item on the chosen executor; failures are collected, never raised.

    Parameters
    ----------
    fn
        A picklable top-level function (or ``functools.partial`` of one) of one item. It owns its outputs:
        writes them atomically and returns early when they exist. Its return value must pickle.
    items
        Small, picklable descriptions of the work (paths as strings, cancer-type names), not data.
    executor, workers, address
        ``"local"`` or ``"ray"`` (or a full :class:`ExecutorSettings`), items at once, Ray address.

    Returns
    -------
    BatchResult
        Outcomes in item order; ``result.failures()`` is the failure table.
    """
    from oncofm.logging_utils import make_progress

    settings = executor if isinstance(executor, ExecutorSettings) else ExecutorSettings.build(
        executor=executor, workers=workers, address=address)
    items = list(items)
    outcomes: list[ItemOutcome | None] = [None] * len(items)
    t0 = time.perf_counter()
    engine = make_executor(settings)
    try:
        n_workers = engine.n_workers(max(1, len(items)))
        with make_progress() as bar:
            task = bar.add_task(f"{description} ({settings.executor}, {n_workers} workers)", total=len(items),
                                visible=progress)
            for i, outcome in engine.map(fn, items):
                outcomes[i] = outcome
                if outcome.status == "failed":
                    log.warning("failed: %s — %s", outcome.item, outcome.reason)
                bar.advance(task)
    finally:
        engine.close()
    result = BatchResult(outcomes=[o for o in outcomes if o is not None], executor=settings.executor,
                         workers=n_workers, seconds=time.perf_counter() - t0)
    log.info("%s: %d ok, %d failed in %.1f s on %s (%d workers)", description, len(items) - result.n_failed,
             result.n_failed, result.seconds, settings.executor, n_workers)
    return result
