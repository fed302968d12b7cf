"""``oncofm compare-modalities --run RUN``: each modality against the fusion, side by side, on one split.

Scores compared on the same patients (the split's patients; AUC on those with a 5-year label, Harrell's
C-index on all, the score as the risk):

- ``omics``: the omics model's probability (``models/omics/predictions.parquet``);
- ``slide``: the slide branch's probability (``models/slide_features`` or ``models/slide``);
- ``fused head``: the logistic head on the fused [omics, slide] embedding (``reasoning/fused_head.parquet``;
  fitted on the training split, its strength chosen on validation);
- ``parsed text``: the risk parsed from the fusion LLM's generated text (``models/fusion/generations.jsonl``,
  written by ``oncofm evaluate-fusion``), on the patients it was generated for (when that is a sample, two more
  groups: the patients with a generated text, and those of them with both modalities).

Three groups: the patients **with both modalities** (pooled and per cancer type), the patients **without the
slide modality** (where the fused head must not lose to omics: the missing-modality path) and **all** the
split's patients. Differences are paired: every bootstrap resample scores both models on the same
patients (:func:`oncofm.survival.metrics.paired_auc_difference`, ``paired_c_index_difference``). The
fused head is compared with the better single modality of each group, chosen by its point AUC on the
group — a comparison, not a selection: nothing here is fitted or tuned.

Writes ``RUN/evaluation/modalities_<split>.json`` and ``.md`` (the table printed).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from oncofm.errors import OncoFMError
from oncofm.paths import RunLayout

log = logging.getLogger(__name__)

__all__ = ["compare_modalities", "format_comparison", "group_comparison"]

MODELS = ("omics", "slide", "fused head", "parsed text")


def _scores(layout: RunLayout, split: str) -> pd.DataFrame:
    """One row per patient of ``split``: cancer type, time, event, label and each model's score (NaN: none)."""
    from oncofm.cohort.importing import load_patients
    from oncofm.cohort.schema import Col, five_year_labels
    from oncofm.fusion.fuse import SLIDE_BRANCHES, reasoning_slide_branch
    from oncofm.fusion.reasoning import HEAD_FILE

    head_path = layout.reasoning_dir / HEAD_FILE
    layout.require(head_path, "Run `oncofm reasoning --run RUN` first (it fits the fused head).")
    head = pd.read_parquet(head_path).set_index("patient_id")
    head = head[head["split"] == split]
    if head.empty:
        raise OncoFMError(f"no patient of the {split!r} split in {head_path}")
    patients = load_patients(layout.root).set_index("patient_id").reindex(head.index)
    out = pd.DataFrame({"cancer_type": patients["cancer_type"].astype(str), "time": patients[Col.OS_DAYS],
                        "event": patients[Col.OS_EVENT].astype(int)}, index=head.index)
    out["label"] = five_year_labels(patients.reset_index()).reindex(head.index).to_numpy()
    out["fused head"] = head["prob"]
    for name, folder in (("omics", "omics"), ("slide", SLIDE_BRANCHES[reasoning_slide_branch(layout.root)])):
        path = layout.model_dir(folder) / "predictions.parquet"
        if path.exists():
            preds = pd.read_parquet(path).groupby("patient_id")["prob"].mean()  # several slides: their mean
            out[name] = preds.reindex(out.index)
        else:
            out[name] = np.nan
    gens = layout.model_dir("fusion") / "generations.jsonl"
    out["parsed text"] = np.nan
    if gens.exists():
        rows = [json.loads(line) for line in gens.read_text().splitlines() if line.strip()]
        risk = {r["patient_id"]: r.get("risk") for r in rows}
        out["parsed text"] = pd.Series(risk, dtype=float).reindex(out.index)
    return out


def group_comparison(frame: pd.DataFrame, n_boot: int, seed: int) -> dict[str, Any]:
    """Every model's AUC (CI) and C-index on ``frame``, and the fused head minus the better single modality."""
    from oncofm.survival.metrics import (
        bootstrap_auc,
        harrell_c_index,
        paired_auc_difference,
        paired_c_index_difference,
    )

    lab = frame["label"].notna().to_numpy()
    y = frame["label"].to_numpy(float)[lab]
    t, e = frame["time"].to_numpy(float), frame["event"].to_numpy(int)
    res: dict[str, Any] = {"n": int(len(frame)), "n_labelled": int(lab.sum()), "n_deaths_5y": int(np.nansum(y)),
                           "models": {}}
    for m in MODELS:
        s = frame[m].to_numpy(float)
        if np.isnan(s).any():  # a model without a score for every patient of the group is not compared here
            continue
        auc, lo, hi = bootstrap_auc(y, s[lab], n_boot=n_boot, seed=seed)
        res["models"][m] = {"auc": auc, "auc_lo": lo, "auc_hi": hi,
                            "c_index": harrell_c_index(t, e, s) if e.any() else float("nan")}
    singles = [m for m in ("omics", "slide") if m in res["models"] and np.isfinite(res["models"][m]["auc"])]
    if "fused head" in res["models"] and singles:
        best = max(singles, key=lambda m: res["models"][m]["auc"])
        fused, ref = frame["fused head"].to_numpy(float), frame[best].to_numpy(float)
        d_auc = paired_auc_difference(y, fused[lab], ref[lab], n_boot=n_boot, seed=seed)
        d_c = paired_c_index_difference(t, e, fused, ref, n_boot=n_boot, seed=seed)
        res["fused_vs_best"] = {"best_single": best, "auc_diff": d_auc, "c_diff": d_c}
    if "parsed text" in res["models"]:
        text, fused = frame["parsed text"].to_numpy(float), frame["fused head"].to_numpy(float)
        res["text_vs_head"] = {"auc_diff": paired_auc_difference(y, text[lab], fused[lab], n_boot=n_boot, seed=seed)}
    return res


def compare_modalities(run: str | Path, *, split: str = "test", n_boot: int = 2000, seed: int = 0,
                       min_type: int = 10) -> dict[str, Any]:
    """The side-by-side comparison (module docstring); writes and returns it."""
    from oncofm.io import write_json, write_text

    layout = RunLayout(run)
    scores = _scores(layout, split)
    both = scores[scores["omics"].notna() & scores["slide"].notna()]
    without = scores[scores["omics"].notna() & scores["slide"].isna()]
    out: dict[str, Any] = {"split": split, "groups": {}}
    if len(both):
        out["groups"]["both modalities"] = group_comparison(both, n_boot, seed)
        out["per_type"] = {ct: group_comparison(g, n_boot, seed) for ct, g in both.groupby("cancer_type")
                           if len(g) >= min_type and g["label"].nunique() == 2}
    if len(without):
        g = without.drop(columns=["slide"]).assign(slide=np.nan)
        out["groups"]["without slide"] = group_comparison(g, n_boot, seed)
    out["groups"]["all"] = group_comparison(scores.assign(slide=np.nan), n_boot, seed)
    texts = scores[scores["parsed text"].notna()]
    if len(texts) and len(texts) < len(scores):  # evaluate-fusion generated for a sample: compare on it
        out["groups"]["with a generated text"] = group_comparison(texts.assign(slide=np.nan), n_boot, seed)
        with_both = texts[texts["slide"].notna()]
        if len(with_both) >= 10 and with_both["label"].nunique() == 2:
            out["groups"]["with a generated text and both modalities"] = group_comparison(with_both, n_boot, seed)
    text = format_comparison(out)
    target = layout.root / "evaluation" / f"modalities_{split}.json"
    write_json(out, target)
    write_text(text + "\n", target.with_suffix(".md"))
    out["paths"] = {"json": str(target), "md": str(target.with_suffix(".md"))}
    return out


def _ci(x: dict[str, Any]) -> str:
    return f"{x['auc']:.3f} [{x['auc_lo']:.3f}, {x['auc_hi']:.3f}]"


def _diff(d: tuple[float, float, float]) -> str:
    return f"{d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}]"


def format_comparison(out: dict[str, Any]) -> str:
    """The comparison as Markdown tables: per group and per cancer type."""
    lines = [f"Split: {out['split']}. AUC of death within 5 years [95% bootstrap CI] on labelled patients; "
             "Harrell's C on all. Differences paired (same patients in every resample).", "",
             "| group | n (labelled, deaths) | model | AUC [95% CI] | C-index |", "|---|---|---|---|---|"]
    rows: list[tuple[str, dict[str, Any]]] = list(out["groups"].items())
    rows += [(f"{ct} (both)", g) for ct, g in (out.get("per_type") or {}).items()]
    for name, g in rows:
        for k, (m, v) in enumerate(g["models"].items()):
            who = f"{name} | {g['n']} ({g['n_labelled']}, {g['n_deaths_5y']})" if k == 0 else " | "
            lines.append(f"| {who} | {m} | {_ci(v)} | {v['c_index']:.3f} |")
    lines += ["", "| group | fused head minus | AUC difference [95% CI] | C-index difference [95% CI] |",
              "|---|---|---|---|"]
    for name, g in rows:
        if "fused_vs_best" in g:
            f = g["fused_vs_best"]
            lines.append(f"| {name} | {f['best_single']} | {_diff(f['auc_diff'])} | {_diff(f['c_diff'])} |")
        if "text_vs_head" in g:
            lines.append(f"| {name} | (parsed text minus fused head) | {_diff(g['text_vs_head']['auc_diff'])} | |")
    return "\n".join(lines)
