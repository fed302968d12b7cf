"""Target texts written from an evidence record by templates with several phrasings.

Each text states only what the evidence record holds (genes, directions, z-scores, Cox signs, q-values,
probabilities, image findings, missing modalities) and ends in exactly one prediction line (see
:mod:`oncofm.fusion.parse`). The phrasing is drawn per patient from a seeded generator, so the same
record always gives the same text.
"""

from __future__ import annotations

import random

from oncofm.fusion.evidence import gene_facts
from oncofm.fusion.parse import format_prediction

__all__ = ["render_target", "draft_texts", "RISK_WORDS", "PROTECTIVE_WORDS", "CLOSINGS"]

# Keywords that mark a clause's direction (used by the faithfulness check as well).
RISK_WORDS = ("raise", "raises", "push the risk up", "point towards death", "adverse", "unfavourable")
PROTECTIVE_WORDS = ("lower", "lowers", "push the risk down", "point towards survival", "protective",
                    "favourable")

_INTRO = (
    "This is a {ct} patient.",
    "The patient has {ct}.",
    "Cancer type: {ct}.",
)
_OMICS = (
    "The omics model gives a probability of {p:.2f} of death within 5 years.",
    "From gene expression, the omics model estimates a 5-year death probability of {p:.2f}.",
    "The expression-based model puts the probability of death by 5 years at {p:.2f}.",
)
_RISK = (
    "Genes that raise the risk: {genes}.",
    "Adverse genes: {genes}.",
    "These genes push the risk up: {genes}.",
)
_PROT = (
    "Genes that lower the risk: {genes}.",
    "Protective genes: {genes}.",
    "These genes push the risk down: {genes}.",
)
_SLIDE = (
    "The slide model gives a probability of {p:.2f}.",
    "On the H&E slide, the slide model estimates {p:.2f}.",
)
_ATTN = (
    "The top {f:.0%} of patches hold {s:.2f} of the attention ({how}).",
    "Attention is {how}: {s:.2f} of it falls on the top {f:.0%} of patches.",
)
_MORPH = (
    "The most attended patches show {name} at {ratio:.2f} times the slide average.",
    "In the most attended regions, {name} is {ratio:.2f} x the slide average.",
)
_MISSING = {
    "slide": ("No slide image is available.", "There is no H&E slide for this patient."),
    "omics": ("No expression profile is available.", "There is no gene expression data for this patient."),
}
_CLOSE_DEATH = (
    "Taken together, the evidence points to a high risk.",
    "Overall, the findings are unfavourable.",
    "On balance, the risk of death within 5 years is elevated.",
)
_CLOSE_ALIVE = (
    "Taken together, the evidence points to a lower risk.",
    "Overall, the findings are favourable.",
    "On balance, survival beyond 5 years is the likelier outcome.",
)


#: the closing sentence of each phrasing, as (death, alive) pairs: the verdict the prediction line follows
CLOSINGS = tuple(zip(_CLOSE_DEATH, _CLOSE_ALIVE, strict=True))


def _gene(x: dict) -> str:
    bits = gene_facts(x)
    return f"{x['gene']} ({', '.join(bits)})" if bits else x["gene"]


def render_target(ev: dict, *, death: bool, risk: float, seed: int | str = 0) -> str:
    """An explanation of ``ev`` ending in the prediction line for (``death``, ``risk``)."""
    rnd = random.Random(f"{seed}")
    pick = rnd.choice
    out = [pick(_INTRO).format(ct=ev["cancer_type"])]
    if ev.get("omics_prob") is not None:
        out.append(pick(_OMICS).format(p=ev["omics_prob"]))
    if ev.get("risk_genes"):
        out.append(pick(_RISK).format(genes="; ".join(_gene(x) for x in ev["risk_genes"])))
    if ev.get("protective_genes"):
        out.append(pick(_PROT).format(genes="; ".join(_gene(x) for x in ev["protective_genes"])))
    if ev.get("slide_prob") is not None:
        out.append(pick(_SLIDE).format(p=ev["slide_prob"]))
    img = ev.get("image")
    if img and img.get("top_share") is not None:
        f = img["top_fraction"]
        how = "concentrated" if img["top_share"] >= 2 * f else "spread out"
        out.append(pick(_ATTN).format(f=f, s=img["top_share"], how=how))
        for finding in img.get("findings", [])[:2]:
            out.append(pick(_MORPH).format(name=finding["name"], ratio=finding["ratio"]))
    for m in ev.get("missing", []):
        if m in _MISSING:
            out.append(pick(_MISSING[m]))
    out.append(pick(_CLOSE_DEATH if death else _CLOSE_ALIVE))
    return " ".join(out) + "\n" + format_prediction(death, risk)


def draft_texts(ev: dict, phrasings: int = 10) -> list[str]:
    """The reasoning parts (no prediction line) of ``ev``'s explanations in ``phrasings`` seeded phrasings
    and both outcomes: the draft source of speculative decoding (:func:`oncofm.fusion.generate.greedy_lookup`).
    Drafts are only proposals, checked token by token against the LLM's own greedy choice."""
    out: list[str] = []
    for seed in range(phrasings):
        for death in (True, False):
            text = render_target(ev, death=death, risk=0.5, seed=seed).rsplit("\n", 1)[0]
            if text not in out:
                out.append(text)
    return out
