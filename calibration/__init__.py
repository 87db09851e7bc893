"""The offline side of safeclip: make probes, calibrators and thresholds from labelled data, and measure policies.

This folder (``calibration/`` at the repository root) is installed as ``safeclip.calibration``, the way
``policies/`` is installed as ``safeclip.policies``. It is apart from the runtime the way ``open_clip_train`` is
apart from ``open_clip``: it needs scikit-learn (imported only when a fit runs) and never runs on the request path.
What it makes runs in :mod:`safeclip` (numpy only): a :class:`~safeclip.heads.LinearProbe` in the score stage and a
:class:`~safeclip.calibrate.Calibrator` in the calibrate stage, both pinned JSON artifacts a policy names.

=============  ==============================================================================================
module         owns
=============  ==============================================================================================
data           labelled data: :func:`load_labeled` (file or table, embeddings or image paths) -> :class:`LabeledData`
split          the grouped, stratified split (:func:`grouped_split`; identical embeddings stay together)
probes         :func:`train_probe`: logistic-regression probes, C by cross-validated ROC AUC
calibrators    :func:`fit_calibrator`: a fitted Calibrator from raw signals
thresholds     :func:`choose_thresholds`: flag / block thresholds whose targets hold with a confidence
report         :func:`evaluate` -> :class:`Report` (AUCs, ECE, Brier, reliability, confusion) and its plots
workflow       :func:`calibrate_policy` and :func:`evaluate_policy`: the whole workflow, as the CLI and notebook run it
review         :func:`calibrate_from_review`: refit from a review store's verdicts (weighted), report, new version
=============  ==============================================================================================

The whole workflow, as ``safeclip calibrate`` runs it::

    data = load_labeled("labels.parquet", "default", ["violence"])        # embeddings (or paths) + labels
    result = calibrate_policy("default", data, ["violence"], out="tuned/", block_precision=0.95, flag_recall=0.9)
    print(result.format())                                                # thresholds, held-out AUC / ECE
    evaluate_policy(result.policy_path, load_labeled("fresh.parquet", result.policy_path)).format()

or step by step, for one category, with embeddings ``X`` and labels ``y`` split three ways::

    probe = train_probe(X_train, y_train, encoder_id=enc)             # the "probe" signal
    cal = fit_calibrator(probe.decision_function(X_cal), y_cal, method="auto", inputs=("probe",), encoder_id=enc)
    p = cal.predict_proba(probe.decision_function(X_val))
    th = choose_thresholds(p, y_val, block_precision=0.95, flag_recall=0.9)
    evaluate(p, y_val, th).save("reports/violence")
    probe.save("probes/violence.json"); cal.save("calibrators/violence.json")   # sha256 pins for the policy

Thresholds must be chosen on data the calibrator was not fitted on (here ``y_val``), or their promise is void.
Importing this package is cheap: scikit-learn, SciPy, pyarrow and matplotlib load when a function needs them.
"""

from __future__ import annotations

from ._validate import CalibrationWarning
from .calibrators import fit_calibrator
from .data import DataWarning, LabeledData, load_labeled, prompt_source
from .probes import DEFAULT_CS, data_sha256, train_probe
from .report import Report, evaluate, plot_pr_curve, plot_reliability
from .review import CategoryReview, ReviewCalibration, ReviewData, calibrate_from_review, review_data
from .split import grouped_split, identical_groups
from .thresholds import (
    ThresholdRates,
    ThresholdWarning,
    Thresholds,
    choose_thresholds,
    effective_n,
    naive_threshold,
    precision_lower_bound,
    rates_at,
    recall_lower_bound,
)
from .workflow import (
    CalibrationResult,
    CategoryEvaluation,
    CategoryFit,
    EvaluationResult,
    calibrate_policy,
    check_calibration_request,
    evaluate_policy,
)

__all__ = [
    "DEFAULT_CS",
    "CalibrationResult",
    "CalibrationWarning",
    "CategoryEvaluation",
    "CategoryFit",
    "CategoryReview",
    "DataWarning",
    "EvaluationResult",
    "LabeledData",
    "Report",
    "ReviewCalibration",
    "ReviewData",
    "ThresholdRates",
    "ThresholdWarning",
    "Thresholds",
    "calibrate_from_review",
    "calibrate_policy",
    "check_calibration_request",
    "choose_thresholds",
    "data_sha256",
    "effective_n",
    "evaluate",
    "evaluate_policy",
    "fit_calibrator",
    "grouped_split",
    "identical_groups",
    "load_labeled",
    "naive_threshold",
    "plot_pr_curve",
    "plot_reliability",
    "precision_lower_bound",
    "prompt_source",
    "rates_at",
    "recall_lower_bound",
    "review_data",
    "train_probe",
]
