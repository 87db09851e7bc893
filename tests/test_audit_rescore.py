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
    assert_same_rows(read(d / "re2.parquet"), fresh, ignore=("embedding", "embedding_backgrounds", "embedding_pdq",
                                                                 "embedding_pdq_quality", "embedding_times"))


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


@pytest.mark.slow
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


def _with_embeddings(src: pa.Table, values: list) -> pa.Table:
    i = src.column_names.index("embedding")
    return src.set_column(i, "embedding", pa.array(values, src.schema.field("embedding").type))


def test_every_malformed_saved_embedding_is_an_error_row_of_its_own(audited, tmp_path):
    import numpy as np

    d, _ = audited
    src = read(d / "default.parquet")
    ok = [i for i, e in enumerate(src.column("error").to_pylist()) if e is None]
    assert len(ok) >= 6
    embs = src.column("embedding").to_pylist()
    dim = len(embs[ok[0]][0])
    broken = list(embs)
    broken[ok[0]] = []  # an empty list: must not take the next row's decision
    broken[ok[1]] = [embs[ok[1]][0][:-1]]  # wrong length
    broken[ok[2]] = [[float("nan")] * dim]
    broken[ok[3]] = [[x * 1000 for x in embs[ok[3]][0]]]  # not normalised
    broken[ok[4]] = None
    broken[ok[-1]] = []  # the last decidable row: once an IndexError
    bad_src = tmp_path / "bad.parquet"
    pq.write_table(_with_embeddings(src, broken), bad_src)
    s = rescore(out=tmp_path / "o.parquet", policy="strict", cache=d / "cache", embeddings=bad_src, verbose=False)
    got, fresh = read(tmp_path / "o.parquet").to_pylist(), read(d / "strict.parquet").to_pylist()
    bad = {ok[0], ok[1], ok[2], ok[3], ok[4], ok[-1]}
    for i, (g, f) in enumerate(zip(got, fresh)):
        if i in bad:
            assert g["action"] == "error" and g["error"] and all(g[k] is None for k in g if k.startswith("p_")), i
        else:
            assert (g["action"], g["error"]) == (f["action"], f["error"]), i
            for k in g:
                if k.startswith("p_") and g[k] is not None:
                    assert not np.isnan(g[k])
    assert s.errors == sum(r["error"] is not None for r in fresh) + len(bad)


def test_the_previous_flat_embedding_layout_is_still_read(audited, tmp_path):
    d, _ = audited
    src = read(d / "default.parquet")
    flat = [None if e is None else [x for frame in e for x in frame] for e in src.column("embedding").to_pylist()]
    old = src.drop_columns(["embedding", "embedding_backgrounds"]).append_column(
        "embedding", pa.array(flat, pa.list_(pa.float32())))
    pq.write_table(old, tmp_path / "old.parquet")
    rescore(out=tmp_path / "a.parquet", policy="strict", cache=d / "cache",
            embeddings=tmp_path / "old.parquet", verbose=False)
    rescore(out=tmp_path / "b.parquet", policy="strict", cache=d / "cache", embeddings=d / "default.parquet",
            verbose=False)
    a, b = read(tmp_path / "a.parquet"), read(tmp_path / "b.parquet")
    assert a.column("action").to_pylist() == b.column("action").to_pylist()
    assert a.column("embedding").to_pylist() == b.column("embedding").to_pylist()


def test_malformed_sha256_values_are_error_rows(audited, tmp_path):
    d, _ = audited
    src = read(d / "default.parquet")
    shas = src.column("sha256").to_pylist()
    ok = [i for i, e in enumerate(src.column("error").to_pylist()) if e is None]
    shas[ok[0]], shas[ok[1]] = "not-a-sha", "zz" * 32
    t = src.set_column(src.column_names.index("sha256"), "sha256", pa.array(shas, pa.string()))
    pq.write_table(t, tmp_path / "bad.parquet")
    rescore(out=tmp_path / "o.parquet", policy="strict", cache=d / "cache", from_audit=tmp_path / "bad.parquet",
            verbose=False)
    rows = read(tmp_path / "o.parquet").to_pylist()
    for i in ok[:2]:
        assert rows[i]["action"] == "error" and rows[i]["error"].startswith("InvalidSha256")
    assert rows[ok[2]]["error"] is None


@pytest.mark.slow
def test_rescore_out_problems_are_one_line_exit_2(audited, tmp_path):
    import os
    import subprocess
    import sys

    d, _ = audited
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    junk = tmp_path / "junk.parquet"
    junk.write_text("mine")
    other = tmp_path / "other.parquet"
    pq.write_table(read(d / "default.parquet").slice(0, 3), other)  # an audit of other inputs
    cases = {str(tmp_path): "is a folder", str(d / "default.parquet"): "is one of the inputs",
             str(junk): "not a safeclip output", str(other): "--overwrite"}
    if os.geteuid() != 0:  # root writes anywhere
        cases[str(ro / "x.parquet")] = "cannot write"
    cases["/proc/x.parquet"] = "cannot write"
    for out, why in cases.items():
        p = subprocess.run([sys.executable, "-m", "safeclip", "rescore", "--from", str(d / "default.parquet"),
                            "--cache", str(d / "cache"), "--policy", "strict", "--out", out],
                           capture_output=True, text=True, timeout=120)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and why in lines[0], (out, p.stderr)
    assert junk.read_text() == "mine" and read(other).num_rows == 3
    p = subprocess.run([sys.executable, "-m", "safeclip", "rescore", "--from", str(d / "default.parquet"),
                        "--cache", str(d / "cache"), "--policy", "strict", "--out", str(other), "--overwrite"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and read(other).num_rows == read(d / "default.parquet").num_rows
