"""``oncofm train omics`` and ``oncofm evaluate`` (thin wrappers over oncofm.omics.train / evaluate)."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer, train_app: typer.Typer) -> None:
    @train_app.command("omics")
    def train_omics_cmd(
        run: Path = typer.Option(..., "--run", "-r", help="Run directory with cohort/, cox/ and features/."),
        config: Path | None = typer.Option(None, help="YAML with any OmicsTrainSettings (options below win)."),
        max_genes: int | None = typer.Option(None, help="Gene tokens: the first N of features/genes.txt [64]."),
        d_model: int | None = typer.Option(None, help="Token width [32]."),
        n_layers: int | None = typer.Option(None, help="Transformer layers [2]."),
        n_heads: int | None = typer.Option(None, help="Attention heads [4]."),
        dropout: float | None = typer.Option(None, help="Dropout [0.1]."),
        cox_weight: float | None = typer.Option(None, help="Weight of the auxiliary Cox loss; 0 = BCE only [0.5]."),
        cox_stratified: bool | None = typer.Option(None, "--cox-stratified/--cox-pooled",
                                                   help="Cox risk sets within cancer type (default: pooled)."),
        linear_skip: bool | None = typer.Option(None, "--linear-skip/--no-linear-skip",
                                                help="Add a linear (wide) path to the logit (default: off)."),
        anchor: str | None = typer.Option(None, help="Frozen linear anchor the transformer learns the residual of: "
                                          "coxnet | logistic | none [coxnet]."),
        epochs: int | None = typer.Option(None, help="Maximum epochs [20]."),
        patience: int | None = typer.Option(None, help="Early-stopping patience on the validation score [5]."),
        lr: float | None = typer.Option(None, help="Learning rate [1e-3]."),
        batch_size: int | None = typer.Option(None, help="Batch size [128]."),
        seed: int | None = typer.Option(None, help="Random seed [0]."),
        baselines: str | None = typer.Option(None, help="Comma-separated baselines "
                                             "[clinical,logistic_l2,coxnet,hgb]; '' for none."),
        ig_steps: int | None = typer.Option(None, help="Integrated-gradient steps [8]."),
        n_boot: int | None = typer.Option(None, help="Bootstrap resamples for the AUC CI [1000]."),
        threads: int | None = typer.Option(None, help="torch CPU threads (default: torch's); 1 is fastest on a "
                                             "machine shared with other jobs."),
        cnv_features: int | None = typer.Option(None, help="Copy-number tokens: best N CNV features of the Cox "
                                                "table (0 = none) [0]."),
        mutation_features: int | None = typer.Option(None, help="Mutation tokens: best N mutation features [0]."),
        covariates: str | None = typer.Option(None, help="Comma-separated clinical covariate tokens: stage,grade "
                                              "(baselines get them too) [none]."),
        no_progress: bool = typer.Option(False, "--no-progress", help="Hide progress bars."),
        redo: bool = typer.Option(False, help="Retrain even if the model exists with the same settings."),
    ) -> None:
        """Train the gene-token transformer for 5-year survival; evaluate it and the baselines on the test split.

        Writes RUN/models/omics/ (model.safetensors, config.yaml, metrics.json, predictions, embeddings,
        attributions, ROC and calibration plots) and prints the side-by-side table.
        """
        from oncofm.omics.train import OmicsTrainSettings, train_omics

        values = dict(run=str(run), max_genes=max_genes, anchor=anchor, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                      dropout=dropout, cox_weight=cox_weight, cox_stratified=cox_stratified, linear_skip=linear_skip, epochs=epochs, patience=patience, lr=lr,
                      batch_size=batch_size, seed=seed, ig_steps=ig_steps, n_boot=n_boot, threads=threads,
                      progress=False if no_progress else None, redo=redo or None, cnv_features=cnv_features,
                      mutation_features=mutation_features,
                      covariates=None if covariates is None else [c.strip() for c in covariates.split(",") if c.strip()],
                      baselines=None if baselines is None else [b for b in baselines.split(",") if b.strip()])
        settings = (OmicsTrainSettings.from_yaml(config, **values) if config is not None
                    else OmicsTrainSettings.build(**values))
        for name, path in train_omics(settings).items():
            typer.echo(f"{name}: {path}")

    @app.command("evaluate")
    def evaluate_cmd(
        run: Path = typer.Option(..., "--run", "-r", help="Run with a trained omics model."),
        cohort: Path = typer.Option(..., "--cohort", "-c", help="Another imported run to evaluate on."),
        min_coverage: float = typer.Option(0.7, help="Stop when the cohort has fewer of the model's genes."),
        normalization: str = typer.Option("auto", help="auto | cohort | model: whose normalisation statistics."),
        n_boot: int = typer.Option(1000, help="Bootstrap resamples for the AUC CI."),
    ) -> None:
        """Apply a trained omics model, unchanged, to another cohort (coverage %, per-cancer metrics)."""
        from oncofm.omics.evaluate import OmicsEvaluateSettings, evaluate_cohort

        paths = evaluate_cohort(OmicsEvaluateSettings.build(run=str(run), cohort=str(cohort), min_coverage=min_coverage,
                                                       normalization=normalization, n_boot=n_boot))
        for name, path in paths.items():
            typer.echo(f"{name}: {path}")
