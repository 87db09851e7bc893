"""The local engine on the tiny random-weight checkpoint: complete rows in input order, parity with ``Moderator``,
a warm cache, and the encoder a policy names.

Random weights are never a moderation result: these tests check that rows are complete, computed once, equal to
what ``Moderator`` gives for the same file, and that re-runs reuse what was committed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
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
    assert t.column_names == ["path", "path_bytes", "sha256", "bytes", "width", "height", "frames", "background",
                              "action",
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


_NAME = st.binary(min_size=1, max_size=40).filter(lambda b: b"/" not in b and b"\0" not in b
                                                  and b not in (b".", b".."))


@pytest.mark.slow
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.lists(_NAME, min_size=1, max_size=5, unique=True), data=st.data())
def test_any_file_name_the_filesystem_allows_becomes_exactly_one_row(names, data, sample, tiny_encoder, tmp_path):
    """9.4: random byte strings as file names (not UTF-8 among them): one row each, the raw name kept losslessly
    (``path_bytes``, else ``path``), and a rerun of the same audit works the same."""
    import shutil
    import tempfile

    from safeclip.audit.reader import path_text

    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    raw_dir = os.fsencode(folder)
    for i, name in enumerate(names):
        target = os.path.join(raw_dir, name)
        if data.draw(st.booleans(), label=f"image {i}"):
            shutil.copyfile(sample[i % len(sample)], target)
        else:
            with open(target, "wb") as f:
                f.write(b"junk")
    listed = [os.fsdecode(os.path.join(raw_dir, n)) for n in names]
    out = folder / "o.parquet"
    run_audit(listed, out, tmp_path / "cache", tiny_encoder, workers=1)
    rows = read(out).to_pylist()
    assert len(rows) == len(names)
    for r, name in zip(rows, names):
        raw = r["path_bytes"] if r["path_bytes"] is not None else r["path"].encode()
        assert raw == os.path.join(raw_dir, name)
        assert r["path"] == path_text(os.fsdecode(raw))
        assert (r["error"] is None) == (r["action"] in ("allow", "flag", "block"))
    run_audit([os.fsdecode(folder)], folder / "again.parquet", tmp_path / "cache", tiny_encoder, workers=1,
              include_all=True)  # the folder walk too (it also holds o.parquet)
    assert len(read(folder / "again.parquet")) == len(names) + 1
