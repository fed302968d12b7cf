"""Ablation of the omics model's inputs on the tcga13 test split: the transformer and every baseline on the
same inputs — expression; + CNV; + mutation; + clinical (stage, grade); all.

    nice -n 10 .venv/bin/python bench/ablation.py --run RUN [--cnv 32] [--mutation 32] [--threads 1]

RUN needs ``oncofm cohort import`` (with stage/grade), ``cohort split``, ``cox`` (every layer) and ``features``.
Everything is fitted on the training split and chosen on the validation split (the transformer's epoch and
anchor penalty, each baseline's hyperparameter, and which baseline is "best" for the paired comparison);
the test split is only predicted. Prints, per input set: 5-year AUC [bootstrap 95% CI], Harrell's C-index,
mean per-cancer-type C-index, for the transformer and every baseline; the transformer minus the best baseline
(by validation score) with paired-bootstrap CIs; and the transformer's per-type C-indices. ``--out`` also
writes everything as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

INPUT_SETS: dict[str, dict[str, Any]] = {
    "expression": {},
    "+cnv": {"cnv": True},
    "+mutation": {"mutation": True},
    "+clinical": {"clinical": True},
    "all": {"cnv": True, "mutation": True, "clinical": True},
}
MODEL = "transformer"


def _settings(run: str, spec: dict[str, Any], args: argparse.Namespace) -> Any:
    from oncofm.omics.train import OmicsTrainSettings

    return OmicsTrainSettings(run=run, cnv_features=args.cnv if spec.get("cnv") else 0,
                              mutation_features=args.mutation if spec.get("mutation") else 0,
                              covariates=["stage", "grade"] if spec.get("clinical") else [],
                              threads=args.threads, progress=False, n_boot=args.n_boot, seed=args.seed)


def run_input_set(name: str, spec: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Train the transformer and the baselines on one input set; test metrics and validation scores."""
    from oncofm.omics.baselines import _val_score, run_baselines
    from oncofm.omics.predict import OmicsPredictor
    from oncofm.omics.train import fit_omics_model, load_settings_table
    from oncofm.survival.metrics import evaluate_predictions, mean_per_cancer

    settings = _settings(args.run, spec, args)
    t0 = time.perf_counter()
    table = load_settings_table(settings)
    train, val, test = (table.where_split(s) for s in ("train", "val", "test"))
    with tempfile.TemporaryDirectory() as tmp:
        model, encoder, _, result, anchor, _ = fit_omics_model(settings, table, Path(tmp))
    fit_seconds = time.perf_counter() - t0
    predictor = OmicsPredictor.build(model.cpu().eval(), genes=table.genes, encoder=encoder,
                                     horizon_years=settings.horizon_years, run=args.run, ig_steps=1)
    preds = {MODEL: (predictor.predict_table(test, attributions=False), predictor.predict_table(val, attributions=False))}
    scores = {MODEL: (preds[MODEL][0].probs, preds[MODEL][0].logits, preds[MODEL][1].probs)}
    for bname, b in run_baselines(train, val, test, encoder, tuple(settings.baselines)).items():
        scores[bname] = (b.test_prob, b.test_risk, b.val_prob)
    common = dict(time=test.time, event=test.event, cancer_type=test.cancer_type, train_time=train.time,
                  train_event=train.event, years=settings.horizon_years, n_boot=args.n_boot, seed=args.seed)
    models = {}
    for mname, (prob, risk, val_prob) in scores.items():
        m = evaluate_predictions(prob=prob, risk=risk, **common)
        models[mname] = {"auc": float(m.loc["pooled", "auc"]), "auc_lo": float(m.loc["pooled", "auc_lo"]),
                         "auc_hi": float(m.loc["pooled", "auc_hi"]), "c_index": float(m.loc["pooled", "c_index"]),
                         "mean_type_c": mean_per_cancer(m, "c_index"),
                         "per_type_c": {k: float(v) for k, v in m["c_index"].drop(index="pooled").items()},
                         "val_score": float(_val_score(val, val_prob)),
                         "n_labelled": int(m.loc["pooled", "n_labelled"])}
    features = {k: len(f) for k, (f, _) in table.layers.items()}
    logging.getLogger("ablation").warning("%s: fitted in %.0f s (best epoch %s, anchor %s)", name, fit_seconds,
                                          result.best_epoch, anchor)
    return {"models": models, "scores": {k: [v[0].tolist(), v[1].tolist()] for k, v in scores.items()},
            "fit_seconds": fit_seconds, "best_epoch": result.best_epoch, "anchor": anchor,
            "features": {"expression": len(table.genes), **features}, "covariates": list(encoder.covariates),
            "label": test.label.tolist(), "time": test.time.tolist(), "event": test.event.tolist()}


def paired(out: dict[str, Any], n_boot: int, seed: int) -> dict[str, Any]:
    """Transformer minus the best baseline (highest validation score) of the same input set, paired bootstrap."""
    from oncofm.survival.metrics import paired_auc_difference, paired_c_index_difference

    models = out["models"]
    best = max((m for m in models if m != MODEL), key=lambda m: models[m]["val_score"])
    y = np.asarray(out["label"], dtype=float)
    has = ~np.isnan(y)
    a_prob, a_risk = (np.asarray(v) for v in out["scores"][MODEL])
    b_prob, b_risk = (np.asarray(v) for v in out["scores"][best])
    auc = paired_auc_difference(y[has], a_prob[has], b_prob[has], n_boot=n_boot, seed=seed)
    c = paired_c_index_difference(out["time"], out["event"], a_risk, b_risk, n_boot=n_boot, seed=seed)
    return {"best_baseline": best, "auc_diff": auc, "c_diff": c}


def print_tables(results: dict[str, dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    t = Table(title="Ablation, tcga13 test split (5-year overall survival); every model on the same inputs")
    for col in ("inputs", "model", "AUC-5y [95% CI]", "C-index", "mean C (per type)", "val score"):
        t.add_column(col, justify="left" if col in ("inputs", "model") else "right")
    for name, out in results.items():
        for i, (mname, m) in enumerate(out["models"].items()):
            t.add_row(name if i == 0 else "", mname, f"{m['auc']:.3f} [{m['auc_lo']:.3f}, {m['auc_hi']:.3f}]",
                      f"{m['c_index']:.3f}", f"{m['mean_type_c']:.3f}", f"{m['val_score']:.4f}")
        t.add_section()
    console.print(t)
    first = next(iter(results.values()))
    console.print(f"AUC on {first['models'][MODEL]['n_labelled']} test patients with a 5-year label; C-index on all "
                  f"{len(first['time'])} test patients. 'val score' (mean of validation AUC and 5-year-censored "
                  "C-index) picks the best baseline.")
    d = Table(title="Transformer minus the best baseline (chosen on validation), paired bootstrap 95% CI")
    for col in ("inputs", "best baseline", "ΔAUC-5y [95% CI]", "ΔC-index [95% CI]"):
        d.add_column(col, justify="left" if col in ("inputs", "best baseline") else "right")
    for name, out in results.items():
        p = out["paired"]
        d.add_row(name, p["best_baseline"], "{:+.3f} [{:+.3f}, {:+.3f}]".format(*p["auc_diff"]),
                  "{:+.3f} [{:+.3f}, {:+.3f}]".format(*p["c_diff"]))
    console.print(d)
    types = list(first["models"][MODEL]["per_type_c"])
    pc = Table(title="Transformer: per-cancer-type C-index (test)")
    pc.add_column("cancer type")
    for name in results:
        pc.add_column(name, justify="right")
    for ct in types:
        pc.add_row(ct, *(f"{results[n]['models'][MODEL]['per_type_c'].get(ct, float('nan')):.3f}" for n in results))
    pc.add_row("mean", *(f"{results[n]['models'][MODEL]['mean_type_c']:.3f}" for n in results))
    console.print(pc)
    console.print("features per input set: " + "; ".join(
        f"{n}: {o['features']}{' + ' + ','.join(o['covariates']) if o['covariates'] else ''} "
        f"(fit {o['fit_seconds']:.0f} s, best epoch {o['best_epoch']}, anchor {o['anchor']})" for n, o in results.items()))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run directory (cohort with stage/grade, split, cox, features)")
    parser.add_argument("--cnv", type=int, default=32, help="CNV features (tokens) when CNV is an input")
    parser.add_argument("--mutation", type=int, default=32, help="mutation features (tokens) when mutation is an input")
    parser.add_argument("--sets", default=",".join(INPUT_SETS), help="comma-separated input sets")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for noisy in ("oncofm", "accelerate", "py.warnings"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore")
    t0 = time.perf_counter()
    results = {}
    for name in [s.strip() for s in args.sets.split(",") if s.strip()]:
        results[name] = run_input_set(name, INPUT_SETS[name], args)
        results[name]["paired"] = paired(results[name], args.n_boot, args.seed)
    print_tables(results)
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.out is not None:
        slim = {k: {kk: vv for kk, vv in v.items() if kk not in ("scores", "label", "time", "event")}
                for k, v in results.items()}
        args.out.write_text(json.dumps(slim, indent=1, default=float))
    return results


if __name__ == "__main__":
    main()
