"""The slide branch on slide-level features: ``oncofm train slide-features --run RUN``.

When a cohort comes with one vector of image features per patient (the hif2gene HIFs, a slide encoder's
embedding; imported by :mod:`oncofm.cohort.slide_features`), the slide branch is a small network on that
vector instead of attention MIL over patches. It keeps the slide model's output contract — a probability of
death within the horizon, an embedding (its penultimate layer, what fusion concatenates) and an explanation
of the prediction — with per-feature attributions in place of patch attention.

Preprocessing (fitted on the training split only, stored in the model):

1. ``log1p`` of every feature whose training values are all ≥ 0 and whose skewness exceeds 1 (counts, areas
   and densities span orders of magnitude); other features unchanged;
2. missing values imputed with the training median (the hif2gene table has 0.1 % missing);
3. standardised with the training mean and standard deviation, clipped to ±``clip``.

The network: dropout on the input, ``Linear(D, hidden)`` → GELU → dropout = the embedding, then a linear
head; trained with :func:`oncofm.training.fit` on the 5-year labels (binary cross-entropy), the epoch chosen
by validation AUC. The attribution of each feature is its integrated gradient from the average training
patient (0 in standardised space) to the patient: the attributions sum to ``logit(x) - logit(average)``.
Each attributed feature is shown with the patient's **percentile within its cancer type** among the
training patients (``reference.parquet``; the pooled training patients for a type the model never saw).

Outputs (``RUN/models/slide_features/``, :class:`SlideFeatureArtifacts`): ``model.safetensors``,
``config.yaml`` (settings, feature names, preprocessing), ``reference.parquet``, ``metrics.json`` (AUC with
95% CI and C-index per split, pooled and per cancer type), ``predictions.parquet``, ``embeddings.parquet``,
``attributions.parquet`` (the ``top_attributions`` largest per patient).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
import yaml
from pydantic import Field
from torch import nn

from oncofm.config import StageSettings, artifact_version, check_stage, write_stamp
from oncofm.errors import DataValidationError, OncoFMError
from oncofm.paths import ModelArtifacts, RunLayout
from oncofm.training import TrainSettings

log = logging.getLogger(__name__)

__all__ = ["FeaturePreprocessor", "SlideFeatureArtifacts", "SlideFeatureNet", "SlideFeaturePredictor",
           "SlideFeatureResult", "SlideFeatureSettings", "feature_percentiles", "stored_feature_results",
           "train_slide_feature_model"]


@dataclass(frozen=True)
class SlideFeatureArtifacts(ModelArtifacts):
    """Every file the ``train slide-features`` stage writes."""

    name = "slide_features"

    weights = property(lambda self: self.dir / "model.safetensors")
    config = property(lambda self: self.dir / "config.yaml")
    reference = property(lambda self: self.dir / "reference.parquet")
    metrics = property(lambda self: self.dir / "metrics.json")
    predictions = property(lambda self: self.dir / "predictions.parquet")
    embeddings = property(lambda self: self.dir / "embeddings.parquet")
    attributions = property(lambda self: self.dir / "attributions.parquet")
    training_dir = property(lambda self: self.dir / "training")

    def outputs(self) -> dict[str, Path]:
        return {"weights": self.weights, "config": self.config, "metrics": self.metrics,
                "predictions": self.predictions, "embeddings": self.embeddings, "attributions": self.attributions,
                "reference": self.reference}


def _default_train() -> TrainSettings:
    return TrainSettings(epochs=150, batch_size=128, lr=1e-3, weight_decay=1e-2, patience=25, monitor="val_auc",
                         mode="max", warmup_fraction=0.0, progress=False)


class SlideFeatureSettings(StageSettings):
    """Settings of the slide-feature model (saved in ``config.yaml`` and ``settings/train_slide_features``)."""

    stage: ClassVar[str] = "train_slide_features"

    run: str
    hidden: int = Field(32, ge=2, description="width of the embedding (penultimate layer)")
    input_dropout: float = Field(0.2, ge=0, lt=1)
    dropout: float = Field(0.3, ge=0, lt=1)
    clip: float = Field(5.0, gt=0, description="standardised values are clipped to +-clip")
    log_skew: float = Field(1.0, ge=0, description="log1p features that are >= 0 with skewness above this")
    horizon_years: float = Field(5.0, gt=0)
    ig_steps: int = Field(32, ge=4, description="integration steps of the integrated-gradient attributions")
    top_attributions: int = Field(20, ge=1, description="attributions stored per patient")
    train: TrainSettings = Field(default_factory=_default_train)
    redo: bool = False


# ----------------------------------------------------------------------------------------------------------
# preprocessing
@dataclass
class FeaturePreprocessor:
    """log1p of skewed non-negative features, median imputation, standardisation, clipping (training fit)."""

    names: list[str]
    log: np.ndarray  # (D,) bool
    median: np.ndarray  # (D,) after the log
    mean: np.ndarray
    std: np.ndarray
    clip: float

    @classmethod
    def fit(cls, x: np.ndarray, names: list[str], *, clip: float = 5.0, log_skew: float = 1.0) -> FeaturePreprocessor:
        from scipy.stats import skew

        x = np.asarray(x, dtype=np.float64)
        if len(x) < 2:
            raise OncoFMError("the slide-feature model needs at least 2 training patients with slide features")
        finite = np.where(np.isfinite(x), x, np.nan)
        with np.errstate(invalid="ignore"):
            nonneg = np.nanmin(finite, axis=0) >= 0
            sk = np.nan_to_num(skew(finite, axis=0, nan_policy="omit"), nan=0.0)
        use_log = nonneg & (np.asarray(sk) > log_skew)
        t = np.where(use_log, np.log1p(np.where(use_log, np.clip(finite, 0, None), 0.0)), finite)
        median = np.nan_to_num(np.nanmedian(t, axis=0), nan=0.0)
        t = np.where(np.isnan(t), median, t)
        mean, std = t.mean(axis=0), t.std(axis=0)
        std = np.where(std > 1e-12, std, 1.0)
        return cls(list(names), use_log, median, mean, std, float(clip))

    def transform(self, x: np.ndarray) -> np.ndarray:
        """(N, D) raw features → (N, D) float32 model inputs."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.names):
            raise DataValidationError(f"expected {len(self.names)} slide features per patient, got shape {x.shape}")
        t = np.where(self.log, np.log1p(np.clip(np.nan_to_num(x, nan=0.0), 0, None)), x)
        t = np.where(np.isnan(x), self.median, t)
        z = (t - self.mean) / self.std
        return np.clip(z, -self.clip, self.clip).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"names": self.names, "log": self.log.astype(int).tolist(), "median": self.median.tolist(),
                "mean": self.mean.tolist(), "std": self.std.tolist(), "clip": self.clip}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeaturePreprocessor:
        return cls(list(d["names"]), np.asarray(d["log"], bool), np.asarray(d["median"], float),
                   np.asarray(d["mean"], float), np.asarray(d["std"], float), float(d["clip"]))


# ----------------------------------------------------------------------------------------------------------
# the network
class SlideFeatureNet(nn.Module):
    """(B, D) standardised features → ``(logit (B,), embedding (B, hidden))``."""

    def __init__(self, n_features: int, hidden: int = 32, input_dropout: float = 0.2, dropout: float = 0.3) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Dropout(input_dropout), nn.Linear(n_features, hidden), nn.GELU(),
                                  nn.Dropout(dropout))
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.body(x)  # (B, hidden)
        return self.head(emb).squeeze(-1), emb


class _Task:
    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        return nn.functional.binary_cross_entropy_with_logits(model(x)[0], y)

    def evaluate(self, model: nn.Module, loader: Any) -> dict[str, float]:
        from oncofm.survival.metrics import auc_score

        logits, ys = [], []
        with torch.no_grad():
            for x, y in loader:
                logits.append(model(x)[0])
                ys.append(y)
        z, y = torch.cat(logits), torch.cat(ys)
        return {"val_loss": float(nn.functional.binary_cross_entropy_with_logits(z, y)),
                "val_auc": auc_score(y.numpy(), z.numpy())}


def integrated_gradients(model: SlideFeatureNet, z: np.ndarray, steps: int = 32) -> np.ndarray:
    """(N, D) attributions of each standardised feature to the logit, from the 0 baseline (the average training
    patient); midpoint rule, so ``attr.sum(1) ≈ logit(z) - logit(0)``."""
    model.eval()
    x = torch.as_tensor(z, dtype=torch.float32)
    alphas = (torch.arange(steps, dtype=torch.float32) + 0.5) / steps
    total = torch.zeros_like(x)
    for a in alphas:
        xi = (a * x).requires_grad_(True)
        logit, _ = model(xi)
        (grad,) = torch.autograd.grad(logit.sum(), xi)
        total += grad
    return (x * total / steps).numpy()


def feature_percentiles(values: np.ndarray, cancer_type: str, reference: pd.DataFrame,
                        names: list[str]) -> np.ndarray:
    """(D,) mid-rank percentile (0-100) of one patient's raw ``values`` among the reference (training) patients
    of its cancer type (all reference patients when the type has fewer than 10); NaN for a missing value."""
    ref = reference[reference["cancer_type"] == cancer_type]
    if len(ref) < 10:
        ref = reference
    r = ref[names].to_numpy(np.float64)  # (M, D)
    v = np.asarray(values, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        below = np.nansum(r < v, axis=0)
        equal = np.nansum(r == v, axis=0)
        n = np.isfinite(r).sum(axis=0)
        pct = 100.0 * (below + 0.5 * equal) / np.maximum(n, 1)
    pct[~np.isfinite(v) | (n == 0)] = np.nan
    return pct


# ----------------------------------------------------------------------------------------------------------
# results and the predictor
@dataclass
class SlideFeatureResult:
    """The slide-feature model's output for one patient (the slide model's contract, attributions for
    attention)."""

    prob: float
    logit: float
    embedding: np.ndarray  # (hidden,)
    attributions: pd.DataFrame  # feature, name, value, percentile, attribution (largest |attribution| first)
    version: str
    cancer_type: str = ""
    reference_type: str = ""  # the cancer type the percentiles are within ("all" = pooled)

    @property
    def attention(self) -> np.ndarray:  # no patches: nothing attended
        return np.zeros(0)


class SlideFeaturePredictor:
    """The trained slide-feature model: the one inference path of the training exports and ``explain``."""

    def __init__(self, model: SlideFeatureNet, pre: FeaturePreprocessor, reference: pd.DataFrame,
                 settings: SlideFeatureSettings, version: str) -> None:
        self.model, self.pre, self.reference, self.settings, self.version = model, pre, reference, settings, version
        self.model.eval()

    @property
    def feature_names(self) -> list[str]:
        return self.pre.names

    @classmethod
    def load(cls, model_dir: str | Path) -> SlideFeaturePredictor:
        from safetensors.torch import load_file

        from oncofm.io import model_version

        arts = SlideFeatureArtifacts(Path(model_dir))
        for path in (arts.weights, arts.config, arts.reference):
            if not path.exists():
                raise OncoFMError(f"{path} is missing: train the slide-feature model first "
                                  "(`oncofm train slide-features --run RUN`)")
        config = yaml.safe_load(arts.config.read_text())
        settings = SlideFeatureSettings(**config["settings"])
        pre = FeaturePreprocessor.from_dict(config["preprocessing"])
        model = SlideFeatureNet(len(pre.names), settings.hidden, settings.input_dropout, settings.dropout)
        model.load_state_dict(load_file(str(arts.weights)))
        return cls(model, pre, pd.read_parquet(arts.reference), settings, model_version(arts.dir))

    @classmethod
    def from_run(cls, layout: RunLayout) -> SlideFeaturePredictor | None:
        arts = SlideFeatureArtifacts.of(layout.root)
        return cls.load(arts.dir) if arts.weights.exists() else None

    def predict_table(self, features: pd.DataFrame, cancer_types: pd.Series, *,
                      top: int | None = None) -> list[SlideFeatureResult]:
        """One result per row of ``features`` (index patient_id; the model's feature columns, checked)."""
        from oncofm.cohort.slide_features import check_feature_set, slide_feature_names
        from oncofm.pathology.feature_names import describe_feature

        order = check_feature_set(slide_feature_names(features), self.pre.names,
                                  what="the slide features given")
        raw = features[order].to_numpy(np.float64)
        if np.isinf(raw).any():
            raise DataValidationError("slide features contain infinite values; give finite numbers or leave "
                                      "them empty (missing)")
        z = self.pre.transform(raw)
        with torch.no_grad():
            logit, emb = self.model(torch.as_tensor(z))
        attr = integrated_gradients(self.model, z, self.settings.ig_steps)
        top = top or self.settings.top_attributions
        names = np.asarray(order)
        types = cancer_types.reindex(features.index).astype(str).to_numpy()
        known = set(self.reference["cancer_type"].astype(str))
        out = []
        for i in range(len(features)):
            idx = np.argsort(-np.abs(attr[i]), kind="stable")[:top]
            pct = feature_percentiles(raw[i, idx], types[i], self.reference, list(names[idx]))
            ref_type = types[i] if (types[i] in known and (self.reference["cancer_type"] == types[i]).sum() >= 10) \
                else "all"
            table = pd.DataFrame({"feature": names[idx], "name": [describe_feature(n) for n in names[idx]],
                                  "value": raw[i, idx], "percentile": pct, "attribution": attr[i, idx]})
            out.append(SlideFeatureResult(prob=float(torch.sigmoid(logit[i])), logit=float(logit[i]),
                                          embedding=emb[i].numpy().astype(np.float32), attributions=table,
                                          version=self.version, cancer_type=types[i], reference_type=ref_type))
        return out

    def predict(self, features: pd.Series, cancer_type: str) -> SlideFeatureResult:
        """One patient's raw slide features (feature name → value)."""
        frame = pd.DataFrame([pd.to_numeric(features, errors="coerce")], index=["patient"])
        bad = [n for n, v in features.items() if pd.isna(frame.iloc[0][n]) and not pd.isna(v)]
        if bad:
            raise DataValidationError(f"{len(bad)} slide features are not numbers (e.g. {bad[:3]}): give numbers")
        return self.predict_table(frame, pd.Series([cancer_type], index=["patient"]))[0]


# ----------------------------------------------------------------------------------------------------------
# the stage
def train_slide_feature_model(settings: SlideFeatureSettings) -> dict[str, Path]:
    """Fit on the training split (epoch by validation AUC) and export every patient's result."""
    from safetensors.torch import save_file

    from oncofm.cohort.importing import load_patients
    from oncofm.cohort.schema import five_year_labels
    from oncofm.cohort.slide_features import load_slide_features, slide_feature_names
    from oncofm.cohort.splits import load_splits
    from oncofm.io import atomic_path, write_json, write_parquet, write_text
    from oncofm.training import fit

    layout = RunLayout(settings.run)
    arts = SlideFeatureArtifacts.of(layout.root)
    outputs = arts.outputs()
    stamp = layout.settings_file(settings.stage)
    inputs = {"slide_features": artifact_version(layout.slide_features), "splits": artifact_version(layout.splits)}
    if check_stage(settings, stamp, list(outputs.values()), inputs=inputs, on_change="redo",
                   what="the slide-feature model"):
        log.info("slide-feature model in %s is up to date (--redo to retrain)", arts.dir)
        return outputs

    table = load_slide_features(settings.run)
    names = slide_feature_names(table)
    patients = load_patients(settings.run).set_index("patient_id")
    splits = load_splits(settings.run).set_index("patient_id")["split"]
    table = table[table.index.isin(splits.index) & table.index.isin(patients.index)]
    if table.empty:
        raise OncoFMError("no patient with slide features is in the cohort's splits; re-run `oncofm split`")
    ids = table.index.astype(str).tolist()
    labels = five_year_labels(patients.reset_index(), settings.horizon_years).reindex(ids).to_numpy(float)
    split = splits.reindex(ids).astype(str).to_numpy()
    train_rows = split == "train"
    lab = ~np.isnan(labels)
    for part in ("train", "val"):
        m = (split == part) & lab
        if m.sum() < 4 or len(set(labels[m])) < 2:
            raise OncoFMError(f"the {part} split has {int(m.sum())} labelled patients with slide features; the "
                              "slide-feature model needs both outcomes in the train and val splits")
    raw = table[names].to_numpy(np.float64)
    pre = FeaturePreprocessor.fit(raw[train_rows], names, clip=settings.clip, log_skew=settings.log_skew)
    z = pre.transform(raw)

    def dataset(mask: np.ndarray) -> torch.utils.data.TensorDataset:
        return torch.utils.data.TensorDataset(torch.as_tensor(z[mask]), torch.as_tensor(labels[mask], dtype=torch.float32))

    torch.manual_seed(settings.train.seed)
    model = SlideFeatureNet(len(names), settings.hidden, settings.input_dropout, settings.dropout)
    result = fit(model, dataset(train_rows & lab), dataset((split == "val") & lab), _Task(), settings.train,
                 arts.training_dir)
    model.eval()
    reference = table.loc[train_rows, names].copy()
    reference.insert(0, "cancer_type", patients.reindex(reference.index)["cancer_type"].astype(str).to_numpy())
    reference.index.name = "patient_id"

    arts.dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(arts.weights) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    write_parquet(reference, arts.reference)
    config = {"settings": settings.model_dump(mode="json"), "preprocessing": pre.to_dict(),
              "best_epoch": result.best_epoch, "best_val_auc": result.best_metric}
    write_text(yaml.safe_dump(config, sort_keys=False), arts.config)

    predictor = SlideFeaturePredictor.load(arts.dir)  # the exports go through the inference path
    results = predictor.predict_table(table, patients["cancer_type"].astype(str))
    preds = pd.DataFrame({"patient_id": ids, "split": split, "label": labels,
                          "prob": [r.prob for r in results], "logit": [r.logit for r in results],
                          "cancer_type": [r.cancer_type for r in results],
                          "reference_type": [r.reference_type for r in results]})
    emb = pd.DataFrame(np.stack([r.embedding for r in results]), columns=[f"e{i}" for i in range(settings.hidden)])
    emb.insert(0, "patient_id", ids)
    attr = pd.concat([r.attributions.assign(patient_id=pid, rank=np.arange(len(r.attributions)))
                      for pid, r in zip(ids, results, strict=True)], ignore_index=True)
    write_parquet(preds, arts.predictions)
    write_parquet(emb, arts.embeddings)
    write_parquet(attr, arts.attributions)
    metrics = split_metrics(preds, patients, settings.horizon_years)
    metrics["best_epoch"], metrics["epochs_run"] = result.best_epoch, result.epochs_run
    metrics["n_features"], metrics["n_patients"] = len(names), len(ids)
    write_json(metrics, arts.metrics)
    write_stamp(settings, stamp, inputs=inputs)
    for part in ("val", "test"):
        if part in metrics["splits"]:
            m = metrics["splits"][part]["pooled"]
            log.info("slide-feature model %s: AUC %.3f [%.3f, %.3f], C-index %.3f (n=%d)", part, m["auc"],
                     m["auc_lo"], m["auc_hi"], m["c_index"], m["n"])
    return outputs


def split_metrics(preds: pd.DataFrame, patients: pd.DataFrame, horizon_years: float) -> dict[str, Any]:
    """AUC (95% CI), C-index and the rest per split, pooled and per cancer type, from predictions."""
    from oncofm.cohort.schema import Col
    from oncofm.survival.metrics import evaluate_predictions

    p = patients.reindex(preds["patient_id"].astype(str))
    train = (preds["split"] == "train").to_numpy()
    out: dict[str, Any] = {"splits": {}}
    for part in ("train", "val", "test"):
        m = (preds["split"] == part).to_numpy()
        if not m.any():
            continue
        table = evaluate_predictions(time=p[Col.OS_DAYS].to_numpy()[m], event=p[Col.OS_EVENT].to_numpy()[m],
                                     prob=preds["prob"].to_numpy()[m], cancer_type=p["cancer_type"].to_numpy()[m],
                                     train_time=p[Col.OS_DAYS].to_numpy()[train],
                                     train_event=p[Col.OS_EVENT].to_numpy()[train], years=horizon_years)
        out["splits"][part] = {g: {k: (None if pd.isna(v) else float(v)) for k, v in row.items()}
                               for g, row in table.iterrows()}
    return out


def stored_feature_results(layout: RunLayout) -> dict[str, SlideFeatureResult]:
    """The stage's exports read back (predictions, embeddings, attributions) as one result per patient."""
    from oncofm.io import model_version

    arts = SlideFeatureArtifacts.of(layout.root)
    if not arts.predictions.exists():
        return {}
    preds = pd.read_parquet(arts.predictions).set_index("patient_id")
    emb = pd.read_parquet(arts.embeddings).set_index("patient_id")
    attr = pd.read_parquet(arts.attributions)
    version = model_version(arts.dir)
    cols = ["feature", "name", "value", "percentile", "attribution"]
    groups = {str(k): g.sort_values("rank")[cols].reset_index(drop=True) for k, g in attr.groupby("patient_id")}
    return {str(pid): SlideFeatureResult(prob=float(row["prob"]), logit=float(row["logit"]),
                                         embedding=emb.loc[pid].to_numpy(np.float32),
                                         attributions=groups.get(str(pid), pd.DataFrame(columns=cols)),
                                         version=version, cancer_type=str(row.get("cancer_type", "")),
                                         reference_type=str(row.get("reference_type", "")))
            for pid, row in preds.iterrows()}
