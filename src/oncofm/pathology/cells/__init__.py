"""Cell-type model: nuclei detected and classified as inflammatory, epithelial (tumour) or stromal.

Trained on the BRCA-M2C dot annotations (split by patient), see ``docs/cells.md``. The public API:

>>> from oncofm.pathology.cells import CellModel, cell_findings, compare_findings    # doctest: +SKIP
>>> model = CellModel.load("/tmp/cells_run/model")                                  # doctest: +SKIP
>>> top = cell_findings(model, top_patches, mpp=0.5)      # per patch: counts, densities, fractions
>>> slide = cell_findings(model, all_patches, mpp=0.5)                              # doctest: +SKIP
>>> compare_findings(top, slide)["inflammatory_density"].ratio                      # doctest: +SKIP

Heavy modules (torch) load only when a model is loaded or trained.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "CLASSES": "data", "Detections": "designs", "MEASURES": "findings", "CellFindings": "findings",
    "CellMeasure": "findings", "cell_findings": "findings", "compare_findings": "findings",
    "pool_findings": "findings", "CellModel": "model",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    # lazy: `oncofm --help` imports the CLI module of this package without numpy, pandas or torch
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"oncofm.pathology.cells.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
