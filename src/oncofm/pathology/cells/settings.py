"""Settings of the cell-model stage (``oncofm cells train``), saved as ``DIR/settings.yaml``."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, field_validator

from oncofm.config import StageSettings
from oncofm.pathology.cells.data import DATA_MPP
from oncofm.training import TrainSettings


class GbmSettings(StageSettings):
    """Design ``log-gbm``: LoG candidates + histogram gradient boosting."""

    stage: ClassVar[str] = "cells.gbm"
    candidate_threshold: float = Field(0.12, gt=0, description="LoG response a candidate nucleus must exceed")
    min_distance: int = Field(4, ge=1, description="px between candidate centres")
    label_radius_px: float = Field(8.0, gt=0, description="a candidate within this of a dot takes its class")
    max_iter: int = Field(400, ge=1)
    learning_rate: float = Field(0.08, gt=0)
    max_leaf_nodes: int = Field(31, ge=2)


def _unet_train() -> TrainSettings:
    return TrainSettings(epochs=20, batch_size=8, lr=3e-3, weight_decay=1e-4, patience=6, warmup_fraction=0.03,
                         monitor="val_macro_f1", mode="max", device="cpu")


class UNetSettings(StageSettings):
    """Design ``unet``: point-detection U-Net."""

    stage: ClassVar[str] = "cells.unet"
    base_channels: int = Field(16, ge=4)
    crop: int = Field(128, ge=32, description="training crop side (px), a multiple of 8")
    sigma: float = Field(2.0, gt=0, description="px: Gaussian of the heatmap target")
    class_radius_px: float = Field(4.0, gt=0, description="pixels this near a dot learn its class")
    min_distance: int = Field(3, ge=1, description="px between detected cell centres")
    stain_jitter: float = Field(0.1, ge=0, lt=1, description="optical-density scale jitter (augmentation)")
    hed_jitter: float = Field(0.0, ge=0, lt=1, description="hematoxylin / eosin / residual concentration "
                              "scale and shift jitter (HED augmentation, Tellez et al. 2018); 0: off")
    focus_fraction: float = Field(0.0, ge=0, le=1, description="share of training crops centred near a dot "
                                  "of a class drawn uniformly (class-balanced sampling); 0: uniform crops")
    ema_decay: float = Field(0.0, ge=0, lt=1, description="exponential moving average of the weights, "
                             "evaluated and kept instead of the raw weights (e.g. 0.998); 0: off")
    tta: int = Field(1, description="test-time transforms averaged at prediction: 1 (none), 2 (+ 180° "
                     "rotation), 4 (+ horizontal and vertical flips) or 8 (the dihedral group)")
    steps_per_epoch: int = Field(100, ge=1)
    init_seed: int | None = Field(None, description="seed of the weights and crops (none: the split's seed)")
    members: int = Field(2, ge=1, description="design unet-ensemble: U-Nets trained with init seeds "
                         "seed, seed + 1, ... whose maps are averaged")
    train: TrainSettings = Field(default_factory=_unet_train)

    @field_validator("tta")
    @classmethod
    def _tta(cls, v: int) -> int:
        if v not in (1, 2, 4, 8):
            raise ValueError(f"unet.tta must be 1, 2, 4 or 8 test-time transforms, got {v}")
        return v


class CellTrainSettings(StageSettings):
    """Train the cell-type models on BRCA-M2C, compare them on validation and keep the best."""

    stage: ClassVar[str] = "cells"
    data: str = Field(..., description="the BRCA-M2C folder (MANIFEST.csv, cells.csv.gz, images)")
    out: str = Field(..., description="model folder to write")
    designs: list[str] = Field(default_factory=lambda: ["log-gbm", "unet"],
                               description="designs to train and compare on validation")
    seed: int = 0
    val_fraction: float = Field(0.15, gt=0, lt=1, description="fraction of patients for validation")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="fraction of patients held out for the test")
    radius_um: float = Field(6.0, gt=0, description="µm: a prediction this near an annotated cell of its class "
                                                    "counts (6 µm = 12 px at 0.5 µm/px)")
    threads: int = Field(2, ge=1, description="torch threads")
    gbm: GbmSettings = Field(default_factory=GbmSettings)
    unet: UNetSettings = Field(default_factory=UNetSettings)
    redo: bool = False

    @property
    def radius_px(self) -> float:
        return self.radius_um / DATA_MPP
