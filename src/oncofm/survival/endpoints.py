"""Survival endpoints: administrative censoring at a horizon and the binary horizon label.

Conventions (shared by every stage):

- times are in days; ``DAYS_PER_YEAR = 365.25`` so 5 years = 1826.25 days (= 60 months of 30.4375 days);
- the binary label at horizon ``h`` is 1 for death at or before ``h``, 0 for follow-up beyond ``h``
  (alive or dead later), and missing (NaN) for patients censored before ``h`` — they have no binary label
  but are kept for survival metrics.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

DAYS_PER_YEAR = 365.25
DAYS_PER_MONTH = DAYS_PER_YEAR / 12


def horizon_days(years: float) -> float:
    """Number of days in ``years`` years."""
    return float(years) * DAYS_PER_YEAR


def horizon_label(time_days: npt.ArrayLike, event: npt.ArrayLike, years: float = 5.0) -> np.ndarray:
    """Binary label at the horizon: 1.0 death by then, 0.0 followed beyond, NaN censored before.

    Examples
    --------
    >>> horizon_label([100, 3000, 100], [1, 0, 0]).tolist()
    [1.0, 0.0, nan]
    """
    t = np.asarray(time_days, dtype=float)
    e = np.asarray(event, dtype=float)
    h = horizon_days(years)
    out = np.full(t.shape, np.nan)
    out[(e == 1) & (t <= h)] = 1.0
    out[t > h] = 0.0
    return out


def censor_at_horizon(time_days: npt.ArrayLike, event: npt.ArrayLike,
                      years: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Administratively censor survival data at ``years`` (None = no censoring).

    Events after the horizon become censored at the horizon.
    """
    t = np.asarray(time_days, dtype=float).copy()
    e = np.asarray(event, dtype=float).copy()
    if years is None:
        return t, e
    h = horizon_days(years)
    late = t > h
    t[late] = h
    e[late] = 0.0
    return t, e
