"""``oncofm demo``: the whole pipeline on the bundled real demo cohort (grows as stages land)."""

from __future__ import annotations

import typer


def register(app: typer.Typer, train_app: typer.Typer) -> None:
    @app.command("demo")
    def demo_cmd(run: str = typer.Option("runs/demo", help="Run directory for the demo."),
                 redo: bool = typer.Option(False, help="Redo every stage.")) -> None:
        """Run the full pipeline on the bundled demo data and print the report's path."""
        from oncofm.pipeline import run_demo

        run_demo(run, redo=redo)
