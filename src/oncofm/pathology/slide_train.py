"""``oncofm train slide``: train the slide model of a run from slide-level 5-year labels.

Inputs (docs/CONTRACTS.md): ``cohort/slides.parquet`` (patient_id, slide_id), ``cohort/patients.parquet``
(the 5-year label), ``cohort/splits.parquet`` and ``tiles/<slide_stem>.h5`` from ``oncofm tile``.

Writes ``models/slide/``: ``model.safetensors``, ``config.yaml``, ``metrics.json`` (slide AUC with a
bootstrap 95 % CI per split, and the counts it rests on), ``predictions.parquet``, ``embeddings.parquet``
(per patient: the mean of the patient's slide embeddings before the head), ``attention/<slide>.parquet``
(x, y, attention; sums to 1), ``features/`` (the cached patch features), ``training/`` (history, best
weights). Slides of censored-before-5-years patients have no label: they are not trained on and not in the
AUC, but get predictions, embeddings and attention.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from oncofm.config import StageSettings
from oncofm.errors import OncoFMError
from oncofm.training import TrainSettings

log = logging.getLogger(__name__)

__all__ = ["SLIDE_PRESETS", "SlideTrainSettings", "load_slide_model", "train_slide_model"]

#: Below this many labelled test slides per class an AUC says little; metrics.json says so.
MIN_PER_CLASS = 10


def _default_train() -> TrainSettings:
    return TrainSettings(epochs=40, batch_size=4, lr=5e-4, weight_decay=1e-2, patience=10)


#: Named starting points for :meth:`SlideTrainSettings.preset` (``oncofm train slide --preset NAME``).
#: ``benchmark``: the recipe behind the slide-model numbers in README.md and docs/slide_model.md, exactly as
#: ``bench/slide_mil.py`` trains it (which builds its models from this preset): frozen EfficientNet-Lite0
#: (ImageNet weights) at 224 px with multiscale features (stages 4-7 averaged and concatenated, 704-d),
#: z-scored with the training patches' mean/std, gated attention with hidden 32 and dropout 0.25, every patch
#: of a bag per step with 40 % instance dropout, the instance-level loss (weight 1, the top-1 patch of a
#: positive slide), AdamW lr 1e-3, weight decay 0.05, batch 8, at most 30 epochs, early stopping on the
#: validation AUC with patience 8.
SLIDE_PRESETS: dict[str, dict[str, Any]] = {
    "benchmark": {
        "encoder": "efficientnet-lite0",
        "encoder_options": {"input_size": 224, "layers": "multiscale"},
        "standardize_features": True,
        "aggregator": "gated-attention",
        "hidden": 32,
        "dropout": 0.25,
        "max_patches": 0,
        "instance_drop": 0.4,
        "instance_weight": 1.0,
        "instance_k": 1,
        "train": {"epochs": 30, "batch_size": 8, "lr": 1e-3, "weight_decay": 5e-2, "patience": 8,
                  "monitor": "val_auc", "mode": "max"},
    },
}


class SlideTrainSettings(StageSettings):
    """Settings of ``oncofm train slide``; :meth:`preset` gives named recipes (``preset("benchmark")``: the one
    behind the README's slide numbers, see :data:`SLIDE_PRESETS`)."""

    stage: ClassVar[str] = "slide_model"

    run: str = Field(..., description="run directory")
    encoder: str = Field("swin-cpu", description="patch encoder (oncofm.pathology.encoders registry)")
    encoder_weights: str | None = Field(None, description="local pretrained weights for the encoder")
    encoder_options: dict[str, Any] = Field(default_factory=dict, description="extra encoder arguments, e.g. "
                                            "{image_size: 64, window_size: 4} for a Swin on small patches")
    aggregator: str = Field("gated-attention", description="gated-attention | mean")
    mode: Literal["features", "end-to-end"] = Field(
        "features", description="features: frozen encoder, features cached once; end-to-end: train the "
                                "encoder too on bags of --bag-size sampled patches")
    bag_size: int = Field(16, ge=1, description="patches sampled per slide per step (end-to-end)")
    max_patches: int = Field(512, ge=0, description="patches sampled per slide per step (features mode); "
                             "0: every patch")
    instance_drop: float = Field(0.0, ge=0, lt=1, description="instance dropout (features mode): share of a "
                                 "bag's patches dropped at random per training step, e.g. 0.4")
    instance_weight: float = Field(0.0, ge=0, description="weight of the instance-level pseudo-label loss (all "
                                   "patches of negative slides negative, top patches of positive slides positive)")
    instance_k: int = Field(2, ge=1, description="top-scoring patches of a positive slide pseudo-labelled "
                            "positive by the instance-level loss")
    standardize_features: bool = Field(False, description="z-score each patch feature with the mean/std of the "
                                       "training split's patches (features mode); the statistics are saved "
                                       "in model.safetensors and applied by the model to every slide")
    hidden: int = Field(128, ge=4)
    dropout: float = Field(0.25, ge=0, lt=1)
    feature_batch: int = Field(64, ge=1)
    slide_mpp: float | None = Field(None, gt=0, description="level-0 µm/px for slides without metadata")
    years: float = Field(5.0, gt=0)
    redo: bool = False
    train: TrainSettings = Field(default_factory=_default_train)

    @model_validator(mode="after")
    def _standardize_needs_features(self) -> SlideTrainSettings:
        if self.standardize_features and self.mode != "features":
            raise ValueError("standardize_features needs mode 'features' (statistics of frozen-encoder features)")
        return self

    @classmethod
    def preset(cls, name: str, **values: Any) -> SlideTrainSettings:
        """The settings of preset ``name`` (:data:`SLIDE_PRESETS`) with ``values`` on top (``None`` values are
        ignored; ``train`` is merged field by field: a dict or the set fields of a TrainSettings)."""
        if name not in SLIDE_PRESETS:
            raise OncoFMError(f"unknown slide-model preset {name!r}; choose one of {', '.join(SLIDE_PRESETS)}")
        merged = {**SLIDE_PRESETS[name], **{k: v for k, v in values.items() if v is not None}}
        train = values.get("train")
        if isinstance(train, TrainSettings):
            train = train.model_dump(exclude_unset=True)
        merged["train"] = TrainSettings.build(**{**SLIDE_PRESETS[name].get("train", {}), **(train or {})})
        return cls.build(**merged)


def _slide_table(settings: SlideTrainSettings) -> pd.DataFrame:
    """slides.parquet joined with split, label and tiles path; slides without tiles dropped (logged)."""
    from oncofm.cohort.schema import five_year_labels
    from oncofm.pathology.reader import slide_stem
    from oncofm.paths import RunLayout

    layout = RunLayout(settings.run)
    slides = pd.read_parquet(layout.require(layout.slides_table, "Import a cohort with slides (`oncofm cohort "
                                                                "import`) or write cohort/slides.parquet."))
    missing_cols = {"patient_id", "slide_id"} - set(slides.columns)
    if missing_cols:
        raise OncoFMError(f"{layout.slides_table} lacks columns {sorted(missing_cols)}")
    patients = pd.read_parquet(layout.require(layout.patients, "Run `oncofm cohort import` first."))
    splits = pd.read_parquet(layout.require(layout.splits, "Run `oncofm cohort split` first."))
    labels = five_year_labels(patients, settings.years)
    table = slides[["patient_id", "slide_id"]].copy()
    table["stem"] = [slide_stem(s) for s in table["slide_id"].astype(str)]
    table["tiles"] = [layout.tiles_dir / f"{s}.h5" for s in table["stem"]]
    table["split"] = table["patient_id"].map(splits.set_index("patient_id")["split"])
    table["label"] = table["patient_id"].map(labels)
    has_tiles = table["tiles"].map(Path.exists)
    if not has_tiles.any():
        raise OncoFMError(f"none of the {len(table)} slides in {layout.slides_table} has tiles in "
                          f"{layout.tiles_dir}; run `oncofm tile SLIDES --out {layout.tiles_dir}` first")
    if (~has_tiles).any():
        log.warning("%d of %d slides have no tiles (failed or not tiled) and are left out: %s",
                    int((~has_tiles).sum()), len(table), ", ".join(table.loc[~has_tiles, "stem"].head(5)))
    return table[has_tiles].reset_index(drop=True)


def _build_model(settings: SlideTrainSettings, with_encoder: bool, in_dim: int | None = None
                 ) -> tuple[Any, Any]:
    """``(SlideClassifier, encoder)`` of ``settings`` (the model holds the encoder only ``with_encoder``).

    ``in_dim``: build the aggregator for features of this width and no encoder at all (``encoder`` is None;
    for callers that bring their own features, e.g. bench/slide_mil.py). With ``standardize_features`` the
    model carries identity statistics until ``set_feature_stats`` (or ``load_state_dict``) sets them.
    """
    from oncofm.pathology.encoders import create_encoder
    from oncofm.pathology.mil import create_aggregator
    from oncofm.pathology.slide_model import SlideClassifier

    encoder = None
    if in_dim is None or with_encoder:
        kw = dict(settings.encoder_options)
        if settings.encoder_weights:
            kw["weights"] = settings.encoder_weights
        encoder = create_encoder(settings.encoder, **kw)
    dim = int(in_dim) if in_dim is not None else encoder.dim
    aggregator = create_aggregator(settings.aggregator, dim, hidden=settings.hidden, dropout=settings.dropout)
    model = SlideClassifier(aggregator, encoder if with_encoder else None,
                            feature_dim=dim if settings.standardize_features else None)
    return model, encoder


def _auc_block(y: np.ndarray, prob: np.ndarray, seed: int) -> dict[str, Any]:
    from oncofm.survival.metrics import bootstrap_auc

    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    auc, lo, hi = bootstrap_auc(y, prob, n_boot=2000, seed=seed) if len(y) else (float("nan"),) * 3
    block: dict[str, Any] = {"n_slides": int(len(y)), "n_positive": n_pos, "n_negative": n_neg, "auc": auc,
                             "auc_ci95": [lo, hi]}
    if min(n_pos, n_neg) < MIN_PER_CLASS:
        block["note"] = (f"only {n_pos} slides of patients who died within 5 years and {n_neg} who lived "
                         f"beyond: too few to measure outcome prediction (need ≥{MIN_PER_CLASS} per class); "
                         "see bench/slide_mil.py for what this model measurably learns")
    return block


def train_slide_model(settings: SlideTrainSettings, progress: bool = True) -> dict[str, Path]:
    """Train (or reuse) the slide model of ``settings.run``; returns the written paths."""
    import torch
    from safetensors.torch import save_file

    from oncofm.io import write_json, write_parquet
    from oncofm.pathology.artifacts import SlideArtifacts
    from oncofm.pathology.slide_model import (
        FeatureBagDataset,
        PatchBagDataset,
        SlideTask,
        collate_bags,
        extract_features,
        feature_stats,
        load_patch_features,
        predict_slides,
    )
    from oncofm.paths import RunLayout
    from oncofm.training import fit

    layout = RunLayout(settings.run)
    arts = SlideArtifacts.of(settings.run)
    out, paths = arts.dir, arts.outputs()
    from oncofm.config import check_stage

    if check_stage(settings, paths["config"], [paths["metrics"]], on_change="redo", what=f"the slide model in {out}"):
        log.info("slide model in %s is up to date (use --redo to retrain)", out)
        return paths
    # fit() resumes from training/checkpoint: only a checkpoint of these very settings (an interrupted run)
    stamp = out / "training" / "settings.yaml"
    if (out / "training").exists() and (settings.redo or not settings.same_as_saved(stamp, ("redo",))):
        import shutil

        shutil.rmtree(out / "training")
    table = _slide_table(settings)
    labelled = table[table["label"].notna()]
    train_rows = labelled[labelled["split"] == "train"]
    if train_rows["label"].nunique() < 2:
        raise OncoFMError(f"the training split has {len(train_rows)} labelled slides with "
                          f"{train_rows['label'].nunique()} class(es); the slide model needs slides of both "
                          "5-year outcomes in the training split (add slides or patients)")
    train_settings = settings.train.model_copy(update={"progress": progress and settings.train.progress})
    val_rows = labelled[labelled["split"] == "val"]
    if val_rows["label"].nunique() < 1 or len(val_rows) == 0:
        log.warning("no labelled validation slides: epochs are selected on the training loss")
        train_settings = train_settings.model_copy(update={"monitor": "train_loss", "mode": "min"})
    elif train_settings.monitor == "val_auc" and val_rows["label"].nunique() < 2:
        log.warning("the labelled validation slides are all of one class (no AUC): epochs are selected on the "
                    "validation loss")
        train_settings = train_settings.model_copy(update={"monitor": "val_loss", "mode": "min"})
    settings.save(stamp)
    torch.manual_seed(settings.train.seed)
    model, encoder = _build_model(settings, with_encoder=settings.mode == "end-to-end")
    feat_dir = out / "features" / settings.encoder

    if settings.mode == "end-to-end":
        train_ds = PatchBagDataset(train_rows["tiles"].tolist(), train_rows["label"].tolist(), settings.bag_size,
                                   settings.slide_mpp)
        val_ds = (PatchBagDataset(val_rows["tiles"].tolist(), val_rows["label"].tolist(), settings.bag_size,
                                  settings.slide_mpp) if len(val_rows) else None)
        fit(model, train_ds, val_ds, SlideTask(instance_weight=settings.instance_weight,
                                               instance_k=settings.instance_k),
            train_settings, out / "training", collate_fn=collate_bags)
        encoder = model.encoder
        feat_dir = out / "features" / f"{settings.encoder}-finetuned"
    from oncofm.logging_utils import track

    feats = {}
    for row in track(list(table.itertuples()), "encoding slides", enabled=progress):
        h5 = extract_features(encoder, row.tiles, feat_dir / f"{row.stem}.h5", batch_size=settings.feature_batch,
                              slide_mpp=settings.slide_mpp, encoder_name=str(feat_dir.name),
                              redo=settings.redo or settings.mode == "end-to-end")
        feats[row.stem] = load_patch_features(h5)

    if settings.standardize_features:  # statistics of the training split's patches; saved with the model
        model.set_feature_stats(*feature_stats([feats[s][0] for s in table.loc[table["split"] == "train", "stem"]]))

    def bags(rows: pd.DataFrame, sample: int | None, drop: float = 0.0) -> FeatureBagDataset:
        return FeatureBagDataset([feats[s][0] for s in rows["stem"]], rows["label"].fillna(0).tolist(), sample,
                                 drop=drop)

    if settings.mode == "features":
        fit(model, bags(train_rows, settings.max_patches or None, settings.instance_drop),
            bags(val_rows, None) if len(val_rows) else None,
            SlideTask(instance_weight=settings.instance_weight, instance_k=settings.instance_k),
            train_settings, out / "training", collate_fn=collate_bags)
    model.encoder = encoder  # saved with the model, so heatmaps and new slides use the same features
    # the exports go through the predictor `explain` uses: aggregator + head over every patch's features
    preds = predict_slides(model, [feats[s][0] for s in table["stem"]])

    table["prob"] = [p.prob for p in preds]
    write_parquet(table[["patient_id", "slide_id", "split", "prob"]], paths["predictions"], index=False)
    emb = pd.DataFrame(np.stack([p.embedding for p in preds]), index=table["patient_id"])
    emb = emb.groupby(level=0).mean()
    emb.columns = [f"e{i}" for i in range(emb.shape[1])]
    emb.index.name = "patient_id"
    write_parquet(emb.astype(np.float32), paths["embeddings"])
    for row, p in zip(table.itertuples(), preds, strict=True):
        coords = feats[row.stem][1]
        write_parquet(pd.DataFrame({"x": coords[:, 0], "y": coords[:, 1], "attention": p.attention}),
                      paths["attention"] / f"{row.stem}.parquet", index=False)
    metrics: dict[str, Any] = {"encoder": settings.encoder, "aggregator": settings.aggregator,
                               "mode": settings.mode, "n_slides": int(len(table)),
                               "n_unlabelled_slides": int(table["label"].isna().sum())}
    for split in ("train", "val", "test"):
        rows = table[(table["split"] == split) & table["label"].notna()]
        metrics[split] = _auc_block(rows["label"].to_numpy(float), rows["prob"].to_numpy(float),
                                    settings.train.seed)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(paths["weights"]))
    write_json(metrics, paths["metrics"])
    settings.save(paths["config"])
    settings.save(layout.settings_file(settings.stage))
    log.info("slide model: test AUC %s (%d labelled test slides)", metrics["test"]["auc"],
             metrics["test"]["n_slides"])
    return paths


def load_slide_model(run: str | Path) -> tuple[Any, SlideTrainSettings]:
    """The trained slide model of ``run`` (with its encoder) and its settings."""
    from safetensors.torch import load_file

    from oncofm.paths import RunLayout

    out = RunLayout(run).model_dir("slide")
    cfg = RunLayout(run).require(out / "config.yaml", "Run `oncofm train slide --run RUN` first.")
    settings = SlideTrainSettings.from_yaml(cfg)
    model, encoder = _build_model(settings, with_encoder=True)
    state = load_file(str(out / "model.safetensors"))
    model.load_state_dict(state)
    return model.eval(), settings
