"""Atomic file writes: a stage's outputs appear whole or not at all.

Write to a temporary file in the same directory, then ``os.replace`` it onto the target, so an
interrupted run never leaves a truncated artifact that a later run would mistake for a finished one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd


@contextlib.contextmanager
def atomic_path(target: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; rename it onto ``target`` if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix or target.suffix or ".tmp",
                               dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600 files; artifacts get normal permissions
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_parquet(df: pd.DataFrame, target: str | Path, **kwargs: Any) -> Path:
    """Write ``df`` to parquet atomically and return the path."""
    with atomic_path(target) as tmp:
        df.to_parquet(tmp, **kwargs)
    return Path(target)


def write_json(obj: Any, target: str | Path) -> Path:
    """Write ``obj`` as indented JSON atomically (NaN written as null)."""
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(_clean(obj), indent=2, default=str) + "\n")
    return Path(target)


def save_figure(fig: Any, target: str | Path, **savefig_kwargs: Any) -> Path:
    """Save a matplotlib figure as PNG atomically, then close it (frees its memory)."""
    import matplotlib.pyplot as plt

    with atomic_path(target, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", **savefig_kwargs)
    plt.close(fig)
    return Path(target)


def write_text(text: str, target: str | Path) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(text)
    return Path(target)


def _clean(obj: Any) -> Any:
    import math

    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return _clean(obj.item())
    return obj


def model_version(model_dir: str | Path) -> str:
    """A short content hash of a model directory's weights and config: ``<name>@<12 hex>``.

    Hashes the names and bytes of the weight and config files (``.safetensors``, ``.yaml``, ``.json``,
    ``.bin``, ``.pt``; ``metrics.json`` excluded), and only the size of files over 64 MB.
    """
    import hashlib

    model_dir = Path(model_dir)
    h = hashlib.sha256()
    files = sorted(p for p in model_dir.rglob("*") if p.is_file() and p.suffix in
                   {".safetensors", ".yaml", ".json", ".bin", ".pt"} and p.name != "metrics.json"
                   and "training" not in p.relative_to(model_dir).parts and "fit" not in p.relative_to(model_dir).parts)
    for p in files:
        h.update(str(p.relative_to(model_dir)).encode())
        if p.stat().st_size < 64 * 2**20:
            h.update(p.read_bytes())
        else:
            h.update(str(p.stat().st_size).encode())
    return f"{model_dir.name}@{h.hexdigest()[:12]}" if files else f"{model_dir.name}@unversioned"


def open_h5(path: str | Path) -> Any:
    """An HDF5 file opened read-only, or an :class:`~oncofm.errors.OncoFMError` saying it is not readable."""
    import h5py

    from oncofm.errors import OncoFMError

    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise OncoFMError(f"{path}: not a readable HDF5 file ({exc})") from None


def first_dataset(handle: Any, keys: tuple[str, ...] | list[str]) -> str | None:
    """The first of ``keys`` that names a dataset in the open HDF5 ``handle`` (None when none does)."""
    import h5py

    return next((k for k in keys if k in handle and isinstance(handle[k], h5py.Dataset)), None)
