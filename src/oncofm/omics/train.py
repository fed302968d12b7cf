"""The ``train omics`` stage: fit the gene-token transformer, evaluate it and its baselines on the test split.

Loss (per batch)::

    loss = BCE(logit, label)  over patients with a 5-year label
         + cox_weight * CoxPL(logit; time, event censored at the horizon)  over every patient in the batch

The Cox partial likelihood (Breslow, within the batch, times administratively censored at the horizon) uses
the same logit as its log-risk, so the ~55% of patients censored before 5 years — who have no binary label —
still teach the ranking. ``cox_weight`` (default 0.5) weights it; 0 gives plain BCE.

Anchor (default ``anchor="coxnet"``): before training, a Cox elastic net on the wide inputs (x and x·c of
every gene, cancer type, age; penalty chosen on validation), Platt-scaled to a logit on the labelled
training patients, is copied into the model's linear path and frozen, and the transformer head starts at
zero — the model starts as that linear model and the encoder learns the residual (chosen on validation;
docs/omics.md). ``anchor="none"`` trains the transformer alone.

The validation split selects the epoch (early stopping on ``val_score`` = mean of validation AUC and
C-index); the test split is predicted once, after training, for the metrics and the side-by-side table
with the baselines (:mod:`oncofm.omics.baselines`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd
from pydantic import Field

from oncofm.config import StageSettings
from oncofm.omics.artifacts import OmicsArtifacts
from oncofm.paths import RunLayout

if TYPE_CHECKING:
    from oncofm.omics.data import OmicsTable
    from oncofm.omics.predict import TablePrediction

log = logging.getLogger(__name__)

STAGE = "train_omics"
MODEL_LABEL = "omics_transformer"


class OmicsTrainSettings(StageSettings):
    """Settings of ``oncofm train omics``."""

    stage: ClassVar[str] = STAGE

    run: str
    horizon_years: float = Field(5.0, gt=0)
    max_genes: int | None = Field(64, ge=1, description="use the first N genes of features/genes.txt "
                                  "(ranked by the features stage); None = all")
    model: str = "ft_transformer"
    d_model: int = Field(32, ge=8)
    n_layers: int = Field(2, ge=1)
    n_heads: int = Field(4, ge=1)
    ffn_factor: float = Field(2.0, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)
    attention_dropout: float = Field(0.1, ge=0, lt=1)
    linear_skip: bool = Field(False, description="add a linear (wide) path on the same inputs to the logit")
    gene_dropout: float = Field(0.0, ge=0, lt=1, description="token dropout: P(a gene token is hidden) in training")
    anchor: str = Field("coxnet", pattern="^(none|logistic|coxnet)$", description="start the wide path at an L2 "
                        "logistic regression or a (Platt-scaled) Cox elastic net fitted on the training split "
                        "(penalty chosen on validation), zero the head, learn the residual")
    freeze_anchor: bool = Field(True, description="keep the anchored wide path fixed during training")
    cox_weight: float = Field(0.5, ge=0, description="weight of the auxiliary Cox partial likelihood")
    cox_stratified: bool = Field(False, description="risk sets within the patient's cancer type only")
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    patience: int = Field(5, ge=1)
    seed: int = 0
    cnv_features: int = Field(0, ge=0, description="copy-number tokens: the best N CNV features of the training-"
                              "split Cox table (0 = none)")
    mutation_features: int = Field(0, ge=0, description="mutation tokens: the best N mutation features (0 = none)")
    covariates: list[str] = Field(default_factory=list, description="clinical covariate tokens from the patients "
                                  "table: stage, grade (1-4, unknown its own level); baselines get them too")
    baselines: list[str] = Field(default_factory=lambda: ["clinical", "logistic_l2", "coxnet", "hgb"])
    ig_steps: int = Field(8, ge=1, description="integrated-gradient steps per patient")
    n_boot: int = Field(1000, ge=0, description="bootstrap resamples for the AUC CI")
    device: str = Field("cpu", pattern="^(cpu|auto)$")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (None: torch's default); 1 is "
                                "fastest on a machine shared with other jobs")
    progress: bool = True
    redo: bool = False


# ---------------------------------------------------------------- losses and the training task
def cox_partial_likelihood(risk: Any, time: Any, event: Any) -> Any:
    """Negative Breslow partial log-likelihood of ``risk`` (B,), averaged over events; 0 without events."""
    import torch

    order = torch.argsort(time, descending=True)
    r, e = risk[order], event[order]
    log_risk_set = torch.logcumsumexp(r, dim=0)  # (B,): log sum over patients with time >= t_i
    n_events = e.sum()
    if n_events == 0:
        return risk.sum() * 0.0
    return -((r - log_risk_set) * e).sum() / n_events


class OmicsTask:
    """:class:`oncofm.training.TrainTask` for the omics transformer."""

    def __init__(self, cox_weight: float, stratified: bool = False) -> None:
        self.cox_weight = cox_weight
        self.stratified = stratified

    def _cox(self, logits: Any, batch: dict[str, Any]) -> Any:
        if not self.stratified:
            return cox_partial_likelihood(logits, batch["time"], batch["event"])
        total, events = logits.sum() * 0.0, 0.0
        for c in batch["cancer"].unique():
            m = batch["cancer"] == c
            n_ev = float(batch["event"][m].sum())
            if n_ev > 0:
                total = total + n_ev * cox_partial_likelihood(logits[m], batch["time"][m], batch["event"][m])
                events += n_ev
        return total / max(events, 1.0)

    def loss(self, model: Any, batch: dict[str, Any]) -> Any:
        import torch.nn.functional as F

        from oncofm.omics.model import model_inputs

        logits, _ = model(*model_inputs(batch))
        has = ~batch["label"].isnan()
        bce = F.binary_cross_entropy_with_logits(logits[has], batch["label"][has]) if has.any() else logits.sum() * 0
        if self.cox_weight == 0:
            return bce
        return bce + self.cox_weight * self._cox(logits, batch)

    def evaluate(self, model: Any, loader: Any) -> dict[str, float]:
        import torch

        from oncofm.omics.model import model_inputs
        from oncofm.survival.metrics import auc_score, harrell_c_index

        logits, labels, times, events, losses = [], [], [], [], []
        for batch in loader:
            out, _ = model(*model_inputs(batch))
            losses.append(float(self.loss(model, batch)) * len(out))
            logits.append(out)
            labels.append(batch["label"])
            times.append(batch["time"])
            events.append(batch["event"])
        s, y = torch.cat(logits).numpy(), torch.cat(labels).numpy()
        has = ~np.isnan(y)
        auc = auc_score(y[has], s[has])
        c = harrell_c_index(torch.cat(times).numpy(), torch.cat(events).numpy(), s)
        return {"val_loss": sum(losses) / len(s), "val_auc": auc, "val_c_index": c,
                "val_score": float(np.nanmean([auc, c]))}


# ---------------------------------------------------------------- helpers
def _metrics_dict(table: pd.DataFrame) -> dict[str, Any]:
    from oncofm.survival.metrics import POOLED, mean_per_cancer

    per = table.drop(index=POOLED)
    return {"pooled": table.loc[POOLED].to_dict(), "per_cancer_type": per.to_dict(orient="index"),
            "mean_cancer_c_index": mean_per_cancer(table, "c_index"),
            "mean_cancer_auc": mean_per_cancer(table, "auc")}


def _val_metrics(val: Any, prob: np.ndarray) -> dict[str, float]:
    """Validation AUC (labelled) and C-index (follow-up censored at the horizon, as the loop monitors)."""
    from oncofm.survival.endpoints import censor_at_horizon
    from oncofm.survival.metrics import auc_score, harrell_c_index

    has = ~np.isnan(val.label)
    t, e = censor_at_horizon(val.time, val.event, val.horizon_years)
    return {"auc": auc_score(val.label[has], prob[has]), "c_index": harrell_c_index(t, e, prob)}


def comparison_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per model: pooled AUC [95% CI], C-index, td-AUC, Brier, mean per-cancer C-index."""
    rows = []
    for name, r in results.items():
        p = r["pooled"]
        rows.append({"model": name, "auc": p["auc"], "auc_lo": p["auc_lo"], "auc_hi": p["auc_hi"],
                     "c_index": p["c_index"], "td_auc": p["td_auc"], "brier": p["brier"],
                     "mean_cancer_c_index": r["mean_cancer_c_index"], "n_labelled": p["n_labelled"],
                     "n_unlabelled": p["n_unlabelled"]})
    return rows


def print_comparison(rows: list[dict[str, Any]], per_cancer: dict[str, dict[str, Any]], title: str) -> None:
    """Rich tables: the side-by-side comparison and the per-cancer metrics of the first model."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=140)
    t = Table(title=title)
    for col in ("model", "AUC-5y [95% CI]", "C-index", "td-AUC-5y", "Brier-5y", "mean C (per type)"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        t.add_row(r["model"], f"{r['auc']:.3f} [{r['auc_lo']:.3f}, {r['auc_hi']:.3f}]", f"{r['c_index']:.3f}",
                  f"{r['td_auc']:.3f}", f"{r['brier']:.3f}", f"{r['mean_cancer_c_index']:.3f}")
    console.print(t)
    if rows:
        console.print(f"AUC on {int(rows[0]['n_labelled'])} test patients with a 5-year label "
                      f"({int(rows[0]['n_unlabelled'])} censored before 5 years excluded); C-index, td-AUC and "
                      "Brier (IPCW) on all test patients.")
    pc = Table(title=f"{rows[0]['model'] if rows else ''}: per cancer type (test)")
    for col in ("cancer type", "n", "labelled", "AUC-5y", "C-index", "td-AUC-5y", "Brier-5y"):
        pc.add_column(col, justify="left" if col == "cancer type" else "right")
    for ct, m in per_cancer.items():
        pc.add_row(ct, str(int(m.get("n", 0))), str(int(m["n_labelled"])) if "n_labelled" in m and m["n_labelled"] == m["n_labelled"] else "",
                   *(f"{m.get(k, float('nan')):.3f}" for k in ("auc", "c_index", "td_auc", "brier")))
    console.print(pc)


def save_plots(arts: OmicsArtifacts, label: np.ndarray, probs: dict[str, np.ndarray]) -> None:
    """ROC curves (every model) and the calibration plot of the transformer on labelled test patients."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import roc_curve

    from oncofm.io import save_figure

    has = ~np.isnan(label)
    y = label[has].astype(int)
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, p in probs.items():
        fpr, tpr, _ = roc_curve(y, p[has])
        ax.plot(fpr, tpr, label=name, lw=2 if name == MODEL_LABEL else 1)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="5-year death, test split")
    ax.legend(loc="lower right", fontsize=8)
    save_figure(fig, arts.roc_png, dpi=120, bbox_inches="tight")
    fig, ax = plt.subplots(figsize=(5, 5))
    frac, mean = calibration_curve(y, probs[MODEL_LABEL][has], n_bins=10, strategy="quantile")
    ax.plot(mean, frac, "o-", label=MODEL_LABEL)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="predicted P(death within 5 years)", ylabel="observed fraction", title="Calibration, test")
    ax.legend(loc="upper left", fontsize=8)
    save_figure(fig, arts.calibration_png, dpi=120, bbox_inches="tight")


def save_model(arts: OmicsArtifacts, model: Any, config: dict[str, Any]) -> None:
    import yaml
    from safetensors.torch import save_file

    from oncofm.io import atomic_path, write_text

    with atomic_path(arts.weights) as tmp:
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    write_text(yaml.safe_dump(config, sort_keys=False), arts.config)


# ---------------------------------------------------------------- the stage
def settings_layers(settings: OmicsTrainSettings) -> dict[str, int]:
    """``{"cnv": N, "mutation": M}`` of the further layers the settings ask for (0s left out)."""
    return {k: v for k, v in (("cnv", settings.cnv_features), ("mutation", settings.mutation_features)) if v}


def load_settings_table(settings: OmicsTrainSettings) -> Any:
    """The stage's :class:`~oncofm.omics.data.OmicsTable`: genes, further layers and covariates of ``settings``."""
    from oncofm.errors import OncoFMError
    from oncofm.omics.data import load_omics_table

    unknown = sorted(set(settings.covariates) - {"stage", "grade"})
    if unknown:
        raise OncoFMError(f"unknown covariate(s) {unknown}: choose from stage, grade")
    table = load_omics_table(settings.run, horizon_years=settings.horizon_years, max_genes=settings.max_genes,
                             layers=settings_layers(settings), covariates=tuple(settings.covariates))
    for c in settings.covariates:
        if np.isnan(table.covariates[c]).all():
            raise OncoFMError(f"covariate {c!r} is unknown for every patient of {settings.run}: re-import the cohort "
                              "with stage/grade (`oncofm cohort import ... --redo`; tcga13 reads the TCGA-CDR table)")
    return table


def fit_omics_model(settings: OmicsTrainSettings, table: Any, training_dir: Path) -> tuple[Any, ...]:
    """Fit the encoder, anchor and transformer on ``table``'s train split (validation picks the epoch).

    Returns ``(model, encoder, arch, fit_result, anchor_chosen, accelerator)``; used by the stage and by
    ``bench/ablation.py`` (so both train exactly the same model).
    """
    import torch

    from oncofm.omics.data import ClinicalEncoder, OmicsDataset
    from oncofm.omics.model import create_model
    from oncofm.training import TrainSettings, fit, make_accelerator

    train, val, test = (table.where_split(s) for s in ("train", "val", "test"))
    if min(len(train), len(val), len(test)) == 0:
        from oncofm.errors import OncoFMError

        raise OncoFMError(f"the run needs train/val/test patients (got {len(train)}/{len(val)}/{len(test)}); "
                          "run `oncofm cohort split --run RUN`")
    encoder = ClinicalEncoder.fit(train)
    log.info("omics model: %d genes; train %d (labelled %d), val %d, test %d patients", len(table.genes),
             len(train), int((~np.isnan(train.label)).sum()), len(val), len(test))

    torch.manual_seed(settings.seed)
    arch = {"n_genes": len(table.genes), "n_cancer_types": len(encoder.cancer_types), "d_model": settings.d_model,
            "n_layers": settings.n_layers, "n_heads": settings.n_heads, "ffn_factor": settings.ffn_factor,
            "dropout": settings.dropout, "attention_dropout": settings.attention_dropout,
            "linear_skip": settings.linear_skip or settings.anchor != "none", "gene_dropout": settings.gene_dropout}
    if table.layers:  # only then, so a model without further inputs keeps its old architecture record
        arch["layers"] = {k: len(f) for k, (f, _) in table.layers.items()}
    if encoder.covariates:
        arch["covariates"] = list(encoder.covariates)
    model = create_model(settings.model, **arch)
    anchor_chosen = None
    if settings.anchor != "none":
        from oncofm.omics.baselines import anchor_linear

        a = anchor_linear(train, val, encoder, settings.anchor)
        anchor_chosen = a.pop("chosen")
        model.set_linear_anchor(**a, freeze=settings.freeze_anchor)
        log.info("wide path anchored at %s (frozen=%s)", anchor_chosen,
                 settings.freeze_anchor)
    train_settings = TrainSettings(epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.lr,
                                   weight_decay=settings.weight_decay, patience=settings.patience,
                                   monitor="val_score", mode="max", seed=settings.seed, device=settings.device,
                                   progress=settings.progress)
    accelerator = make_accelerator(train_settings)
    result = fit(model, OmicsDataset(train, encoder), OmicsDataset(val, encoder), OmicsTask(settings.cox_weight, settings.cox_stratified),
                 train_settings, training_dir, accelerator=accelerator)
    return model, encoder, arch, result, anchor_chosen, accelerator


def layer_attribution_rows(table: OmicsTable, exported: TablePrediction) -> pd.DataFrame:
    """The long table of ``layer_attributions.parquet``: every patient's further-layer values with their
    integrated gradients, and covariate levels with their occlusion effects (layer ``covariate``)."""
    parts = []
    ids = np.asarray(table.patient_ids, dtype=str)
    for name, (feats, values) in table.layers.items():
        n = len(feats)
        parts.append(pd.DataFrame({"patient_id": np.repeat(ids, n), "layer": name,
                                   "feature": np.tile(np.asarray(feats, dtype=str), len(ids)),
                                   "value": values[..., 0].reshape(-1).astype(float),
                                   "attribution": exported.layer_attributions[name].reshape(-1).astype(float)}))
    for name, effect in exported.covariate_effects.items():
        parts.append(pd.DataFrame({"patient_id": ids, "layer": "covariate", "feature": name,
                                   "value": np.asarray(table.covariates[name], dtype=float),
                                   "attribution": effect.astype(float)}))
    return pd.concat(parts, ignore_index=True)


def _outputs_done(arts: OmicsArtifacts) -> bool:
    import yaml

    done = all(p.exists() for p in (arts.weights, arts.config, arts.metrics, arts.predictions, arts.embeddings,
                                    arts.attributions))
    if done:  # a model with further layers / covariates also exports their attributions (since 2026-12-02)
        arch = (yaml.safe_load(arts.config.read_text()) or {}).get("architecture") or {}
        done = arts.layer_attributions.exists() or not (arch.get("layers") or arch.get("covariates"))
    return done


def train_omics(settings: OmicsTrainSettings) -> dict[str, Path]:
    """Train, evaluate and export the omics model of ``settings.run``; returns the artifact paths."""
    import shutil

    import torch

    from oncofm.io import write_json, write_parquet
    from oncofm.omics.baselines import run_baselines
    from oncofm.omics.predict import OmicsPredictor
    from oncofm.survival.metrics import evaluate_predictions

    layout = RunLayout(settings.run)
    arts = OmicsArtifacts.of(settings.run)
    settings_file = layout.settings_file(STAGE)
    outputs = arts.outputs()
    from oncofm.config import check_stage

    if _outputs_done(arts) and check_stage(settings, settings_file, [], ignore=("redo", "progress"), on_change="redo",
                                           what=f"the omics model in {arts.dir}"):
        log.info("omics model already trained in %s with these settings (use --redo to retrain)", arts.dir)
        return outputs
    # checkpoints of a model made with other settings must not be resumed (only an interrupted run of these)
    stale = settings_file.exists() and not settings.same_as_saved(settings_file, ignore=("redo", "progress"))
    if (settings.redo or stale) and arts.training_dir.exists():
        shutil.rmtree(arts.training_dir)

    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    t_start = time.perf_counter()
    table = load_settings_table(settings)
    train, val, test = (table.where_split(s) for s in ("train", "val", "test"))
    model, encoder, arch, result, anchor_chosen, accelerator = fit_omics_model(settings, table, arts.training_dir)
    train_seconds = time.perf_counter() - t_start
    if not accelerator.is_main_process:  # DDP: rank 0 evaluates and writes
        return outputs
    model = accelerator.unwrap_model(model).cpu()

    # every patient: predictions, embeddings and attributions through the predictor `explain` uses
    predictor = OmicsPredictor.build(model, genes=table.genes, encoder=encoder, horizon_years=settings.horizon_years,
                                     run=settings.run, ig_steps=settings.ig_steps)
    t_ig = time.perf_counter()
    exported = predictor.predict_table(table, attributions=True, progress=settings.progress)
    ig_seconds = time.perf_counter() - t_ig
    logits, emb, prob = exported.logits, exported.embeddings, exported.probs
    write_parquet(pd.DataFrame({"patient_id": table.patient_ids, "split": table.split, "prob": prob,
                                "risk": logits}), arts.predictions)
    write_parquet(pd.DataFrame(emb, index=pd.Index(table.patient_ids, name="patient_id"),
                               columns=[f"e{i}" for i in range(emb.shape[1])]), arts.embeddings)

    # test metrics, transformer then baselines (same split, same features)
    is_test = table.split == "test"
    common = dict(time=test.time, event=test.event, cancer_type=test.cancer_type, train_time=train.time,
                  train_event=train.event, years=settings.horizon_years, n_boot=settings.n_boot, seed=settings.seed)
    results = {MODEL_LABEL: _metrics_dict(evaluate_predictions(prob=prob[is_test], risk=logits[is_test], **common))}
    test_probs = {MODEL_LABEL: prob[is_test]}
    chosen = {}
    is_val = table.split == "val"
    val_results = {MODEL_LABEL: _val_metrics(val, prob[is_val])}
    for name, b in run_baselines(train, val, test, encoder, tuple(settings.baselines)).items():
        results[name] = _metrics_dict(evaluate_predictions(prob=b.test_prob, risk=b.test_risk, **common))
        test_probs[name] = b.test_prob
        chosen[name] = b.chosen
        val_results[name] = _val_metrics(val, b.val_prob)
    log.info("validation split (selection only): %s", ", ".join(
        f"{k} AUC {v['auc']:.3f} C {v['c_index']:.3f}" for k, v in val_results.items()))
    rows = comparison_rows(results)
    print_comparison(rows, results[MODEL_LABEL]["per_cancer_type"], "5-year survival, tcga test split"
                     if "tcga13" in str(settings.run) else "5-year survival, test split")
    save_plots(arts, test.label, test_probs)

    # attributions for every patient (long table)
    n_genes = len(table.genes)
    write_parquet(pd.DataFrame({"patient_id": np.repeat(table.patient_ids.astype(str), n_genes),
                                "gene": np.tile(np.asarray(table.genes, dtype=str), len(table)),
                                "attribution": exported.attributions.reshape(-1)}), arts.attributions)
    if table.layers or exported.covariate_effects:
        write_parquet(layer_attribution_rows(table, exported), arts.layer_attributions)

    config = {"model": settings.model, "architecture": arch, "genes": table.genes,
              **({"layers": {k: list(f) for k, (f, _) in table.layers.items()}} if table.layers else {}),
              "clinical": encoder.to_dict(), "horizon_years": settings.horizon_years, "ig_steps": settings.ig_steps,
              "best_epoch": result.best_epoch, "source_run": str(Path(settings.run).resolve())}
    save_model(arts, model, config)
    if anchor_chosen is not None:
        chosen["anchor"] = anchor_chosen
    metrics = {"test": results, "comparison": rows, "baseline_hyperparameters": chosen, "val": val_results,
               "training": {"best_epoch": result.best_epoch, "best_val_score": result.best_metric,
                            "epochs_run": result.epochs_run, "stopped_early": result.stopped_early,
                            "fit_seconds": result.seconds, "train_seconds_incl_loading": train_seconds,
                            "ig_seconds": ig_seconds, "total_seconds": time.perf_counter() - t_start,
                            "history": result.history},
               "data": {"n_genes": len(table.genes), "n_train": len(train), "n_val": len(val), "n_test": len(test)}}
    write_json(metrics, arts.metrics)
    settings.save(settings_file)
    log.info("omics model written to %s (%.0f s)", arts.dir, time.perf_counter() - t_start)
    return outputs
