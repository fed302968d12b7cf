"""Tiling benchmark: speed on the real SVS files against a naive level-0 reader, and peak memory while
tiling a generated 100,000 x 100,000-pixel pyramidal TIFF.

    .venv/bin/python bench/tiling.py [--data ../shared/data] [--side 100000] [--keep]

(1) For each real SVS: grid building (grid cells evaluated per second: tissue detection + per-cell tissue
    fraction) and patch reading at 0.5 µm/px (patches per second), ours vs a naive reader that evaluates
    every cell and reads every patch from level 0 and resizes it; with the ratio.
(2) Writes a tiled, JPEG-compressed, 5-level pyramidal BigTIFF of side x side pixels into a temp dir
    (repeated pre-encoded tiles: an ellipse of H&E-like texture on white glass), tiles it with
    ``oncofm.pathology.tiling`` in a child process, and prints that child's peak RSS (target ≤ 1 GB).
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
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from oncofm.pathology.reader import open_slide  # noqa: E402
from oncofm.pathology.tiling import TilingSettings, load_grid, read_patch, tile_slide  # noqa: E402
from oncofm.pathology.tissue import rgb_to_hsv  # noqa: E402

TARGET_MPP, PATCH = 0.5, 224

# (file under pathology/, --slide-mpp for files without it). TCGA-CR-7395 records no mpp; we assume 0.25
# (40x) here so that 0.5 µm/px reads come from its level 1, as they would on a full TCGA 40x slide.
SVS = [("cmu1_small_region_svs/CMU-1-Small-Region.svs", None),
       ("tcga_cr7395_hnsc_svs/TCGA-CR-7395-01A-01-TS1_histolab-fixture.svs", 0.25)]


def naive_grid(slide, level0: int) -> tuple[int, int]:  # noqa: ANN001
    """Every grid cell read at level 0; tissue fraction from its own pixels. Returns (cells, kept)."""
    cols, rows = slide.dimensions[0] // level0, slide.dimensions[1] // level0
    kept = 0
    for gy in range(rows):
        for gx in range(cols):
            rgb = slide.read_region((gx * level0, gy * level0), 0, (level0, level0))
            _, sat, _ = rgb_to_hsv(rgb)
            kept += (sat > 0.07).mean() >= 0.5
    return cols * rows, kept


def bench_svs(data: Path) -> None:
    print("== (1) real SVS, 224-px patches at 0.5 µm/px: ours (best pyramid level) vs naive (level 0 + resize)")
    for rel, slide_mpp in SVS:
        path = data / "pathology" / rel
        with tempfile.TemporaryDirectory() as tmp:
            settings = TilingSettings(source=str(path), out=tmp, slide_mpp=slide_mpp, target_mpp=TARGET_MPP,
                                      patch_size=PATCH, qc=False)
            t0 = time.perf_counter()
            res = tile_slide(path, settings)
            t_grid = time.perf_counter() - t0
            grid = load_grid(res.paths["h5"])
        a = grid.attrs
        cells = int(a["grid_cols"]) * int(a["grid_rows"])
        slide = open_slide(path, mpp=slide_mpp)
        t0 = time.perf_counter()
        naive_cells, naive_kept = naive_grid(slide, int(a["level0_size"]))
        t_naive_grid = time.perf_counter() - t0

        coords = grid.coords
        t0 = time.perf_counter()
        for x, y in coords:
            read_patch(slide, int(x), int(y), int(a["read_level"]), int(a["read_size"]), PATCH)
        t_read = time.perf_counter() - t0
        t0 = time.perf_counter()
        for x, y in coords:
            read_patch(slide, int(x), int(y), 0, int(a["level0_size"]), PATCH)
        t_naive_read = time.perf_counter() - t0
        name = Path(rel).name
        print(f"{name}: {slide.dimensions[0]}x{slide.dimensions[1]}, {slide.level_count} level(s), mpp "
              f"{slide.mpp:g}, read level {a['read_level']} (read {a['read_size']} px, level-0 {a['level0_size']} px)"
              f", {len(coords)} patches kept of {cells} cells (naive kept {naive_kept})")
        g_ours, g_naive = cells / t_grid, naive_cells / t_naive_grid
        r_ours, r_naive = len(coords) / t_read, len(coords) / t_naive_read
        print(f"  grid building : ours {g_ours:8.1f} cells/s | naive {g_naive:8.1f} cells/s | ratio {g_ours / g_naive:6.1f}x")
        print(f"  patch reading : ours {r_ours:8.1f} patches/s | naive {r_naive:8.1f} patches/s | ratio "
              f"{r_ours / r_naive:6.2f}x")
        slide.close()


# ----------------------------------------------------------------------------------------------------------
def _encoded_tiles(tile: int, variants: int, rng: np.random.Generator) -> tuple[bytes, list[bytes], dict]:
    """JPEG-encode one white tile and a few H&E-like tiles exactly as tifffile writes them; return the raw
    tile bytes (to repeat) and the tifffile write arguments they match."""
    import tifffile

    yy, xx = np.mgrid[0:tile, 0:tile]
    imgs = [np.full((tile, tile, 3), 242, np.uint8)]
    for _ in range(variants):
        img = np.empty((tile, tile, 3), np.float32)
        img[...] = (226, 140, 190)  # eosin pink
        img += (np.sin(xx / rng.uniform(6, 12)) * np.cos(yy / rng.uniform(6, 12)) * 14)[..., None]
        for _ in range(180):  # nuclei
            cy, cx, r = rng.integers(0, tile), rng.integers(0, tile), rng.uniform(3, 6)
            img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = (95, 60, 150)
        imgs.append(np.clip(img, 0, 255).astype(np.uint8))
    kwargs = dict(tile=(tile, tile), compression="jpeg", compressionargs={"level": 85}, photometric="rgb")
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.tif"
        with tifffile.TiffWriter(path) as tif:
            for img in imgs:
                tif.write(img, **kwargs)
        with tifffile.TiffFile(path) as tif, open(path, "rb") as fh:
            for page in tif.pages:
                fh.seek(page.dataoffsets[0])
                out.append(fh.read(page.databytecounts[0]))
    return out[0], out[1:], kwargs


def write_big_pyramid(path: Path, side: int, mpp: float = 0.25, tile: int = 512, levels: int = 5) -> int:
    """A side x side pyramidal BigTIFF (levels halving, one page each, like a 40x scan's 1/4/16 pyramid but
    denser). Tissue fills the blocks of ``tile * 2**(levels-1)`` level-0 pixels whose centres lie inside an
    ellipse, so every level shows the same tissue layout."""
    import tifffile

    rng = np.random.default_rng(0)
    white, tissue, kwargs = _encoded_tiles(tile, 4, rng)
    block = tile * 2 ** (levels - 1)  # level-0 px; every level's tiles nest inside these blocks

    def tiles(level_side: int, ds: int):
        n = -(-level_side // tile)
        for ty in range(n):
            for tx in range(n):
                bx, by = tx * tile * ds // block, ty * tile * ds // block
                cx, cy = (bx + 0.5) * block / side - 0.5, (by + 0.5) * block / side - 0.5
                inside = (cx / 0.42) ** 2 + (cy / 0.30) ** 2 <= 1
                yield tissue[(tx * 7 + ty * 3) % len(tissue)] if inside else white

    res = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for level in range(levels):
            ds = 2**level
            lside = side // ds
            tif.write(tiles(lside, ds), shape=(lside, lside, 3), dtype=np.uint8, subfiletype=1 if level else 0,
                      **kwargs, **(res if level == 0 else {}))
    return path.stat().st_size


CHILD = """
import json, resource, sys, time
from oncofm.pathology.tiling import TilingSettings, tile_slides
t0 = time.perf_counter()
r = tile_slides(TilingSettings(source=sys.argv[1], out=sys.argv[2], target_mpp=0.5, patch_size=224), progress=False)[0]
print(json.dumps({"status": r.status, "reason": r.reason, "n": r.n_patches, "s": time.perf_counter() - t0,
                  "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def bench_memory(side: int, keep: bool) -> None:
    print(f"== (2) peak memory tiling a generated {side:,} x {side:,} pyramidal TIFF (0.25 µm/px -> 0.5 µm/px)")
    tmp = Path(tempfile.mkdtemp(prefix="oncofm_bench_"))
    try:
        path = tmp / "big.tif"
        t0 = time.perf_counter()
        size = write_big_pyramid(path, side)
        print(f"wrote {path.name}: {size / 1e9:.2f} GB on disk (JPEG 512-px tiles, 5 levels) in "
              f"{time.perf_counter() - t0:.1f} s")
        slide = open_slide(path)
        print(f"opened: backend {slide.backend}, {slide.level_count} levels, mpp {slide.mpp:g}, level-0 "
              f"{slide.dimensions[0]}x{slide.dimensions[1]} (full-resolution RGB would be "
              f"{slide.dimensions[0] * slide.dimensions[1] * 3 / 1e9:.0f} GB)")
        slide.close()
        env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
        proc = subprocess.run([sys.executable, "-c", CHILD, str(path), str(tmp / "tiles")], env=env,
                              capture_output=True, text=True, check=False)
        child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        if proc.returncode != 0:
            print(proc.stderr[-3000:])
            raise SystemExit("tiling child failed")
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        if info["status"] != "done":
            raise SystemExit(f"tiling the generated slide did not succeed: {info}")
        peak = info["maxrss_kb"] / 1024
        grid = load_grid(tmp / "tiles" / "big.h5")
        cells = int(grid.attrs["grid_cols"]) * int(grid.attrs["grid_rows"])
        print(f"tiled: {info['status']}, {info['n']:,} patches kept of {cells:,} cells, read level "
              f"{grid.attrs['read_level']} (downsample {grid.attrs['downsample']:g}), {info['s']:.1f} s including "
              f"the QC png ({cells / info['s']:,.0f} cells/s)")
        print(f"peak RSS of the tiling process: {peak:,.0f} MB (children max {child:,.0f} MB) | target 1,024 MB | "
              f"{'OK' if peak <= 1024 else 'OVER'}")
    finally:
        if keep:
            print(f"kept {tmp}")
        else:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--side", type=int, default=100_000)
    ap.add_argument("--keep", action="store_true", help="Keep the generated TIFF and tiles.")
    ap.add_argument("--skip-svs", action="store_true")
    args = ap.parse_args()
    if not args.skip_svs:
        bench_svs(args.data)
    bench_memory(args.side, args.keep)


if __name__ == "__main__":
    main()
