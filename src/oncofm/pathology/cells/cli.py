"""``oncofm cells train`` and ``oncofm cells evaluate``: the cell-type model on BRCA-M2C (issue 20)."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Cell-type model (inflammatory / epithelial / stromal nuclei) trained on BRCA-M2C.",
                  no_args_is_help=True, rich_markup_mode=None)


@app.command("train")
def train(
    out: Path = typer.Option(..., "--out", "-o", help="Model folder to write (weights, config.yaml, split.csv, "
                                                      "validation.json, settings.yaml)."),
    data: Path | None = typer.Option(None, help="The BRCA-M2C folder (default: "
                                                "shared/data/pathology/brca_m2c_tcga_rois)."),
    design: list[str] | None = typer.Option(None, "--design", help="Design(s) to train and compare on validation: "
                                                                   "log-gbm, unet, unet-ensemble (default: log-gbm and unet)."),
    epochs: int | None = typer.Option(None, help="U-Net epochs (of unet.steps_per_epoch steps)."),
    seed: int | None = typer.Option(None, help="Seed of the patient split and the training."),
    radius_um: float | None = typer.Option(None, help="Match radius in µm (default 6 µm = 12 px)."),
    config: Path | None = typer.Option(None, help="YAML with CellTrainSettings (flags override it)."),
    redo: bool = typer.Option(False, help="Retrain even if the model is up to date."),
) -> None:
    """Split BRCA-M2C by patient (train / val / test), train each design on the training patients, tune its
    per-class score thresholds and compare the designs on validation, and save the best in OUT.

    The test patients are not read; score them once with `oncofm cells evaluate --model OUT`.
    """
    from oncofm.pathology.cells.data import default_data_dir
    from oncofm.pathology.cells.settings import CellTrainSettings
    from oncofm.pathology.cells.train import train_cells, validation_table

    values = dict(out=str(out), data=str(data or default_data_dir()), designs=list(design) if design else None,
                  seed=seed, radius_um=radius_um, redo=True if redo else None)
    settings = CellTrainSettings.from_yaml(config, **values) if config else CellTrainSettings.build(**values)
    if epochs is not None:
        settings.unet.train = settings.unet.train.model_copy(update={"epochs": epochs})
    paths = train_cells(settings)
    typer.echo(validation_table(paths["model"]))
    typer.echo(f"\nmodel: {paths['model']}")


@app.command("evaluate")
def evaluate(
    model: Path = typer.Option(..., "--model", "-m", help="A model folder from `oncofm cells train`."),
    data: Path | None = typer.Option(None, help="The BRCA-M2C folder (default: the one the model was trained on)."),
    split: str = typer.Option("test", help="Which images of the recorded split to score: test (default) or val."),
) -> None:
    """Score the model on its held-out test patients as cell detection: per-class precision, recall, F1 and
    macro F1 (a prediction counts within the radius of an annotated cell of its class, one-to-one).
    Writes MODEL/test_metrics.json and test_table.txt."""
    from oncofm.pathology.cells.train import evaluate_cells

    result = evaluate_cells(model, data, split)
    typer.echo(result["table"])


def register(root: typer.Typer, train_app: typer.Typer) -> None:
    """Add ``oncofm cells train|evaluate`` to the root app (the pattern of every stage's cli.py)."""
    root.add_typer(app, name="cells")
