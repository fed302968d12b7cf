"""``oncofm explain``: one patient in, a self-contained report out."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer, train_app: typer.Typer) -> None:
    @app.command("explain")
    def explain_cmd(
        run: Path = typer.Option(..., "--run", "-r", help="Run directory with the trained stages."),
        out: Path = typer.Option(..., "--out", "-o", help="Folder to write report.html, explanation.json, "
                                                          "heatmap.png into (replaced as a whole)."),
        patient_id: str | None = typer.Option(None, "--patient-id", help="A patient of the run's cohort."),
        expression: Path | None = typer.Option(None, "--expression", help="Expression file of a new patient: "
                                               "CSV/TSV/parquet, gene,value rows or one row of gene columns, "
                                               "in the run cohort's units."),
        cancer_type: str | None = typer.Option(None, "--cancer-type", help="Cancer type (TCGA project, e.g. "
                                               "KIRC); required for a new patient."),
        age: float | None = typer.Option(None, "--age", help="Age at diagnosis of a new patient (years)."),
        sex: str | None = typer.Option(None, "--sex", help="female | male, for a new patient."),
        stage: str | None = typer.Option(None, "--stage", help="AJCC stage of a new patient (I-IV, IIIA, "
                                         "'Stage IIB'); cited in the explanation."),
        grade: str | None = typer.Option(None, "--grade", help="Histological grade of a new patient (1-4, G3)."),
        cnv: Path | None = typer.Option(None, "--cnv", help="Copy-number profile of a new patient (CSV/TSV/parquet: "
                                        "gene,level rows or one row of gene columns; levels as the run's "
                                        "cohort, e.g. GISTIC -2..2), for a multi-omics model."),
        mutations: str | None = typer.Option(None, "--mutations", help="Mutated genes of a new patient: TP53,KRAS "
                                             "or a file (one gene per line, or a MAF's Hugo_Symbol column); "
                                             "unlisted genes count as wild-type."),
        slide: Path | None = typer.Option(None, "--slide", help="H&E slide or image (SVS, TIFF, NDPI, MRXS, "
                                          "DICOM, JPEG, PNG...)."),
        slide_features: Path | None = typer.Option(None, "--slide-features", help="Slide-level image features of a "
                                                   "new patient (CSV/TSV/parquet: feature,value rows or one row "
                                                   "of feature columns, e.g. a row of the hif2gene table), for "
                                                   "the slide-feature model."),
        mpp: float | None = typer.Option(None, "--mpp", help="Microns per pixel, for images that do not "
                                         "store it (0.25 = 40x, 0.5 = 20x)."),
        top_genes: int = typer.Option(15, help="Genes shown in the contribution chart."),
        top_patches: int = typer.Option(8, help="Most attended patches shown."),
        min_gene_fraction: float = typer.Option(0.5, help="Share of the model's genes the profile must have."),
    ) -> None:
        """Explain one patient: predicted 5-year outcome, generated reasoning, attention heatmap.

        Give a patient of the run (--patient-id) or a new patient (--expression, --slide and/or
        --slide-features with --cancer-type; --cnv, --mutations, --stage, --grade optional). Writes
        OUT/report.html (one self-contained file), OUT/explanation.json and
        OUT/heatmap.png. A missing modality or model becomes a note in the report; bad input stops
        with a message and writes nothing. Research use only, not for clinical decisions.
        """
        from oncofm.explain.pipeline import ExplainSettings, explain_patient

        settings = ExplainSettings.build(
            run=str(run), out=str(out), patient_id=patient_id,
            expression=None if expression is None else str(expression), cancer_type=cancer_type, age=age, sex=sex,
            stage=stage, grade=grade, cnv=None if cnv is None else str(cnv), mutations=mutations,
            slide=None if slide is None else str(slide), mpp=mpp, top_genes=top_genes,
            slide_features=None if slide_features is None else str(slide_features),
            top_patches=top_patches, min_gene_fraction=min_gene_fraction)
        paths = explain_patient(settings)
        for name, path in paths.items():
            typer.echo(f"{name}: {path}")
