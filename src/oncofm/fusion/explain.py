"""``explain_patient``: one explanation for one new patient (used by the product's ``explain``)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from oncofm.errors import OncoFMError
from oncofm.fusion.parse import ParsedPrediction, parse_prediction

__all__ = ["explain_patient", "product_model"]


@functools.lru_cache(maxsize=2)
def _cached_model(run: str, version: int) -> tuple[Any, Any, dict]:
    from oncofm.fusion.train import load_fusion_model

    # one patient at a time is matrix-vector work: fp32 with the LoRA merged is the fastest here (bf16 pays
    # off only for batches; measured 16 s vs 22 s for a 190-token explanation on the 2-core AMX machine)
    return load_fusion_model(run, precision="fp32", merge=True)


def product_model(run: str | Path) -> tuple[Any, Any, dict]:
    """``(model, tokenizer, config)`` of ``RUN``'s fusion model as the product runs it (fp32, LoRA merged),
    loaded once per process and again when the model is retrained (keyed on its projector file's mtime)."""
    from oncofm.paths import RunLayout

    root = Path(run).resolve()
    projector = RunLayout(root).model_dir("fusion") / "projector.safetensors"
    version = projector.stat().st_mtime_ns if projector.exists() else 0
    return _cached_model(str(root), version)


def _split_embedding(fused: Any, d_omics: int, d_slide: int) -> tuple[np.ndarray, np.ndarray, bool, bool]:
    if isinstance(fused, dict):
        o, s = fused.get("omics"), fused.get("slide")
        o = np.zeros(d_omics, np.float32) if o is None else np.asarray(o, np.float32).reshape(-1)
        s = np.zeros(d_slide, np.float32) if s is None else np.asarray(s, np.float32).reshape(-1)
        has_o, has_s = fused.get("omics") is not None, fused.get("slide") is not None
    else:
        v = np.asarray(fused, np.float32).reshape(-1)
        if v.shape[0] != d_omics + d_slide:
            raise OncoFMError(f"fused_embedding has {v.shape[0]} values; this fusion model expects "
                              f"{d_omics} (omics) + {d_slide} (slide) = {d_omics + d_slide}")
        o, s = v[:d_omics], v[d_omics:]
        has_o, has_s = bool(np.isfinite(o).all()), bool(np.isfinite(s).all())
    if o.shape[0] != d_omics or s.shape[0] != d_slide:
        raise OncoFMError(f"embedding widths ({o.shape[0]}, {s.shape[0]}) differ from the fusion model's "
                          f"({d_omics}, {d_slide}); use the embeddings of this run's omics and slide models")
    o = np.nan_to_num(o) if has_o else np.zeros_like(o)
    s = np.nan_to_num(s) if has_s else np.zeros_like(s)
    if not (has_o or has_s):
        raise OncoFMError("the patient has neither an omics nor a slide embedding; nothing to explain")
    return o, s, has_o, has_s


def explain_patient(run: str | Path, evidence: dict, fused_embedding: Any, *, max_new_tokens: int = 200
                    ) -> tuple[str, ParsedPrediction | None]:
    """Generate the explanation of one patient with the run's trained fusion model.

    Parameters
    ----------
    run
        Run directory holding ``models/fusion`` (from ``oncofm train fusion``).
    evidence
        The patient's evidence record, same keys as in ``reasoning/dataset.jsonl`` (``cancer_type``,
        ``omics_prob``, ``risk_genes``, ``protective_genes``, ``slide_prob``, ``image``, ``missing``).
    fused_embedding
        ``{"omics": (d_omics,) array or None, "slide": (d_slide,) array or None}``, or one concatenated
        ``(d_omics + d_slide,)`` array with NaN in the part of a missing modality.

    Returns
    -------
    (text, parsed)
        The explanation (cut after its prediction line) and the parsed prediction (``None`` if malformed).
    """
    import torch

    from oncofm.fusion.generate import generate_texts
    from oncofm.fusion.model import encode_item

    model, tokenizer, cfg = product_model(run)
    o, s, has_o, has_s = _split_embedding(fused_embedding, cfg["d_omics"], cfg["d_slide"])
    item = encode_item(tokenizer, {"patient_id": "new", "evidence": evidence}, torch.from_numpy(o),
                       torch.from_numpy(s), has_o, has_s, with_target=False)
    text = generate_texts(model, tokenizer, [item], max_new_tokens=max_new_tokens, batch_size=1, progress=False)[0]
    return text, parse_prediction(text)
