"""Cohort importers, registered by format name.

An importer is a function ``(settings: ImportSettings) -> ImportedCohort``. Register a new one with
``@register_importer("name")`` (:mod:`oncofm.cohort.importers.registry`); ``oncofm cohort import --format
name`` then finds it.
"""

from __future__ import annotations

from oncofm.cohort.importers.registry import _IMPORTERS, ImportedCohort, Importer, register_importer
from oncofm.errors import OncoFMError

__all__ = ["ImportedCohort", "Importer", "available_formats", "get_importer", "register_importer"]


def _load_builtins() -> None:
    """Register the built-in importers (plain imports: a broken importer module fails loudly)."""
    from oncofm.cohort.importers import firehose, gdc, generic, tcga13  # noqa: F401 - registers them


def get_importer(name: str) -> Importer:
    """The importer registered as ``name`` (error listing the known formats otherwise)."""
    _load_builtins()
    if name not in _IMPORTERS:
        raise OncoFMError(f"unknown cohort format '{name}'; choose one of: {', '.join(available_formats())}")
    return _IMPORTERS[name]


def available_formats() -> list[str]:
    _load_builtins()
    return sorted(_IMPORTERS)
