"""Command-line commands of this stage (registered into the root app)."""

from __future__ import annotations

import typer

from oncofm.errors import OncoFMError


def register(app: typer.Typer, train_app: typer.Typer) -> None:
    @train_app.command("slide", help="Train the Swin + attention-MIL slide model (issue 6).")
    def _slide_train() -> None:
        raise OncoFMError("`train slide` is not implemented yet")

    @app.command("heatmap", help="Draw attention heatmaps over a slide (issue 6).")
    def _heatmap() -> None:
        raise OncoFMError("`heatmap` is not implemented yet")
