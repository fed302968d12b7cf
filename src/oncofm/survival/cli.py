"""Command-line commands of this stage (registered into the root app)."""

from __future__ import annotations

import typer

from oncofm.errors import OncoFMError


def register(app: typer.Typer, train_app: typer.Typer) -> None:
    @app.command("cox", help="Fit the batched univariate Cox model per gene per cancer type (issue 3).")
    def _cox() -> None:
        raise OncoFMError("`cox` is not implemented yet")

    @app.command("features", help="Select genes and build the (expression, coefficient) pair tensor (issue 3).")
    def _features() -> None:
        raise OncoFMError("`features` is not implemented yet")
