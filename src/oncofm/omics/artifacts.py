"""Paths of the omics model's artifacts (``RUN/models/omics/``), in one place."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from oncofm.paths import ModelArtifacts


@dataclass(frozen=True)
class OmicsArtifacts(ModelArtifacts):
    """Every file the ``train omics`` stage writes (see docs/CONTRACTS.md)."""

    name = "omics"

    weights = property(lambda self: self.dir / "model.safetensors")
    config = property(lambda self: self.dir / "config.yaml")
    metrics = property(lambda self: self.dir / "metrics.json")
    predictions = property(lambda self: self.dir / "predictions.parquet")
    embeddings = property(lambda self: self.dir / "embeddings.parquet")
    attributions = property(lambda self: self.dir / "attributions.parquet")
    #: a model with further layers / covariates: ``patient_id, layer, feature, value, attribution`` (the
    #: covariates as layer ``covariate``: value = level, attribution = occlusion effect)
    layer_attributions = property(lambda self: self.dir / "layer_attributions.parquet")
    roc_png = property(lambda self: self.dir / "roc.png")
    calibration_png = property(lambda self: self.dir / "calibration.png")
    training_dir = property(lambda self: self.dir / "training")  # checkpoints + history.jsonl
    external_dir = property(lambda self: self.dir / "external")  # `oncofm evaluate` results per cohort

    def outputs(self) -> dict[str, Path]:
        """The stage's return value: the same keys as every model stage (``weights``, ``config``, ...)."""
        return {"weights": self.weights, "config": self.config, "metrics": self.metrics,
                "predictions": self.predictions, "embeddings": self.embeddings, "attributions": self.attributions,
                "roc": self.roc_png, "calibration": self.calibration_png}
