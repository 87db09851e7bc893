"""Reports (calibration.report): metrics against direct computations, confusion counts at chosen thresholds, NaN
rather than errors for one class, and the saved JSON and plots (with and without matplotlib)."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import numpy as np
import pytest
from calibration_known import calibrated_sample
from sklearn.metrics import average_precision_score, roc_auc_score

from safeclip.calibrate import sigmoid
from safeclip.calibration import Report, choose_thresholds, evaluate, plot_pr_curve, plot_reliability


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


def test_plots_draw_on_a_callers_axes_and_saves_leave_no_temporary_files(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    p, y = calibrated_sample(np.random.default_rng(9), 3000)
    r = evaluate(p, y, choose_thresholds(p, y, block_precision=0.8, flag_recall=0.8))
    ax = Figure().add_subplot()
    assert plot_reliability(r, ax) is ax
    (x, yy) = ax.lines[1].get_data()
    np.testing.assert_allclose(x, r.reliability["mean_p"])  # the model's points, after the diagonal
    np.testing.assert_allclose(yy, r.reliability["frac_pos"])
    ax = plot_pr_curve(r, Figure().add_subplot())
    assert {line.get_label().split(" >=")[0] for line in ax.lines[1:]} == {"flag", "block"}
    r.save(tmp_path)
    r.save(tmp_path)  # again: replaced in place
    assert sorted(f.name for f in tmp_path.iterdir()) == ["pr_curve.png", "reliability.png", "report.json"]
