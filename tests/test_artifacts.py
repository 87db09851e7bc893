"""Pinned artifacts: integrity, and numbers that are finite where they are applied (float32)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from safeclip.artifacts import read_pinned_json, sha256_bytes
from safeclip.errors import ArtifactIntegrityError
from safeclip.heads import LinearProbe


def _pinned(tmp_path, obj_or_text) -> tuple:
    data = (obj_or_text if isinstance(obj_or_text, str) else json.dumps(obj_or_text)).encode()
    path = tmp_path / "a.json"
    path.write_bytes(data)
    return path, sha256_bytes(data)


def test_wrong_pin_is_refused(tmp_path):
    path, sha = _pinned(tmp_path, {"kind": "x"})
    with pytest.raises(ArtifactIntegrityError, match="refusing to load"):
        read_pinned_json(path, "0" * 64)
    assert read_pinned_json(path, sha) == {"kind": "x"}


def test_deeply_nested_json_is_an_integrity_error_not_a_recursion_error(tmp_path):
    path, sha = _pinned(tmp_path, "[" * 100_000 + "]" * 100_000)
    with pytest.raises(ArtifactIntegrityError, match="nested too deeply"):
        read_pinned_json(path, sha)


@pytest.mark.parametrize("coef0,intercept", [(1e308, 0.0), (float("nan"), 0.0), (0.1, 1e300)])
def test_numbers_beyond_float32_are_refused(tmp_path, coef0, intercept):
    """Regression (issue 9.1): 1e308 passes a float64 finiteness check, then overflows to inf in float32."""
    d = LinearProbe(np.full(4, 0.1), 0.0, encoder_id="e").to_dict()
    d["coef"][0] = coef0
    d["intercept"] = intercept
    path, sha = _pinned(tmp_path, json.dumps(d))  # json.dumps writes NaN as a bare NaN literal
    with pytest.raises(ArtifactIntegrityError, match="float32|finite"):
        LinearProbe.load(path, sha)
