"""Batched univariate Cox proportional-hazards models: one Newton–Raphson for thousands of genes at once.

:class:`BatchedCoxPH` fits, for every column ``g`` of ``X``, the one-covariate Cox model
``h(t | x) = h0(t) exp(beta_g x_g)`` (optionally stratified), exactly as ``lifelines.CoxPHFitter`` (Efron
ties) or ``statsmodels`` ``PHReg(ties="breslow")`` would fit them one by one, but vectorised over genes.

How it batches
--------------
Patients are sorted by time once (descending), so every risk set ``R_k = {i: t_i >= t_k}`` is a prefix:
the risk-set sums ``S_r(k) = sum_{i in R_k} x_i^r exp(beta x_i)`` (r = 0, 1, 2) for all unique event times
and all genes are one cumulative sum over patients of a ``(3, n, G)`` tensor, gathered at the prefix ends.
Efron's tie correction needs the same sums over the deaths at each event time (an ``index_add``), and
then one term per death: ``l``-th of the ``d_k`` deaths at time ``t_k`` has denominator
``S_0(k) - (l / d_k) S_0^D(k)`` (Breslow: ``l / d_k`` replaced by 0). Log-likelihood, score and
information are sums of these ``(n_deaths, G)`` terms, so one Newton step for every gene costs a few
passes over an ``(n, G)`` array. A stratified model (``strata=``) sums the same quantities over strata.

Numerics: float64 throughout; each gene is centred within each stratum (the coefficient is unchanged)
and the linear predictor is shifted by its per-gene maximum before ``exp`` (the partial likelihood is
invariant to that shift), so nothing overflows. A step that lowers the log-likelihood is halved.
A gene leaves the batch once its Newton step is below ``tol``.

Honest failures give NaN (never inf) with the reason in ``note_``; a :class:`ConvergenceWarning`
counts them: fewer than ``min_events`` events, missing values only, a constant gene, complete
separation (the log hazard ratio across the gene's observed range, ``|beta| * (max x - min x)``, exceeds
``max_log_hr``, or the information vanishes; the note then says whether the likelihood is exactly
monotone — every death has the highest, or every death the lowest, value in its risk set, so the
estimate is infinite — or only diverging), or no convergence within ``max_iter`` iterations.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

__all__ = ["BatchedCoxPH", "ConvergenceWarning", "FirthResult", "NOTE_CONSTANT", "NOTE_FEW_CARRIERS", "NOTE_FEW_EVENTS",
           "NOTE_FIRTH", "NOTE_MISSING", "NOTE_NOT_CONVERGED", "NOTE_SEPARATION", "TIES", "firth_cox",
           "penalized_loglik"]

TIES = ("efron", "breslow")
_CACHE_CHUNK = 512  # genes per chunk at most: small chunks keep the working set in cache

# Notes (the ``note`` column): a failed gene's note starts with one of these.
NOTE_FEW_EVENTS = "too few events"
NOTE_MISSING = "no non-missing values"
NOTE_CONSTANT = "constant"
NOTE_SEPARATION = "complete separation"
NOTE_NOT_CONVERGED = "did not converge"
NOTE_FEW_CARRIERS = "too few carriers"  # binary / sparse layers: fewer patients with a non-zero value than asked
NOTE_FIRTH = "firth"  # separated, estimated with Firth's penalised partial likelihood (a valid estimate)

try:  # scikit-learn's class when available, so `warnings.filterwarnings(..., ConvergenceWarning)` works
    from sklearn.exceptions import ConvergenceWarning
except ImportError:  # pragma: no cover - sklearn is a dependency
    class ConvergenceWarning(UserWarning):  # type: ignore[no-redef]
        """Some fits did not give an estimate."""


@dataclass
class _Stratum:
    """One stratum's survival structure, patients sorted by time descending (risk sets are prefixes).

    Only rows that belong to at least one risk set are kept (patients censored before the first event
    time contribute nothing). Positions below index the kept rows.
    """

    rows: np.ndarray        # (m,) row indices into X, time descending
    end: np.ndarray         # (K,) last position of each event time's risk set (prefix end)
    d: np.ndarray           # (K,) float: deaths at each event time
    death_pos: np.ndarray   # (D,) positions of the deaths
    death_end: np.ndarray   # (D,) prefix end of each death's risk set
    tied_k: np.ndarray      # (Kt,) event-time index of each tied event time (d_k > 1)
    tied_pos: np.ndarray    # (Dt,) positions of the deaths at tied times, grouped by time
    tied_start: np.ndarray  # (Kt,) start of each tied time's group within tied_pos (for reduceat)
    extra_slot: np.ndarray  # (E,) tied time (0..Kt-1) of each extra Efron term, l = 1..d_k-1
    extra_a: np.ndarray     # (E,) its fraction l / d_k
    n_events: int


def _build_stratum(time: np.ndarray, event: np.ndarray, rows: np.ndarray) -> _Stratum | None:
    t, e = time[rows], event[rows]
    if e.sum() == 0:
        return None
    order = np.lexsort((-e, -t))           # time descending; at equal times deaths first (contiguous)
    rows, t, e = rows[order], t[order], e[order]
    event_times = np.unique(t[e == 1])[::-1]                                # (K,) descending
    n_at_risk = np.searchsorted(-t, -event_times, side="right")             # |{i: t_i >= t_k}|
    keep = int(n_at_risk[-1])                                               # later rows: in no risk set
    rows, t, e = rows[:keep], t[:keep], e[:keep]
    death_pos = np.flatnonzero(e == 1)
    death_k = np.searchsorted(-event_times, -t[death_pos])                  # event-time index of each death
    d = np.bincount(death_k, minlength=len(event_times))                    # (K,)
    tied_k = np.flatnonzero(d > 1)                                          # (Kt,)
    dt = d[tied_k]
    extra_slot = np.repeat(np.arange(len(tied_k)), dt - 1)                  # l = 1..d_k-1 per tied time
    starts = np.cumsum(dt - 1) - (dt - 1)
    extra_l = np.arange(len(extra_slot)) - np.repeat(starts, dt - 1) + 1
    return _Stratum(rows=rows, end=n_at_risk - 1, d=d.astype(np.float64), death_pos=death_pos,
                    death_end=(n_at_risk - 1)[death_k], tied_k=tied_k,
                    tied_pos=death_pos[d[death_k] > 1], tied_start=np.cumsum(dt) - dt, extra_slot=extra_slot,
                    extra_a=(extra_l / np.repeat(dt, dt - 1))[None, :], n_events=int(e.sum()))


@dataclass
class _Block:
    """One stratum's slice of a gene chunk: centred covariates and per-gene constants."""

    x: np.ndarray     # (A, m) float64, genes × patients (rows contiguous), centred per gene
    xd: np.ndarray    # (A,) sum of x over deaths
    xmax: np.ndarray  # (A,)
    xmin: np.ndarray  # (A,)

    @classmethod
    def make(cls, x: np.ndarray, st: _Stratum) -> _Block:
        x = x - x.mean(axis=1, keepdims=True)  # centring within the stratum leaves the coefficient unchanged
        return cls(x=x, xd=x[:, st.death_pos].sum(1), xmax=x.max(1), xmin=x.min(1))

    def select(self, keep: np.ndarray) -> _Block:
        return _Block(self.x[keep], self.xd[keep], self.xmax[keep], self.xmin[keep])


def _loglik_grad_info(b: np.ndarray, blocks: Sequence[_Block], strata: Sequence[_Stratum],
                      efron: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Partial log-likelihood, score and information of every gene at ``b`` (A,), summed over strata."""
    ll = np.zeros_like(b)
    grad = np.zeros_like(b)
    info = np.zeros_like(b)
    bc = b[:, None]
    for blk, st in zip(blocks, strata, strict=True):
        x = blk.x                                                      # (A, m)
        shift = np.where(b >= 0, b * blk.xmax, b * blk.xmin)           # (A,) = max_i b x_i, so exp(.) <= 1
        e = x * bc
        e -= shift[:, None]
        np.exp(e, out=e)                                               # (A, m) exp(b x - shift)
        xe = x * e
        x2e = xe * x
        ties = efron and len(st.tied_k) > 0
        if ties:                                                       # death sums at tied times (A, Kt)
            dsum = [np.add.reduceat(v[:, st.tied_pos], st.tied_start, axis=1) for v in (e, xe, x2e)]
        r0, r1, r2 = (np.cumsum(v, axis=1)[:, st.end] for v in (e, xe, x2e))  # (A, K) risk-set sums
        m1 = r1 / r0
        var = r2 / r0 - m1 * m1
        w = np.ones_like(st.d) if efron else st.d                      # Breslow: each time counted d_k times
        # each of the n_events denominators was scaled by e^-shift, hence the last term
        ll += b * blk.xd - np.log(r0) @ w - st.n_events * shift
        grad += blk.xd - m1 @ w
        info += var @ w
        if ties:                                                       # Efron's terms l = 1..d_k-1
            slot = st.extra_slot
            den0, den1, den2 = (r[:, st.tied_k][:, slot] - st.extra_a * ds[:, slot]
                                for r, ds in zip((r0, r1, r2), dsum, strict=True))
            em1 = den1 / den0
            ll -= np.log(den0).sum(1)
            grad -= em1.sum(1)
            info += (den2 / den0 - em1 * em1).sum(1)
    return ll, grad, info


class BatchedCoxPH:
    """Univariate Cox models for every column of ``X`` at once (scikit-survival style estimator).

    Parameters
    ----------
    ties : {"efron", "breslow"}
        Handling of tied event times. Efron (default) matches R ``coxph`` and lifelines; Breslow matches
        statsmodels ``PHReg`` (its default) and scikit-survival's ``CoxPHSurvivalAnalysis``.
    tol : float
        A gene has converged when its Newton step ``|score / information|`` is below ``tol``.
    max_iter : int
        Newton iterations per gene before it is reported as not converged.
    chunk_size : int or None
        Genes fitted together; ``None`` chooses it from ``memory_mb`` and the number of patients.
    memory_mb : float
        Working-memory budget used to choose ``chunk_size`` (about 10 float64 arrays of n × chunk).
    min_events : int
        Fewer events than this (after dropping missing values) gives NaN with a note.
    max_log_hr : float
        Separation is declared when ``|coef| * (max x - min x)`` exceeds this (a hazard ratio of
        ``e^max_log_hr`` between the gene's lowest and highest value), or when the information vanishes.
        The note says whether the likelihood is exactly monotone (complete separation).
    max_halvings : int
        Step halvings allowed within one iteration when the log-likelihood decreases.

    Attributes
    ----------
    coef_, se_, z_, p_ : ndarray of shape (G,)
        Log hazard ratio per unit of ``x``, its Wald standard error, ``coef / se`` and the two-sided
        Wald p-value. NaN where the fit failed.
    converged_ : ndarray of bool, shape (G,)
    note_ : ndarray of str, shape (G,)
        ``""`` for a good fit, else why it failed (starts with one of the ``NOTE_*`` constants).
    n_, events_ : ndarray of int, shape (G,)
        Patients and events used for each gene (rows with missing values are dropped per gene).
    n_iter_ : ndarray of int, shape (G,)
    loglik_ : ndarray of shape (G,)
        Partial log-likelihood at ``coef_``.
    summary_ : DataFrame
        One row per gene (index ``gene``) with columns coef, se, z, p, n, events, converged, note.
    feature_names_in_ : ndarray of str

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(200, 3)); t = rng.exponential(np.exp(-0.5 * x[:, 0])); e = np.ones(200)
    >>> fit = BatchedCoxPH().fit(x, t, e)
    >>> bool(0.3 < fit.coef_[0] < 0.7)
    True
    """

    def __init__(self, ties: str = "efron", tol: float = 1e-9, max_iter: int = 50,
                 chunk_size: int | None = None, memory_mb: float = 512.0, min_events: int = 1,
                 max_log_hr: float = 30.0, max_halvings: int = 30) -> None:
        self.ties = ties
        self.tol = tol
        self.max_iter = max_iter
        self.chunk_size = chunk_size
        self.memory_mb = memory_mb
        self.min_events = min_events
        self.max_log_hr = max_log_hr
        self.max_halvings = max_halvings

    # --- validation -------------------------------------------------------------------------------
    def _validate_params(self) -> None:
        if self.ties not in TIES:
            raise ValueError(f"ties must be one of {TIES}, got {self.ties=}")
        if not self.tol > 0:
            raise ValueError(f"tol must be positive, got {self.tol=}")
        if int(self.max_iter) < 1:
            raise ValueError(f"max_iter must be at least 1, got {self.max_iter=}")
        if self.chunk_size is not None and int(self.chunk_size) < 1:
            raise ValueError(f"chunk_size must be None or at least 1, got {self.chunk_size=}")
        if not self.memory_mb > 0:
            raise ValueError(f"memory_mb must be positive, got {self.memory_mb=}")
        if int(self.min_events) < 1:
            raise ValueError(f"min_events must be at least 1, got {self.min_events=}")
        if not self.max_log_hr > 0:
            raise ValueError(f"max_log_hr must be positive, got {self.max_log_hr=}")

    @staticmethod
    def _validate_data(X: Any, time: npt.ArrayLike, event: npt.ArrayLike,
                       strata: npt.ArrayLike | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                                              np.ndarray]:
        # keep float32 input as float32 (chunks are converted to float64 when fitted): halves peak memory
        if isinstance(X, pd.DataFrame):
            names = np.asarray(X.columns.astype(str))
            x = X.to_numpy()
        else:
            x = np.asarray(X)
            if x.ndim == 1:
                x = x[:, None]
            names = np.asarray([f"x{i}" for i in range(x.shape[1] if x.ndim == 2 else 0)])
        if x.dtype not in (np.float32, np.float64):
            x = x.astype(np.float64)
        if x.ndim != 2:
            raise ValueError(f"X must be 2-D (patients × genes), got shape {x.shape}")
        t = np.asarray(time, dtype=np.float64).ravel()
        e = np.asarray(event, dtype=np.float64).ravel()
        n = x.shape[0]
        if len(t) != n or len(e) != n:
            raise ValueError(f"X has {n} rows but time has {len(t)} and event {len(e)}; they must match")
        if not np.all(np.isfinite(t)) or (t < 0).any():
            raise ValueError("time must be finite and >= 0 for every patient")
        if not np.isin(e, (0.0, 1.0)).all():
            raise ValueError("event must be 0 (censored) or 1 (death) for every patient")
        if np.isinf(x).any():
            raise ValueError("X contains inf; use NaN for missing values")
        if strata is None:
            s = np.zeros(n, dtype=np.int64)
        else:
            s_raw = np.asarray(strata).ravel()
            if len(s_raw) != n:
                raise ValueError(f"strata has {len(s_raw)} values for {n} patients")
            s = pd.factorize(s_raw)[0].astype(np.int64)
        return x, t, e, s, names

    # --- fitting ----------------------------------------------------------------------------------
    def fit(self, X: Any, time: npt.ArrayLike, event: npt.ArrayLike,
            strata: npt.ArrayLike | None = None) -> BatchedCoxPH:
        """Fit one Cox model per column of ``X``.

        Parameters
        ----------
        X : array-like or DataFrame of shape (n_patients, n_genes)
            Covariates; NaN marks a missing value (that patient is left out of that gene's model).
        time : array-like of shape (n_patients,)
            Follow-up time (any unit).
        event : array-like of shape (n_patients,)
            1 for an observed death, 0 for censoring.
        strata : array-like of shape (n_patients,), optional
            Stratum labels (e.g. cancer types): a stratified Cox model with one baseline hazard per
            stratum and a common coefficient.

        Returns
        -------
        self
        """
        self._validate_params()
        x, t, e, s, names = self._validate_data(X, time, event, strata)
        n, g = x.shape
        self.feature_names_in_ = names
        self.n_features_in_ = g
        self.coef_ = np.full(g, np.nan)
        self.se_ = np.full(g, np.nan)
        self.loglik_ = np.full(g, np.nan)
        self.converged_ = np.zeros(g, dtype=bool)
        self.n_iter_ = np.zeros(g, dtype=np.int64)
        self.n_ = np.zeros(g, dtype=np.int64)
        self.events_ = np.zeros(g, dtype=np.int64)
        self.note_ = np.full(g, "", dtype=object)

        missing = np.isnan(x)
        for cols, rows in _missingness_groups(missing):
            self.n_[cols] = len(rows)
            self.events_[cols] = int(e[rows].sum())
            if len(rows) == 0:
                self.note_[cols] = NOTE_MISSING
                continue
            if e[rows].sum() < self.min_events:
                self.note_[cols] = f"{NOTE_FEW_EVENTS} ({int(e[rows].sum())} < min_events={self.min_events})"
                continue
            strata_list = [st for k in np.unique(s[rows])
                           if (st := _build_stratum(t, e, rows[s[rows] == k])) is not None]
            self._fit_group(x, cols, strata_list)

        self.z_ = self.coef_ / self.se_
        self.p_ = wald_p(self.z_)
        self._warn()
        return self

    def _chunk(self, n_rows: int) -> int:
        if self.chunk_size is not None:
            return int(self.chunk_size)
        per_gene = 8 * 8 * max(n_rows, 1)  # ~8 float64 arrays of (n, chunk) live at once
        return max(1, min(_CACHE_CHUNK, int(self.memory_mb * 2**20 // per_gene)))

    def _fit_group(self, x: np.ndarray, cols: np.ndarray, strata: list[_Stratum]) -> None:
        """Fit the genes ``cols`` (complete on the rows of ``strata``) in memory-bounded chunks."""
        n_rows = sum(len(st.rows) for st in strata)
        size = self._chunk(n_rows)
        for start in range(0, len(cols), size):
            chunk = cols[start:start + size]
            blocks = [_Block.make(x[np.ix_(st.rows, chunk)].T.astype(np.float64, order="C"), st) for st in strata]
            self._newton(blocks, strata, chunk)

    def _newton(self, blocks: list[_Block], strata: list[_Stratum], cols: np.ndarray) -> None:
        """Batched Newton–Raphson with step halving; genes leave the batch when they finish."""
        efron = self.ties == "efron"
        m = sum(blk.x.shape[1] for blk in blocks)
        sd = np.sqrt(sum((blk.x * blk.x).sum(1) for blk in blocks) / m)             # (A,) within-stratum sd
        scale = np.max([np.maximum(np.abs(blk.xmax), np.abs(blk.xmin)) for blk in blocks], axis=0)
        constant = sd <= 1e-12 * np.maximum(1.0, scale)
        where = " within every stratum" if len(blocks) > 1 else ""
        self.note_[cols[constant]] = f"{NOTE_CONSTANT} (no variation{where})"
        span_all = np.max([blk.xmax - blk.xmin for blk in blocks], axis=0)
        active = np.flatnonzero(~constant)                                           # positions within cols
        if len(active) < len(cols):
            blocks = [blk.select(active) for blk in blocks]
        n_events = sum(st.n_events for st in strata)
        sd_a = sd[active]
        span = span_all[active]                                                      # (A,) observed range
        b = np.zeros(len(active))
        ll, grad, info = _loglik_grad_info(b, blocks, strata, efron)
        with np.errstate(divide="ignore", invalid="ignore"):
            step = grad / info
        halvings = np.zeros(len(active), dtype=np.int64)
        n_iter = np.zeros(len(active), dtype=np.int64)

        while len(active):
            no_info = ~(info > 1e-12 * n_events * sd_a**2)                     # information vanished (or NaN)
            # checked before convergence: on a monotone likelihood the score can underflow to 0 far out
            diverged = no_info | ~np.isfinite(step) | (np.abs(b + step) * span > self.max_log_hr)
            done = (np.abs(step) < self.tol) & ~diverged
            out_of_iter = (n_iter >= self.max_iter) & ~done & ~diverged
            idx = cols[active[done]]
            self.coef_[idx] = (b + step)[done]                                  # the last (tiny) step for free
            self.se_[idx] = 1.0 / np.sqrt(info[done])
            self.loglik_[idx] = ll[done]
            self.converged_[idx] = True
            if diverged.any():
                self._note_separation(blocks, strata, cols[active[diverged]], diverged)
            self.note_[cols[active[out_of_iter]]] = f"{NOTE_NOT_CONVERGED} in max_iter={self.max_iter} iterations"
            self.n_iter_[cols[active]] = n_iter
            keep = ~(done | diverged | out_of_iter)
            if not keep.all():                                                  # finished genes leave the batch
                blocks = [blk.select(keep) for blk in blocks]
                b, ll, grad, info, step = b[keep], ll[keep], grad[keep], info[keep], step[keep]
                active, halvings, n_iter, sd_a, span = (active[keep], halvings[keep], n_iter[keep], sd_a[keep],
                                                        span[keep])
                if not len(active):
                    break
            # propose the Newton step; halve it where the log-likelihood went down
            b_try = b + step
            with np.errstate(all="ignore"):
                ll_t, grad_t, info_t = _loglik_grad_info(b_try, blocks, strata, efron)
                worse = ~(ll_t >= ll - 1e-12 * (1.0 + np.abs(ll))) & (halvings < self.max_halvings)
                accept = ~worse
                b = np.where(accept, b_try, b)
                ll = np.where(accept, ll_t, ll)
                grad = np.where(accept, grad_t, grad)
                info = np.where(accept, info_t, info)
                step = np.where(accept, grad / info, step / 2)
            halvings = np.where(worse, halvings + 1, 0)
            n_iter = n_iter + 1

    def _note_separation(self, blocks: list[_Block], strata: list[_Stratum], idx: np.ndarray,
                         mask: np.ndarray) -> None:
        """Notes for diverging genes: exact complete separation (monotone likelihood), or a diverging fit."""
        monotone = _monotone_likelihood([blk.select(mask) for blk in blocks], strata)
        self.note_[idx[monotone]] = (f"{NOTE_SEPARATION} (every death has the extreme value in its risk set: "
                                     "the likelihood is monotone, the estimate infinite)")
        self.note_[idx[~monotone]] = (f"{NOTE_SEPARATION} (quasi: coefficient diverges, |coef| * range(x) > "
                                      f"{self.max_log_hr:g}, or the information vanishes)")

    def _warn(self) -> None:
        bad = self.note_ != ""
        if not bad.any():
            return
        kinds = Counter(str(note).split(" (")[0] for note in self.note_[bad])
        detail = ", ".join(f"{count} {kind}" for kind, count in kinds.most_common())
        warnings.warn(f"BatchedCoxPH: {int(bad.sum())} of {len(bad)} genes have no estimate (NaN): {detail}; "
                      "see note_ / the 'note' column", ConvergenceWarning, stacklevel=3)

    # --- results ----------------------------------------------------------------------------------
    @property
    def summary_(self) -> pd.DataFrame:
        """One row per gene: coef, se, z, p, n, events, converged, note."""
        if not hasattr(self, "coef_"):
            raise AttributeError("summary_ is available after fit()")
        return pd.DataFrame({"coef": self.coef_, "se": self.se_, "z": self.z_, "p": self.p_, "n": self.n_,
                             "events": self.events_, "converged": self.converged_,
                             "note": self.note_.astype(str)},
                            index=pd.Index(self.feature_names_in_, name="gene"))


def _monotone_likelihood(blocks: Sequence[_Block], strata: Sequence[_Stratum]) -> np.ndarray:
    """(A,) True where the partial likelihood is monotone in the coefficient (no finite estimate).

    The log-likelihood is concave, and its score tends to ``sum_deaths (x_death - max_{risk set} x)`` as
    the coefficient grows (Breslow and Efron alike), which is <= 0 and 0 exactly when every death has
    the largest value in its risk set (in every stratum); likewise towards -inf with the smallest.
    """
    up = np.ones(blocks[0].x.shape[0], dtype=bool)
    down = up.copy()
    for blk, st in zip(blocks, strata, strict=True):
        xd = blk.x[:, st.death_pos]                                              # (A, D)
        tol = 1e-12 * np.maximum(1.0, np.maximum(np.abs(blk.xmax), np.abs(blk.xmin)))[:, None]
        up &= (xd >= np.maximum.accumulate(blk.x, axis=1)[:, st.death_end] - tol).all(axis=1)
        down &= (xd <= np.minimum.accumulate(blk.x, axis=1)[:, st.death_end] + tol).all(axis=1)
    return up | down


def _missingness_groups(missing: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Group genes by their pattern of missing patients: ``[(gene columns, complete rows), ...]``."""
    n, g = missing.shape
    any_missing = missing.any(axis=0)
    groups: list[tuple[np.ndarray, np.ndarray]] = []
    complete = np.flatnonzero(~any_missing)
    if len(complete):
        groups.append((complete, np.arange(n)))
    partial = np.flatnonzero(any_missing)
    if len(partial):
        packed = np.packbits(missing[:, partial], axis=0).T                     # (P, ceil(n/8))
        keys = packed.view(np.dtype((np.void, packed.shape[1]))).ravel()
        _, inverse = np.unique(keys, return_inverse=True)
        for k in range(inverse.max() + 1):
            cols = partial[inverse == k]
            groups.append((cols, np.flatnonzero(~missing[:, cols[0]])))
    return groups


def wald_p(z: npt.ArrayLike) -> np.ndarray:
    """Two-sided normal p-value of Wald statistics ``z`` (NaN stays NaN)."""
    from scipy.special import ndtr

    return 2.0 * ndtr(-np.abs(np.asarray(z, dtype=float)))



# ------------------------------------------------------------------------------------------------------
# Firth-type correction for separated covariates (Heinze & Schemper 2001, Stat Med 21: 2409)
@dataclass
class FirthResult:
    """Firth-penalised univariate Cox fits, one entry per column (NaN where no fit was possible)."""

    coef: np.ndarray     # maximiser of l(b) + 0.5 log I(b)
    se: np.ndarray       # 1 / sqrt(I(coef)), the information of the unpenalised likelihood at the estimate
    z: np.ndarray        # signed root of the penalised likelihood-ratio statistic
    p: np.ndarray        # penalised likelihood-ratio test of b = 0 (chi-square, 1 df), as R coxphf
    loglik: np.ndarray   # penalised log-likelihood at coef


def _prepare(X: Any, time: npt.ArrayLike, event: npt.ArrayLike, strata: npt.ArrayLike | None):  # noqa: ANN202
    return BatchedCoxPH._validate_data(X, time, event, strata)


def penalized_loglik(b: np.ndarray, blocks: Sequence[_Block], strata: Sequence[_Stratum],
                     efron: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(l(b) + 0.5 log I(b), l(b), I(b))`` for every gene of ``blocks`` at ``b`` (A,)."""
    with np.errstate(all="ignore"):
        ll, _, info = _loglik_grad_info(b, blocks, strata, efron)
        pen = ll + 0.5 * np.log(np.maximum(info, 0.0))
    return np.where(np.isnan(pen), -np.inf, pen), ll, info


def firth_cox(X: Any, time: npt.ArrayLike, event: npt.ArrayLike, strata: npt.ArrayLike | None = None, *,
              ties: str = "efron", max_log_hr: float = 30.0, grid: int = 121, iters: int = 90) -> FirthResult:
    """Firth-penalised univariate Cox models, one per column of ``X`` (NaN = missing, as :class:`BatchedCoxPH`).

    Firth's correction maximises ``l*(b) = l(b) + 0.5 log I(b)`` (the Jeffreys-prior penalty), which has a
    finite maximum even when the plain partial likelihood is monotone (complete separation, e.g. a mutation
    whose carriers all survive the horizon). The one coefficient is found by a coarse grid over
    ``|b| * range(x) <= max_log_hr`` and a golden-section search around its best point (vectorised over
    genes). ``p`` is the penalised likelihood-ratio test ``2 (l*(coef) - l*(0))`` (chi-square, 1 df), as
    R's ``coxphf``; ``z`` its signed root, so ``p = 2 Phi(-|z|)``; ``se = 1 / sqrt(I(coef))``.
    """
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties=}")
    x, t, e, s, _ = _prepare(X, time, event, strata)
    efron = ties == "efron"
    g = x.shape[1]
    out = FirthResult(*(np.full(g, np.nan) for _ in range(5)))
    for cols, rows in _missingness_groups(np.isnan(x)):
        if len(rows) == 0 or e[rows].sum() == 0:
            continue
        strata_list = [st for k in np.unique(s[rows]) if (st := _build_stratum(t, e, rows[s[rows] == k])) is not None]
        blocks = [_Block.make(x[np.ix_(st.rows, cols)].T.astype(np.float64, order="C"), st) for st in strata_list]
        span = np.max([blk.xmax - blk.xmin for blk in blocks], axis=0)
        ok = span > 0
        if not ok.any():
            continue
        blocks = [blk.select(ok) for blk in blocks]
        cols, span = cols[ok], span[ok]
        bound = max_log_hr / span                                                  # (A,)
        steps = np.linspace(-1.0, 1.0, grid)
        values = np.stack([penalized_loglik(k * bound, blocks, strata_list, efron)[0] for k in steps])  # (grid, A)
        best = np.argmax(values, axis=0)
        lo = steps[np.maximum(best - 1, 0)] * bound
        hi = steps[np.minimum(best + 1, grid - 1)] * bound
        ratio = (np.sqrt(5.0) - 1.0) / 2.0
        c, d = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        fc = penalized_loglik(c, blocks, strata_list, efron)[0]
        fd = penalized_loglik(d, blocks, strata_list, efron)[0]
        for _ in range(iters):                                                     # golden section (maximise)
            left = fc >= fd                                                        # the maximum lies in [lo, d]
            hi = np.where(left, d, hi)
            lo = np.where(left, lo, c)
            new_c, new_d = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
            f_new = penalized_loglik(np.where(left, new_c, new_d), blocks, strata_list, efron)[0]
            c, d, fc, fd = (np.where(left, new_c, d), np.where(left, c, new_d),
                            np.where(left, f_new, fd), np.where(left, fc, f_new))
        b = (lo + hi) / 2.0
        pen, _, info = penalized_loglik(b, blocks, strata_list, efron)
        pen0 = penalized_loglik(np.zeros_like(b), blocks, strata_list, efron)[0]
        stat = np.maximum(2.0 * (pen - pen0), 0.0)
        good = np.isfinite(pen) & (info > 0)
        idx = cols[good]
        out.coef[idx] = b[good]
        out.se[idx] = 1.0 / np.sqrt(info[good])
        out.z[idx] = np.sign(b[good]) * np.sqrt(stat[good])
        out.p[idx] = wald_p(out.z[idx])
        out.loglik[idx] = pen[good]
    return out
