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


def test_a_json_artifact_over_the_size_cap_is_refused_before_it_is_read(tmp_path, monkeypatch):
    """Regression (issue 21.4): a 114 MiB head was read, hashed and parsed (1 GB of memory) before its shape was
    refused. A file over MAX_ARTIFACT_JSON_BYTES is refused from its size, unread."""
    from safeclip import artifacts

    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.truncate(114 << 20)  # sparse: 114 MiB that take no disk and no time to write
    assert artifacts.MAX_ARTIFACT_JSON_BYTES < 114 << 20
    monkeypatch.setattr(artifacts.json, "loads", lambda *a, **k: pytest.fail("parsed"))
    monkeypatch.setattr(artifacts, "sha256_bytes", lambda *a, **k: pytest.fail("hashed"))
    with pytest.raises(ArtifactIntegrityError, match=r"big\.json' is larger than 62 MiB"):
        read_pinned_json(big, "0" * 64)


def test_the_size_cap_is_exact(tmp_path, monkeypatch):
    from safeclip import artifacts

    path, sha = _pinned(tmp_path, {"kind": "x", "pad": "y" * 100})
    size = path.stat().st_size
    monkeypatch.setattr(artifacts, "MAX_ARTIFACT_JSON_BYTES", size)
    assert read_pinned_json(path, sha)["kind"] == "x"
    monkeypatch.setattr(artifacts, "MAX_ARTIFACT_JSON_BYTES", size - 1)
    with pytest.raises(ArtifactIntegrityError, match="larger than"):
        read_pinned_json(path, sha)


def test_the_cap_holds_the_largest_head_safeclip_writes():
    """The cap is derived from MAX_HEAD_PARAMETERS numbers at JSON_BYTES_PER_NUMBER each: check that bound on the
    canonical writer with the longest float32 reprs (negative, 17 significant digits, two-digit exponent)."""
    from safeclip.artifacts import JSON_BYTES_PER_NUMBER, MAX_ARTIFACT_JSON_BYTES
    from safeclip.files import json_bytes
    from safeclip.heads import MAX_HEAD_PARAMETERS, MLPHead

    rng = np.random.default_rng(0)
    w = -(rng.random((64, 256)) * 9 + 1) * 1e-38  # float32 values near its smallest normal: the longest reprs
    w = np.where(np.abs(w.astype(np.float32)) > 0, w, -1.2345678e-38)
    head = MLPHead([(w, -np.full(64, 1.2345678e-38)), (-np.full((1, 64), 1.2345678e-38), np.zeros(1))],
                   encoder_id="e", metadata={})
    n = head.n_parameters
    empty = MLPHead([(np.zeros((1, 1)), np.zeros(1))], encoder_id="e")
    per_number = (len(json_bytes(head.to_dict())) - len(json_bytes(empty.to_dict()))) / (n - 2)
    assert 24 < per_number <= JSON_BYTES_PER_NUMBER
    assert MAX_ARTIFACT_JSON_BYTES >= MAX_HEAD_PARAMETERS * JSON_BYTES_PER_NUMBER
