"""Command-line commands of this stage (registered into the root app)."""

from __future__ import annotations

import typer

from oncofm.errors import OncoFMError


def register(app: typer.Typer, train_app: typer.Typer) -> None:
    @train_app.command("omics", help="Train the tabular transformer on gene tokens (issue 5).")
    def _omics_train() -> None:
        raise OncoFMError("`train omics` is not implemented yet")

    @app.command("evaluate", help="Apply a trained model to another cohort (issue 5).")
    def _evaluate() -> None:
        raise OncoFMError("`evaluate` is not implemented yet")
