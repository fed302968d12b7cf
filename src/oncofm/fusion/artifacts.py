"""Paths of the fusion model's artifacts (``RUN/models/fusion/``), in one place (docs/CONTRACTS.md)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from oncofm.paths import ModelArtifacts


@dataclass(frozen=True)
class FusionArtifacts(ModelArtifacts):
    """Every file the ``train fusion`` and ``evaluate-fusion`` stages write."""

    name = "fusion"

    weights = property(lambda self: self.dir / "projector.safetensors")  # missing-modality vectors + projector
    adapter = property(lambda self: self.dir / "adapter")  # peft LoRA
    config = property(lambda self: self.dir / "config.yaml")
    generations = property(lambda self: self.dir / "generations.jsonl")
    metrics = property(lambda self: self.dir / "metrics.json")
    fit_dir = property(lambda self: self.dir / "fit")  # the training loop's checkpoints and history

    def outputs(self) -> dict[str, Path]:
        """The training stage's return value (``weights`` as every model stage)."""
        return {"weights": self.weights, "adapter": self.adapter, "config": self.config}
