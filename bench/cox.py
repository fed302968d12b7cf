"""Cox benchmark: batched univariate Cox (OncoFM) vs a per-gene lifelines loop, and a TCGA-scale run.

    .venv/bin/python bench/cox.py [--data ../shared/data] [--lifelines-genes 240] [--skip-scale]

(1) Real data: the tcga13 cohort is imported and split (seed 0) into a temp dir; on its training split
    (OS censored at 5 years, normalised expression) OncoFM fits every gene of every cancer type with
    >= 10 events (Efron ties), and lifelines' CoxPHFitter fits ``--lifelines-genes`` of the same
    gene × cancer-type models one by one (same data, Efron). Prints fits per second for both, their
    ratio, and the largest |coef| difference on the genes both fitted.
(2) TCGA scale: 11,000 patients × 20,000 genes × 33 cancer types, with the real per-cancer-type
    patient counts, overall survival times and events of TCGA-CDR (``tcga_cdr/``), and synthetic float32
    expression (standard normal; 3% of genes zero-inflated, 200 genes with a planted effect on
    survival). The whole ``cox`` computation (``fit_coefficients``: 33 per-type fits + the stratified
    pan-cancer fit + BH) runs in a child process; prints its wall time and peak RSS (targets: <= 2 min,
    <= 4 GB on the 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from oncofm.survival.cox import BatchedCoxPH, ConvergenceWarning  # noqa: E402
from oncofm.survival.endpoints import censor_at_horizon  # noqa: E402


def _load() -> str:
    la = os.getloadavg()
    return f"load average {la[0]:.1f}/{la[1]:.1f}/{la[2]:.1f} on {os.cpu_count()} cores (machine shared)"


def bench_real(data: Path, n_lifelines: int) -> None:
    from lifelines import CoxPHFitter

    from oncofm.cohort.importing import ImportSettings, import_cohort
    from oncofm.cohort.normalize import load_normalized_expression
    from oncofm.cohort.splits import SplitSettings, split_cohort

    print("== (1) real tcga13 training split, OS censored at 5 years, Efron ties")
    with tempfile.TemporaryDirectory() as tmp:
        import_cohort(ImportSettings(format="tcga13", source=str(data / "tcga13"), run=tmp))
        split_cohort(SplitSettings(run=tmp))
        patients = pd.read_parquet(Path(tmp) / "cohort" / "patients.parquet").set_index("patient_id")
        splits = pd.read_parquet(Path(tmp) / "cohort" / "splits.parquet").set_index("patient_id")
        expr = load_normalized_expression(tmp)
    train = splits.index[splits["split"] == "train"].intersection(expr.index)
    p = patients.loc[train]
    t_all, e_all = censor_at_horizon(p["os_days"], p["os_event"], 5)
    groups = []
    for ct in sorted(p["cancer_type"].unique()):
        rows = np.flatnonzero(p["cancer_type"].to_numpy() == ct)
        if e_all[rows].sum() >= 10:
            groups.append((ct, rows))

    fits = 0
    ours: dict[tuple[str, str], float] = {}
    ours_ll: dict[tuple[str, str], float] = {}
    start, cpu0 = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for ct, rows in groups:
            fit = BatchedCoxPH().fit(expr.loc[train[rows]], t_all[rows], e_all[rows])
            fits += len(fit.coef_)
            ours.update({(ct, g): c for g, c in zip(fit.feature_names_in_, fit.coef_, strict=True)})
            ours_ll.update({(ct, g): v for g, v in zip(fit.feature_names_in_, fit.loglik_, strict=True)})
    t_ours, c_ours = time.perf_counter() - start, time.process_time() - cpu0

    rng = np.random.default_rng(0)
    jobs = []
    for ct, rows in groups:
        ok = [g for g in expr.columns if np.isfinite(ours[(ct, g)])]
        jobs += [(ct, rows, g) for g in rng.choice(ok, size=min(len(ok), n_lifelines // len(groups) + 1),
                                                   replace=False)]
    jobs = jobs[:n_lifelines]
    diffs: list[float] = []
    worst: tuple = (-1.0,)
    start, cpu0 = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for ct, rows, g in jobs:
            df = pd.DataFrame({"x": expr.loc[train[rows], g].to_numpy(dtype=float), "t": t_all[rows],
                               "e": e_all[rows]})
            cph = CoxPHFitter().fit(df, "t", "e")
            coef = cph.params_["x"]
            diffs.append(abs(coef - ours[(ct, g)]))
            worst = max(worst, (diffs[-1], ct, g, ours[(ct, g)], coef, ours_ll[(ct, g)], cph.log_likelihood_))
    t_ll, c_ll = time.perf_counter() - start, time.process_time() - cpu0
    r_ours, r_ll = fits / t_ours, len(jobs) / t_ll
    rc_ours, rc_ll = fits / c_ours, len(jobs) / c_ll
    print(f"data: {len(train)} training patients, {len(groups)} cancer types with >= 10 events, "
          f"{expr.shape[1]} genes; {_load()}")
    print(f"OncoFM BatchedCoxPH : {fits:6d} fits in {t_ours:7.2f} s wall = {r_ours:9.1f} fits/s; "
          f"{c_ours:7.2f} s CPU = {rc_ours:9.1f} fits per CPU-second (1 thread)")
    print(f"lifelines loop      : {len(jobs):6d} fits in {t_ll:7.2f} s wall = {r_ll:9.1f} fits/s; "
          f"{c_ll:7.2f} s CPU = {rc_ll:9.1f} fits per CPU-second")
    print(f"ratio               : {r_ours / r_ll:.0f}x wall, {rc_ours / rc_ll:.0f}x CPU (target >= 500x)")
    diffs_a = np.asarray(diffs)
    print(f"agreement           : |coef diff| vs lifelines on the "
          f"{len(jobs)} shared fits: median {np.median(diffs_a):.1e}, max {diffs_a.max():.1e}, "
          f"{int((diffs_a < 1e-5).sum())} within 1e-5 (lifelines at its default precision); largest: "
          f"{worst[1]} {worst[2]} OncoFM {worst[3]:.4g} (log-lik {worst[5]:.2f}) vs lifelines {worst[4]:.4g} "
          f"(log-lik {worst[6]:.2f})")


def _child_scale(args: argparse.Namespace) -> None:
    """Runs in a child process so that its peak RSS is the cost of the TCGA-scale run alone."""
    from oncofm.survival.cox_stage import fit_coefficients

    cdr = pd.read_csv(Path(args.data) / "tcga_cdr" / "tcga_cdr_clinical.csv", low_memory=False)
    ct_col, t_col, e_col = "type", "OS.time", "OS"
    cdr = cdr[[ct_col, t_col, e_col]].copy()
    cdr[t_col] = pd.to_numeric(cdr[t_col], errors="coerce")
    cdr[e_col] = pd.to_numeric(cdr[e_col], errors="coerce")
    cdr = cdr.dropna()
    rng = np.random.default_rng(0)
    cdr = cdr.iloc[rng.permutation(len(cdr))[: args.patients]]
    time_days = pd.to_numeric(cdr[t_col]).to_numpy(dtype=float).clip(min=0)
    event = pd.to_numeric(cdr[e_col]).to_numpy(dtype=float)
    types = cdr[ct_col].astype(str).to_numpy()
    n, g = len(cdr), args.genes
    x = np.empty((n, g), dtype=np.float32)                       # (N, G) synthetic expression
    for start in range(0, g, 1000):
        x[:, start:start + 1000] = rng.standard_normal((n, min(1000, g - start)), dtype=np.float32)
    sparse = rng.choice(g, size=int(0.03 * g), replace=False)
    x[:, sparse] *= rng.random((n, len(sparse))) < 0.2          # zero-inflated genes
    risk = -np.log1p(time_days) * (event == 1)                  # planted: earlier deaths, higher expression
    risk = (risk - risk.mean()) / risk.std()
    x[:, :200] += (0.3 * risk[:, None]).astype(np.float32)
    expression = pd.DataFrame(x, columns=[f"G{i}" for i in range(g)], copy=False)
    del x
    start, cpu0 = time.perf_counter(), time.process_time()
    table = fit_coefficients(expression, time_days, event, types, horizon_years=5.0, n_jobs=args.n_jobs,
                             progress=False)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t5, e5 = censor_at_horizon(time_days, event, 5)
    per = table[table["cancer_type"] != "__pan__"]
    print(json.dumps({"wall_s": wall, "cpu_s": cpu, "peak_rss_mb": peak_mb, "n": n, "genes": g,
                      "types": int(len(set(types))), "fits": int(len(table)),
                      "fitted": int(table["coef"].notna().sum()), "events_5y": int(e5.sum()),
                      "event_rate_5y": float(e5.mean()),
                      "planted_q05": int((per[per["gene"].isin([f"G{i}" for i in range(200)])]["q"] < 0.05).sum()),
                      "null_q05": int((per[~per["gene"].isin([f"G{i}" for i in range(200)])]["q"] < 0.05).sum()),
                      "input_mb": n * g * 4 / 2**20}))


def bench_scale(args: argparse.Namespace) -> None:
    print(f"== (2) TCGA scale: {args.patients} patients x {args.genes} genes x 33 cancer types "
          "(TCGA-CDR survival, synthetic expression), per-type + stratified pan-cancer, in a child process")
    cmd = [sys.executable, __file__, "--child", "--data", str(args.data), "--patients", str(args.patients),
           "--genes", str(args.genes), "--n-jobs", str(args.n_jobs)]
    load_before = _load()
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        print(out.stderr[-3000:])
        raise SystemExit(out.returncode)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{r['n']} patients ({r['events_5y']} deaths within 5 y, {r['event_rate_5y']:.1%}), {r['genes']} genes, "
          f"{r['types']} cancer types: {r['fits']} fits ({r['fitted']} estimated); input {r['input_mb']:.0f} MB float32")
    print(f"wall time {r['wall_s']:.1f} s (target <= 120 s), {r['fits'] / r['wall_s']:.0f} fits/s, "
          f"{args.n_jobs} thread(s); CPU time {r['cpu_s']:.1f} s (all threads); "
          f"peak RSS {r['peak_rss_mb'] / 1024:.2f} GB (target <= 4 GB)")
    print(f"planted genes at q < 0.05: {r['planted_q05']} of {200 * r['types']} gene x type fits; "
          f"null genes at q < 0.05: {r['null_q05']}")
    print(f"{load_before} before; {_load()} after")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--lifelines-genes", type=int, default=240)
    ap.add_argument("--patients", type=int, default=11000)
    ap.add_argument("--genes", type=int, default=20000)
    ap.add_argument("--n-jobs", type=int, default=2, help="threads for the TCGA-scale run (2 cores)")
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--skip-scale", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.ERROR)
    if args.child:
        _child_scale(args)
        return
    if not args.skip_real:
        bench_real(args.data, args.lifelines_genes)
    if not args.skip_scale:
        bench_scale(args)


if __name__ == "__main__":
    main()
