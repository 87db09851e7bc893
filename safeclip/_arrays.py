"""Shared numpy helpers of the numeric stages: a stable sigmoid and label validation (scikit-learn keeps its own
in ``sklearn.utils.validation``; these are ours)."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["as_binary_labels", "require_both_classes", "sigmoid", "sigmoid_inplace"]


def sigmoid(z: np.ndarray) -> np.ndarray:
    """Logistic function in the dtype of ``z`` (float32 stays float32), without overflow warnings."""
    z = np.asarray(z)
    if not np.issubdtype(z.dtype, np.floating):
        z = z.astype(np.float64)
    return sigmoid_inplace(np.negative(z), negated=True)


def sigmoid_inplace(z: np.ndarray, *, negated: bool = False) -> np.ndarray:
    """``sigmoid(z)`` computed in ``z``'s own buffer (``-z`` already there when ``negated``)."""
    if not negated:
        np.negative(z, out=z)
    with np.errstate(over="ignore"):  # exp(+large) = inf gives exactly 0, which is right
        np.exp(z, out=z)
    z += 1
    np.reciprocal(z, out=z)
    return z


def as_binary_labels(y: Any, n: int | None = None, *, name: str = "y") -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} labels for {n} rows")
    if arr.dtype == bool:
        return arr.astype(np.int8)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"{name} must hold 0/1 or booleans, got dtype {arr.dtype}")
    if arr.size and not np.all((arr == 0) | (arr == 1)):
        raise ValueError(f"{name} must hold only 0 and 1 (positive = 1)")
    return arr.astype(np.int8)


def require_both_classes(y: np.ndarray, what: str) -> tuple[int, int]:
    n_pos = int(y.sum())
    n_neg = int(y.shape[0] - n_pos)
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"{what} needs both classes; got {n_pos} positives and {n_neg} negatives")
    return n_pos, n_neg
