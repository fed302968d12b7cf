"""The cohort's H&E images on disk: the import source's ``images.csv`` (the bundled demo cohort's real
images) and the demo patients that have one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from oncofm.cohort.schema import Col
from oncofm.paths import RunLayout

__all__ = ["demo_patients", "image_table", "import_source"]


def import_source(layout: RunLayout) -> Path | None:
    """The folder the run's cohort was imported from (from its saved settings), if it is a folder."""
    settings = layout.settings_file("cohort_import")
    if not settings.exists():
        return None
    source = (yaml.safe_load(settings.read_text()) or {}).get("source")
    return Path(source) if source and Path(source).is_dir() else None


def image_table(layout: RunLayout) -> pd.DataFrame:
    """``patient_id, path, mpp`` of the real H&E images listed in the import source's ``images.csv``."""
    src = import_source(layout)
    if src is None or not (src / "images.csv").is_file():
        return pd.DataFrame(columns=["patient_id", "path", "mpp"])
    table = pd.read_csv(src / "images.csv")
    folder = src / "images"
    return pd.DataFrame({"patient_id": table["patient_id"].astype(str),
                         "path": [str(folder / f) for f in table["file"].astype(str)],
                         "mpp": pd.to_numeric(table.get("mpp"), errors="coerce")})


def demo_patients(run: str | Path) -> list[dict[str, Any]]:
    """Cohort patients of the run that have a real H&E image on disk (the bundled demo patients)."""
    layout = RunLayout(run)
    images = image_table(layout)
    if images.empty or not layout.patients.exists():
        return []
    patients = pd.read_parquet(layout.patients, columns=[Col.PATIENT, Col.CANCER]).set_index(Col.PATIENT)
    splits = (pd.read_parquet(layout.splits).set_index(Col.PATIENT)["split"] if layout.splits.exists()
              else pd.Series(dtype=str))
    out = []
    for row in images.itertuples():
        if row.patient_id not in patients.index or not Path(row.path).is_file():
            continue
        out.append({"patient_id": row.patient_id, "cancer_type": str(patients.loc[row.patient_id, Col.CANCER]),
                    "split": str(splits.get(row.patient_id, "")), "has_slide": True})
    return sorted(out, key=lambda r: (r["cancer_type"], r["patient_id"]))
