"""``oncofm tile``: slides → tissue patch grids (``<slide>.h5`` + ``<slide>_qc.png``); ``oncofm encode``: patch
grids → feature bags (CLAM/TRIDENT ``.h5``, :mod:`oncofm.pathology.extract`)."""

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
    from oncofm.pathology.tiling import describe_grid

    for r in results:
        if r.status in ("done", "skipped"):
            note = f"{r.n_patches} patches" + (f": {describe_grid(r.summary)}" if r.summary else "")
        else:
            note = r.reason
        typer.echo(f"{r.status:8s} {Path(r.slide).name}  {note}")
    if results and all(r.status == "failed" for r in results):
        raise OncoFMError(f"every slide failed; see {Path(out) / 'failures.csv'}")


def encode_cmd(
    tiles: Path | None = typer.Argument(None, help="A tiles .h5 from `oncofm tile`, or a folder of them "
                                                  "(default: RUN/tiles with --run)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output folder of the feature bags (default with "
                                    "--run: RUN/models/slide/features/ENCODER, which `oncofm train slide` reuses)."),
    run: Path | None = typer.Option(None, "--run", "-r", help="Run directory."),
    encoder: str = typer.Option("efficientnet-lite0", "--encoder", "-e", help="Patch encoder (registered name: "
                                "swin-cpu, swin-tiny, swin-small, swin-base, swin-hf, efficientnet-lite0, ...)."),
    encoder_weights: Path | None = typer.Option(
        None, "--encoder-weights", help="Local pretrained weights: a Hugging Face model folder (Swin) or a "
        ".safetensors/.pt/.pth/.bin state dict of the encoder."),
    batch_size: int = typer.Option(64, "--batch-size", "-b", help="Patches per encoder batch."),
    workers: int | None = typer.Option(None, "--workers", "-j", help="DataLoader processes reading patches (0: "
                                       "none; default: half the CPU cores, 1 to 8)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N."),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16/fp16 autocast on a GPU, fp32 on a CPU) "
                                  "| fp32 | bf16 | fp16."),
    features_dtype: str = typer.Option("float32", "--features-dtype", help="float32 | float16 in the .h5."),
    optimize: bool = typer.Option(True, "--optimize/--no-optimize",
                                  help="CPU: run a TorchScript-frozen copy of the encoder (checked against it)."),
    slide_mpp: float | None = typer.Option(None, "--slide-mpp", help="Level-0 µm/px for slides without it."),
    redo: bool = typer.Option(False, "--redo", help="Encode slides that already have features."),
) -> None:
    """Encode tiled slides' patches into feature bags (CLAM/TRIDENT .h5: features, coords, attributes).

    Patches are read by DataLoader worker processes and batched through the encoder (bf16/fp16 autocast on
    a GPU). Finished slides are skipped, each slide is written atomically, and OUT/failures.csv lists the
    slides that failed, with the reason.
    """
    from oncofm.errors import OncoFMError
    from oncofm.pathology.extract import EncodeSettings, encode_slides
    from oncofm.paths import RunLayout

    if tiles is None:
        if run is None:
            raise OncoFMError("pass TILES (a tiles .h5 or folder) or --run RUN (then RUN/tiles)")
        tiles = RunLayout(run).tiles_dir
    if out is None:
        if run is None:
            raise OncoFMError("pass --out DIR or --run RUN (features then go to RUN/models/slide/features/ENCODER)")
        from oncofm.pathology.artifacts import SlideArtifacts

        out = SlideArtifacts.of(run).features_dir / encoder
    settings = EncodeSettings.build(tiles=str(tiles), out=str(out), encoder=encoder,
                                    encoder_weights=str(encoder_weights) if encoder_weights else None,
                                    batch_size=batch_size, workers=workers, device=device, precision=precision,
                                    features_dtype=features_dtype, optimize=optimize, slide_mpp=slide_mpp, redo=redo)
    results = encode_slides(settings)
    for r in results:
        typer.echo(r.describe())
    if results and all(r.status == "failed" for r in results):
        raise OncoFMError(f"every slide failed; see {Path(out) / 'failures.csv'}")


def register(app: typer.Typer, train_app: typer.Typer) -> None:
    app.command("tile", help="Tile slides into tissue patches at a target magnification (issue 4).")(tile_cmd)
    app.command("encode", help="Encode tiled slides' patches into feature bags, CLAM/TRIDENT .h5 (issue 19).")(
        encode_cmd)
