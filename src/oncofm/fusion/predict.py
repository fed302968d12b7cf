"""The fusion LLM's one inference path: ``oncofm evaluate-fusion``'s generations and ``oncofm explain``.

:class:`FusionPredictor` holds the trained fusion model (projector + LoRA on the LLM), its tokenizer, the
embedding widths it was trained on and the :class:`~oncofm.fusion.evidence.EvidenceSettings` its
training records were built with (read back from the model's ``config.yaml``, so a new patient's
evidence record is built the same way). :meth:`FusionPredictor.generate` writes the explanations of a
batch of (evidence, embeddings) — the evaluation calls it for the test split — and
:meth:`FusionPredictor.predict` one patient from the omics and slide predictors' results, through the
same ``generate``. A missing modality is passed as zeros with ``has_* = False``: the fusion model's learned
stand-in.

The product loads the model once per process (fp32 with the LoRA merged: one patient at a time is
matrix-vector work, where fp32 is the fastest here) and again when the model is retrained.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from oncofm.errors import OncoFMError
from oncofm.fusion.artifacts import FusionArtifacts
from oncofm.fusion.evidence import Evidence, EvidenceSettings
from oncofm.fusion.parse import ParsedPrediction, parse_prediction
from oncofm.io import model_version
from oncofm.paths import RunLayout

if TYPE_CHECKING:
    from oncofm.omics.predict import OmicsResult
    from oncofm.pathology.predict import SlideResult

log = logging.getLogger(__name__)

__all__ = ["FusionPredictor", "FusionResult"]

TRAIN_HINT = "Run `oncofm train fusion --run RUN` first."


@dataclass
class FusionResult:
    """The fusion LLM's explanation of one patient and its parsed prediction line."""

    text: str
    parsed: ParsedPrediction | None  # None: the text has no well-formed prediction line
    version: str

    @property
    def risk(self) -> float | None:
        return None if self.parsed is None else self.parsed.risk

    @property
    def prediction(self) -> str | None:
        """"death within 5 years" / "alive at 5 years", or None when unparsed."""
        if self.parsed is None:
            return None
        return "death within 5 years" if self.parsed.death else "alive at 5 years"


@functools.lru_cache(maxsize=2)
def _cached(run: str, precision: str, merge: bool, stamp: int) -> FusionPredictor:
    return FusionPredictor.load(run, precision=precision, merge=merge)


class FusionPredictor:
    """A trained fusion model and what is needed to turn evidence + embeddings into its explanation."""

    def __init__(self, model: Any, tokenizer: Any, config: dict[str, Any], *, version: str = "unsaved",
                 max_new_tokens: int = 200, decoding: str = "structured") -> None:
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.d_omics, self.d_slide = int(config["d_omics"]), int(config["d_slide"])
        self.evidence_settings = EvidenceSettings(**config.get("evidence", {}))
        #: the slide modality it was trained on: mil (patches) or features (slide-level image features)
        self.slide_branch = str(config.get("slide_branch", "mil"))
        self.version = version
        self.max_new_tokens = max_new_tokens
        self.decoding = decoding  # oncofm.fusion.generate.DECODINGS

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_run(cls, layout: RunLayout) -> FusionPredictor | None:
        """The run's fusion model as the product runs it (fp32, LoRA merged), cached per process and
        reloaded when the model is retrained; ``None`` when the run has none (the caller notes it)."""
        projector = FusionArtifacts.of(layout.root).weights
        if not projector.exists():
            return None
        return _cached(str(layout.root.resolve()), "fp32", True, projector.stat().st_mtime_ns)

    @classmethod
    def load(cls, run: str | Path, *, precision: str = "fp32", merge: bool = True) -> FusionPredictor:
        from oncofm.fusion.train import load_fusion_model

        layout = RunLayout(run)
        arts = FusionArtifacts.of(run)
        layout.require(arts.weights, TRAIN_HINT)
        model, tokenizer, cfg = load_fusion_model(run, precision=precision, merge=merge)
        max_new = int((cfg.get("settings") or {}).get("max_new_tokens", 200))
        return cls(model, tokenizer, cfg, version=model_version(arts.dir), max_new_tokens=max_new)

    # ------------------------------------------------------------------ inputs
    def embeddings(self, omics: np.ndarray | None, slide: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, bool, bool]:
        """The two embeddings as the model takes them: zeros + ``False`` for a missing one."""
        def one(emb: np.ndarray | None, dim: int, name: str) -> tuple[np.ndarray, bool]:
            if emb is None or dim == 0 or np.size(emb) == 0:
                return np.zeros(dim, dtype=np.float32), False
            emb = np.asarray(emb, dtype=np.float32).ravel()
            if emb.shape[0] != dim:
                raise OncoFMError(f"the {name} embedding has {emb.shape[0]} values but the fusion model was trained "
                                  f"on {dim}: the run's models are out of step; retrain with "
                                  "`oncofm train fusion --redo`")
            if not np.isfinite(emb).all():
                return np.zeros(dim, dtype=np.float32), False
            return emb, True

        o, has_o = one(omics, self.d_omics, "omics")
        s, has_s = one(slide, self.d_slide, "slide")
        if not (has_o or has_s):
            raise OncoFMError("the patient has neither an omics nor a slide embedding; nothing to explain")
        return o, s, has_o, has_s

    # ------------------------------------------------------------------ the model
    def generate(self, records: list[tuple[str, Evidence | dict, np.ndarray | None, np.ndarray | None]], *,
                 batch_size: int = 1, readout: str = "marginal", max_new_tokens: int | None = None,
                 progress: bool = False, decoding: str | None = None) -> list[FusionResult]:
        """Explanations of ``(patient_id, evidence, omics embedding, slide embedding)`` rows (greedy).

        ``decoding`` (default: the predictor's, ``structured``) is one of
        :data:`oncofm.fusion.generate.DECODINGS`. With ``free`` decoding, ``batch_size`` 1 is greedy with lookup
        drafts (exact) and larger batches go through the batched ``generate``.
        """
        from oncofm.fusion.generate import generate_texts
        from oncofm.fusion.model import encode_item

        items = []
        for pid, evidence, omics, slide in records:
            ev = evidence.to_dict() if isinstance(evidence, Evidence) else evidence
            o, s, has_o, has_s = self.embeddings(omics, slide)
            items.append(encode_item(self.tokenizer, {"patient_id": pid, "evidence": ev}, o, s, has_o, has_s,
                                     with_target=False))
        texts = generate_texts(self.model, self.tokenizer, items, max_new_tokens=max_new_tokens or self.max_new_tokens,
                               batch_size=batch_size, readout=readout, progress=progress,
                               decoding=decoding or self.decoding)
        return [FusionResult(text=t, parsed=parse_prediction(t), version=self.version) for t in texts]

    def predict(self, evidence: Evidence, omics: OmicsResult | None, slide: SlideResult | None,
                patient_id: str = "patient") -> FusionResult:
        """One patient's explanation from its evidence record and the unimodal predictors' results."""
        return self.generate([(patient_id, evidence, None if omics is None else omics.embedding,
                               None if slide is None else slide.embedding)])[0]
