"""The layout of a run directory: every artifact path is defined here, never as scattered literals."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, TypeVar

from oncofm.errors import MissingArtifactError


@dataclass(frozen=True)
class RunLayout:
    """Paths of every artifact in one run directory.

    Examples
    --------
    >>> layout = RunLayout("runs/demo")
    >>> layout.patients.name
    'patients.parquet'
    """

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    # --- cohort ---
    @property
    def cohort_dir(self) -> Path:
        return self.root / "cohort"

    @property
    def patients(self) -> Path:
        return self.cohort_dir / "patients.parquet"

    @property
    def expression(self) -> Path:
        return self.cohort_dir / "expression.parquet"

    @property
    def cnv(self) -> Path:
        return self.cohort_dir / "cnv.parquet"

    @property
    def mutation(self) -> Path:
        return self.cohort_dir / "mutation.parquet"

    @property
    def splits(self) -> Path:
        return self.cohort_dir / "splits.parquet"

    @property
    def normalization(self) -> Path:
        return self.cohort_dir / "normalization.parquet"

    @property
    def slides_table(self) -> Path:
        return self.cohort_dir / "slides.parquet"

    @property
    def slide_features(self) -> Path:
        return self.cohort_dir / "slide_features.parquet"  # + slide_features.json (oncofm.cohort.slide_features)

    @property
    def downloads_dir(self) -> Path:
        """Raw downloads (e.g. GDC files) kept for resuming; outside cohort/ so a failed import leaves none there."""
        return self.root / "downloads"

    # --- cox / features ---
    @property
    def cox_dir(self) -> Path:
        return self.root / "cox"

    @property
    def coefficients(self) -> Path:
        return self.cox_dir / "coefficients.parquet"

    @property
    def features_dir(self) -> Path:
        return self.root / "features"

    # --- tiles ---
    @property
    def tiles_dir(self) -> Path:
        return self.root / "tiles"

    # --- models ---
    def model_dir(self, name: str) -> Path:
        return self.root / "models" / name

    @property
    def reasoning_dir(self) -> Path:
        return self.root / "reasoning"

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    def settings_file(self, stage: str) -> Path:
        """Where a stage's resolved settings are saved (beside its outputs)."""
        return self.root / "settings" / f"{stage}.yaml"

    def require(self, path: Path, hint: str) -> Path:
        """Return ``path`` if it exists, else raise an error that says which command makes it."""
        if not path.exists():
            raise MissingArtifactError(path, hint)
        return path


A = TypeVar("A", bound="ModelArtifacts")


@dataclass(frozen=True)
class ModelArtifacts:
    """Base of a model's artifacts class: the files of ``RUN/models/<name>/`` as properties."""

    dir: Path
    name: ClassVar[str] = ""

    @classmethod
    def of(cls: type[A], run: str | Path) -> A:
        return cls(RunLayout(run).model_dir(cls.name))
