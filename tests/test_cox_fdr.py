"""Benjamini–Hochberg q-values against statsmodels' multipletests(method="fdr_bh")."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from statsmodels.stats.multitest import multipletests

from oncofm.survival.fdr import bh_by_group, bh_qvalues


def test_bh_matches_statsmodels_with_ties_and_nan() -> None:
    rng = np.random.default_rng(0)
    p = np.concatenate([rng.random(500) ** 4, [0.5, 0.5, 0.5, 1.0, 0.0]])  # includes tied p-values
    p_nan = p.copy()
    p_nan[[3, 77, 200]] = np.nan
    q = bh_qvalues(p_nan)
    ok = ~np.isnan(p_nan)
    np.testing.assert_allclose(q[ok], multipletests(p_nan[ok], method="fdr_bh")[1], rtol=0, atol=1e-15)
    assert np.isnan(q[~ok]).all()


def test_bh_within_groups() -> None:
    rng = np.random.default_rng(1)
    df = pd.DataFrame({"g": np.repeat(["a", "b", "c"], [10, 50, 1]), "p": rng.random(61) ** 2})
    q = bh_by_group(df, "g")
    for _, part in df.groupby("g"):
        np.testing.assert_allclose(q[part.index], multipletests(part["p"], method="fdr_bh")[1], atol=1e-15)


def test_bh_rejects_invalid_p() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        bh_qvalues([0.1, 1.5])
    assert np.isnan(bh_qvalues([np.nan, np.nan])).all()
