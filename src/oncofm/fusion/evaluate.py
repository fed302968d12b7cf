"""Evaluation of the generated explanations on the test split (from generated text only).

- parse rate (malformed → unparsed, counted);
- 5-year AUC of the parsed risk, beside the fused head (``reasoning/fused_head.parquet``: the stacked head on
  the two models' logits, or the embedding head), the omics model and the slide model, all on the *same*
  labelled test patients
  (unparsed texts count as risk 0.5 in the "all" AUC, and are dropped in the "parsed" AUC);
- faithfulness and the rate of named genes that are not in the evidence (:mod:`.faithfulness`);
- perplexity of the generated text under the base LLM (adapters off, no soft tokens) — fluency proxy;
- seconds per explanation;
- ``expert_rating.csv`` / ``.html``: one row per patient (evidence, generated text) with empty 1–5
  columns for clinical validity, logic and fluency.

Writes ``models/fusion/generations.jsonl`` and ``models/fusion/metrics.json``.
"""

from __future__ import annotations

import html
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from oncofm.config import StageSettings
from oncofm.errors import OncoFMError
from oncofm.fusion.parse import parse_prediction
from oncofm.io import atomic_path, write_json, write_text
from oncofm.paths import RunLayout

log = logging.getLogger(__name__)

__all__ = ["FusionEvaluateSettings", "evaluate_fusion", "base_perplexity", "write_expert_export", "RATING_COLUMNS"]

RATING_COLUMNS = ("clinical_validity_1to5", "logic_1to5", "fluency_1to5", "comment")


class FusionEvaluateSettings(StageSettings):
    stage: ClassVar[str] = "fusion_eval"

    run: str
    split: str = Field("test", description="split to evaluate (test; val while developing)")
    max_eval_patients: int = Field(0, ge=0, description="0 = every labelled patient of the split; else a seeded sample")
    max_new_tokens: int = Field(200, ge=16)
    batch_size: int = Field(16, ge=1)
    threads: int = Field(0, ge=0)
    precision: str = Field("auto", description="generation dtype: auto (bf16 where native) | fp32 | bf16")
    decoding: Literal["structured", "free"] = Field(
        "structured", description="structured: the grammar of the templates' slots, the LLM chooses each sentence "
        "and the verdict; free: token-by-token greedy decoding (oncofm.fusion.generate.DECODINGS)")
    readout: Literal["marginal", "verdict"] = Field(
        "marginal", description="how the prediction line is read out of the LLM (oncofm.fusion.generate.READOUTS)")
    timed_alone: int = Field(5, ge=0, description="patients also explained one at a time through the product "
                                                 "path, to time one explanation (median and max reported)")
    seed: int = 0


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    from oncofm.fusion.reasoning import _auc as auc

    return auc(np.asarray(y, float), np.asarray(s, float)) if len(y) else float("nan")


def _paired(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> list[float]:
    from oncofm.survival.metrics import paired_auc_difference

    if not len(y) or not np.isfinite(b).all():
        return [float("nan")] * 3
    return list(paired_auc_difference(y, a, b, n_boot=2000))


def base_perplexity(model: Any, tokenizer: Any, texts: list[str]) -> float:
    """Token perplexity of ``texts`` under the base LLM (LoRA adapters disabled, no soft tokens)."""
    import torch

    nll, n = 0.0, 0
    with torch.no_grad(), model.llm.disable_adapter():
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            if ids.shape[1] < 2:
                continue
            loss = model.llm(input_ids=ids, labels=ids).loss
            nll += float(loss) * (ids.shape[1] - 1)
            n += ids.shape[1] - 1
    return math.exp(nll / n) if n else float("nan")


def write_expert_export(rows: list[dict], out_dir: Path) -> dict[str, Path]:
    """``expert_rating.csv`` and ``expert_rating.html``: evidence + generated text + empty 1–5 columns."""
    from oncofm.fusion.evidence import evidence_prompt

    table = pd.DataFrame([{"patient_id": r["patient_id"], "evidence": evidence_prompt(r["evidence"]),
                           "generated": r["generated"], **{c: "" for c in RATING_COLUMNS}} for r in rows])
    csv = out_dir / "expert_rating.csv"
    with atomic_path(csv) as tmp:
        table.to_csv(tmp, index=False)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table.columns)
    body = "".join(
        "<tr>" + "".join(f"<td><pre>{html.escape(str(r[c]))}</pre></td>" if c in ("evidence", "generated")
                         else f"<td>{html.escape(str(r[c]))}</td>" for c in table.columns) + "</tr>"
        for _, r in table.iterrows())
    page = ("<!doctype html><meta charset='utf-8'><title>OncoFM explanations: expert rating</title>"
            "<style>td{vertical-align:top;border:1px solid #ccc;padding:4px}pre{white-space:pre-wrap;margin:0}"
            "table{border-collapse:collapse}</style><h1>Rate each explanation 1 (poor) to 5 (excellent)</h1>"
            f"<table><tr>{head}</tr>{body}</table>")
    page_path = write_text(page, out_dir / "expert_rating.html")
    return {"csv": csv, "html": page_path}


def _model_probs(layout: RunLayout, name: str) -> pd.Series:
    path = layout.model_dir(name) / "predictions.parquet"
    if not path.exists():
        return pd.Series(dtype=float)
    return pd.read_parquet(path).groupby("patient_id")["prob"].mean()


def _one_explanation_seconds(settings: FusionEvaluateSettings, rows: list[tuple]) -> list[float]:
    """The latency a user sees: each patient alone through the product's predictor (fp32, LoRA merged,
    already loaded as in a running product)."""
    from oncofm.fusion.predict import FusionPredictor

    predictor = FusionPredictor.from_run(RunLayout(settings.run))  # loaded outside the timing
    out = []
    for row in rows:
        t = time.perf_counter()
        predictor.generate([row], max_new_tokens=settings.max_new_tokens, readout=settings.readout,
                           decoding=settings.decoding)
        out.append(time.perf_counter() - t)
    return out


def evaluate_fusion(settings: FusionEvaluateSettings) -> dict[str, Any]:
    """Generate explanations for the split's labelled patients and score them; returns the metrics."""
    import torch

    from oncofm.fusion.faithfulness import FaithfulnessScore, score_faithfulness
    from oncofm.fusion.fuse import load_embeddings
    from oncofm.fusion.predict import FusionPredictor
    from oncofm.fusion.reasoning import HEAD_FILE, read_dataset

    if settings.threads:
        torch.set_num_threads(settings.threads)
    layout = RunLayout(settings.run)
    from oncofm.fusion.artifacts import FusionArtifacts

    arts = FusionArtifacts.of(settings.run)
    out = arts.dir
    records = [r for r in read_dataset(settings.run) if r["split"] == settings.split and r["label"] is not None]
    if settings.max_eval_patients and len(records) > settings.max_eval_patients:
        rng = np.random.default_rng(settings.seed)
        keep = sorted(rng.choice(len(records), settings.max_eval_patients, replace=False).tolist())
        records = [records[i] for i in keep]
    # the product's predictor (LoRA merged), in the evaluation's precision; batch 1 = the product's decoding
    predictor = FusionPredictor.load(settings.run, precision=settings.precision, merge=True)
    model, tokenizer, cfg = predictor.model, predictor.tokenizer, predictor.config
    emb = load_embeddings(settings.run, [r["patient_id"] for r in records], omics_dim=predictor.d_omics,
                          slide_dim=predictor.d_slide, slide_branch=predictor.slide_branch)
    if (emb.omics.shape[1], emb.slide.shape[1]) != (predictor.d_omics, predictor.d_slide):
        raise OncoFMError(f"embedding widths {(emb.omics.shape[1], emb.slide.shape[1])} differ from the trained "
                          f"fusion model's {(predictor.d_omics, predictor.d_slide)}; retrain with "
                          "`oncofm train fusion --redo`")
    rows_in = [(r["patient_id"], r["evidence"], emb.omics[i] if emb.has_omics[i] else None,
                emb.slide[i] if emb.has_slide[i] else None) for i, r in enumerate(records)]
    t0 = time.perf_counter()
    texts = [g.text for g in predictor.generate(rows_in, batch_size=settings.batch_size, readout=settings.readout,
                                                max_new_tokens=settings.max_new_tokens, progress=True,
                                                decoding=settings.decoding)]
    gen_seconds = time.perf_counter() - t0
    single = _one_explanation_seconds(settings, rows_in[: settings.timed_alone])

    vocab = set(pd.read_parquet(layout.expression).columns.astype(str)) if layout.expression.exists() else set()
    vocab |= {g["gene"] for r in records for g in (r["evidence"]["risk_genes"] + r["evidence"]["protective_genes"])}
    from oncofm.fusion.checker import aggregate as aggregate_checks
    from oncofm.fusion.checker import check_explanation

    total = FaithfulnessScore()
    rows, checks = [], []
    for r, text in zip(records, texts, strict=True):
        parsed = parse_prediction(text)
        f = score_faithfulness(text, r["evidence"], vocab)
        total = total + f
        checks.append(check_explanation(text, r["evidence"], vocab))
        rows.append({"patient_id": r["patient_id"], "label": r["label"], "generated": text,
                     "parsed": parsed is not None, "risk": parsed.risk if parsed else None,
                     "death": parsed.death if parsed else None, "faithfulness": f.faithfulness,
                     "evidence": r["evidence"], "reference": r["target"], "check": checks[-1].as_dict()})
    with atomic_path(arts.generations) as tmp, open(tmp, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")

    y = np.array([r["label"] for r in rows], dtype=float)
    parsed = np.array([r["parsed"] for r in rows])
    risk = np.array([r["risk"] if r["parsed"] else 0.5 for r in rows])
    ids = [r["patient_id"] for r in rows]
    head = pd.read_parquet(layout.reasoning_dir / HEAD_FILE).set_index("patient_id")["prob"]
    from oncofm.fusion.fuse import SLIDE_BRANCHES

    # the slide branch the fusion model was trained on (MIL on patches, or the slide-feature model)
    omics, slide = _model_probs(layout, "omics"), _model_probs(layout, SLIDE_BRANCHES[predictor.slide_branch])
    has_slide = np.array([i in slide.index for i in ids])
    head_p = head.reindex(ids).to_numpy()
    omics_p = omics.reindex(ids).fillna(0.5).to_numpy() if len(omics) else np.full(len(ids), np.nan)
    metrics: dict[str, Any] = {
        "split": settings.split, "n_generated": len(rows), "n_parsed": int(parsed.sum()),
        "parse_rate": float(parsed.mean()) if len(rows) else float("nan"),
        "auc_text": _auc(y, risk), "auc_text_parsed_only": _auc(y[parsed], risk[parsed]),
        "auc_fused_head": _auc(y, head_p),
        "auc_omics_model": _auc(y, omics_p) if len(omics) else float("nan"),
        # the cost of putting the number into words, paired over the same patients: [difference, lo, hi]
        "auc_text_minus_fused_head": _paired(y, risk, head_p),
        "auc_text_minus_omics_model": _paired(y, risk, omics_p),
        "auc_slide_model_on_patients_with_slide": _auc(y[has_slide], slide.reindex(ids).to_numpy()[has_slide]),
        "n_with_slide": int(has_slide.sum()),
        "outcome_word_accuracy": float(np.mean([r["death"] == bool(r["label"]) for r in rows if r["parsed"]]))
        if parsed.any() else float("nan"),
        **{k: v for k, v in total.as_dict().items()},
        "check": aggregate_checks(checks),  # the strict checker (oncofm.fusion.checker)
        "perplexity_base_generated": base_perplexity(model, tokenizer, texts),
        "perplexity_base_reference": base_perplexity(model, tokenizer, [r["reference"] for r in rows]),
        "seconds_per_explanation_batched": gen_seconds / max(1, len(rows)),
        "seconds_one_explanation": float(np.median(single)) if single else float("nan"),
        "seconds_one_explanation_max": max(single, default=float("nan")),
        "n_timed_alone": len(single),
        "readout": settings.readout,
        "decoding": settings.decoding,
        "generation_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "train": {k: cfg.get(k) for k in ("n_train_patients", "n_val_patients", "best_epoch", "best_val_loss",
                                          "epochs_run", "train_seconds", "trainable_parameters")},
    }
    write_json(metrics, arts.metrics)
    write_expert_export(rows, out)
    settings.save(layout.settings_file(settings.stage))
    for line in format_metrics(metrics):
        log.info(line)
    return metrics


def _diff(d: list[float]) -> str:
    return f"{d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}]"


def format_metrics(m: dict[str, Any]) -> list[str]:
    """The metric lines printed by the CLI."""
    from oncofm.fusion.checker import format_check

    return [
        f"parse rate: {m['parse_rate']:.3f} ({m['n_parsed']}/{m['n_generated']} {m['split']} patients)",
        f"AUC parsed risk: {m['auc_text']:.3f} | fused head: {m['auc_fused_head']:.3f} | "
        f"omics model: {m['auc_omics_model']:.3f} | slide model: {m['auc_slide_model_on_patients_with_slide']:.3f} "
        f"(n={m['n_with_slide']} with slide)",
        *([f"AUC parsed risk minus fused head: {_diff(m['auc_text_minus_fused_head'])} | minus omics model: "
           f"{_diff(m['auc_text_minus_omics_model'])} (paired bootstrap, 95 % CI)"]
          if "auc_text_minus_omics_model" in m else []),
        f"outcome words correct: {m['outcome_word_accuracy']:.3f}",
        f"faithfulness: {m['faithfulness']:.3f} | named genes outside the evidence: {m['hallucinated_gene_rate']:.3f} "
        f"({m['genes_named']} genes, {m['directions']} directions, {m['numbers']} numbers checked)",
        *([format_check(m["check"])] if "check" in m else []),
        f"perplexity under base LLM: generated {m['perplexity_base_generated']:.2f} | reference targets "
        f"{m['perplexity_base_reference']:.2f}",
        f"seconds per explanation: {m['seconds_per_explanation_batched']:.2f} in the evaluation | "
        f"{m['seconds_one_explanation']:.2f} alone, median of {m.get('n_timed_alone', 1)} "
        f"(max {m.get('seconds_one_explanation_max', m['seconds_one_explanation']):.2f}; the product path: fp32, "
        f"LoRA merged, {m.get('decoding', 'free')} decoding)",
    ]
