"""``oncofm reasoning --run RUN``: the reasoning-text dataset ``RUN/reasoning/dataset.jsonl``.

One JSON object per patient::

    {"patient_id", "split", "label" (1 death by 5 y / 0 alive beyond / null), "risk", "risk_source",
     "evidence": {...}, "target": "... \\nPrediction: ..." or null}

**The risk number in the targets (no leakage).** The target's outcome words are the *true* 5-year
outcome. The risk number is the probability of the *fused head* (``head``):

- ``stacked`` (default): a logistic regression on the two models' logits, ``[logit(p_omics),
  logit(p_slide), has_omics, has_slide]`` (a missing modality's logit is 0 and its flag says so), fitted on
  the **validation** split — patients neither model was fitted on, so it learns how far to trust each
  model's out-of-sample probability (a head fitted on the training split learns from the models' overfit
  training-patient outputs). Validation patients get their **out-of-fold** probability (``head_folds``-fold
  within validation); every other patient the fit on all of validation. For a patient without the slide
  its probability is a monotone function of the omics probability (the same ranking: no harm from the
  missing modality). Its coefficients are saved (``fused_head.json``) and applied unchanged to new patients
  and outside cohorts.
- ``embedding`` (the first design): a logistic regression on the fused [omics, slide] embedding
  (:func:`fit_fused_head`), fitted on the training split (training patients out-of-fold), its L2 strength
  picked on validation. On tcga13 with the hif2gene slide features it lost to omics alone on validation
  (AUC 0.769 vs 0.816 on the patients with both; stacked, out-of-fold: 0.810), which is why ``stacked`` is
  the default.

The LLM therefore learns to state a probability it could have computed without the label, and the number
stays comparable between training and test. The outcome words come from the truth, so training targets
never contradict the data; at test time the text is generated, never copied.
Patients censored before 5 years have no binary label and no target (they keep an evidence record).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from oncofm.config import StageSettings
from oncofm.errors import OncoFMError
from oncofm.fusion.evidence import EvidenceSettings, build_evidence
from oncofm.fusion.fuse import fused_matrix, load_embeddings
from oncofm.fusion.templates import render_target
from oncofm.io import atomic_path, write_json, write_parquet
from oncofm.logging_utils import track
from oncofm.paths import RunLayout

log = logging.getLogger(__name__)

__all__ = ["ReasoningSettings", "apply_stacked_head", "build_reasoning_dataset", "fit_fused_head",
           "fit_stacked_head", "read_dataset", "stack_matrix", "DATASET_FILE", "HEAD_FILE", "HEAD_MODEL_FILE"]

DATASET_FILE = "dataset.jsonl"
HEAD_FILE = "fused_head.parquet"
HEAD_MODEL_FILE = "fused_head.json"


class ReasoningSettings(StageSettings):
    stage: ClassVar[str] = "reasoning"

    run: str
    evidence: EvidenceSettings = Field(default_factory=EvidenceSettings,
                                       description="how each evidence record is built (saved with the fusion model)")
    slide_branch: Literal["auto", "mil", "features"] = Field(
        "auto", description="the slide modality: mil (attention MIL on patches, models/slide), features (the "
        "slide-feature model, models/slide_features), auto (the one the run has)")
    horizon_years: float = Field(5.0, gt=0)
    head: Literal["stacked", "embedding"] = Field("stacked", description="the fused head behind the targets' "
                                                  "risk: stacked (the models' logits, fitted on validation) | "
                                                  "embedding (the fused embedding, fitted on training)")
    head_folds: int = Field(5, ge=2, description="folds for the out-of-fold risk of training patients")
    head_c_grid: list[float] = Field([0.003, 0.01, 0.03, 0.1, 0.3, 1.0],
                                     description="inverse L2 strengths tried; the best validation AUC wins")
    seed: int = 0
    redo: bool = False


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    try:
        from oncofm.survival.metrics import auc_score
    except ImportError:  # pragma: no cover - metrics module is part of the package
        from sklearn.metrics import roc_auc_score

        return float(roc_auc_score(y, s)) if len(set(y)) == 2 else float("nan")
    return auc_score(y, s)


def fit_fused_head(x: np.ndarray, labels: np.ndarray, split: np.ndarray, *, folds: int = 5,
                   c_grid: list[float] | tuple[float, ...] = (0.01, 0.1, 1.0), seed: int = 0) -> tuple[np.ndarray, np.ndarray, float]:
    """Logistic regression on the fused embedding: returns ``(prob, is_oof, C)`` for every row.

    ``C`` is chosen by validation AUC (head fitted on labelled training rows). Labelled training rows get
    out-of-fold probabilities (stratified ``folds``-fold); every other row gets the full training fit.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    lab = ~np.isnan(labels)
    tr = lab & (split == "train")
    va = lab & (split == "val")
    if tr.sum() < 2 * folds or len(set(labels[tr])) < 2:
        raise OncoFMError(f"the fused head needs labelled training patients of both classes (have {tr.sum()}); "
                          "check cohort/splits.parquet and the 5-year labels")

    def model(c: float):  # noqa: ANN202
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))

    best_c, best_auc = c_grid[0], -1.0
    for c in c_grid:
        if va.sum() == 0:
            break
        m = model(c).fit(x[tr], labels[tr])
        auc = _auc(labels[va], m.predict_proba(x[va])[:, 1])
        if auc > best_auc:
            best_c, best_auc = c, auc
    full = model(best_c).fit(x[tr], labels[tr])
    prob = full.predict_proba(x)[:, 1]
    oof = np.zeros(len(x), dtype=bool)
    idx = np.flatnonzero(tr)
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fit_i, pred_i in skf.split(idx, labels[idx]):
        m = model(best_c).fit(x[idx[fit_i]], labels[idx[fit_i]])
        prob[idx[pred_i]] = m.predict_proba(x[idx[pred_i]])[:, 1]
        oof[idx[pred_i]] = True
    log.info("fused head: C=%g (validation AUC %.3f)", best_c, best_auc)
    return prob, oof, float(best_c)


STACK_FEATURES = ("logit_omics", "logit_slide", "has_omics", "has_slide")


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=float), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def stack_matrix(p_omics: np.ndarray, p_slide: np.ndarray) -> np.ndarray:
    """(N, 4) inputs of the stacked head from the two probabilities (NaN = the modality is missing)."""
    p_omics, p_slide = np.asarray(p_omics, dtype=float), np.asarray(p_slide, dtype=float)
    has_o, has_s = np.isfinite(p_omics), np.isfinite(p_slide)
    return np.stack([np.where(has_o, _logit(np.nan_to_num(p_omics, nan=0.5)), 0.0),
                     np.where(has_s, _logit(np.nan_to_num(p_slide, nan=0.5)), 0.0),
                     has_o.astype(float), has_s.astype(float)], axis=1)


def apply_stacked_head(head: dict, p_omics: np.ndarray, p_slide: np.ndarray) -> np.ndarray:
    """The saved stacked head (``fused_head.json``) applied to probabilities (NaN = missing modality)."""
    z = stack_matrix(p_omics, p_slide) @ np.asarray(head["coef"], dtype=float) + float(head["intercept"])
    return 1.0 / (1.0 + np.exp(-z))


def fit_stacked_head(p_omics: np.ndarray, p_slide: np.ndarray, labels: np.ndarray, split: np.ndarray, *,
                     folds: int = 5, c: float = 1.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict]:
    """The stacked head (module docstring): returns ``(prob, is_oof, head)`` for every row; ``head`` is the
    JSON form (``features``, ``coef``, ``intercept``, counts)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    x = stack_matrix(p_omics, p_slide)
    va = ~np.isnan(labels) & (split == "val")
    if va.sum() < 2 * folds or len(set(labels[va])) < 2:
        raise OncoFMError(f"the stacked head is fitted on the validation split and needs labelled validation "
                          f"patients of both classes (have {int(va.sum())}); re-split with a larger val_fraction "
                          "or use head=embedding")
    full = LogisticRegression(C=c, max_iter=2000).fit(x[va], labels[va])
    prob = full.predict_proba(x)[:, 1]
    oof = np.zeros(len(x), dtype=bool)
    idx = np.flatnonzero(va)
    for fit_i, pred_i in StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(idx, labels[idx]):
        m = LogisticRegression(C=c, max_iter=2000).fit(x[idx[fit_i]], labels[idx[fit_i]])
        prob[idx[pred_i]] = m.predict_proba(x[idx[pred_i]])[:, 1]
        oof[idx[pred_i]] = True
    head = {"kind": "stacked", "features": list(STACK_FEATURES), "coef": full.coef_[0].tolist(),
            "intercept": float(full.intercept_[0]), "C": c, "fitted_on": "val", "n_fit": int(va.sum()),
            "n_fit_with_slide": int((va & np.isfinite(np.asarray(p_slide, float))).sum())}
    log.info("stacked fused head (validation, n=%d): coef %s, intercept %.3f", va.sum(),
             ", ".join(f"{n} {v:+.3f}" for n, v in zip(STACK_FEATURES, head["coef"], strict=True)), head["intercept"])
    return prob, oof, head


def _load_optional(path: Path) -> pd.DataFrame | None:
    return pd.read_parquet(path) if path.exists() else None


def build_reasoning_dataset(settings: ReasoningSettings) -> dict[str, Path]:
    """Write ``reasoning/dataset.jsonl`` and ``reasoning/fused_head.parquet``; returns their paths."""
    from oncofm.cohort.importing import load_patients
    from oncofm.cohort.schema import five_year_labels
    from oncofm.cohort.splits import load_splits
    from oncofm.fusion.fuse import SLIDE_BRANCHES, resolve_slide_branch
    from oncofm.omics.predict import stored_omics_results
    from oncofm.pathology.feature_model import stored_feature_results
    from oncofm.pathology.predict import load_cell_model, stored_patch_summary, stored_slide_results

    layout = RunLayout(settings.run)
    out_dir = layout.reasoning_dir
    target, head_path = out_dir / DATASET_FILE, out_dir / HEAD_FILE
    settings_file = layout.settings_file(settings.stage)
    from oncofm.config import check_stage

    if check_stage(settings, settings_file, [target, head_path, out_dir / HEAD_MODEL_FILE], on_change="redo"):
        log.info("%s exists with the same settings; skipping (use --redo to rebuild)", target)
        return {"dataset": target, "fused_head": head_path}

    patients = load_patients(settings.run)
    splits = load_splits(settings.run).set_index("patient_id")["split"]
    patients = patients[patients["patient_id"].isin(splits.index)].reset_index(drop=True)
    ids = patients["patient_id"].astype(str).tolist()
    labels = five_year_labels(patients, settings.horizon_years).reindex(ids).to_numpy(dtype=float)
    split = splits.reindex(ids).astype(str).to_numpy()

    branch = resolve_slide_branch(settings.run, settings.slide_branch)
    omics_dir, slide_dir = layout.model_dir("omics"), layout.model_dir(SLIDE_BRANCHES[branch])
    if not (omics_dir / "embeddings.parquet").exists() and not (slide_dir / "embeddings.parquet").exists():
        raise OncoFMError(f"neither models/omics/embeddings.parquet nor {slide_dir.relative_to(layout.root)}/"
                          "embeddings.parquet exists; run `oncofm train omics --run RUN` (and/or `oncofm train "
                          "slide` / `oncofm train slide-features`) first")
    emb = load_embeddings(settings.run, ids, slide_branch=branch)
    # the predictors' results as their training stages stored them (the same code `explain` runs)
    omics_results = stored_omics_results(layout, patients, horizon_years=settings.horizon_years)
    slide_results = stored_slide_results(layout) if branch == "mil" else {}
    feature_results = stored_feature_results(layout) if branch == "features" else {}
    cell_model = load_cell_model(layout) if branch == "mil" else None  # cell findings of the attended patches
    head_kind = settings.head
    n_val = int((~np.isnan(labels) & (split == "val")).sum())
    if head_kind == "stacked" and (n_val < 2 * settings.head_folds
                                   or len(set(labels[~np.isnan(labels) & (split == "val")])) < 2):
        log.warning("the stacked fused head is fitted on validation, which has %d labelled patients (needs %d of "
                    "both outcomes): using the embedding head instead", n_val, 2 * settings.head_folds)
        head_kind = "embedding"
    if head_kind == "stacked":
        p_o = np.array([omics_results[p].prob if emb.has_omics[i] and p in omics_results else np.nan
                        for i, p in enumerate(ids)])
        slide_of = {p: r.prob for p, r in feature_results.items()} | {p: r[0].prob for p, r in slide_results.items()}
        p_s = np.array([slide_of.get(p, np.nan) if emb.has_slide[i] else np.nan for i, p in enumerate(ids)])
        prob, oof, head = fit_stacked_head(p_o, p_s, labels, split, folds=settings.head_folds, seed=settings.seed)
        c = head["C"]
    else:
        prob, oof, c = fit_fused_head(fused_matrix(emb), labels, split, folds=settings.head_folds,
                                      c_grid=settings.head_c_grid, seed=settings.seed)
        head = {"kind": "embedding", "C": c, "fitted_on": "train",
                "reason": None if settings.head == "embedding" else f"too few labelled validation patients ({n_val})"}
    head["slide_branch"] = branch
    write_parquet(pd.DataFrame({"patient_id": ids, "split": split, "label": labels, "prob": prob, "oof": oof}),
                  head_path)
    write_json(head, out_dir / HEAD_MODEL_FILE)

    records = []
    for i, pid in enumerate(track(ids, "evidence records")):
        row = patients.iloc[i]
        omics = omics_results.get(pid) if emb.has_omics[i] else None
        slide, patches = None, None
        if emb.has_slide[i] and pid in feature_results:
            slide = feature_results[pid]
        elif emb.has_slide[i] and pid in slide_results:
            slide, stem = slide_results[pid]
            ev_s = settings.evidence
            patches = stored_patch_summary(layout, stem, slide.attention, top_k=ev_s.top_patches,
                                           sample=ev_s.sample_patches, seed=ev_s.seed, cell_model=cell_model)
        ev = build_evidence(str(row["cancer_type"]), row.get("age"), omics, slide, patches, settings.evidence,
                            stage=row.get("stage"), grade=row.get("grade")).to_dict()
        lab = labels[i]
        text = None if np.isnan(lab) else render_target(ev, death=bool(lab == 1), risk=float(prob[i]),
                                                           seed=f"{settings.seed}:{pid}")
        records.append({"patient_id": pid, "split": split[i], "label": None if np.isnan(lab) else int(lab),
                        "risk": round(float(prob[i]), 2),
                        "risk_source": f"{head_kind}_head" + ("_oof" if oof[i] else ""), "evidence": ev,
                        "target": text})
    with atomic_path(target) as tmp, open(tmp, "w") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    settings.save(settings_file)
    n_t = sum(r["target"] is not None for r in records)
    log.info("wrote %d evidence records (%d with a target text; head C=%g; slide branch %s, %d patients with "
             "it) to %s", len(records), n_t, c, branch, int(emb.has_slide.sum()), target)
    return {"dataset": target, "fused_head": head_path}


def read_dataset(run: str | Path) -> list[dict]:
    """The records of ``reasoning/dataset.jsonl``."""
    layout = RunLayout(run)
    path = layout.require(layout.reasoning_dir / DATASET_FILE, "Run `oncofm reasoning --run RUN` first.")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
