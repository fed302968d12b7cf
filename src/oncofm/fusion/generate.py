"""Generation with a proper stop, and a grammar-constrained prediction line.

Rows are left-padded so a batch generates together: ``[pad ...][soft_1..soft_k][prompt ...]``. Greedy
decoding (deterministic explanations) writes the reasoning and stops at EOS, at ``max_new_tokens``, or as
soon as the model starts its ``Prediction:`` line.

The prediction line itself is then decoded under its grammar (``constrained=True``, the default), by the
fine-tuned LLM alone, given the soft tokens, the prompt and its own reasoning:

1. the grammar: ``death within 5 years`` goes with a risk of at least 0.5, ``alive at 5 years`` with a
   risk below 0.5 (a line such as "death within 5 years (risk 0.11)" contradicts itself and is not allowed),
   and the closing sentence of the reasoning (the templates' verdict, e.g. "On balance, the risk of death
   within 5 years is elevated." / "On balance, survival beyond 5 years is the likelier outcome.") is the
   one of the same phrasing for that outcome;
2. the verdict: for each outcome the LLM scores closing sentence + ``Prediction:`` + outcome words (sum of
   token log-probabilities, after the reasoning without its closing sentence) plus the log of the
   probability it gives, after ``(risk 0.``, to a first decimal on that outcome's side of 0.5; the likelier
   verdict is written;
3. the risk number: the LLM's distribution over the ten digit tokens, restricted to that side, gives the
   first decimal, and (after its most likely first digit) the second; the risk written is their
   expectation, ``sum_d p(d) d / 10 + sum_e p(e | d*) e / 100`` — the number the model would write,
   without the rounding that greedy decoding would impose on it.

So every explanation ends in a well-formed line whose words and number come from the fine-tuned LLM. With
``constrained=False`` the line is free text, cut after the first complete prediction line (and may not parse).
"""

from __future__ import annotations

import functools
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


def _append_ids(model: FusionLLM, prefix: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """``prefix`` (n, H) followed by the token embeddings of ``ids``."""
    return torch.cat([prefix, model.embed(torch.tensor([ids], device=prefix.device))[0].to(prefix.dtype)])


def _append(model: FusionLLM, tokenizer: Any, prefix: torch.Tensor, text: str) -> torch.Tensor:
    return _append_ids(model, prefix, tokenizer(text, add_special_tokens=False)["input_ids"])


@functools.lru_cache(maxsize=4)
def _digit_ids(tokenizer: Any) -> tuple[int, ...]:
    return tuple(tokenizer(str(d), add_special_tokens=False)["input_ids"][0] for d in range(10))


@torch.no_grad()
def outcome_branch(model: FusionLLM, tokenizer: Any, prefix: torch.Tensor, verdict: str
                   ) -> tuple[float, torch.Tensor, torch.Tensor]:
    """One forward pass over ``prefix`` + ``verdict`` + `` (risk 0.``: returns ``(log P(verdict | prefix),
    p (10,) of the first decimal digit after it, the extended prefix)``; ``prefix`` (n, H) embeddings,
    ``verdict`` the text up to the outcome words (closing sentence, ``Prediction:``, words)."""
    scored = tokenizer(verdict, add_special_tokens=False)["input_ids"]
    ids = scored + tokenizer(" (risk 0.", add_special_tokens=False)["input_ids"]
    embeds = _append_ids(model, prefix, ids)
    logits = model.llm(inputs_embeds=embeds[None]).logits[0].float()  # (n + m, V)
    n = prefix.shape[0]
    logp = torch.log_softmax(logits[n - 1: n - 1 + len(scored)], dim=-1)  # predictions of the verdict tokens
    l_verdict = float(logp[torch.arange(len(scored)), torch.tensor(scored)].sum())
    return l_verdict, torch.softmax(logits[-1, list(_digit_ids(tokenizer))], dim=0), embeds


@torch.no_grad()
def expected_risk(model: FusionLLM, tokenizer: Any, prefix: torch.Tensor, p1: torch.Tensor,
                  allowed: range = range(10)) -> float:
    """The risk the LLM writes after ``prefix`` (embeddings ending in ``(risk 0.``) whose first-decimal
    distribution is ``p1``: expected two decimals, the first restricted to ``allowed`` digits."""
    values = torch.arange(10, dtype=torch.float32)
    keep = torch.zeros(10)
    keep[list(allowed)] = 1.0
    p1 = p1 * keep / (p1 * keep).sum().clamp_min(1e-12)
    first = int(p1.argmax())
    second = _append(model, tokenizer, prefix, str(first))
    p2 = torch.softmax(model.llm(inputs_embeds=second[None]).logits[0, -1].float()[list(_digit_ids(tokenizer))], dim=0)
    return float((p1 * values).sum() / 10 + (p2 * values).sum() / 100)


#: the grammar of the prediction line: "death" goes with a risk of at least 0.5, "alive" with less
ALLOWED_FIRST_DECIMAL = {True: range(5, 10), False: range(0, 5)}


def split_closing(reasoning: str) -> tuple[str, int | None]:
    """``(reasoning without its closing sentence, index of that sentence in CLOSINGS)``; index None when the
    reasoning does not end in one of the templates' closing sentences."""
    from oncofm.fusion.templates import CLOSINGS

    text = reasoning.rstrip()
    for i, pair in enumerate(CLOSINGS):
        for sentence in pair:
            if text.endswith(sentence):
                return text[: -len(sentence)].rstrip(), i
    return reasoning, None


def constrained_prediction(model: FusionLLM, tokenizer: Any, context: torch.Tensor, reasoning: str) -> str:
    """``reasoning`` + the prediction line decoded under its grammar (see the module docstring)."""
    from oncofm.fusion.parse import format_prediction
    from oncofm.fusion.templates import CLOSINGS

    body, closing = split_closing(reasoning)
    prefix = _append(model, tokenizer, context, body) if body else context
    best = None
    for death in (True, False):
        words = OUTCOMES[0] if death else OUTCOMES[1]
        verdict = (" " + CLOSINGS[closing][0 if death else 1] if closing is not None else "")
        verdict = (verdict + "\n" if body or verdict else "") + f"Prediction: {words}"
        l_verdict, p1, risk_prefix = outcome_branch(model, tokenizer, prefix, verdict)
        side = float(p1[list(ALLOWED_FIRST_DECIMAL[death])].sum())
        score = l_verdict + math.log(max(side, 1e-12))  # log P(verdict, a risk on its side of 0.5)
        if best is None or score > best[0]:
            best = (score, death, p1, risk_prefix, verdict)
    _, death, p1, risk_prefix, verdict = best
    risk = expected_risk(model, tokenizer, risk_prefix, p1, ALLOWED_FIRST_DECIMAL[death])
    return (body + verdict.rsplit("Prediction:", 1)[0] + format_prediction(death, risk)).strip()


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
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[str] = []
    batches = [items[i: i + batch_size] for i in range(0, len(items), batch_size)]
    for batch in track(batches, "generating", enabled=progress):
        omics = torch.stack([it.omics for it in batch]).to(device, dtype)
        slide = torch.stack([it.slide for it in batch]).to(device, dtype)
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
