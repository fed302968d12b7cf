"""The omics model's one inference path: training exports, ``oncofm evaluate`` and ``oncofm explain``.

:meth:`OmicsPredictor.predict_table` applies the model to an :class:`~oncofm.omics.data.OmicsTable`
(probability, logit, penultimate embedding, integrated-gradients attributions). The training stage calls
it for its exports (``predictions``, ``embeddings``, ``attributions``), ``oncofm evaluate`` for an outside
cohort, and :meth:`OmicsPredictor.predict` for one new patient: the patient's raw expression is
normalised with the training run's statistics (per cancer type; the pan-cancer row for a type unseen in
training), paired with the run's Cox coefficients through :func:`oncofm.omics.features.build_pairs` (the
pan-cancer coefficients for unseen types) and genes the patient lacks are filled with 0 — the training
median, i.e. neutral — before the same ``predict_table``. Training and inference therefore cannot drift
apart, and a contract test checks that ``predict`` reproduces what the training stage stored.

Examples
--------
>>> predictor = OmicsPredictor.from_run(RunLayout("runs/tcga13"))  # doctest: +SKIP
>>> result = predictor.predict(patient)  # doctest: +SKIP
>>> result.prob, result.attributions.head(5)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from oncofm.cohort.patient import PatientInput
from oncofm.cohort.schema import PAN_CANCER, Col
from oncofm.errors import OncoFMError
from oncofm.io import model_version
from oncofm.omics.artifacts import OmicsArtifacts
from oncofm.omics.data import ClinicalEncoder, OmicsTable
from oncofm.paths import RunLayout

__all__ = ["OmicsPredictor", "OmicsResult", "TablePrediction", "attribution_table", "check_gene_coverage", "coefficients_for",
           "forward_batches", "layer_coefficients", "stored_omics_results", "validate_layer_inputs"]

TRAIN_HINT = "Run `oncofm train omics --run RUN` first."
#: Integrated-gradients steps of runs whose config does not record them (runs made before it did).
DEFAULT_IG_STEPS = 16


@dataclass
class TablePrediction:
    """The omics model applied to every patient of a table."""

    patient_ids: np.ndarray  # (N,) str
    logits: np.ndarray  # (N,)
    embeddings: np.ndarray  # (N, d) penultimate layer
    attributions: np.ndarray | None  # (N, G) integrated gradients (+ = towards death); None if not asked
    #: further layers' integrated gradients ``{layer: (N, F)}`` (NaN: not measured) and the covariates'
    #: occlusion effects ``{covariate: (N,)}`` (:mod:`oncofm.omics.attributions`); empty if not asked or none
    layer_attributions: dict[str, np.ndarray] = field(default_factory=dict)
    covariate_effects: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def probs(self) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.logits))


@dataclass
class OmicsResult:
    """The omics model's output for one patient, as the evidence record and the report use it."""

    prob: float  # P(death within the horizon)
    logit: float
    embedding: np.ndarray  # (d,) penultimate layer
    attributions: pd.DataFrame  # gene, attribution, expression_z, coef, q; by |attribution|, largest first
    n_present: int  # model genes measured in the input
    n_model_genes: int
    missing_genes: list[str]
    version: str
    #: the further inputs the model used for this patient (None for an expression-only model):
    #: ``layer, feature, value, coef, q, attribution`` (value NaN = not given, masked; attribution: integrated
    #: gradient, 0 for an unaltered value), and ``stage`` / ``grade`` levels (1-4, NaN = unknown) with their occlusion
    #: effects on the logit (``covariate_effects``)
    layer_inputs: pd.DataFrame | None = None
    covariates: dict[str, float] = field(default_factory=dict)
    covariate_effects: dict[str, float] = field(default_factory=dict)

    def layer_contributions(self) -> pd.DataFrame:
        """``input, contribution``: the summed attribution of each input layer (expression, cnv, mutation) and
        the occlusion effect of each covariate, on the logit scale: what the report's layer chart shows."""
        rows = [("expression", float(np.nansum(self.attributions["attribution"].to_numpy(float))))]
        if self.layer_inputs is not None and len(self.layer_inputs):
            for name, part in self.layer_inputs.groupby("layer", sort=False):
                rows.append((str(name), float(np.nansum(part["attribution"].to_numpy(float)))))
        rows += [(name, float(v)) for name, v in self.covariate_effects.items()]
        return pd.DataFrame(rows, columns=["input", "contribution"])

    @property
    def coverage(self) -> float:
        return self.n_present / max(self.n_model_genes, 1)

    def z_scores(self) -> pd.Series:
        """Normalised expression by gene (NaN where the gene was not measured)."""
        return self.attributions.set_index("gene")["expression_z"]


def forward_batches(model: Any, dataset: Any, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Logits (N,) and penultimate embeddings (N, d) for every item of an ``OmicsDataset``."""
    import torch

    from oncofm.omics.model import model_inputs

    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    logits, embs = [], []
    with torch.no_grad():
        for batch in loader:
            lo, em = model(*model_inputs(batch))
            logits.append(lo)
            embs.append(em)
    return torch.cat(logits).numpy().astype(float), torch.cat(embs).numpy()


@dataclass
class OmicsPredictor:
    """A trained omics model with everything needed to turn raw expression into its inputs."""

    model: Any  # OmicsTransformer, eval mode, CPU
    genes: list[str]
    encoder: ClinicalEncoder
    horizon_years: float
    coefficients: pd.DataFrame | None  # None: the run has no Cox table (exports only; no new patients)
    normalization: pd.DataFrame | None
    run: Path
    ig_steps: int = DEFAULT_IG_STEPS
    config: dict[str, Any] = field(default_factory=dict)
    version: str = "unsaved"
    min_gene_fraction: float = 0.5

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_run(cls, layout: RunLayout, *, min_gene_fraction: float = 0.5) -> OmicsPredictor | None:
        """The run's trained omics model, or ``None`` when the run has none (the caller notes it)."""
        if not OmicsArtifacts.of(layout.root).weights.exists():
            return None
        predictor = cls.load(layout.root)
        predictor.min_gene_fraction = min_gene_fraction
        return predictor

    @classmethod
    def load(cls, run: str | Path) -> OmicsPredictor:
        """The trained model of ``run`` with its genes, clinical encoder, coefficients and normalisation;
        raises :class:`~oncofm.errors.MissingArtifactError` naming the command that makes what is missing."""
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
        return cls.build(model, genes=list(config["genes"]), encoder=ClinicalEncoder.from_dict(config["clinical"]),
                         horizon_years=float(config["horizon_years"]), run=Path(run), config=config,
                         ig_steps=int(config.get("ig_steps", DEFAULT_IG_STEPS)), version=model_version(arts.dir))

    @classmethod
    def build(cls, model: Any, *, genes: list[str], encoder: ClinicalEncoder, horizon_years: float,
              run: str | Path, ig_steps: int, config: dict[str, Any] | None = None,
              version: str = "unsaved") -> OmicsPredictor:
        """A predictor around a model in memory (the training stage's, before it is saved).

        The run's Cox table and normalisation statistics are read when present: a new patient's raw
        expression needs them (:meth:`make_table`), the training stage's exports over its own pair tensor
        (:meth:`predict_table`) do not.
        """
        layout = RunLayout(run)
        coef = pd.read_parquet(layout.coefficients) if layout.coefficients.exists() else None
        if coef is not None and "horizon_years" in coef:
            coef = coef[np.isclose(coef["horizon_years"].astype(float), float(horizon_years))]
        norm = pd.read_parquet(layout.normalization) if layout.normalization.exists() else None
        return cls(model=model, genes=list(genes), encoder=encoder, horizon_years=float(horizon_years),
                   coefficients=coef, normalization=norm, run=Path(run), ig_steps=int(ig_steps),
                   config=config or {}, version=version)

    # ------------------------------------------------------------------ inputs
    def _require_inputs(self) -> None:
        """Raise, naming the command, when the run lacks what raw expression needs."""
        if self.coefficients is None or self.normalization is None:
            layout = RunLayout(self.run)
            layout.require(layout.coefficients, "Run `oncofm cox --run RUN` first.")
            layout.require(layout.normalization, "Run `oncofm cohort split --run RUN` first.")

    def gene_coverage(self, expression: pd.DataFrame) -> tuple[float, list[str]]:
        """Share of the model's genes that ``expression`` has (a column with any value), and the missing ones."""
        present = [g for g in self.genes if g in expression.columns and expression[g].notna().any()]
        missing = [g for g in self.genes if g not in set(present)]
        return len(present) / len(self.genes), missing

    @property
    def layer_features(self) -> dict[str, list[str]]:
        """``{layer: features}`` of the model's further layers (empty for an expression-only model)."""
        return {k: list(v) for k, v in (self.config.get("layers") or {}).items()}

    def make_table(self, expression: pd.DataFrame, clinical: pd.DataFrame, *, normalized: bool = False,
                   layers: dict[str, pd.DataFrame] | None = None) -> OmicsTable:
        """The model's input table for patients (rows of ``expression``; ``clinical`` indexed by patient_id
        with cancer_type and optionally age, sex, os_days, os_event, stage, grade; ``layers``: raw cnv /
        mutation matrices, patients × features, NaN or absent = not measured)."""
        from oncofm.cohort.normalize import apply_normalizer
        from oncofm.omics.data import covariate_arrays, layer_pairs
        from oncofm.omics.features import build_pairs

        self._require_inputs()
        ids = expression.index.astype(str)
        clinical = clinical.reindex(ids)
        cancer = clinical[Col.CANCER].astype(str)
        cols = [g for g in self.genes if g in expression.columns]
        expr = expression[cols].astype(float)
        if not normalized:
            expr = apply_normalizer(expr, cancer, self.normalization)
        pairs = build_pairs(expr, cancer, self.coefficients, self.genes)  # (N, G, 2), missing -> 0
        n = len(ids)
        sex = (clinical[Col.SEX].astype("string").str.lower().fillna("").to_numpy(dtype=str) if Col.SEX in clinical
               else np.full(n, ""))
        return OmicsTable(
            patient_ids=np.asarray(ids, dtype=str), genes=self.genes, pairs=pairs, cancer_type=cancer.to_numpy(str),
            age=clinical[Col.AGE].to_numpy(float) if Col.AGE in clinical else np.full(n, np.nan), sex=sex,
            time=clinical[Col.OS_DAYS].to_numpy(float) if Col.OS_DAYS in clinical else np.full(n, np.nan),
            event=clinical[Col.OS_EVENT].to_numpy(float) if Col.OS_EVENT in clinical else np.zeros(n),
            split=np.full(n, "", dtype=object).astype(str), horizon_years=self.horizon_years,
            layers={name: (feats, layer_pairs((layers or {}).get(name), pd.Index(ids), cancer.set_axis(ids),
                                              self.coefficients, name, feats))
                    for name, feats in self.layer_features.items()},
            covariates=covariate_arrays(clinical, pd.Index(ids), self.encoder.covariates))

    # ------------------------------------------------------------------ the model
    def predict_table(self, table: OmicsTable, *, attributions: bool = True, progress: bool = False,
                      batch_size: int = 64) -> TablePrediction:
        """The model on every patient of ``table``: logits, embeddings and (if asked) attributions."""
        import torch

        from oncofm.logging_utils import track
        from oncofm.omics.attributions import attributions_by_layer, covariate_effects
        from oncofm.omics.data import OmicsDataset

        dataset = OmicsDataset(table, self.encoder)
        logits, emb = forward_batches(self.model, dataset)
        out = TablePrediction(patient_ids=np.asarray(table.patient_ids, dtype=str), logits=logits, embeddings=emb,
                              attributions=None)
        if not attributions:
            return out
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
        parts: dict[str, list[np.ndarray]] = {}
        for batch in track(loader, "integrated gradients", enabled=progress):
            for key, value in {**attributions_by_layer(self.model, batch, steps=self.ig_steps),
                               **{f"cov:{k}": v for k, v in covariate_effects(self.model, batch).items()}}.items():
                parts.setdefault(key, []).append(value.numpy())
        joined = {k: np.concatenate(v).astype(np.float32) for k, v in parts.items()}
        out.attributions = joined.pop("expression", np.zeros((0, len(self.genes)), np.float32))
        out.covariate_effects = {k[4:]: v for k, v in joined.items() if k.startswith("cov:")}
        out.layer_attributions = {k: v for k, v in joined.items() if not k.startswith("cov:")}
        return out

    def predict_expression(self, expression: pd.Series | Mapping[str, float], *, cancer_type: str,
                           age: float | None = None, sex: str | None = None, normalized: bool = False,
                           cnv: pd.Series | Mapping[str, float] | None = None,
                           mutation: pd.Series | Mapping[str, float] | list[str] | None = None,
                           stage: float | str | None = None, grade: float | str | None = None) -> OmicsResult:
        """One patient from a gene → expression mapping (raw values in the cohort's units unless ``normalized``).

        ``cnv``, ``mutation``, ``stage``, ``grade`` are used by a model trained with those inputs (each
        optional: a missing one is masked / unknown) and validated (:func:`validate_layer_inputs`); an
        expression-only model ignores them."""
        from oncofm.cohort.normalize import apply_normalizer

        self._require_inputs()
        series = pd.Series(expression, dtype=float)
        series.index = series.index.astype(str)
        series = series[~series.index.duplicated()]
        expr = pd.DataFrame([series.reindex(self.genes).to_numpy()], columns=self.genes, index=["patient"])
        n_present, missing = check_gene_coverage(self.genes, series, self.min_gene_fraction)
        if not normalized:  # values in other units than the training cohort's: refused, saying how to convert
            from oncofm.cohort.units import require_units
            require_units(series, self.normalization, cancer_type, what="the expression profile")
        clinical = pd.DataFrame({Col.CANCER: [cancer_type], Col.AGE: [np.nan if age is None else float(age)],
                                 Col.SEX: [sex or ""]}, index=["patient"])
        layers, covs = validate_layer_inputs(self.layer_features, cnv=cnv, mutation=mutation, stage=stage,
                                             grade=grade)
        for name in self.encoder.covariates:
            clinical[name] = covs.get(name, np.nan)
        z = expr if normalized else apply_normalizer(expr, clinical[Col.CANCER], self.normalization)
        table = self.make_table(z, clinical, normalized=True,
                                layers={k: pd.DataFrame([v], index=["patient"]) for k, v in layers.items()})
        out = self.predict_table(table)
        attributions = self._attribution_table(out.attributions[0], z.iloc[0], cancer_type)
        layer_inputs = (layer_input_table({k: (f, v[0, :, 0]) for k, (f, v) in table.layers.items()},
                                          {k: v[0] for k, v in out.layer_attributions.items()},
                                          self.coefficients, cancer_type) if table.layers else None)
        return OmicsResult(prob=float(out.probs[0]), logit=float(out.logits[0]),
                           embedding=np.asarray(out.embeddings[0], dtype=np.float32), attributions=attributions,
                           n_present=n_present, n_model_genes=len(self.genes), missing_genes=missing,
                           version=self.version, layer_inputs=layer_inputs,
                           covariates={c: float(table.covariates[c][0]) for c in self.encoder.covariates},
                           covariate_effects={c: float(v[0]) for c, v in out.covariate_effects.items()})

    def predict(self, patient: PatientInput, workdir: Path | None = None) -> OmicsResult | None:
        """The patient's omics prediction, or ``None`` when the patient has no expression profile."""
        if patient.expression is None:
            return None
        return self.predict_expression(patient.expression, cancer_type=patient.cancer_type, age=patient.age,
                                       sex=patient.sex, cnv=getattr(patient, "cnv", None),
                                       mutation=getattr(patient, "mutation", None),
                                       stage=getattr(patient, "stage", None), grade=getattr(patient, "grade", None))

    def _attribution_table(self, attribution: np.ndarray, z: pd.Series, cancer_type: str) -> pd.DataFrame:
        """gene, attribution, expression_z, coef, q sorted by |attribution| (largest first)."""
        return attribution_table(self.genes, attribution, z, coefficients_for(self.coefficients, cancer_type))

    def coefficients_for(self, cancer_type: str) -> pd.DataFrame:
        """``gene, coef, q`` of the Cox table for ``cancer_type`` (the pan-cancer rows for an unseen type)."""
        return coefficients_for(self.coefficients, cancer_type)


def validate_layer_inputs(features: dict[str, list[str]], *, cnv: Any = None, mutation: Any = None,
                          stage: Any = None, grade: Any = None) -> tuple[dict[str, pd.Series], dict[str, float]]:
    """A new patient's further inputs, checked: ``({layer: gene -> value}, {"stage": 1-4/NaN, "grade": ...})``.

    CNV values must be finite numbers (copy-number levels as in the training cohort, e.g. GISTIC −2..2);
    mutation status 0/1, or a list of mutated gene symbols (the model's other mutation features are then
    wild-type, 0); stage and grade 1-4 or clinical text (``"Stage IIIA"``, ``"G3"``; see
    :mod:`oncofm.cohort.clinical`). Raises :class:`~oncofm.errors.OncoFMError` saying what to fix.
    """
    from oncofm.cohort.clinical import parse_grade, parse_stage

    layers: dict[str, pd.Series] = {}
    if cnv is not None:
        v = pd.Series(cnv)
        num = pd.to_numeric(v, errors="coerce")
        bad = v.index[(num.isna() & v.notna()) | np.isinf(num.fillna(0))].astype(str).tolist()
        if bad:
            raise OncoFMError(f"copy-number values must be numbers (levels as in the training cohort, e.g. -2..2); "
                              f"not for {', '.join(bad[:5])}")
        if (num.abs() > 10).any():
            raise OncoFMError("copy-number values above 10 in absolute value: give levels (GISTIC -2..2, as the "
                              f"training cohort), not copy numbers or segment means; e.g. {num.abs().idxmax()}="
                              f"{num[num.abs().idxmax()]:g}")
        num.index = num.index.astype(str)
        layers["cnv"] = num
    if mutation is not None:
        if isinstance(mutation, (list, tuple, set)):
            listed = {str(g) for g in mutation}
            model = set(features.get("mutation", []))
            v = pd.Series({g: 1.0 if g in listed else 0.0 for g in model | listed})
        else:
            v = pd.to_numeric(pd.Series(mutation), errors="coerce")
            v.index = v.index.astype(str)
        bad = v.index[v.notna() & ~v.isin([0.0, 1.0])].astype(str).tolist()
        if bad:
            raise OncoFMError(f"mutation status must be 0 (wild-type) or 1 (mutated), or give a list of mutated "
                              f"genes; not for {', '.join(bad[:5])}")
        layers["mutation"] = v
    covs: dict[str, float] = {}
    for name, value, parse in (("stage", stage, parse_stage), ("grade", grade, parse_grade)):
        if value is None:
            continue
        parsed = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else parse(value)
        if parsed is None or (np.isfinite(parsed) and parsed not in (1.0, 2.0, 3.0, 4.0)):
            raise OncoFMError(f"{name} {value!r} is not recognised: give 1-4 or text like "
                              f"{'Stage IIIA' if name == 'stage' else 'G3 / High Grade'}")
        covs[name] = float(parsed)
    return layers, covs


def layer_input_table(values: dict[str, tuple[list[str], np.ndarray]], attributions: dict[str, np.ndarray],
                      coefficients: pd.DataFrame | None, cancer_type: str) -> pd.DataFrame:
    """``layer, feature, value, coef, q, attribution`` of one patient's further layers (``values``:
    ``{layer: (features, (F,) values)}``; ``attributions``: ``{layer: (F,)}``, absent = NaN): the one builder of
    :attr:`OmicsResult.layer_inputs`, for the predictor and the stage's stored exports alike."""
    rows = []
    for name, (feats, vals) in values.items():
        coef = layer_coefficients(coefficients, name, cancer_type).reindex(feats)
        att = attributions.get(name)
        rows.append(pd.DataFrame({"layer": name, "feature": list(feats), "value": np.asarray(vals, dtype=float),
                                  "coef": coef["coef"].to_numpy(float), "q": coef["q"].to_numpy(float),
                                  "attribution": (np.full(len(feats), np.nan) if att is None
                                                  else np.asarray(att, dtype=float))}))
    return pd.concat(rows, ignore_index=True)


def layer_coefficients(coefficients: pd.DataFrame | None, layer: str, cancer_type: str) -> pd.DataFrame:
    """``coef, q`` by feature of one layer for ``cancer_type`` (the pan-cancer rows where the type has none)."""
    from oncofm.survival.cox_stage import layer_rows

    if coefficients is None:
        return pd.DataFrame(columns=["coef", "q"])
    c = layer_rows(coefficients, layer)
    own = c[c[Col.CANCER].astype(str) == cancer_type].drop_duplicates("gene").set_index("gene")[["coef", "q"]]
    pan = c[c[Col.CANCER].astype(str) == PAN_CANCER].drop_duplicates("gene").set_index("gene")[["coef", "q"]]
    return own.combine_first(pan) if len(own) else pan


def check_gene_coverage(genes: list[str], expression: pd.Series, min_fraction: float) -> tuple[int, list[str]]:
    """``(n_present, missing genes)`` of a patient's profile against the model's ``genes``; raises
    :class:`~oncofm.errors.OncoFMError` saying how many are there when fewer than ``min_fraction`` are."""
    values = pd.Series(expression, dtype=float)
    values.index = values.index.astype(str)
    values = values[~values.index.duplicated()].reindex(genes)
    missing = [g for g, v in zip(genes, values.to_numpy(), strict=True) if not np.isfinite(v)]
    n_present = len(genes) - len(missing)
    if n_present == 0 or n_present < min_fraction * len(genes):
        hint = ", ".join(pd.Series(expression).index[:3].astype(str))
        raise OncoFMError(
            f"the expression profile has {n_present} of the model's {len(genes)} genes "
            f"({100 * n_present / max(len(genes), 1):.1f}%); at least {100 * min_fraction:.0f}% are needed. Use "
            f"HGNC gene symbols as in the training cohort (e.g. {', '.join(genes[:3])}; the input's genes look "
            f"like {hint}).")
    return n_present, missing


def coefficients_for(coefficients: pd.DataFrame, cancer_type: str) -> pd.DataFrame:
    """``gene, coef, q`` of a Cox table for ``cancer_type`` (the pan-cancer rows for a type it lacks)."""
    from oncofm.survival.cox_stage import layer_rows

    c = layer_rows(coefficients, "expression")
    own = c[c[Col.CANCER].astype(str) == cancer_type]
    if own.empty:
        own = c[c[Col.CANCER].astype(str) == PAN_CANCER]
    cols = [x for x in ("gene", "coef", "q") if x in own.columns]
    return own[cols].drop_duplicates("gene")


def attribution_table(genes: list[str], attribution: np.ndarray, z: pd.Series, coef: pd.DataFrame) -> pd.DataFrame:
    """``gene, attribution, expression_z, coef, q`` sorted by |attribution| (largest first; ties keep gene order)."""
    df = pd.DataFrame({"gene": [str(g) for g in genes], "attribution": np.asarray(attribution, dtype=float),
                       "expression_z": pd.Series(z, dtype=float).reindex(genes).to_numpy(dtype=float)})
    df = df.merge(coef, on="gene", how="left")
    for col in ("coef", "q"):
        if col not in df:
            df[col] = np.nan
    order = df["attribution"].abs().sort_values(ascending=False, kind="stable").index
    return df.reindex(order).reset_index(drop=True)


def stored_omics_results(layout: RunLayout, patients: pd.DataFrame, *, horizon_years: float = 5.0) -> dict[str, OmicsResult]:
    """The omics stage's stored exports (made by :meth:`OmicsPredictor.predict_table`) as one
    :class:`OmicsResult` per patient of ``patients`` (``patient_id, cancer_type``) that has them.

    This is how the reasoning stage reads the training patients' omics results: the numbers are the
    predictor's, stored once by ``oncofm train omics``; z-scores come from the run's normalised
    expression and Cox facts from the coefficient table at ``horizon_years``.
    """
    from oncofm.cohort.normalize import load_normalized_expression

    arts = OmicsArtifacts.of(layout.root)
    if not arts.predictions.exists():
        return {}
    preds = pd.read_parquet(arts.predictions).groupby(Col.PATIENT)[["prob", "risk"]].mean()
    emb = pd.read_parquet(arts.embeddings) if arts.embeddings.exists() else pd.DataFrame()
    if Col.PATIENT in emb.columns:
        emb = emb.set_index(Col.PATIENT)
    att = (dict(tuple(pd.read_parquet(arts.attributions).groupby(Col.PATIENT))) if arts.attributions.exists()
           else {})
    coef = pd.read_parquet(layout.coefficients) if layout.coefficients.exists() else pd.DataFrame(
        columns=[Col.CANCER, "gene", "coef", "q"])
    if "horizon_years" in coef and coef["horizon_years"].notna().any():
        hz = coef["horizon_years"].astype(float)
        nearest = hz.iloc[(hz - horizon_years).abs().argsort()].iloc[0]
        coef = coef[np.isclose(hz, nearest) | hz.isna()]
    try:
        z = load_normalized_expression(layout.root)
    except OncoFMError:
        z = pd.DataFrame()
    version = model_version(arts.dir)
    further = (dict(tuple(pd.read_parquet(arts.layer_attributions).groupby(Col.PATIENT)))
               if arts.layer_attributions.exists() else {})
    by_type: dict[str, pd.DataFrame] = {}
    out: dict[str, OmicsResult] = {}
    for pid, cancer in zip(patients[Col.PATIENT].astype(str), patients[Col.CANCER].astype(str), strict=True):
        if pid not in preds.index:
            continue
        if cancer not in by_type:
            by_type[cancer] = coefficients_for(coef, cancer)
        a = att.get(pid, pd.DataFrame(columns=["gene", "attribution"]))
        zrow = z.loc[pid] if pid in z.index else pd.Series(dtype=float)
        table = attribution_table(a["gene"].astype(str).tolist(), a["attribution"].to_numpy(float), zrow,
                                  by_type[cancer])
        n_genes = len(table)
        out[pid] = OmicsResult(prob=float(preds.loc[pid, "prob"]), logit=float(preds.loc[pid, "risk"]),
                               embedding=(emb.loc[pid].to_numpy(np.float32) if pid in emb.index
                                          else np.zeros(0, np.float32)),
                               attributions=table, n_present=n_genes, n_model_genes=n_genes, missing_genes=[],
                               version=version)
        if pid in further:  # the model's further layers and covariates, as the predictor reports them
            rows = further[pid]
            cov = rows[rows["layer"] == "covariate"]
            lay = rows[rows["layer"] != "covariate"]
            if len(lay):
                groups = [(str(k), g) for k, g in lay.groupby("layer", sort=False)]
                out[pid].layer_inputs = layer_input_table(
                    {k: (g["feature"].astype(str).tolist(), g["value"].to_numpy(float)) for k, g in groups},
                    {k: g["attribution"].to_numpy(float) for k, g in groups}, coef, cancer)
            out[pid].covariates = dict(zip(cov["feature"].astype(str), cov["value"].astype(float), strict=True))
            out[pid].covariate_effects = dict(zip(cov["feature"].astype(str), cov["attribution"].astype(float),
                                                  strict=True))
    return out
