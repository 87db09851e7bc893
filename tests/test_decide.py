from __future__ import annotations

import json

import numpy as np

from safeclip.decide import ACTIONS, build_decision, decide_codes, error_decision
from safeclip.policy import load_policy


def probs_for(policy, **values: float) -> np.ndarray:
    p = np.zeros(len(policy.categories), np.float32)
    for k, v in values.items():
        p[policy.category_names.index(k)] = v
    return p


def test_codes_follow_thresholds_and_missing_thresholds_never_fire():
    pol = load_policy("default")  # weapons: flag 0.6, block null; sexual: flag 0.5 block 0.85
    rows = np.stack([
        probs_for(pol),
        probs_for(pol, sexual=0.5),
        probs_for(pol, sexual=0.85),
        probs_for(pol, weapons=1.0),
        probs_for(pol, sexual=0.49, weapons=0.59),
    ])
    codes = decide_codes(rows, pol)
    assert [ACTIONS[c] for c in codes.max(axis=1)] == ["allow", "flag", "block", "flag", "allow"]


def test_worst_action_wins_and_reasons_are_ordered():
    pol = load_policy("default")
    p = probs_for(pol, drugs=0.7, violence=0.95, sexual=0.6)
    d = build_decision(pol, p, np.zeros(len(p), bool), {"prompt": np.zeros(len(p))}, encoder_id="e")
    assert d.action == "block"
    assert d.reasons[0].startswith("violence: p=0.950 >= block threshold 0.85")
    assert {r.split(":")[0] for r in d.reasons} == {"violence", "drugs", "sexual"}
    assert d.categories["drugs"].action == "flag" and d.categories["nudity"].action == "allow"
    assert d.categories["violence"].calibrated is False and "(uncalibrated)" in d.reasons[0]
    assert d.policy == "default@1.0"


def test_decision_is_frozen_and_serialises():
    pol = load_policy("default")
    p = probs_for(pol, sexual=0.9)
    d = build_decision(pol, p, np.ones(len(p), bool), {"prompt": np.ones(len(p)), "probe": np.full(len(p), np.nan)},
                       encoder_id="e", sha256="ab")
    try:
        d.action = "allow"  # type: ignore[misc]
        raise AssertionError("Decision must be frozen")
    except AttributeError:
        pass
    obj = json.loads(d.to_json())
    assert obj["action"] == "block" and obj["calibrated"] is True
    assert set(obj["categories"]) == set(pol.category_names)
    assert obj["categories"]["sexual"]["signals"] == {"prompt": 1.0}


def test_error_decision_fails_closed():
    pol = load_policy("default")
    d = error_decision("block", "x.jpg: truncated", policy=pol, encoder_id="e", source="x.jpg")
    assert d.action == "block" and d.error == "x.jpg: truncated" and not d.categories


def test_non_finite_probabilities_never_allow_and_never_decide():
    """Regression (issue 9.1): a NaN probability compared false with every threshold, so the image was allowed."""
    import pytest

    from safeclip.errors import DataError

    p = load_policy("default")
    probs = np.zeros((2, len(p.categories)), np.float32)
    probs[1, 3] = np.nan
    codes = decide_codes(probs, p)
    assert codes[0].max() == 0 and codes[1, 3] == 2
    with pytest.raises(DataError, match=p.categories[3].name):
        build_decision(p, probs[1], np.zeros(len(p.categories), bool), {}, encoder_id="e")
    from safeclip.decide import nonfinite_rows

    assert nonfinite_rows(probs).tolist() == [False, True]


def test_a_head_decided_category_says_so_and_reports_punsafe():
    p = load_policy("laion-nsfw-b32")
    n = len(p.categories)
    j = p.category_names.index("sexual")
    probs = np.zeros(n, np.float32)
    probs[j] = 0.7
    nan = np.full(n, np.nan, np.float32)
    head, punsafe = nan.copy(), nan.copy()
    head[j], punsafe[j] = np.log(0.7 / 0.3), 0.7
    basis = tuple("head" if c.head is not None else "prompt" for c in p.categories)
    d = build_decision(p, probs, np.zeros(n, bool), {"prompt": np.zeros(n, np.float32), "head": head,
                                                     "punsafe": punsafe}, encoder_id="e", basis=basis)
    sexual = d.categories["sexual"]
    assert d.action == "block" and sexual.basis == "head" and sexual.signals["punsafe"] == np.float32(0.7)
    assert d.reasons[0].startswith("sexual: p=0.700 >= block threshold 0.5 (uncalibrated: the head's own")
    assert "punsafe" not in d.categories["nudity"].signals and d.categories["nudity"].basis == "prompt"
    assert json.loads(d.to_json())["categories"]["sexual"]["basis"] == "head"
