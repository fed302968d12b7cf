"""The per-item executor: every item gets an outcome, in order; a raising item or a dying worker process
becomes one row of the failure table and the rest of the batch goes on."""

from __future__ import annotations

import os

import pandas as pd
import pytest

from oncofm.distributed.executor import EXECUTORS, ExecutorSettings, make_executor, run_per_item
from oncofm.errors import OncoFMError


def _square_or_fail(x: int) -> int:
    if x == 3:
        raise OncoFMError("item 3 is corrupt")
    if x == 5:
        os._exit(17)  # the worker process dies, as with a segfault in a slide decoder
    return x * x


def test_local_pool_collects_raised_and_crashed_items(tmp_path):
    result = run_per_item(_square_or_fail, list(range(8)), executor="local", workers=2, progress=False)
    assert [o.item for o in result.outcomes] == list(range(8))  # item order, whatever the finishing order
    assert [o.value for o in result.outcomes if o.status == "ok"] == [0, 1, 4, 16, 36, 49]
    table = result.failures()
    assert list(table["item"]) == ["3", "5"]
    assert table.loc[0, "reason"] == "item 3 is corrupt"
    assert "worker process died" in table.loc[1, "reason"]
    written = pd.read_csv(result.write_failures(tmp_path / "failures.csv"))
    assert list(written["item"]) == [3, 5]


def test_inline_single_worker_matches_pool():
    inline = run_per_item(_square_or_fail, [0, 1, 2, 3, 4], executor="local", workers=1, progress=False)
    assert inline.values == [0, 1, 4, None, 16]
    assert list(inline.failures()["item"]) == ["3"]


def test_registry_and_bad_executor_name():
    assert {"local", "ray"} <= set(EXECUTORS)
    with pytest.raises(OncoFMError, match="unknown executor 'slurm'"):
        make_executor(ExecutorSettings(executor="slurm"))
    with pytest.raises(OncoFMError, match="workers"):
        ExecutorSettings.build(workers=0)


def _unpicklable(x: int):
    return (lambda: x) if x == 1 else x  # a lambda cannot travel back from a worker process


def test_result_that_cannot_be_returned_is_a_failure():
    result = run_per_item(_unpicklable, [0, 1, 2], executor="local", workers=2, progress=False)
    assert [o.status for o in result.outcomes] == ["ok", "failed", "ok"]
    assert result.values[0] == 0 and result.values[2] == 2
