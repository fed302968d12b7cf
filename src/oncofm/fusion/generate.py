"""Generation with a proper stop: at EOS, or as soon as the prediction line is complete.

Rows are left-padded so a batch generates together: ``[pad ...][soft_1..soft_k][prompt ...]``. Greedy
decoding by default (deterministic explanations). The returned text is cut right after the first complete
prediction line.
"""

from __future__ import annotations

from typing import Any

import torch

from oncofm.fusion.model import FusionItem, FusionLLM
from oncofm.fusion.parse import PREDICTION_RE

__all__ = ["generate_texts", "PredictionLineStop", "cut_after_prediction"]


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


def cut_after_prediction(text: str) -> str:
    """``text`` up to and including its first complete prediction line."""
    m = PREDICTION_RE.search(text)
    return text[: m.end()].strip() if m else text.strip()


@torch.no_grad()
def generate_texts(model: FusionLLM, tokenizer: Any, items: list[FusionItem], *, max_new_tokens: int = 200,
                   batch_size: int = 8, progress: bool = True) -> list[str]:
    """Greedy explanations for ``items`` (their prompts; targets ignored)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    from oncofm.logging_utils import track

    class _Stop(StoppingCriteria):
        def __init__(self) -> None:
            self.inner = PredictionLineStop(tokenizer)

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
        for row in gen:
            out.append(cut_after_prediction(tokenizer.decode(row, skip_special_tokens=True)))
    return out
