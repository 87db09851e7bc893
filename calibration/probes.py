"""Linear probes on frozen embeddings: logistic regression with C chosen by cross-validated ROC AUC.

The probe's logit is a category's ``probe`` signal (:class:`safeclip.heads.LinearProbe`, score stage); calibrate it
(:func:`~safeclip.calibration.fit_calibrator`) on rows the probe was not trained on before using it.

C is chosen by the held-out ROC AUC, not the log-loss: a calibrator always maps the probe's logit to a probability
afterwards (a monotone map), so only the ranking the logit gives survives. The log-loss also scores the logit's
scale, which prefers a weak penalty; on frozen CLIP embeddings (many dimensions, few labels) a strong penalty often
ranks best (it leans towards the class-mean difference), and a log-loss rule misses it.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from safeclip.arrays import as_binary_labels, require_both_classes
from safeclip.heads import LinearProbe

__all__ = ["DEFAULT_CS", "data_sha256", "train_probe"]

# C for probes applies to embeddings scaled by sqrt(D): unit-norm embeddings then have unit-variance coordinates, and
# C on raw unit-norm embeddings is D times this. Two per decade from 1e-7 to 1e2: for 512- to 1024-d embeddings this
# spans scikit-learn LogisticRegressionCV's default grid on raw embeddings (1e-4 to 1e4), and a finer step.
DEFAULT_CS: tuple[float, ...] = tuple(float(f"{10.0 ** (k / 2):.3g}") for k in range(-14, 5))


def data_sha256(X: np.ndarray, y: np.ndarray) -> str:
    """The ``data_sha256`` a probe records: sha256 of the float32 C-order bytes of ``X``, then the uint8 bytes of
    ``y``."""
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
    tol: float = 1e-3,
) -> LinearProbe:
    """Train a logistic-regression probe on ``(n, D)`` embeddings; C chosen by cross-validated ROC AUC.

    Features are scaled by ``sqrt(D)`` for the fit (``Cs`` refer to that scale; the stored coefficients act on the
    raw embeddings). C is chosen on at most ``cv_max_samples`` rows (a stratified, seeded subsample: with
    hundreds of thousands of rows the penalty hardly matters, and the search would dominate the cost), by the
    held-out ROC AUC averaged over ``cv`` stratified folds, along a warm-started path over ``Cs``; ties go to the
    smaller C. The probe is then refit on all rows. Only the ranking is chosen for: the logit's scale is the
    calibrator's job (its balanced-prior ``predict_proba`` is not a probability to threshold). ``tol`` is lbfgs's
    gradient tolerance on the scaled features: 1e-3 there is ``1e-3 / sqrt(D)`` on the raw embeddings, tighter
    than scikit-learn's default 1e-4 on them for any D >= 100.

    ``metadata`` records: ``data_sha256`` (sha256 of the float32 C-order bytes of X, then the uint8 bytes of y),
    ``n``, ``n_pos``, ``positive_rate``, ``C``, ``cv_criterion`` (``"roc_auc"``), ``cv_auc`` / ``cv_log_loss``
    (mean over folds, per C and at the chosen C; the log-loss weighted like the training loss), ``cv_samples``,
    and the training settings.

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

    data_sha = data_sha256(x, yy)
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
    best = int(np.argmax(mean_auc))  # the first maximum: the smallest C among ties
    c_best = cs[best]

    final = model(c_best)
    init = coefs[:, best].mean(axis=0)
    final.coef_ = init[None, :dim].copy()  # warm start from the folds' solutions
    final.intercept_ = init[dim:].copy()
    final.fit(x * scale, yy)  # a ConvergenceWarning here is real: raise max_iter
    coef = final.coef_[0].astype(np.float64) * float(scale)
    intercept = float(final.intercept_[0])
    # Only the ranking was chosen for, so the logit's scale is free: a strong penalty leaves it tiny, and a calibrator
    # stacked over it would need coefficients steep enough to overflow float32 (refused at load). Unit standard
    # deviation on the training rows keeps the decision boundary (logit 0) and the ranking, and sane coefficients.
    spread = float(np.std(x.astype(np.float64) @ coef + intercept))
    if np.isfinite(spread) and spread > 0:
        coef, intercept = coef / spread, intercept / spread

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
        "logit_divided_by": spread,
        "class_weight": class_weight if class_weight is None or isinstance(class_weight, str) else {
            str(k): float(v) for k, v in class_weight.items()},
        "cv": cv,
        "cv_samples": int(cv_idx.size),
        "cv_criterion": "roc_auc",
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
    return LinearProbe(coef, intercept, encoder_id=encoder_id, metadata=meta)
