"""Cohort importers, registered by format name.

An importer is a function ``(settings: ImportSettings) -> ImportedCohort``. Register a new one with
``@register_importer("name")``; ``oncofm cohort import --format name`` then finds it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pandas as pd

from oncofm.errors import OncoFMError

if TYPE_CHECKING:
    from oncofm.cohort.importing import ImportSettings


@dataclass
class ImportedCohort:
    """What an importer returns, before validation and writing."""

    patients: pd.DataFrame
    expression: pd.DataFrame
    cnv: pd.DataFrame | None = None
    mutation: pd.DataFrame | None = None
    slides: pd.DataFrame | None = None  # patient_id, slide_id (file name or path)
    notes: list[str] = field(default_factory=list)  # soft problems, reported in the summary
    # which file each table came from, for error messages: keys "clinical", "expression", "cnv", "mutation"
    files: dict[str, str] = field(default_factory=dict)


Importer = Callable[["ImportSettings"], ImportedCohort]
_IMPORTERS: dict[str, Importer] = {}
_BUILTIN_MODULES = ("tcga13", "firehose", "generic", "gdc")


def register_importer(name: str) -> Callable[[Importer], Importer]:
    def deco(fn: Importer) -> Importer:
        _IMPORTERS[name] = fn
        return fn

    return deco


def _load_builtins() -> None:
    import importlib

    for mod in _BUILTIN_MODULES:
        try:
            importlib.import_module(f"oncofm.cohort.importers.{mod}")
        except ModuleNotFoundError as exc:  # a builtin not written yet
            if exc.name != f"oncofm.cohort.importers.{mod}":
                raise


def get_importer(name: str) -> Importer:
    """The importer registered as ``name`` (error listing the known formats otherwise)."""
    _load_builtins()
    if name not in _IMPORTERS:
        raise OncoFMError(f"unknown cohort format '{name}'; choose one of: {', '.join(available_formats())}")
    return _IMPORTERS[name]


def available_formats() -> list[str]:
    _load_builtins()
    return sorted(_IMPORTERS)
