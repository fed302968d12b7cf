"""Typed settings per stage.

Every stage has a pydantic settings class derived from :class:`StageSettings`. Settings are validated
on construction (unknown keys are errors: a typo must not be silently ignored), can be read from YAML,
and are saved, resolved, beside the stage's outputs (``RUN/settings/<stage>.yaml``) so every number in a
run can be traced to the settings that produced it.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from oncofm.errors import OncoFMError, StageOutputsChanged
from oncofm.io import write_text

S = TypeVar("S", bound="StageSettings")


def read_settings_mapping(path: str | Path) -> dict[str, Any]:
    """The ``setting: value`` mapping of a settings YAML file (``_meta`` dropped); a clear error otherwise."""
    path = Path(path)
    if not path.exists():
        raise OncoFMError(f"settings file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise OncoFMError(f"{path}: expected a mapping of setting: value, got {type(data).__name__}")
    data.pop("_meta", None)
    return data


class StageSettings(BaseModel):
    """Base class of every stage's settings."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    stage: ClassVar[str] = "stage"

    @classmethod
    def from_yaml(cls: type[S], path: str | Path, **overrides: Any) -> S:
        """Read settings from a YAML file; keyword overrides win over the file."""
        data = read_settings_mapping(path)
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.build(**data)

    @classmethod
    def build(cls: type[S], **values: Any) -> S:
        """Construct and validate, turning pydantic's errors into one readable message."""
        try:
            return cls(**{k: v for k, v in values.items() if v is not None})
        except ValidationError as exc:
            lines = [f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
            raise OncoFMError(f"invalid {cls.stage} settings:\n" + "\n".join(lines)) from None

    def to_yaml_text(self) -> str:
        from oncofm import __version__

        data = self.model_dump(mode="json")
        data["_meta"] = {
            "stage": self.stage,
            "oncofm_version": __version__,
            "written_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "python": platform.python_version(),
        }
        return yaml.safe_dump(data, sort_keys=False)

    def save(self, path: str | Path) -> Path:
        """Write the resolved settings as YAML (atomically)."""
        return write_text(self.to_yaml_text(), path)

    def same_as_saved(self, path: str | Path, ignore: tuple[str, ...] = ()) -> bool:
        """True when ``path`` holds settings equal to these (used to decide whether a stage can be skipped)."""
        path = Path(path)
        if not path.exists():
            return False
        saved = yaml.safe_load(path.read_text()) or {}
        saved.pop("_meta", None)
        mine = self.model_dump(mode="json")
        for key in ignore:
            saved.pop(key, None)
            mine.pop(key, None)
        return saved == mine


# ----------------------------------------------------------------------------------------------------------
# stage contract: a stage's outputs are reused only when they were made with the same settings and inputs
#: Settings that change how a stage runs (progress bars, resuming, forcing a redo), never what it writes:
#: left out of every comparison, matched by key name at any depth (``progress`` and ``train.progress``).
PROGRESS_ONLY: tuple[str, ...] = ("redo", "progress", "resume")

_MISSING = object()
_log = logging.getLogger(__name__)


def _as_dict(settings: BaseModel | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(settings, BaseModel):
        return settings.model_dump(mode="json")
    return dict(settings)


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}`` (lists stay leaves)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def comparable_settings(settings: BaseModel | Mapping[str, Any], ignore: Sequence[str] = ("redo",)
                        ) -> dict[str, Any]:
    """The settings a stage's outputs depend on, flattened to dotted keys (``train.lr``).

    Parameters
    ----------
    settings
        A settings object, or its ``model_dump(mode="json")`` as saved in a stamp.
    ignore
        Dotted keys (``"threads"``, ``"train.num_workers"``, or a prefix such as ``"llm"``) that do not
        change the outputs; :data:`PROGRESS_ONLY` names are always left out.
    """
    flat = _flatten(_as_dict(settings))
    drop = tuple(ignore)
    return {k: v for k, v in flat.items()
            if k.rsplit(".", 1)[-1] not in PROGRESS_ONLY
            and not any(k == d or k.startswith(d + ".") for d in drop)}


def settings_hash(settings: BaseModel | Mapping[str, Any], ignore: Sequence[str] = ("redo",)) -> str:
    """sha256 of the canonical JSON (sorted keys) of :func:`comparable_settings`."""
    text = json.dumps(comparable_settings(settings, ignore), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def artifact_version(path: str | Path, *, mtime: bool = True) -> str:
    """A cheap version of an input artifact: sha256 of each file's name, size and (optionally) ``mtime_ns``.

    A directory's version covers every file under it (relative paths, sorted); a missing path is
    ``"missing"``. The file contents are not read, so the version is instant for any size, and any rewrite of
    an upstream artifact (a stage that reran) changes it. ``mtime=False`` keeps only names and sizes, for
    inputs that are copied around (a slide file) where a new mtime does not mean new content.
    """
    path = Path(path)
    if not path.exists():
        return "missing"
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for f in files:
        st = f.stat()
        name = f.name if f == path else f.relative_to(path).as_posix()
        digest.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns if mtime else 0}\n".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class StageStamp:
    """What a stage records beside its outputs: its resolved settings, their hash and its inputs' versions.

    ``settings`` holds every resolved setting (nothing ignored), so a later run can name each changed one;
    ``settings_hash`` is :func:`settings_hash` under the stage's ``ignore``; ``inputs`` maps an input's name
    to its version (:func:`artifact_version`).
    """

    settings: dict[str, Any]
    settings_hash: str = ""
    inputs: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, settings: BaseModel, ignore: Sequence[str] = ("redo",),
           inputs: Mapping[str, str] | None = None) -> StageStamp:
        """The stamp of ``settings`` (and ``inputs``) now."""
        return cls(settings=_as_dict(settings), settings_hash=settings_hash(settings, ignore),
                   inputs=dict(inputs or {}))

    def to_dict(self) -> dict[str, Any]:
        return {"settings": self.settings, "settings_hash": self.settings_hash, "inputs": self.inputs}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StageStamp:
        return cls(settings=dict(data.get("settings") or {}), settings_hash=str(data.get("settings_hash", "")),
                   inputs={str(k): str(v) for k, v in (data.get("inputs") or {}).items()})

    @classmethod
    def read(cls, path: str | Path) -> StageStamp | None:
        """The stamp in a settings YAML (:func:`write_stamp`, or a plain :meth:`StageSettings.save`: its
        settings are compared, its inputs count as unrecorded); ``None`` when the file does not exist."""
        path = Path(path)
        if not path.exists():
            return None
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            return None
        meta = data.pop("_meta", None) or {}
        return cls(settings=data, settings_hash=str(meta.get("settings_hash", "")),
                   inputs={str(k): str(v) for k, v in (meta.get("inputs") or {}).items()})


def _show(value: Any) -> str:
    return "(not recorded)" if value is _MISSING else repr(value)


def _short(version: Any) -> str:
    if version is _MISSING:
        return "(not recorded)"
    text = str(version)
    return text[:12] if len(text) == 64 else text


def stamp_changes(settings: BaseModel, saved: StageStamp, *, ignore: Sequence[str] = ("redo",),
                  inputs: Mapping[str, str] | None = None) -> list[str]:
    """One line per setting or input that differs between ``saved`` and now (empty: up to date).

    Settings read ``key: old -> new`` (dotted keys for nested settings, ``(not recorded)`` for a setting
    the stamp lacks); inputs read ``input NAME changed: old -> new`` (versions shortened).
    """
    lines: list[str] = []
    if saved.settings_hash != settings_hash(settings, ignore):  # a stale hash scheme falls back to the values
        old, new = comparable_settings(saved.settings, ignore), comparable_settings(settings, ignore)
        for key in [*new, *(k for k in old if k not in new)]:
            a, b = old.get(key, _MISSING), new.get(key, _MISSING)
            if a != b:
                lines.append(f"{key}: {_show(a)} -> {_show(b)}")
    for name, version in (inputs or {}).items():
        before = saved.inputs.get(name, _MISSING)
        if before != version:
            lines.append(f"input {name} changed: {_short(before)} -> {_short(version)}")
    return lines


REDO_HINT = ("Rerun with --redo to remake them with the current settings (this replaces the old outputs), "
             "or restore the old values to keep using them.")


def check_stamp(settings: BaseModel, saved: StageStamp | None, what: str, *, ignore: Sequence[str] = ("redo",),
                inputs: Mapping[str, str] | None = None, on_change: Literal["stop", "redo"] = "stop") -> bool:
    """Decide about existing outputs ``what`` from their stamp ``saved`` (``None``: no stamp recorded).

    Returns True when they can be reused (same settings and inputs); False when the stage must redo them
    (``settings.redo``, or a change under ``on_change="redo"``, which logs a warning naming the changes).
    Raises :class:`~oncofm.errors.OncoFMError` naming every change and ``--redo`` under ``on_change="stop"``.
    """
    if getattr(settings, "redo", False):
        return False
    if saved is None:
        header, changes = f"{what}: no recorded settings (made before stage stamps, or the stamp was deleted)", []
    else:
        changes = stamp_changes(settings, saved, ignore=ignore, inputs=inputs)
        if not changes:
            return True
        header = f"{what}: made with other settings or inputs than now"
    if on_change == "redo":
        _log.warning("%s%s; redoing", header, "".join(f"; {c}" for c in changes))
        return False
    raise StageOutputsChanged("\n".join([header + (":" if changes else ""), *(f"  {c}" for c in changes),
                                          REDO_HINT]))


def check_stage(settings: BaseModel, stamp_path: str | Path, outputs: Sequence[str | Path], *,
                ignore: Sequence[str] = ("redo",), inputs: Mapping[str, str] | None = None,
                on_change: Literal["stop", "redo"] = "stop", what: str | None = None) -> bool:
    """True when a stage can skip: every one of ``outputs`` exists and the stamp at ``stamp_path`` matches.

    Parameters
    ----------
    settings
        The stage's resolved settings (``settings.redo`` True always means "redo").
    stamp_path
        The stamp written by :func:`write_stamp` after the outputs (a plain saved settings YAML also works).
    outputs
        The stage's declared outputs; when any is missing the stage runs (an interrupted run is no change).
    ignore
        Dotted setting keys that do not change the outputs (see :func:`comparable_settings`).
    inputs
        Versions of the stage's inputs (:func:`artifact_version`), compared with the recorded ones.
    on_change
        ``"stop"``: raise :class:`~oncofm.errors.OncoFMError` naming each changed setting
        (``train.lr: 0.001 -> 0.002``) and input and ``--redo``; ``"redo"``: log that and return False.
    what
        How to name the outputs in messages (default: their folder, or the single output).

    Returns
    -------
    bool
        True: skip, the outputs are up to date; False: run the stage.
    """
    outputs = [Path(p) for p in outputs]
    if getattr(settings, "redo", False) or not all(p.exists() for p in outputs):
        return False
    if what is None:
        what = str(outputs[0]) if len(outputs) == 1 else str(Path(os.path.commonpath(outputs or [stamp_path])))
    return check_stamp(settings, StageStamp.read(stamp_path), what, ignore=ignore, inputs=inputs,
                       on_change=on_change)


def write_stamp(settings: StageSettings, stamp_path: str | Path, *, ignore: Sequence[str] = ("redo",),
                inputs: Mapping[str, str] | None = None) -> Path:
    """Write the stamp (call it after the outputs are written): the resolved settings YAML, as
    :meth:`StageSettings.save` writes it, with ``settings_hash`` and ``inputs`` added to its ``_meta``."""
    data = yaml.safe_load(settings.to_yaml_text())
    data["_meta"].update({"settings_hash": settings_hash(settings, ignore), "inputs": dict(inputs or {})})
    return write_text(yaml.safe_dump(data, sort_keys=False), stamp_path)
