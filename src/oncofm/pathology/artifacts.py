"""Paths of the slide model's artifacts (``RUN/models/slide/``), in one place (docs/CONTRACTS.md)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from oncofm.paths import ModelArtifacts


@dataclass(frozen=True)
class SlideArtifacts(ModelArtifacts):
    """Every file the ``train slide`` stage writes."""

    name = "slide"

    weights = property(lambda self: self.dir / "model.safetensors")
    config = property(lambda self: self.dir / "config.yaml")
    metrics = property(lambda self: self.dir / "metrics.json")
    predictions = property(lambda self: self.dir / "predictions.parquet")
    embeddings = property(lambda self: self.dir / "embeddings.parquet")
    attention_dir = property(lambda self: self.dir / "attention")  # <slide_stem>.parquet: x, y, attention
    features_dir = property(lambda self: self.dir / "features")  # cached patch features per encoder
    training_dir = property(lambda self: self.dir / "training")

    def attention(self, stem: str) -> Path:
        return self.attention_dir / f"{stem}.parquet"

    def outputs(self) -> dict[str, Path]:
        """The stage's return value: the same keys as every model stage (``weights``, ``config``, ...)."""
        return {"weights": self.weights, "config": self.config, "metrics": self.metrics,
                "predictions": self.predictions, "embeddings": self.embeddings, "attention": self.attention_dir}
