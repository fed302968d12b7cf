"""Command-line commands of this stage (registered into the root app)."""

from __future__ import annotations

import typer

from oncofm.errors import OncoFMError


def register(app: typer.Typer, train_app: typer.Typer) -> None:
    @app.command("tile", help="Tile slides into tissue patches at a target magnification (issue 4).")
    def _tile() -> None:
        raise OncoFMError("`tile` is not implemented yet")
