"""Thresholds (calibration.thresholds): targets that hold on a million fresh rows at the promised confidence (where the
naive read-off of the curve holds about half the time), the recorded evidence, the clamp, the bounds, and warnings
for targets the data cannot support (data in calibration_known.calibrated_sample)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from calibration_known import Fresh, calibrated_sample, fresh  # noqa: F401 (a fixture)

from safeclip.calibration import (
    CalibrationWarning,
    ThresholdWarning,
    Thresholds,
    choose_thresholds,
    naive_threshold,
    precision_lower_bound,
    recall_lower_bound,
)

REPEATS = 150


def test_block_precision_promise_holds(fresh: Fresh) -> None:
    target = 0.8
    guarded, naive = [], []
    for rep in range(REPEATS):
        p, y = calibrated_sample(np.random.default_rng(10_000 + rep), 2000)
        th = choose_thresholds(p, y, block_precision=target, flag_recall=None, confidence=0.95)
        assert th.block is not None and th.block_bound >= target
        guarded.append(fresh.precision(th.block) >= target)
        t_naive = naive_threshold(p, y, target)
        naive.append(fresh.precision(t_naive) >= target)
    g, nv = float(np.mean(guarded)), float(np.mean(naive))
    assert g >= 0.9, g
    assert 0.25 <= nv <= 0.75, nv
    assert nv < g


def test_flag_recall_promise_holds(fresh: Fresh) -> None:
    target = 0.9
    guarded, naive = [], []
    for rep in range(REPEATS):
        p, y = calibrated_sample(np.random.default_rng(20_000 + rep), 2000)
        th = choose_thresholds(p, y, block_precision=None, flag_recall=target)
        assert th.flag is not None and th.flag_bound >= target
        guarded.append(fresh.recall(th.flag) >= target)
        # Naive: the highest cutoff whose calibration-set recall reaches the target.
        order = np.sort(p[y == 1])[::-1]
        naive.append(fresh.recall(order[int(np.ceil(target * order.size)) - 1]) >= target)
    g, nv = float(np.mean(guarded)), float(np.mean(naive))
    assert g >= 0.9, g
    assert 0.25 <= nv <= 0.75, nv


def test_threshold_fields_and_clamp() -> None:
    p, y = calibrated_sample(np.random.default_rng(1), 20_000)
    th = choose_thresholds(p, y, block_precision=0.8, flag_recall=0.8)
    assert isinstance(th, Thresholds) and th.flag <= th.block
    assert th.n == 20_000 and th.n_pos == int(y.sum()) and th.confidence == 0.95
    assert th.target_block_precision == 0.8 and th.target_flag_recall == 0.8
    sel = p >= th.block
    assert th.block_precision == pytest.approx(y[sel].mean())
    assert th.block_recall == pytest.approx(y[sel].sum() / y.sum())
    assert th.block_positive_rate == pytest.approx(sel.mean())
    assert th.block_bound == pytest.approx(float(precision_lower_bound(y[sel].sum(), (1 - y[sel]).sum())))
    assert th.block_bound <= th.block_precision and th.flag_bound <= th.flag_recall
    assert th.bound.startswith("clopper-pearson") and not th.flag_clamped
    json.dumps(th.to_dict(), allow_nan=False)
    # A recall target met far above block is clamped down to it.
    th2 = choose_thresholds(p, y, block_precision=0.7, flag_recall=0.05)
    assert th2.flag_clamped and th2.flag == th2.block
    assert th2.flag_recall == th2.block_recall and th2.flag_bound >= 0.05


def test_bounds_are_clopper_pearson() -> None:
    from scipy import stats

    assert precision_lower_bound(np.array([0]), np.array([5]))[0] == 0
    assert precision_lower_bound(np.array([10]), np.array([0]))[0] == pytest.approx(0.05 ** (1 / 10))
    assert precision_lower_bound(np.array([40]), np.array([10]), 0.9)[0] == pytest.approx(
        stats.beta.ppf(0.1, 40, 11))
    assert recall_lower_bound(np.array([45]), 50)[0] == pytest.approx(stats.beta.ppf(0.05, 45, 6))


def test_unsupported_targets_warn() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random(200) < 0.5).astype(int)
    p = np.clip(0.5 + 0.2 * (y - 0.5) + rng.normal(0, 0.15, 200), 0, 1)  # heavily overlapping classes
    with pytest.warns(ThresholdWarning, match="precision >= 0.999"):
        th = choose_thresholds(p, y, block_precision=0.999, flag_recall=None)
    assert th.block is None and th.block_bound is None
    with pytest.warns(ThresholdWarning, match="recall >= 0.99"):  # 10 positives cannot show 99% recall
        th = choose_thresholds(p[:20], y[:20], block_precision=None, flag_recall=0.99)
    assert th.flag is None
    with pytest.warns(ThresholdWarning) as rec:
        th = choose_thresholds(p, np.zeros(200, int))
    assert len(rec) == 2 and th.block is None and th.flag is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        choose_thresholds(p, y, block_precision=None, flag_recall=None)
    assert issubclass(ThresholdWarning, UserWarning) and issubclass(ThresholdWarning, CalibrationWarning)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"block_precision": 1.0}, "block_precision"),
        ({"flag_recall": 0.0}, "flag_recall"),
        ({"confidence": 1.0}, "confidence"),
    ],
)
def test_choose_thresholds_rejects_bad_args(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        choose_thresholds(np.array([0.1, 0.9]), np.array([0, 1]), **kwargs)


def test_choose_thresholds_rejects_bad_data() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        choose_thresholds(np.array([0.1, 1.5]), np.array([0, 1]))
    with pytest.raises(ValueError, match="NaN"):
        choose_thresholds(np.array([0.1, np.nan]), np.array([0, 1]))
    with pytest.raises(ValueError, match="labels"):
        choose_thresholds(np.array([0.1, 0.2]), np.array([0, 1, 1]))


def test_ties_are_one_cutoff() -> None:
    p = np.r_[np.full(100, 0.9), np.full(100, 0.1)]
    y = np.r_[np.ones(95), np.zeros(5), np.zeros(100)]
    th = choose_thresholds(p, y, block_precision=0.8, flag_recall=0.9)
    assert th.block == 0.9 and th.block_positive_rate == 0.5 and th.block_precision == 0.95
    assert naive_threshold(p, y, 0.99) is None


def test_choose_thresholds_on_100k_rows() -> None:
    """100k rows (their time is measured by benchmarks/calibration_speed.py, section 3): both targets are met, and the
    recorded precision and recall are those of the cutoffs."""
    p, y = calibrated_sample(np.random.default_rng(3), 100_000)
    th = choose_thresholds(p, y, block_precision=0.9, flag_recall=0.9)
    assert th.block is not None and th.flag is not None
    assert th.block_bound >= 0.9 and th.flag_bound >= 0.9
    sel = p >= th.block
    assert th.block_precision == pytest.approx(y[sel].mean()) and th.flag_recall == pytest.approx(
        (p >= th.flag)[y == 1].mean())
