"""The registered cell designs: ``log-gbm`` (:mod:`.gbm`), ``unet`` and ``unet-ensemble`` (:mod:`.unet`)."""

from __future__ import annotations

from oncofm.errors import OncoFMError
from oncofm.pathology.cells import gbm as _gbm  # noqa: F401  (registers 'log-gbm')
from oncofm.pathology.cells import unet as _unet  # noqa: F401  (registers 'unet', 'unet-ensemble')
from oncofm.pathology.cells.designs import _DESIGNS


def list_designs() -> list[str]:
    """Names of every registered cell design."""
    return sorted(_DESIGNS)


def design_class(name: str) -> type:
    """The class registered as ``name``; an error naming the choices otherwise."""
    if name not in _DESIGNS:
        raise OncoFMError(f"unknown cell design {name!r}; choose one of {', '.join(sorted(_DESIGNS))}")
    return _DESIGNS[name]
