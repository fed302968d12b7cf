"""Fusion of the two models' penultimate embeddings.

The fused vector of a patient is ``[omics embedding, slide embedding]`` (concatenated). A patient
without one modality gets a **learned** embedding in its place (:class:`FusedEmbedding`), so the LLM
is told "no slide" in a way it can learn from; for the linear baseline head, which cannot learn a
stand-in, the missing part is zero and two indicator columns say what is missing
(:func:`fused_matrix`).

The slide embedding comes from one *slide branch* (:func:`resolve_slide_branch`): ``mil``, the attention-MIL
slide model on the slide's patches (``models/slide``), or ``features``, the slide-feature model on slide-level
image features (``models/slide_features``, :mod:`oncofm.pathology.feature_model`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from oncofm.errors import DataValidationError, OncoFMError
from oncofm.paths import RunLayout

__all__ = ["ModalityEmbeddings", "load_embeddings", "FusedEmbedding", "fused_matrix", "SLIDE_BRANCHES",
           "resolve_slide_branch", "reasoning_slide_branch"]

#: slide branch → the model directory (``RUN/models/<name>``) whose embeddings are the slide modality
SLIDE_BRANCHES = {"mil": "slide", "features": "slide_features"}


def resolve_slide_branch(run: str | Path, choice: str = "auto") -> str:
    """``mil`` or ``features``: ``choice`` itself, or for ``auto`` the branch whose model the run has
    (``mil`` when it has neither; an error when it has both: the user must choose)."""
    if choice in SLIDE_BRANCHES:
        return choice
    if choice != "auto":
        raise OncoFMError(f"unknown slide branch {choice!r}; choose auto, mil or features")
    layout = RunLayout(run)
    have = [b for b, d in SLIDE_BRANCHES.items() if (layout.model_dir(d) / "embeddings.parquet").exists()]
    if len(have) == 2:
        raise OncoFMError("the run has both an attention-MIL slide model (models/slide) and a slide-feature model "
                          "(models/slide_features); choose the slide branch fusion uses with --slide-branch mil "
                          "or --slide-branch features (oncofm reasoning)")
    return have[0] if have else "mil"


def reasoning_slide_branch(run: str | Path) -> str:
    """The slide branch the run's reasoning dataset was built with (its saved settings; else ``auto``)."""
    from oncofm.config import read_settings_mapping

    path = RunLayout(run).settings_file("reasoning")
    saved = read_settings_mapping(path) if path.exists() else {}
    return resolve_slide_branch(run, str(saved.get("slide_branch") or "auto"))


@dataclass
class ModalityEmbeddings:
    """Both models' embeddings aligned to ``patient_ids``; a missing modality is a row of zeros + flag."""

    patient_ids: list[str]
    omics: np.ndarray  # (N, d_omics) float32
    slide: np.ndarray  # (N, d_slide) float32
    has_omics: np.ndarray  # (N,) bool
    has_slide: np.ndarray  # (N,) bool

    def row(self, patient_id: str) -> dict[str, np.ndarray]:
        i = self.patient_ids.index(patient_id)
        return {"omics": self.omics[i], "slide": self.slide[i], "has_omics": self.has_omics[i],
                "has_slide": self.has_slide[i]}

    def subset(self, patient_ids: list[str]) -> ModalityEmbeddings:
        pos = {p: i for i, p in enumerate(self.patient_ids)}
        idx = np.array([pos[p] for p in patient_ids], dtype=int)
        return ModalityEmbeddings(list(patient_ids), self.omics[idx], self.slide[idx], self.has_omics[idx],
                                  self.has_slide[idx])


def _read_embedding_table(path: Path) -> pd.DataFrame | None:
    if not path.exists():
        return None
    df = pd.read_parquet(path)
    if "patient_id" in df.columns:
        df = df.set_index("patient_id")
    cols = [c for c in df.columns if str(c).startswith("e") and str(c)[1:].isdigit()]
    if not cols:
        raise DataValidationError("no embedding columns e0..e{d-1}", file=str(path))
    cols = sorted(cols, key=lambda c: int(str(c)[1:]))
    df = df[cols].astype(np.float32)
    df.index = df.index.astype(str)
    return df[~df.index.duplicated()]


def load_embeddings(run: str | Path, patient_ids: list[str], *, slide_dim: int = 0,
                    omics_dim: int = 0, slide_branch: str = "auto") -> ModalityEmbeddings:
    """Read ``models/omics/embeddings.parquet`` and the slide branch's ``embeddings.parquet``
    (``models/slide`` or ``models/slide_features``, :func:`resolve_slide_branch`) for ``patient_ids``.

    A model whose table does not exist counts as missing for every patient (its width is then
    ``omics_dim``/``slide_dim``, at least 1, so the fused vector keeps a fixed layout).
    """
    layout = RunLayout(run)
    slide_dir = SLIDE_BRANCHES[resolve_slide_branch(run, slide_branch)]
    tables = {name: _read_embedding_table(layout.model_dir(folder) / "embeddings.parquet")
              for name, folder in (("omics", "omics"), ("slide", slide_dir))}
    out = {}
    for name, default in (("omics", omics_dim), ("slide", slide_dim)):
        df = tables[name]
        width = df.shape[1] if df is not None else max(1, default)
        values = np.zeros((len(patient_ids), width), dtype=np.float32)
        present = np.zeros(len(patient_ids), dtype=bool)
        if df is not None:
            hit = pd.Index(patient_ids).isin(df.index)
            values[hit] = df.loc[np.asarray(patient_ids)[hit]].to_numpy(np.float32)
            present = hit & np.isfinite(values).all(axis=1)
            values[~present] = 0.0
        out[name] = (values, present)
    return ModalityEmbeddings(list(patient_ids), out["omics"][0], out["slide"][0], out["omics"][1],
                              out["slide"][1])


def fused_matrix(emb: ModalityEmbeddings) -> np.ndarray:
    """``(N, d_omics + d_slide + 2)``: embeddings with zeros for a missing modality, then the two flags."""
    return np.concatenate([emb.omics * emb.has_omics[:, None], emb.slide * emb.has_slide[:, None],
                           emb.has_omics[:, None].astype(np.float32), emb.has_slide[:, None].astype(np.float32)],
                          axis=1).astype(np.float32)


class FusedEmbedding(nn.Module):
    """Concatenate the two embeddings; a learned vector stands in for a missing modality.

    Shapes: ``omics (B, d_omics)``, ``slide (B, d_slide)``, ``has_* (B,)`` → ``(B, d_omics + d_slide)``.
    """

    def __init__(self, d_omics: int, d_slide: int) -> None:
        super().__init__()
        if d_omics < 1 or d_slide < 1:
            raise ValueError(f"embedding widths must be positive: {d_omics=}, {d_slide=}")
        self.d_omics, self.d_slide = d_omics, d_slide
        self.missing_omics = nn.Parameter(torch.zeros(d_omics))
        self.missing_slide = nn.Parameter(torch.zeros(d_slide))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.missing_omics, std=0.02)
        nn.init.normal_(self.missing_slide, std=0.02)

    @property
    def d_out(self) -> int:
        return self.d_omics + self.d_slide

    def forward(self, omics: torch.Tensor, slide: torch.Tensor, has_omics: torch.Tensor,
                has_slide: torch.Tensor) -> torch.Tensor:
        ho = has_omics.to(omics.dtype).unsqueeze(1)  # (B, 1)
        hs = has_slide.to(slide.dtype).unsqueeze(1)  # (B, 1)
        o = omics * ho + self.missing_omics.unsqueeze(0) * (1 - ho)  # (B, d_omics)
        s = slide * hs + self.missing_slide.unsqueeze(0) * (1 - hs)  # (B, d_slide)
        return torch.cat([o, s], dim=1)  # (B, d_omics + d_slide)
