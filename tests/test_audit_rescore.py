"""Re-scoring cached embeddings without the model equals a fresh audit under the new policy."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from audit_helpers import ALL_FLAG_POLICY, audited, bad_files, read, sample  # noqa: F401
from conftest import assert_same_rows

from safeclip.audit import rescore
from safeclip.errors import CacheError, ConfigError, DataError, ModelLoadError


def test_rescore_from_an_audit_equals_a_fresh_audit_under_the_new_policy(audited):
    d, inputs = audited
    s = rescore(out=d / "re.parquet", policy="strict", cache=d / "cache", from_audit=d / "default.parquet",
                verbose=False)
    fresh, re = read(d / "strict.parquet"), read(d / "re.parquet")
    assert s.rows == len(inputs) and s.errors == 3 and s.decoded == s.embedded == 0
    assert_same_rows(re, fresh)

    # From the embeddings saved in the audit output: no cache needed.
    s2 = rescore(out=d / "re2.parquet", policy="strict", cache=d / "cache", embeddings=d / "default.parquet",
                 verbose=False)
    assert s2.rows == len(inputs)
    assert_same_rows(read(d / "re2.parquet"), fresh, ignore=("embedding", "embedding_backgrounds"))


def test_rescore_the_whole_cache(audited):
    d, inputs = audited
    fresh = {r["sha256"]: r for r in read(d / "strict.parquet").to_pylist() if r["error"] is None}
    s = rescore(out=d / "all.parquet", policy="strict", cache=d / "cache", verbose=False)
    rows = read(d / "all.parquet").to_pylist()
    assert s.rows == len(rows) == len(fresh)
    assert all(r["path"] is None for r in rows)
    mine = pa.Table.from_pylist(rows).drop_columns(["path"])
    theirs = pa.Table.from_pylist([fresh[r["sha256"]] for r in rows]).drop_columns(["path"])
    assert_same_rows(mine, theirs)


def test_rescore_with_uncached_prompts_needs_the_model(audited, tiny_model, tmp_path):
    d, _ = audited
    pol = tmp_path / "new.yaml"
    pol.write_text(ALL_FLAG_POLICY.replace("a red ball", "a never embedded prompt"))
    with pytest.raises(ModelLoadError, match="--model"):
        rescore(out=tmp_path / "x.parquet", policy=pol, cache=d / "cache", from_audit=d / "default.parquet",
                verbose=False)
    s = rescore(out=tmp_path / "x.parquet", policy=pol, cache=d / "cache", from_audit=d / "default.parquet",
                model=tiny_model, verbose=False)
    assert s.actions["flag"] == s.rows - s.errors
    # Embedded once: now it is cached and the model is not needed any more.
    rescore(out=tmp_path / "y.parquet", policy=pol, cache=d / "cache", from_audit=d / "default.parquet",
            verbose=False)
    assert_same_rows(read(tmp_path / "x.parquet"), read(tmp_path / "y.parquet"))


def test_sources_that_cannot_be_rescored_say_why(audited, tmp_path):
    d, _ = audited
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"path": ["a"]}), other)
    with pytest.raises(DataError, match="not a safeclip audit output"):
        rescore(out=tmp_path / "x.parquet", policy="strict", cache=d / "cache", from_audit=other, verbose=False)
    with pytest.raises(DataError, match="no embedding column"):
        rescore(out=tmp_path / "x.parquet", policy="strict", cache=d / "cache", embeddings=d / "strict.parquet",
                verbose=False)
    with pytest.raises(CacheError, match="holds none"):
        rescore(out=tmp_path / "x.parquet", policy="strict", cache=tmp_path / "empty", verbose=False)
    with pytest.raises(ConfigError, match="not both"):
        rescore(out=tmp_path / "x.parquet", from_audit=other, embeddings=other, verbose=False)
    assert not (tmp_path / "x.parquet").exists()
