"""``oncofm reasoning``, ``oncofm train fusion``, ``oncofm evaluate-fusion``, ``oncofm draft-reasoning``."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer, train_app: typer.Typer) -> None:
    @app.command("reasoning")
    def reasoning_cmd(
        run: Path = typer.Option(..., "--run", "-r", help="Run directory with the omics (and/or slide) model."),
        top_genes: int = typer.Option(3, help="Risk genes and protective genes per patient."),
        slide_branch: str = typer.Option("auto", help="The slide modality: auto (the slide model the run has) | "
                                                      "mil (attention MIL on patches) | features (the "
                                                      "slide-feature model on slide-level image features)."),
        seed: int = typer.Option(0, help="Seed for template phrasing and the out-of-fold head."),
        redo: bool = typer.Option(False, help="Rebuild even if the dataset exists."),
    ) -> None:
        """Build RUN/reasoning/dataset.jsonl: evidence record + template target text per patient."""
        from oncofm.fusion.evidence import EvidenceSettings
        from oncofm.fusion.reasoning import ReasoningSettings, build_reasoning_dataset

        paths = build_reasoning_dataset(ReasoningSettings.build(
            run=str(run), evidence=EvidenceSettings(top_genes=top_genes), slide_branch=slide_branch, seed=seed,
            redo=redo))
        for name, path in paths.items():
            typer.echo(f"{name}: {path}")

    @train_app.command("fusion")
    def fusion_cmd(
        run: Path = typer.Option(..., "--run", "-r", help="Run directory with reasoning/dataset.jsonl."),
        config: Path | None = typer.Option(None, help="YAML with fusion settings (see docs/fusion.md)."),
        model_path: str | None = typer.Option(None, help="Local HF causal-LM folder or .gguf (default SmolLM2-135M)."),
        projector: str | None = typer.Option(None, help="linear | mlp2x_gelu"),
        epochs: int | None = typer.Option(None, help="Training epochs."),
        max_train_patients: int | None = typer.Option(None, help="Cap on training patients (0 = all)."),
        max_eval_patients: int | None = typer.Option(None, help="Cap on test patients generated (0 = all)."),
        threads: int | None = typer.Option(None, help="torch CPU threads (0 = default)."),
        evaluate: bool = typer.Option(True, help="Evaluate on the test split after training."),
        redo: bool = typer.Option(False, help="Retrain even if a fusion model exists."),
    ) -> None:
        """Fine-tune LoRA + projector on [soft tokens + prompt] -> target; then evaluate on the test split."""
        from oncofm.fusion.evaluate import FusionEvaluateSettings, evaluate_fusion, format_metrics
        from oncofm.fusion.llm import LLMSettings
        from oncofm.fusion.train import FusionSettings, train_fusion

        values = {"run": str(run), "projector": projector, "max_train_patients": max_train_patients,
                  "max_eval_patients": max_eval_patients, "threads": threads, "redo": redo}
        settings = (FusionSettings.from_yaml(config, **values) if config else FusionSettings.build(**values))
        if model_path is not None:
            settings.llm = LLMSettings(**{**settings.llm.model_dump(), "model_path": model_path})
        if epochs is not None:
            settings.train = settings.train.model_copy(update={"epochs": epochs})
        for name, path in train_fusion(settings).items():
            typer.echo(f"{name}: {path}")
        if evaluate:
            metrics = evaluate_fusion(FusionEvaluateSettings.build(
                run=str(run), max_eval_patients=settings.max_eval_patients, max_new_tokens=settings.max_new_tokens,
                batch_size=settings.gen_batch_size, threads=settings.threads))
            for line in format_metrics(metrics):
                typer.echo(line)

    @app.command("evaluate-fusion")
    def evaluate_cmd(
        run: Path = typer.Option(..., "--run", "-r", help="Run directory with a trained fusion model."),
        split: str = typer.Option("test", help="Split to evaluate."),
        max_eval_patients: int = typer.Option(0, help="Cap on patients generated (0 = all labelled)."),
        threads: int = typer.Option(0, help="torch CPU threads (0 = default)."),
        max_new_tokens: int = typer.Option(200, help="Generation limit (targets are up to ~180 SmolLM2 tokens)."),
        readout: str = typer.Option("marginal", help="Prediction-line read-out: marginal | verdict (docs/fusion.md)."),
        decoding: str = typer.Option("structured", help="structured (the LLM chooses each sentence of the "
                                     "grammar and the verdict) | free (token-by-token greedy)."),
    ) -> None:
        """Generate explanations for a split; score parse rate, AUC, the checker, faithfulness, perplexity."""
        from oncofm.fusion.evaluate import FusionEvaluateSettings, evaluate_fusion, format_metrics

        metrics = evaluate_fusion(FusionEvaluateSettings.build(run=str(run), split=split,
                                                         max_eval_patients=max_eval_patients, threads=threads,
                                                         max_new_tokens=max_new_tokens, readout=readout,
                                                         decoding=decoding))
        for line in format_metrics(metrics):
            typer.echo(line)

    @app.command("compare-modalities")
    def compare_cmd(
        run: Path = typer.Option(..., "--run", "-r", help="Run directory with reasoning/fused_head.parquet."),
        split: str = typer.Option("test", help="The split compared (test, val)."),
        n_boot: int = typer.Option(2000, help="Bootstrap resamples of every CI."),
    ) -> None:
        """Omics only, slide only, the fused head and (after evaluate-fusion) the parsed text, side by side:
        AUC with CIs and C-index on patients with both modalities (pooled and per cancer type), without the
        slide, and all; paired differences of the fused head against the better single modality."""
        from oncofm.fusion.compare import compare_modalities, format_comparison

        out = compare_modalities(run, split=split, n_boot=n_boot)
        typer.echo(format_comparison(out))
        typer.echo(f"written: {out['paths']['md']}")

    @app.command("draft-reasoning")
    def draft_cmd(
        run: Path = typer.Option(..., "--run", "-r", help="Run directory with reasoning/dataset.jsonl."),
        out: Path = typer.Option(..., "--out", "-o", help="Review file to write (.csv or .jsonl)."),
        base_url: str = typer.Option(..., help="OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1"),
        model: str = typer.Option(..., help="Model name at that endpoint."),
        api_key_env: str = typer.Option("OPENAI_API_KEY", help="Environment variable with the API key."),
        limit: int = typer.Option(20, help="Draft this many training patients."),
    ) -> None:
        """Draft explanations with a chat LLM and export them for expert review."""
        from oncofm.fusion.drafting import DraftSettings, draft_explanations, export_for_review
        from oncofm.fusion.reasoning import read_dataset

        records = [r for r in read_dataset(run) if r["split"] == "train" and r["label"] is not None][:limit]
        drafts = draft_explanations(records, DraftSettings(base_url=base_url, model=model, api_key_env=api_key_env))
        typer.echo(f"review file: {export_for_review(drafts, out)}")

    @app.command("import-reasoning")
    def import_cmd(
        run: Path = typer.Option(..., "--run", "-r", help="Run directory with reasoning/dataset.jsonl."),
        reviewed: Path = typer.Option(..., "--reviewed", help="The reviewed .csv/.jsonl (approved rows are used)."),
    ) -> None:
        """Replace the targets of approved rows with the expert's (corrected) text."""
        from oncofm.fusion.drafting import import_reviewed

        typer.echo(f"imported {import_reviewed(run, reviewed)} reviewed targets")
