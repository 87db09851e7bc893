"""The calibration toolkit: probes, calibrators, thresholds with a confidence promise, and reports.

Known-answer data:
- 512-d unit embeddings from two von Mises-Fisher distributions with a shared concentration kappa. Their
  densities are ``C(kappa) exp(kappa mu_y . x)`` with the same normaliser, so the Bayes posterior is exactly
  logistic in the normalised embedding: ``logit = kappa (mu_1 - mu_0) . x + log(prior / (1 - prior))``.
- 1-D equal-variance Gaussians whose posterior is a known, perfectly calibrated probability, for thresholds.
"""

from __future__ import annotations

import builtins
import json
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from safeclip.calibrate import sigmoid
from safeclip.heads import LinearProbe
from safeclip.calibration import (
    Report,
    Thresholds,
    ThresholdWarning,
    _data_sha256,
    choose_thresholds,
    evaluate,
    fit_calibrator,
    naive_threshold,
    precision_lower_bound,
    recall_lower_bound,
    train_probe,
)

D = 512
KAPPA = 256.0
PRIOR = 0.2
THETA = 0.25  # angle between the class mean directions


def sample_vmf(rng: np.random.Generator, mu: np.ndarray, kappa: float, n: int) -> np.ndarray:
    """n unit vectors from vMF(mu, kappa) (Wood, 1994), float32."""
    d = mu.size
    b = (-2 * kappa + np.sqrt(4 * kappa**2 + (d - 1) ** 2)) / (d - 1)
    x0 = (1 - b) / (1 + b)
    c = kappa * x0 + (d - 1) * np.log(1 - x0**2)
    w = np.empty(0)
    while w.size < n:
        m = 2 * (n - w.size) + 16
        z = rng.beta((d - 1) / 2, (d - 1) / 2, m)
        cand = (1 - (1 + b) * z) / (1 - (1 - b) * z)
        accept = kappa * cand + (d - 1) * np.log(1 - x0 * cand) - c >= np.log(rng.random(m))
        w = np.r_[w, cand[accept]]
    w = w[:n]
    v = rng.normal(size=(n, d))
    v -= np.outer(v @ mu, mu)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return (w[:, None] * mu + np.sqrt(1 - w**2)[:, None] * v).astype(np.float32)


class Sphere:
    def __init__(self, seed: int = 123) -> None:
        g = np.random.default_rng(seed)
        a = g.normal(size=D)
        a /= np.linalg.norm(a)
        e = g.normal(size=D)
        e -= (e @ a) * a
        e /= np.linalg.norm(e)
        self.mu1 = np.cos(THETA / 2) * a + np.sin(THETA / 2) * e
        self.mu0 = np.cos(THETA / 2) * a - np.sin(THETA / 2) * e

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        y = (rng.random(n) < PRIOR).astype(np.int8)
        X = np.empty((n, D), np.float32)
        X[y == 1] = sample_vmf(rng, self.mu1, KAPPA, int(y.sum()))
        X[y == 0] = sample_vmf(rng, self.mu0, KAPPA, int(n - y.sum()))
        logit = KAPPA * (X.astype(np.float64) @ (self.mu1 - self.mu0)) + np.log(PRIOR / (1 - PRIOR))
        return X, y, sigmoid(logit)


@pytest.fixture(scope="module", autouse=True)
def one_blas_thread():
    """Small lbfgs fits on a shared 2-core machine: OpenBLAS threads spin-wait and run 10-20x slower."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield


@pytest.fixture(scope="module")
def sphere() -> dict[str, object]:
    s = Sphere()
    rng = np.random.default_rng(0)
    X, y, _ = s.sample(rng, 40_000)
    Xc, yc, _ = s.sample(rng, 10_000)
    Xt, yt, pt = s.sample(rng, 20_000)
    probe = train_probe(X, y, encoder_id="vmf-512", cv=3, random_state=0)
    return {"X": X, "y": y, "Xc": Xc, "yc": yc, "Xt": Xt, "yt": yt, "pt": pt, "probe": probe, "sphere": s}


# ------------------------------------------------------------------------------------------------------ probes


def test_probe_auc_near_bayes(sphere: dict) -> None:
    probe: LinearProbe = sphere["probe"]
    bayes_auc = roc_auc_score(sphere["yt"], sphere["pt"])
    auc = roc_auc_score(sphere["yt"], probe.decision_function(sphere["Xt"]))
    assert 0.9 < bayes_auc < 0.99  # neither trivial nor hopeless
    assert abs(auc - bayes_auc) < 0.02, (auc, bayes_auc)
    # The learned direction is the Bayes one.
    w = probe.coef_.astype(np.float64)
    d = sphere["sphere"].mu1 - sphere["sphere"].mu0
    assert w @ d / np.linalg.norm(w) / np.linalg.norm(d) > 0.9


@pytest.mark.parametrize("method", ["sigmoid", "isotonic", "auto"])
def test_calibrated_probe_matches_bayes_posterior(sphere: dict, method: str) -> None:
    probe: LinearProbe = sphere["probe"]
    cal = fit_calibrator(probe.decision_function(sphere["Xc"]), sphere["yc"], method, inputs=("probe",),
                         encoder_id="vmf-512")
    p = cal.predict_proba(probe.decision_function(sphere["Xt"]))
    mae = float(np.abs(p - sphere["pt"]).mean())
    assert mae < 0.03, (method, mae)
    # Trained with balanced class weights, the raw probe probability is far from the posterior.
    assert np.abs(probe.predict_proba(sphere["Xt"]) - sphere["pt"]).mean() > 0.05


def test_stacked_prompt_and_probe(sphere: dict) -> None:
    """A prompt-like signal (a noisy concept direction at CLIP's logit scale) stacked with the probe."""
    rng = np.random.default_rng(5)
    s = sphere["sphere"]
    q = (s.mu1 - s.mu0) / np.linalg.norm(s.mu1 - s.mu0) + rng.normal(0, 0.06, D)
    q /= np.linalg.norm(q)

    def signals(X: np.ndarray) -> dict[str, np.ndarray]:
        return {"prompt": 100.0 * (X @ q.astype(np.float32)), "probe": sphere["probe"].decision_function(X)}

    for method in ("sigmoid", "auto"):
        cal = fit_calibrator(signals(sphere["Xc"]), sphere["yc"], method, inputs=("prompt", "probe"))
        sig_t = signals(sphere["Xt"])
        p = cal.predict_proba(np.column_stack([sig_t["prompt"], sig_t["probe"]]))
        assert np.abs(p - sphere["pt"]).mean() < 0.03


def test_probe_metadata_and_determinism(sphere: dict) -> None:
    probe: LinearProbe = sphere["probe"]
    m = probe.metadata
    assert m["n"] == 40_000 and m["n_pos"] == int(sphere["y"].sum())
    assert m["data_sha256"] == _data_sha256(sphere["X"], sphere["y"])
    assert m["C"] in m["Cs"] and len(m["cv_log_loss_by_C"]) == len(m["Cs"])
    assert m["cv_log_loss"] == min(m["cv_log_loss_by_C"]) and 0.9 < m["cv_auc"] <= 1
    assert m["cv_samples"] == 20_000 and abs(m["positive_rate"] - PRIOR) < 0.01
    json.dumps(probe.to_dict(), allow_nan=False)
    small_X, small_y = sphere["X"][:2000], sphere["y"][:2000]
    a = train_probe(small_X, small_y, encoder_id="e", cv=2, Cs=(1.0,))
    b = train_probe(small_X, small_y, encoder_id="e", cv=2, Cs=(1.0,))
    np.testing.assert_array_equal(a.coef_, b.coef_)
    assert a.to_dict() == b.to_dict()


def test_train_probe_rejects_bad_input() -> None:
    X = np.random.default_rng(0).normal(size=(20, 4))
    with pytest.raises(ValueError, match="both classes"):
        train_probe(X, np.zeros(20), encoder_id="e")
    with pytest.raises(ValueError, match="each class"):
        train_probe(X, np.r_[np.ones(2), np.zeros(18)], encoder_id="e", cv=5)
    with pytest.raises(ValueError, match="encoder_id"):
        train_probe(X, np.r_[np.ones(10), np.zeros(10)], encoder_id="")
    with pytest.raises(ValueError, match="Cs"):
        train_probe(X, np.r_[np.ones(10), np.zeros(10)], encoder_id="e", Cs=(0.0,))
    with pytest.raises(ValueError, match="NaN"):
        train_probe(np.full((20, 4), np.nan), np.r_[np.ones(10), np.zeros(10)], encoder_id="e")


# -------------------------------------------------------------------------------------------------- thresholds


def calibrated_sample(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Perfectly calibrated p: the posterior of pos ~ N(2, 1), neg ~ N(0, 1), prior 0.2."""
    y = (rng.random(n) < PRIOR).astype(np.int8)
    s = rng.normal(2.0 * y, 1.0)
    return sigmoid(2.0 * s - 2.0 + np.log(PRIOR / (1 - PRIOR))), y


class Fresh:
    """Precision and recall of ``p >= t`` on one large fresh sample (1M rows), by binary search."""

    def __init__(self) -> None:
        p, y = calibrated_sample(np.random.default_rng(999), 1_000_000)
        order = np.argsort(-p)
        self.neg_p = -p[order]
        self.tp = np.cumsum(y[order])

    def _k(self, t: float) -> int:
        return int(np.searchsorted(self.neg_p, -t, side="right"))

    def precision(self, t: float) -> float:
        k = self._k(t)
        return self.tp[k - 1] / k if k else 1.0

    def recall(self, t: float) -> float:
        k = self._k(t)
        return self.tp[k - 1] / self.tp[-1] if k else 0.0


@pytest.fixture(scope="module")
def fresh() -> Fresh:
    return Fresh()


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
    assert issubclass(ThresholdWarning, UserWarning)


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


def test_choose_thresholds_100k_is_fast() -> None:
    p, y = calibrated_sample(np.random.default_rng(3), 100_000)
    choose_thresholds(p[:1000], y[:1000], block_precision=0.8)  # warm up imports
    best = float("inf")
    for _ in range(3):  # best of 3: the machine is shared
        t0 = time.perf_counter()
        th = choose_thresholds(p, y, block_precision=0.9, flag_recall=0.9)
        best = min(best, time.perf_counter() - t0)
    assert th.block is not None and th.flag is not None
    assert best < 0.5, best


# -------------------------------------------------------------------------------------------------- evaluation


def test_evaluate_metrics() -> None:
    p, y = calibrated_sample(np.random.default_rng(4), 100_000)
    good = evaluate(p, y)
    assert good.ece < 0.01
    assert good.roc_auc == pytest.approx(roc_auc_score(y, p))
    assert good.pr_auc == pytest.approx(average_precision_score(y, p))
    assert good.brier == pytest.approx(np.mean((p - y) ** 2))
    assert good.n == 100_000 and good.n_pos == int(y.sum())
    assert sum(good.reliability["count"]) == 100_000 and len(good.reliability["edges"]) == 16
    assert len(good.curves["precision"]) <= 500 and len(good.curves["fpr"]) <= 500
    logit = np.log(p / (1 - p))
    over = evaluate(sigmoid(3 * logit), y)  # overconfident: same ranking, bad calibration
    assert over.ece > 0.05 and over.log_loss > good.log_loss
    assert over.roc_auc == pytest.approx(good.roc_auc, abs=1e-6)
    # Reliability bins agree with a direct computation.
    b = np.minimum((p * 15).astype(int), 14)
    k = 10
    assert good.reliability["frac_pos"][k] == pytest.approx(y[b == k].mean())
    assert good.reliability["mean_p"][k] == pytest.approx(p[b == k].mean())


def test_evaluate_confusion_reports_realised_rates() -> None:
    p, y = calibrated_sample(np.random.default_rng(5), 5000)
    th = choose_thresholds(p, y, block_precision=0.8, flag_recall=0.8)
    p2, y2 = calibrated_sample(np.random.default_rng(6), 50_000)
    r = evaluate(p2, y2, th)
    blk = r.confusion["block"]
    sel = p2 >= th.block
    assert blk["tp"] == int(y2[sel].sum()) and blk["fp"] == int((1 - y2[sel]).sum())
    assert blk["tp"] + blk["fp"] + blk["fn"] + blk["tn"] == 50_000
    assert blk["precision"] >= 0.78 and r.confusion["flag"]["recall"] >= 0.78
    assert evaluate(p2, y2).confusion["block"] is None


def test_evaluate_one_class_is_nan_not_error() -> None:
    r = evaluate(np.array([0.1, 0.2]), np.array([0, 0]))
    assert np.isnan(r.roc_auc) and r.to_dict()["roc_auc"] is None


def test_report_save(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    p, y = calibrated_sample(np.random.default_rng(7), 5000)
    th = choose_thresholds(p, y, block_precision=0.8, flag_recall=0.8)
    r = evaluate(p, y, th)
    assert isinstance(r, Report)
    files = r.save(tmp_path / "out")
    assert [f.name for f in files] == ["report.json", "reliability.png", "pr_curve.png"]
    for f in files[1:]:
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    d = json.loads(files[0].read_text())
    assert d["roc_auc"] == pytest.approx(r.roc_auc) and d["thresholds"]["block"] == th.block
    assert d["confusion"]["block"]["threshold"] == th.block and "equal-width" in d["ece_binning"]


def test_report_save_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_mpl(name: str, *args: object, **kwargs: object) -> object:
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    p, y = calibrated_sample(np.random.default_rng(8), 1000)
    files = evaluate(p, y).save(tmp_path)
    assert [f.name for f in files] == ["report.json"]
    json.loads(files[0].read_text())
