"""The registry of cohort importers (format name -> importer function) and what an importer returns.

An importer is a function ``(settings: ImportSettings) -> ImportedCohort``. Register a new one with
``@register_importer("name")``; ``oncofm cohort import --format name`` then finds it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pandas as pd

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


def register_importer(name: str) -> Callable[[Importer], Importer]:
    def deco(fn: Importer) -> Importer:
        _IMPORTERS[name] = fn
        return fn

    return deco
