"""Benjamini–Hochberg false discovery rate (q-values), NaN-aware.

``bh_qvalues(p)`` equals ``statsmodels.stats.multitest.multipletests(p, method="fdr_bh")[1]`` on the
non-missing p-values; missing p-values (failed fits) stay NaN and do not count as tests.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pandas as pd

__all__ = ["bh_qvalues", "bh_by_group"]


def bh_qvalues(p: npt.ArrayLike) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (q-values) of ``p``; NaN in, NaN out.

    Examples
    --------
    >>> bh_qvalues([0.01, 0.04, 0.03, np.nan]).round(3).tolist()
    [0.03, 0.04, 0.04, nan]
    """
    p = np.asarray(p, dtype=np.float64)
    if ((p < 0) | (p > 1)).any():
        raise ValueError("p-values must lie in [0, 1]")
    q = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = len(ok)
    if m == 0:
        return q
    order = ok[np.argsort(p[ok], kind="mergesort")]                  # ascending p
    ranked = p[order] * m / np.arange(1, m + 1)
    ranked = np.minimum.accumulate(ranked[::-1])[::-1]                # step-up: monotone from the top
    q[order] = np.minimum(ranked, 1.0)
    return q


def bh_by_group(df: pd.DataFrame, group: str, p: str = "p") -> pd.Series:
    """BH q-values of column ``p`` computed separately within each value of column ``group``."""
    out = pd.Series(np.nan, index=df.index, dtype=np.float64)
    for _, idx in df.groupby(group, sort=False).groups.items():
        out.loc[idx] = bh_qvalues(df.loc[idx, p].to_numpy())
    return out
