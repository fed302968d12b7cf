"""The fusion LLM, LLaVA-style: projected soft tokens spliced before the prompt, loss on the target only.

Sequence fed to the LLM (one row)::

    [soft_1 .. soft_k][prompt tokens ...][target tokens ... EOS][pad ...]
    labels:  -100 ...  -100 ...           target ids ... EOS   -100 ...

Only the missing-modality embeddings, the projector and the LoRA adapters are trainable; the LLM's own
weights stay frozen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from oncofm.fusion.evidence import evidence_prompt
from oncofm.fusion.fuse import FusedEmbedding
from oncofm.fusion.projector import SoftTokenProjector
from oncofm.fusion.templates import draft_texts

__all__ = ["FusionLLM", "FusionItem", "build_prompt_ids", "encode_item", "collate", "FusionTask", "IGNORE_INDEX",
           "SYSTEM_PROMPT", "USER_PROMPT"]

IGNORE_INDEX = -100
SYSTEM_PROMPT = "You are an oncology assistant."
USER_PROMPT = "Explain the 5-year prognosis from the embedded patient tokens and this evidence:\n"


@dataclass
class FusionItem:
    """One patient, tokenised: embeddings + prompt ids (+ target ids when training)."""

    patient_id: str
    omics: torch.Tensor  # (d_omics,)
    slide: torch.Tensor  # (d_slide,)
    has_omics: bool
    has_slide: bool
    prompt_ids: list[int]
    target_ids: list[int] | None = None
    #: token ids of template renderings of the evidence (-1 between texts): drafts for speculative decoding
    draft_ids: list[int] = field(default_factory=list)
    #: the evidence record (generation only): the facts the structured decoder's sentences state
    evidence: dict | None = None


def build_prompt_ids(tokenizer: Any, evidence: dict) -> list[int]:
    """Token ids of the prompt (chat template when the tokenizer has one) for an evidence record."""
    user = USER_PROMPT + evidence_prompt(evidence)
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}],
            tokenize=False, add_generation_prompt=True)
    else:
        text = f"{SYSTEM_PROMPT}\n### Patient\n{user}\n### Explanation\n"
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_item(tokenizer: Any, record: dict, omics: Any, slide: Any, has_omics: bool, has_slide: bool,
                with_target: bool = True) -> FusionItem:
    """A record (``patient_id``, ``evidence``, ``target``) and its embeddings as a :class:`FusionItem`; for
    generation (``with_target=False``) with the draft ids of speculative decoding."""
    target_ids, draft_ids = None, []
    if with_target and record.get("target"):
        target_ids = list(tokenizer(record["target"], add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
    if not with_target:
        for text in draft_texts(record["evidence"]):
            draft_ids += [*tokenizer(text, add_special_tokens=False)["input_ids"], -1]
    return FusionItem(record["patient_id"], torch.as_tensor(omics, dtype=torch.float32),
                      torch.as_tensor(slide, dtype=torch.float32), bool(has_omics), bool(has_slide),
                      build_prompt_ids(tokenizer, record["evidence"]), target_ids, draft_ids,
                      None if with_target else record["evidence"])


def collate(items: list[FusionItem], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded training batch: ``input_ids, labels, attention_mask (B, L)`` + embeddings."""
    seqs, labs = [], []
    for it in items:
        tgt = it.target_ids or []
        seqs.append(it.prompt_ids + tgt)
        labs.append([IGNORE_INDEX] * len(it.prompt_ids) + tgt)
    n = max(len(s) for s in seqs)
    ids = torch.full((len(items), n), pad_id, dtype=torch.long)
    labels = torch.full((len(items), n), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), n), dtype=torch.long)
    for i, (s, lab) in enumerate(zip(seqs, labs, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, : len(s)] = torch.tensor(lab)
        mask[i, : len(s)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask,
            "omics": torch.stack([it.omics for it in items]), "slide": torch.stack([it.slide for it in items]),
            "has_omics": torch.tensor([it.has_omics for it in items]),
            "has_slide": torch.tensor([it.has_slide for it in items])}


class FusionLLM(nn.Module):
    """Fused embedding → projector → k soft tokens, spliced before the prompt of a (LoRA-wrapped) causal LM."""

    def __init__(self, llm: nn.Module, fusion: FusedEmbedding, projector: SoftTokenProjector) -> None:
        super().__init__()
        self.llm, self.fusion, self.projector = llm, fusion, projector

    @property
    def n_soft(self) -> int:
        return self.projector.n_tokens

    def soft_tokens(self, omics: torch.Tensor, slide: torch.Tensor, has_omics: torch.Tensor,
                    has_slide: torch.Tensor) -> torch.Tensor:
        fused = self.fusion(omics, slide, has_omics, has_slide)  # (B, d_omics + d_slide)
        return self.projector(fused)  # (B, k, H)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.llm.get_input_embeddings()(input_ids)  # (B, L, H)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, omics: torch.Tensor,
                slide: torch.Tensor, has_omics: torch.Tensor, has_slide: torch.Tensor,
                labels: torch.Tensor | None = None) -> Any:
        soft = self.soft_tokens(omics, slide, has_omics, has_slide)  # (B, k, H)
        tok = self.embed(input_ids)  # (B, L, H)
        embeds = torch.cat([soft.to(tok.dtype), tok], dim=1)  # (B, k + L, H)
        b, k = soft.shape[:2]
        mask = torch.cat([attention_mask.new_ones(b, k), attention_mask], dim=1)  # (B, k + L)
        if labels is not None:
            labels = torch.cat([labels.new_full((b, k), IGNORE_INDEX), labels], dim=1)  # (B, k + L)
        return self.llm(inputs_embeds=embeds, attention_mask=mask, labels=labels)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


class FusionTask:
    """The :class:`oncofm.training.TrainTask` of the fusion LLM: token cross-entropy on the target."""

    def loss(self, model: FusionLLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).loss

    def evaluate(self, model: FusionLLM, loader: Any) -> dict[str, float]:
        device = next(model.parameters()).device
        total, n_tok = 0.0, 0
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # tokens scored after the shift
            total += float(model(**batch).loss) * n
            n_tok += n
        return {"val_loss": total / max(1, n_tok)}
