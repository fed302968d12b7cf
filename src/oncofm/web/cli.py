"""``oncofm serve``: the web app."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer, train_app: typer.Typer) -> None:
    @app.command("serve")
    def serve_cmd(
        run: Path = typer.Option(..., "--run", "-r", help="Run directory with the trained stages."),
        host: str = typer.Option("127.0.0.1", help="Address to bind; the default serves this machine only."),
        port: int = typer.Option(8000, help="TCP port."),
        max_upload_mb: float = typer.Option(512.0, help="Largest accepted upload per file (MB)."),
        workers: int = typer.Option(2, help="Explanations that may run at the same time."),
        jobs_dir: Path | None = typer.Option(None, help="Folder for job outputs (default: a temporary folder)."),
    ) -> None:
        """Serve the OncoFM web app: pick a demo patient or upload files, get the report and heatmap.

        Works offline (no CDN). Binds 127.0.0.1 unless --host says otherwise; there is no authentication.
        Research use only, not for clinical decisions.
        """
        from oncofm.web.app import WebSettings, serve

        serve(WebSettings.build(run=str(run), host=host, port=port, max_upload_mb=max_upload_mb,
                                workers=workers, jobs_dir=None if jobs_dir is None else str(jobs_dir)))
