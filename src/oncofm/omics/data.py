"""Inputs of the omics model: the (expression, coefficient) pair tensor plus clinical covariates.

:func:`load_omics_table` joins the ``features`` stage's tensor (``features/pairs.npy``, genes, patients)
with the cohort's patients and splits into one :class:`OmicsTable`. :class:`ClinicalEncoder` turns cancer
type / age / sex into model inputs with vocabularies and scalings fitted on the training split only (and
saved with the model). :class:`OmicsDataset` is a map-style dataset of per-patient dicts of tensors, so the
default collate, any sampler and ``DistributedSampler`` (DDP) work unchanged.
"""

from __future__ import annotations

import logging
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
    #: further omics layers: name -> (features, (N, F, 2) float32 pairs, NaN where not measured)
    layers: dict[str, tuple[list[str], np.ndarray]] = field(default_factory=dict)
    #: clinical covariates: name ("stage", "grade") -> (N,) float 1-4, NaN = unknown
    covariates: dict[str, np.ndarray] = field(default_factory=dict)
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
                          horizon_years=self.horizon_years,
                          layers={k: (f, v[mask]) for k, (f, v) in self.layers.items()},
                          covariates={k: v[mask] for k, v in self.covariates.items()})

    def where_split(self, name: str) -> OmicsTable:
        return self.subset(self.split == name)


def clinical_arrays(patients: pd.DataFrame, ids: pd.Index) -> dict[str, np.ndarray]:
    """Cancer type, age, sex, time, event of ``ids`` from a patients table (indexed by patient_id)."""
    p = patients.reindex(ids)
    sex = p[Col.SEX].astype("string").str.lower().fillna("") if Col.SEX in p else pd.Series("", index=ids)
    age = p[Col.AGE].to_numpy(dtype=float) if Col.AGE in p else np.full(len(ids), np.nan)
    return {"cancer_type": p[Col.CANCER].astype(str).to_numpy(), "age": age, "sex": sex.to_numpy(dtype=str),
            "time": p[Col.OS_DAYS].to_numpy(dtype=float), "event": p[Col.OS_EVENT].to_numpy(dtype=float)}


def select_layer_features(run: str | Path, layer: str, k: int, q_max: float = 0.05) -> list[str]:
    """Up to ``k`` features of a layer by the features stage's rule (:func:`oncofm.omics.features.select_genes`)
    on that layer's rows of the Cox table, which ``oncofm cox`` fits on the training split only — only
    features with ``q <= q_max`` somewhere (no top-up: on tcga13 validation, topping up with weaker mutation
    features cost 0.02 of validation score, docs/omics.md)."""
    from oncofm.errors import OncoFMError
    from oncofm.omics.features import select_genes
    from oncofm.survival.cox_stage import load_coefficients

    rows = load_coefficients(run, layer=layer)
    if rows.empty:
        raise OncoFMError(f"the Cox table of {run} has no {layer!r} rows; run `oncofm cox --run RUN --redo` "
                          f"on a cohort with a {layer} table")
    passed = rows[rows["q"] <= q_max]
    if passed.empty:
        raise OncoFMError(f"no {layer} feature has q <= {q_max:g} in any cancer type of the Cox table; leave the "
                          f"{layer} layer out (set its feature count to 0)")
    n_pass = int(passed["gene"].nunique())
    if n_pass < k:
        logging.getLogger(__name__).info("%s: %d features have q <= %g (asked for up to %d); using those", layer,
                                         n_pass, q_max, k)
    return select_genes(rows, top_k=min(k, n_pass), q_max=q_max, fill=False).index.tolist()


def layer_pairs(matrix: pd.DataFrame | None, ids: pd.Index, cancer_types: pd.Series, coefficients: pd.DataFrame,
                layer: str, features: list[str]) -> np.ndarray:
    """(N, F, 2) pairs of one extra layer; NaN values where a patient lacks the layer or the feature."""
    from oncofm.omics.features import build_pairs

    if matrix is None:
        matrix = pd.DataFrame(index=ids, columns=features, dtype=float)
    x = matrix.reindex(index=ids, columns=features).astype(float)
    return build_pairs(x, cancer_types.reindex(ids), coefficients, features, layer=layer, fill=False)


def load_omics_table(run: str | Path, *, horizon_years: float = 5.0, max_genes: int | None = None,
                     layers: dict[str, int] | None = None, covariates: tuple[str, ...] | list[str] = ()
                     ) -> OmicsTable:
    """The features stage's pair tensor joined with patients and splits of ``run``.

    ``max_genes`` keeps the first genes of ``features/genes.txt`` (the features stage ranks them).
    ``layers`` (``{"cnv": 32, "mutation": 32}``) adds that many features of each layer, selected from the
    training-split Cox table (:func:`select_layer_features`); ``covariates`` (``("stage", "grade")``) adds
    those columns of the patients table (NaN = unknown).
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
    extra: dict[str, tuple[list[str], np.ndarray]] = {}
    if layers:
        from oncofm.cohort.importing import load_matrix
        from oncofm.survival.cox_stage import load_coefficients

        coef = load_coefficients(run, layer=None)
        for layer, k in layers.items():
            if not k:
                continue
            feats = select_layer_features(run, layer, int(k))
            matrix = load_matrix(run, layer) if getattr(layout, layer).exists() else None
            extra[layer] = (feats, layer_pairs(matrix, ids, patients[Col.CANCER], coef, layer, feats))
    return OmicsTable(patient_ids=ids.to_numpy(dtype=str), genes=genes, pairs=values,
                      split=split.to_numpy(dtype=str), horizon_years=horizon_years, layers=extra,
                      covariates=covariate_arrays(patients, ids, covariates), **clinical_arrays(patients, ids))


def covariate_arrays(patients: pd.DataFrame, ids: pd.Index, names: tuple[str, ...] | list[str]) -> dict[str, np.ndarray]:
    """``{name: (N,) float}`` of covariate columns of a patients table (absent column: all unknown)."""
    p = patients.reindex(ids)
    return {c: (pd.to_numeric(p[c], errors="coerce").to_numpy(dtype=float) if c in p else np.full(len(ids), np.nan))
            for c in names}


@dataclass
class ClinicalEncoder:
    """Cancer-type vocabulary and age scaling fitted on training patients (index 0 = unknown type)."""

    cancer_types: list[str]
    age_mean: float
    age_std: float
    covariates: list[str] = field(default_factory=list)  # ordinal 1-4 covariates (stage, grade); 0 = unknown

    @classmethod
    def fit(cls, table: OmicsTable) -> ClinicalEncoder:
        age = table.age[np.isfinite(table.age)]
        mean = float(age.mean()) if len(age) else 0.0
        std = float(age.std()) if len(age) > 1 and age.std() > 0 else 1.0
        return cls(cancer_types=[UNKNOWN, *sorted(set(table.cancer_type.tolist()))], age_mean=mean, age_std=std,
                   covariates=list(table.covariates))

    def covariate_index(self, table: OmicsTable, name: str) -> np.ndarray:
        """(N,) int64 level 1-4 of a covariate, 0 = unknown (or the table lacks it)."""
        v = table.covariates.get(name)
        if v is None:
            return np.zeros(len(table), dtype=np.int64)
        v = np.asarray(v, dtype=float)
        return np.where(np.isin(v, (1.0, 2.0, 3.0, 4.0)), np.nan_to_num(v), 0).astype(np.int64)

    def cancer_index(self, cancer_type: np.ndarray) -> np.ndarray:
        lookup = {c: i for i, c in enumerate(self.cancer_types)}
        return np.array([lookup.get(c, 0) for c in np.asarray(cancer_type, dtype=str)], dtype=np.int64)

    def age_z(self, age: np.ndarray) -> np.ndarray:
        return ((np.asarray(age, dtype=float) - self.age_mean) / self.age_std).astype(np.float32)  # NaN kept

    @staticmethod
    def sex_index(sex: np.ndarray) -> np.ndarray:
        return np.array([SEX_CODES.get(str(s).lower(), 0) for s in sex], dtype=np.int64)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"cancer_types": self.cancer_types, "age_mean": self.age_mean, "age_std": self.age_std}
        if self.covariates:  # models trained without covariates keep their config unchanged
            d["covariates"] = list(self.covariates)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClinicalEncoder:
        return cls(cancer_types=list(d["cancer_types"]), age_mean=float(d["age_mean"]), age_std=float(d["age_std"]),
                   covariates=list(d.get("covariates", [])))

    def design_parts(self, table: OmicsTable) -> dict[str, np.ndarray]:
        """Blocks of the clinical design: ``cancer`` one-hot (no unknown column), ``age`` (z, missing → 0;
        missing flag), ``sex`` (female, male), ``covariates`` (per covariate one-hot of levels 1-4 and an
        unknown flag)."""
        ci = self.cancer_index(table.cancer_type)
        age = self.age_z(table.age)
        parts = {"cancer": np.eye(len(self.cancer_types), dtype=np.float32)[ci][:, 1:],
                 "age": np.column_stack([np.nan_to_num(age), np.isnan(age).astype(np.float32)]),
                 "sex": np.eye(3, dtype=np.float32)[self.sex_index(table.sex)][:, 1:]}
        cov = [np.eye(5, dtype=np.float32)[self.covariate_index(table, c)][:, [1, 2, 3, 4, 0]] for c in self.covariates]
        parts["covariates"] = np.concatenate(cov, 1) if cov else np.zeros((len(table), 0), np.float32)
        return parts

    def design(self, table: OmicsTable) -> np.ndarray:
        """Clinical design matrix for baselines: one-hot cancer type, age z (missing → 0) + missing flag, sex,
        and the covariates (stage, grade: one-hot 1-4 + unknown) when the encoder has them."""
        p = self.design_parts(table)
        return np.column_stack([p["cancer"], p["age"], p["sex"], p["covariates"]]).astype(np.float32)


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
        for name, (_, values) in table.layers.items():  # NaN kept: the model masks those tokens
            self.tensors[f"layer_{name}"] = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
        for name in encoder.covariates:
            self.tensors[f"cov_{name}"] = torch.from_numpy(encoder.covariate_index(table, name))
        self.n = len(table)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {k: v[i] for k, v in self.tensors.items()}
