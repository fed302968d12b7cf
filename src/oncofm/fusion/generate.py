"""Generation with a proper stop, and a grammar-constrained prediction line.

Rows are left-padded so a batch generates together: ``[pad ...][soft_1..soft_k][prompt ...]``. Greedy
decoding (deterministic explanations) writes the reasoning and stops at EOS, at ``max_new_tokens``, or as
soon as the model starts its ``Prediction:`` line.

The prediction line itself is then decoded under its grammar (``constrained=True``, the default): given
the soft tokens, the prompt and the model's own reasoning, the LLM scores the two allowed continuations
``death within 5 years`` and ``alive at 5 years`` (sum of token log-probabilities); the outcome is the
likelier one and the risk written in the line is the LLM's own probability of the death continuation,
``p = exp(l_death) / (exp(l_death) + exp(l_alive))``. So every explanation ends in a well-formed line whose
number comes from the fine-tuned LLM, not from any other model. With ``constrained=False`` the line is
free text, cut after the first complete prediction line (and may not parse).
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from oncofm.fusion.model import FusionItem, FusionLLM
from oncofm.fusion.parse import PREDICTION_RE

__all__ = ["generate_texts", "PredictionLineStop", "PredictionStartStop", "cut_after_prediction", "OUTCOMES"]

OUTCOMES = ("death within 5 years", "alive at 5 years")
_START_RE = re.compile(r"prediction\s*[:：]", re.IGNORECASE)


class PredictionLineStop:
    """A ``transformers`` stopping criterion: a row is done once its text holds a complete prediction line."""

    def __init__(self, tokenizer: Any, window: int = 48) -> None:
        self.tokenizer, self.window = tokenizer, window

    def __call__(self, input_ids: torch.LongTensor, scores: Any = None, **kwargs: Any) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for i in range(input_ids.shape[0]):
            text = self.tokenizer.decode(input_ids[i, -self.window:], skip_special_tokens=True)
            done[i] = PREDICTION_RE.search(text) is not None
        return done


class PredictionStartStop(PredictionLineStop):
    """Stop a row as soon as its text starts the prediction line (``Prediction:``)."""

    def __call__(self, input_ids: torch.LongTensor, scores: Any = None, **kwargs: Any) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for i in range(input_ids.shape[0]):
            text = self.tokenizer.decode(input_ids[i, -self.window:], skip_special_tokens=True)
            done[i] = _START_RE.search(text) is not None
        return done


def reasoning_part(text: str) -> str:
    """``text`` before its first ``Prediction:`` (the free-text reasoning)."""
    m = _START_RE.search(text)
    return (text[: m.start()] if m else text).strip()


@torch.no_grad()
def score_outcomes(model: FusionLLM, tokenizer: Any, prefix: torch.Tensor) -> tuple[float, float]:
    """Log-probabilities of the two outcome phrases after ``prefix`` (embeddings (n, H) ending in "Prediction:")."""
    device = prefix.device
    scores = []
    for phrase in OUTCOMES:
        ids = tokenizer(" " + phrase, add_special_tokens=False)["input_ids"]
        cont = model.embed(torch.tensor([ids], device=device))[0].to(prefix.dtype)  # (m, H)
        embeds = torch.cat([prefix, cont])[None]  # (1, n + m, H)
        logits = model.llm(inputs_embeds=embeds).logits[0].float()  # (n + m, V)
        logp = torch.log_softmax(logits[prefix.shape[0] - 1: -1], dim=-1)  # predictions for the m tokens
        scores.append(float(logp[torch.arange(len(ids)), torch.tensor(ids)].sum()))
    return scores[0], scores[1]


def constrained_prediction(model: FusionLLM, tokenizer: Any, context: torch.Tensor, reasoning: str) -> str:
    """``reasoning`` + the prediction line decoded under its grammar (see the module docstring)."""
    from oncofm.fusion.parse import format_prediction

    suffix = (reasoning + "\n" if reasoning else "") + "Prediction:"
    ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
    prefix = torch.cat([context, model.embed(torch.tensor([ids], device=context.device))[0].to(context.dtype)])
    l_death, l_alive = score_outcomes(model, tokenizer, prefix)
    p_death = 1.0 / (1.0 + math.exp(min(50.0, max(-50.0, l_alive - l_death))))
    line = format_prediction(p_death >= 0.5, p_death)
    return f"{reasoning}\n{line}" if reasoning else line


def cut_after_prediction(text: str) -> str:
    """``text`` up to and including its first complete prediction line."""
    m = PREDICTION_RE.search(text)
    return text[: m.end()].strip() if m else text.strip()


@torch.no_grad()
def generate_texts(model: FusionLLM, tokenizer: Any, items: list[FusionItem], *, max_new_tokens: int = 200,
                   batch_size: int = 8, progress: bool = True, constrained: bool = True) -> list[str]:
    """Greedy explanations for ``items`` (their prompts; targets ignored).

    ``constrained`` decodes the final prediction line under its grammar (module docstring).
    """
    from transformers import StoppingCriteria, StoppingCriteriaList

    from oncofm.logging_utils import track

    class _Stop(StoppingCriteria):
        def __init__(self) -> None:
            self.inner = PredictionStartStop(tokenizer) if constrained else PredictionLineStop(tokenizer)

        def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
            return self.inner(input_ids, scores)

    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[str] = []
    batches = [items[i: i + batch_size] for i in range(0, len(items), batch_size)]
    for batch in track(batches, "generating", enabled=progress):
        omics = torch.stack([it.omics for it in batch]).to(device)
        slide = torch.stack([it.slide for it in batch]).to(device)
        ho = torch.tensor([it.has_omics for it in batch], device=device)
        hs = torch.tensor([it.has_slide for it in batch], device=device)
        soft = model.soft_tokens(omics, slide, ho, hs)  # (B, k, H)
        rows = [torch.cat([soft[i], model.embed(torch.tensor(it.prompt_ids, device=device)[None])[0].to(soft.dtype)])
                for i, it in enumerate(batch)]  # each (k + L_i, H)
        n = max(r.shape[0] for r in rows)
        pad_vec = model.embed(torch.tensor([[pad_id]], device=device))[0, 0].to(soft.dtype)  # (H,)
        embeds = pad_vec.expand(len(rows), n, -1).clone()  # (B, n, H)
        mask = torch.zeros(len(rows), n, dtype=torch.long, device=device)
        for i, r in enumerate(rows):
            embeds[i, n - r.shape[0]:] = r
            mask[i, n - r.shape[0]:] = 1
        gen = model.llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id,
                                 stopping_criteria=StoppingCriteriaList([_Stop()]))
        for i, row in enumerate(gen):
            text = tokenizer.decode(row, skip_special_tokens=True)
            if constrained:
                out.append(constrained_prediction(model, tokenizer, rows[i], reasoning_part(text)))
            else:
                out.append(cut_after_prediction(text))
    return out
