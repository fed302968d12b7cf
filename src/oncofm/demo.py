"""``oncofm demo``: the whole pipeline on the bundled real demo cohort, then a report for a demo patient."""

from __future__ import annotations

import typer


def register(app: typer.Typer, train_app: typer.Typer) -> None:
    @app.command("demo")
    def demo_cmd(run: str = typer.Option("runs/demo", help="Run directory for the demo."),
                 redo: bool = typer.Option(False, help="Redo every stage (default: reuse finished ones).")) -> None:
        """Run the full pipeline on the bundled demo data and print the report's path.

        Stages: cohort, split, summary, cox, features, train omics, tiles, train slide, reasoning,
        train fusion, explain. Finished stages are reused on a second run; wall times per stage go to
        RUN/demo_timings.json.
        """
        from oncofm.pipeline import TIMINGS_FILE, run_demo

        record = run_demo(run, redo=redo)
        for name, r in record["stages"].items():
            typer.echo(f"{name:<13} {r['seconds']:8.1f} s  {r['status']}")
        typer.echo(f"total         {record['total_seconds']:8.1f} s  (timings: {run}/{TIMINGS_FILE})")
        if record["report"]:
            typer.echo(f"report: {record['report']}")
