"""How good probabilities are: ranking (ROC / PR AUC), calibration (ECE, Brier, log-loss, reliability), the confusion
counts at chosen thresholds, and the plots a person looks at."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from safeclip.files import write_atomic, write_json_atomic
from safeclip.artifacts import jsonable

from ._validate import check_scores
from .thresholds import Thresholds

__all__ = ["Report", "evaluate", "plot_pr_curve", "plot_reliability"]

_MAX_CURVE_POINTS = 500


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
        written = [d / "report.json"]
        write_json_atomic(written[0], self.to_dict())
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError:
            return written
        # Figure + the Agg canvas directly: no pyplot, no global backend switch, no display needed.
        for name, plot in (("reliability.png", plot_reliability), ("pr_curve.png", plot_pr_curve)):
            fig = Figure(figsize=(5, 5))
            FigureCanvasAgg(fig)
            plot(self, fig.add_subplot())
            write_atomic(d / name, lambda f, fig=fig: fig.savefig(f, format="png", dpi=100))
            written.append(d / name)
        return written


def plot_reliability(report: Report, ax: Any) -> Any:
    """Draw ``report``'s reliability diagram on a matplotlib ``ax``; returns ``ax``."""
    rel = report.reliability
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="perfect")
    ax.plot(rel["mean_p"], rel["frac_pos"], marker="o", label=f"model (ECE {report.ece:.3f})")
    ax.set(xlabel="mean predicted probability", ylabel="fraction positive", xlim=(0, 1), ylim=(0, 1),
           title=f"Reliability (n={report.n}, {report.n_pos} positive)")
    ax.legend(loc="upper left")
    return ax


def plot_pr_curve(report: Report, ax: Any) -> Any:
    """Draw ``report``'s precision-recall curve, with its flag and block points, on a matplotlib ``ax``."""
    ax.plot(report.curves["recall"], report.curves["precision"], label=f"AP {report.pr_auc:.3f}")
    for name, marker in (("flag", "s"), ("block", "^")):
        c = report.confusion.get(name)
        if c is not None and c["precision"] is not None:
            ax.plot([c["recall"]], [c["precision"]], marker=marker, ls="", label=f"{name} >= {c['threshold']:.3g}")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.01), title="Precision-recall")
    ax.legend(loc="lower left")
    return ax


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

    pp, yy = check_scores(p, y)
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
