"""Typed settings per stage.

Every stage has a pydantic settings class derived from :class:`StageSettings`. Settings are validated
on construction (unknown keys are errors: a typo must not be silently ignored), can be read from YAML,
and are saved, resolved, beside the stage's outputs (``RUN/settings/<stage>.yaml``) so every number in a
run can be traced to the settings that produced it.
"""

from __future__ import annotations

import datetime as _dt
import platform
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from oncofm.errors import OncoFMError
from oncofm.io import write_text

S = TypeVar("S", bound="StageSettings")


class StageSettings(BaseModel):
    """Base class of every stage's settings."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    stage: ClassVar[str] = "stage"

    @classmethod
    def from_yaml(cls: type[S], path: str | Path, **overrides: Any) -> S:
        """Read settings from a YAML file; keyword overrides win over the file."""
        path = Path(path)
        if not path.exists():
            raise OncoFMError(f"settings file {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise OncoFMError(f"{path}: expected a mapping of setting: value, got {type(data).__name__}")
        data.pop("_meta", None)
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
