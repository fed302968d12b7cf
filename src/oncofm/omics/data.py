"""Inputs of the omics model: the (expression, coefficient) pair tensor plus clinical covariates.

:func:`load_omics_table` joins the ``features`` stage's tensor (``features/pairs.npy``, genes, patients)
with the cohort's patients and splits into one :class:`OmicsTable`. :class:`ClinicalEncoder` turns cancer
type / age / sex into model inputs with vocabularies and scalings fitted on the training split only (and
saved with the model). :class:`OmicsDataset` is a map-style dataset of per-patient dicts of tensors, so the
default collate, any sampler and ``DistributedSampler`` (DDP) work unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from oncofm.cohort.schema import Col
from oncofm.errors import DataValidationError
from oncofm.paths import RunLayout
from oncofm.survival.endpoints import horizon_label

FEATURES_HINT = "Run `oncofm cox --run RUN` and then `oncofm features --run RUN` first."
UNKNOWN = "<unknown>"
SEX_CODES = {"female": 1, "male": 2}  # 0 = unknown


@dataclass
class OmicsTable:
    """Everything the omics model and its baselines see, one row per patient (aligned arrays)."""

    patient_ids: np.ndarray  # (N,) str
    genes: list[str]
    pairs: np.ndarray  # (N, G, 2) float32: [..., 0] normalised expression, [..., 1] Cox coefficient
    cancer_type: np.ndarray  # (N,) str
    age: np.ndarray  # (N,) float, NaN when unknown
    sex: np.ndarray  # (N,) str ("female" / "male" / "")
    time: np.ndarray  # (N,) OS days
    event: np.ndarray  # (N,) 0/1
    split: np.ndarray  # (N,) "train" / "val" / "test" / "" (not split)
    horizon_years: float = 5.0
    label: np.ndarray = field(init=False)  # (N,) 1 / 0 / NaN

    def __post_init__(self) -> None:
        self.label = horizon_label(self.time, self.event, self.horizon_years)

    def __len__(self) -> int:
        return len(self.patient_ids)

    def subset(self, mask: np.ndarray) -> OmicsTable:
        """Rows where ``mask`` is true (a new table; arrays are copies)."""
        return OmicsTable(patient_ids=self.patient_ids[mask], genes=self.genes, pairs=self.pairs[mask],
                          cancer_type=self.cancer_type[mask], age=self.age[mask], sex=self.sex[mask],
                          time=self.time[mask], event=self.event[mask], split=self.split[mask],
                          horizon_years=self.horizon_years)

    def where_split(self, name: str) -> OmicsTable:
        return self.subset(self.split == name)


def clinical_arrays(patients: pd.DataFrame, ids: pd.Index) -> dict[str, np.ndarray]:
    """Cancer type, age, sex, time, event of ``ids`` from a patients table (indexed by patient_id)."""
    p = patients.reindex(ids)
    sex = p[Col.SEX].astype("string").str.lower().fillna("") if Col.SEX in p else pd.Series("", index=ids)
    age = p[Col.AGE].to_numpy(dtype=float) if Col.AGE in p else np.full(len(ids), np.nan)
    return {"cancer_type": p[Col.CANCER].astype(str).to_numpy(), "age": age, "sex": sex.to_numpy(dtype=str),
            "time": p[Col.OS_DAYS].to_numpy(dtype=float), "event": p[Col.OS_EVENT].to_numpy(dtype=float)}


def load_omics_table(run: str | Path, *, horizon_years: float = 5.0, max_genes: int | None = None) -> OmicsTable:
    """The features stage's pair tensor joined with patients and splits of ``run``.

    ``max_genes`` keeps the first genes of ``features/genes.txt`` (the features stage ranks them).
    """
    from oncofm.cohort.importing import load_patients
    from oncofm.omics.features import load_pair_features

    layout = RunLayout(run)
    fdir = layout.features_dir
    layout.require(fdir / "pairs.npy", FEATURES_HINT)
    pairs, genes, patient_list = load_pair_features(run)
    ids = pd.Index(patient_list, name=Col.PATIENT)
    if pairs.ndim != 3 or pairs.shape != (len(ids), len(genes), 2):
        raise DataValidationError(f"pairs.npy has shape {pairs.shape}, expected ({len(ids)}, {len(genes)}, 2) "
                                  f"from patients.txt and genes.txt; re-run `oncofm features --run RUN --redo`",
                                  file=str(fdir / "pairs.npy"))
    patients = load_patients(run).set_index(Col.PATIENT)
    unknown = ids.difference(patients.index)
    if len(unknown):
        raise DataValidationError("patients in features/ are missing from the cohort; re-run `oncofm features`",
                                  file=str(fdir / "patients.txt"), rows=list(unknown))
    split = pd.Series("", index=ids, dtype=object)
    if layout.splits.exists():
        s = pd.read_parquet(layout.splits).set_index(Col.PATIENT)["split"]
        split = s.reindex(ids).fillna("").astype(str)
    keep = len(genes) if max_genes is None else min(max_genes, len(genes))
    values = np.nan_to_num(np.asarray(pairs[:, :keep], dtype=np.float32), nan=0.0)
    genes = genes[:keep]
    return OmicsTable(patient_ids=ids.to_numpy(dtype=str), genes=genes, pairs=values,
                      split=split.to_numpy(dtype=str), horizon_years=horizon_years,
                      **clinical_arrays(patients, ids))


@dataclass
class ClinicalEncoder:
    """Cancer-type vocabulary and age scaling fitted on training patients (index 0 = unknown type)."""

    cancer_types: list[str]
    age_mean: float
    age_std: float

    @classmethod
    def fit(cls, table: OmicsTable) -> ClinicalEncoder:
        age = table.age[np.isfinite(table.age)]
        mean = float(age.mean()) if len(age) else 0.0
        std = float(age.std()) if len(age) > 1 and age.std() > 0 else 1.0
        return cls(cancer_types=[UNKNOWN, *sorted(set(table.cancer_type.tolist()))], age_mean=mean, age_std=std)

    def cancer_index(self, cancer_type: np.ndarray) -> np.ndarray:
        lookup = {c: i for i, c in enumerate(self.cancer_types)}
        return np.array([lookup.get(c, 0) for c in np.asarray(cancer_type, dtype=str)], dtype=np.int64)

    def age_z(self, age: np.ndarray) -> np.ndarray:
        return ((np.asarray(age, dtype=float) - self.age_mean) / self.age_std).astype(np.float32)  # NaN kept

    @staticmethod
    def sex_index(sex: np.ndarray) -> np.ndarray:
        return np.array([SEX_CODES.get(str(s).lower(), 0) for s in sex], dtype=np.int64)

    def to_dict(self) -> dict[str, Any]:
        return {"cancer_types": self.cancer_types, "age_mean": self.age_mean, "age_std": self.age_std}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClinicalEncoder:
        return cls(cancer_types=list(d["cancer_types"]), age_mean=float(d["age_mean"]), age_std=float(d["age_std"]))

    def design(self, table: OmicsTable) -> np.ndarray:
        """Clinical design matrix for baselines: one-hot cancer type, age z (missing → 0) + missing flag, sex."""
        ci = self.cancer_index(table.cancer_type)
        onehot = np.eye(len(self.cancer_types), dtype=np.float32)[ci][:, 1:]
        age = self.age_z(table.age)
        sex = np.eye(3, dtype=np.float32)[self.sex_index(table.sex)][:, 1:]
        return np.column_stack([onehot, np.nan_to_num(age), np.isnan(age).astype(np.float32), sex])


class OmicsDataset:
    """Map-style torch dataset: item ``i`` is a dict of tensors for patient ``i`` of ``table``.

    Keys: ``pairs`` (G, 2) float32, ``cancer`` int64, ``age`` float32 (NaN = unknown), ``sex`` int64,
    ``label`` float32 (NaN = censored before the horizon), ``time`` float32 (days, censored at the
    horizon for the Cox loss), ``event`` float32.
    """

    def __init__(self, table: OmicsTable, encoder: ClinicalEncoder) -> None:
        import torch

        from oncofm.survival.endpoints import censor_at_horizon

        t, e = censor_at_horizon(table.time, table.event, table.horizon_years)
        self.tensors = {
            "pairs": torch.from_numpy(np.ascontiguousarray(table.pairs, dtype=np.float32)),
            "cancer": torch.from_numpy(encoder.cancer_index(table.cancer_type)),
            "age": torch.from_numpy(encoder.age_z(table.age)),
            "sex": torch.from_numpy(encoder.sex_index(table.sex)),
            "label": torch.from_numpy(table.label.astype(np.float32)),
            "time": torch.from_numpy(t.astype(np.float32)),
            "event": torch.from_numpy(e.astype(np.float32)),
        }
        self.n = len(table)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {k: v[i] for k, v in self.tensors.items()}
