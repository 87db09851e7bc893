"""The output: parts committed after their embeddings, resumption after kill -9, exactly once, other runs' parts."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from audit_helpers import HOOK, REPO, bad_files, file_sha, read, run_audit, sample  # noqa: F401
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
    # A session of its own: the run's decode workers (and their fork server) share its process group, proc.pid.
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list(parts_dir.glob("part-*.parquet"))) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)  # the main process only: its workers must notice and go by themselves
        proc.wait(timeout=30)
        # Count what the killed run cached only once none of its processes holds the cache open. SIGKILL can land
        # after a put_many's commit reached the WAL but before it was published in the -shm index: a connection
        # opened while a worker still maps that index does not see the commit, one opened after every process
        # let go recovers it from the WAL (as the rerun does), so counting earlier undercounts cached_before.
        deadline = time.monotonic() + 30
        while _group_running(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not _group_running(proc.pid), "the killed run's decode workers outlived it by 30 s"
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stderr.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # a failed assertion above leaves no stray worker
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
    for r in committed.to_pylist():  # committed rows were kept as they were (mtime_ns is for resuming only)
        assert r.pop("mtime_ns") is not None and final[r["path"]] == r

    # Re-running a finished audit starts a fresh one, served entirely by the cache.
    again = run_audit(inputs, out, cache, tiny_encoder)
    assert again.decoded == 0 and again.embedded == 0
    # Another batch layout (batch_size 2 above, the default here) in another process: the embeddings come from the
    # cache, unchanged, and scores do not depend on the batch (issue 23; exact within a process: tests/test_score.py,
    # the resume test below). Across the killed CLI process and this one a probability once differed by 3e-8 (cause
    # not found yet), so this comparison keeps a tolerance far below any threshold's resolution.
    assert_same_rows(read(out), t, atol=1e-6)


def _group_running(pgid: int) -> bool:
    """Whether a process of the group ``pgid`` is still running (an exited one awaiting its reaper has closed its
    files and does not count)."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # it exited meanwhile
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


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
    # A part damaged while the run went on: the same clear error, not pyarrow's.
    rows = Rows(1, False)
    rows.add(sample[1], "b" * 64, 1, 1, 1, 1, "allow", np.zeros(1, np.float32), None)
    parts.commit(rows.table(schema, ["sexual"], ident.encoder_id, "default@1.0"))
    damaged = sorted(parts.dir.glob("part-*.parquet"))[-1]
    _damage_pages(damaged, "action")
    with pytest.raises(AuditError, match=f"{damaged.name} was damaged.*run the same command again"):
        parts.merge(sample[:2], schema)
    parts.release()
    assert list(parts.dir.glob("part-*.parquet")) and not out.exists()


class _KilledBeforeMerge(BaseException):
    """Stands for kill -9 after every part was committed, before the merge."""


def _damage_pages(part, column):
    """Overwrite ``column``'s data in a Parquet file; its footer and the other columns stay readable."""
    meta = pq.ParquetFile(part).metadata.row_group(0)
    chunk = next(meta.column(i) for i in range(meta.num_columns) if meta.column(i).path_in_schema == column)
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    data = bytearray(part.read_bytes())
    data[start:start + chunk.total_compressed_size] = b"\xff" * chunk.total_compressed_size
    part.write_bytes(bytes(data))


def test_resume_recomputes_the_rows_of_deleted_or_damaged_parts(sample, tiny_encoder, tmp_path, monkeypatch):
    files = sample[:9]
    ref = tmp_path / "ref.parquet"
    run_audit(files, ref, tmp_path / "ref-cache", tiny_encoder, save_embeddings=True)
    out, cache = tmp_path / "o.parquet", tmp_path / "cache"
    kw = dict(workers=1, batch_size=2, part_rows=2, save_embeddings=True)

    def killed(*a, **k):
        raise _KilledBeforeMerge

    with monkeypatch.context() as m:
        m.setattr(Parts, "merge", killed)
        with pytest.raises(_KilledBeforeMerge):
            run_audit(files, out, cache, tiny_encoder, **kw)
    parts = sorted((tmp_path / "o.parquet.parts").glob("part-*.parquet"))
    assert len(parts) >= 4
    kept = sum(pq.read_metadata(p).num_rows for p in parts[3:])
    parts[0].unlink()  # deleted
    parts[1].write_bytes(parts[1].read_bytes()[:100])  # truncated to garbage
    _damage_pages(parts[2], "action")  # footer intact: only reading the whole part shows the damage
    with pytest.raises(OSError):
        pq.read_table(parts[2])
    s = run_audit(files, out, cache, tiny_encoder, **kw)
    assert (s.resumed, s.processed) == (kept, len(files) - kept)
    assert_same_rows(read(out), read(ref), metadata=True)  # every input once, bit for bit as an uninterrupted run
    assert not (tmp_path / "o.parquet.parts").exists()


def _copies(sample, tmp_path, n=4):
    import shutil
    from pathlib import Path

    d = tmp_path / "in"
    d.mkdir()
    files = []
    for i, p in enumerate(sample[:n]):
        dst = d / f"f{i}{Path(p).suffix}"
        shutil.copyfile(p, dst)
        files.append(str(dst))
    return files


def _interrupted(files, ref_table, out, mtimes=True):
    """A parts folder as an interrupted run of ``ref_table``'s configuration left it."""
    parts = out.with_name(out.name + ".parts")
    parts.mkdir()
    (parts / "run.json").write_text(json.dumps(read_meta(ref_table.schema), sort_keys=True))
    t = ref_table.replace_schema_metadata(None)
    if mtimes:
        t = t.append_column("mtime_ns", pa.array([os.stat(p).st_mtime_ns for p in files], pa.int64()))
    else:  # the previous version's parts: no mtime, no background, error rows with a null action
        t = t.drop_columns(["background"])
    pq.write_table(t, parts / "part-000000.parquet")


def _flip_a_byte(path, keep_mtime):
    st = os.stat(path)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_resume_redoes_inputs_whose_content_changed(sample, tiny_encoder, tmp_path):
    files = _copies(sample, tmp_path)
    cache, ref = tmp_path / "cache", tmp_path / "ref.parquet"
    run_audit(files, ref, cache, tiny_encoder)
    out = tmp_path / "o.parquet"
    _interrupted(files, read(ref), out)
    with open(files[0], "ab") as f:
        f.write(b"\0" * 16)  # another size
    _flip_a_byte(files[1], keep_mtime=True)  # same size and mtime: only the content hash can tell
    _flip_a_byte(files[2], keep_mtime=False)  # same size, another mtime
    s = run_audit(files, out, cache, tiny_encoder)
    assert (s.resumed, s.processed) == (1, 3)
    t = read(out)
    assert t.column("path").to_pylist() == files
    assert t.column("sha256").to_pylist() == [file_sha(p) for p in files]


def test_resume_of_a_previous_version_run_rechecks_size_and_commit_time(sample, tiny_encoder, tmp_path):
    files = _copies(sample, tmp_path)
    old = time.time() - 3600
    for p in files:
        os.utime(p, (old, old))
    cache, ref = tmp_path / "cache", tmp_path / "ref.parquet"
    run_audit(files, ref, cache, tiny_encoder)
    out = tmp_path / "o.parquet"
    _interrupted(files, read(ref), out, mtimes=False)
    _flip_a_byte(files[2], keep_mtime=False)  # modified after its row was committed
    s = run_audit(files, out, cache, tiny_encoder)
    assert (s.resumed, s.processed) == (3, 1)
    t = read(out)
    assert t.column("sha256").to_pylist() == [file_sha(p) for p in files]
    assert_same_rows(t.slice(0, 2), read(ref).slice(0, 2))


def test_error_rows_have_the_action_error(sample, bad_files, tiny_encoder, tmp_path):
    s = run_audit(sample[:2] + bad_files[:2] + [str(tmp_path / "missing.jpg")], tmp_path / "o.parquet",
                  tmp_path / "cache", tiny_encoder)
    rows = read(tmp_path / "o.parquet").to_pylist()
    errors = [r for r in rows if r["error"] is not None]
    assert len(errors) == s.errors >= 2 and all(r["action"] == "error" for r in errors)
    assert all(r["action"] in ("allow", "flag", "block") for r in rows if r["error"] is None)
    assert sum(s.actions.values()) + s.errors == len(rows) and s.fails("error")


def test_the_output_never_replaces_an_input_a_foreign_file_or_another_audit(sample, tiny_encoder, tmp_path):
    from safeclip.audit.writer import check_output
    from safeclip.errors import OutputError

    files = _copies(sample, tmp_path, 3)
    cache = tmp_path / "cache"
    before = open(files[0], "rb").read()
    with pytest.raises(OutputError, match="is one of the inputs"):
        run_audit(files, files[0], cache, tiny_encoder)
    foreign = tmp_path / "notes.parquet"
    foreign.write_bytes(b"my own notes")
    with pytest.raises(OutputError, match="not a safeclip output"):
        run_audit(files, foreign, cache, tiny_encoder)
    assert open(files[0], "rb").read() == before and foreign.read_bytes() == b"my own notes"
    a = tmp_path / "a.parquet"
    run_audit(files[:2], a, cache, tiny_encoder)
    run_audit(files[:2], a, cache, tiny_encoder)  # the same inputs again: a re-run, allowed
    with pytest.raises(OutputError, match="of other inputs.*--overwrite"):
        run_audit(files[1:], a, cache, tiny_encoder)
    assert read(a).column("path").to_pylist() == files[:2]
    check_output(a, files[1:], overwrite=True)  # asked for: allowed
    with pytest.raises(OutputError, match="is one of the inputs"):
        check_output(files[0], files, overwrite=True)


def test_output_write_failures_are_one_line_output_errors(monkeypatch, tmp_path):
    import errno

    from safeclip.audit import writer
    from safeclip.errors import OutputError

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    meta = {"kind": "audit", "dim": 1}
    parts = Parts(tmp_path / "o.parquet", meta)
    parts.open()
    parts.begin()
    monkeypatch.setattr(writer, "write_parquet_atomic", full)
    schema = output_schema(["c"], meta, False)
    rows = Rows(1, False)
    rows.add("x", "a" * 64, 1, 1, 1, 1, "allow", np.zeros(1, np.float32), None)
    with pytest.raises(OutputError, match="No space left on device; free some space"):
        parts.commit(rows.table(schema, ["c"], "e", "p", parts=True))
    parts.release()
    with pytest.raises(OutputError, match="cannot write /proc/a.parquet"):
        Parts(Path("/proc/a.parquet"), meta).open()


def test_saved_embeddings_are_one_list_per_frame(sample, tiny_encoder, tmp_path):
    pd = pytest.importorskip("pandas")
    out = tmp_path / "o.parquet"
    run_audit(sample, out, tmp_path / "cache", tiny_encoder, save_embeddings=True)
    df = pd.read_parquet(out)
    for _, r in df.iterrows():
        frames = np.stack(r.embedding)  # the README's example
        assert frames.shape == (len(r.embedding_backgrounds), tiny_encoder.dim)
        np.testing.assert_allclose(np.linalg.norm(frames, axis=1), 1.0, atol=1e-3)
    assert (df.frames > 1).any()


def test_unwritable_out_or_cache_is_one_line_before_the_model_loads(sample, tmp_path):
    # /proc refuses even root; --pretrained names weights that do not exist, so reaching the model would say so.
    base = [sys.executable, "-m", "safeclip", "audit", sample[0], "--pretrained", str(tmp_path / "none.pt"),
            "--no-progress"]
    cases = {("--out", "/proc/a.parquet", "--cache", str(tmp_path / "c")): "cannot write /proc/a.parquet",
             ("--out", str(tmp_path / "o.parquet"), "--cache", "/proc/safeclip-cache"): "cannot write to the cache"}
    for args, why in cases.items():
        p = subprocess.run(base + list(args), capture_output=True, text=True, timeout=120, cwd=REPO)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and why in lines[0], p.stderr
