"""MLPHead: the non-linear head artifact (numpy evaluation, JSON round trip, pins, encoder checks)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from safeclip.errors import ArtifactIntegrityError, EncoderMismatchError
from safeclip.heads import MAX_HEAD_PARAMETERS, MLPHead, load_head

from conftest import unit


def _head(rng: np.random.Generator, dim: int = 16, hidden: tuple[int, ...] = (8, 4), **kw) -> MLPHead:
    sizes = (dim, *hidden, 1)
    layers = [(rng.normal(size=(o, i)), rng.normal(size=o)) for i, o in zip(sizes[:-1], sizes[1:])]
    return MLPHead(layers, encoder_id="space-a", **kw)


def _reference(head_dict: dict, x: np.ndarray) -> np.ndarray:
    """The head's formula written out independently, in float64."""
    z = x.astype(np.float64)
    std = head_dict["standardize"]
    if std is not None:
        z = (z - np.asarray(std["mean"])) / (np.sqrt(np.asarray(std["variance"])) + std["epsilon"])
    for k, layer in enumerate(head_dict["layers"]):
        z = z @ np.asarray(layer["weight"]).reshape(layer["shape"]).T + np.asarray(layer["bias"])
        if k < len(head_dict["layers"]) - 1:
            z = np.maximum(z, 0)
    return 1 / (1 + np.exp(-z[:, 0]))


def test_head_matches_its_formula_with_standardisation() -> None:
    rng = np.random.default_rng(0)
    std = {"mean": rng.normal(size=16) * 0.01, "variance": rng.random(16) * 1e-3, "epsilon": 1e-10}
    head = _head(rng, standardize=std, output="p_demo")
    x = unit(rng.normal(size=(20_000, 16)))  # more rows than one evaluation block
    np.testing.assert_allclose(head.predict_proba(x), _reference(head.to_dict(), x), rtol=0, atol=1e-12)
    assert head.decision_function(x[0]).shape == (1,)
    assert repr(head) == "MLPHead(16->8->4->1, encoder_id='space-a')"


def test_json_round_trip_is_exact_and_pinned(tmp_path) -> None:
    rng = np.random.default_rng(1)
    head = _head(rng, standardize={"mean": np.zeros(16), "variance": np.ones(16), "epsilon": 0.0},
                 output="punsafe", metadata={"source": "test"})
    sha = head.save(tmp_path / "h.json")
    back = load_head(tmp_path / "h.json", sha, "space-a", dim=16)
    x = unit(rng.normal(size=(50, 16)))
    assert back.decision_function(x).tolist() == head.decision_function(x).tolist()
    assert (back.output, back.metadata, back.n_parameters) == ("punsafe", {"source": "test"}, head.n_parameters)


def test_wrong_pin_space_or_dimension_is_refused(tmp_path) -> None:
    head = _head(np.random.default_rng(2))
    sha = head.save(tmp_path / "h.json")
    with pytest.raises(ArtifactIntegrityError, match="sha256"):
        load_head(tmp_path / "h.json", "0" * 64)
    with pytest.raises(EncoderMismatchError, match="space-a"):
        load_head(tmp_path / "h.json", sha, "space-b")
    with pytest.raises(EncoderMismatchError, match="dimension 16"):
        load_head(tmp_path / "h.json", sha, dim=512)
    with pytest.raises(EncoderMismatchError):
        head.decision_function(np.zeros((2, 15), np.float32))
    with pytest.raises(ArtifactIntegrityError, match="cannot read"):
        load_head(tmp_path / "missing.json", sha)


@pytest.mark.parametrize("edit, match", [
    (lambda d: d["layers"][0].update(shape=[8, 15]), "holds 128 weights"),
    (lambda d: d["layers"][-1].update(shape=[2, 4], weight=[0.0] * 8, bias=[0.0, 0.0]), "one output"),
    (lambda d: d["layers"][0]["weight"].__setitem__(0, 1e39), "float32"),
    (lambda d: d.update(activation="tanh"), "activation"),
    (lambda d: d.update(kind="safeclip.probe"), "kind"),
    (lambda d: d.update(format=2), "format"),
    (lambda d: d.update(dim=15), "dim"),
    (lambda d: d.update(output="p unsafe"), "output"),
    (lambda d: d.update(output="prompt"), "output"),
    (lambda d: d.update(standardize={"mean": [0.0] * 16, "variance": [-1.0] * 16, "epsilon": 0.0}), "variance"),
    (lambda d: d["layers"][0].update(shape=[MAX_HEAD_PARAMETERS, 16]), "parameters"),
])
def test_malformed_artifacts_are_refused(tmp_path, edit, match) -> None:
    d = _head(np.random.default_rng(3)).to_dict()
    edit(d)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    from safeclip.artifacts import sha256_file

    with pytest.raises(ArtifactIntegrityError, match=match):
        load_head(path, sha256_file(path))


def test_evaluation_never_needs_torch() -> None:
    import subprocess

    code = ("import sys, numpy as np; from safeclip.heads import MLPHead; "
            "h = MLPHead([(np.ones((2, 4)), np.zeros(2)), (np.ones((1, 2)), np.zeros(1))], encoder_id='e'); "
            "h.predict_proba(np.full((3, 4), 0.5)); assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def _pinned_file(tmp_path, d: dict, name: str = "h.json"):
    from safeclip.artifacts import sha256_bytes

    data = json.dumps(d).encode()
    (tmp_path / name).write_bytes(data)
    return tmp_path / name, sha256_bytes(data)


def test_a_standardisation_that_folds_to_inf_is_refused_at_load_and_by_lint(tmp_path) -> None:
    """Regression (issue 21.1): finite float32 numbers in the file (variance 0, epsilon 1e-320) fold into an inf first
    layer; the head then scored every image NaN. Refused at load, naming the file, so `policy lint` refuses it."""
    import yaml

    from safeclip.compiled import lint_policy
    from safeclip.errors import PolicyError

    d = _head(np.random.default_rng(4)).to_dict()
    d["standardize"] = {"mean": [0.0] * 16, "variance": [0.0] * 16, "epsilon": 1e-320}
    path, sha = _pinned_file(tmp_path, d)
    with pytest.raises(ArtifactIntegrityError, match="overflows") as ei:
        load_head(path, sha)
    assert str(path) in str(ei.value)
    policy = tmp_path / "p.yaml"
    policy.write_text(yaml.safe_dump({"name": "p", "version": "1", "extends": "default",
                                      "categories": {"sexual": {"head": {"path": "h.json", "sha256": sha}}}}))
    with pytest.raises(PolicyError, match=r"categories\.sexual\.head: .*h\.json.*overflows"):
        lint_policy(policy)


@pytest.mark.parametrize("edit", [
    lambda d: d["layers"][0].update(weight=[3e38] * 128),  # finite float32; the logit overflows float32
    lambda d: d.update(standardize={"mean": [0.0] * 16, "variance": [0.0] * 16, "epsilon": 1e-300}),  # finite fold
    lambda d: d["layers"][-1].update(bias=[1e31]),
])
def test_weights_whose_logit_can_overflow_are_refused(tmp_path, edit) -> None:
    """Regression (issue 21.1): every array as applied is finite, but a logit can reach inf (then NaN downstream)."""
    d = _head(np.random.default_rng(5)).to_dict()
    edit(d)
    path, sha = _pinned_file(tmp_path, d)
    with pytest.raises(ArtifactIntegrityError, match="logit can reach"):
        load_head(path, sha)


def test_a_probe_whose_logit_can_overflow_is_refused(tmp_path) -> None:
    """Regression (issue 21.1, probes): coefficients near float32's limit give an inf (or NaN) logit."""
    from safeclip.heads import LinearProbe

    d = LinearProbe(np.full(8, 0.1), 0.0, encoder_id="e").to_dict()
    d["coef"] = [3e38, -3e38] * 4
    path, sha = _pinned_file(tmp_path, d, "p.json")
    with pytest.raises(ArtifactIntegrityError, match=r"p\.json.*logit can reach"):
        LinearProbe.load(path, sha)


def test_published_heads_are_far_inside_the_logit_bound(laion_dir, tmp_path) -> None:
    from safeclip.heads import MAX_LOGIT_BOUND
    from safeclip.importers import PUBLISHED, load_published_head

    for pub in PUBLISHED:
        head = load_published_head(laion_dir / pub.filename, pub.sha256, cache_dir=tmp_path)
        bound = 1.01
        for w, b in head._layers64:
            bound = np.linalg.norm(w) * bound + np.linalg.norm(b)
        assert bound < MAX_LOGIT_BOUND * 1e-20, pub.filename
