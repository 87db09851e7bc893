"""Property-based checks of the public API's promises (issue 9): for any input, no exception outside the
``SafeclipError`` tree, no NaN in any Decision, and no ``allow`` for anything that was not fully, finitely scored."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from conftest import OrthoTexts
from safeclip.compiled import CompiledPolicy
from safeclip.decide import build_decision, decide_codes
from safeclip.errors import SafeclipError
from safeclip.policy import load_policy

POLICY = load_policy("default")
DIM = 512
COMPILED = CompiledPolicy.build(POLICY, OrthoTexts(DIM), "constructed-space")


def _decide(emb: np.ndarray) -> list:
    """What ``Moderator.decide`` does, on a policy compiled against constructed prompt embeddings."""
    scores = COMPILED.scorer.score(emb, keep_sims=True)
    probs, calibrated = COMPILED.probabilities(scores)
    return [build_decision(POLICY, probs[i], calibrated, {"prompt": scores.prompt[i], "probe": scores.probe[i]},
                           encoder_id="constructed-space") for i in range(len(emb))]


floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                   st.sampled_from([0.0, 1.0, -1.0, 1e-30, 1e30, float("nan"), float("inf")]))
arrays = st.one_of(
    hnp.arrays(np.float32, st.tuples(st.integers(1, 4), st.just(DIM)), elements=floats),
    st.builds(lambda a, dt: a.astype(dt), hnp.arrays(np.int64, st.tuples(st.integers(1, 3), st.sampled_from(
        [DIM, 16])), elements=st.integers(-3, 3)), st.sampled_from([np.float32, np.float64, np.int64, np.bool_])),
    st.builds(lambda n, s, k: _unit(n, s) * k, st.integers(1, 4), st.integers(0, 2**31), st.sampled_from(
        [1.0, 1.0, 1.0, 0.5, 1000.0, -1.0])),
)


def _unit(n: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arrays)
def test_any_array_decides_finitely_or_raises_a_safeclip_error(emb):
    try:
        decisions = _decide(emb)
    except SafeclipError:
        return
    for d in decisions:
        text = d.to_json()  # allow_nan=False: raises on any NaN or infinity
        assert "NaN" not in text and "Infinity" not in text
        for c in d.categories.values():
            assert math.isfinite(c.probability)


@settings(max_examples=300, deadline=None)
@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 5), st.just(len(POLICY.categories))), elements=floats))
def test_any_probability_matrix_never_allows_a_non_finite_row(probs):
    actions = decide_codes(probs, POLICY).max(axis=1)
    for row, action in zip(probs, actions):
        if not np.isfinite(row).all():
            assert action == 2


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                         st.text(max_size=20))
documents = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=5)), max_leaves=25)
policy_like = st.fixed_dictionaries({}, optional={
    "name": st.one_of(st.text(max_size=12), json_scalars), "version": json_scalars,
    "extends": st.one_of(st.sampled_from(["default", "strict", "defualt", "../x.yaml", "/etc/passwd"]),
                         json_scalars),
    "scoring": documents, "encoder": documents,
    "categories": st.one_of(documents, st.dictionaries(
        st.sampled_from(["drugs", "weapons", "Bad Name", "gambling"]),
        st.one_of(st.none(), documents, st.fixed_dictionaries({}, optional={
            "prompts": documents, "contrast": documents, "thresholds": documents, "enabled": json_scalars,
            "templates": documents, "probe": documents})), max_size=3)),
})


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("hypothesis-policies")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(policy_like, documents), st.booleans())
def test_any_policy_document_loads_or_raises_a_policy_error(policy_dir, doc, as_json):
    f = policy_dir / "p.yaml"
    try:
        f.write_text(json.dumps(doc) if as_json else yaml.safe_dump(doc, allow_unicode=True))
    except (ValueError, UnicodeEncodeError):
        return  # not representable as a file
    try:
        p = load_policy(f)
    except SafeclipError:
        return
    assert p.categories and all(c.prompts for c in p.categories)
