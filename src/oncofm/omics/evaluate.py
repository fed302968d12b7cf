"""``oncofm evaluate --run RUN --cohort OTHER_RUN``: apply a trained omics model, unchanged, to another cohort.

The other cohort (any imported run: other cancer types, another platform) is normalised with its *own*
training-split statistics when it has them (``cohort split`` was run: a per-cohort z-score absorbs platform
differences) or else with the model run's statistics (``--normalization model``) — but only when the cohort's
values are in the model's training units (:func:`oncofm.cohort.units.check_units`): a cohort on another scale
(log2 RSEM, counts) is, with ``auto``, z-scored with statistics fitted on all its own patients (counts after
log2(x+1); no labels are used) and ``metrics.json`` ``normalization`` says so; ``model`` refuses it with the
units message. Genes the model needs but
the cohort lacks are reported (coverage %) and filled with 0 — neutral, the training median; coverage below
``min_coverage`` stops with an error. Cancer types unseen in training use the pan-cancer coefficients and
the model's "unknown cancer type" embedding. Every patient of the other cohort is evaluated; the IPCW
censoring distribution of td-AUC / Brier is estimated on that cohort itself.

Writes ``RUN/models/omics/external/<cohort name>/{metrics.json, predictions.parquet}``.

**Every model, unchanged.** When the model run also has a slide-feature model (``models/slide_features``) and
the other cohort has imported slide features (``cohort/slide_features.parquet``, the same feature set: checked),
the slide-feature model predicts them, and the run's saved stacked fused head (``reasoning/fused_head.json``)
combines the two probabilities exactly as for the run's own patients. ``modalities.json`` / ``.md`` beside the
omics metrics compare omics, slide and fused head on the other cohort (:mod:`oncofm.fusion.compare`: with both
modalities, without the slide, all; paired bootstrap differences).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from oncofm.config import StageSettings
from oncofm.errors import OncoFMError

log = logging.getLogger(__name__)


class OmicsEvaluateSettings(StageSettings):
    """Settings of ``oncofm evaluate``."""

    stage: ClassVar[str] = "evaluate_omics"

    run: str = Field(description="run with a trained omics model")
    cohort: str = Field(description="another imported run to evaluate on")
    min_coverage: float = Field(0.7, ge=0, le=1, description="smallest share of the model's genes required")
    normalization: Literal["auto", "cohort", "model"] = Field(
        "auto", description="auto: the cohort's own split statistics when present, else the model run's "
        "(or, for a cohort on another scale, statistics fitted on all its patients); model: refused on another scale")
    n_boot: int = Field(1000, ge=0)
    seed: int = 0


def evaluate_cohort(settings: OmicsEvaluateSettings) -> dict[str, Path]:
    """Predict every patient of ``settings.cohort`` with the model of ``settings.run``; write metrics."""
    import torch

    from oncofm.cohort.importing import load_matrix, load_patients
    from oncofm.cohort.normalize import apply_normalizer, fit_normalizer
    from oncofm.cohort.units import check_units
    from oncofm.explain.inputs import unseen_cancer_type_note
    from oncofm.io import write_json, write_parquet
    from oncofm.omics.artifacts import OmicsArtifacts
    from oncofm.omics.data import UNKNOWN
    from oncofm.omics.predict import OmicsPredictor
    from oncofm.omics.train import MODEL_LABEL, _metrics_dict, comparison_rows, print_comparison
    from oncofm.paths import RunLayout
    from oncofm.survival.metrics import evaluate_predictions

    predictor = OmicsPredictor.load(settings.run)
    other = RunLayout(settings.cohort)
    other.require(other.expression, "Import it with `oncofm cohort import --run OTHER_RUN ...` first.")
    expr = load_matrix(settings.cohort, "expression")
    patients = load_patients(settings.cohort).set_index("patient_id")
    coverage, missing = predictor.gene_coverage(expr)
    log.info("gene coverage: %.1f%% of the model's %d genes (%d missing%s)", 100 * coverage, len(predictor.genes),
             len(missing), f": {', '.join(missing[:10])}" if missing else "")
    if coverage < settings.min_coverage:
        raise OncoFMError(
            f"the cohort {settings.cohort} has {100 * coverage:.1f}% of the model's {len(predictor.genes)} genes "
            f"(missing e.g. {', '.join(missing[:8])}), below --min-coverage {settings.min_coverage:.0%}; "
            "check that its gene symbols are HGNC symbols, or lower --min-coverage knowingly")
    use_cohort = settings.normalization == "cohort" or (settings.normalization == "auto" and other.normalization.exists())
    cols = [g for g in predictor.genes if g in expr.columns]
    units = None
    how = "cohort (its own training-split statistics)" if use_cohort else "model (the model run's statistics)"
    if use_cohort:
        other.require(other.normalization, "Run `oncofm cohort split --run OTHER_RUN` first (or --normalization model).")
        expr_n = apply_normalizer(expr[cols], patients["cancer_type"], pd.read_parquet(other.normalization))
    else:
        expr_n = expr  # make_table normalises with the model run's statistics
        units = check_units(expr, predictor.normalization, patients["cancer_type"], what=f"the cohort {settings.cohort}")
        if not units.ok and settings.normalization == "model":
            raise OncoFMError(f"{units.message} With --normalization auto the cohort is normalised with its own "
                              "statistics instead.")
        if not units.ok:  # an outside cohort on another scale: z-score it with its own statistics (no labels used)
            values = expr[cols].astype(float)
            how = "cohort (own statistics of all its patients: values are on another scale than the model's"
            if units.units == "counts":
                values = np.log2(values.clip(lower=0) + 1)
                how += "; counts, log2(x+1) first"
            how += ")"
            own = fit_normalizer(values, patients.reset_index(), values.index)
            expr_n = apply_normalizer(values, patients["cancer_type"], own)
            use_cohort = True
            log.warning("%s Normalising it with its own statistics (all its %d patients, no labels).",
                        units.message, len(values))
    log.info("normalisation: %s", how)
    table = predictor.make_table(expr_n, patients, normalized=use_cohort)
    unseen = sorted(set(table.cancer_type) - set(predictor.encoder.cancer_types))
    trained = [c for c in predictor.encoder.cancer_types if c != UNKNOWN]
    for cancer in unseen:  # the policy of explain and the web app: pan-cancer fallback, with this warning
        log.warning("%s", unseen_cancer_type_note(cancer, trained))
    torch.manual_seed(settings.seed)
    out = predictor.predict_table(table, attributions=False)
    logits, prob = out.logits, out.probs
    metrics_table = evaluate_predictions(time=table.time, event=table.event, prob=prob, risk=logits,
                                         cancer_type=table.cancer_type, train_time=table.time, train_event=table.event,
                                         years=predictor.horizon_years, n_boot=settings.n_boot, seed=settings.seed)
    result = _metrics_dict(metrics_table)
    name = Path(settings.cohort).resolve().name
    out_dir = OmicsArtifacts.of(settings.run).external_dir / name
    write_parquet(pd.DataFrame({"patient_id": table.patient_ids, "cancer_type": table.cancer_type, "prob": prob,
                                "risk": logits}), out_dir / "predictions.parquet")
    write_json({"cohort": str(Path(settings.cohort).resolve()), "gene_coverage": coverage, "missing_genes": missing,
                "unseen_cancer_types": unseen, "normalization": how,
                "units": None if units is None else units.as_dict(),
                "n_patients": int(len(table)), "metrics": result}, out_dir / "metrics.json")
    print_comparison(comparison_rows({MODEL_LABEL: result}), result["per_cancer_type"],
                     f"omics model of {settings.run} on {name} (gene coverage {100 * coverage:.1f}%)")
    settings.save(out_dir / "settings.yaml")
    paths = {"metrics": out_dir / "metrics.json", "predictions": out_dir / "predictions.parquet"}
    paths.update(_other_models(settings, table.patient_ids, prob, patients, out_dir))
    return paths


def _other_models(settings: OmicsEvaluateSettings, ids: list[str], p_omics: np.ndarray, patients: pd.DataFrame,
                  out_dir: Path) -> dict[str, Path]:
    """The slide-feature model and the stacked fused head of ``settings.run`` on the other cohort (when both
    exist there); the side-by-side comparison. Returns the written paths."""
    import json

    from oncofm.cohort.schema import Col, five_year_labels
    from oncofm.cohort.slide_features import load_slide_features
    from oncofm.fusion.compare import format_comparison, group_comparison
    from oncofm.fusion.reasoning import HEAD_MODEL_FILE, apply_stacked_head
    from oncofm.io import write_json, write_parquet, write_text
    from oncofm.pathology.feature_model import SlideFeaturePredictor
    from oncofm.paths import RunLayout

    model_run, other = RunLayout(settings.run), RunLayout(settings.cohort)
    predictor = SlideFeaturePredictor.from_run(model_run)
    if predictor is None:
        return {}
    if not other.slide_features.exists():
        log.info("the cohort has no slide features (cohort/slide_features.parquet): only the omics model is applied")
        return {}
    feats = load_slide_features(settings.cohort, expected=predictor.feature_names)  # the model's feature set
    feats = feats[feats.index.isin(ids)]
    results = predictor.predict_table(feats.drop(columns="n_slides"), patients["cancer_type"].astype(str), top=5)
    p_slide = pd.Series([r.prob for r in results], index=feats.index).reindex(ids).to_numpy(float)
    frame = pd.DataFrame({"cancer_type": patients.reindex(ids)["cancer_type"].astype(str).to_numpy(),
                          "time": patients.reindex(ids)[Col.OS_DAYS].to_numpy(float),
                          "event": patients.reindex(ids)[Col.OS_EVENT].to_numpy(int),
                          "omics": p_omics, "slide": p_slide, "parsed text": np.nan}, index=ids)
    frame["label"] = five_year_labels(patients.reset_index()).reindex(ids).to_numpy()
    head_path = model_run.reasoning_dir / HEAD_MODEL_FILE
    head = json.loads(head_path.read_text()) if head_path.exists() else None
    if head is not None and head.get("kind") == "stacked":
        frame["fused head"] = apply_stacked_head(head, p_omics, p_slide)
    else:
        log.warning("the model run has no stacked fused head (%s): the fused head is not applied", head_path)
        frame["fused head"] = np.nan
    out: dict = {"split": f"all patients of {Path(settings.cohort).resolve().name}", "groups": {}}
    both, without = frame[frame["slide"].notna()], frame[frame["slide"].isna()]
    if len(both):
        out["groups"]["both modalities"] = group_comparison(both, settings.n_boot, settings.seed)
        out["per_type"] = {ct: group_comparison(g, settings.n_boot, settings.seed) for ct, g in both.groupby("cancer_type")
                           if len(g) >= 10 and g["label"].nunique() == 2}
    if len(without):
        out["groups"]["without slide"] = group_comparison(without.assign(slide=np.nan), settings.n_boot, settings.seed)
    out["groups"]["all"] = group_comparison(frame.assign(slide=np.nan), settings.n_boot, settings.seed)
    text = format_comparison(out)
    print(text)
    write_parquet(frame.reset_index(names="patient_id"), out_dir / "modalities_predictions.parquet")
    write_json(out, out_dir / "modalities.json")
    write_text(text + "\n", out_dir / "modalities.md")
    return {"modalities": out_dir / "modalities.md"}

