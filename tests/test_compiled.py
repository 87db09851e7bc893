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
from safeclip.errors import PolicyError
from safeclip.heads import LinearProbe


def _policy(tmp: Path, cats: dict) -> Path:
    f = tmp / "p.yaml"
    f.write_text(yaml.safe_dump({"name": "p", "version": "1", "extends": "default", "categories": cats}))
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
    ref = _write(tmp_path, "c.json", _cal())
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
