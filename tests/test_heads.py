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
