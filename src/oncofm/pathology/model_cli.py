"""``oncofm train slide``, ``oncofm heatmap`` (the MIL slide model), ``oncofm slide-features`` (import slide-level
features) and ``oncofm train slide-features`` (the slide branch on them)."""

from __future__ import annotations

from pathlib import Path

import typer


def _yaml_mapping(path: Path) -> dict:
    """The settings mapping of a YAML file (``_meta`` dropped), as ``StageSettings.from_yaml`` reads it."""
    from oncofm.config import read_settings_mapping

    return read_settings_mapping(path)


def register(app: typer.Typer, train_app: typer.Typer) -> None:
    @train_app.command("slide")
    def _slide_train(
        run: Path = typer.Option(..., "--run", "-r", help="Run directory (cohort/slides.parquet + tiles/)."),
        preset: str | None = typer.Option(None, help="Start from a named recipe; 'benchmark': the one behind the "
                                                     "README's slide numbers (bench/slide_mil.py: EfficientNet-Lite0 "
                                                     "multiscale features, z-scored, hidden 32, instance dropout "
                                                     "and loss; see docs/slide_model.md). --config and flags "
                                                     "override it."),
        encoder: str | None = typer.Option(None, help="Patch encoder: swin-cpu (default), swin-tiny, swin-small, "
                                                      "swin-base, efficientnet-lite0."),
        encoder_weights: Path | None = typer.Option(None, help="Local pretrained encoder weights (HF Swin "
                                                               "folder, .safetensors or .pt)."),
        aggregator: str | None = typer.Option(None, help="gated-attention (default) | mean."),
        mode: str | None = typer.Option(None, help="features (frozen encoder, cached; default) | end-to-end."),
        bag_size: int | None = typer.Option(None, help="Patches sampled per slide per step (end-to-end)."),
        epochs: int | None = typer.Option(None, help="Maximum epochs."),
        lr: float | None = typer.Option(None, help="Learning rate."),
        slide_mpp: float | None = typer.Option(None, "--slide-mpp", help="Level-0 µm/px of slides without it."),
        config: Path | None = typer.Option(None, help="YAML with SlideTrainSettings (flags override it)."),
        redo: bool = typer.Option(False, help="Retrain even if the outputs are up to date."),
    ) -> None:
        """Train the slide model (patch encoder + attention MIL) from slide-level 5-year labels.

        Writes RUN/models/slide/: model.safetensors, config.yaml, metrics.json (slide AUC + 95% CI
        per split, with counts), predictions.parquet, embeddings.parquet (per patient),
        attention/<slide>.parquet. Needs `oncofm tile ... --out RUN/tiles` first.
        """
        from oncofm.pathology.slide_train import SlideTrainSettings, train_slide_model
        from oncofm.training import TrainSettings

        values = dict(run=str(run), encoder=encoder, aggregator=aggregator, mode=mode, bag_size=bag_size,
                      slide_mpp=slide_mpp, encoder_weights=str(encoder_weights) if encoder_weights else None,
                      redo=True if redo else None)
        if preset:  # the preset, then the YAML's values, then the flags
            file_values = _yaml_mapping(config) if config else {}
            settings = SlideTrainSettings.preset(preset, **{**file_values, **{k: v for k, v in values.items()
                                                                              if v is not None}})
        else:
            settings = (SlideTrainSettings.from_yaml(config, **values) if config
                        else SlideTrainSettings.build(**values))
        overrides = {k: v for k, v in dict(epochs=epochs, lr=lr).items() if v is not None}
        if overrides:
            settings.train = TrainSettings.build(**{**settings.train.model_dump(), **overrides})
        for name, path in train_slide_model(settings).items():
            typer.echo(f"{name}: {path}")

    @app.command("slide-features")
    def _slide_features_import(
        run: Path = typer.Option(..., "--run", "-r", help="Run directory with an imported cohort."),
        source: list[str] = typer.Option(..., "--source", "-s", help="A table of slide-level features "
                                         "(.csv/.tsv[.gz]/.parquet; e.g. the hif2gene HIFs) or a folder of "
                                         "per-slide .h5 embeddings (TRIDENT/STAMP); repeat for several files."),
        key: str = typer.Option("auto", help="What the barcodes name: auto | patient | slide."),
        combine: str = typer.Option("mean", help="Several slides of a patient: mean (NaN-aware) | first."),
        barcode_column: str | None = typer.Option(None, help="The barcode column (default: found by name)."),
        expected_features: Path | None = typer.Option(None, help="The feature list a model was trained on "
                                                      "(.txt, .csv, or another run's slide_features.parquet): "
                                                      "the import stops when the source differs."),
        redo: bool = typer.Option(False, help="Re-import even if up to date."),
    ) -> None:
        """Import slide-level image features into the run (RUN/cohort/slide_features.parquet + .json)."""
        from oncofm.cohort.slide_features import SlideFeatureSettings, import_slide_features

        settings = SlideFeatureSettings.build(
            run=str(run), source=source[0] if len(source) == 1 else source, key=key, combine=combine,
            barcode_column=barcode_column, expected_features=str(expected_features) if expected_features else None,
            redo=redo)
        for name, path in import_slide_features(settings).items():
            typer.echo(f"{name}: {path}")

    @train_app.command("slide-features")
    def _slide_features_train(
        run: Path = typer.Option(..., "--run", "-r", help="Run directory with imported slide features."),
        hidden: int | None = typer.Option(None, help="Embedding width (default 32)."),
        epochs: int | None = typer.Option(None, help="Maximum epochs."),
        config: Path | None = typer.Option(None, help="YAML with SlideFeatureSettings (flags override it)."),
        redo: bool = typer.Option(False, help="Retrain even if the outputs are up to date."),
    ) -> None:
        """Train the slide branch on slide-level features (training split; epoch by validation AUC).

        Writes RUN/models/slide_features/: model.safetensors, config.yaml, reference.parquet,
        metrics.json (AUC with 95% CI and C-index per split, pooled and per cancer type), predictions,
        embeddings and attributions (integrated gradients, with within-cancer-type percentiles).
        """
        from oncofm.pathology.feature_model import SlideFeatureSettings, train_slide_feature_model
        from oncofm.training import TrainSettings

        values = {k: v for k, v in dict(run=str(run), hidden=hidden, redo=True if redo else None).items()
                  if v is not None}
        settings = (SlideFeatureSettings.from_yaml(config, **values) if config
                    else SlideFeatureSettings.build(**values))
        if epochs is not None:
            settings.train = TrainSettings.build(**{**settings.train.model_dump(), "epochs": epochs})
        for name, path in train_slide_feature_model(settings).items():
            typer.echo(f"{name}: {path}")

    @app.command("heatmap")
    def _heatmap(
        run: Path = typer.Option(..., "--run", "-r", help="Run directory with a trained slide model."),
        slide: list[str] = typer.Option([], "--slide", "-s", help="Slide stem(s); default: every slide."),
        out: Path | None = typer.Option(None, "--out", "-o", help="Output folder (default "
                                                                  "RUN/models/slide/heatmaps)."),
        top_k: int = typer.Option(8, help="Patches in the top-attention gallery (0: none)."),
        blur: float = typer.Option(0.0, help="Gaussian blur, in patch widths."),
        thumb_size: int = typer.Option(1536, help="Longer side of the thumbnail in pixels."),
        cmap: str = typer.Option("inferno", help="Matplotlib colour map."),
        alpha: float = typer.Option(0.55, help="Opacity of the colours over tissue."),
    ) -> None:
        """Draw the slide model's attention over each slide's thumbnail, plus a gallery of the most
        attended patches with the Swin's own attention inside them."""
        from oncofm.pathology.heatmap import HeatmapSettings, heatmaps_for_run

        settings = HeatmapSettings.build(top_k=top_k, blur=blur, thumb_size=thumb_size, cmap=cmap, alpha=alpha)
        for path in heatmaps_for_run(run, slide or None, settings, out):
            typer.echo(str(path))
