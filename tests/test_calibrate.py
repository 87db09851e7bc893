"""The calibrate stage: Calibrator / LinearProbe behaviour, artifacts, and the runtime helpers.

Known-answer data: 1-D class-conditional Gaussians with unequal variances, whose Bayes posterior is analytic (and
not logistic in the score, so Platt scaling is slightly misspecified on purpose).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scipy import stats

from safeclip.artifacts import sha256_file
from safeclip.calibrate import (
    ISOTONIC_EPS,
    Calibrator,
    _FastInterp,
    calibrate,
    load_calibrators,
    probability_basis,
    sigmoid,
)
from safeclip.heads import LinearProbe
from safeclip.policy import ArtifactRef
from safeclip.errors import (
    ArtifactIntegrityError,
    ConfigError,
    EncoderMismatchError,
    PolicyError,
    SafeclipError,
)

PRIOR = 0.2


def gaussian_scores(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores from pos ~ N(1.5, 1), neg ~ N(-1, 1.3), prior 0.2; returns (score, label, true posterior)."""
    y = (rng.random(n) < PRIOR).astype(np.int8)
    s = np.where(y == 1, rng.normal(1.5, 1.0, n), rng.normal(-1.0, 1.3, n))
    log_pos = stats.norm.logpdf(s, 1.5, 1.0) + np.log(PRIOR)
    log_neg = stats.norm.logpdf(s, -1.0, 1.3) + np.log(1 - PRIOR)
    return s, y, 1.0 / (1.0 + np.exp(log_neg - log_pos))


@pytest.fixture(scope="module")
def gauss() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    s, y, _ = gaussian_scores(rng, 5000)
    st_, yt, pt = gaussian_scores(rng, 100_000)
    return {"s": s, "y": y, "s_test": st_, "y_test": yt, "p_test": pt}


# ------------------------------------------------------------------------------------------------- calibration


@pytest.mark.parametrize("method", ["sigmoid", "isotonic", "auto"])
def test_calibrated_matches_bayes_posterior(gauss: dict[str, np.ndarray], method: str) -> None:
    cal = Calibrator(method).fit(gauss["s"], gauss["y"])
    p = cal.predict_proba(gauss["s_test"])
    mae = np.abs(p - gauss["p_test"]).mean()
    assert mae < 0.03, (method, mae)
    # The uncalibrated score is far off: the check is not vacuous.
    assert np.abs(sigmoid(gauss["s_test"]) - gauss["p_test"]).mean() > 0.1


def test_auto_rule() -> None:
    assert Calibrator.resolve_method("auto", 5000, 1000) == "isotonic"
    assert Calibrator.resolve_method("auto", 999, 300) == "sigmoid"
    assert Calibrator.resolve_method("auto", 5000, 99) == "sigmoid"
    assert Calibrator.resolve_method("sigmoid", 10**6, 10**5) == "sigmoid"
    rng = np.random.default_rng(0)
    s, y, _ = gaussian_scores(rng, 500)
    assert Calibrator("auto").fit(s, y).method_ == "sigmoid"


def test_isotonic_is_monotone_clipped_and_flat_outside(gauss: dict[str, np.ndarray]) -> None:
    cal = Calibrator("isotonic").fit(gauss["s"], gauss["y"])
    grid = np.linspace(-20, 20, 20001)
    p = cal.predict_proba(grid)
    assert np.all(np.diff(p) >= 0)
    assert p.min() >= ISOTONIC_EPS and p.max() <= 1 - ISOTONIC_EPS
    assert p[0] == cal.y_thresholds_[0] and p[-1] == cal.y_thresholds_[-1]
    np.testing.assert_allclose(p, np.interp(grid, cal.x_thresholds_, cal.y_thresholds_), rtol=0, atol=1e-12)


def test_sigmoid_is_platt(gauss: dict[str, np.ndarray]) -> None:
    cal = Calibrator("sigmoid").fit(gauss["s"], gauss["y"])
    z = gauss["s_test"] * cal.coef_[0] + cal.intercept_
    np.testing.assert_allclose(cal.predict_proba(gauss["s_test"]), 1 / (1 + np.exp(-z)), rtol=1e-12)
    assert cal.coef_[0] > 0


def test_float32_in_float32_out(gauss: dict[str, np.ndarray]) -> None:
    for method in ("sigmoid", "isotonic"):
        cal = Calibrator(method).fit(gauss["s"], gauss["y"])
        s32 = gauss["s_test"].astype(np.float32)
        p32 = cal.predict_proba(s32)
        assert p32.dtype == np.float32 and cal.predict_proba(gauss["s_test"]).dtype == np.float64
        np.testing.assert_allclose(p32, cal.predict_proba(s32.astype(np.float64)), atol=2e-6)


def test_stacked_two_signals() -> None:
    rng = np.random.default_rng(3)
    n = 6000
    y = (rng.random(n) < 0.3).astype(int)
    prompt = rng.normal(np.where(y == 1, 1.0, -1.0), 1.5)
    probe = rng.normal(np.where(y == 1, 2.0, -2.0), 1.5)
    sig = np.column_stack([prompt, probe])
    true_logit = np.log(0.3 / 0.7) + (2.0 / 1.5**2) * prompt + (4.0 / 1.5**2) * probe
    for method in ("sigmoid", "isotonic", "auto"):
        cal = Calibrator(method, inputs=("prompt", "probe")).fit(sig, y)
        assert cal.coef_.shape == (2,)
        mae = np.abs(cal.predict_proba(sig) - sigmoid(true_logit)).mean()
        assert mae < 0.03, (method, mae)
    cal = Calibrator("sigmoid", inputs=("prompt", "probe")).fit(sig, y)
    np.testing.assert_allclose(cal.coef_, [2.0 / 1.5**2, 4.0 / 1.5**2], rtol=0.15)


def test_sample_weight_equals_repetition() -> None:
    rng = np.random.default_rng(1)
    s, y, _ = gaussian_scores(rng, 800)
    w = rng.integers(1, 3, s.size)
    a = Calibrator("sigmoid").fit(s, y, sample_weight=w)
    b = Calibrator("sigmoid").fit(np.repeat(s, w), np.repeat(y, w))
    np.testing.assert_allclose(a.coef_, b.coef_, rtol=1e-4)
    np.testing.assert_allclose(a.intercept_, b.intercept_, rtol=1e-4, atol=1e-6)


def test_separable_calibration_set_converges() -> None:
    s = np.r_[np.linspace(-3, -1, 50), np.linspace(1, 3, 50)]
    y = np.r_[np.zeros(50), np.ones(50)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cal = Calibrator("sigmoid").fit(s, y)
    p = cal.predict_proba(s)
    assert np.isfinite(p).all() and p[:50].max() < 0.05 and p[50:].min() > 0.95


@pytest.mark.parametrize(
    "signals, y, match",
    [
        (np.zeros(10), np.zeros(10), "both classes"),
        (np.zeros(10), np.r_[np.zeros(5), np.full(5, 2)], "only 0 and 1"),
        (np.zeros(10), np.zeros(9), "labels for 10 rows"),
        (np.r_[np.nan, np.zeros(9)], np.r_[0, np.ones(9)], "NaN"),
        (np.zeros((10, 2)), np.r_[0, np.ones(9)], r"\(n,\) or \(n, 1\)"),
    ],
)
def test_fit_rejects_bad_input(signals: np.ndarray, y: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Calibrator().fit(signals, y)


def test_bad_constructor_and_unfitted() -> None:
    with pytest.raises(ValueError, match="method"):
        Calibrator("beta")
    with pytest.raises(ValueError, match="unknown signal"):
        Calibrator(inputs=("clip",))
    with pytest.raises(ValueError, match="repeat"):
        Calibrator(inputs=("prompt", "prompt"))
    with pytest.raises(SafeclipError, match="not fitted"):
        Calibrator().predict_proba(np.zeros(3))


def test_predict_leaves_input_alone(gauss: dict[str, np.ndarray]) -> None:
    d = Calibrator("sigmoid").fit(gauss["s"], gauss["y"]).to_dict()
    d.update(coef=[1.0], intercept=0.0)  # an identity-looking sigmoid must still not work in place
    for cal in (Calibrator.from_dict(d), Calibrator("isotonic").fit(gauss["s"], gauss["y"])):
        for dtype in (np.float32, np.float64):
            x = gauss["s_test"][:1000].astype(dtype)
            before = x.copy()
            cal.predict_proba(x)
            np.testing.assert_array_equal(x, before)


def test_predict_rejects_nan_signal(gauss: dict[str, np.ndarray]) -> None:
    cal = Calibrator("isotonic").fit(gauss["s"], gauss["y"])
    with pytest.raises(ValueError, match="NaN"):
        cal.predict_proba(np.array([0.0, np.nan]))


@settings(max_examples=60, deadline=None)
@given(
    knots=st.lists(st.floats(-50, 50, allow_nan=False), min_size=1, max_size=40, unique=True),
    seed=st.integers(0, 2**16),
)
@example(knots=[0.0, 2.225073858507203e-309], seed=0)  # a subnormal span: the grid scale overflows
def test_fast_interp_equals_np_interp(knots: list[float], seed: int) -> None:
    rng = np.random.default_rng(seed)
    xk = np.sort(np.asarray(knots))
    yk = np.sort(rng.random(xk.size))
    z = np.r_[rng.normal(0, 30, 2000), xk, xk - 1e-9, xk + 1e-9, -1e300, 1e300]
    np.testing.assert_allclose(_FastInterp(xk, yk)(z), np.interp(z, xk, yk), rtol=0, atol=1e-9)


# --------------------------------------------------------------------------------------------------- artifacts


def test_calibrator_roundtrip(tmp_path: Path, gauss: dict[str, np.ndarray]) -> None:
    for method in ("sigmoid", "isotonic"):
        cal = Calibrator(method, encoder_id="enc-a", metadata={"note": "x", "n": np.int64(3)})
        cal.fit(gauss["s"], gauss["y"])
        path = tmp_path / f"{method}.json"
        sha = cal.save(path)
        assert sha == sha256_file(path)
        d = json.loads(path.read_text())  # plain JSON, nothing else
        assert d["kind"] == "safeclip.calibrator" and d["format"] == 1 and d["method_"] == method
        back = Calibrator.load(path, sha, encoder_id="enc-a")
        assert back.to_dict() == cal.to_dict()
        assert back.method_ == method and back.n_samples_ == cal.n_samples_
        np.testing.assert_array_equal(back.predict_proba(gauss["s_test"]), cal.predict_proba(gauss["s_test"]))
        assert path.read_bytes()[:1] == b"{"


def test_calibrator_integrity_and_encoder(tmp_path: Path, gauss: dict[str, np.ndarray]) -> None:
    cal = Calibrator("isotonic", encoder_id="enc-a").fit(gauss["s"], gauss["y"])
    path = tmp_path / "cal.json"
    sha = cal.save(path)
    with pytest.raises(EncoderMismatchError, match="enc-a"):
        Calibrator.load(path, sha, encoder_id="enc-b")
    Calibrator.load(path, sha)  # no expectation given: loads
    data = bytearray(path.read_bytes())
    i = data.index(b'"intercept": ') + len(b'"intercept": ')
    data[i] = ord("9") if data[i] != ord("9") else ord("8")  # one changed byte
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactIntegrityError, match="sha256"):
        Calibrator.load(path, sha)
    # No recorded encoder: any expectation passes.
    anon = Calibrator().fit(gauss["s"], gauss["y"])
    sha2 = anon.save(tmp_path / "anon.json")
    assert Calibrator.load(tmp_path / "anon.json", sha2, encoder_id="enc-b").encoder_id is None


@pytest.mark.parametrize(
    "patch, match",
    [
        ({"kind": "safeclip.probe"}, "kind"),
        ({"format": 2}, "format"),
        ({"coef": [1.0, 2.0]}, "coefficients"),
        ({"coef": ["a"]}, "numbers"),
        ({"y_thresholds": None}, "y_thresholds"),
        ({"x_thresholds": [3.0, 2.0], "y_thresholds": [0.1, 0.2]}, "increasing"),
        ({"method_": "beta"}, "method_"),
        ({"inputs": ["clip"]}, "unknown signal"),
    ],
)
def test_calibrator_from_dict_rejects_malformed(gauss: dict[str, np.ndarray], patch: dict, match: str) -> None:
    d = Calibrator("isotonic").fit(gauss["s"], gauss["y"]).to_dict()
    d.update(patch)
    with pytest.raises(ArtifactIntegrityError, match=match):
        Calibrator.from_dict(d)


def test_probe_roundtrip_and_checks(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    coef = rng.normal(size=64).astype(np.float32)
    probe = LinearProbe(coef, -0.25, encoder_id="enc-a", metadata={"C": 1.0, "auc": np.float32(0.5)})
    X = rng.normal(size=(100, 64)).astype(np.float32)
    z = probe.decision_function(X)
    assert z.dtype == np.float32
    np.testing.assert_allclose(z, X.astype(np.float64) @ coef.astype(np.float64) - 0.25, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(probe.predict_proba(X), sigmoid(z))

    sha = probe.save(tmp_path / "p.json")
    back = LinearProbe.load(tmp_path / "p.json", sha, encoder_id="enc-a", dim=64)
    assert back.to_dict() == probe.to_dict()
    np.testing.assert_array_equal(back.coef_, probe.coef_)
    np.testing.assert_array_equal(back.decision_function(X), z)
    assert json.loads((tmp_path / "p.json").read_text())["kind"] == "safeclip.probe"

    with pytest.raises(EncoderMismatchError):
        LinearProbe.load(tmp_path / "p.json", sha, encoder_id="enc-b")
    with pytest.raises(EncoderMismatchError, match="dimension"):
        LinearProbe.load(tmp_path / "p.json", sha, dim=512)
    with pytest.raises(EncoderMismatchError, match="dimension"):
        probe.decision_function(np.zeros((2, 512), np.float32))
    with pytest.raises(ArtifactIntegrityError):
        LinearProbe.load(tmp_path / "p.json", "0" * 64)
    d = probe.to_dict()
    d["dim"] = 65
    with pytest.raises(ArtifactIntegrityError, match="dim"):
        LinearProbe.from_dict(d)
    with pytest.raises(ValueError, match="encoder_id"):
        LinearProbe(coef, 0.0, encoder_id="")


def test_no_pickle_in_stage() -> None:
    root = Path(__file__).resolve().parents[1]
    files = [root / "safeclip" / "calibrate.py", root / "safeclip" / "heads.py", *(root / "calibration").rglob("*.py")]
    src = "".join(f.read_text() for f in files)
    assert "pickle" not in src and "joblib" not in src and "np.load" not in src


# ------------------------------------------------------------------------------------------ runtime functions


def test_calibrate_and_load_calibrators(tmp_path: Path, gauss: dict[str, np.ndarray]) -> None:
    cal = Calibrator("sigmoid", encoder_id="enc-a").fit(gauss["s"], gauss["y"])
    ref = ArtifactRef(path=tmp_path / "c.json", sha256=cal.save(tmp_path / "c.json"))
    policy = SimpleNamespace(categories=(
        SimpleNamespace(name="a", calibrator=ref, probe=None),
        SimpleNamespace(name="b", calibrator=None, probe=None),
    ))
    cals = load_calibrators(policy, "enc-a")
    assert set(cals) == {"a"}
    with pytest.raises(EncoderMismatchError):
        load_calibrators(policy, "enc-b")

    prompt = np.random.default_rng(0).normal(size=(50, 2)).astype(np.float32)
    scores = SimpleNamespace(categories=("a", "b"), prompt=prompt, probe=np.full_like(prompt, np.nan))
    probs, mask = calibrate(scores, cals)
    assert probs.shape == (50, 2) and probs.dtype == np.float32
    assert mask.tolist() == [True, False]
    np.testing.assert_allclose(probs[:, 0], cal.predict_proba(prompt[:, 0]), rtol=1e-6)
    np.testing.assert_allclose(probs[:, 1], sigmoid(prompt[:, 1]), rtol=1e-6)  # documented fallback


def test_load_calibrators_needs_probe(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(50), np.ones(50)]
    sig = np.column_stack([rng.normal(y, 1), rng.normal(y, 1)])
    cal = Calibrator("sigmoid", inputs=("prompt", "probe")).fit(sig, y)
    ref = ArtifactRef(path=tmp_path / "c.json", sha256=cal.save(tmp_path / "c.json"))
    policy = SimpleNamespace(categories=(SimpleNamespace(name="a", calibrator=ref, probe=None),))
    with pytest.raises(PolicyError, match="probe"):
        load_calibrators(policy, None)


def test_an_uncalibrated_category_with_a_head_uses_the_heads_probability(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    prompt = rng.normal(size=(40, 2)).astype(np.float32)
    head = np.full_like(prompt, np.nan)
    head[:, 1] = rng.normal(size=40)
    head[3, 1] = np.nan  # a row the head could not score stays undecided, never falls back to the prompt
    scores = SimpleNamespace(categories=("a", "b"), prompt=prompt, probe=np.full_like(prompt, np.nan), head=head)
    probs, mask = calibrate(scores, {}, heads=("b",))
    assert mask.tolist() == [False, False]
    np.testing.assert_allclose(probs[:, 0], sigmoid(prompt[:, 0]), rtol=1e-6)
    keep = np.arange(40) != 3
    np.testing.assert_allclose(probs[keep, 1], sigmoid(head[keep, 1]), rtol=1e-6)
    assert np.isnan(probs[3, 1])
    policy = SimpleNamespace(categories=(SimpleNamespace(name="a", head=None), SimpleNamespace(name="b", head=1)))
    assert probability_basis(policy, {}) == ("prompt", "head")


def test_a_calibrator_over_the_head_signal_needs_a_head(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    y = np.r_[np.zeros(60), np.ones(60)]
    sig = np.column_stack([rng.normal(y, 1), rng.normal(2 * y, 1)])
    cal = Calibrator("sigmoid", inputs=("prompt", "head")).fit(sig, y)
    ref = ArtifactRef(path=tmp_path / "c.json", sha256=cal.save(tmp_path / "c.json"))
    with pytest.raises(PolicyError, match="names no head"):
        load_calibrators(SimpleNamespace(categories=(SimpleNamespace(name="a", calibrator=ref, probe=None,
                                                                     head=None),)), None)
    cals = load_calibrators(SimpleNamespace(categories=(SimpleNamespace(name="a", calibrator=ref, probe=None,
                                                                        head=object()),)), None)
    scores = SimpleNamespace(categories=("a",), prompt=sig[:, :1].astype(np.float32),
                             probe=np.full((120, 1), np.nan, np.float32), head=sig[:, 1:].astype(np.float32))
    probs, mask = calibrate(scores, cals)
    assert mask.tolist() == [True]
    np.testing.assert_allclose(probs[:, 0], cal.predict_proba(sig.astype(np.float32)), rtol=1e-5)


# ------------------------------------------------------------------- issue 21.1: a head comes from the policy


def test_a_head_that_gives_nan_for_a_whole_batch_is_still_a_head() -> None:
    """Regression (issue 21.1): an all-NaN head column was taken for "no head" and the prompt decided instead, while
    the Decision said basis=head. The policy says which categories have a head; NaN rows stay NaN, never allowed."""
    from safeclip.decide import decide_codes, nonfinite_rows

    rng = np.random.default_rng(4)
    prompt = rng.normal(-6.0, 0.1, size=(3, 2)).astype(np.float32)  # the prompt alone would allow every row
    head = np.full_like(prompt, np.nan)  # the head (category "b") gave NaN for this whole batch
    scores = SimpleNamespace(categories=("a", "b"), prompt=prompt, probe=np.full_like(prompt, np.nan), head=head)
    policy = SimpleNamespace(categories=(SimpleNamespace(name="a", head=None, calibrator=None),
                                         SimpleNamespace(name="b", head=object(), calibrator=None)))
    cals = load_calibrators(policy, None)
    assert cals == {} and cals.heads == {"b"} and probability_basis(policy, cals) == ("prompt", "head")
    for probs, _ in (calibrate(scores, cals), calibrate(scores, {}, heads=("b",))):
        assert np.isnan(probs[:, 1]).all()
        np.testing.assert_allclose(probs[:, 0], sigmoid(prompt[:, 0]), rtol=1e-6)
        thresholds = SimpleNamespace(categories=(SimpleNamespace(flag=0.5, block=0.9),) * 2)
        assert nonfinite_rows(probs).all() and (decide_codes(probs, thresholds).max(axis=1) == 2).all()
    # A batch where another image's head output is finite: the NaN row is still NaN, the other one decided.
    head[1, 1] = -3.0
    probs, _ = calibrate(scores, cals)
    assert nonfinite_rows(probs).tolist() == [True, False, True]
    assert probs[1, 1] == pytest.approx(1 / (1 + np.exp(3.0)))
    # Without the policy's answer there is nothing safe to assume.
    with pytest.raises(ConfigError, match="which categories name a head"):
        calibrate(scores, {})


def test_a_nan_signal_row_of_a_calibrated_category_is_nan_not_the_batchs_error() -> None:
    """Regression (issue 21.1, probes and heads behind a calibrator): one NaN row made the whole batch a ConfigError;
    now that row's probability is NaN (an error for that image alone) and the others are calibrated."""
    from safeclip.calibrate import PolicyCalibrators

    rng = np.random.default_rng(5)
    y = np.r_[np.zeros(60), np.ones(60)]
    sig = np.column_stack([rng.normal(y, 1), rng.normal(2 * y, 1)])
    for signal in ("probe", "head"):
        cal = Calibrator("sigmoid", inputs=("prompt", signal)).fit(sig, y)
        prompt = sig[:, :1].astype(np.float32)
        other = sig[:, 1:].astype(np.float32)
        other[7, 0] = np.nan
        nan = np.full_like(prompt, np.nan)
        scores = SimpleNamespace(categories=("a",), prompt=prompt, probe=other if signal == "probe" else nan,
                                 head=other if signal == "head" else nan)
        probs, mask = calibrate(scores, PolicyCalibrators({"a": cal}, heads=("a",) if signal == "head" else ()))
        assert mask.tolist() == [True] and np.isnan(probs[7, 0]) and np.isfinite(np.delete(probs[:, 0], 7)).all()
        keep = np.arange(120) != 7
        np.testing.assert_allclose(probs[keep, 0], cal.predict_proba(np.column_stack([prompt, other])[keep]),
                                   rtol=1e-6)


def test_a_compiled_policy_never_lets_the_prompt_stand_in_for_a_nan_head(tmp_path: Path, monkeypatch) -> None:
    """Regression (issue 21.1), end to end: a head that scores NaN for an image alone made that image's category
    fall back to the prompt (`allow`, reported as basis=head). Its probability is NaN now: no decision, fail closed."""
    import yaml

    from conftest import OrthoTexts, unit
    from safeclip.compiled import CompiledPolicy
    from safeclip.decide import build_decision, decide_codes, nonfinite_rows
    from safeclip.errors import DataError
    from safeclip.heads import MLPHead
    from safeclip.policy import load_policy

    rng = np.random.default_rng(6)
    head = MLPHead([(rng.normal(size=(4, 512)), np.zeros(4)), (rng.normal(size=(1, 4)), np.zeros(1))],
                   encoder_id="space")
    sha = head.save(tmp_path / "h.json")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"name": "p", "version": "1", "extends": "default", "categories": {
        "sexual": {"head": {"path": "h.json", "sha256": sha}}}}))
    policy = load_policy(tmp_path / "p.yaml")
    comp = CompiledPolicy.build(policy, OrthoTexts(512), "space")
    j = policy.category_names.index("sexual")
    assert comp.basis[j] == "head"
    x = unit(rng.normal(size=(2, 512)))
    monkeypatch.setattr(MLPHead, "decision_function", lambda self, X: np.full(len(X), np.nan))
    for rows in ([0], [0, 1]):  # the image alone, and batched with another
        scores = comp.scorer.score(x[rows])
        probs, calibrated = comp.probabilities(scores)
        assert np.isnan(probs[:, j]).all() and nonfinite_rows(probs).all()
        assert (decide_codes(probs, policy)[:, j] == 2).all()
        with pytest.raises(DataError, match="sexual"):
            build_decision(policy, probs[0], calibrated, scores.row_signals(0), encoder_id="space", basis=comp.basis)


@pytest.mark.parametrize("coef, intercept", [([3e38, -3e38], 0.0), ([1e9, 0.0], 0.0), ([1.0, 1.0], 3e38)])
def test_a_calibrator_whose_float32_score_can_overflow_is_refused(coef, intercept) -> None:
    """Regression (issue 21.1, "every derived array"): coefficients near float32's limit pass as finite numbers, but
    the float32 score of finite signals became inf - inf = NaN, a NaN probability for a normal image."""
    rng = np.random.default_rng(8)
    y = np.r_[np.zeros(60), np.ones(60)]
    d = Calibrator("sigmoid", inputs=("prompt", "probe")).fit(np.column_stack([rng.normal(y), rng.normal(y)]),
                                                              y).to_dict()
    d.update(coef=coef, intercept=intercept)
    with pytest.raises(ArtifactIntegrityError, match="overflow"):
        Calibrator.from_dict(d)
