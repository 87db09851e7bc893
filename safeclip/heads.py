"""Trained heads of the score stage: functions of an embedding whose output is a category's signal.

A :class:`LinearProbe` is a logistic-regression probe (made by :func:`safeclip.calibration.train_probe`); its logit
is the ``probe`` signal. Heads are JSON artifacts pinned by sha256 in a policy, evaluated in numpy alone, and each
records the ``encoder_id`` of its embedding space.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from ._arrays import sigmoid
from .artifacts import (
    ARTIFACT_FORMAT,
    check_artifact,
    check_encoder,
    finite_number,
    float_list,
    jsonable,
    read_pinned_json,
    write_json_atomic,
)
from .errors import ArtifactIntegrityError, EncoderMismatchError

__all__ = ["LinearProbe", "PROBE_KIND"]

PROBE_KIND = "safeclip.probe"


class LinearProbe:
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
        z = x @ self.coef_
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
        enc = d.get("encoder_id")
        if not isinstance(enc, str) or not enc:
            raise ArtifactIntegrityError("probe artifact: 'encoder_id' must be a non-empty string")
        dim = d.get("dim")
        coef = float_list(d, "coef", "probe")
        if not isinstance(dim, int) or isinstance(dim, bool) or coef.shape != (dim,) or dim < 1:
            raise ArtifactIntegrityError(f"probe artifact: 'dim' {dim!r} does not match {coef.size} coefficients")
        meta = d.get("metadata", {})
        if not isinstance(meta, dict):
            raise ArtifactIntegrityError("probe artifact: 'metadata' must be an object")
        return cls(coef, finite_number(d, "intercept", "probe"), encoder_id=enc, metadata=meta)

    def save(self, path: str | os.PathLike[str]) -> str:
        """Write the JSON artifact atomically; returns its sha256."""
        return write_json_atomic(path, self.to_dict())

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
        probe = cls.from_dict(read_pinned_json(path, sha256))
        check_encoder(probe.encoder_id, encoder_id, f"probe {os.fspath(path)!r}")
        if dim is not None and probe.dim != dim:
            raise EncoderMismatchError(f"probe {os.fspath(path)!r} has dimension {probe.dim}, embeddings have {dim}")
        return probe
