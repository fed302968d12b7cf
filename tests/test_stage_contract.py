"""The stage contract: outputs are reused only when their stamp (settings hash + input versions) matches;
otherwise the stage stops naming each changed setting and ``--redo`` (or redoes, under ``on_change="redo"``)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import h5py
import pytest
from pydantic import Field

from oncofm.config import (
    StageSettings,
    StageStamp,
    artifact_version,
    check_stage,
    settings_hash,
    write_stamp,
)
from oncofm.errors import OncoFMError
from oncofm.training import TrainSettings

DEMO_IMAGES = Path(__file__).resolve().parents[1] / "src" / "oncofm" / "demo_data" / "images"


class ToySettings(StageSettings):
    stage = "toy"

    run: str = "r"
    width: int = 8
    train: TrainSettings = Field(default_factory=TrainSettings)
    threads: int = 0
    redo: bool = False


def _stage(tmp_path: Path, **values: object) -> tuple[ToySettings, Path, list[Path]]:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    (out / "model.bin").write_bytes(b"weights")
    (out / "data.txt").write_text("rows")
    return ToySettings(**values), out / "stamp.yaml", [out / "model.bin"]


def _lr(settings: ToySettings, lr: float) -> ToySettings:
    return settings.model_copy(update={"train": settings.train.model_copy(update={"lr": lr})})


def test_same_settings_skip(tmp_path: Path) -> None:
    settings, stamp, outputs = _stage(tmp_path)
    write_stamp(settings, stamp, ignore=("redo", "threads"))
    assert check_stage(settings, stamp, outputs, ignore=("redo", "threads"))
    # ignored and progress-only settings do not count: threads (ignored), train.progress (progress-only)
    same = settings.model_copy(update={"threads": 4, "train": settings.train.model_copy(update={"progress": False})})
    assert check_stage(same, stamp, outputs, ignore=("redo", "threads"))
    assert settings_hash(same, ("redo", "threads")) == settings_hash(settings, ("redo", "threads"))
    assert settings_hash(_lr(settings, 2e-3)) != settings_hash(settings)
    # the stamp is the settings YAML (readable by from_yaml) with the hash in its _meta
    assert ToySettings.from_yaml(stamp) == settings
    saved = StageStamp.read(stamp)
    assert saved is not None and saved.settings_hash == settings_hash(settings, ("redo", "threads"))


def test_changed_nested_setting_stops_naming_it(tmp_path: Path) -> None:
    settings, stamp, outputs = _stage(tmp_path)
    write_stamp(settings, stamp)
    changed = _lr(settings, 0.002).model_copy(update={"width": 16})
    with pytest.raises(OncoFMError) as info:
        check_stage(changed, stamp, outputs)
    msg = str(info.value)
    assert "train.lr: 0.001 -> 0.002" in msg and "width: 8 -> 16" in msg and "--redo" in msg
    assert "threads" not in msg and str(outputs[0]) in msg


def test_changed_setting_redo_policy_warns_and_reruns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings, stamp, outputs = _stage(tmp_path)
    write_stamp(settings, stamp)
    with caplog.at_level(logging.WARNING, logger="oncofm.config"):
        assert not check_stage(_lr(settings, 0.002), stamp, outputs, on_change="redo")
    assert "train.lr: 0.001 -> 0.002" in caplog.text


def test_redo_true_reruns(tmp_path: Path) -> None:
    settings, stamp, outputs = _stage(tmp_path)
    write_stamp(settings, stamp)
    assert not check_stage(settings.model_copy(update={"redo": True}), stamp, outputs)
    assert not check_stage(_lr(settings, 0.002).model_copy(update={"redo": True}), stamp, outputs)


def test_missing_outputs_run_and_missing_stamp_stops(tmp_path: Path) -> None:
    settings, stamp, outputs = _stage(tmp_path)
    # outputs exist, no stamp (a run from before stamps): cannot be checked, so not reused silently
    with pytest.raises(OncoFMError, match="no recorded settings") as info:
        check_stage(settings, stamp, outputs)
    assert "--redo" in str(info.value)
    assert not check_stage(settings, stamp, outputs, on_change="redo")
    # an output missing (interrupted run): the stage just runs, whatever the stamp says
    write_stamp(settings, stamp)
    assert not check_stage(_lr(settings, 0.002), stamp, [*outputs, outputs[0].parent / "absent.bin"])


def test_changed_input_version_stops(tmp_path: Path) -> None:
    settings, stamp, outputs = _stage(tmp_path)
    data = outputs[0].parent / "data.txt"
    write_stamp(settings, stamp, inputs={"data.txt": artifact_version(data)})
    assert check_stage(settings, stamp, outputs, inputs={"data.txt": artifact_version(data)})
    data.write_text("rows, rewritten by an upstream stage")
    with pytest.raises(OncoFMError, match=r"input data.txt changed: [0-9a-f]{12} -> [0-9a-f]{12}") as info:
        check_stage(settings, stamp, outputs, inputs={"data.txt": artifact_version(data)})
    assert "--redo" in str(info.value)


def test_plain_saved_settings_still_compare(tmp_path: Path) -> None:
    """A settings file written by StageSettings.save (every run before stamps) is a stamp without inputs."""
    settings, stamp, outputs = _stage(tmp_path)
    settings.save(stamp)
    assert check_stage(settings, stamp, outputs)
    with pytest.raises(OncoFMError, match="width: 8 -> 9"):
        check_stage(settings.model_copy(update={"width": 9}), stamp, outputs)
    with pytest.raises(OncoFMError, match=r"input up changed: \(not recorded\) -> v1"):
        check_stage(settings, stamp, outputs, inputs={"up": "v1"})


def test_artifact_version(tmp_path: Path) -> None:
    assert artifact_version(tmp_path / "absent") == "missing"
    f = tmp_path / "d" / "a.txt"
    f.parent.mkdir()
    f.write_text("x")
    v_file, v_dir = artifact_version(f), artifact_version(f.parent)
    assert artifact_version(f) == v_file and len(v_file) == 64
    os.utime(f, ns=(1, 1))
    assert artifact_version(f) != v_file and artifact_version(f.parent) != v_dir
    assert artifact_version(f, mtime=False) == artifact_version(f, mtime=False)
    (f.parent / "b.txt").write_text("y")
    assert artifact_version(f.parent, mtime=False) != artifact_version(f, mtime=False)


# --------------------------------------------------------------------------------------------------------
# tiling: a slide's .h5 made with another patch size is not reused
def test_tiling_stops_on_other_patch_size_and_retiles_with_redo(tmp_path: Path) -> None:
    from oncofm.pathology.tiling import TilingSettings, load_grid, tile_slides

    image = DEMO_IMAGES / "TCGA-06-0174-01Z-00-DX3.jpg"  # images.csv: 0.5 µm/px
    out = tmp_path / "tiles"
    h5 = out / "TCGA-06-0174-01Z-00-DX3.h5"

    def tile(**values: object) -> list:
        return tile_slides(TilingSettings(source=str(image), out=str(out), slide_mpp=0.5, qc=False, **values),
                           progress=False)

    assert [r.status for r in tile(patch_size=224)] == ["done"]
    n224 = len(load_grid(h5))
    assert load_grid(h5).attrs["settings_hash"]
    assert [r.status for r in tile(patch_size=224, workers=2)] == ["skipped"]  # workers does not change a grid

    with pytest.raises(OncoFMError) as info:
        tile(patch_size=112)
    assert "patch_size: 224 -> 112" in str(info.value) and "--redo" in str(info.value)
    assert int(load_grid(h5).attrs["patch_size"]) == 224  # left as it was

    assert [r.status for r in tile(patch_size=112, redo=True)] == ["done"]
    grid = load_grid(h5)
    assert int(grid.attrs["patch_size"]) == 112 and len(grid) > n224
    assert [r.status for r in tile(patch_size=112)] == ["skipped"]

    # an .h5 from before stamps: its settings cannot be checked, so it is not reused silently
    with h5py.File(h5, "a") as f:
        del f.attrs["stage_stamp"]
    with pytest.raises(OncoFMError, match="no recorded settings"):
        tile(patch_size=112)


# --------------------------------------------------------------------------------------------------------
# fusion: a model trained with other settings stops the stage before any LLM is loaded
def test_fusion_changed_setting_stops_before_loading_the_llm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    import oncofm.fusion.train as fusion_train
    from oncofm.fusion.train import FusionSettings, train_fusion
    from oncofm.paths import RunLayout

    def no_llm(*args: object, **kwargs: object) -> None:
        raise AssertionError("load_llm must not be called")

    monkeypatch.setattr(fusion_train, "load_llm", no_llm)
    run = tmp_path / "run"
    layout = RunLayout(run)
    out = layout.model_dir("fusion")
    (out / "adapter").mkdir(parents=True)
    (out / "projector.safetensors").write_bytes(b"fake")
    (out / "config.yaml").write_text("settings: {}\n")
    dataset = layout.reasoning_dir / "dataset.jsonl"
    dataset.parent.mkdir(parents=True)
    dataset.write_text('{"patient_id": "p1", "split": "train", "target": "t"}\n')
    settings = FusionSettings(run=str(run))
    write_stamp(settings, layout.settings_file("fusion"),
                inputs={"reasoning/dataset.jsonl": artifact_version(dataset)})

    assert train_fusion(settings)["weights"] == out / "projector.safetensors"  # same settings: skipped
    assert train_fusion(settings.model_copy(update={"max_eval_patients": 5, "threads": 1}))  # evaluation-only
    with pytest.raises(OncoFMError) as info:
        train_fusion(settings.model_copy(update={"lora_r": 8}))
    assert "lora_r: 16 -> 8" in str(info.value) and "--redo" in str(info.value)
    dataset.write_text('{"patient_id": "p1", "split": "train", "target": "a new target"}\n')
    with pytest.raises(OncoFMError, match="input reasoning/dataset.jsonl changed"):
        train_fusion(settings)
