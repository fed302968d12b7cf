"""The demo owns its run: outputs an older OncoFM made with other settings are remade, not a stop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from oncofm import pipeline
from oncofm.errors import OncoFMError, StageOutputsChanged


def test_demo_remakes_a_stage_whose_outputs_were_made_with_other_settings(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bool] = []

    def tiles(run: Path, redo: bool) -> None:
        calls.append(redo)
        if not redo:
            raise StageOutputsChanged("tiles x.h5: made with other settings or inputs than now:\n  a: 1 -> 2")

    monkeypatch.setattr(pipeline, "STAGES", [("tiles", tiles)])
    record = pipeline.run_demo(tmp_path)
    assert calls == [False, True]
    assert record["stages"]["tiles"]["status"] == "remade"
    assert json.loads((tmp_path / pipeline.TIMINGS_FILE).read_text())["stages"]["tiles"]["status"] == "remade"


def test_other_errors_still_stop_the_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(run: Path, redo: bool) -> None:
        raise OncoFMError("bad input")

    monkeypatch.setattr(pipeline, "STAGES", [("cohort", broken)])
    with pytest.raises(OncoFMError, match="bad input"):
        pipeline.run_demo(tmp_path)
