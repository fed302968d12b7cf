"""Patient-level train/validation/test splits (and k folds), stratified by cancer type and label status.

Fixed and saved before anything is fitted: ``splits.parquet`` has ``patient_id``, ``split`` and, when
folds are asked for, ``fold`` (0..k-1, assigned within the non-test patients). Strata are
cancer type × 5-year label status (1 / 0 / censored before 5 years), so every split keeps each cancer
type's mix of outcomes. The same seed gives the same split.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from oncofm.cohort.schema import FOLD_COL, SPLIT_COL, Col, five_year_labels
from oncofm.config import StageSettings
from oncofm.errors import OncoFMError
from oncofm.io import write_parquet
from oncofm.paths import RunLayout

log = logging.getLogger(__name__)


class SplitSettings(StageSettings):
    """Settings of ``oncofm cohort split``."""

    stage: ClassVar[str] = "cohort_split"

    run: str
    val_fraction: float = Field(0.15, gt=0, lt=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    folds: int = Field(0, ge=0, description="k folds over the non-test patients (0 = none)")
    seed: int = 0
    horizon_years: float = Field(5.0, gt=0)
    clip: float = Field(5.0, gt=0, description="expression z-scores are clipped to ±clip")
    redo: bool = False

    @model_validator(mode="after")
    def _fractions(self) -> SplitSettings:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError(f"val_fraction + test_fraction must leave a training split "
                             f"({self.val_fraction=} + {self.test_fraction=} >= 0.9)")
        if self.folds == 1:
            raise ValueError("folds must be 0 (none) or at least 2")
        return self


def _strata(patients: pd.DataFrame, years: float) -> pd.Series:
    label = five_year_labels(patients, years)
    status = label.map({1.0: "event", 0.0: "alive"}).fillna("censored")
    return patients[Col.CANCER].astype(str).to_numpy() + "|" + status.to_numpy()


def make_splits(patients: pd.DataFrame, settings: SplitSettings) -> pd.DataFrame:
    """Assign every patient to train/val/test (and a fold) deterministically from ``settings.seed``."""
    rng = np.random.default_rng(settings.seed)
    strata = pd.Series(_strata(patients, settings.horizon_years), index=patients[Col.PATIENT].to_numpy())
    split = pd.Series("train", index=strata.index, dtype=object)
    fold = pd.Series(-1, index=strata.index, dtype=int)
    # carry fractional remainders across strata so small strata do not all round the same way
    carry_test = carry_val = 0.0
    for key in sorted(strata.unique()):
        ids = strata.index[strata.to_numpy() == key].to_numpy()
        ids = ids[rng.permutation(len(ids))]
        want_test = len(ids) * settings.test_fraction + carry_test
        want_val = len(ids) * settings.val_fraction + carry_val
        n_test, n_val = int(round(want_test)), int(round(want_val))
        n_test = min(n_test, len(ids))
        n_val = min(n_val, len(ids) - n_test)
        carry_test, carry_val = want_test - n_test, want_val - n_val
        split[ids[:n_test]] = "test"
        split[ids[n_test:n_test + n_val]] = "val"
        if settings.folds:
            rest = ids[n_test:]
            offset = rng.integers(settings.folds)
            fold[rest] = (np.arange(len(rest)) + offset) % settings.folds
    out = pd.DataFrame({Col.PATIENT: strata.index, SPLIT_COL: split.to_numpy()})
    if settings.folds:
        out[FOLD_COL] = fold.to_numpy()
    return out


def split_cohort(settings: SplitSettings) -> dict[str, Path]:
    """Write ``splits.parquet`` and the training-split normalisation statistics."""
    from oncofm.cohort.importing import load_matrix, load_patients
    from oncofm.cohort.normalize import fit_normalizer

    layout = RunLayout(settings.run)
    sp = layout.settings_file(settings.stage)
    if (not settings.redo and layout.splits.exists() and layout.normalization.exists()
            and settings.same_as_saved(sp, ignore=("redo",))):
        log.info("splits exist with the same settings; skipping")
        return {"splits": layout.splits, "normalization": layout.normalization}
    if layout.splits.exists() and not settings.redo:
        raise OncoFMError(f"{layout.splits} exists with different settings; pass --redo to replace it "
                          "(every stage fitted on the old split must then be rerun)")
    patients = load_patients(settings.run)
    splits = make_splits(patients, settings)
    write_parquet(splits, layout.splits, index=False)
    expression = load_matrix(settings.run, "expression")
    train_ids = splits.loc[splits[SPLIT_COL] == "train", Col.PATIENT]
    stats = fit_normalizer(expression, patients, train_ids, clip=settings.clip)
    write_parquet(stats, layout.normalization, index=False)
    settings.save(sp)
    counts = splits[SPLIT_COL].value_counts()
    log.info("split %d patients: %s", len(splits), ", ".join(f"{k} {counts.get(k, 0)}" for k in ("train", "val", "test")))
    return {"splits": layout.splits, "normalization": layout.normalization}


def load_splits(run: str | Path) -> pd.DataFrame:
    layout = RunLayout(run)
    layout.require(layout.splits, "Run `oncofm cohort split --run RUN` first.")
    return pd.read_parquet(layout.splits)
