"""Shared fixtures: paths to the real data in ../shared/data and a once-per-session tcga13 import."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see oncofm.cli.main: no spinning threads on a shared CPU
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ONCOFM_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "tcga13" / "patients.csv").exists():
        pytest.fail(f"real data not found at {SHARED_DATA}; set ONCOFM_SHARED_DATA to the shared/data folder")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tcga13_run(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The full real tcga13 cohort imported and split (seed 0) once per test session. Read-only for tests."""
    from oncofm.cohort.importing import ImportSettings, import_cohort
    from oncofm.cohort.splits import SplitSettings, split_cohort

    run = tmp_path_factory.mktemp("tcga13_run")
    import_cohort(ImportSettings(format="tcga13", source=str(shared_data / "tcga13"), run=str(run)))
    split_cohort(SplitSettings(run=str(run)))
    return run
