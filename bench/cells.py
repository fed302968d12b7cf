"""Cell-model benchmark: the held-out test detection table and the speed of cell findings for one slide.

    nice -n 10 .venv/bin/python bench/cells.py --model /tmp/cells_run/model [--data ../shared/data] [--top 16]

(1) The validation comparison and the test detection table of the model (``oncofm.pathology.cells.train.
    evaluate_cells``: the test patients of its recorded by-patient split, per-class precision / recall / F1
    and macro F1 at the model's radius). The test images are read once per model: when the folder already
    holds that reading (``test_table.txt``, written by ``oncofm cells evaluate``) it is printed as it is, not
    recomputed; ``--speed-only`` skips (1).
(2) Speed on a real H&E slide (CMU-1-Small-Region.svs, 0.499 µm/px, tiled at 0.5 µm/px into 224 px patches): the
    model loaded, then ``cell_findings`` on ``--top`` patches (standing in for the most attended ones;
    target: within 5 s on this 2-core machine, model loading included) and on a sample of the slide's patches
    for the slide average, then ``compare_findings``; the measured times and the ratios are printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import numpy as np  # noqa: E402

SLIDE = ("cmu1_small_region_svs/CMU-1-Small-Region.svs", None)  # (file, level-0 mpp where the file lacks it)
TARGET_S = 5.0


def slide_patches(data: Path, n_all: int, seed: int = 0) -> tuple[list[np.ndarray], float]:
    """Up to ``n_all`` 224 px patches at 0.5 µm/px of the real slide (tissue only), and their mpp."""
    from oncofm.pathology.reader import open_slide
    from oncofm.pathology.tiling import TilingSettings, load_grid, read_patch, tile_slide

    rel, slide_mpp = SLIDE
    path = data / "pathology" / rel
    with tempfile.TemporaryDirectory() as tmp:
        settings = TilingSettings(source=str(path), out=tmp, slide_mpp=slide_mpp, target_mpp=0.5, patch_size=224,
                                  qc=False)
        grid = load_grid(tile_slide(path, settings).paths["h5"])
    a = grid.attrs
    coords = grid.coords
    pick = np.random.default_rng(seed).permutation(len(coords))[:n_all]
    slide = open_slide(path, mpp=slide_mpp)
    patches = [read_patch(slide, int(coords[i][0]), int(coords[i][1]), int(a["read_level"]), int(a["read_size"]),
                          224) for i in pick]
    slide.close()
    return patches, 0.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("/tmp/cells_run/model"))
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--top", type=int, default=16, help="patches standing in for a slide's most attended ones")
    ap.add_argument("--all", type=int, default=200, help="patches sampled for the slide average")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--speed-only", action="store_true", help="skip the validation and test tables")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from oncofm.pathology.cells import CellModel, cell_findings, compare_findings
    from oncofm.pathology.cells.train import evaluate_cells, validation_table

    if not args.speed_only:
        print("== (1) validation comparison (chosen design) and held-out test detection table")
        print(validation_table(args.model))
        print()
        stored = args.model / "test_table.txt"
        if stored.exists():  # the one reading of the test images, by `oncofm cells evaluate`
            print(stored.read_text().rstrip() + f"\n(read from {stored})")
        else:
            result = evaluate_cells(args.model, args.data / "pathology" / "brca_m2c_tcga_rois", "test")
            print(result["table"])

    print(f"\n== (2) speed: cell findings for {args.top} patches of 224 px (one slide's top patches), 2-core CPU")
    patches, mpp = slide_patches(args.data, max(args.all, args.top))
    top, rest = patches[:args.top], patches
    t0 = time.perf_counter()
    model = CellModel.load(args.model)
    t_load = time.perf_counter() - t0
    cell_findings(model, top[:1], mpp)  # first call: allocator / kernels warm up (counted separately)
    t_first = time.perf_counter() - t0 - t_load
    t1 = time.perf_counter()
    f_top = cell_findings(model, top, mpp)
    t_top = time.perf_counter() - t1
    t1 = time.perf_counter()
    f_all = cell_findings(model, rest, mpp)
    t_all = time.perf_counter() - t1
    cmp = compare_findings(f_top, f_all)
    total = t_load + t_first + t_top
    print(f"model load {t_load:.2f} s, first call {t_first:.2f} s; cell findings for {len(top)} top patches "
          f"{t_top:.2f} s; load + first + top = {total:.2f} s (target <= {TARGET_S:g} s: "
          f"{'met' if total <= TARGET_S else 'MISSED'}); slide average over {len(rest)} patches {t_all:.2f} s "
          f"({len(rest) / t_all:.1f} patches/s)")
    print(f"cells found: {sum(f.n_cells for f in f_top)} in the top patches, {sum(f.n_cells for f in f_all)} "
          f"in the {len(rest)} sampled (design {model.design_name}, {model.design.params()})")
    for m in cmp.values():
        ratio = "n/a" if m.ratio is None else f"{m.ratio:.2f}x"
        print(f"  {m.key:<22} top {m.top:10.3f}  slide {m.slide:10.3f}  ratio {ratio}   ({m.description})")


if __name__ == "__main__":
    main()
