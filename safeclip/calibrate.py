"""Calibrate stage: a category's raw signals -> the probability its thresholds apply to.

A :class:`Calibrator` is a fitted, JSON-serialisable object (scikit-learn conventions: ``fit`` returns ``self``,
fitted attributes end in ``_``), pure numpy at prediction time; fitting it imports scikit-learn lazily, and is what
:mod:`safeclip.calibration` (the offline side) calls:

- :class:`Calibrator` maps a category's ``(n, k)`` signals (``inputs``, e.g. ``("prompt",)`` or
  ``("prompt", "probe")``) to a probability. ``"sigmoid"`` is Platt scaling: a logistic regression on the k signals
  (effectively unpenalised, so it only calibrates). ``"isotonic"`` is a monotone, piecewise-linear map of one score:
  the signal itself when ``k == 1``, else the logit of the stacked logistic regression. ``"auto"`` picks isotonic
  when the calibration set has at least ``AUTO_MIN_SAMPLES`` (1000) rows and ``AUTO_MIN_PER_CLASS`` (100) of each
  class, else sigmoid: below that isotonic's step function overfits, above it its freedom from the logistic
  shape wins.

The ``probe`` signal it may take comes from :class:`~safeclip.heads.LinearProbe`, the ``head`` signal from
:class:`~safeclip.heads.MLPHead` (score stage); a stacked calibrator over ``("prompt", "head")`` lets a team's own
labels sharpen a published head on its own traffic.

Artifacts are JSON written with :func:`~safeclip.artifacts.write_json_atomic` and read back only through
:func:`~safeclip.artifacts.load_pinned` (sha256 pin). Each records the ``encoder_id`` of its embedding space
and refuses to load into another one (:class:`~safeclip.errors.EncoderMismatchError`).

The runtime entry points used by the moderator are :func:`load_calibrators` and :func:`calibrate`. A category
without a calibrator is marked uncalibrated and gets the documented fallback: its head's own probability
``sigmoid(head)`` when it has a head (a head is trained as a classifier: LAION's ``punsafe``), else
``sigmoid(prompt)`` (see :func:`probability_basis`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from .arrays import as_binary_labels, require_both_classes, sigmoid, sigmoid_inplace
from .artifacts import (
    ARTIFACT_FORMAT,
    MAX_LOGIT_BOUND,
    check_artifact,
    check_encoder,
    finite_number,
    float_list,
    jsonable,
    load_pinned,
    write_json_atomic,
)
from .errors import ArtifactIntegrityError, ConfigError, PolicyError, SafeclipError

__all__ = [
    "AUTO_MIN_PER_CLASS",
    "AUTO_MIN_SAMPLES",
    "ISOTONIC_EPS",
    "KNOWN_SIGNALS",
    "METHODS",
    "Calibrator",
    "PolicyCalibrators",
    "calibrate",
    "head_categories",
    "load_calibrators",
    "missing_inputs",
    "probability_basis",
    "sigmoid",
]

KNOWN_SIGNALS: tuple[str, ...] = ("prompt", "probe", "head")
METHODS: tuple[str, ...] = ("sigmoid", "isotonic", "auto")
AUTO_MIN_SAMPLES = 1000
AUTO_MIN_PER_CLASS = 100
# Isotonic outputs are clipped to [eps, 1 - eps]: a calibration set with a pure region would otherwise promise
# certainty (p = 0 or 1), which no finite sample supports and which makes log-loss infinite. 1e-4 lies below any
# useful flag threshold and above float32 resolution near 1.
ISOTONIC_EPS = 1e-4
# Platt's logistic regression is fitted on standardised signals with this (tiny) L2 penalty: large enough to be
# pure calibration, finite so that perfectly separable calibration sets still converge.
_PLATT_C = 1e4

_CALIBRATOR_KIND = "safeclip.calibrator"
_FLOAT32_SAFE = float(np.finfo(np.float32).max) / 10  # a margin for the rounding of a few float32 adds


def _as_signals(signals: Any, k: int, *, keep_float32: bool) -> np.ndarray:
    """``(n,)`` or ``(n, k)`` -> 2-D ``(n, k)`` float array (float32 kept when asked), finite values only."""
    s = np.asarray(signals)
    if s.dtype == bool or np.issubdtype(s.dtype, np.integer):
        s = s.astype(np.float64)
    elif not np.issubdtype(s.dtype, np.floating):
        raise ConfigError(f"signals must be numeric, got dtype {s.dtype}")
    if not (keep_float32 and s.dtype == np.float32):
        s = s.astype(np.float64, copy=False)
    if s.ndim == 1:
        if k != 1:
            raise ConfigError(f"signals are 1-D but the calibrator takes {k} inputs; pass an (n, {k}) array")
        s = s[:, None]
    elif s.ndim != 2 or s.shape[1] != k:
        raise ConfigError(f"signals must be (n,) or (n, {k}), got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ConfigError("signals contain NaN or infinity: a calibrator is fitted and applied on finite signals only")
    return s


def _check_inputs(inputs: Sequence[str]) -> tuple[str, ...]:
    if isinstance(inputs, str):
        inputs = (inputs,)
    out = tuple(inputs)
    if not out:
        raise ConfigError("inputs must name at least one signal")
    bad = [s for s in out if s not in KNOWN_SIGNALS]
    if bad:
        raise ConfigError(f"unknown signal(s) {bad}; known signals are {list(KNOWN_SIGNALS)}")
    if len(set(out)) != len(out):
        raise ConfigError(f"inputs repeat a signal: {list(out)}")
    return out


class _FastInterp:
    """``np.interp(z, xk, yk)`` for sorted, distinct knots, with O(1) work per point.

    ``np.interp`` binary-searches every point (40-80 ms per million). Here a uniform grid of ``g`` cells covers
    ``[xk[0], xk[-1]]``; a cell with no knot inside lies within one linear segment, so its points cost two table
    lookups and a multiply-add in grid units ``v = (z - xk[0]) * scale``: ``p = c[cell] + s[cell] * v``. Cells that
    hold a knot have ``s = NaN``; their few points go through ``np.interp`` itself. Agrees with ``np.interp`` to
    ~1e-11 (working in grid units keeps the multiply-add well conditioned whatever the knots' offset and spacing).
    """

    def __init__(self, xk: np.ndarray, yk: np.ndarray) -> None:
        self.xk = np.ascontiguousarray(xk, np.float64)
        self.yk = np.ascontiguousarray(yk, np.float64)
        m = self.xk.shape[0]
        self.m = m
        if m < 2:
            return
        x0, x1 = float(self.xk[0]), float(self.xk[-1])
        # ~64 cells per knot keeps the share of points in knot-holding cells at a few percent, and the two
        # float64 tables small enough for L2 cache.
        g = int(min(max(64 * m, 4096), 1 << 16))
        with np.errstate(over="ignore", divide="ignore"):
            scale = g / (x1 - x0)
        if not np.isfinite(scale):  # knots spanning a subnormal range: no grid can resolve them, use np.interp
            self.m = -1
            return
        self.g, self.x0, self.scale = g, x0, scale
        vk = (self.xk - x0) * scale  # knots in grid units
        edges = np.arange(g + 1, dtype=np.float64)
        tol = 1e-6  # of a cell: far above the rounding of (z - x0) * scale, far below a cell
        seg = np.searchsorted(vk, edges[:-1] - tol, side="right") - 1
        inside = np.searchsorted(vk, edges[1:] + tol, side="left") - (seg + 1)
        seg = np.clip(seg, 0, m - 2)
        clean = inside == 0
        # Knots closer than float resolution in grid units give inf slopes; they only sit in knot cells (NaN).
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            slope = np.diff(self.yk) / np.diff(vk)
            s = np.where(clean, slope[seg], np.nan)
            c = np.where(clean, self.yk[seg] - slope[seg] * vk[seg], np.nan)
        # Table index g: at or above xk[-1] (flat at yk[-1]); index g + 1, reached as -1: below xk[0] (flat at
        # yk[0]); points just below xk[0] truncate to cell 0, which holds a knot. Rounding can move a point just
        # inside the range to "above"; harmless unless another knot is that close too, then use np.interp.
        hi_ok = vk[-1] - vk[-2] > tol
        self.c = np.concatenate([c, [self.yk[-1] if hi_ok else np.nan, self.yk[0]]])
        self.s = np.concatenate([s, [0.0 if hi_ok else np.nan, 0.0]])

    def __call__(self, z: np.ndarray) -> np.ndarray:
        z = np.asarray(z, np.float64)
        if self.m < 0:
            return np.interp(z, self.xk, self.yk)
        if self.m < 2:
            return np.full(z.shape, self.yk[0] if self.m else 0.5)
        v = np.subtract(z, self.x0)
        with np.errstate(over="ignore"):  # |z| near float max: inf, clipped below
            v *= self.scale
        np.clip(v, -1.0, float(self.g), out=v)
        i = v.astype(np.intp)  # intp indices: numpy would otherwise convert int32 ones on every gather
        out = np.take(self.s, i)
        out *= v
        out += np.take(self.c, i)  # (np.take with out= is 2x slower here)
        slow = np.flatnonzero(np.isnan(out))
        if slow.size:
            out[slow] = np.interp(z[slow], self.xk, self.yk)
        return out


# --------------------------------------------------------------------------------------------------- Calibrator


class Calibrator:
    """Maps a category's raw signals to a calibrated probability of the positive class.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> y = (rng.random(2000) < 0.3).astype(int)
    >>> prompt = rng.normal(2.0 * y - 1.0, 1.0)           # a raw log-odds-like signal
    >>> cal = Calibrator("sigmoid").fit(prompt, y)
    >>> p = cal.predict_proba(prompt)
    >>> p.shape, bool(0 < p.min() < p.max() < 1)
    ((2000,), True)
    >>> Calibrator.from_dict(cal.to_dict()).predict_proba(prompt[:3]).round(3).tolist() == p[:3].round(3).tolist()
    True

    Parameters
    ----------
    method : "sigmoid" | "isotonic" | "auto"
        See the module docstring for the ``"auto"`` rule.
    inputs : names of the signals, in the column order of ``signals`` (``"prompt"``, ``"probe"``).
    encoder_id : the embedding space the signals come from, recorded in the artifact.

    Fitted attributes: ``method_`` ("sigmoid" or "isotonic"), ``coef_`` (k,), ``intercept_``: the linear score
    ``z = signals @ coef_ + intercept_`` (for isotonic with one input: ``coef_ = [1], intercept_ = 0``);
    sigmoid outputs ``sigmoid(z)``, isotonic ``np.interp(z, x_thresholds_, y_thresholds_)`` (clipped to
    ``[ISOTONIC_EPS, 1 - ISOTONIC_EPS]``, flat beyond the calibration range); ``n_samples_``, ``n_pos_``.
    ``predict_proba`` keeps float32 input in float32 (isotonic interpolates in float64 either way).
    """

    def __init__(
        self,
        method: str = "sigmoid",
        inputs: Sequence[str] = ("prompt",),
        *,
        encoder_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        if method not in METHODS:
            raise ConfigError(f"method must be one of {list(METHODS)}, got {method!r}")
        self.method = method
        self.inputs = _check_inputs(inputs)
        self.encoder_id = encoder_id
        self.metadata: dict[str, Any] = jsonable(dict(metadata or {}))

    def __repr__(self) -> str:
        fitted = f", method_={self.method_!r}, n_samples_={self.n_samples_}" if self._fitted() else ""
        return f"Calibrator(method={self.method!r}, inputs={self.inputs!r}{fitted})"

    def _fitted(self) -> bool:
        return hasattr(self, "method_")

    @staticmethod
    def resolve_method(method: str, n: int, n_pos: int) -> str:
        """The method ``"auto"`` becomes for ``n`` rows with ``n_pos`` positives (others pass through)."""
        if method != "auto":
            return method
        enough = n >= AUTO_MIN_SAMPLES and min(n_pos, n - n_pos) >= AUTO_MIN_PER_CLASS
        return "isotonic" if enough else "sigmoid"

    def fit(self, signals: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None) -> Calibrator:
        """Fit on ``signals`` ``(n,)`` or ``(n, k)`` and 0/1 labels ``y``; returns ``self``."""
        from sklearn.isotonic import IsotonicRegression
        from sklearn.linear_model import LogisticRegression

        k = len(self.inputs)
        s = _as_signals(signals, k, keep_float32=False)
        n = s.shape[0]
        yy = as_binary_labels(y, n)
        n_pos, _ = require_both_classes(yy, "calibration")
        sw = None
        if sample_weight is not None:
            sw = np.asarray(sample_weight, np.float64)
            if sw.shape != (n,) or not np.isfinite(sw).all() or (sw < 0).any() or sw.sum() <= 0:
                raise ConfigError("sample_weight must be (n,), finite, non-negative and not all zero")
        method = self.resolve_method(self.method, n, n_pos)

        if method == "isotonic" and k == 1:
            coef, intercept = np.ones(1), 0.0
        else:
            mean = s.mean(axis=0)
            sd = s.std(axis=0)
            sd[sd == 0] = 1.0
            lr = LogisticRegression(C=_PLATT_C, solver="lbfgs", max_iter=1000, tol=1e-8)
            lr.fit((s - mean) / sd, yy, sample_weight=sw)
            coef = lr.coef_[0] / sd
            intercept = float(lr.intercept_[0] - coef @ mean)

        self.coef_ = np.asarray(coef, np.float64)
        self.intercept_ = float(intercept)
        self.x_thresholds_: np.ndarray | None = None
        self.y_thresholds_: np.ndarray | None = None
        if method == "isotonic":
            z = s @ self.coef_ + self.intercept_
            iso = IsotonicRegression(
                y_min=ISOTONIC_EPS, y_max=1 - ISOTONIC_EPS, increasing=True, out_of_bounds="clip"
            ).fit(z, yy, sample_weight=sw)
            self.x_thresholds_ = np.asarray(iso.X_thresholds_, np.float64)
            self.y_thresholds_ = np.asarray(iso.y_thresholds_, np.float64)
        self.method_ = method
        self.n_samples_ = int(n)
        self.n_pos_ = int(n_pos)
        self._build()
        return self

    def _build(self) -> None:
        k = len(self.inputs)
        self._coef32 = self.coef_.astype(np.float32)
        self._intercept32 = np.float32(self.intercept_)
        # One-input isotonic: the signal is the score (predict never writes into z on this path).
        self._identity = self.method_ == "isotonic" and k == 1 and self.coef_[0] == 1.0 and self.intercept_ == 0.0
        self._interp = (
            _FastInterp(self.x_thresholds_, self.y_thresholds_) if self.method_ == "isotonic" else None
        )

    def decision_function(self, signals: np.ndarray) -> np.ndarray:
        """The linear score ``z`` (the logit for sigmoid; the isotonic map's argument)."""
        if not self._fitted():
            raise SafeclipError("this Calibrator is not fitted; call fit() or load one")
        s = _as_signals(signals, len(self.inputs), keep_float32=True)
        if self._identity:
            return s[:, 0].astype(np.float64)
        if s.dtype == np.float32 and self.method_ == "sigmoid":
            coef, b = self._coef32, self._intercept32
        else:
            s = s.astype(np.float64, copy=False)
            coef, b = self.coef_, self.intercept_
        # Column by column rather than ``s @ coef``: for k of a few, a BLAS gemv on a tall, skinny matrix is
        # several times slower (thread start-up on small work), and this reads each column once.
        z = s[:, 0] * coef[0]
        for i in range(1, s.shape[1]):
            z += s[:, i] * coef[i]
        z += b
        return z

    def predict_proba(self, signals: np.ndarray) -> np.ndarray:
        """``(n,)`` probability of the positive class; float32 for float32 signals, else float64."""
        z = self.decision_function(signals)
        if self._interp is None:
            return sigmoid_inplace(z)  # z is a fresh array
        p = self._interp(z)
        in32 = np.asarray(signals).dtype == np.float32
        return p.astype(np.float32) if in32 else p

    # ----------------------------------------------------------------------------------------- artifacts

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (``"kind": "safeclip.calibrator", "format": 1``)."""
        if not self._fitted():
            raise SafeclipError("cannot serialise an unfitted Calibrator")
        iso = self.method_ == "isotonic"
        return {
            "kind": _CALIBRATOR_KIND,
            "format": ARTIFACT_FORMAT,
            "method": self.method,
            "method_": self.method_,
            "inputs": list(self.inputs),
            "encoder_id": self.encoder_id,
            "coef": [float(c) for c in self.coef_],
            "intercept": float(self.intercept_),
            "x_thresholds": [float(v) for v in self.x_thresholds_] if iso else None,
            "y_thresholds": [float(v) for v in self.y_thresholds_] if iso else None,
            "n_samples": self.n_samples_,
            "n_pos": self.n_pos_,
            "metadata": jsonable(self.metadata),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Calibrator:
        """Rebuild from :meth:`to_dict`; a malformed dict raises :class:`ArtifactIntegrityError`."""
        check_artifact(d, _CALIBRATOR_KIND)
        kind = "calibrator"
        method_ = d.get("method_")
        if method_ not in ("sigmoid", "isotonic"):
            raise ArtifactIntegrityError(f"{kind} artifact: 'method_' must be 'sigmoid' or 'isotonic'")
        enc = d.get("encoder_id")
        if enc is not None and not isinstance(enc, str):
            raise ArtifactIntegrityError(f"{kind} artifact: 'encoder_id' must be a string or null")
        meta = d.get("metadata", {})
        if not isinstance(meta, dict):
            raise ArtifactIntegrityError(f"{kind} artifact: 'metadata' must be an object")
        inputs = d.get("inputs")
        method = d.get("method", method_)
        if not isinstance(inputs, list) or not all(isinstance(s, str) for s in inputs) or method not in METHODS:
            raise ArtifactIntegrityError(f"{kind} artifact: 'inputs' must list signal names, 'method' be one of {METHODS}")
        try:
            self = cls(method, inputs, encoder_id=enc, metadata=meta)
        except (ValueError, TypeError) as e:
            raise ArtifactIntegrityError(f"{kind} artifact: {e}") from e
        coef = float_list(d, "coef", kind)
        if coef.shape != (len(self.inputs),):
            raise ArtifactIntegrityError(f"{kind} artifact: {coef.size} coefficients for {len(self.inputs)} inputs")
        self.coef_ = coef
        self.intercept_ = finite_number(d, "intercept", kind)
        # Applied in float32 (sigmoid on float32 signals): the score must stay finite for any signal the score stage
        # can produce (|signal| <= MAX_LOGIT_BOUND), or inf - inf would give a NaN probability.
        bound = float(np.abs(coef).sum()) * MAX_LOGIT_BOUND + abs(self.intercept_)
        if not bound <= _FLOAT32_SAFE:
            raise ArtifactIntegrityError(f"{kind} artifact: coefficients {coef.tolist()} can overflow the float32 "
                                         f"score for signals up to {MAX_LOGIT_BOUND:g}; no calibration is that steep")
        self.x_thresholds_ = self.y_thresholds_ = None
        if method_ == "isotonic":
            xt = float_list(d, "x_thresholds", kind)
            yt = float_list(d, "y_thresholds", kind)
            if xt.shape != yt.shape or xt.size == 0:
                raise ArtifactIntegrityError(f"{kind} artifact: x/y thresholds must be non-empty and equally long")
            if np.any(np.diff(xt) <= 0) or np.any(np.diff(yt) < 0) or yt[0] < 0 or yt[-1] > 1:
                raise ArtifactIntegrityError(
                    f"{kind} artifact: isotonic knots must have increasing x and non-decreasing y in [0, 1]"
                )
            self.x_thresholds_, self.y_thresholds_ = xt, yt
        n = d.get("n_samples")
        n_pos = d.get("n_pos")
        if not isinstance(n, int) or not isinstance(n_pos, int) or isinstance(n, bool) or not 0 <= n_pos <= n:
            raise ArtifactIntegrityError(f"{kind} artifact: 'n_samples'/'n_pos' must be integers, 0 <= n_pos <= n")
        self.n_samples_, self.n_pos_ = n, n_pos
        self.method_ = method_
        self._build()
        return self

    def save(self, path: str | os.PathLike[str]) -> str:
        """Write the JSON artifact atomically; returns its sha256 (the pin a policy records)."""
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str], sha256: str, encoder_id: str | None = None) -> Calibrator:
        """Load a pinned artifact; :class:`EncoderMismatchError` if it records another ``encoder_id``."""
        cal = load_pinned(path, sha256, cls.from_dict)
        check_encoder(cal.encoder_id, encoder_id, f"calibrator {os.fspath(path)!r}")
        return cal


class PolicyCalibrators(dict[str, Calibrator]):
    """The calibrators of one policy, keyed by category, that also record which categories name a head.

    :func:`load_calibrators` returns one, so that :func:`calibrate` takes "this category has a head" from the policy,
    never from a batch's values (a head that outputs NaN for every row of a batch is still a head).
    """

    def __init__(self, calibrators: Mapping[str, Calibrator] | None = None, *, heads: Iterable[str] = ()) -> None:
        super().__init__(calibrators or {})
        self.heads = frozenset(heads)


def head_categories(policy: Any) -> frozenset[str]:
    """The names of the policy's categories that name a head."""
    return frozenset(c.name for c in policy.categories if getattr(c, "head", None) is not None)


def load_calibrators(policy: Any, encoder_id: str | None) -> PolicyCalibrators:
    """Load every calibrator a policy names (pinned), checked against ``encoder_id``; keyed by category (with the
    categories that name a head, for :func:`calibrate`)."""
    out = PolicyCalibrators(heads=head_categories(policy))
    problems: list[str] = []
    for cat in policy.categories:
        ref = getattr(cat, "calibrator", None)
        if ref is None:
            continue
        cal = Calibrator.load(ref.local_path(), ref.sha256, encoder_id=encoder_id)
        problems += [f"categories.{cat.name}.calibrator: {p}" for p in missing_inputs(cal, cat)]
        out[cat.name] = cal
    if problems:
        raise PolicyError(problems)
    return out


def missing_inputs(cal: Calibrator, category: Any) -> list[str]:
    """Why ``cal`` cannot run in ``category``: each signal it takes that the category does not produce."""
    return [f"it takes the {s!r} signal but the category names no {s}" for s in ("probe", "head")
            if s in cal.inputs and getattr(category, s, None) is None]


def probability_basis(policy: Any, calibrators: Mapping[str, Calibrator]) -> tuple[str, ...]:
    """Per category, what its probability is: ``"calibrator"``, ``"head"`` (an uncalibrated category's head's own
    probability) or ``"prompt"`` (the prompt ensemble's softmax mass, the last fallback)."""
    heads = head_categories(policy)
    return tuple("calibrator" if c.name in calibrators else "head" if c.name in heads else "prompt"
                 for c in policy.categories)


def calibrate(scores: Any, calibrators: Mapping[str, Calibrator], *,
              heads: Iterable[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(N, C)`` probabilities and the ``(C,)`` bool mask of calibrated categories for a :class:`Scores`.

    Categories without a calibrator get ``sigmoid(head)`` where they have a head, else ``sigmoid(prompt)``: the
    uncalibrated fallbacks (:func:`probability_basis`). Which categories have a head comes from the policy: ``heads``
    (their names), else ``calibrators.heads`` (a :class:`PolicyCalibrators` from :func:`load_calibrators`); never
    from the values. A row whose signals are not finite (a head that gave NaN) gets a NaN probability, which the
    decide stage reports as an error and never allows.
    """
    prompt = np.asarray(scores.prompt)
    n, c = prompt.shape
    has_head_array = getattr(scores, "head", None) is not None
    named = heads if heads is not None else getattr(calibrators, "heads", None)
    if named is None and has_head_array:
        raise ConfigError("calibrate() needs to know which categories name a head: pass heads=(names) from the "
                          "policy, or calibrators from load_calibrators()")
    with_head = frozenset(named or ())
    probe = np.asarray(scores.probe)
    head = np.asarray(scores.head) if has_head_array else np.full(prompt.shape, np.nan, prompt.dtype)
    dtype = np.float32 if prompt.dtype == np.float32 else np.float64
    probs = np.empty((n, c), dtype)
    mask = np.zeros(c, bool)
    for j, name in enumerate(scores.categories):
        cal = calibrators.get(name)
        if cal is None:
            # A category with a head keeps a NaN row NaN (never decided), and never falls back to the prompt.
            probs[:, j] = sigmoid(head[:, j] if name in with_head else prompt[:, j])
            continue
        cols = {"prompt": prompt[:, j], "probe": probe[:, j], "head": head[:, j]}
        sig = cols[cal.inputs[0]] if len(cal.inputs) == 1 else np.column_stack([cols[s] for s in cal.inputs])
        probs[:, j] = _predict_finite_rows(cal, sig)
        mask[j] = True
    return probs, mask


def _predict_finite_rows(cal: Calibrator, sig: np.ndarray) -> np.ndarray:
    """``cal.predict_proba(sig)``, with NaN for the rows whose signals are not all finite (not the batch's error)."""
    try:  # the common case costs nothing more: predict_proba checks finiteness itself
        return cal.predict_proba(sig)
    except ConfigError:
        ok = np.isfinite(sig) if sig.ndim == 1 else np.isfinite(sig).all(axis=1)
        if ok.all():  # refused for another reason
            raise
    out = np.full(sig.shape[0], np.nan, np.float32 if sig.dtype == np.float32 else np.float64)
    if ok.any():
        out[ok] = cal.predict_proba(sig[ok])
    return out
