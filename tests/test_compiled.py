"""``lint_policy``: everything a Moderator would load and check, checked without the model (issue 9.8)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from safeclip.compiled import lint_policy
from safeclip.artifacts import sha256_bytes
from safeclip.calibrate import Calibrator
from safeclip.embed import tag_encoder_id
from safeclip.errors import PolicyError
from safeclip.heads import LinearProbe

B32 = tag_encoder_id("ViT-B-32", "laion2b_s34b_b79k")  # the space of the default policy's encoder:


def _policy(tmp: Path, cats: dict, **top) -> Path:
    f = tmp / "p.yaml"
    f.write_text(yaml.safe_dump({"name": "p", "version": "1", "extends": "default", **top, "categories": cats}))
    return f


def _write(tmp: Path, name: str, d: dict) -> dict:
    data = json.dumps(d).encode()
    (tmp / name).write_bytes(data)
    return {"path": name, "sha256": sha256_bytes(data)}


def _cal(encoder_id: str = "space-a") -> dict:
    rng = np.random.default_rng(0)
    y = (rng.random(400) < 0.5).astype(int)
    return Calibrator("sigmoid", encoder_id=encoder_id).fit(rng.normal(2.0 * y - 1.0), y).to_dict()


def test_good_artifacts_pass(tmp_path):
    ref = _write(tmp_path, "c.json", _cal(B32))
    assert lint_policy(_policy(tmp_path, {"drugs": {"calibrator": ref}})).id == "p@1"


def test_wrong_pin_is_reported_by_lint(tmp_path):
    ref = _write(tmp_path, "c.json", _cal())
    ref["sha256"] = "f" * 64
    with pytest.raises(PolicyError, match="categories.drugs.calibrator.*policy pins"):
        lint_policy(_policy(tmp_path, {"drugs": {"calibrator": ref}}))


def test_nan_and_overflowing_artifacts_are_reported(tmp_path):
    bad = _cal()
    bad["coef"] = [float("nan")]
    huge = LinearProbe(np.full(8, 0.1), 0.0, encoder_id="space-a").to_dict()
    huge["coef"][0] = 1e308
    cats = {"drugs": {"calibrator": _write(tmp_path, "c.json", bad)},
            "weapons": {"probe": _write(tmp_path, "p.json", huge)}}
    with pytest.raises(PolicyError) as e:
        lint_policy(_policy(tmp_path, cats))
    assert "2 problems" in str(e.value) and "drugs" in str(e.value) and "weapons" in str(e.value)


def test_mixed_spaces_dimensions_and_a_named_space_are_reported(tmp_path):
    cats = {"drugs": {"probe": _write(tmp_path, "a.json", LinearProbe(np.full(8, 0.1), 0.0, encoder_id="a").to_dict())},
            "weapons": {"probe": _write(tmp_path, "b.json",
                                        LinearProbe(np.full(16, 0.1), 0.0, encoder_id="b").to_dict())}}
    f = _policy(tmp_path, cats)
    with pytest.raises(PolicyError) as e:
        lint_policy(f)
    assert "2 embedding spaces" in str(e.value) and "different dimensions" in str(e.value)
    with pytest.raises(PolicyError, match="embedding space"):
        lint_policy(f, encoder_id="c")


def test_calibrator_needing_a_missing_probe_is_reported(tmp_path):
    rng = np.random.default_rng(1)
    y = (rng.random(300) < 0.5).astype(int)
    cal = Calibrator("sigmoid", inputs=("prompt", "probe"), encoder_id="a").fit(rng.normal(size=(300, 2)) + y[:, None], y)
    with pytest.raises(PolicyError, match="names no probe"):
        lint_policy(_policy(tmp_path, {"drugs": {"calibrator": _write(tmp_path, "c.json", cal.to_dict())}}))


def test_cli_lint_fails_on_a_wrong_pin(tmp_path):
    from safeclip.cli import main

    ref = _write(tmp_path, "c.json", _cal())
    ref["sha256"] = "0" * 64
    assert main(["policy", "lint", str(_policy(tmp_path, {"drugs": {"calibrator": ref}}))]) == 2


# ---------------------------------------------------------------------------------- the decision object (issue 20)
def _known_compiled():
    from conftest import OrthoTexts

    from safeclip.compiled import CompiledPolicy
    from safeclip.policy import load_policy

    pol = load_policy("default")
    comp = CompiledPolicy.build(pol, OrthoTexts(512), "known-space")
    cat = next(c for c in pol.categories if c.block is not None)
    j = pol.category_names.index(cat.name)
    hit = comp.scorer.prompt_matrix[:, comp.scorer.concept_texts.index(cat.prompts[0])].astype(np.float32)
    calm = comp.scorer.prompt_matrix[:, comp.scorer.concept_texts.index(pol.neutral[0])].astype(np.float32)
    return comp, j, hit, calm


def test_decide_takes_the_worst_view_of_each_input():
    from safeclip.compiled import Views

    comp, j, hit, calm = _known_compiled()
    v = comp.decide(Views.of([np.stack([calm, hit, calm]), calm[None], np.stack([hit, calm])], 512))
    assert [v.action(i) for i in range(3)] == ["block", "allow", "block"]
    assert v.view.tolist() == [1, 0, 0] and v.rows.tolist() == [1, 3, 4]
    assert v.ok.all() and v.probabilities[0, j] == v.probabilities[2, j] > 0.5
    d = v.decision(0, frame_indices=(0, 3, 6))
    assert d.action == "block" and d.frame_index == 3 and d.n_frames == 3


def test_decide_never_allows_an_input_with_an_unusable_view():
    from safeclip.compiled import Views
    from safeclip.errors import DataError

    comp, j, hit, calm = _known_compiled()
    nan = np.full(512, np.nan, np.float32)
    v = comp.decide(Views.of([np.stack([calm, nan]), calm[None], None, np.zeros((2, 7), np.float32)], 512))
    assert [p and p[0] for p in v.problems] == ["InvalidEmbedding", None, "NoEmbedding", "InvalidEmbedding"]
    assert v.actions.tolist() == [2, 0, 2, 2] and np.isnan(v.probabilities[[0, 2, 3]]).all()
    assert v.action(1) == "allow"  # a bad neighbour never changes another input's decision
    with pytest.raises(DataError, match="embedding row 1 holds NaN"):
        v.decision(0, source="x.png")


def _probe_and_calibrator(tmp: Path, space: str) -> dict:
    return {"drugs": {"probe": _write(tmp, "p.json", LinearProbe(np.full(8, 0.1), 0.0, encoder_id=space).to_dict()),
                      "calibrator": _write(tmp, "c.json", _cal(space))}}


def test_artifacts_that_cannot_run_in_the_policys_own_encoder_are_reported(tmp_path):
    """Regression (issue 21): lint said ok to ViT-L-14 artifacts in a policy whose encoder: is ViT-B-32; the
    Moderator that policy selects refuses them. Each is checked against the space its encoder: names."""
    l14 = tag_encoder_id("ViT-L-14", "openai")
    cats = _probe_and_calibrator(tmp_path, l14)
    with pytest.raises(PolicyError) as e:
        lint_policy(_policy(tmp_path, cats))  # default's encoder: ViT-B-32 / laion2b_s34b_b79k
    problems = e.value.problems
    assert len(problems) == 2 and all("cannot run there" in p and repr(B32) in p for p in problems), problems
    assert "categories.drugs.probe" in problems[0] and "categories.drugs.calibrator" in problems[1]
    assert lint_policy(_policy(tmp_path, cats, encoder={"model": "ViT-L-14", "pretrained": "openai"})).id == "p@1"
    # The int8 runtime of the same weights is the same encoder: its artifacts run under this encoder: too.
    assert lint_policy(_policy(tmp_path, _probe_and_calibrator(tmp_path, B32 + "|int8"))).id == "p@1"
    with pytest.raises(PolicyError, match="encoder: .*no pretrained tag 'nope'"):
        lint_policy(_policy(tmp_path, {}, encoder={"model": "ViT-B-32", "pretrained": "nope"}))


def test_a_local_encoder_is_hashed_when_it_is_here_and_skipped_when_not(tmp_path, tiny_model):
    from safeclip.embed import Encoder

    space = Encoder(tiny_model, runtime="torch", device="cpu", cache_dir=tmp_path / "cache").encoder_id
    here = {"model": tiny_model}
    assert lint_policy(_policy(tmp_path, _probe_and_calibrator(tmp_path, space), encoder=here)).id == "p@1"
    with pytest.raises(PolicyError, match="cannot run there"):
        lint_policy(_policy(tmp_path, _probe_and_calibrator(tmp_path, B32), encoder=here))
    elsewhere = {"model": "ViT-B-32", "pretrained": str(tmp_path / "not-here" / "vit-b-32.pt")}
    assert lint_policy(_policy(tmp_path, _probe_and_calibrator(tmp_path, space), encoder=elsewhere)).id == "p@1"
