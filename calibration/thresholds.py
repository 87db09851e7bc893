"""Flag and block thresholds with a confidence promise: one-sided Clopper-Pearson bounds on precision and recall.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> p = rng.random(5000)
>>> y = (rng.random(5000) < p).astype(int)                 # perfectly calibrated
>>> th = choose_thresholds(p, y, block_precision=0.9, flag_recall=None)
>>> th.block_bound >= 0.9, th.flag
(True, None)
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from safeclip.artifacts import jsonable

from ._validate import CalibrationWarning, check_scores

__all__ = [
    "BOUND",
    "WEIGHTED_BOUND",
    "ThresholdRates",
    "ThresholdWarning",
    "Thresholds",
    "choose_thresholds",
    "effective_n",
    "naive_threshold",
    "precision_lower_bound",
    "rates_at",
    "recall_lower_bound",
]

BOUND = "clopper-pearson, one-sided"
"""The confidence bound every unweighted :class:`Thresholds` records."""
WEIGHTED_BOUND = "clopper-pearson, one-sided, on counts in units of the heaviest weight"
"""The bound of weighted thresholds (``sample_weight``): see :func:`choose_thresholds`."""
_MAX_STRATA = 16  # more distinct weights than this are grouped into quantile strata (see _Strata)


class ThresholdWarning(CalibrationWarning):
    """The data cannot support a requested threshold target; that threshold is ``None``."""


def precision_lower_bound(tp: np.ndarray, fp: np.ndarray, confidence: float = 0.95) -> np.ndarray:
    """One-sided Clopper-Pearson lower bound on precision ``tp / (tp + fp)`` (0 where ``tp == 0``)."""
    tp = np.asarray(tp, np.float64)
    return _cp_lower(tp, tp + np.asarray(fp, np.float64), confidence)


def recall_lower_bound(tp: np.ndarray, n_pos: int, confidence: float = 0.95) -> np.ndarray:
    """One-sided Clopper-Pearson lower bound on recall ``tp / n_pos`` (0 where ``tp == 0``)."""
    tp = np.asarray(tp, np.float64)
    return _cp_lower(tp, np.full_like(tp, float(n_pos)), confidence)


def effective_n(w: np.ndarray) -> float:
    """Kish's effective sample size ``(sum w)^2 / sum w^2`` of weighted rows (``len(w)`` when all weights are equal).

    >>> effective_n(np.ones(10)), round(effective_n(np.r_[np.ones(9), 50.0]), 2)
    (10.0, 1.39)
    """
    w = np.asarray(w, np.float64)
    ss = float(w @ w)
    return float(w.sum()) ** 2 / ss if ss > 0 else 0.0


@dataclass(frozen=True)
class _Strata:
    """The rows grouped by weight (a review stratum's rows all weigh ``1 / (probability x reviewed share)``; with
    more than ``_MAX_STRATA`` distinct weights, quantile groups), for the weighted bounds: per stratum the decisions
    it stands for (``size``, the sum of its weights) and its row and positive counts, and per cutoff (descending)
    its acted-on positive and negative counts, ``(H, T)``."""

    size: np.ndarray
    rows: np.ndarray
    pos: np.ndarray
    tp: np.ndarray
    fp: np.ndarray

    def at(self, i: np.ndarray | slice) -> _Strata:
        return _Strata(self.size, self.rows, self.pos, self.tp[:, i], self.fp[:, i])


def _weighted_lcb(hit: np.ndarray, miss: np.ndarray, st: _Strata, confidence: float) -> np.ndarray:
    """Lower bound of the weighted share ``hits / (hits + misses)`` (``(H, T)`` row counts per stratum): Clopper-Pearson
    on effective counts, ``n`` = the total weight in units of the heaviest stratum present, ``x = n * share``.

    Why not Kish's ``(sum w)^2 / sum w^2``: it assumes the event is unrelated to the weights, but review samples make
    it related (the positives a policy misses are all among the sparsely sampled allows, each standing for ~1 / rate
    decisions), and with a few heavy rows its 90% bound held in about half of the runs of benchmarks/review_loop.py;
    counting the evidence in units of the heaviest rows held in all of them. Equal weights give the plain counts."""
    w = (st.size / np.maximum(st.rows, 1))[:, None]
    hw, mw = (w * hit).sum(axis=0), (w * miss).sum(axis=0)
    total = hw + mw
    heaviest = np.where((hit + miss) > 0, w, 0.0).max(axis=0)
    n = np.divide(total, heaviest, out=np.zeros_like(total), where=heaviest > 0)
    return _cp_lower(hw * (n / np.where(total > 0, total, 1.0)), n, confidence)


def _precision_lcb(tp: np.ndarray, fp: np.ndarray, st: _Strata | None, confidence: float) -> np.ndarray:
    if st is None:
        return precision_lower_bound(tp, fp, confidence)
    return _weighted_lcb(st.tp, st.fp, st, confidence)


def _recall_lcb(tp: np.ndarray, n_pos: float, st: _Strata | None, confidence: float) -> np.ndarray:
    if st is None:
        return recall_lower_bound(tp, int(n_pos), confidence)
    return _weighted_lcb(st.tp, st.pos[:, None] - st.tp, st, confidence)


def _check_weights(sample_weight: np.ndarray | None, n: int) -> np.ndarray | None:
    if sample_weight is None:
        return None
    w = np.asarray(sample_weight, np.float64)
    if w.shape != (n,) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"sample_weight must be ({n},), finite, non-negative and not all zero")
    return w


def _population(y: np.ndarray, w: np.ndarray | None) -> tuple[float, float]:
    """What the rates are over: the rows and the positives, counted (unweighted) or as the sums of their weights."""
    return (float(y.size), float(y.sum())) if w is None else (float(w.sum()), float(w @ y))


def _cp_lower(x: np.ndarray, n: np.ndarray, confidence: float) -> np.ndarray:
    from scipy.special import betaincinv

    out = np.zeros(np.shape(x))
    ok = x > 0
    if np.any(ok):
        out[ok] = betaincinv(x[ok], n[ok] - x[ok] + 1.0, 1.0 - confidence)
    return out


def _check_target(name: str, v: float | None) -> float | None:
    if v is None:
        return None
    if not 0.0 < float(v) < 1.0:
        raise ValueError(f"{name} must be in (0, 1) or None, got {v!r}")
    return float(v)


def _cutoffs(p: np.ndarray, y: np.ndarray, w: np.ndarray | None = None,
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, _Strata | None]:
    """Distinct thresholds (descending) with the TP and FP counts of ``p >= threshold`` at each; with weights ``w``
    the weighted TP and FP, and the counts per stratum of equal weight (:class:`_Strata`; else ``None``)."""
    order = np.argsort(-p, kind="stable")
    ps = p[order]
    last = np.flatnonzero(np.r_[ps[1:] != ps[:-1], True])  # last row of each group of tied scores
    if w is None:
        tp = np.cumsum(y[order], dtype=np.int64)[last]
        return ps[last], tp, last + 1 - tp, None
    wo, yo = w[order], y[order]
    weights, which = np.unique(wo, return_inverse=True)
    if weights.size > _MAX_STRATA:  # many distinct weights: strata of similar weight (quantiles of the weights)
        edges = np.quantile(wo, np.linspace(0, 1, _MAX_STRATA + 1)[1:-1])
        which = np.searchsorted(np.unique(edges), wo, side="right")
    h = int(which.max()) + 1
    member = which[None, :] == np.arange(h)[:, None]  # (H, n)
    st = _Strata(np.bincount(which, wo, h), member.sum(axis=1), (member & (yo == 1)).sum(axis=1),
                 np.cumsum(member & (yo == 1), axis=1)[:, last], np.cumsum(member & (yo == 0), axis=1)[:, last])
    return ps[last], np.cumsum(wo * yo)[last], np.cumsum(wo * (1 - yo))[last], st


@dataclass(frozen=True)
class Thresholds:
    """Thresholds chosen by :func:`choose_thresholds` (act when ``p >= threshold``), with their evidence.

    ``block`` / ``flag`` are ``None`` when the data cannot support the target (a :class:`ThresholdWarning` was
    emitted) or no target was asked: ``None`` block means "never block", ``None`` flag means "no supported flag
    threshold" (collect more labelled positives). ``*_precision``, ``*_recall``, ``*_positive_rate`` are the
    calibration-set values at the threshold (positive rate = fraction of rows acted on); ``block_bound`` is the
    precision lower bound there, ``flag_bound`` the recall lower bound, both ``bound`` at ``confidence``.
    ``flag_clamped`` is true when the recall threshold lay above ``block`` and was lowered to it.
    """

    block: float | None
    flag: float | None
    target_block_precision: float | None
    target_flag_recall: float | None
    confidence: float
    n: int
    n_pos: int
    block_precision: float | None = None
    block_recall: float | None = None
    block_positive_rate: float | None = None
    block_bound: float | None = None
    flag_precision: float | None = None
    flag_recall: float | None = None
    flag_positive_rate: float | None = None
    flag_bound: float | None = None
    flag_clamped: bool = False
    bound: str = BOUND

    def to_dict(self) -> dict[str, Any]:
        return jsonable(asdict(self))


def choose_thresholds(
    p: np.ndarray,
    y: np.ndarray,
    *,
    block_precision: float | None = 0.95,
    flag_recall: float | None = 0.9,
    confidence: float = 0.95,
    sample_weight: np.ndarray | None = None,
) -> Thresholds:
    """Thresholds whose precision (block) and recall (flag) targets hold on new data with ``confidence``.

    ``block`` is the lowest cutoff whose one-sided Clopper-Pearson lower bound on precision reaches
    ``block_precision``, found by fixed-sequence testing: scanning down from the highest score, the first cutoff
    that meets the target opens a run, and the scan stops at the first cutoff that fails. (Taking the lowest
    passing cutoff anywhere tests every cutoff at once and weakens the guarantee: in a simulation with a
    non-monotone precision curve it held only ~83% of the time at 95% confidence, against ~94% for the scan.)

    ``flag`` is the highest cutoff whose Clopper-Pearson lower bound on recall reaches ``flag_recall`` (recall
    only grows as the cutoff falls, so this bound needs no correction). When both exist and ``flag > block``,
    flag is lowered to block (recall only grows, so its promise still holds; ``flag_clamped`` records it).

    ``p`` must be calibrated probabilities of data the calibrator was not fitted on. Cost: one sort plus one
    vectorised bound over all distinct cutoffs (100k labels: tens of milliseconds).

    ``sample_weight``: each row stands for that many rows of the population (inverse sampling probabilities, as
    review verdicts are weighted). Precision, recall and positive rate are then weighted, and the bounds are
    Clopper-Pearson on effective counts: the weight of the rows the proportion is over (those acted on for
    precision, the positives for recall) in units of the heaviest weight among them (:func:`_weighted_lcb`, which
    says why not Kish's effective n), recorded as :data:`WEIGHTED_BOUND`. ``n`` and ``n_pos`` stay row counts.
    Unit weights give the unweighted thresholds. A stratum with no sampled row among those acted on counts as
    absent: the rows a sparse sample did not see are not in the bound (see the module doc of
    :mod:`safeclip.calibration.review`).

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> p = rng.random(20000)
    >>> y = (rng.random(20000) < p).astype(int)        # perfectly calibrated
    >>> th = choose_thresholds(p, y, block_precision=0.9, flag_recall=0.5)
    >>> 0.8 < th.block < 0.85, 0.65 < th.flag < 0.75, th.block_bound >= 0.9
    (True, True, True)
    """
    pp, yy = check_scores(p, y)
    ww = _check_weights(sample_weight, pp.size)
    tb = _check_target("block_precision", block_precision)
    tr = _check_target("flag_recall", flag_recall)
    if not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    confidence = float(confidence)
    n, n_pos = int(pp.size), int(yy.sum())
    t, tp, fp, strata = _cutoffs(pp, yy, ww)
    k = tp + fp
    total, total_pos = _population(yy, ww)
    size = "" if ww is None else f" (Kish effective n of the positives {effective_n(ww[yy == 1]):.1f})"

    def stats(i: int) -> dict[str, float]:
        return {
            "precision": float(tp[i] / k[i]),
            "recall": float(tp[i] / total_pos) if total_pos else float("nan"),
            "positive_rate": float(k[i] / total),
        }

    out: dict[str, Any] = {}
    block_i: int | None = None
    if tb is not None:
        # The bound never exceeds the point estimate: evaluate it only where the estimate reaches the target.
        lcb = np.zeros(t.size)
        cand = tp >= tb * k
        lcb[cand] = _precision_lcb(tp[cand], fp[cand], None if strata is None else strata.at(cand), confidence)
        ok = lcb >= tb
        if ok.any():
            first = int(np.argmax(ok))
            fails = np.flatnonzero(~ok[first:])
            block_i = first + int(fails[0]) - 1 if fails.size else ok.size - 1
            s = stats(block_i)
            out.update(block=float(t[block_i]), block_precision=s["precision"], block_recall=s["recall"],
                       block_positive_rate=s["positive_rate"], block_bound=float(lcb[block_i]))
        else:
            best = float(lcb.max()) if lcb.size else 0.0
            warnings.warn(
                f"no threshold supports precision >= {tb} at {confidence:.0%} confidence on {n} rows "
                f"({n_pos} positive{size}; best lower bound {best:.3f}); block is None (never block)",
                ThresholdWarning, stacklevel=2)
    if tr is not None:
        # The recall bound grows with tp, which grows down the cutoffs: bisect for the first cutoff meeting it.
        def rcb(i: int) -> float:
            part = None if strata is None else strata.at(slice(i, i + 1))
            return float(_recall_lcb(tp[i:i + 1], total_pos, part, confidence)[0]) if total_pos else 0.0

        lo = int(np.searchsorted(tp, tr * total_pos, side="left"))  # below lo the point estimate misses already
        hi = t.size - 1
        if lo <= hi and rcb(hi) >= tr:
            while lo < hi:
                mid = (lo + hi) // 2
                if rcb(mid) >= tr:
                    hi = mid
                else:
                    lo = mid + 1
            flag_i = hi
            clamped = block_i is not None and flag_i < block_i  # descending order: smaller index = higher cutoff
            if clamped:
                flag_i = block_i
            s = stats(flag_i)
            out.update(flag=float(t[flag_i]), flag_precision=s["precision"], flag_recall=s["recall"],
                       flag_positive_rate=s["positive_rate"], flag_bound=rcb(flag_i), flag_clamped=clamped)
        else:
            best = rcb(t.size - 1)
            warnings.warn(
                f"no threshold supports recall >= {tr} at {confidence:.0%} confidence with {n_pos} positives{size} "
                f"(best lower bound {best:.3f}); flag is None",
                ThresholdWarning, stacklevel=2)
    return Thresholds(
        block=out.pop("block", None), flag=out.pop("flag", None), target_block_precision=tb,
        target_flag_recall=tr, confidence=confidence, n=n, n_pos=n_pos, **out,
        bound=BOUND if ww is None else WEIGHTED_BOUND,
    )


def naive_threshold(p: np.ndarray, y: np.ndarray, precision: float) -> float | None:
    """The lowest cutoff whose plain calibration-set precision reaches ``precision`` (no bound; for comparison).

    This is the usual "read it off the precision-recall curve" choice; on new data it misses the target about
    half the time. ``None`` when no cutoff reaches it.
    """
    pp, yy = check_scores(p, y)
    target = _check_target("precision", precision)
    t, tp, fp, _ = _cutoffs(pp, yy)
    ok = np.flatnonzero(tp >= target * (tp + fp))
    return float(t[ok[-1]]) if ok.size else None


@dataclass(frozen=True)
class ThresholdRates:
    """Precision and recall of acting at ``p >= threshold`` (:func:`rates_at`), with their one-sided lower bounds
    at ``confidence``; weighted when weights were given (``bound`` says which). ``precision`` is NaN when nothing is
    acted on, ``recall`` when there is no positive; their bounds are then 0. ``n_eff``: the effective number of
    labelled rows (their count when unweighted)."""

    threshold: float
    precision: float
    precision_bound: float
    recall: float
    recall_bound: float
    positive_rate: float
    n_eff: float
    confidence: float
    bound: str = BOUND

    def to_dict(self) -> dict[str, Any]:
        return jsonable(asdict(self))


def rates_at(p: np.ndarray, y: np.ndarray, threshold: float, *, sample_weight: np.ndarray | None = None,
             confidence: float = 0.95) -> ThresholdRates:
    """Precision and recall (and lower bounds) of one threshold, by the counts and bounds :func:`choose_thresholds`
    uses (with ``sample_weight``: weighted, the bounds on counts in units of the heaviest weight).

    >>> r = rates_at(np.array([0.9, 0.8, 0.2, 0.1]), np.array([1, 0, 1, 0]), 0.5)
    >>> r.precision, r.recall, r.positive_rate
    (0.5, 0.5, 0.5)
    """
    pp, yy = check_scores(p, y)
    ww = _check_weights(sample_weight, pp.size)
    t, tp_all, fp_all, strata = _cutoffs(pp, yy, ww)
    i = int(np.searchsorted(-t, -float(threshold), side="right")) - 1  # the lowest cutoff >= threshold
    total, total_pos = _population(yy, ww)
    if i >= 0:
        tp, fp = tp_all[i:i + 1], fp_all[i:i + 1]
        part = None if strata is None else strata.at(slice(i, i + 1))
    else:  # nothing acted on
        tp, fp = np.zeros(1), np.zeros(1)
        none = np.zeros((0 if strata is None else strata.size.size, 1), np.int64)
        part = None if strata is None else dataclasses.replace(strata, tp=none, fp=none)
    k = float(tp[0] + fp[0])
    return ThresholdRates(
        threshold=float(threshold),
        precision=float(tp[0]) / k if k else float("nan"),
        precision_bound=float(_precision_lcb(tp, fp, part, confidence)[0]) if k else 0.0,
        recall=float(tp[0]) / total_pos if total_pos else float("nan"),
        recall_bound=float(_recall_lcb(tp, total_pos, part, confidence)[0]) if total_pos else 0.0,
        positive_rate=k / total, n_eff=float(pp.size) if ww is None else effective_n(ww), confidence=float(confidence),
        bound=BOUND if ww is None else WEIGHTED_BOUND)
