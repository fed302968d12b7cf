"""Load a trained omics model and predict new patients (used by ``oncofm explain`` and ``oncofm evaluate``).

A new patient's raw expression is normalised with the training run's statistics (per cancer type; the
pan-cancer row for a type unseen in training), paired with the run's Cox coefficients through
:func:`oncofm.omics.features.build_pairs` (pan-cancer coefficients for unseen types), and genes the patient
lacks are filled with 0 — the training median, i.e. neutral.

Examples
--------
>>> predictor = load_omics_model("runs/tcga13")  # doctest: +SKIP
>>> out = predict_patient(predictor, expression, cancer_type="KIRC", age=61, sex="male")  # doctest: +SKIP
>>> out.prob, out.top_genes(5)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from oncofm.cohort.schema import Col
from oncofm.omics.artifacts import OmicsArtifacts
from oncofm.omics.data import ClinicalEncoder, OmicsTable
from oncofm.paths import RunLayout

TRAIN_HINT = "Run `oncofm train omics --run RUN` first."


@dataclass
class OmicsPredictor:
    """A trained omics model with everything needed to turn raw expression into its inputs."""

    model: Any  # OmicsTransformer, eval mode, CPU
    genes: list[str]
    encoder: ClinicalEncoder
    horizon_years: float
    coefficients: pd.DataFrame
    normalization: pd.DataFrame
    run: Path
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class PatientPrediction:
    """The omics model's output for one patient."""

    prob: float  # P(death within the horizon)
    risk: float  # logit
    embedding: np.ndarray  # (d,) penultimate layer
    attributions: pd.Series  # per gene, signed (+ = towards death), integrated gradients
    coverage: float  # share of the model's genes present in the input
    missing_genes: list[str]

    def top_genes(self, k: int = 10) -> pd.Series:
        """The ``k`` genes with the largest absolute attribution (signed values)."""
        return self.attributions.reindex(self.attributions.abs().sort_values(ascending=False).index[:k])


def load_omics_model(run: str | Path) -> OmicsPredictor:
    """The trained model of ``run`` with its genes, clinical encoder, coefficients and normalisation."""
    import yaml
    from safetensors.torch import load_file

    from oncofm.omics.model import create_model

    layout = RunLayout(run)
    arts = OmicsArtifacts.of(run)
    layout.require(arts.weights, TRAIN_HINT)
    layout.require(arts.config, TRAIN_HINT)
    layout.require(layout.coefficients, "Run `oncofm cox --run RUN` first.")
    layout.require(layout.normalization, "Run `oncofm cohort split --run RUN` first.")
    config = yaml.safe_load(arts.config.read_text())
    model = create_model(config["model"], **config["architecture"])
    model.load_state_dict(load_file(str(arts.weights)))
    model.eval()
    coef = pd.read_parquet(layout.coefficients)
    if "horizon_years" in coef:
        coef = coef[np.isclose(coef["horizon_years"].astype(float), float(config["horizon_years"]))]
    return OmicsPredictor(model=model, genes=list(config["genes"]), encoder=ClinicalEncoder.from_dict(config["clinical"]),
                          horizon_years=float(config["horizon_years"]), coefficients=coef,
                          normalization=pd.read_parquet(layout.normalization), run=Path(run), config=config)


def gene_coverage(predictor: OmicsPredictor, expression: pd.DataFrame) -> tuple[float, list[str]]:
    """Share of the model's genes that ``expression`` has (a column with any value), and the missing ones."""
    present = [g for g in predictor.genes if g in expression.columns and expression[g].notna().any()]
    missing = [g for g in predictor.genes if g not in set(present)]
    return len(present) / len(predictor.genes), missing


def make_table(predictor: OmicsPredictor, expression: pd.DataFrame, clinical: pd.DataFrame, *,
               normalized: bool = False) -> OmicsTable:
    """The model's input table for patients (rows of ``expression``; ``clinical`` indexed by patient_id
    with cancer_type and optionally age, sex, os_days, os_event)."""
    from oncofm.cohort.normalize import apply_normalizer
    from oncofm.omics.features import build_pairs

    ids = expression.index.astype(str)
    clinical = clinical.reindex(ids)
    cancer = clinical[Col.CANCER].astype(str)
    cols = [g for g in predictor.genes if g in expression.columns]
    expr = expression[cols].astype(float)
    if not normalized:
        expr = apply_normalizer(expr, cancer, predictor.normalization)
    pairs = build_pairs(expr, cancer, predictor.coefficients, predictor.genes)  # (N, G, 2), missing -> 0
    n = len(ids)
    sex = clinical[Col.SEX].astype("string").fillna("").to_numpy(dtype=str) if Col.SEX in clinical else np.full(n, "")
    return OmicsTable(
        patient_ids=np.asarray(ids, dtype=str), genes=predictor.genes, pairs=pairs, cancer_type=cancer.to_numpy(str),
        age=clinical[Col.AGE].to_numpy(float) if Col.AGE in clinical else np.full(n, np.nan), sex=sex,
        time=clinical[Col.OS_DAYS].to_numpy(float) if Col.OS_DAYS in clinical else np.full(n, np.nan),
        event=clinical[Col.OS_EVENT].to_numpy(float) if Col.OS_EVENT in clinical else np.zeros(n),
        split=np.full(n, "", dtype=object).astype(str), horizon_years=predictor.horizon_years)


def predict_patient(predictor: OmicsPredictor, expression: pd.Series | Mapping[str, float], *, cancer_type: str,
                    age: float | None = None, sex: str | None = None, normalized: bool = False,
                    ig_steps: int = 32) -> PatientPrediction:
    """Predict one new patient from a gene → expression mapping (raw values unless ``normalized``)."""
    import torch

    from oncofm.omics.attributions import integrated_gradients
    from oncofm.omics.data import OmicsDataset

    series = pd.Series(expression, dtype=float)
    expr = pd.DataFrame([series.to_numpy()], columns=series.index.astype(str), index=["patient"])
    coverage, missing = gene_coverage(predictor, expr)
    if coverage == 0:
        from oncofm.errors import OncoFMError

        raise OncoFMError(f"none of the model's {len(predictor.genes)} genes is in the input (e.g. "
                          f"{', '.join(predictor.genes[:5])}); check the gene symbols")
    clinical = pd.DataFrame({Col.CANCER: [cancer_type], Col.AGE: [np.nan if age is None else float(age)],
                             Col.SEX: [sex or ""]}, index=["patient"])
    table = make_table(predictor, expr, clinical, normalized=normalized)
    batch = OmicsDataset(table, predictor.encoder)[0]
    batch = {k: v.unsqueeze(0) for k, v in batch.items()}  # (1, ...)
    with torch.no_grad():
        logit, emb = predictor.model(batch["pairs"], batch["cancer"], batch["age"], batch["sex"])
    attr = integrated_gradients(predictor.model, batch, steps=ig_steps)[0].numpy()
    return PatientPrediction(prob=float(torch.sigmoid(logit)[0]), risk=float(logit[0]), embedding=emb[0].numpy(),
                             attributions=pd.Series(attr, index=predictor.genes, name="attribution"),
                             coverage=coverage, missing_genes=missing)
