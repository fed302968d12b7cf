"""Where a patient's risk falls among the training patients of the same cancer type."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from oncofm.cohort.patient import PatientInput
from oncofm.cohort.schema import Col
from oncofm.omics.predict import OmicsResult
from oncofm.pathology.predict import SlideResult
from oncofm.paths import RunLayout

__all__ = ["CohortContext", "cohort_context"]

#: Fewer training patients of the type than this and the comparison is left out.
MIN_TRAIN_PATIENTS = 5


@dataclass
class CohortContext:
    cancer_type: str
    model: str  # which model's risks are compared
    patient_risk: float
    risks: np.ndarray  # (n,) training patients of this cancer type
    times_days: np.ndarray  # (n,)
    events: np.ndarray  # (n,)
    percentile: float  # share of training patients with a lower risk


def cohort_context(patient: PatientInput, omics: OmicsResult | None, slide: SlideResult | None,
                   layout: RunLayout) -> CohortContext | None:
    """The patient's risk against the stored training-split predictions of the same model (the omics
    model's, or the slide model's when only a slide was given); ``None`` when the run holds none."""
    for name, result in (("omics", omics), ("slide", slide)):
        if result is None:
            continue
        pred_file = layout.model_dir(name) / "predictions.parquet"
        if not pred_file.exists() or not layout.patients.exists():
            continue
        preds = pd.read_parquet(pred_file)
        if "split" not in preds.columns:
            continue
        patients = pd.read_parquet(layout.patients)
        train = preds[preds["split"] == "train"].merge(patients, on=Col.PATIENT)
        train = train[(train[Col.CANCER] == patient.cancer_type) & (train[Col.PATIENT] != patient.patient_id)]
        if len(train) < MIN_TRAIN_PATIENTS:
            continue
        risks = train["prob"].to_numpy(float)
        return CohortContext(cancer_type=patient.cancer_type, model=name, patient_risk=result.prob, risks=risks,
                             times_days=train[Col.OS_DAYS].to_numpy(float), events=train[Col.OS_EVENT].to_numpy(int),
                             percentile=float((risks < result.prob).mean()))
    return None
