"""The evidence record of one patient: what the explanation may say, computed from the run's artifacts.

Everything an explanation states must come from here (faithfulness is measured against it):
cancer type; the omics model's probability; the top risk and protective genes (by the omics model's
signed attribution) with their normalised expression z-score, the sign of their Cox coefficient in the
patient's cancer type and its FDR q-value; the slide model's probability; image findings from the most
attended patches (how concentrated the attention is, their morphometrics against the slide's average);
and which modalities are missing.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from oncofm.paths import RunLayout

log = logging.getLogger(__name__)

__all__ = ["gene_evidence", "image_findings", "evidence_prompt", "evidence_numbers", "MORPH_FEATURES"]

MORPH_FEATURES = {"nuclei_density": "nuclear density", "hematoxylin_od": "hematoxylin stain",
                  "eosin_od": "eosin stain", "tissue_fraction": "tissue cover"}


def _r(x: Any, nd: int = 2) -> float | None:
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) or math.isinf(x) else round(x, nd)


def cox_lookup(coefficients: pd.DataFrame | None, horizon_years: float = 5.0) -> dict[tuple[str, str], tuple[float, float]]:
    """``(cancer_type, gene) -> (coef, q)``; the pan-cancer row is stored under ``("__pan__", gene)``."""
    if coefficients is None or coefficients.empty:
        return {}
    df = coefficients
    if "horizon_years" in df.columns and df["horizon_years"].notna().any():
        hz = df["horizon_years"].astype(float)
        best = hz.iloc[(hz - horizon_years).abs().argsort()].iloc[0]
        df = df[(hz == best) | hz.isna()]
    out: dict[tuple[str, str], tuple[float, float]] = {}
    qs = df["q"] if "q" in df.columns else pd.Series(np.nan, index=df.index)
    for ct, gene, coef, q in zip(df["cancer_type"].astype(str), df["gene"].astype(str), df["coef"], qs,
                                 strict=True):
        out[(ct, gene)] = (float(coef), float(q))
    return out


def gene_evidence(attributions: pd.DataFrame, z: pd.Series, cancer_type: str,
                  cox: dict[tuple[str, str], tuple[float, float]], top: int) -> tuple[list[dict], list[dict]]:
    """Top ``top`` risk (attribution > 0) and protective (< 0) genes of one patient.

    ``attributions``: columns ``gene, attribution`` for this patient; ``z``: normalised expression by gene.
    """
    att = attributions.dropna(subset=["attribution"]).sort_values("attribution")
    risk = att[att["attribution"] > 0].iloc[::-1].head(top)
    prot = att[att["attribution"] < 0].head(top)

    def rows(df: pd.DataFrame) -> list[dict]:
        out = []
        for gene, a in zip(df["gene"].astype(str), df["attribution"], strict=True):
            coef, q = cox.get((cancer_type, gene), cox.get(("__pan__", gene), (float("nan"), float("nan"))))
            zi = _r(z.get(gene, float("nan")), 1)
            out.append({"gene": gene, "z": zi, "cox": (None if math.isnan(coef) else ("+" if coef > 0 else "-")),
                        "q": None if math.isnan(q) else float(f"{q:.2g}"), "attribution": _r(a, 4)})
        return out

    return rows(risk), rows(prot)


def attention_concentration(attention: np.ndarray, top_fraction: float = 0.1) -> float:
    """Share of the attention held by the top ``top_fraction`` of patches (uniform attention = fraction)."""
    a = np.sort(np.asarray(attention, dtype=float))[::-1]
    k = max(1, int(round(top_fraction * len(a))))
    return float(a[:k].sum() / max(a.sum(), 1e-12))


def image_findings(run: str | Path, slide_stem: str, *, top_k: int = 8, sample: int = 32,
                   top_fraction: float = 0.1, seed: int = 0) -> dict | None:
    """Attention concentration and morphometrics of the ``top_k`` most attended patches vs the slide.

    Reads ``models/slide/attention/<slide_stem>.parquet``; morphometrics need the tiles file
    ``tiles/<slide_stem>.h5`` and the slide itself (skipped, with a log line, when either is missing).
    """
    layout = RunLayout(run)
    att_path = layout.model_dir("slide") / "attention" / f"{slide_stem}.parquet"
    if not att_path.exists():
        return None
    att = pd.read_parquet(att_path)
    if att.empty:
        return None
    out: dict[str, Any] = {"n_patches": int(len(att)), "top_fraction": top_fraction,
                           "top_share": _r(attention_concentration(att["attention"].to_numpy(), top_fraction), 2),
                           "findings": []}
    try:
        out["findings"] = _morphometric_findings(layout, slide_stem, att, top_k, sample, seed)
    except Exception as exc:  # morphometrics are optional evidence: never fail the dataset for them
        log.info("no morphometrics for %s: %s", slide_stem, exc)
    return out


def _morphometric_findings(layout: RunLayout, slide_stem: str, att: pd.DataFrame, top_k: int, sample: int,
                           seed: int) -> list[dict]:
    import h5py

    from oncofm.pathology.morphometrics import patch_morphometrics
    from oncofm.pathology.reader import open_slide

    h5 = layout.tiles_dir / f"{slide_stem}.h5"
    if not h5.exists():
        return []
    with h5py.File(h5, "r") as fh:
        attrs = dict(fh.attrs)
    # the tiler recorded the slide's level-0 mpp (it may come from --slide-mpp, not the file)
    slide = open_slide(str(attrs["slide_path"]), mpp=float(attrs["slide_mpp"]))
    level, size = int(attrs["read_level"]), int(attrs["read_size"])
    read_mpp = float(attrs["slide_mpp"]) * float(attrs["downsample"])  # µm/px of the pixels measured
    order = att.sort_values("attention", ascending=False)
    top = order.head(top_k)
    rng = np.random.default_rng(seed)
    rest = att.iloc[rng.choice(len(att), size=min(sample, len(att)), replace=False)]

    def morph(rows: pd.DataFrame) -> pd.DataFrame:
        vals = [patch_morphometrics(slide.read_region((int(x), int(y)), level, (size, size)), mpp=read_mpp)
                for x, y in zip(rows["x"], rows["y"], strict=True)]
        return pd.DataFrame(vals)

    mt, mr = morph(top).mean(), morph(rest).mean()
    findings = []
    for key, name in MORPH_FEATURES.items():
        if key in mt and key in mr and mr[key] > 1e-9:
            findings.append({"feature": key, "name": name, "top": _r(mt[key], 3), "slide": _r(mr[key], 3),
                             "ratio": _r(mt[key] / mr[key], 2)})
    return findings


def gene_facts(x: dict) -> list[str]:
    """The facts of one gene in an evidence record, as text: z-score, Cox sign, FDR q (those present)."""
    facts = []
    if x.get("z") is not None:
        facts.append(f"z {x['z']:+.1f}")
    if x.get("cox"):
        facts.append(f"Cox {x['cox']}")
    if x.get("q") is not None:
        facts.append(f"q {x['q']:.2g}")
    return facts


def evidence_prompt(ev: dict) -> str:
    """The evidence record as the compact text the LLM reads in its prompt."""
    lines = [f"Cancer type: {ev['cancer_type']}"]
    if ev.get("age") is not None:
        lines.append(f"Age: {ev['age']:.0f}")
    if ev.get("omics_prob") is not None:
        lines.append(f"Omics model probability: {ev['omics_prob']:.2f}")

    def g(x: dict) -> str:
        return " ".join([x["gene"], *gene_facts(x)])

    if ev.get("risk_genes"):
        lines.append("Risk genes: " + "; ".join(g(x) for x in ev["risk_genes"]))
    if ev.get("protective_genes"):
        lines.append("Protective genes: " + "; ".join(g(x) for x in ev["protective_genes"]))
    if ev.get("slide_prob") is not None:
        lines.append(f"Slide model probability: {ev['slide_prob']:.2f}")
    img = ev.get("image")
    if img:
        lines.append(f"Top {img['top_fraction']:.0%} of patches hold {img['top_share']:.2f} of attention")
        for f in img.get("findings", []):
            lines.append(f"Attended patches {f['name']}: {f['ratio']:.2f} x slide average")
    if ev.get("missing"):
        lines.append("Missing: " + ", ".join(ev["missing"]))
    return "\n".join(lines)


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
