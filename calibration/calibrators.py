"""Calibrators from labelled signals: :func:`fit_calibrator` makes a fitted :class:`safeclip.calibrate.Calibrator`
(the runtime object, calibrate stage) from raw signals and labels.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> y = (rng.random(1000) < 0.3).astype(int)
>>> raw = {"prompt": rng.normal(2.0 * y - 1.0), "probe": rng.normal(3.0 * y - 1.5)}
>>> cal = fit_calibrator(raw, y, inputs=("prompt", "probe"), encoder_id="demo")
>>> cal.method_, cal.inputs, cal.predict_proba(np.column_stack([raw["prompt"], raw["probe"]])).shape
('sigmoid', ('prompt', 'probe'), (1000,))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from safeclip.calibrate import Calibrator

__all__ = ["fit_calibrator"]


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
