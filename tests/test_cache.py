"""The embedding cache: round trips, batch lookups, full scans, crash safety, concurrent readers."""

from __future__ import annotations

import dataclasses
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
    with pytest.raises(CacheError, match="is damaged") as e:
        EmbeddingCache(tmp_path, "enc-b", readonly=True)
    assert str(path) in str(e.value) and isinstance(e.value.__cause__, sqlite3.Error)


def _page_damaged_cache(tmp_path: Path) -> tuple[EmbeddingCache, list[CachedImage]]:
    cache = EmbeddingCache(tmp_path, "enc-a")
    items = [entry(i, dim=512) for i in range(300)]
    cache.put_many(items)
    cache.checkpoint()
    cache.close()
    raw = bytearray(cache.path.read_bytes())
    page = 16384
    for k in range(3, len(raw) // page - 1):  # every data page after the schema: the header still opens
        raw[k * page:k * page + 64] = b"\xff" * 64
    cache.path.write_bytes(bytes(raw))
    return EmbeddingCache(tmp_path, "enc-a"), items


def test_a_damaged_page_is_reported_as_damage_and_moved_aside_never_a_miss(tmp_path, capsys):
    cache, items = _page_damaged_cache(tmp_path)
    with EmbeddingCache(tmp_path, "enc-a", readonly=True) as ro:  # a reader says so and leaves the file alone
        with pytest.raises(CacheError, match="is damaged .*malformed.*move it aside"):
            ro.get_many([it.sha256 for it in items])
        assert ro.damaged and cache.path.exists()
    with pytest.raises(CacheError, match="is damaged .*malformed.*moved aside to .*run the same command again"):
        cache.get_many([it.sha256 for it in items])
    assert cache.damaged
    moved = cache.quarantine()  # already done: the same place
    assert moved.name.startswith(cache.path.name + ".corrupt-") and moved.exists() and not cache.path.exists()
    fresh = EmbeddingCache(tmp_path, "enc-a")
    assert len(fresh) == 0 and not fresh.damaged
    fresh.close()


def test_a_damaged_file_opened_for_writing_is_moved_aside_and_rebuilt(tmp_path, capsys):
    path = EmbeddingCache(tmp_path, "enc-a").path
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    path.write_bytes(b"this is not a database" * 1000)
    with EmbeddingCache(tmp_path, "enc-a") as cache:
        assert len(cache) == 0 and cache.put_many([entry(1)]) == 1
    err = capsys.readouterr().err
    assert "was damaged" in err and "moved aside" in err and len(err.strip().splitlines()) == 1
    assert len(list(path.parent.glob(path.name + ".corrupt-*"))) == 1


def test_a_full_disk_says_so_instead_of_cannot_rollback(tmp_path):
    cache = EmbeddingCache(tmp_path, "enc-a")
    cache.put_many([entry(0, dim=512)])
    pages = cache._con.execute("PRAGMA page_count").fetchone()[0]
    cache._con.execute(f"PRAGMA max_page_count = {pages + 1}")  # SQLite's own "disk full"
    with pytest.raises(CacheError, match="database or disk is full; free some space") as e:
        cache.put_many([entry(i, dim=512) for i in range(1, 200)])
    assert "rollback" not in str(e.value)
    assert len(cache) == 1  # the failed batch left nothing behind, and the cache still works
    assert cache.get(sha(0)) is not None
    cache.close()


def _schema1_cache(tmp_path: Path) -> Path:
    """A database as the previous version wrote it: no decoder or backgrounds columns."""
    path = EmbeddingCache(tmp_path, "enc-a").path
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    con = sqlite3.connect(path)
    con.executescript(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "CREATE TABLE images (sha BLOB PRIMARY KEY, width INTEGER, height INTEGER, n_frames INTEGER, "
        "nbytes INTEGER, format TEXT, frame_indices TEXT, vec BLOB NOT NULL);"
        "CREATE TABLE decode_errors (sha BLOB NOT NULL, fingerprint TEXT NOT NULL, kind TEXT NOT NULL, "
        "message TEXT NOT NULL, PRIMARY KEY (sha, fingerprint)) WITHOUT ROWID;"
        "INSERT INTO meta VALUES ('encoder_id', 'enc-a'), ('schema', '1'), ('dim', '8');")
    for i, fmt in ((1, "JPEG"), (2, "PNG"), (3, "WEBP")):
        e = entry(i)
        con.execute("INSERT INTO images VALUES (?, 1, 1, 1, 1, ?, '[0]', ?)",
                    (bytes.fromhex(e.sha256), fmt, e.embeddings.tobytes()))
    con.commit()
    con.close()
    return path


def test_entries_made_before_per_background_views_are_misses_unless_opaque(tmp_path, capsys):
    _schema1_cache(tmp_path)
    with EmbeddingCache(tmp_path, "enc-a", readonly=True) as ro:  # a schema 1 file still opens read-only
        assert set(ro.get_many([sha(1), sha(2), sha(3)])) == {sha(1)}
        assert [c.sha256 for c in ro.scan()] == [[sha(1)]]
    with EmbeddingCache(tmp_path, "enc-a") as cache:  # upgraded in place, with one line
        assert "upgraded the embedding cache" in capsys.readouterr().err
        assert set(cache.get_many([sha(1), sha(2), sha(3)])) == {sha(1)}
        v = np.stack([entry(2).embeddings[0], entry(9).embeddings[0]])
        again = CachedImage(sha(2), v, (0, 0), 1, 1, 1, 1, "PNG", ("#ffffff", "#000000"))
        assert cache.put_many([again]) == 1  # the old entry is replaced
        got = cache.get(sha(2))
        assert got.backgrounds == ("#ffffff", "#000000") and got.embeddings.shape == (2, 8)
        assert cache.get(sha(1)).backgrounds == ()
        assert cache.put_many([again]) == 0  # a current entry is kept
    with EmbeddingCache(tmp_path, "enc-a") as cache:
        assert capsys.readouterr().err == ""  # upgraded once


def _with_pdq(e: CachedImage, seed: int) -> CachedImage:
    rng = np.random.default_rng(seed)
    n = len(e.embeddings)
    return dataclasses.replace(e, pdq=rng.integers(0, 256, (n, 32), dtype=np.uint8),
                               pdq_quality=rng.integers(0, 101, n).astype(np.int16))


def test_pdq_hashes_round_trip_through_lookups_and_scans(tmp_path):
    items = [_with_pdq(entry(i, frames=1 + (i % 2) * 2), i) for i in range(6)] + [entry(6)]  # the last: no hash
    with EmbeddingCache(tmp_path, "enc-a") as cache:
        assert cache.put_many(items) == 7
        got = cache.get_many([it.sha256 for it in items])
        for it in items[:6]:
            np.testing.assert_array_equal(got[it.sha256].pdq, it.pdq)
            np.testing.assert_array_equal(got[it.sha256].pdq_quality, it.pdq_quality)
        assert got[sha(6)].pdq is None and got[sha(6)].pdq_quality is None
        (chunk,) = list(cache.scan())
        for k, it in enumerate(items):
            a, b = chunk.offsets[k], chunk.offsets[k + 1]
            if it.pdq is None:
                assert (chunk.pdq[a:b] == 0).all() and (chunk.pdq_quality[a:b] == -1).all()
            else:
                np.testing.assert_array_equal(chunk.pdq[a:b], it.pdq)
                np.testing.assert_array_equal(chunk.pdq_quality[a:b], it.pdq_quality)
        # An entry without hashes is completed by the same decoder's entry; one with hashes is kept.
        assert cache.put_many([_with_pdq(entry(6), 60)]) == 1
        np.testing.assert_array_equal(cache.get(sha(6)).pdq, _with_pdq(entry(6), 60).pdq)
        assert cache.put_many([_with_pdq(entry(0), 99)]) == 0
        np.testing.assert_array_equal(cache.get(sha(0)).pdq, items[0].pdq)
        with pytest.raises(SafeclipError, match="PDQ hashes"):  # not one hash per embedding row
            cache.put_many([dataclasses.replace(items[1], pdq=items[1].pdq[:1])])


def test_a_damaged_pdq_blob_damages_its_entry_only(tmp_path):
    with EmbeddingCache(tmp_path, "enc-a") as cache:
        cache.put_many([_with_pdq(entry(i), i) for i in range(4)])
        path = cache.path
    con = sqlite3.connect(path)
    con.execute("UPDATE images SET pdq = x'0102' WHERE sha = ?", (bytes.fromhex(sha(1)),))
    con.execute("UPDATE images SET pdq_quality = NULL WHERE sha = ?", (bytes.fromhex(sha(2)),))
    con.execute("UPDATE images SET pdq_quality = ? WHERE sha = ?", (np.int16(300).tobytes(), bytes.fromhex(sha(3))))
    con.commit()
    con.close()
    with EmbeddingCache(tmp_path, "enc-a", readonly=True) as ro:
        (chunk,) = list(ro.scan())
        assert set(chunk.damaged) == {1, 2, 3}
        assert "PDQ" in chunk.damaged[1] and "without" in chunk.damaged[2] and "quality" in chunk.damaged[3]
        assert (chunk.pdq_quality[1:] == -1).all()
        assert set(ro.get_many([sha(i) for i in range(4)])) == {sha(0)}


def test_schema_2_caches_are_upgraded_in_place_and_keep_their_entries_without_hashes(tmp_path, capsys):
    with EmbeddingCache(tmp_path, "enc-a") as cache:
        cache.put_many([entry(i) for i in range(3)])
        path = cache.path
    con = sqlite3.connect(path)  # as the previous version wrote it: no PDQ columns
    con.execute("ALTER TABLE images DROP COLUMN pdq")
    con.execute("ALTER TABLE images DROP COLUMN pdq_quality")
    con.execute("UPDATE meta SET value = '2' WHERE key = 'schema'")
    con.commit()
    con.close()
    with EmbeddingCache(tmp_path, "enc-a", readonly=True) as ro:  # read-only: read as is, without hashes
        assert all(e.pdq is None for e in ro.get_many([sha(i) for i in range(3)]).values())
        assert (next(ro.scan()).pdq_quality == -1).all()
    with EmbeddingCache(tmp_path, "enc-a") as cache:
        assert "upgraded the embedding cache" in capsys.readouterr().err
        got = cache.get_many([sha(i) for i in range(3)])
        assert len(got) == 3 and all(e.pdq is None for e in got.values())
        assert cache.put_many([_with_pdq(entry(1), 1)]) == 1  # completed with its hashes
        assert cache.get(sha(1)).pdq is not None
    with EmbeddingCache(tmp_path, "enc-a"):
        assert capsys.readouterr().err == ""  # upgraded once
    con = sqlite3.connect(path)
    assert con.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0] == "4"
    con.close()


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
                v = np.zeros((1, 64), np.float32)
                v[0, i % 64] = 1.0
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
            assert got[sha(i)].width == i and int(np.argmax(got[sha(i)].embeddings[0])) == i % 64


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


# ------------------------------------------------------------------------------------------ damaged entries
def _damage(cache: EmbeddingCache, i: int, **columns: object) -> None:
    """Overwrite columns of entry ``i`` the way a bad disk, a foreign writer or a bug could leave them."""
    con = sqlite3.connect(cache.path)
    sets = ", ".join(f"{k} = ?" for k in columns)
    con.execute(f"UPDATE images SET {sets} WHERE sha = ?", (*columns.values(), bytes.fromhex(sha(i))))
    con.commit()
    con.close()


DAMAGE = {  # entry -> columns: every way an entry can disagree with itself
    2: {"vec": b""},  # empty blob
    4: {"vec": b"\x00" * (4 * 8 + 4)},  # not a whole number of 8-d rows
    6: {"frame_indices": "[0, 1"},  # garbage JSON
    8: {"frame_indices": "[0, 1, 2, 3]"},  # more frames than rows
    10: {"backgrounds": '["#ffffff"]'},  # a background for 1 of 3 rows
    12: {"width": "wide"},
    14: {"vec": "text, not a blob"},
    15: {"vec": np.full((1, 8), np.nan, np.float32).tobytes()},  # the right size, not an embedding
}


def _damaged_cache(tmp_path: Path) -> tuple[EmbeddingCache, list[CachedImage]]:
    cache = EmbeddingCache(tmp_path, "enc-a")
    items = [entry(i, frames=3 if i % 2 == 0 else 1) for i in range(16)]
    cache.put_many(items)
    for i, cols in DAMAGE.items():
        _damage(cache, i, **cols)
    return cache, items


def test_scan_reports_damaged_entries_and_never_shifts_their_neighbours(tmp_path):
    cache, items = _damaged_cache(tmp_path)
    with EmbeddingCache(tmp_path, "enc-a", readonly=True) as ro:
        chunks = list(ro.scan(chunk_rows=16))
    assert len(chunks) == 1
    c = chunks[0]
    assert c.sha256 == [it.sha256 for it in items] and c.offsets[-1] == len(c.embeddings)
    assert set(c.damaged) == set(DAMAGE)
    assert "bytes" in c.damaged[2] and "frame_indices" in c.damaged[8] and "width" in c.damaged[12]
    for k, it in enumerate(items):
        rows = c.embeddings[c.offsets[k]:c.offsets[k + 1]]
        if k in DAMAGE:
            assert rows.tolist() == [[1.0] + [0.0] * 7]  # one placeholder row (e0): callers make it an error row
        else:
            np.testing.assert_array_equal(rows, it.embeddings)
            assert (c.width[k], c.n_frames[k]) == (it.width, it.n_frames)


def test_lookups_treat_a_damaged_entry_as_a_miss_and_remove_it(tmp_path):
    cache, items = _damaged_cache(tmp_path)
    keys = [it.sha256 for it in items]
    with EmbeddingCache(tmp_path, "enc-a", readonly=True) as ro:  # a reader: a miss, the entry left to a writer
        got = ro.get_many(keys)
        assert set(got) == {sha(i) for i in range(16) if i not in DAMAGE}
        assert ro.get(sha(2)) is None and set(ro.damaged_entries) == {sha(i) for i in DAMAGE}
        for s, hit in got.items():
            np.testing.assert_array_equal(hit.embeddings, items[keys.index(s)].embeddings)
    assert len(cache) == 16
    got = cache.get_many(keys)  # a writer removes them: the next audit embeds those files again
    assert set(got) == {sha(i) for i in range(16) if i not in DAMAGE} and cache.misses == len(DAMAGE)
    assert len(cache) == 16 - len(DAMAGE)
    assert cache.put_many([items[2]]) == 1 and cache.get(sha(2)) is not None


def test_a_damaged_entry_is_replaced_by_the_next_write_of_its_file(tmp_path):
    cache, items = _damaged_cache(tmp_path)
    # A Ray driver writes without looking the file up first: the damaged entry must not be kept as "present".
    assert cache.put_many([items[i] for i in DAMAGE]) == len(DAMAGE)
    got = cache.get_many([it.sha256 for it in items])
    assert len(got) == 16 and not cache.damaged_entries
    for it in items:
        np.testing.assert_array_equal(got[it.sha256].embeddings, it.embeddings)


@pytest.mark.parametrize("dim", ["eight", "8.0", "-8", "0", ""])
def test_a_damaged_dimension_is_a_cache_error_naming_the_fix(tmp_path, dim):
    cache = EmbeddingCache(tmp_path, "enc-a")
    cache.put_many([entry(1)])
    cache.close()
    con = sqlite3.connect(cache.path)
    con.execute("UPDATE meta SET value = ? WHERE key = 'dim'", (dim,))
    con.commit()
    con.close()
    with pytest.raises(CacheError, match="is damaged .*dimension .* is not a positive integer.*move it aside"):
        EmbeddingCache(tmp_path, "enc-a", readonly=True)


# ------------------------------------------------------------------------------------------ trust
@pytest.mark.parametrize("where", ["", "embeddings", "file"])
def test_a_cache_others_can_write_is_refused_naming_the_fix(tmp_path, where):
    EmbeddingCache(tmp_path, "enc-a").put_many([entry(1)])
    target = {"": tmp_path, "embeddings": tmp_path / "embeddings"}.get(where)
    target = target or next((tmp_path / "embeddings").glob("*.sqlite"))
    os.chmod(target, os.stat(target).st_mode | 0o002)
    for readonly in (True, False):  # a reader too: the embeddings it returns would decide
        with pytest.raises(CacheError, match=f"{target}.* can be written by every user.*chmod go-w {target}"):
            EmbeddingCache(tmp_path, "enc-a", readonly=readonly)
    os.chmod(target, os.stat(target).st_mode & ~0o022)
    assert EmbeddingCache(tmp_path, "enc-a", readonly=True).get(sha(1)) is not None


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="only root can give a folder away")
def test_a_cache_folder_owned_by_another_user_is_refused(tmp_path):
    EmbeddingCache(tmp_path, "enc-a").put_many([entry(1)])
    os.chown(tmp_path / "embeddings", 65534, 65534)
    with pytest.raises(CacheError, match="is owned by .*, not by you.*a cache folder of your own"):
        EmbeddingCache(tmp_path, "enc-a", readonly=True)


def test_new_cache_folders_are_private_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        EmbeddingCache(tmp_path / "a" / "b", "enc-a").put_many([entry(1)])
    finally:
        os.umask(old)
    for d in (tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "embeddings"):
        assert os.stat(d).st_mode & 0o777 == 0o700, d


# ---------------------------------------------------------------------------------------------- clips (issue 24)
def _clip(i: int, sampling: str, frames: int = 3) -> CachedImage:
    return dataclasses.replace(entry(i, frames=frames), format="MP4", times=tuple(0.5 * k for k in range(frames)),
                               sampling=sampling, duration_s=0.5 * frames, sampling_text="2 fps")


def test_a_clip_is_keyed_by_sha256_and_sampling(tmp_path):
    with EmbeddingCache(tmp_path, "enc-a") as cache:
        assert cache.put_many([_clip(1, "fps=1"), entry(2)]) == 2
        got = cache.get_many([sha(1), sha(2)], sampling="fps=1")
        assert got[sha(1)].times == (0.0, 0.5, 1.0) and got[sha(1)].sampling == "fps=1"
        assert got[sha(1)].duration_s == 1.5 and got[sha(1)].sampling_text == "2 fps"
        assert got[sha(2)].times == () and got[sha(2)].sampling is None  # a still: whatever the sampling
        assert set(cache.get_many([sha(1), sha(2)], sampling="fps=2")) == {sha(2)}  # another sampling: a miss
        assert cache.get(sha(1)).times == (0.0, 0.5, 1.0)  # no sampling named: whatever it was
        # embedded again under the other sampling: the entry is replaced
        assert cache.put_many([_clip(1, "fps=2", frames=5)]) == 1
        assert sha(1) not in cache.get_many([sha(1)], sampling="fps=1")
        assert cache.get_many([sha(1)], sampling="fps=2")[sha(1)].times == (0.0, 0.5, 1.0, 1.5, 2.0)
        assert cache.put_many([_clip(1, "fps=2", frames=5)]) == 0  # the same: kept
        from safeclip.errors import DataError

        with pytest.raises(DataError, match="times of"):
            cache.put_many([dataclasses.replace(_clip(3, "x"), times=(0.0, 1.0))])
        with pytest.raises(DataError, match="finite"):
            cache.put_many([dataclasses.replace(_clip(3, "x"), times=(0.0, float("nan"), 1.0))])


def test_damaged_times_are_a_miss_and_schema_3_caches_are_upgraded(tmp_path):
    with EmbeddingCache(tmp_path, "enc-a") as cache:
        cache.put_many([_clip(1, "s"), entry(2)])
        path = cache.path
    con = sqlite3.connect(path)
    for bad in ('{"t": [0, 1]}', '[0, 1, 2]', '{"t": [0, 1, "x"]}', '{"t": [0, 1, 2], "duration_s": "long"}'):
        with EmbeddingCache(tmp_path, "enc-a") as cache:
            cache.put_many([_clip(1, "s")])
        con.execute("UPDATE images SET times = ? WHERE sha = ?", (bad, bytes.fromhex(sha(1))))
        con.commit()
        with EmbeddingCache(tmp_path, "enc-a") as cache:
            assert set(cache.get_many([sha(1), sha(2)])) == {sha(2)} and sha(1) in cache.damaged_entries, bad
    con.close()
    con = sqlite3.connect(path)  # as the previous version wrote it: no clip columns
    con.execute("ALTER TABLE images DROP COLUMN times")
    con.execute("ALTER TABLE images DROP COLUMN sampling")
    con.execute("UPDATE meta SET value = '3' WHERE key = 'schema'")
    con.commit()
    con.close()
    with EmbeddingCache(tmp_path, "enc-a", readonly=True) as ro:
        assert ro.get_many([sha(2)], sampling="s")[sha(2)].times == ()
    with EmbeddingCache(tmp_path, "enc-a") as cache:
        assert cache.get(sha(2)) is not None and cache.put_many([_clip(1, "s")]) == 1
        assert cache.get_many([sha(1)], sampling="s")[sha(1)].times == (0.0, 0.5, 1.0)
    con = sqlite3.connect(path)
    assert con.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0] == "4"
    con.close()
