"""Paths of the omics model's artifacts (``RUN/models/omics/``), in one place."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from oncofm.paths import RunLayout

MODEL_NAME = "omics"


@dataclass(frozen=True)
class OmicsArtifacts:
    """Every file the ``train omics`` stage writes (see docs/CONTRACTS.md)."""

    dir: Path

    @classmethod
    def of(cls, run: str | Path) -> OmicsArtifacts:
        return cls(RunLayout(run).model_dir(MODEL_NAME))

    weights = property(lambda self: self.dir / "model.safetensors")
    config = property(lambda self: self.dir / "config.yaml")
    metrics = property(lambda self: self.dir / "metrics.json")
    predictions = property(lambda self: self.dir / "predictions.parquet")
    embeddings = property(lambda self: self.dir / "embeddings.parquet")
    attributions = property(lambda self: self.dir / "attributions.parquet")
    roc_png = property(lambda self: self.dir / "roc.png")
    calibration_png = property(lambda self: self.dir / "calibration.png")
    training_dir = property(lambda self: self.dir / "training")  # checkpoints + history.jsonl
    external_dir = property(lambda self: self.dir / "external")  # `oncofm evaluate` results per cohort
