"""Shared numpy helpers of the numeric stages: a stable sigmoid, label validation (scikit-learn keeps its own in
``sklearn.utils.validation``; these are ours) and the batch-layout-independent matrix product every score uses."""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import DataError

__all__ = ["NORM_TOLERANCE", "PRODUCT_BLOCK", "as_binary_labels", "as_embeddings", "embedding_row_problems",
           "require_both_classes", "row_product", "sigmoid", "sigmoid_inplace"]

NORM_TOLERANCE = 1e-2
"""An embedding whose L2 norm is off 1 by more than this is not one of ours (CLIP embeddings are normalised)."""


PRODUCT_BLOCK = 64
"""Rows per matrix product in :func:`row_product`: every block of the inputs has exactly this shape."""


def row_product(w: np.ndarray, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``w @ x.T`` (``(R, N)``), where column ``i`` depends only on ``x[i]``: bit for bit the same whatever the
    batch ``x`` is part of (1 row or a million, any position).

    A BLAS product is not: small shapes take other kernels (a single row a gemv, a few rows a "small matrix" path)
    whose float accumulation differs in the last bits, so an image scored alone and in a batch would differ and a
    re-run audit could not be compared exactly. Here every product has one shape, ``(R, D) @ (D, PRODUCT_BLOCK)``,
    the last block padded with zero rows.

    >>> w = np.ones((2, 3), np.float32)
    >>> x = np.arange(12, dtype=np.float32).reshape(4, 3)
    >>> row_product(w, x).tolist()
    [[3.0, 12.0, 21.0, 30.0], [3.0, 12.0, 21.0, 30.0]]
    >>> bool((row_product(w, x[2:3]) == row_product(w, x)[:, 2:3]).all())
    True
    """
    n, b = x.shape[0], PRODUCT_BLOCK
    dtype = np.result_type(w.dtype, x.dtype)
    if out is None:
        out = np.empty((w.shape[0], n), dtype)
    full = n - n % b
    for start in range(0, full, b):
        np.matmul(w, x[start:start + b].T, out=out[:, start:start + b])
    if full < n:
        pad = np.zeros((b, x.shape[1]), x.dtype)
        pad[:n - full] = x[full:]
        out[:, full:] = np.matmul(w, pad.T)[:, :n - full]
    return out


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
        raise DataError(f"{name} must be 1-D, got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise DataError(f"{name} has {arr.shape[0]} labels for {n} rows")
    if arr.dtype == bool:
        return arr.astype(np.int8)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise DataError(f"{name} must hold 0/1 or booleans, got dtype {arr.dtype}")
    if arr.size and not np.all((arr == 0) | (arr == 1)):
        raise DataError(f"{name} must hold only 0 and 1 (positive = 1)")
    return arr.astype(np.int8)


def require_both_classes(y: np.ndarray, what: str) -> tuple[int, int]:
    n_pos = int(y.sum())
    n_neg = int(y.shape[0] - n_pos)
    if n_pos == 0 or n_neg == 0:
        raise DataError(f"{what} needs both classes; got {n_pos} positives and {n_neg} negatives")
    return n_pos, n_neg


def embedding_row_problems(x: np.ndarray) -> np.ndarray:
    """``(N,)`` object array: ``None`` for a usable row, else why it is not (non-finite, not L2-normalised).

    The per-row form lets bulk paths (audits, rescore) turn one bad row into an error row and keep the rest.
    """
    x = np.asarray(x)
    out = np.full(x.shape[0] if x.ndim >= 1 else 0, None, dtype=object)
    if x.ndim != 2 or x.shape[0] == 0:
        return out
    xf = x if x.dtype in (np.float32, np.float64) else x.astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        sq = np.einsum("ij,ij->i", xf, xf)  # one pass; NaN or inf anywhere in a row makes its sum non-finite
    suspect = ~np.isfinite(sq)
    for i in np.flatnonzero(suspect):
        out[i] = "holds NaN or infinity" if not np.isfinite(xf[i]).all() else "is not L2-normalised (norm overflows)"
    off = ~suspect & (np.abs(np.sqrt(np.where(suspect, 1.0, sq)) - 1.0) > NORM_TOLERANCE)
    for i in np.flatnonzero(off):
        out[i] = f"is not L2-normalised (norm {float(np.sqrt(sq[i])):.4g})"
    return out


def as_embeddings(x: Any, *, dim: int | None = None, what: str = "embeddings") -> np.ndarray:
    """Validate ``(N, D)`` CLIP embeddings and return them as float32; :class:`DataError` names the first bad row.

    Refused: another shape or dimension, non-float dtypes (ints, bools), NaN/inf, rows that are not L2-normalised.

    >>> as_embeddings(np.eye(2, dtype=np.float32)).dtype
    dtype('float32')
    >>> as_embeddings(np.array([[0.6, 0.8], [600.0, 800.0]]))
    Traceback (most recent call last):
    ...
    safeclip.errors.DataError: embeddings row 1 is not L2-normalised (norm 1000): pass CLIP embeddings as safeclip computes them
    """
    a = np.asarray(x)
    if a.ndim != 2:
        raise DataError(f"{what} must be a 2-D (N, D) array, got shape {a.shape}")
    if dim is not None and a.shape[1] != dim:
        raise DataError(f"{what} have dimension {a.shape[1]}, this policy's embedding space has {dim}")
    if not np.issubdtype(a.dtype, np.floating):
        raise DataError(f"{what} must be floating point (float32), got dtype {a.dtype}")
    problems = embedding_row_problems(a)
    bad = [i for i, p in enumerate(problems) if p is not None]
    if bad:
        more = f" (and {len(bad) - 1} more rows)" if len(bad) > 1 else ""
        raise DataError(f"{what} row {bad[0]} {problems[bad[0]]}{more}: pass CLIP embeddings as safeclip computes "
                        "them")
    return a.astype(np.float32, copy=False)
