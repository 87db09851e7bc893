"""The embedding cache: round trips, batch lookups, full scans, crash safety, concurrent readers."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from safeclip.cache import CachedImage, EmbeddingCache, list_cached_encoders
from safeclip.errors import CacheError, EncoderMismatchError, SafeclipError

REPO = Path(__file__).resolve().parents[1]


def sha(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def entry(i: int, dim: int = 8, frames: int = 1) -> CachedImage:
    rng = np.random.default_rng(i)
    v = rng.normal(size=(frames, dim)).astype(np.float32)
    return CachedImage(sha(i), v / np.linalg.norm(v, axis=1, keepdims=True), tuple(range(frames)), 100 + i, 50 + i,
                       frames, 1000 + i, "PNG")


def test_round_trip_batch_lookup_and_counters(tmp_path):
    cache = EmbeddingCache(tmp_path, "enc-a")
    items = [entry(i, frames=1 + (i % 3 == 0) * 2) for i in range(2000)]  # > 900: several IN queries
    assert cache.put_many(items) == 2000
    assert cache.put_many(items[:10]) == 0  # present entries are kept, not rewritten
    assert len(cache) == 2000 and cache.dim == 8
    wanted = [sha(i) for i in range(0, 4000, 3)]
    got = cache.get_many(wanted)
    assert set(got) == {sha(i) for i in range(0, 2000, 3)}
    for i in range(0, 2000, 3):
        g, e = got[sha(i)], items[i]
        np.testing.assert_array_equal(g.embeddings, e.embeddings)
        assert (g.width, g.height, g.n_frames, g.nbytes, g.format, g.frame_indices) == (
            e.width, e.height, e.n_frames, e.nbytes, e.format, e.frame_indices)
    assert cache.hits == len(got) and cache.misses == len(wanted) - len(got)
    assert cache.get(sha(99999)) is None
    cache.close()
    # Reopened (another process would see the same): everything is there.
    with EmbeddingCache(tmp_path, "enc-a", readonly=True) as ro:
        assert len(ro) == 2000
        np.testing.assert_array_equal(ro.get(sha(3)).embeddings, items[3].embeddings)
        with pytest.raises(SafeclipError):
            ro.put_many([entry(5000)])


def test_full_scan_returns_every_entry_with_frame_offsets(tmp_path):
    cache = EmbeddingCache(tmp_path, "enc-a")
    items = [entry(i, frames=(3 if i % 7 == 0 else 1)) for i in range(500)]
    cache.put_many(items[:200])
    cache.put_many(items[200:])
    seen = {}
    for chunk in cache.scan(chunk_rows=64):
        assert len(chunk) <= 64 and chunk.offsets[-1] == len(chunk.embeddings)
        for k, s in enumerate(chunk.sha256):
            seen[s] = (chunk.embeddings[chunk.offsets[k]:chunk.offsets[k + 1]], chunk.width[k], chunk.n_frames[k])
    assert len(seen) == 500
    for it in items:
        emb, w, nf = seen[it.sha256]
        np.testing.assert_array_equal(emb, it.embeddings)
        assert w == it.width and nf == it.n_frames


def test_spaces_are_kept_apart(tmp_path):
    a = EmbeddingCache(tmp_path, "enc-a")
    a.put_many([entry(1)])
    b = EmbeddingCache(tmp_path, "enc-b")
    assert b.get(sha(1)) is None and a.path != b.path
    b.put_many([entry(2, dim=16)])
    with pytest.raises(EncoderMismatchError):
        a.put_many([entry(3, dim=16)])  # one space, one dimension
    assert sorted(list_cached_encoders(tmp_path)) == ["enc-a", "enc-b"]
    with pytest.raises(SafeclipError, match="no embedding cache"):
        EmbeddingCache(tmp_path, "enc-c", readonly=True)


def test_decode_errors_are_remembered_per_fingerprint(tmp_path):
    cache = EmbeddingCache(tmp_path, "enc-a")
    cache.put_decode_errors([(sha(1), "TruncatedImageError", "PNG image is truncated")], "fp1")
    assert cache.get_decode_errors([sha(1), sha(2)], "fp1") == {sha(1): ("TruncatedImageError",
                                                                         "PNG image is truncated")}
    assert cache.get_decode_errors([sha(1)], "fp2") == {}  # another Pillow / limits: try again


def test_cache_problems_are_cache_errors(tmp_path):
    with pytest.raises(CacheError, match="no embedding cache"):
        EmbeddingCache(tmp_path, "enc-a", create=False)
    EmbeddingCache(tmp_path, "enc-a").close()
    with EmbeddingCache(tmp_path, "enc-a", readonly=True) as ro, pytest.raises(CacheError, match="read-only"):
        ro.put_many([entry(1)])
    # A damaged database file: one line naming it, whatever SQLite raised.
    bad = EmbeddingCache(tmp_path, "enc-b")
    path = bad.path
    bad.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(CacheError, match="cannot open the embedding cache") as e:
        EmbeddingCache(tmp_path, "enc-b")
    assert str(path) in str(e.value) and isinstance(e.value.__cause__, sqlite3.Error)


@pytest.mark.slow
def test_kill_9_mid_write_leaves_every_committed_batch_intact(tmp_path):
    # A writer commits batches of 50 as fast as it can; SIGKILL it mid-stream, then check the database.
    script = textwrap.dedent(f"""
        import sys, hashlib, numpy as np
        sys.path.insert(0, {str(REPO)!r})
        from safeclip.cache import CachedImage, EmbeddingCache
        c = EmbeddingCache({str(tmp_path)!r}, "enc-kill")
        i = 0
        while True:
            batch = []
            for _ in range(50):
                v = np.full((1, 64), i, np.float32)
                batch.append(CachedImage(hashlib.sha256(str(i).encode()).hexdigest(), v, (0,), i, i, 1, i, "PNG"))
                i += 1
            c.put_many(batch)
            print(i, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        committed = 0
        deadline = time.monotonic() + 60
        while committed < 2000 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            committed = int(line)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert committed >= 2000, "the writer did not get going"
    with EmbeddingCache(tmp_path, "enc-kill") as c:
        n = len(c)
        assert n >= committed and n % 50 == 0  # whole transactions only
        got = c.get_many([sha(i) for i in range(n)])
        assert len(got) == n
        for i in range(0, n, 97):
            assert got[sha(i)].width == i and float(got[sha(i)].embeddings[0, 0]) == i


def test_readers_in_other_processes_see_commits_while_writing(tmp_path):
    writer = EmbeddingCache(tmp_path, "enc-a")
    writer.put_many([entry(0)])
    script = textwrap.dedent(f"""
        import sys, time, hashlib
        sys.path.insert(0, {str(REPO)!r})
        from safeclip.cache import EmbeddingCache
        c = EmbeddingCache({str(tmp_path)!r}, "enc-a", readonly=True)
        key = hashlib.sha256(b"300").hexdigest()
        deadline = time.monotonic() + 30
        while c.get(key) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        print(len(c) >= 301 and c.get(key) is not None)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        for start in range(1, 301, 30):
            writer.put_many([entry(i) for i in range(start, start + 30)])
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert out.strip() == "True"
