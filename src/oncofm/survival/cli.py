"""``oncofm cox`` and ``oncofm features``: thin typer wrappers over the stage functions."""

from __future__ import annotations

from pathlib import Path

import typer


def cox_cmd(
    run: Path = typer.Option(..., "--run", "-r", help="Run directory with an imported, split cohort."),
    horizon: float = typer.Option(5.0, "--horizon", help="Censor overall survival at this many years (3 or 5)."),
    ties: str = typer.Option("efron", "--ties", help="Tied event times: efron (as R coxph, lifelines) or breslow."),
    min_events: int = typer.Option(10, "--min-events", help="Cancer types / genes with fewer events get NaN."),
    no_pan: bool = typer.Option(False, "--no-pan", help="Skip the pan-cancer model stratified by cancer type."),
    memory_mb: float = typer.Option(512.0, "--memory-mb", help="Working-memory budget of one gene chunk (MB)."),
    no_plots: bool = typer.Option(False, "--no-plots", help="Skip the volcano plots and the heatmap."),
    layers: str = typer.Option("expression,cnv,mutation", "--layers",
                               help="Comma-separated omics layers to screen (those the cohort has)."),
    min_carriers: int = typer.Option(10, "--min-carriers",
                                     help="cnv/mutation: fewer patients with a non-zero value gives NaN (noted)."),
    separation: str = typer.Option("firth", "--separation",
                                   help="cnv/mutation separated fits: firth (penalised estimate) or exclude (NaN)."),
    redo: bool = typer.Option(False, "--redo", help="Refit even if the table exists with the same settings."),
) -> None:
    """Univariate Cox per gene per cancer type on the TRAINING split -> RUN/cox/coefficients.parquet.

    Expression is the run's normalised expression (robust z within cancer type), so coefficients are log
    hazard ratios per robust SD. q is Benjamini-Hochberg within each cancer type; rows with
    cancer_type PAN_CANCER ("__pan__") come from the model stratified by cancer type. CNV (as given) and
    mutation status (0/1) are screened the same way into the same table (column layer; q within layer and type).
    """
    from oncofm.survival.cox_stage import CoxSettings, run_cox

    settings = CoxSettings.build(run=str(run), horizon_years=horizon, ties=ties, min_events=min_events,
                                 pan_cancer=not no_pan, memory_mb=memory_mb, plots=not no_plots, redo=redo,
                                 layers=[x.strip() for x in layers.split(",") if x.strip()], min_carriers=min_carriers,
                                 separation=separation)
    for name, path in run_cox(settings).items():
        typer.echo(f"{name}: {path}")


def features_cmd(
    run: Path = typer.Option(..., "--run", "-r", help="Run directory where `oncofm cox` has run."),
    top_k: int = typer.Option(256, "--top-k", help="Number of genes to select."),
    q_max: float = typer.Option(0.05, "--q-max", help="A gene counts as prognostic in a cancer type when q <= Q."),
    fill: bool = typer.Option(True, "--fill/--no-fill",
                              help="When fewer than K genes pass --q-max, fill up with the next-best genes."),
    redo: bool = typer.Option(False, "--redo", help="Rebuild even if the features exist with the same settings."),
) -> None:
    """Select genes (training-split Cox table only) and write the (N, G, 2) pair tensor to RUN/features/.

    pairs[..., 0] is the patient's normalised expression of the gene, pairs[..., 1] the gene's Cox
    coefficient in the patient's cancer type (pan-cancer coefficient for a type without one).
    """
    from oncofm.omics.features import FeatureSettings, run_features

    settings = FeatureSettings.build(run=str(run), top_k=top_k, q_max=q_max, fill=fill, redo=redo)
    for name, path in run_features(settings).items():
        typer.echo(f"{name}: {path}")


def register(app: typer.Typer, train_app: typer.Typer) -> None:
    app.command("cox", help="Fit univariate Cox per gene per cancer type on the training split (coefficient table).")(
        cox_cmd)
    app.command("features", help="Select genes and build the (expression, Cox coefficient) pair tensor.")(
        features_cmd)
