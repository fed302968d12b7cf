"""Target texts written from an evidence record by templates with several phrasings.

Each text states only what the evidence record holds (genes, directions, z-scores, Cox signs, q-values,
genomic alterations, probabilities, image findings, missing modalities) and ends in exactly one prediction line (see
:mod:`oncofm.fusion.parse`). The phrasing is drawn per patient from a seeded generator, so the same
record always gives the same text.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from oncofm.fusion.evidence import alteration_phrase, clinical_phrase, gene_facts, percentile_phrase
from oncofm.fusion.parse import format_prediction

__all__ = ["render_target", "draft_texts", "slot_options", "evidence_summary", "RISK_WORDS", "PROTECTIVE_WORDS",
           "CLOSINGS"]

# Keywords that mark a clause's direction (used by the faithfulness check as well).
RISK_WORDS = ("raise", "raises", "push the risk up", "point towards death", "adverse", "unfavourable")
PROTECTIVE_WORDS = ("lower", "lowers", "push the risk down", "point towards survival", "protective",
                    "favourable")

_INTRO = (
    "This is a {ct} patient.",
    "The patient has {ct}.",
    "Cancer type: {ct}.",
)
_CLINICAL = (
    "Clinical record: {clin}.",
    "The tumour is {clin}.",
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
_ALT_RISK = (
    "Genomic alterations that raise the risk: {items}.",
    "These alterations push the risk up: {items}.",
)
_ALT_PROT = (
    "Genomic alterations that lower the risk: {items}.",
    "These alterations push the risk down: {items}.",
)
_SLIDE = (
    "The slide model gives a probability of {p:.2f}.",
    "On the H&E slide, the slide model estimates {p:.2f}.",
)
_SLIDE_FEATURES = (
    "From the whole-slide image features, the slide model gives a probability of {p:.2f}.",
    "The slide model, on whole-slide image features, estimates {p:.2f}.",
)
_IMAGE_RISK = (
    "Image features that raise the risk: {items}.",
    "On the slide, these findings push the risk up: {items}.",
)
_IMAGE_PROT = (
    "Image features that lower the risk: {items}.",
    "On the slide, these findings push the risk down: {items}.",
)
_ATTN = (
    "The top {f:.0%} of patches hold {s:.2f} of the attention ({how}).",
    "Attention is {how}: {s:.2f} of it falls on the top {f:.0%} of patches.",
)
_ATTN_ONE = (
    "The single most attended of the {n} patches holds {s:.2f} of the attention ({how}).",
    "Attention is {how}: the most attended of the {n} patches holds {s:.2f} of it.",
)
_MORPH = (
    "The most attended patches show {name} at {ratio:.2f} times the slide average.",
    "In the most attended regions, {name} is {ratio:.2f} x the slide average.",
)
_CELLS = (
    "Against the slide as a whole, the cell model estimates these regions' {items}.",
    "The cell model puts these regions' {items}, each against the whole slide.",
)
_COMBINE_AGREE = (
    "Both models point the same way (omics {o:.2f}, slide {s:.2f}); the risk below combines them.",
    "The omics model ({o:.2f}) and the slide model ({s:.2f}) agree; the risk below combines them.",
)
_COMBINE_DISAGREE = (
    "The two models disagree (omics {o:.2f}, slide {s:.2f}); the risk below weighs both.",
    "The omics model ({o:.2f}) and the slide model ({s:.2f}) disagree; the risk below weighs both.",
)
_COMBINE_ONE = (
    "The risk below rests on the {m} model alone ({p:.2f}).",
    "Only the {m} model informs the risk below ({p:.2f}).",
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


def uniform_share(n_patches: int, top_fraction: float) -> float:
    """The attention share the top ``top_fraction`` of ``n_patches`` would hold under uniform attention (the
    top k = max(1, round(fraction × n)) patches of n); "concentrated" means at least twice that."""
    n = max(int(n_patches), 1)
    return max(1, int(round(top_fraction * n))) / n


def _gene(x: dict) -> str:
    bits = gene_facts(x)
    return f"{x['gene']} ({', '.join(bits)})" if bits else x["gene"]


def _cited_slots(ev: dict, key: str, phrasings: tuple[tuple[str, ...], tuple[str, ...]],
                 phrase: Callable[[dict], str]) -> list[tuple[str, ...]]:
    """The slots of the cited items of ``ev[key]`` that raise, then lower the risk (``{items}`` in the
    phrasings: the items, ``; ``-separated)."""
    out = []
    for effect, options in zip(("raises", "lowers"), phrasings, strict=True):
        cited = [x for x in ev.get(key) or [] if x["effect"] == effect]
        if cited:
            items = "; ".join(phrase(x) for x in cited)
            out.append(tuple(t.format(items=items) for t in options))
    return out


def slot_options(ev: dict) -> list[tuple[str, ...]]:
    """The reasoning of an explanation of ``ev`` as slots, each with its alternative sentences (the closing
    verdict and the prediction line excluded). Every sentence states only facts of the record; the slots come
    in a fixed order. One grammar for the training targets (:func:`render_target` picks one phrasing per
    slot), the drafts of speculative decoding and the structured decoder (the LLM picks per slot)."""
    slots: list[tuple[str, ...]] = [tuple(t.format(ct=ev["cancer_type"]) for t in _INTRO)]
    if (clin := clinical_phrase(ev)) is not None:
        slots.append(tuple(t.format(clin=clin) for t in _CLINICAL))
    if ev.get("omics_prob") is not None:
        slots.append(tuple(t.format(p=ev["omics_prob"]) for t in _OMICS))
    if ev.get("risk_genes"):
        genes = "; ".join(_gene(x) for x in ev["risk_genes"])
        slots.append(tuple(t.format(genes=genes) for t in _RISK))
    if ev.get("protective_genes"):
        genes = "; ".join(_gene(x) for x in ev["protective_genes"])
        slots.append(tuple(t.format(genes=genes) for t in _PROT))
    slots += _cited_slots(ev, "alterations", (_ALT_RISK, _ALT_PROT), alteration_phrase)
    if ev.get("slide_prob") is not None:
        phrasings = _SLIDE_FEATURES if ev.get("slide_source") == "features" else _SLIDE
        slots.append(tuple(t.format(p=ev["slide_prob"]) for t in phrasings))
    slots += _cited_slots(ev, "image_features", (_IMAGE_RISK, _IMAGE_PROT),
                          lambda f: f"{f['name']} ({percentile_phrase(f)})")
    img = ev.get("image")
    if img and img.get("top_share") is not None:
        f = img["top_fraction"]
        how = "concentrated" if img["top_share"] >= 2 * uniform_share(img["n_patches"], f) else "spread out"
        # "the top 10%" of a slide with few patches is one patch: say so
        one = max(1, int(round(f * img["n_patches"]))) == 1
        slots.append(tuple(t.format(f=f, s=img["top_share"], how=how, n=img["n_patches"])
                           for t in (_ATTN_ONE if one else _ATTN)))
        for finding in img.get("findings", [])[:2]:
            slots.append(tuple(t.format(name=finding["name"], ratio=finding["ratio"]) for t in _MORPH))
        if img.get("cells"):  # one sentence for all measures (three alike would read as a loop)
            parts = [f"{c['name']} at {c['ratio']:.2f} times" for c in img["cells"]]
            items = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
            slots.append(tuple(t.format(items=items) for t in _CELLS))
    for m in ev.get("missing", []):
        if m in _MISSING:
            slots.append(_MISSING[m])
    o, sl = ev.get("omics_prob"), ev.get("slide_prob")
    if o is not None and sl is not None:
        same = (o >= 0.5) == (sl >= 0.5)
        slots.append(tuple(t.format(o=o, s=sl) for t in (_COMBINE_AGREE if same else _COMBINE_DISAGREE)))
    elif o is not None or sl is not None:
        slots.append(tuple(t.format(m="omics" if o is not None else "slide", p=o if o is not None else sl)
                           for t in _COMBINE_ONE))
    return slots


def render_target(ev: dict, *, death: bool, risk: float, seed: int | str = 0) -> str:
    """An explanation of ``ev`` ending in the prediction line for (``death``, ``risk``)."""
    rnd = random.Random(f"{seed}")
    out = [rnd.choice(options) for options in slot_options(ev)]
    out.append(rnd.choice(_CLOSE_DEATH if death else _CLOSE_ALIVE))
    return " ".join(out) + "\n" + format_prediction(death, risk)


def evidence_summary(ev: dict) -> str:
    """The evidence record in plain sentences, rendered deterministically (the first phrasing of every slot,
    no verdict): what the report shows beside an explanation that failed the checker."""
    return " ".join(options[0] for options in slot_options(ev))


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
