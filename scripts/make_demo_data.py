"""Build the bundled demo cohort ``src/oncofm/demo_data`` from the real data in ``../shared/data``.

The demo cohort keeps five TCGA projects — GBM, LGG, KIRC, KIRP, BLCA (1,237 patients) — chosen so that
it contains the patients who have a real H&E image in ``shared/data/pathology`` (MoNuSeg tiles and the
PathomicFusion glioma ROIs) and outcomes a small model can learn (glioma grade, kidney and bladder
cancer). It is written in the ``tcga13`` layout, restricted to the genes every cohort has:

- ``patients.csv``, ``slides.csv``: the source rows of those patients, unchanged;
- ``expression_zscore.csv.gz``: their rows, the 1,526 genes of ``genes_in_all_13_cohorts.txt``;
- ``multiomics/tcga_<cohort>_all_clean.csv.gz``: one row per patient (the first slide's row), the
  ``case_id`` and the ``<GENE>_cnv`` / ``<GENE>_mut`` columns (RNA columns dropped: they duplicate the
  expression table);
- ``images/``: the real H&E images of demo patients (MoNuSeg JPEGs copied byte for byte; the 1024 px
  PathomicFusion PNGs re-encoded as JPEG quality 90) and ``images.csv``
  (``patient_id, file, slide_barcode, mpp, source, licence``).

Usage::

    .venv/bin/python scripts/make_demo_data.py [--shared ../shared/data] [--out src/oncofm/demo_data]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import logging
import shutil
from pathlib import Path

import pandas as pd

log = logging.getLogger("make_demo_data")

PROJECTS = ("GBM", "LGG", "KIRC", "KIRP", "BLCA")
MAX_FILE_BYTES = 5 * 1024 * 1024
MAX_TOTAL_BYTES = 20 * 1024 * 1024
MONUSEG_LICENCE = "CC BY-NC-SA 4.0 (MoNuSeg, Kumar et al.); TCGA data public"
PATHOMIC_LICENCE = "GPL-3.0 (PathomicFusion repository); TCGA data public"


def _write_csv_gz(df: pd.DataFrame, path: Path, index: bool = False) -> None:
    # mtime=0 makes the gzip bytes reproducible
    buf = io.StringIO()
    df.to_csv(buf, index=index)
    with open(path, "wb") as fh, gzip.GzipFile(fileobj=fh, mode="wb", mtime=0, compresslevel=9) as gz:
        gz.write(buf.getvalue().encode())


def build(shared: Path, out: Path) -> pd.DataFrame:
    """Write the demo cohort to ``out`` (replacing it); return the images table."""
    from PIL import Image

    t13 = shared / "tcga13"
    patients = pd.read_csv(t13 / "patients.csv")
    patients = patients[patients["tcga_project"].isin(PROJECTS)].reset_index(drop=True)
    ids = set(patients["case_id"])
    genes = [g.strip() for g in (t13 / "genes_in_all_13_cohorts.txt").read_text().split() if g.strip()]
    if out.exists():
        shutil.rmtree(out)
    (out / "multiomics").mkdir(parents=True)
    (out / "images").mkdir()
    patients.to_csv(out / "patients.csv", index=False)
    slides = pd.read_csv(t13 / "slides.csv")
    slides[slides["case_id"].isin(ids)].to_csv(out / "slides.csv", index=False)

    expr = pd.read_csv(t13 / "expression_zscore.csv.gz", index_col=0, dtype={0: str}, low_memory=False)
    expr = expr.loc[expr.index.isin(ids), [g for g in genes if g in expr.columns]]
    # keep the source's 4-decimal text representation
    _write_csv_gz(expr.round(4), out / "expression_zscore.csv.gz", index=True)
    log.info("expression: %d patients x %d genes", *expr.shape)

    for file in sorted((t13 / "multiomics").glob("*_all_clean.csv.gz")):
        header = pd.read_csv(file, nrows=0).columns
        cols = [c for c in header if c.endswith(("_cnv", "_mut"))]
        df = pd.read_csv(file, usecols=["case_id", *cols])
        df = df[df["case_id"].isin(ids)].drop_duplicates("case_id")
        if len(df) and cols:
            _write_csv_gz(df, out / "multiomics" / file.name)
            log.info("%s: %d patients, %d cnv/mut columns", file.name, len(df), len(cols))

    rows = []
    mon = pd.read_csv(shared / "pathology" / "monuseg_tcga_tiles" / "MANIFEST.csv")
    for _, r in mon[mon["patient_barcode"].isin(ids)].iterrows():
        src = shared / "pathology" / "monuseg_tcga_tiles" / r["file"]
        shutil.copyfile(src, out / "images" / r["file"])
        rows.append({"patient_id": r["patient_barcode"], "file": r["file"], "slide_barcode": r["slide_barcode"],
                     "mpp": 0.25, "source": "MoNuSeg 2018 (github ykrmm/monuseg @93a696d), TCGA slide tile",
                     "licence": MONUSEG_LICENCE})
    for src in sorted((shared / "pathology" / "pathomicfusion_gbmlgg_rois").glob("TCGA-*.png")):
        pid = src.name[:12]
        if pid not in ids:
            continue
        name = src.name.split(".")[0] + ".jpg"  # slide barcode, without the UUID
        Image.open(src).convert("RGB").save(out / "images" / name, "JPEG", quality=90, optimize=True)
        rows.append({"patient_id": pid, "file": name, "slide_barcode": src.name.split(".")[0],
                     "mpp": 0.5, "source": "PathomicFusion (github mahmoodlab/PathomicFusion @44b5513) ROI, "
                     "re-encoded PNG->JPEG q90", "licence": PATHOMIC_LICENCE})
    images = pd.DataFrame(rows).sort_values("patient_id").reset_index(drop=True)
    images.to_csv(out / "images.csv", index=False)
    log.info("images: %d patients (%s)", len(images),
             ", ".join(f"{k} {v}" for k, v in patients.set_index("case_id").loc[images["patient_id"],
                                                                             "tcga_project"].value_counts().items()))
    return images


def check_sizes(out: Path) -> int:
    total = 0
    for f in out.rglob("*"):
        if f.is_file():
            size = f.stat().st_size
            total += size
            if size > MAX_FILE_BYTES:
                raise SystemExit(f"{f} is {size / 1e6:.1f} MB (> 5 MB)")
    if total > MAX_TOTAL_BYTES:
        raise SystemExit(f"demo data is {total / 1e6:.1f} MB (> 20 MB)")
    return total


def main() -> None:
    repo = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", type=Path, default=repo.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=repo / "src" / "oncofm" / "demo_data")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    readme = args.out / "README.md"
    saved_readme = readme.read_text() if readme.exists() else None
    build(args.shared, args.out)
    if saved_readme is not None:  # the README is hand-written; keep it
        readme.write_text(saved_readme)
    total = check_sizes(args.out)
    digest = hashlib.sha256()
    for f in sorted(p for p in args.out.rglob("*") if p.is_file() and p.name != "README.md"):
        digest.update(f.name.encode() + f.read_bytes())
    log.info("demo data: %.1f MB in %s (sha256 of contents %s)", total / 1e6, args.out, digest.hexdigest()[:16])


if __name__ == "__main__":
    main()
