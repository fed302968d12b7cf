"""Generation with a proper stop, and a grammar-constrained prediction line.

Rows are left-padded so a batch generates together: ``[pad ...][soft_1..soft_k][prompt ...]``. Greedy
decoding (deterministic explanations) writes the reasoning and stops at EOS, at ``max_new_tokens``, or as
soon as the model starts its ``Prediction:`` line.

The prediction line itself is then decoded under its grammar (``constrained=True``, the default), by the
fine-tuned LLM alone, given the soft tokens, the prompt and its own reasoning:

1. the outcome words: the LLM scores the two allowed continuations ``death within 5 years`` and
   ``alive at 5 years`` (sum of token log-probabilities) and the likelier one is written;
2. the risk number: after ``(risk 0.`` the LLM's distribution over the ten digit tokens gives the first
   decimal, and (after its most likely first digit) the second; the risk written is their expectation,
   ``sum_d p(d) d / 10 + sum_e p(e | d*) e / 100`` — the number the model would write, without the
   rounding that greedy decoding would impose on it.

So every explanation ends in a well-formed line whose words and number come from the fine-tuned LLM. With
``constrained=False`` the line is free text, cut after the first complete prediction line (and may not parse).
"""

from __future__ import annotations

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

    pattern: re.Pattern = PREDICTION_RE

    def __init__(self, tokenizer: Any, window: int = 48) -> None:
        self.tokenizer, self.window = tokenizer, window

    def __call__(self, input_ids: torch.LongTensor, scores: Any = None, **kwargs: Any) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for i in range(input_ids.shape[0]):
            text = self.tokenizer.decode(input_ids[i, -self.window:], skip_special_tokens=True)
            done[i] = self.pattern.search(text) is not None
        return done


class PredictionStartStop(PredictionLineStop):
    """Stop a row as soon as its text starts the prediction line (``Prediction:``)."""

    pattern = _START_RE


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


def _append(model: FusionLLM, tokenizer: Any, prefix: torch.Tensor, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.cat([prefix, model.embed(torch.tensor([ids], device=prefix.device))[0].to(prefix.dtype)])


@torch.no_grad()
def expected_risk(model: FusionLLM, tokenizer: Any, prefix: torch.Tensor) -> float:
    """The risk the LLM writes after ``prefix`` (embeddings ending in ``(risk 0.``): expected two decimals."""
    digits = [tokenizer(str(d), add_special_tokens=False)["input_ids"][0] for d in range(10)]
    values = torch.arange(10, dtype=torch.float32)
    logits = model.llm(inputs_embeds=prefix[None]).logits[0, -1].float()
    p1 = torch.softmax(logits[digits], dim=0)
    first = int(p1.argmax())
    second = _append(model, tokenizer, prefix, str(first))
    p2 = torch.softmax(model.llm(inputs_embeds=second[None]).logits[0, -1].float()[digits], dim=0)
    return float((p1 * values).sum() / 10 + (p2 * values).sum() / 100)


def constrained_prediction(model: FusionLLM, tokenizer: Any, context: torch.Tensor, reasoning: str) -> str:
    """``reasoning`` + the prediction line decoded under its grammar (see the module docstring)."""
    from oncofm.fusion.parse import format_prediction

    prefix = _append(model, tokenizer, context, (reasoning + "\n" if reasoning else "") + "Prediction:")
    l_death, l_alive = score_outcomes(model, tokenizer, prefix)
    death = l_death >= l_alive
    words = OUTCOMES[0] if death else OUTCOMES[1]
    risk = expected_risk(model, tokenizer, _append(model, tokenizer, prefix, f" {words} (risk 0."))
    line = format_prediction(death, risk)
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
