"""``safeclip runtime verify`` and :func:`safeclip.embed.verify_int8` (safeclip.embed._verify, safeclip.cli.runtime).

Tiny random weights: the figures only exercise the command, they measure nothing about int8 on real weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import safeclip
from safeclip.embed import Encoder, verify_int8
from safeclip.errors import DataError


@pytest.mark.slow
def test_verify_int8_compares_embeddings_and_decisions(tiny_model, cache_dir, photos, tmp_path):
    fp32 = Encoder(tiny_model, cache_dir=cache_dir, precision="fp32")
    judge = safeclip.Moderator(encoder=fp32)
    bad = tmp_path / "not-an-image.jpg"
    bad.write_bytes(b"nope")
    r = verify_int8([*photos[:5], bad], fp32, decide=judge.decide)
    assert r.n_images == 5 and [s for s, _ in r.failed] == [str(bad)]
    assert r.int8_encoder_id == fp32.encoder_id + "|int8" and r.policy == judge.policy.id
    q = r.cosine_quantiles()
    assert 0.9 < q["min"] <= q["median"] <= 1.0 + 1e-6
    assert 0.0 <= r.same_action <= 1.0 and len(r.changed) == round((1 - r.same_action) * 5)
    assert r.max_probability_change is not None and r.max_change_at[1] in judge.policy.category_names
    only_cos = verify_int8(photos[:2], fp32)
    assert only_cos.same_action is None and only_cos.max_probability_change is None
    with pytest.raises(DataError, match="could be decoded"):
        verify_int8([bad], fp32)


def cli(*args: str, cache) -> subprocess.CompletedProcess:
    env = {**os.environ, "SAFECLIP_CACHE_DIR": str(cache)}
    return subprocess.run([sys.executable, "-W", "ignore", "-m", "safeclip", "runtime", "verify", *args],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_runtime_verify_command(tiny_model, cache_dir, photos, tmp_path):
    images = [str(p) for p in photos[:4]]
    out = cli(*images, "--model", tiny_model, cache=cache_dir)
    assert out.returncode == 0, out.stderr
    assert "on 4 of your images, policy default@1.0" in out.stdout
    assert "embedding cosine" in out.stdout and "same action" in out.stdout
    assert "say nothing of either's accuracy" in out.stdout
    bad = tmp_path / "x.png"
    bad.write_bytes(b"\x89PNG broken")
    out = cli(*images[:2], str(bad), "--model", tiny_model, "--json", cache=cache_dir)
    assert out.returncode == 1 and str(bad) in out.stderr
    doc = json.loads(out.stdout)
    assert doc["n_images"] == 2 and doc["int8_encoder_id"].endswith("|int8") and doc["failed"][0][0] == str(bad)
    out = cli(str(bad), "--model", tiny_model, cache=cache_dir)
    assert out.returncode == 2 and "nothing to compare" in out.stderr
