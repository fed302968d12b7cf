"""Command-line commands of this stage (registered into the root app)."""

from __future__ import annotations

import typer

from oncofm.errors import OncoFMError


def register(app: typer.Typer, train_app: typer.Typer) -> None:
    @app.command("explain", help="Explain a new patient: text + heatmap report (issue 8).")
    def _explain() -> None:
        raise OncoFMError("`explain` is not implemented yet")
