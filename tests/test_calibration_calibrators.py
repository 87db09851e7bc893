"""fit_calibrator (calibration.calibrators): a mapping of signals is stacked in ``inputs`` order, the result is the
runtime Calibrator fitted on exactly those columns, and what it records travels into the artifact.

Known answer: two 1-D Gaussian signals per class whose Bayes posterior is logistic in their sum (equal variances).
"""

from __future__ import annotations

import numpy as np
import pytest

from safeclip.calibrate import Calibrator
from safeclip.calibration import fit_calibrator


def signals(rng: np.random.Generator, n: int) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """prompt ~ N(+-1, 1), probe ~ N(+-1, 1) given the class (prior 0.3): posterior logit = 2 (prompt + probe) +
    log(0.3 / 0.7)."""
    y = (rng.random(n) < 0.3).astype(np.int8)
    m = np.where(y == 1, 1.0, -1.0)
    raw = {"prompt": rng.normal(m, 1.0), "probe": rng.normal(m, 1.0)}
    logit = 2.0 * (raw["prompt"] + raw["probe"]) + np.log(0.3 / 0.7)
    return raw, y, 1.0 / (1.0 + np.exp(-logit))


def test_mapping_is_stacked_in_inputs_order_and_matches_the_bayes_posterior() -> None:
    raw, y, _ = signals(np.random.default_rng(0), 5000)
    cal = fit_calibrator(raw, y, "sigmoid", inputs=("probe", "prompt"))
    same = Calibrator("sigmoid", ("probe", "prompt")).fit(np.column_stack([raw["probe"], raw["prompt"]]), y)
    np.testing.assert_allclose(cal.coef_, same.coef_)
    assert cal.inputs == ("probe", "prompt") and cal.intercept_ == pytest.approx(same.intercept_)
    np.testing.assert_allclose(cal.coef_, [2.0, 2.0], atol=0.25)  # the posterior's own coefficients
    test_raw, _, p_bayes = signals(np.random.default_rng(1), 20_000)
    p = cal.predict_proba(np.column_stack([test_raw["probe"], test_raw["prompt"]]))
    assert np.abs(p - p_bayes).mean() < 0.02


def test_array_input_auto_method_and_recorded_fields() -> None:
    raw, y, _ = signals(np.random.default_rng(2), 3000)
    cal = fit_calibrator(raw["prompt"], y, "auto", encoder_id="enc", metadata={"category": "drugs"})
    assert cal.method_ == "isotonic"  # 3000 rows with >= 100 of each class
    assert fit_calibrator(raw["prompt"][:500], y[:500], "auto").method_ == "sigmoid"
    d = cal.to_dict()
    assert d["encoder_id"] == "enc" and d["metadata"] == {"category": "drugs"} and d["n_samples"] == 3000


def test_missing_signal_and_bad_method_are_value_errors() -> None:
    raw, y, _ = signals(np.random.default_rng(3), 200)
    with pytest.raises(ValueError, match=r"lacks the signal\(s\) \['probe'\]"):
        fit_calibrator({"prompt": raw["prompt"]}, y, inputs=("prompt", "probe"))
    with pytest.raises(ValueError, match="method"):
        fit_calibrator(raw["prompt"], y, "platt")
