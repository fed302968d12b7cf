"""``oncofm cohort import|split|summary``."""

from __future__ import annotations

from pathlib import Path

import typer

cohort_app = typer.Typer(help="Import, split and summarise a cohort.", no_args_is_help=True)


@cohort_app.command("import")
def import_cmd(
    format: str = typer.Option(..., "--format", "-f", help="tcga13 | firehose | generic | gdc"),
    source: str = typer.Option(..., "--source", "-s", help="Folder or file to read (gdc: project ID, e.g. TCGA-BRCA)."),
    run: Path = typer.Option(..., "--run", "-r", help="Run directory to write into."),
    clinical: str | None = typer.Option(None, help="Clinical table (firehose: the TCGA-CDR CSV; generic: any, see --option)."),
    config: Path | None = typer.Option(None, help="YAML with settings (e.g. a generic column mapping)."),
    option: list[str] = typer.Option([], "--option", "-o", help="Format-specific KEY=VALUE (repeatable)."),
    log_transform: str | None = typer.Option(
        None, help="auto | yes | no: log2(x+1) of counts-like values (default auto: non-negative with max > 100)."),
    no_multiomics: bool = typer.Option(False, help="Skip copy number and mutations."),
    redo: bool = typer.Option(False, help="Re-import even if the run already has this cohort."),
) -> None:
    """Import a cohort (patients, expression, CNV, mutations) into RUN/cohort/.

    \b
    Formats (details in docs/cohort.md):
      tcga13    folder: patients.csv, expression_zscore.csv.gz, multiomics/
      firehose  Firehose RSEM_genes_normalized file(s) + --clinical TCGA-CDR
      generic   expression CSV/TSV/parquet + --clinical; map columns with
                -o patient_id=.. -o os_days=.. -o os_event=.. or --config
      gdc       --source TCGA-BRCA (a GDC project); -o base_url=.. max_files=..

    Everything is validated before anything is written: a bad input stops
    with one message naming the file, column and offending rows.
    """

    from oncofm.cohort.importing import ImportSettings, import_cohort
    from oncofm.errors import OncoFMError

    opts: dict[str, str] = {}
    for item in option:
        if "=" not in item:
            raise OncoFMError(f"--option expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        opts[key.strip()] = value.strip()
    # flags left at their defaults do not override a --config file (None is dropped by from_yaml/build)
    values = dict(format=format, source=source, run=str(run), clinical=clinical, log_transform=log_transform,
                  include_multiomics=False if no_multiomics else None, redo=True if redo else None)
    if config is not None:
        settings = ImportSettings.from_yaml(config, **values)
        if opts:
            settings.options = {**settings.options, **opts}
    else:
        settings = ImportSettings.build(**values, options=opts)
    paths = import_cohort(settings)
    for name, path in paths.items():
        typer.echo(f"{name}: {path}")


@cohort_app.command("split")
def split_cmd(
    run: Path = typer.Option(..., "--run", "-r", help="Run directory with an imported cohort."),
    val_fraction: float = typer.Option(0.15, help="Share of patients for validation."),
    test_fraction: float = typer.Option(0.2, help="Share of patients for test."),
    folds: int = typer.Option(0, help="Also assign k folds over non-test patients (0 = none)."),
    seed: int = typer.Option(0, help="Random seed; the same seed gives the same split."),
    clip: float = typer.Option(5.0, help="Clip normalised expression to ±clip."),
    redo: bool = typer.Option(False, help="Replace an existing split."),
) -> None:
    """Make stratified patient-level splits and training-split normalisation statistics."""
    from oncofm.cohort.splits import SplitSettings, split_cohort

    paths = split_cohort(SplitSettings.build(run=str(run), val_fraction=val_fraction, test_fraction=test_fraction,
                                             folds=folds, seed=seed, clip=clip, redo=redo))
    for name, path in paths.items():
        typer.echo(f"{name}: {path}")


@cohort_app.command("summary")
def summary_cmd(
    run: Path = typer.Option(..., "--run", "-r", help="Run directory with an imported cohort."),
) -> None:
    """Per cancer type: patients, deaths, follow-up, 5-year label coverage, gene coverage; KM plots."""
    from oncofm.cohort.summary import summarize_cohort

    summarize_cohort(run)


def register(app: typer.Typer, train_app: typer.Typer) -> None:
    app.add_typer(cohort_app, name="cohort")
