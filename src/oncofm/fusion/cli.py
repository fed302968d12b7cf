"""Command-line commands of this stage (registered into the root app)."""

from __future__ import annotations

import typer

from oncofm.errors import OncoFMError


def register(app: typer.Typer, train_app: typer.Typer) -> None:
    @app.command("reasoning", help="Build the reasoning-text dataset (issue 7).")
    def _reasoning() -> None:
        raise OncoFMError("`reasoning` is not implemented yet")

    @train_app.command("fusion", help="Fine-tune the LLM with projected embeddings (issue 7).")
    def _fusion_train() -> None:
        raise OncoFMError("`train fusion` is not implemented yet")
