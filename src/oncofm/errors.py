"""Exceptions that carry a message telling the user what to fix.

The CLI catches :class:`OncoFMError` and prints its message without a traceback.
"""

from __future__ import annotations


class OncoFMError(Exception):
    """Base class for errors caused by user input or data, reported without a traceback."""


class DataValidationError(OncoFMError, ValueError):
    """Input data violates the cohort schema (names the file, column and offending rows)."""

    def __init__(self, message: str, *, file: str | None = None, column: str | None = None,
                 rows: list | None = None) -> None:
        parts = []
        if file:
            parts.append(f"{file}")
        if column:
            parts.append(f"column '{column}'")
        where = ": ".join(parts)
        text = f"{where}: {message}" if where else message
        if rows:
            shown = ", ".join(str(r) for r in list(rows)[:5])
            more = f" (and {len(rows) - 5} more)" if len(rows) > 5 else ""
            text += f" — offending rows: {shown}{more}"
        super().__init__(text)
        self.file, self.column, self.rows = file, column, rows


class MissingArtifactError(OncoFMError, FileNotFoundError):
    """A stage needs an artifact that an earlier stage has not written yet."""

    def __init__(self, path: object, hint: str) -> None:
        super().__init__(f"{path} does not exist. {hint}")


class StageOutputsChanged(OncoFMError):
    """A stage's existing outputs were made with other settings or inputs, and the stage stops rather than
    replace them (``oncofm.config.check_stage(on_change="stop")``); ``--redo`` replaces them."""
