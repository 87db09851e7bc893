"""The output: parts committed after their embeddings, resumption after kill -9, exactly once, other runs' parts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from audit_helpers import HOOK, REPO, file_sha, read, run_audit, sample  # noqa: F401
from conftest import assert_same_rows

from safeclip.audit.identity import EncoderIdentity
from safeclip.audit.writer import Parts, Rows, output_schema, read_meta, run_meta
from safeclip.cache import EmbeddingCache
from safeclip.errors import AuditError, AuditLockedError
from safeclip.policy import load_policy


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun_gives_every_input_once_without_recomputing(sample, photos, tiny_model,
                                                                              tiny_encoder, tmp_path):
    inputs = sample + [str(p) for p in sorted(photos, key=lambda p: p.stat().st_size)[14:40]]
    inputs = list(dict.fromkeys(inputs))
    out, cache = tmp_path / "r.parquet", tmp_path / "cache"
    parts_dir = tmp_path / "r.parquet.parts"
    cmd = [sys.executable, "-m", "safeclip.cli.audit", "audit", *inputs, "--out", str(out), "--model", tiny_model,
           "--cache", str(cache), "--workers", "1", "--batch-size", "2", "--part-rows", "2", "--no-progress"]
    env = dict(os.environ, **{HOOK: json.dumps({"delay": 0.15})})  # slow decoding down: the kill lands mid-run
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list(parts_dir.glob("part-*.parquet"))) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stderr.close()
    assert len(list(parts_dir.glob("part-*.parquet"))) >= 2, "no part was committed within 120 s"
    assert not out.exists()
    committed = pa.concat_tables([read(p) for p in sorted(parts_dir.glob("part-*.parquet"))])
    done = committed.column("path").to_pylist()
    assert 2 <= len(done) < len(inputs) and len(set(done)) == len(done)
    shas = {p: file_sha(p) for p in inputs}
    with EmbeddingCache(cache, tiny_encoder.encoder_id) as db:
        cached_before = set(db.get_many(shas.values()))
    assert {shas[p] for p in done} <= cached_before  # rows are committed only after their embeddings

    s = run_audit(inputs, out, cache, tiny_encoder, batch_size=2)
    todo = [p for p in inputs if p not in set(done)]
    expected_new = {shas[p] for p in todo} - cached_before
    assert s.resumed == len(done) and s.processed == len(todo)
    assert s.embedded == len(expected_new) and s.decoded == len(expected_new)
    assert s.cache_hits == len(todo) - len(expected_new)
    t = read(out)
    assert t.column("path").to_pylist() == inputs  # every input exactly once, in order
    assert not parts_dir.exists()
    final = {r["path"]: r for r in t.to_pylist()}
    for r in committed.to_pylist():  # committed rows were kept as they were
        assert final[r["path"]] == r

    # Re-running a finished audit starts a fresh one, served entirely by the cache.
    again = run_audit(inputs, out, cache, tiny_encoder)
    assert again.decoded == 0 and again.embedded == 0
    assert_same_rows(read(out), t)


def test_parts_of_another_policy_are_not_reused(sample, tiny_encoder, tmp_path):
    out, cache = tmp_path / "o.parquet", tmp_path / "cache"
    parts = tmp_path / "o.parquet.parts"
    parts.mkdir()
    (parts / "run.json").write_text(json.dumps({"policy": "something-else"}))
    pq.write_table(pa.table({"path": [sample[0]]}), parts / "part-000000.parquet")
    s = run_audit(sample[:3], out, cache, tiny_encoder)
    assert s.resumed == 0 and read(out).num_rows == 3


def test_a_run_started_by_the_previous_version_resumes(sample, tiny_encoder, tmp_path):
    # Its run.json had no encoder_chosen_by and other JSON formatting; its parts are the same Parquet.
    ref, cache = tmp_path / "ref.parquet", tmp_path / "cache"
    run_audit(sample[:4], ref, cache, tiny_encoder)
    done = read(ref)
    meta = read_meta(done.schema)
    assert meta.pop("encoder_chosen_by") == "caller"
    out = tmp_path / "o.parquet"
    parts = tmp_path / "o.parquet.parts"
    parts.mkdir()
    (parts / "run.json").write_text(json.dumps(meta, sort_keys=True))
    pq.write_table(done.slice(0, 3).replace_schema_metadata(None), parts / "part-000000.parquet")
    s = run_audit(sample[:4], out, cache, tiny_encoder)
    assert (s.resumed, s.processed) == (3, 1)
    assert_same_rows(read(out), done, metadata=True)


def test_one_writer_per_output_and_a_damaged_parts_folder_is_reported(sample, tiny_encoder, tmp_path):
    out = tmp_path / "o.parquet"
    ident = EncoderIdentity.of(tiny_encoder)
    meta = run_meta(ident, load_policy("default"), False, "caller")
    holder = Parts(out, meta)
    holder.open()
    try:
        with pytest.raises(AuditLockedError, match="another audit is writing"):
            run_audit(sample[:2], out, tmp_path / "cache", tiny_encoder)
    finally:
        holder.release()
    # Rows missing from the parts at the end (someone deleted a part): a clear error, the parts kept.
    parts = Parts(out, meta)
    parts.open()
    parts.begin()
    schema = output_schema(["sexual"], meta, False)
    rows = Rows(1, False)
    rows.add(sample[0], "a" * 64, 1, 1, 1, 1, "allow", np.zeros(1, np.float32), None)
    parts.commit(rows.table(schema, ["sexual"], ident.encoder_id, "default@1.0"))
    with pytest.raises(AuditError, match="run the same command again"):
        parts.merge(sample[:2], schema)
    parts.release()
    assert list(parts.dir.glob("part-*.parquet")) and not out.exists()
