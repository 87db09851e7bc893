"""Calibration toolkit (notebooks, CLI): train probes, fit calibrators, choose thresholds, evaluate.

The runtime objects live in :mod:`safeclip.calibrate`; this module makes them from labelled data.

A typical session, for one category, with embeddings ``X`` and labels ``y`` split three ways::

    probe = train_probe(X_train, y_train, encoder_id=enc)             # the "probe" signal
    cal = fit_calibrator(probe.decision_function(X_cal), y_cal, method="auto", inputs=("probe",), encoder_id=enc)
    p = cal.predict_proba(probe.decision_function(X_val))
    th = choose_thresholds(p, y_val, block_precision=0.95, flag_recall=0.9)
    evaluate(p, y_val, th).save("reports/violence")
    probe.save("probes/violence.json"); cal.save("calibrators/violence.json")   # sha256 pins for the policy

Thresholds must be chosen on data the calibrator was not fitted on (here ``y_val``), or their promise is void.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from ..artifacts import write_json_atomic
from .._arrays import as_binary_labels, require_both_classes
from ..artifacts import jsonable
from ..calibrate import Calibrator
from ..heads import LinearProbe

__all__ = [
    "DEFAULT_CS",
    "Report",
    "ThresholdWarning",
    "Thresholds",
    "choose_thresholds",
    "evaluate",
    "fit_calibrator",
    "naive_threshold",
    "precision_lower_bound",
    "recall_lower_bound",
    "train_probe",
]

# C for probes applies to embeddings scaled by sqrt(D): unit-norm embeddings then have unit-variance coordinates.
DEFAULT_CS: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
_BOUND = "clopper-pearson, one-sided"
_MAX_CURVE_POINTS = 500


class ThresholdWarning(UserWarning):
    """The data cannot support a requested threshold target; that threshold is ``None``."""


# ------------------------------------------------------------------------------------------------------ probes


def _data_sha256(X: np.ndarray, y: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(memoryview(np.ascontiguousarray(X, np.float32)).cast("B"))
    h.update(memoryview(np.ascontiguousarray(y, np.uint8)).cast("B"))
    return h.hexdigest()


def _weighted_log_loss(y: np.ndarray, z: np.ndarray, w: np.ndarray) -> float:
    # log(1 + exp(-z)) for positives, log(1 + exp(z)) for negatives, stably.
    loss = np.logaddexp(0.0, np.where(y == 1, -z, z))
    return float(np.sum(w * loss) / np.sum(w))


def train_probe(
    X: np.ndarray,
    y: np.ndarray,
    *,
    encoder_id: str,
    Cs: Sequence[float] = DEFAULT_CS,
    cv: int = 5,
    class_weight: str | Mapping[int, float] | None = "balanced",
    random_state: int = 0,
    cv_max_samples: int | None = 20_000,
    max_iter: int = 1000,
    tol: float = 1e-4,
) -> LinearProbe:
    """Train a logistic-regression probe on ``(n, D)`` embeddings; C chosen by cross-validated log-loss.

    Features are scaled by ``sqrt(D)`` for the fit (``Cs`` refer to that scale; the stored coefficients act on the
    raw embeddings). C is chosen on at most ``cv_max_samples`` rows (a stratified, seeded subsample: with
    hundreds of thousands of rows the penalty hardly matters, and the search would dominate the cost), by the
    held-out log-loss weighted like the training loss (``class_weight``), with ``cv`` stratified folds and a
    warm-started path over ``Cs``; ties go to the smaller C. The probe is then refit on all rows.

    ``metadata`` records: ``data_sha256`` (sha256 of the float32 C-order bytes of X, then the uint8 bytes of y),
    ``n``, ``n_pos``, ``positive_rate``, ``C``, ``cv_log_loss`` / ``cv_auc`` (mean over folds, per C and at the
    chosen C), ``cv_samples``, and the training settings.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(600, 16)).astype(np.float32)
    >>> X /= np.linalg.norm(X, axis=1, keepdims=True)
    >>> y = (X[:, 0] + 0.1 * rng.normal(size=600) > 0.1).astype(int)
    >>> probe = train_probe(X, y, encoder_id="demo", cv=3)
    >>> probe.dim, probe.metadata["n"], probe.metadata["cv_auc"] > 0.9
    (16, 600, True)
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold
    from sklearn.utils.class_weight import compute_sample_weight

    x = np.asarray(X)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"X must be a non-empty (n, D) array, got shape {x.shape}")
    x = np.ascontiguousarray(x, np.float32)
    if not np.isfinite(x).all():
        raise ValueError("X contains NaN or infinity")
    n, dim = x.shape
    yy = as_binary_labels(y, n)
    n_pos, n_neg = require_both_classes(yy, "train_probe")
    if not isinstance(cv, int) or cv < 2:
        raise ValueError(f"cv must be an integer >= 2, got {cv!r}")
    if min(n_pos, n_neg) < cv:
        raise ValueError(f"{cv}-fold CV needs >= {cv} rows of each class; got {n_pos} positives, {n_neg} negatives")
    cs = sorted(float(c) for c in Cs)
    if not cs or any(not np.isfinite(c) or c <= 0 for c in cs):
        raise ValueError(f"Cs must be positive finite numbers, got {list(Cs)!r}")
    if not isinstance(encoder_id, str) or not encoder_id:
        raise ValueError("encoder_id must name the embedding space (a non-empty string)")
    if cv_max_samples is not None and cv_max_samples < 10 * cv:
        raise ValueError(f"cv_max_samples must be None or >= 10 * cv, got {cv_max_samples!r}")

    data_sha = _data_sha256(x, yy)
    scale = np.float32(np.sqrt(dim))
    rng = np.random.default_rng(random_state)

    cv_idx = np.arange(n)
    if cv_max_samples is not None and n > cv_max_samples:
        # Stratified subsample: keep the class balance exactly.
        keep_pos = max(cv, round(cv_max_samples * n_pos / n))
        pos_idx, neg_idx = np.flatnonzero(yy == 1), np.flatnonzero(yy == 0)
        cv_idx = np.sort(np.concatenate([
            rng.choice(pos_idx, min(keep_pos, n_pos), replace=False),
            rng.choice(neg_idx, min(cv_max_samples - keep_pos, n_neg), replace=False),
        ]))
    xc = x[cv_idx] * scale
    yc = yy[cv_idx]

    def model(c: float) -> Any:
        return LogisticRegression(C=c, class_weight=class_weight, max_iter=max_iter, tol=tol, warm_start=True)

    folds = StratifiedKFold(n_splits=cv, shuffle=True, random_state=random_state)
    losses = np.zeros((cv, len(cs)))
    aucs = np.zeros((cv, len(cs)))
    coefs = np.zeros((cv, len(cs), dim + 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=ConvergenceWarning)  # early path steps need not converge fully
        for f, (tr, va) in enumerate(folds.split(xc, yc)):
            clf = model(cs[0])
            w_va = compute_sample_weight(class_weight, yc[va])
            for i, c in enumerate(cs):
                clf.set_params(C=c)
                clf.fit(xc[tr], yc[tr])  # warm start: each C starts from the previous solution
                z = clf.decision_function(xc[va]).astype(np.float64)
                losses[f, i] = _weighted_log_loss(yc[va], z, w_va)
                aucs[f, i] = roc_auc_score(yc[va], z)
                coefs[f, i, :dim] = clf.coef_[0]
                coefs[f, i, dim] = clf.intercept_[0]
    mean_loss = losses.mean(axis=0)
    mean_auc = aucs.mean(axis=0)
    best = int(np.argmin(mean_loss))
    c_best = cs[best]

    final = model(c_best)
    init = coefs[:, best].mean(axis=0)
    final.coef_ = init[None, :dim].copy()  # warm start from the folds' solutions
    final.intercept_ = init[dim:].copy()
    final.fit(x * scale, yy)  # a ConvergenceWarning here is real: raise max_iter
    coef = final.coef_[0].astype(np.float64) * float(scale)

    import sklearn

    meta = {
        "data_sha256": data_sha,
        "n": n,
        "n_pos": n_pos,
        "positive_rate": n_pos / n,
        "dim": dim,
        "C": c_best,
        "Cs": cs,
        "feature_scale": float(scale),
        "class_weight": class_weight if class_weight is None or isinstance(class_weight, str) else {
            str(k): float(v) for k, v in class_weight.items()},
        "cv": cv,
        "cv_samples": int(cv_idx.size),
        "cv_log_loss": float(mean_loss[best]),
        "cv_auc": float(mean_auc[best]),
        "cv_log_loss_by_C": [float(v) for v in mean_loss],
        "cv_auc_by_C": [float(v) for v in mean_auc],
        "cv_log_loss_weighted": class_weight is not None,
        "random_state": random_state,
        "solver": "lbfgs",
        "n_iter": int(np.max(final.n_iter_)),
        "converged": bool(np.max(final.n_iter_) < max_iter),
        "sklearn_version": sklearn.__version__,
    }
    return LinearProbe(coef, float(final.intercept_[0]), encoder_id=encoder_id, metadata=meta)


def fit_calibrator(
    raw: np.ndarray | Mapping[str, np.ndarray],
    y: np.ndarray,
    method: str = "sigmoid",
    inputs: Sequence[str] = ("prompt",),
    *,
    sample_weight: np.ndarray | None = None,
    encoder_id: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Calibrator:
    """Fit a :class:`Calibrator` on raw signals: an ``(n,)``/``(n, k)`` array, or a ``{signal: (n,)}`` mapping
    (stacked in ``inputs`` order). ``method``: ``"sigmoid"``, ``"isotonic"`` or ``"auto"``."""
    if isinstance(raw, Mapping):
        missing = [s for s in inputs if s not in raw]
        if missing:
            raise ValueError(f"raw lacks the signal(s) {missing}")
        arr = np.column_stack([np.asarray(raw[s]) for s in inputs])
    else:
        arr = np.asarray(raw)
    return Calibrator(method, inputs, encoder_id=encoder_id, metadata=metadata).fit(arr, y, sample_weight)


# -------------------------------------------------------------------------------------------------- thresholds


def precision_lower_bound(tp: np.ndarray, fp: np.ndarray, confidence: float = 0.95) -> np.ndarray:
    """One-sided Clopper-Pearson lower bound on precision ``tp / (tp + fp)`` (0 where ``tp == 0``)."""
    tp = np.asarray(tp, np.float64)
    return _cp_lower(tp, tp + np.asarray(fp, np.float64), confidence)


def recall_lower_bound(tp: np.ndarray, n_pos: int, confidence: float = 0.95) -> np.ndarray:
    """One-sided Clopper-Pearson lower bound on recall ``tp / n_pos`` (0 where ``tp == 0``)."""
    tp = np.asarray(tp, np.float64)
    return _cp_lower(tp, np.full_like(tp, float(n_pos)), confidence)


def _cp_lower(x: np.ndarray, n: np.ndarray, confidence: float) -> np.ndarray:
    from scipy.special import betaincinv

    out = np.zeros(np.shape(x))
    ok = x > 0
    if np.any(ok):
        out[ok] = betaincinv(x[ok], n[ok] - x[ok] + 1.0, 1.0 - confidence)
    return out


def _check_scores(p: Any, y: Any, *, probabilities: bool = True) -> tuple[np.ndarray, np.ndarray]:
    pp = np.asarray(p, np.float64)
    if pp.ndim != 1 or pp.size == 0:
        raise ValueError(f"p must be a non-empty 1-D array, got shape {pp.shape}")
    if not np.isfinite(pp).all():
        raise ValueError("p contains NaN or infinity")
    if probabilities and (pp.min() < 0 or pp.max() > 1):
        raise ValueError("p must hold probabilities in [0, 1]")
    return pp, as_binary_labels(y, pp.size)


def _check_target(name: str, v: float | None) -> float | None:
    if v is None:
        return None
    if not 0.0 < float(v) < 1.0:
        raise ValueError(f"{name} must be in (0, 1) or None, got {v!r}")
    return float(v)


def _cutoffs(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct thresholds (descending) with the TP and FP counts of ``p >= threshold`` at each."""
    order = np.argsort(-p, kind="stable")
    ps = p[order]
    tp_all = np.cumsum(y[order], dtype=np.int64)
    last = np.flatnonzero(np.r_[ps[1:] != ps[:-1], True])  # last row of each group of tied scores
    tp = tp_all[last]
    return ps[last], tp, last + 1 - tp


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
    bound: str = _BOUND

    def to_dict(self) -> dict[str, Any]:
        return jsonable(asdict(self))


def choose_thresholds(
    p: np.ndarray,
    y: np.ndarray,
    *,
    block_precision: float | None = 0.95,
    flag_recall: float | None = 0.9,
    confidence: float = 0.95,
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

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> p = rng.random(20000)
    >>> y = (rng.random(20000) < p).astype(int)        # perfectly calibrated
    >>> th = choose_thresholds(p, y, block_precision=0.9, flag_recall=0.5)
    >>> 0.8 < th.block < 0.85, 0.65 < th.flag < 0.75, th.block_bound >= 0.9
    (True, True, True)
    """
    pp, yy = _check_scores(p, y)
    tb = _check_target("block_precision", block_precision)
    tr = _check_target("flag_recall", flag_recall)
    if not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    confidence = float(confidence)
    n, n_pos = int(pp.size), int(yy.sum())
    t, tp, fp = _cutoffs(pp, yy)
    k = tp + fp

    def stats(i: int) -> dict[str, float]:
        return {
            "precision": float(tp[i] / k[i]),
            "recall": float(tp[i] / n_pos) if n_pos else float("nan"),
            "positive_rate": float(k[i] / n),
        }

    out: dict[str, Any] = {}
    block_i: int | None = None
    if tb is not None:
        # The bound never exceeds the point estimate: evaluate it only where the estimate reaches the target.
        lcb = np.zeros(t.size)
        cand = tp >= tb * k
        lcb[cand] = precision_lower_bound(tp[cand], fp[cand], confidence)
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
                f"({n_pos} positive; best lower bound {best:.3f}); block is None (never block)",
                ThresholdWarning, stacklevel=2)
    if tr is not None:
        # The recall bound grows with tp, which grows down the cutoffs: bisect for the first cutoff meeting it.
        def rcb(i: int) -> float:
            return float(recall_lower_bound(tp[i:i + 1], n_pos, confidence)[0]) if n_pos else 0.0

        lo = int(np.searchsorted(tp, tr * n_pos, side="left"))  # below lo the point estimate misses already
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
                f"no threshold supports recall >= {tr} at {confidence:.0%} confidence with {n_pos} positives "
                f"(best lower bound {best:.3f}); flag is None",
                ThresholdWarning, stacklevel=2)
    return Thresholds(
        block=out.pop("block", None), flag=out.pop("flag", None), target_block_precision=tb,
        target_flag_recall=tr, confidence=confidence, n=n, n_pos=n_pos, **out,
    )


def naive_threshold(p: np.ndarray, y: np.ndarray, precision: float) -> float | None:
    """The lowest cutoff whose plain calibration-set precision reaches ``precision`` (no bound; for comparison).

    This is the usual "read it off the precision-recall curve" choice; on new data it misses the target about
    half the time. ``None`` when no cutoff reaches it.
    """
    pp, yy = _check_scores(p, y)
    target = _check_target("precision", precision)
    t, tp, fp = _cutoffs(pp, yy)
    ok = np.flatnonzero(tp >= target * (tp + fp))
    return float(t[ok[-1]]) if ok.size else None


# -------------------------------------------------------------------------------------------------- evaluation


def _downsample(n: int, limit: int = _MAX_CURVE_POINTS) -> np.ndarray:
    if n <= limit:
        return np.arange(n)
    return np.unique(np.round(np.linspace(0, n - 1, limit)).astype(np.int64))


def _confusion(p: np.ndarray, y: np.ndarray, t: float | None) -> dict[str, Any] | None:
    if t is None:
        return None
    pred = p >= t
    tp = int(np.sum(pred & (y == 1)))
    fp = int(np.sum(pred) - tp)
    fn = int(np.sum(y) - tp)
    tn = int(p.size - tp - fp - fn)
    return {
        "threshold": float(t), "tp": tp, "fp": fp, "fn": fn, "tn": tn,
        "precision": tp / (tp + fp) if tp + fp else None,
        "recall": tp / (tp + fn) if tp + fn else None,
        "positive_rate": (tp + fp) / p.size,
    }


def _freeze(d: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType({k: tuple(v) if isinstance(v, (list, np.ndarray)) else v for k, v in d.items()})


@dataclass(frozen=True)
class Report:
    """Calibration and ranking quality of probabilities ``p`` against labels (see :func:`evaluate`).

    ``reliability``: ``edges`` (n_bins + 1), per bin ``count``, ``mean_p``, ``frac_pos`` (NaN when empty).
    ``curves``: ``precision``, ``recall``, ``pr_thresholds``, ``fpr``, ``tpr``, ``roc_thresholds`` (at most ~500
    points each). ``confusion``: ``{"flag": ..., "block": ...}`` counts and rates at the thresholds (or None).
    """

    n: int
    n_pos: int
    roc_auc: float
    pr_auc: float
    ece: float
    brier: float
    log_loss: float
    n_bins: int
    reliability: Mapping[str, tuple[float, ...]]
    curves: Mapping[str, tuple[float, ...]]
    confusion: Mapping[str, Mapping[str, Any] | None]
    thresholds: Thresholds | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (NaN becomes null)."""
        return jsonable({
            "kind": "safeclip.calibration_report",
            "n": self.n, "n_pos": self.n_pos, "roc_auc": self.roc_auc, "pr_auc": self.pr_auc, "ece": self.ece,
            "ece_binning": f"{self.n_bins} equal-width bins on [0, 1], weighted by bin count",
            "brier": self.brier, "log_loss": self.log_loss, "n_bins": self.n_bins,
            "reliability": dict(self.reliability), "curves": dict(self.curves),
            "confusion": {k: None if v is None else dict(v) for k, v in self.confusion.items()},
            "thresholds": None if self.thresholds is None else self.thresholds.to_dict(),
        })

    def save(self, directory: str | os.PathLike[str]) -> list[Path]:
        """Write ``report.json`` and, when matplotlib is installed, ``reliability.png`` and ``pr_curve.png``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        written = [d / "report.json"]
        write_json_atomic(written[0], self.to_dict())
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError:
            return written
        # Figure + the Agg canvas directly: no pyplot, no global backend switch, no display needed.
        rel = self.reliability
        fig = Figure(figsize=(5, 5))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="perfect")
        ax.plot(rel["mean_p"], rel["frac_pos"], marker="o", label=f"model (ECE {self.ece:.3f})")
        ax.set(xlabel="mean predicted probability", ylabel="fraction positive", xlim=(0, 1), ylim=(0, 1),
               title=f"Reliability (n={self.n}, {self.n_pos} positive)")
        ax.legend(loc="upper left")
        fig.savefig(d / "reliability.png", dpi=100)
        written.append(d / "reliability.png")

        fig = Figure(figsize=(5, 5))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.plot(self.curves["recall"], self.curves["precision"], label=f"AP {self.pr_auc:.3f}")
        for name, marker in (("flag", "s"), ("block", "^")):
            c = self.confusion.get(name)
            if c is not None and c["precision"] is not None:
                ax.plot([c["recall"]], [c["precision"]], marker=marker, ls="", label=f"{name} >= {c['threshold']:.3g}")
        ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.01), title="Precision-recall")
        ax.legend(loc="lower left")
        fig.savefig(d / "pr_curve.png", dpi=100)
        written.append(d / "pr_curve.png")
        return written


def evaluate(p: np.ndarray, y: np.ndarray, thresholds: Thresholds | None = None, n_bins: int = 15) -> Report:
    """Ranking (ROC AUC, average precision) and calibration (ECE, Brier, log-loss, reliability) of ``p``.

    ECE uses ``n_bins`` equal-width bins on [0, 1] (p = 1 falls in the last), weighted by bin count. Log-loss
    clips p to [1e-15, 1 - 1e-15]. AUCs are NaN when ``y`` holds one class. With ``thresholds``, the confusion
    counts at its flag and block cutoffs are included: their realised precision and recall on this data.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> p = rng.random(5000)
    >>> y = (rng.random(5000) < p).astype(int)
    >>> r = evaluate(p, y)
    >>> r.ece < 0.03, 0.8 < r.roc_auc < 0.9
    (True, True)
    """
    from sklearn.metrics import (
        average_precision_score,
        precision_recall_curve,
        roc_auc_score,
        roc_curve,
    )

    pp, yy = _check_scores(p, y)
    if not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    n, n_pos = int(pp.size), int(yy.sum())
    both = 0 < n_pos < n

    b = np.minimum((pp * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(b, minlength=n_bins).astype(np.float64)
    sum_p = np.bincount(b, weights=pp, minlength=n_bins)
    sum_y = np.bincount(b, weights=yy.astype(np.float64), minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = sum_p / count
        frac_pos = sum_y / count
    ece = float(np.sum(np.abs(sum_p - sum_y)) / n)  # = sum_b count_b / n * |mean_p_b - frac_pos_b|

    pc = np.clip(pp, 1e-15, 1 - 1e-15)
    log_loss = float(-np.mean(np.where(yy == 1, np.log(pc), np.log1p(-pc))))
    brier = float(np.mean((pp - yy) ** 2))

    curves: dict[str, Any] = {k: () for k in ("precision", "recall", "pr_thresholds", "fpr", "tpr", "roc_thresholds")}
    roc_auc = pr_auc = float("nan")
    if both:
        roc_auc = float(roc_auc_score(yy, pp))
        pr_auc = float(average_precision_score(yy, pp))
        prec, rec, pthr = precision_recall_curve(yy, pp)
        i = _downsample(pthr.size)
        curves.update(precision=prec[i], recall=rec[i], pr_thresholds=pthr[i])
        fpr, tpr, rthr = roc_curve(yy, pp)
        j = _downsample(rthr.size)
        curves.update(fpr=fpr[j], tpr=tpr[j], roc_thresholds=np.minimum(rthr[j], 1.0))  # sklearn's first is inf

    confusion = {
        "flag": _confusion(pp, yy, thresholds.flag if thresholds else None),
        "block": _confusion(pp, yy, thresholds.block if thresholds else None),
    }
    return Report(
        n=n, n_pos=n_pos, roc_auc=roc_auc, pr_auc=pr_auc, ece=ece, brier=brier, log_loss=log_loss, n_bins=n_bins,
        reliability=_freeze({"edges": np.linspace(0, 1, n_bins + 1), "count": count, "mean_p": mean_p,
                             "frac_pos": frac_pos}),
        curves=_freeze({k: [float(x) for x in v] for k, v in curves.items()}),
        confusion=MappingProxyType({k: None if v is None else MappingProxyType(v) for k, v in confusion.items()}),
        thresholds=thresholds,
    )
