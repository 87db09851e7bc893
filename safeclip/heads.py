"""Trained heads of the score stage: functions of an embedding whose output is a category's signal.

- A :class:`LinearProbe` is a logistic-regression probe (made by :func:`safeclip.calibration.train_probe`); its logit
  is the ``probe`` signal. Trained with class weights, it needs a calibrator before thresholds mean anything.
- An :class:`MLPHead` is a small trained classifier from elsewhere (LAION's NSFW heads, clip-retrieval's violence
  vectors, see :mod:`safeclip.importers`): input standardisation, Linear/ReLU layers, one output logit. Its logit is
  the ``head`` signal and, in a category without a calibrator, its own probability (``sigmoid(logit)``, e.g.
  LAION's ``punsafe``) is what the thresholds apply to.

Heads are JSON artifacts pinned by sha256 in a policy, evaluated in numpy alone (float32), and each records the
``encoder_id`` of its embedding space. :func:`load_head` also takes a published file (a LAION ``.pth``/``.npy``)
that :mod:`safeclip.importers` knows by its sha256: it is converted once, and the converted artifact is itself
pinned (the conversion is deterministic).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from .arrays import NORM_TOLERANCE, row_product, sigmoid
from .artifacts import (
    ARTIFACT_FORMAT,
    MAX_ARTIFACT_NUMBERS,
    MAX_LOGIT_BOUND,
    check_artifact,
    check_encoder,
    finite_number,
    float_list,
    jsonable,
    load_pinned,
    write_json_atomic,
)
from .errors import ArtifactIntegrityError, EncoderMismatchError

__all__ = ["MAX_HEAD_PARAMETERS", "MAX_LOGIT_BOUND", "MLP_KIND", "PROBE_KIND", "LinearProbe", "MLPHead", "load_head"]

PROBE_KIND = "safeclip.probe"
MLP_KIND = "safeclip.mlp_head"
_SIGNAL_NAMES = ("prompt", "probe", "head")  # what a head's output may not be called (Decisions report both)
MAX_HEAD_PARAMETERS = MAX_ARTIFACT_NUMBERS
"""An MLP head with more parameters than this (2M) is refused before its arrays are built (LAION's are under 300k);
its JSON would not fit :data:`~safeclip.artifacts.MAX_ARTIFACT_JSON_BYTES` either."""
_MAX_INPUT_NORM = 1.0 + NORM_TOLERANCE  # the largest embedding norm the score stage accepts


def _check_logit_bound(layers: tuple[tuple[np.ndarray, np.ndarray], ...]) -> None:
    """ValueError unless every array is finite and the worst-case ``|logit|`` is at most :data:`MAX_LOGIT_BOUND`."""
    bound = _MAX_INPUT_NORM
    with np.errstate(over="ignore", invalid="ignore"):
        for w, b in layers:
            bound = float(np.linalg.norm(w)) * bound + float(np.linalg.norm(b))
            if not (np.isfinite(w).all() and np.isfinite(b).all()):
                bound = np.inf
    if not bound <= MAX_LOGIT_BOUND:  # NaN-safe: NaN fails every comparison
        raise ValueError(f"its logit can reach {bound:.3g} for a unit embedding, more than "
                         f"{MAX_LOGIT_BOUND:g} (weights as applied are not finite or far too large for a trained "
                         "head, e.g. a zero variance over a tiny epsilon): it would score inf or NaN")


class _JSONArtifact:
    """What every head artifact shares: JSON written atomically, read back pinned."""

    encoder_id: str
    dim: int
    metadata: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def save(self, path: str | os.PathLike[str]) -> str:
        """Write the JSON artifact atomically; returns its sha256 (the pin a policy records)."""
        return write_json_atomic(path, self.to_dict())


def _identity_fields(d: Mapping[str, Any], kind: str) -> tuple[str, dict[str, Any]]:
    """``(encoder_id, metadata)`` of an artifact dict, checked."""
    enc = d.get("encoder_id")
    if not isinstance(enc, str) or not enc:
        raise ArtifactIntegrityError(f"{kind} artifact: 'encoder_id' must be a non-empty string")
    meta = d.get("metadata", {})
    if not isinstance(meta, dict):
        raise ArtifactIntegrityError(f"{kind} artifact: 'metadata' must be an object")
    return enc, meta


def _in_space(art: _JSONArtifact, path: str | os.PathLike[str], encoder_id: str | None, dim: int | None,
              what: str) -> Any:
    """``art``, unless it belongs to another embedding space or dimension (:class:`EncoderMismatchError`)."""
    fix = "refit it for this encoder"
    if isinstance(art.metadata.get("trained_in"), str) and "retargeted" not in art.metadata:
        arch, weights = (art.metadata["trained_in"].split("|") + ["", ""])[:2]
        fix = (f"it was trained on {arch} {weights} embeddings: run with --model {arch} --pretrained {weights} "
               "(or a local copy of that published checkpoint file, recognised by its sha256)")
    check_encoder(art.encoder_id, encoder_id, f"{what} {os.fspath(path)!r}", fix)
    if dim is not None and art.dim != dim:
        raise EncoderMismatchError(f"{what} {os.fspath(path)!r} has dimension {art.dim}, embeddings have {dim}")
    return art


class LinearProbe(_JSONArtifact):
    """A linear probe on embeddings: ``logit = X @ coef_ + intercept_`` in float32.

    Made by :func:`safeclip.calibration.train_probe`. ``metadata`` records how (data hash, C, CV metrics, class
    balance). Trained with class weights its ``predict_proba`` assumes balanced classes: calibrate its logit
    (a :class:`Calibrator` with ``inputs=("probe",)`` or ``("prompt", "probe")``) before applying thresholds.
    """

    def __init__(
        self,
        coef: np.ndarray,
        intercept: float,
        *,
        encoder_id: str,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(encoder_id, str) or not encoder_id:
            raise ValueError("a LinearProbe needs the encoder_id of its embedding space")
        coef_ = np.ascontiguousarray(np.asarray(coef, np.float32).ravel())
        if coef_.size == 0 or not np.isfinite(coef_).all() or not np.isfinite(intercept):
            raise ValueError("probe coefficients and intercept must be finite and non-empty")
        _check_logit_bound(((coef_[None, :].astype(np.float64), np.array([float(intercept)])),))
        self.coef_ = coef_
        self.intercept_ = float(intercept)
        self.encoder_id = encoder_id
        self.dim = int(coef_.shape[0])
        self.metadata: dict[str, Any] = jsonable(dict(metadata or {}))

    def __repr__(self) -> str:
        return f"LinearProbe(dim={self.dim}, encoder_id={self.encoder_id!r})"

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """``(n,)`` float32 logits for ``(n, dim)`` embeddings (a single ``(dim,)`` row is accepted)."""
        x = np.asarray(X, dtype=np.float32)
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise EncoderMismatchError(
                f"embeddings of shape {np.shape(X)} do not match this probe's dimension {self.dim} "
                f"(encoder {self.encoder_id!r})"
            )
        z = row_product(self.coef_[None, :], x)[0]  # the same bits for a row alone or in any batch
        z += np.float32(self.intercept_)
        return z

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """``sigmoid(decision_function(X))`` (balanced-prior probability when trained with class weights)."""
        return sigmoid(self.decision_function(X))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (``"kind": "safeclip.probe", "format": 1``)."""
        return {
            "kind": PROBE_KIND,
            "format": ARTIFACT_FORMAT,
            "encoder_id": self.encoder_id,
            "dim": self.dim,
            # float32 -> Python float is exact, and JSON floats round-trip exactly.
            "coef": [float(c) for c in self.coef_],
            "intercept": self.intercept_,
            "metadata": jsonable(self.metadata),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LinearProbe:
        """Rebuild from :meth:`to_dict`; a malformed dict raises :class:`ArtifactIntegrityError`."""
        check_artifact(d, PROBE_KIND)
        enc, meta = _identity_fields(d, "probe")
        dim = d.get("dim")
        coef = float_list(d, "coef", "probe")
        if not isinstance(dim, int) or isinstance(dim, bool) or coef.shape != (dim,) or dim < 1:
            raise ArtifactIntegrityError(f"probe artifact: 'dim' {dim!r} does not match {coef.size} coefficients")
        try:
            return cls(coef, finite_number(d, "intercept", "probe"), encoder_id=enc, metadata=meta)
        except ValueError as e:
            raise ArtifactIntegrityError(f"probe artifact: {e}") from e

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        sha256: str,
        encoder_id: str | None = None,
        *,
        dim: int | None = None,
    ) -> LinearProbe:
        """Load a pinned artifact; :class:`EncoderMismatchError` on another ``encoder_id`` or ``dim``."""
        return _in_space(load_pinned(path, sha256, cls.from_dict), path, encoder_id, dim, "probe")


class MLPHead(_JSONArtifact):
    """A small MLP on embeddings: ``(x - mean) / (sqrt(variance) + epsilon)``, then ``Linear, ReLU, ..., Linear``
    to one logit.

    Weights are stored as float32 and applied in float64 (blocks of :attr:`BLOCK_ROWS` rows), with the
    standardisation folded into the first layer: float32 arithmetic puts LAION's B/32 head a few 1e-6 away from its
    own formula, float64 keeps it at rounding level.

    ``layers`` is a list of ``(weight (out, in), bias (out,))``; the last layer has one output. ``standardize`` is
    ``None`` or ``{"mean": (dim,), "variance": (dim,), "epsilon": float}`` (the Keras ``Normalization`` layer LAION's
    heads start with). ``output`` names the head's probability in decisions (``"punsafe"`` for LAION's NSFW heads).

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> head = MLPHead([(rng.normal(size=(4, 8)), np.zeros(4)), (rng.normal(size=(1, 4)), np.zeros(1))],
    ...                encoder_id="demo", output="p_demo")
    >>> x = rng.normal(size=(3, 8)); x /= np.linalg.norm(x, axis=1, keepdims=True)
    >>> head.predict_proba(x).shape
    (3,)
    >>> MLPHead.from_dict(head.to_dict()).decision_function(x).tolist() == head.decision_function(x).tolist()
    True

    Load a pinned one with :func:`load_head`.
    """

    BLOCK_ROWS = 8192

    def __init__(
        self,
        layers: list[tuple[np.ndarray, np.ndarray]],
        *,
        encoder_id: str,
        standardize: Mapping[str, Any] | None = None,
        output: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(encoder_id, str) or not encoder_id:
            raise ValueError("an MLPHead needs the encoder_id of its embedding space")
        if not layers:
            raise ValueError("an MLPHead needs at least one layer")
        built: list[tuple[np.ndarray, np.ndarray]] = []
        width = None
        for i, (w, b) in enumerate(layers):
            w32 = np.ascontiguousarray(np.asarray(w, np.float32))
            b32 = np.ascontiguousarray(np.asarray(b, np.float32).ravel())
            if w32.ndim != 2 or b32.shape != (w32.shape[0],) or (width is not None and w32.shape[1] != width):
                raise ValueError(f"layer {i}: weight {w32.shape} and bias {b32.shape} do not chain")
            if not (np.isfinite(w32).all() and np.isfinite(b32).all()):
                raise ValueError(f"layer {i}: weights and biases must be finite")
            built.append((w32, b32))
            width = w32.shape[0]
        if width != 1:
            raise ValueError(f"the last layer must have one output (a logit), it has {width}")
        self.layers_ = tuple(built)
        self._layers64 = tuple((w.astype(np.float64), b.astype(np.float64)) for w, b in built)
        self.dim = int(built[0][0].shape[1])
        if output is not None and (not output.isidentifier() or output in _SIGNAL_NAMES):
            raise ValueError(f"output {output!r} must be an identifier other than {', '.join(_SIGNAL_NAMES)}")
        self.encoder_id = encoder_id
        self.output = output
        self.standardize: dict[str, Any] | None = None
        if standardize is not None:
            mean = np.asarray(standardize["mean"], np.float32).ravel()
            var = np.asarray(standardize["variance"], np.float32).ravel()
            eps = float(standardize.get("epsilon", 0.0))
            if mean.shape != (self.dim,) or var.shape != (self.dim,):
                raise ValueError(f"standardize mean/variance must be ({self.dim},)")
            if not (np.isfinite(mean).all() and np.isfinite(var).all() and (var >= 0).all() and np.isfinite(eps)
                    and eps >= 0):
                raise ValueError("standardize mean/variance/epsilon must be finite, variance and epsilon >= 0")
            denom = np.sqrt(var.astype(np.float64)) + eps
            if not (denom > 0).all():
                raise ValueError("standardize: a zero variance needs a positive epsilon")
            self.standardize = {"mean": mean, "variance": var, "epsilon": eps}
            # Folded into the first layer, in float64: W (x - m) / d + b = (W / d) x + (b - (W / d) m).
            w1, b1 = self._layers64[0]
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                w1 = w1 / denom
                b1 = b1 - w1 @ mean.astype(np.float64)
            if not (np.isfinite(w1).all() and np.isfinite(b1).all()):
                raise ValueError("standardize: folding 1 / (sqrt(variance) + epsilon) into the first layer overflows "
                                 "(a zero variance needs an epsilon far above the smallest float, e.g. 1e-10)")
            self._layers64 = ((w1, b1),) + self._layers64[1:]
        # Checked as applied (the fold can overflow what was finite in the file): inf or NaN weights, or weights so
        # large that a logit overflows, would score every image NaN.
        _check_logit_bound(self._layers64)
        self.metadata: dict[str, Any] = jsonable(dict(metadata or {}))

    def __repr__(self) -> str:
        shape = "->".join([str(self.dim)] + [str(w.shape[0]) for w, _ in self.layers_])
        return f"MLPHead({shape}, encoder_id={self.encoder_id!r})"

    @property
    def n_parameters(self) -> int:
        return int(sum(w.size + b.size for w, b in self.layers_))

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """``(n,)`` float64 logits for ``(n, dim)`` embeddings (a single ``(dim,)`` row is accepted)."""
        x = np.asarray(X)
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise EncoderMismatchError(
                f"embeddings of shape {np.shape(X)} do not match this head's dimension {self.dim} "
                f"(encoder {self.encoder_id!r})"
            )
        out = np.empty(x.shape[0], np.float64)
        last = len(self._layers64) - 1
        for start in range(0, x.shape[0], self.BLOCK_ROWS):
            z = x[start:start + self.BLOCK_ROWS].astype(np.float64, copy=False)
            for i, (w, b) in enumerate(self._layers64):
                z = row_product(w, z).T  # the same bits for a row alone or in any batch
                z += b
                if i < last:
                    np.maximum(z, 0, out=z)
            out[start:start + len(z)] = z[:, 0]
        return out

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """``sigmoid(decision_function(X))``: the head's own probability (LAION's ``punsafe`` for its NSFW heads)."""
        return sigmoid(self.decision_function(X))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (``"kind": "safeclip.mlp_head", "format": 1``); arrays as flat lists with shapes."""
        std = None
        if self.standardize is not None:
            std = {"mean": [float(v) for v in self.standardize["mean"]],
                   "variance": [float(v) for v in self.standardize["variance"]],
                   "epsilon": float(self.standardize["epsilon"])}
        return {
            "kind": MLP_KIND,
            "format": ARTIFACT_FORMAT,
            "encoder_id": self.encoder_id,
            "dim": self.dim,
            "activation": "relu",
            "standardize": std,
            "layers": [{"shape": list(w.shape), "weight": [float(v) for v in w.ravel()],
                        "bias": [float(v) for v in b]} for w, b in self.layers_],
            "output": self.output,
            "metadata": jsonable(self.metadata),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MLPHead:
        """Rebuild from :meth:`to_dict`; a malformed dict raises :class:`ArtifactIntegrityError`."""
        kind = "mlp head"
        check_artifact(d, MLP_KIND)
        enc, meta = _identity_fields(d, kind)
        if d.get("activation") != "relu":
            raise ArtifactIntegrityError(f"{kind} artifact: 'activation' must be 'relu'")
        raw = d.get("layers")
        if not isinstance(raw, list) or not raw or not all(isinstance(x, dict) for x in raw):
            raise ArtifactIntegrityError(f"{kind} artifact: 'layers' must be a non-empty list of objects")
        total = 0
        for i, layer in enumerate(raw):
            shape = layer.get("shape")
            if (not isinstance(shape, list) or len(shape) != 2
                    or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in shape)):
                raise ArtifactIntegrityError(f"{kind} artifact: layers[{i}].shape must be two positive integers")
            total += shape[0] * shape[1] + shape[0]
        if total > MAX_HEAD_PARAMETERS:
            raise ArtifactIntegrityError(f"{kind} artifact: {total} parameters, more than {MAX_HEAD_PARAMETERS}")
        layers = []
        for i, layer in enumerate(raw):
            out_n, in_n = layer["shape"]
            w = float_list(layer, "weight", f"{kind} layers[{i}]")
            b = float_list(layer, "bias", f"{kind} layers[{i}]")
            if w.size != out_n * in_n or b.size != out_n:
                raise ArtifactIntegrityError(f"{kind} artifact: layers[{i}] holds {w.size} weights and {b.size} "
                                             f"biases for shape {layer['shape']}")
            layers.append((w.reshape(out_n, in_n), b))
        std = d.get("standardize")
        if std is not None:
            if not isinstance(std, dict):
                raise ArtifactIntegrityError(f"{kind} artifact: 'standardize' must be an object or null")
            std = {"mean": float_list(std, "mean", kind), "variance": float_list(std, "variance", kind),
                   "epsilon": finite_number(std, "epsilon", kind)}
        output = d.get("output")
        if output is not None and not isinstance(output, str):
            raise ArtifactIntegrityError(f"{kind} artifact: 'output' must be a string or null")
        try:
            head = cls(layers, encoder_id=enc, standardize=std, output=output, metadata=meta)
        except ValueError as e:
            raise ArtifactIntegrityError(f"{kind} artifact: {e}") from e
        if d.get("dim") != head.dim:
            raise ArtifactIntegrityError(f"{kind} artifact: 'dim' {d.get('dim')!r} does not match its first layer")
        return head


def load_head(
    path: str | os.PathLike[str],
    sha256: str,
    encoder_id: str | None = None,
    *,
    dim: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> MLPHead:
    """Load the head a policy pins: a safeclip JSON head, or a published file known to :mod:`safeclip.importers`.

    A published file (LAION's ``.pth`` head or ``.npy`` violence vectors, recognised by its pinned sha256) is
    converted on first use; the converted artifact is cached and checked against the sha256 the conversion is known
    to give. :class:`EncoderMismatchError` on another ``encoder_id`` or ``dim``.
    """
    try:
        with open(path, "rb") as f:
            first = f.read(1)
    except OSError as e:
        raise ArtifactIntegrityError(f"cannot read artifact {os.fspath(path)!r}: {e}") from e
    if first in (b"{", b" ", b"\n"):
        head = load_pinned(path, sha256, MLPHead.from_dict)
    else:
        # Converting LAION's .pth needs torch.load(weights_only=True): imported here, once per published file.
        from .importers import load_published_head

        head = load_published_head(path, sha256, cache_dir=cache_dir)
    return _in_space(head, path, encoder_id, dim, "head")
