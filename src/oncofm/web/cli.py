"""Command-line commands of this stage (registered into the root app)."""

from __future__ import annotations

import typer

from oncofm.errors import OncoFMError


def register(app: typer.Typer, train_app: typer.Typer) -> None:
    @app.command("serve", help="Serve the web app (issue 8).")
    def _serve() -> None:
        raise OncoFMError("`serve` is not implemented yet")
