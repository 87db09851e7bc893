"""The local engine on the tiny random-weight checkpoint: complete rows in input order, parity with ``Moderator``,
a warm cache, and the encoder a policy names.

Random weights are never a moderation result: these tests check that rows are complete, computed once, equal to
what ``Moderator`` gives for the same file, and that re-runs reuse what was committed.
"""

from __future__ import annotations

import os

import pytest
from audit_helpers import ALL_FLAG_POLICY, bad_files, file_sha, read, run_audit, sample  # noqa: F401
from conftest import assert_same_rows

from safeclip.audit import audit
from safeclip.audit.writer import read_meta


def test_rows_schema_order_and_parity_with_moderator(sample, tiny_encoder, tmp_path):
    from safeclip.moderator import Moderator

    out = tmp_path / "a.parquet"
    s = run_audit(sample, out, tmp_path / "cache", tiny_encoder, batch_size=5)
    t = read(out)
    pol_cats = Moderator(policy="default", encoder=tiny_encoder).policy.category_names
    assert t.column_names == ["path", "sha256", "bytes", "width", "height", "frames", "action",
                              *[f"p_{c}" for c in pol_cats], "error", "encoder_id", "policy"]
    assert t.column("path").to_pylist() == sample  # one row per input, input order
    assert s.rows == len(sample) and s.errors == 0 and s.processed == len(sample) and s.resumed == 0
    assert s.embedded == len(sample) and s.decoded == len(sample) and s.cache_hits == 0
    assert sum(s.actions.values()) == len(sample)
    assert set(t.column("encoder_id").to_pylist()) == {tiny_encoder.encoder_id}
    assert set(t.column("policy").to_pylist()) == {"default@1.0"}
    assert t.column("sha256").to_pylist() == [file_sha(p) for p in sample]
    assert t.column("bytes").to_pylist() == [os.path.getsize(p) for p in sample]
    rows = t.to_pylist()
    assert max(r["frames"] for r in rows) > 1  # animations are in the sample

    # The same file gives the same decision as Moderator.check_many (worst frame of animations included).
    decisions = Moderator(policy="default", encoder=tiny_encoder, on_error="flag").check_many(sample)
    for r, d in zip(rows, decisions):
        assert d.error is None and r["error"] is None
        assert r["action"] == d.action, r["path"]
        assert d.n_frames <= r["frames"]  # sampled frames <= frames in the file
        for c in pol_cats:
            assert r[f"p_{c}"] == pytest.approx(d.categories[c].probability, abs=1e-4)
        assert (r["width"], r["height"]) > (0, 0)


def test_warm_cache_rerun_decodes_and_embeds_nothing(sample, bad_files, tiny_encoder, tmp_path):
    cache = tmp_path / "cache"
    inputs = sample + bad_files[:15]
    first = run_audit(inputs, tmp_path / "1.parquet", cache, tiny_encoder)
    assert first.embedded == len(sample) and first.errors == 15
    second = run_audit(inputs, tmp_path / "2.parquet", cache, tiny_encoder)
    # Hash, look up, and only decode misses: a warm cache opens no image, not even the hostile ones.
    assert (second.decoded, second.embedded, second.cache_hits) == (0, 0, len(sample))
    assert_same_rows(read(tmp_path / "1.parquet"), read(tmp_path / "2.parquet"))


def test_the_policys_encoder_is_used_when_the_caller_names_none(sample, tiny_model, tiny_encoder, monkeypatch,
                                                                 tmp_path):
    monkeypatch.delenv("SAFECLIP_MODEL", raising=False)
    monkeypatch.delenv("SAFECLIP_PRETRAINED", raising=False)
    pol = tmp_path / "tiny.yaml"
    pol.write_text(ALL_FLAG_POLICY + f"encoder: {{model: {tiny_model!r}}}\n")
    cache = tmp_path / "cache"
    s = audit(sample[:2], out=tmp_path / "a.parquet", policy=pol, cache=cache, workers=1, verbose=False)
    t = read(tmp_path / "a.parquet")
    assert s.encoder_id == tiny_encoder.encoder_id and set(t.column("encoder_id").to_pylist()) == {s.encoder_id}
    meta = read_meta(t.schema)
    assert meta["encoder_chosen_by"] == "policy" and meta["encoder_id"] == s.encoder_id
    # The caller's model wins over the policy's, and the metadata says so.
    pol.write_text(ALL_FLAG_POLICY + "encoder: {model: ViT-L-14, pretrained: openai}\n")
    s = audit(sample[:2], out=tmp_path / "b.parquet", policy=pol, model=tiny_model, cache=cache, workers=1,
              verbose=False)
    t = read(tmp_path / "b.parquet")
    assert s.encoder_id == tiny_encoder.encoder_id and read_meta(t.schema)["encoder_chosen_by"] == "caller"
