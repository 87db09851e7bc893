"""What the calibration modules share: the warning base class and the check of a (probabilities, labels) pair."""

from __future__ import annotations

from typing import Any

import numpy as np

from safeclip.arrays import as_binary_labels

__all__ = ["CalibrationWarning", "check_scores"]


class CalibrationWarning(UserWarning):
    """Base class of the calibration warnings: the work went on, but a result deserves a look."""


def check_scores(p: Any, y: Any, *, probabilities: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``p`` as a finite, non-empty float64 vector (in [0, 1] when ``probabilities``), ``y`` as 0/1 int8 of the
    same length; ``ValueError`` otherwise."""
    pp = np.asarray(p, np.float64)
    if pp.ndim != 1 or pp.size == 0:
        raise ValueError(f"p must be a non-empty 1-D array, got shape {pp.shape}")
    if not np.isfinite(pp).all():
        raise ValueError("p contains NaN or infinity")
    if probabilities and (pp.min() < 0 or pp.max() > 1):
        raise ValueError("p must hold probabilities in [0, 1]")
    return pp, as_binary_labels(y, pp.size)
