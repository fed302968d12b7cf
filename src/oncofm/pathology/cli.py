"""``oncofm tile``: slides → tissue patch grids (``<slide>.h5`` + ``<slide>_qc.png``)."""

from __future__ import annotations

from pathlib import Path

import typer


def tile_cmd(
    source: Path = typer.Argument(..., help="A slide (SVS, NDPI, MRXS, SCN, DICOM, TIFF, JPEG, PNG, ...) or a "
                                            "folder of slides."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output folder (default: RUN/tiles with --run)."),
    run: Path | None = typer.Option(None, "--run", "-r", help="Run directory; tiles go to RUN/tiles."),
    mpp: float = typer.Option(0.5, "--mpp", help="Target resolution of the patches in µm/px (0.5 ≈ 20x)."),
    size: int = typer.Option(224, "--size", help="Patch side in pixels at the target resolution."),
    min_tissue: float = typer.Option(0.5, "--min-tissue", help="Minimum tissue fraction of a kept patch."),
    workers: int = typer.Option(1, "--workers", "-j", help="Worker processes (one slide each at a time)."),
    slide_mpp: float | None = typer.Option(
        None, "--slide-mpp",
        help="Level-0 µm/px for slides whose files do not record it (plain JPEG/PNG tiles, some SVS)."),
    max_ink: float = typer.Option(0.0, "--max-ink", help="Drop patches with more than this pen/ink fraction."),
    qc: bool = typer.Option(True, "--qc/--no-qc", help="Write <slide>_qc.png (thumbnail, tissue, grid)."),
    redo: bool = typer.Option(False, "--redo", help="Re-tile slides that already have an .h5."),
    executor: str = typer.Option("local", "--executor", help="local (process pool) | ray (a Ray cluster)."),
    address: str | None = typer.Option(None, "--address",
                                       help="Ray cluster address (e.g. ray://head:10001); default: a local Ray."),
) -> None:
    """Tile slides into tissue patches at a target magnification.

    Writes OUT/<slide>.h5 (level-0 patch coordinates, read level, tissue fraction, slide metadata),
    OUT/<slide>_qc.png and OUT/failures.csv (slides that could not be tiled, with the reason). Finished
    slides are skipped; several runs (or machines) may share OUT at once.
    """
    from oncofm.errors import OncoFMError
    from oncofm.pathology.tiling import TilingSettings, tile_slides
    from oncofm.paths import RunLayout

    if out is None:
        if run is None:
            raise OncoFMError("pass --out DIR or --run RUN (tiles then go to RUN/tiles)")
        out = RunLayout(run).tiles_dir

    settings = TilingSettings.build(source=str(source), out=str(out), target_mpp=mpp, patch_size=size,
                                    min_tissue=min_tissue, workers=workers, slide_mpp=slide_mpp,
                                    max_ink=max_ink, qc=qc, redo=redo)
    if executor == "local" and address is None:
        results = tile_slides(settings)
    else:  # one task per slide on a cluster; same skip / lock / failures.csv behaviour
        from oncofm.distributed.slides import tile_many
        from oncofm.pathology.reader import find_slides

        results = tile_many(find_slides(settings.source), settings.out, settings, executor=executor,
                            workers=workers, address=address)
    for r in results:
        note = f"{r.n_patches} patches" if r.status == "done" else r.reason
        typer.echo(f"{r.status:8s} {Path(r.slide).name}  {note}")
    if results and all(r.status == "failed" for r in results):
        raise OncoFMError(f"every slide failed; see {Path(out) / 'failures.csv'}")


def register(app: typer.Typer, train_app: typer.Typer) -> None:
    app.command("tile", help="Tile slides into tissue patches at a target magnification (issue 4).")(tile_cmd)
