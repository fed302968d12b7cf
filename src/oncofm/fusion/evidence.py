"""The evidence record of one patient: what an explanation may say, built by ONE function from the
predictors' results — at training time (the reasoning dataset) and for a new patient (``explain``) alike.

:func:`build_evidence` takes an :class:`~oncofm.omics.predict.OmicsResult` and a
:class:`~oncofm.pathology.predict.SlideResult` (either may be absent) with the slide's
:class:`~oncofm.pathology.predict.PatchSummary`, and :class:`EvidenceSettings` (how many genes, which
share of patches counts as "top"): the settings are saved with the reasoning dataset and the fusion model
and read back at inference, so a new patient's record is built exactly as the training records were.

What the record holds (faithfulness is measured against it): cancer type and age; the omics model's
probability; the top risk and protective genes (by the omics model's signed attribution) with their
normalised expression z-score, the sign of their Cox coefficient in the patient's cancer type (the
pan-cancer coefficient for a type unseen in training) and its FDR q-value; the slide model's
probability; image findings from the most attended patches (how concentrated the attention is, their
morphometrics against the slide's average) or, when the slide branch is the slide-feature model
(:mod:`oncofm.pathology.feature_model`), the whole-slide image features behind its prediction (the largest
integrated-gradient attributions of each sign, in words, with the patient's percentile within its cancer
type); for a multi-omics model, the genomic alterations behind its prediction (copy-number changes and
mutations with the largest attributions of each sign, each with its state, Cox sign and q in the patient's
cancer type); and which modalities are missing.

:class:`Evidence` renders the LLM prompt (:meth:`Evidence.prompt`) and lists the numbers a checker may
find in a text (:meth:`Evidence.numbers`); :meth:`Evidence.to_dict` is the JSON form stored in
``reasoning/dataset.jsonl`` and ``explanation.json`` (docs/CONTRACTS.md).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from oncofm.omics.predict import OmicsResult
    from oncofm.pathology.predict import PatchSummary, SlideResult

__all__ = ["Evidence", "EvidenceSettings", "MORPH_FEATURES", "SIGNIFICANCE_Q", "attention_concentration",
           "alteration_evidence", "alteration_facts", "alteration_phrase", "alteration_state", "ALTERATION_RE", "ALTERATION_STATES",
           "build_evidence", "cox_agrees", "evidence_numbers", "evidence_prompt", "gene_facts",
           "image_feature_evidence", "ordinal", "percentile_phrase", "significance"]

MORPH_FEATURES = {"nuclei_density": "nuclear density", "hematoxylin_od": "hematoxylin stain",
                  "eosin_od": "eosin stain", "tissue_fraction": "tissue cover"}
#: the cell model's measures an explanation may cite (oncofm.pathology.cells.findings), in words
CELL_MEASURES = {"inflammatory_density": "density of inflammatory cells",
                 "epithelial_fraction": "share of tumour (epithelial) cells",
                 "stromal_fraction": "share of stromal cells"}


#: the words of an alteration's state by layer and level (copy number: GISTIC-thresholded levels, as tcga13)
ALTERATION_STATES: dict[str, dict[int, str]] = {
    "mutation": {1: "mutated", 0: "wild-type"},
    "cnv": {2: "amplification", 1: "copy-number gain", 0: "no copy-number change", -1: "shallow deletion",
            -2: "deep deletion"},
}


#: a stated alteration in a text: gene symbol, state word (``mutated``, ``deep deletion``, synonyms), and the
#: parenthesised facts after it (the checker's rules ``alteration_not_in_evidence`` / ``alteration_wrong``)
ALTERATION_RE = re.compile(
    r"\b([A-Z][A-Z0-9]*(?:[.-][A-Z0-9]+)*)\s+(?i:(deep deletion|shallow deletion|copy[- ]number gain|copy[- ]number "
    r"loss|no copy[- ]number change|amplification|amplified|deletion|deleted|gain|loss|mutated|mutation|mutant|"
    r"wild[- ]type))\b(\s*\([^()]*\))?")


class EvidenceSettings(BaseModel):
    """How an evidence record is built; saved with the reasoning dataset and the fusion model."""

    model_config = ConfigDict(extra="forbid")

    top_genes: int = Field(3, ge=1, le=10, description="risk genes and protective genes per patient")
    gene_rule: Literal["consistent", "attribution"] = Field(
        "consistent", description="consistent: cite the genes with the largest attributions among those whose "
        "direction agrees with the univariate Cox evidence, sign(z x coef) (genes without a Cox coefficient or "
        "z-score count as agreeing); attribution: the largest attributions, whatever the Cox evidence says")
    top_fraction: float = Field(0.1, gt=0, le=1, description="share of patches whose attention share is stated")
    top_patches: int = Field(8, ge=1, description="most attended patches summarised as image findings")
    sample_patches: int = Field(32, ge=1, description="patches sampled as the slide's reference morphometrics")
    seed: int = Field(0, description="seed of the reference-patch sample")
    top_image_features: int = Field(2, ge=0, le=10, description="whole-slide image features cited per direction "
                                    "(slide-feature model: the largest attributions that raise / lower the risk)")
    top_alterations: int = Field(2, ge=0, le=10, description="genomic alterations (copy number, mutations) cited "
                                 "per direction (a multi-omics model: the largest attributions that raise / lower "
                                 "the risk, under gene_rule)")
    min_alteration_attribution: float = Field(0.01, ge=0, description="smallest |attribution| (logit) of a cited "
                                              "alteration: most altered features move this model's logit by "
                                              "less than 0.001 (tcga13 median 0.0003), too little to state")


@dataclass
class Evidence:
    """One patient's evidence record (genes as ``{gene, z, cox, q, attribution}``; image as
    ``{n_patches, top_fraction, top_share, findings: [{feature, name, top, slide, ratio}]}``)."""

    cancer_type: str
    age: float | None = None
    #: AJCC stage (1-4) and histological grade (1-4) when known (the cohort's clinical record or the user's input)
    stage: int | None = None
    grade: int | None = None
    omics_prob: float | None = None
    risk_genes: list[dict[str, Any]] = field(default_factory=list)
    protective_genes: list[dict[str, Any]] = field(default_factory=list)
    slide_prob: float | None = None
    image: dict[str, Any] | None = None
    missing: list[str] = field(default_factory=list)
    #: "patches" (attention MIL on the slide's patches) or "features" (slide-level image features); None: no slide
    slide_source: str | None = None
    #: whole-slide image features as ``{feature, name, effect: raises|lowers, percentile, reference, value,
    #: attribution}`` (slide-feature model only)
    image_features: list[dict[str, Any]] = field(default_factory=list)
    #: genomic alterations as ``{layer: cnv|mutation, gene, state, level, cox, q, effect: raises|lowers,
    #: attribution}`` (a multi-omics model only)
    alterations: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> Evidence:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in record.items() if k in known})

    def prompt(self) -> str:
        """The compact text the LLM reads in its prompt."""
        return evidence_prompt(self.to_dict())

    def numbers(self) -> list[float]:
        """Every number in the record (a text may state only these)."""
        return evidence_numbers(self.to_dict())

    @property
    def genes(self) -> list[str]:
        return [g["gene"] for g in self.risk_genes + self.protective_genes]


def _r(x: Any, nd: int = 2) -> float | None:
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) or math.isinf(x) else round(x, nd)


def _gene_rows(table: pd.DataFrame) -> list[dict[str, Any]]:
    out = []
    for row in table.itertuples(index=False):
        coef = float(getattr(row, "coef", float("nan")))
        q = float(getattr(row, "q", float("nan")))
        out.append({"gene": str(row.gene), "z": _r(getattr(row, "expression_z", float("nan")), 1),
                    "cox": None if math.isnan(coef) else ("+" if coef > 0 else "-"),
                    "q": None if math.isnan(q) else float(f"{q:.2g}"), "attribution": _r(row.attribution, 4)})
    return out


def cox_agrees(table: pd.DataFrame) -> pd.Series:
    """Per row: does the sign of the model's attribution agree with the univariate Cox direction
    sign(z × coef)? Rows without a finite z, coefficient or attribution count as agreeing (nothing to
    contradict)."""
    a = table["attribution"].to_numpy(float)
    zc = (table["expression_z"].to_numpy(float) * table["coef"].to_numpy(float) if {"expression_z", "coef"} <=
          set(table.columns) else np.full(len(table), np.nan))
    known = np.isfinite(zc) & (zc != 0) & np.isfinite(a) & (a != 0)
    return pd.Series(~known | (np.sign(a) == np.sign(zc)), index=table.index)


def gene_evidence(attributions: pd.DataFrame, top: int, rule: str = "consistent") -> tuple[list[dict], list[dict]]:
    """Top ``top`` risk (attribution > 0) and protective (< 0) genes of one patient.

    ``attributions``: the omics result's table (``gene, attribution, expression_z, coef, q``). With ``rule``
    ``consistent`` only genes whose attribution agrees with :func:`cox_agrees` are cited, so the direction a
    text states for a gene (its contribution to this prediction) never contradicts the univariate evidence
    printed beside it; no gene is in both lists.
    """
    att = attributions.dropna(subset=["attribution"]).drop_duplicates("gene")
    if rule == "consistent":
        att = att[cox_agrees(att)]
    att = att.sort_values("attribution", kind="stable")
    risk = att[att["attribution"] > 0].iloc[::-1].head(top)
    prot = att[att["attribution"] < 0].head(top)
    return _gene_rows(risk), _gene_rows(prot)


def attention_concentration(attention: np.ndarray, top_fraction: float = 0.1) -> float:
    """Share of the attention held by the top ``top_fraction`` of patches (uniform attention = fraction)."""
    a = np.sort(np.asarray(attention, dtype=float))[::-1]
    k = max(1, int(round(top_fraction * len(a))))
    return float(a[:k].sum() / max(a.sum(), 1e-12))


def _attended_is_the_slide(summary: PatchSummary, n_patches: int | None) -> bool:
    """The attended patches are half the slide's ``n_patches`` or more: "x times the slide average" says nothing."""
    return n_patches is not None and 2 * len(summary.patches) > n_patches


def morphometric_findings(summary: PatchSummary | None, n_patches: int | None = None) -> list[dict[str, Any]]:
    """The most attended patches' mean morphometrics against the slide's, for :data:`MORPH_FEATURES`.

    None when the attended patches are half the slide's ``n_patches`` or more: they are then (nearly) the
    slide itself, and "x times the slide average" would say nothing."""
    if summary is None or not summary.patches or _attended_is_the_slide(summary, n_patches):
        return []
    top = {k: float(np.mean([p.morphometrics[k] for p in summary.patches])) for k in summary.patches[0].morphometrics}
    out = []
    for key, name in MORPH_FEATURES.items():
        ref = summary.slide_mean.get(key)
        if key in top and ref is not None and np.isfinite(ref) and ref > 1e-9 and np.isfinite(top[key]):
            out.append({"feature": key, "name": name, "top": _r(top[key], 3), "slide": _r(ref, 3),
                        "ratio": _r(top[key] / ref, 2)})
    return out


def image_feature_evidence(attributions: pd.DataFrame, top: int, reference: str) -> list[dict[str, Any]]:
    """The ``top`` largest positive and the ``top`` largest negative attributions of a slide-feature result
    (``feature, name, value, percentile, attribution``), risk-raising first, each with its percentile
    within ``reference`` (the cancer type, or ``all``), rounded to a whole number between 1 and 99."""
    if top <= 0 or attributions is None or len(attributions) == 0:
        return []
    att = attributions.dropna(subset=["attribution"]).sort_values("attribution", kind="stable")
    up = att[att["attribution"] > 0].iloc[::-1].head(top)
    down = att[att["attribution"] < 0].head(top)
    out = []
    for effect, rows in (("raises", up), ("lowers", down)):
        for row in rows.itertuples(index=False):
            pct = float(row.percentile)
            out.append({"feature": str(row.feature), "name": str(row.name), "effect": effect,
                        # whole numbers 1-99: "0th" / "100th percentile" read as impossible
                        "percentile": None if math.isnan(pct) else int(min(99, max(1, round(pct)))),
                        "reference": reference,
                        "value": None if pd.isna(row.value) else float(f"{float(row.value):.3g}"),
                        "attribution": _r(row.attribution, 4)})
    return out


def alteration_state(layer: str, value: float) -> str:
    """An alteration's state in words: ``mutated``, ``deep deletion``, ...; copy-number values that are not a
    thresholded level read ``copy-number gain`` / ``copy-number loss`` by sign."""
    level = round(float(value))
    states = ALTERATION_STATES.get(layer, {})
    if abs(float(value) - level) < 1e-6 and level in states:
        return states[level]
    if layer == "cnv":
        return "copy-number gain" if value > 0 else "copy-number loss"
    return f"{layer} {value:g}"


def alteration_evidence(layer_inputs: pd.DataFrame | None, top: int, rule: str = "consistent",
                        min_attribution: float = 0.0) -> list[dict[str, Any]]:
    """The genomic alterations an explanation cites: the ``top`` largest attributions that raise the risk and
    the ``top`` that lower it, over the CNV and mutation layers of ``layer_inputs`` (``layer, feature, value,
    coef, q, attribution``: :attr:`~oncofm.omics.predict.OmicsResult.layer_inputs`). Unmeasured and unaltered
    values (attribution 0: wild-type, no copy-number change) are never cited, nor those with |attribution| below
    ``min_attribution``; under rule ``consistent`` only those whose direction agrees with the univariate Cox
    evidence, sign(level x coef), as for genes."""
    if layer_inputs is None or top < 1 or not len(layer_inputs) or "attribution" not in layer_inputs:
        return []
    value = layer_inputs["value"].to_numpy(float)
    att = layer_inputs["attribution"].to_numpy(float)
    keep = np.isfinite(value) & np.isfinite(att) & (value != 0)
    t = layer_inputs[keep & (np.abs(np.nan_to_num(att)) > 0) & (np.abs(np.nan_to_num(att)) >= min_attribution)].copy()
    if rule == "consistent":
        t = t[cox_agrees(t.rename(columns={"value": "expression_z"}))]
    out = []
    for effect, part in (("raises", t[t["attribution"] > 0].sort_values("attribution", ascending=False,
                                                                          kind="stable")),
                         ("lowers", t[t["attribution"] < 0].sort_values("attribution", kind="stable"))):
        for row in part.head(top).itertuples(index=False):
            coef, q = float(row.coef), float(row.q)
            out.append({"layer": str(row.layer), "gene": str(row.feature),
                        "state": alteration_state(str(row.layer), float(row.value)),
                        "level": _r(row.value, 2) if row.layer == "cnv" else None,
                        "cox": None if math.isnan(coef) else ("+" if coef > 0 else "-"),
                        "q": None if math.isnan(q) else float(f"{q:.2g}"), "effect": effect,
                        "attribution": _r(row.attribution, 4)})
    return out


def clinical_level(value: Any, kind: Literal["stage", "grade"]) -> int | None:
    """A stage or grade as 1-4 from a number or text ("Stage IIIA", "G3": :mod:`oncofm.cohort.clinical`'s
    mapping); None when unknown."""
    from oncofm.cohort.clinical import parse_grade, parse_stage

    if value is None:
        return None
    if isinstance(value, str):
        value = (parse_stage if kind == "stage" else parse_grade)(value)
    if value is None or pd.isna(value):
        return None
    level = int(round(float(value)))
    return level if 1 <= level <= 4 else None


def cell_evidence(summary: PatchSummary | None, n_patches: int | None = None) -> list[dict[str, Any]]:
    """The cell model's measures of the most attended patches against the slide (:data:`CELL_MEASURES`, those
    with a ratio), under the rule of :func:`morphometric_findings` (nothing when the top patches are half the
    slide or more)."""
    cells = getattr(summary, "cells", None)
    if not cells or summary is None or not summary.patches or _attended_is_the_slide(summary, n_patches):
        return []
    out = []
    for key, name in CELL_MEASURES.items():
        m = cells.get(key)
        if m is not None and m.get("ratio") is not None and np.isfinite(m["ratio"]):
            out.append({"measure": key, "name": name, "top": _r(m["top"], 3), "slide": _r(m["slide"], 3),
                        "ratio": _r(m["ratio"], 2)})
    return out


def build_evidence(cancer_type: str, age: float | None, omics: OmicsResult | None, slide: SlideResult | None,
                   patches: PatchSummary | None, settings: EvidenceSettings, *, stage: Any = None,
                   grade: Any = None) -> Evidence:
    """The evidence record from the predictors' results (the one builder; see the module docstring).
    ``stage`` / ``grade``: the patient's clinical record (1-4, text, or None)."""
    ev = Evidence(cancer_type=str(cancer_type), age=None if age is None or pd.isna(age) else float(age),
                  stage=clinical_level(stage, "stage"), grade=clinical_level(grade, "grade"))
    if omics is None:
        ev.missing.append("omics")
    else:
        ev.omics_prob = _r(omics.prob, 2)
        ev.risk_genes, ev.protective_genes = gene_evidence(omics.attributions, settings.top_genes,
                                                           settings.gene_rule)
        ev.alterations = alteration_evidence(getattr(omics, "layer_inputs", None), settings.top_alterations,
                                             settings.gene_rule, settings.min_alteration_attribution)
    if slide is None:
        ev.missing.append("slide")
    elif hasattr(slide, "attributions"):  # the slide-feature model: features in words, no patches
        ev.slide_prob = _r(slide.prob, 2)
        ev.slide_source = "features"
        ref = getattr(slide, "reference_type", "") or str(cancer_type)
        ev.image_features = image_feature_evidence(slide.attributions, settings.top_image_features, ref)
    else:
        ev.slide_prob = _r(slide.prob, 2)
        ev.slide_source = "patches"
        if len(slide.attention):  # no attention stored: the probability alone, no image findings
            ev.image = {"n_patches": int(len(slide.attention)), "top_fraction": settings.top_fraction,
                        "top_share": _r(attention_concentration(slide.attention, settings.top_fraction), 2),
                        "findings": morphometric_findings(patches, len(slide.attention))}
            if cells := cell_evidence(patches, len(slide.attention)):
                ev.image["cells"] = cells
    return ev


#: stage numbers in words
STAGE_WORDS = {1: "I", 2: "II", 3: "III", 4: "IV"}


def clinical_phrase(ev: dict) -> str | None:
    """``stage III, grade 2`` (the parts known), or None when neither is."""
    parts = []
    if ev.get("stage") is not None:
        parts.append(f"stage {STAGE_WORDS[int(ev['stage'])]}")
    if ev.get("grade") is not None:
        parts.append(f"grade {int(ev['grade'])}")
    return ", ".join(parts) or None


def _cox_facts(x: dict) -> list[str]:
    """The univariate Cox facts of a cited gene or alteration: sign, FDR q and its significance word."""
    facts = [f"Cox {x['cox']}"] if x.get("cox") else []
    if x.get("q") is not None:
        facts += [f"q {x['q']:.2g}", significance(x["q"])]
    return facts


def gene_facts(x: dict) -> list[str]:
    """The facts of one gene in an evidence record, as text: z-score, Cox sign, FDR q (those present)."""
    return ([f"z {x['z']:+.1f}"] if x.get("z") is not None else []) + _cox_facts(x)


def alteration_facts(x: dict) -> list[str]:
    """The facts of one cited alteration, as text: the copy-number level, Cox sign, FDR q (those present)."""
    return ([f"level {x['level']:+g}"] if x.get("level") is not None else []) + _cox_facts(x)


def alteration_phrase(x: dict) -> str:
    """``TP53 mutated (Cox +, q 0.01, significant)``; ``CDKN2A deep deletion (level -2, Cox -, q 0.001, ...)``."""
    facts = alteration_facts(x)
    return f"{x['gene']} {x['state']}" + (f" ({', '.join(facts)})" if facts else "")


#: FDR below which a gene's Cox association is called significant in the text
SIGNIFICANCE_Q = 0.05


def significance(q: float) -> str:
    """``significant`` (q < :data:`SIGNIFICANCE_Q`) or ``not significant``: the word beside each q."""
    return "significant" if q < SIGNIFICANCE_Q else "not significant"


def evidence_prompt(ev: dict) -> str:
    """The evidence record (its dict form) as the compact text the LLM reads in its prompt."""
    lines = [f"Cancer type: {ev['cancer_type']}"]
    if ev.get("age") is not None:
        lines.append(f"Age: {ev['age']:.0f}")
    if (clin := clinical_phrase(ev)) is not None:
        lines.append(f"Clinical: {clin}")
    if ev.get("omics_prob") is not None:
        lines.append(f"Omics model probability: {ev['omics_prob']:.2f}")

    def g(x: dict) -> str:
        return " ".join([x["gene"], *gene_facts(x)])

    if ev.get("risk_genes"):
        lines.append("Risk genes: " + "; ".join(g(x) for x in ev["risk_genes"]))
    if ev.get("protective_genes"):
        lines.append("Protective genes: " + "; ".join(g(x) for x in ev["protective_genes"]))
    lines += _cited_lines(ev, "alterations", "Alterations", alteration_phrase)
    if ev.get("slide_prob") is not None:
        lines.append(f"Slide model probability: {ev['slide_prob']:.2f}")
    img = ev.get("image")
    if img:
        lines.append(f"Top {img['top_fraction']:.0%} of patches hold {img['top_share']:.2f} of attention")
        for f in img.get("findings", []):
            lines.append(f"Attended patches {f['name']}: {f['ratio']:.2f} x slide average")
        for c in img.get("cells", []):
            lines.append(f"Cell model, attended patches {c['name']}: {c['ratio']:.2f} x slide average")
    lines += _cited_lines(ev, "image_features", "Image features", lambda f: f"{f['name']} ({percentile_phrase(f)})")
    if ev.get("missing"):
        lines.append("Missing: " + ", ".join(ev["missing"]))
    return "\n".join(lines)


def _cited_lines(ev: dict, key: str, what: str, phrase: Any) -> list[str]:
    """``<what> that raise the risk: a; b`` and ``... lower the risk: ...`` for the cited items of ``ev[key]``."""
    out = []
    for effect in ("raises", "lowers"):
        cited = [x for x in ev.get(key) or [] if x["effect"] == effect]
        if cited:
            out.append(f"{what} that {effect[:-1]} the risk: " + "; ".join(phrase(x) for x in cited))
    return out


def ordinal(n: int) -> str:
    """``1`` → ``1st``, ``22`` → ``22nd``, ``13`` → ``13th``."""
    n = int(n)
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def percentile_phrase(finding: dict) -> str:
    """``92nd percentile of LUAD patients`` (``of all training patients`` for the pooled reference);
    ``value missing`` without a percentile."""
    if finding.get("percentile") is None:
        return "value missing"
    ref = finding.get("reference") or "all"
    who = "all training patients" if ref == "all" else f"{ref} patients"
    return f"{ordinal(finding['percentile'])} percentile of {who}"


def evidence_numbers(ev: dict) -> list[float]:
    """Every number in an evidence record (for the faithfulness check of free numbers)."""
    out: list[float] = []

    def walk(x: Any) -> None:
        if isinstance(x, bool) or x is None:
            return
        if isinstance(x, int | float):
            if not (isinstance(x, float) and math.isnan(x)):
                out.append(float(x))
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list | tuple):
            for v in x:
                walk(v)

    walk(ev)
    return out
