"""Locations of bundled data (the real demo cohort shipped inside the package)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from oncofm.errors import OncoFMError


def demo_data_dir() -> Path:
    """Folder of the bundled demo cohort (tcga13 layout + H&E images); see its README for provenance."""
    path = Path(str(resources.files("oncofm") / "demo_data"))
    if not (path / "patients.csv").exists():
        raise OncoFMError(f"the bundled demo data is missing from {path}; reinstall OncoFM (make demo)")
    return path
