"""The demo pipeline: every stage in order on the bundled demo cohort, reusing finished stages."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from oncofm.data import demo_data_dir

log = logging.getLogger(__name__)


def run_demo(run: str | Path, redo: bool = False) -> dict[str, float]:
    """Run each stage on the demo cohort; return the wall time per stage (seconds)."""
    from oncofm.cohort.importing import ImportSettings, import_cohort
    from oncofm.cohort.splits import SplitSettings, split_cohort
    from oncofm.cohort.summary import summarize_cohort

    run = Path(run)
    times: dict[str, float] = {}

    def stage(name: str, fn) -> None:  # noqa: ANN001
        t0 = time.perf_counter()
        fn()
        times[name] = round(time.perf_counter() - t0, 2)
        log.info("stage %-10s %.1f s", name, times[name])

    src = demo_data_dir()
    stage("cohort", lambda: import_cohort(ImportSettings(format="tcga13", source=str(src), run=str(run), redo=redo)))
    stage("split", lambda: split_cohort(SplitSettings(run=str(run), redo=redo)))
    stage("summary", lambda: summarize_cohort(run))
    log.info("demo finished: %s", ", ".join(f"{k} {v:.1f}s" for k, v in times.items()))
    return times
