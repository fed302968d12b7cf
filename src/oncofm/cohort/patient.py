"""One patient's raw inputs, as every predictor takes them (``predict(patient, workdir)``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

__all__ = ["PatientInput"]


@dataclass
class PatientInput:
    """One patient to predict and explain (raw, un-normalised values)."""

    patient_id: str
    cancer_type: str
    expression: pd.Series | None  # gene -> raw value, in the cohort's units; None = no omics
    slide: Path | None  # None = no slide
    mpp: float | None  # microns per pixel given by the user (None = read from the slide)
    source: str  # "cohort" (a patient of the run) or "upload"
    split: str | None = None  # the patient's split in the run, for cohort patients
    age: float | None = None
    sex: str | None = None  # "female" / "male" / None
    notes: list[str] = field(default_factory=list)
    #: slide-level image features (feature name -> raw value), for the slide-feature model; None = none
    slide_features: pd.Series | None = None
    # optional further inputs (each None = not given): gene -> copy-number level (tcga13: -2..2); gene -> 0/1
    # mutation status, or a list of mutated genes (the model's other mutation features then count as wild-type);
    # AJCC stage and grade as 1-4 or text ("Stage IIIA", "G3": oncofm.cohort.clinical)
    cnv: pd.Series | None = None
    mutation: pd.Series | list[str] | None = None
    stage: float | str | None = None
    grade: float | str | None = None
