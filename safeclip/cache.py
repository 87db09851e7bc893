"""Embedding cache: ``(encoder_id, sha256 of the file's bytes) -> embeddings of its sampled frames``, on local disk.

One SQLite database per embedding space (``<cache_dir>/embeddings/<hash of encoder_id>.sqlite``), in WAL mode:

- **crash-safe**: every :meth:`EmbeddingCache.put_many` is one transaction; a ``kill -9`` at any moment leaves the
  database at its last commit (WAL + ``synchronous=FULL`` also survives power loss).
- **batch lookups**: ``WHERE sha IN (...)`` on the primary-key index, ~60k images/s; workers of an audit read
  while the main process writes (WAL readers never block the writer).
- **full scans**: rows are stored in insertion (rowid) order on 16 KiB pages, so a scan streams the file;
  :meth:`EmbeddingCache.scan` returns chunks of tens of thousands of rows as one ``(n, D)`` float32 matrix
  (about 400k images/s, so a re-score of a million cached images reads its embeddings in ~3 s).

Embeddings are float32 BLOBs (``F * D * 4`` bytes, ``F`` sampled frames; an animation keeps every sampled frame so
that any policy can re-pick its worst frame). Each entry also keeps what an audit row reports about the file
(width, height, frame count, byte size, format) so a cache hit never needs the image.

Deterministic decode failures can be remembered too (:meth:`EmbeddingCache.put_decode_errors`), keyed by
``(sha256, decoder fingerprint)``: the same bytes under the same Pillow version and decode limits fail the same way,
so a re-run need not open a hostile file again.

>>> import numpy as np, tempfile
>>> cache = EmbeddingCache(tempfile.mkdtemp(), "demo-encoder")
>>> cache.put_many([CachedImage("ab" * 32, np.ones((1, 4), np.float32), (0,), 640, 480, 1, 1234, "JPEG")])
1
>>> cache.get_many(["ab" * 32])["ab" * 32].embeddings.shape
(1, 4)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CacheError, DataError, EncoderMismatchError

__all__ = ["CachedImage", "CacheChunk", "EmbeddingCache", "list_cached_encoders"]

_SCHEMA_VERSION = "1"
_PAGE_SIZE = 16384  # 2 KiB rows (512-d float32) pack ~7 to a page; 4 KiB pages waste half the file
_IN_CHUNK = 900  # bound parameters per IN (...) query, under every SQLite build's limit
_BUSY_TIMEOUT_MS = 60_000


@dataclass(frozen=True)
class CachedImage:
    """One cached file: the embeddings of its sampled frames ``(F, D)`` and its metadata."""

    sha256: str
    embeddings: np.ndarray
    frame_indices: tuple[int, ...]
    width: int
    height: int
    n_frames: int
    nbytes: int
    format: str


@dataclass(frozen=True)
class CacheChunk:
    """A slice of a full scan: ``n`` images whose frames are rows ``offsets[i]:offsets[i + 1]`` of ``embeddings``."""

    sha256: list[str]
    embeddings: np.ndarray  # (total frames, D) float32
    offsets: np.ndarray  # (n + 1,) int64
    width: np.ndarray
    height: np.ndarray
    n_frames: np.ndarray
    nbytes: np.ndarray

    def __len__(self) -> int:
        return len(self.sha256)


def _db_name(encoder_id: str) -> str:
    return hashlib.sha256(encoder_id.encode()).hexdigest()[:24] + ".sqlite"


def list_cached_encoders(cache_dir: str | os.PathLike[str]) -> list[str]:
    """The encoder_ids that have an embedding database under ``cache_dir``."""
    out = []
    for p in sorted((Path(cache_dir) / "embeddings").glob("*.sqlite")):
        try:
            con = sqlite3.connect(f"file:{p}?mode=ro", uri=True, timeout=5)
            try:
                row = con.execute("SELECT value FROM meta WHERE key = 'encoder_id'").fetchone()
            finally:
                con.close()
        except sqlite3.Error:
            continue
        if row:
            out.append(str(row[0]))
    return out


class EmbeddingCache:
    """The embedding cache of one embedding space under ``cache_dir`` (see the module docstring).

    Each process opens its own ``EmbeddingCache`` (SQLite connections do not cross ``fork``); one instance may be
    shared by threads. ``readonly`` opens an existing database for lookups and scans only; ``create=False`` raises
    :class:`~safeclip.errors.CacheError` when there is no database yet. Counters ``hits``, ``misses`` and
    ``written`` count this instance's lookups and new entries. A database that cannot be opened, read or written
    (corrupt, read-only, disk full) raises :class:`~safeclip.errors.CacheError`; embeddings of another space
    :class:`~safeclip.errors.EncoderMismatchError`.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str],
        encoder_id: str,
        *,
        readonly: bool = False,
        create: bool = True,
    ) -> None:
        self.encoder_id = encoder_id
        self.path = Path(cache_dir) / "embeddings" / _db_name(encoder_id)
        self.readonly = readonly
        self.hits = self.misses = self.written = 0
        self._lock = threading.RLock()
        if not self.path.exists() and (readonly or not create):
            raise CacheError(
                f"no embedding cache for encoder {encoder_id!r} in {Path(cache_dir)} "
                f"(known there: {list_cached_encoders(cache_dir) or 'none'})")
        try:
            self._con = self._connect()
            meta = dict(self._con.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.Error as e:
            raise CacheError(f"cannot open the embedding cache {self.path}: {e}; if it is damaged, delete it (it is "
                             "rebuilt as files are audited again)") from e
        self.dim: int | None = None
        stored = meta.get("encoder_id")
        if stored is not None and stored != encoder_id:
            raise EncoderMismatchError(f"{self.path} holds embeddings of {stored!r}, not {encoder_id!r}")
        if "dim" in meta:
            self.dim = int(meta["dim"])

    def _connect(self) -> sqlite3.Connection:
        if self.readonly:
            con = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=_BUSY_TIMEOUT_MS / 1000,
                                  check_same_thread=False, isolation_level=None)
            con.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            return con
        self.path.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_MS / 1000, check_same_thread=False,
                              isolation_level=None)
        con.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        con.execute(f"PRAGMA page_size = {_PAGE_SIZE}")  # only takes effect on a new, empty database
        con.execute("PRAGMA journal_mode = WAL")
        con.execute("PRAGMA synchronous = FULL")
        con.execute("BEGIN IMMEDIATE")
        try:
            con.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            con.execute(
                "CREATE TABLE IF NOT EXISTS images (sha BLOB PRIMARY KEY, width INTEGER, height INTEGER, "
                "n_frames INTEGER, nbytes INTEGER, format TEXT, frame_indices TEXT, vec BLOB NOT NULL)")
            con.execute(
                "CREATE TABLE IF NOT EXISTS decode_errors (sha BLOB NOT NULL, fingerprint TEXT NOT NULL, "
                "kind TEXT NOT NULL, message TEXT NOT NULL, PRIMARY KEY (sha, fingerprint)) WITHOUT ROWID")
            con.execute("INSERT OR IGNORE INTO meta VALUES ('encoder_id', ?)", (self.encoder_id,))
            con.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (_SCHEMA_VERSION,))
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        return con

    @contextlib.contextmanager
    def _locked(self, what: str) -> Iterator[None]:
        """This instance's lock; SQLite's errors (corrupt file, disk full, read-only folder) as a CacheError."""
        with self._lock:
            try:
                yield
            except sqlite3.Error as e:
                raise CacheError(f"cannot {what} the embedding cache {self.path}: {e}") from e

    # ------------------------------------------------------------------------------------------------ reads
    def __len__(self) -> int:
        with self._locked("read"):
            return int(self._con.execute("SELECT count(*) FROM images").fetchone()[0])

    def _vectors(self, blob: bytes) -> np.ndarray:
        v = np.frombuffer(blob, np.float32)
        dim = self.dim or len(v)
        return v.reshape(-1, dim)

    def get_many(self, shas: Iterable[str]) -> dict[str, CachedImage]:
        """The cached entries among ``shas`` (hex sha256), in one indexed query per 900 keys."""
        keys = list(dict.fromkeys(shas))
        out: dict[str, CachedImage] = {}
        with self._locked("read"):
            if self.dim is None:
                self._refresh_dim()
            for i in range(0, len(keys), _IN_CHUNK):
                chunk = [bytes.fromhex(k) for k in keys[i:i + _IN_CHUNK]]
                rows = self._con.execute(
                    "SELECT sha, width, height, n_frames, nbytes, format, frame_indices, vec FROM images "
                    f"WHERE sha IN ({','.join('?' * len(chunk))})", chunk).fetchall()
                for sha, w, h, nf, nb, fmt, fi, vec in rows:
                    key = sha.hex()
                    out[key] = CachedImage(key, self._vectors(vec), tuple(json.loads(fi)), int(w), int(h), int(nf),
                                           int(nb), str(fmt))
            self.hits += len(out)
            self.misses += len(keys) - len(out)
        return out

    def get(self, sha256: str) -> CachedImage | None:
        """One entry, or None."""
        return self.get_many([sha256]).get(sha256)

    def _refresh_dim(self) -> None:
        row = self._con.execute("SELECT value FROM meta WHERE key = 'dim'").fetchone()
        if row is not None:
            self.dim = int(row[0])

    def scan(self, chunk_rows: int = 65536) -> Iterator[CacheChunk]:
        """Every entry, in insertion order, as :class:`CacheChunk` s of up to ``chunk_rows`` images."""
        with self._locked("read"):
            self._refresh_dim()
            if self.dim is None:
                return
            dim = self.dim
            # A private read transaction: one consistent snapshot even while another process writes.
            con = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=_BUSY_TIMEOUT_MS / 1000)
        try:
            cur = con.execute("SELECT sha, width, height, n_frames, nbytes, vec FROM images ORDER BY rowid")
            while True:
                rows = cur.fetchmany(chunk_rows)
                if not rows:
                    break
                blob = b"".join(r[5] for r in rows)
                emb = np.frombuffer(blob, np.float32).reshape(-1, dim)
                counts = np.fromiter((len(r[5]) for r in rows), np.int64, len(rows)) // (4 * dim)
                offsets = np.zeros(len(rows) + 1, np.int64)
                np.cumsum(counts, out=offsets[1:])
                yield CacheChunk(
                    sha256=[r[0].hex() for r in rows], embeddings=emb, offsets=offsets,
                    width=np.fromiter((r[1] for r in rows), np.int64, len(rows)),
                    height=np.fromiter((r[2] for r in rows), np.int64, len(rows)),
                    n_frames=np.fromiter((r[3] for r in rows), np.int64, len(rows)),
                    nbytes=np.fromiter((r[4] for r in rows), np.int64, len(rows)),
                )
        except sqlite3.Error as e:
            raise CacheError(f"cannot read the embedding cache {self.path}: {e}") from e
        finally:
            con.close()

    def get_decode_errors(self, shas: Iterable[str], fingerprint: str) -> dict[str, tuple[str, str]]:
        """Remembered decode failures ``sha -> (error class name, message)`` for this decoder fingerprint."""
        keys = list(dict.fromkeys(shas))
        out: dict[str, tuple[str, str]] = {}
        with self._locked("read"):
            for i in range(0, len(keys), _IN_CHUNK):
                chunk = [bytes.fromhex(k) for k in keys[i:i + _IN_CHUNK]]
                rows = self._con.execute(
                    "SELECT sha, kind, message FROM decode_errors WHERE fingerprint = ? AND sha IN "
                    f"({','.join('?' * len(chunk))})", [fingerprint, *chunk]).fetchall()
                out.update({sha.hex(): (str(kind), str(msg)) for sha, kind, msg in rows})
        return out

    # ------------------------------------------------------------------------------------------------ writes
    def put_many(self, items: Sequence[CachedImage]) -> int:
        """Add entries in one transaction (entries already present are kept); returns how many were new."""
        if not items:
            return 0
        if self.readonly:
            raise CacheError(f"{self.path} is open read-only")
        dim = int(items[0].embeddings.shape[1])
        for it in items:
            if it.embeddings.ndim != 2 or it.embeddings.shape[1] != dim or len(it.embeddings) < 1:
                raise DataError(f"embeddings of {it.sha256} must be (F >= 1, {dim}), got {it.embeddings.shape}")
        rows = [(bytes.fromhex(it.sha256), int(it.width), int(it.height), int(it.n_frames), int(it.nbytes),
                 str(it.format), json.dumps(list(it.frame_indices)),
                 np.ascontiguousarray(it.embeddings, np.float32).tobytes()) for it in items]
        with self._locked("write to"):
            con = self._con
            con.execute("BEGIN IMMEDIATE")
            try:
                row = con.execute("SELECT value FROM meta WHERE key = 'dim'").fetchone()
                if row is None:
                    con.execute("INSERT INTO meta VALUES ('dim', ?)", (str(dim),))
                elif int(row[0]) != dim:
                    raise EncoderMismatchError(
                        f"{self.path} holds {row[0]}-d embeddings of {self.encoder_id!r}; refusing {dim}-d ones")
                before = con.total_changes
                con.executemany("INSERT OR IGNORE INTO images VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
                added = con.total_changes - before
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
            self.dim = dim
            self.written += added
        return added

    def put_decode_errors(self, errors: Sequence[tuple[str, str, str]], fingerprint: str) -> None:
        """Remember deterministic decode failures ``(sha256, error class name, message)``."""
        if not errors or self.readonly:
            return
        with self._locked("write to"):
            self._con.execute("BEGIN IMMEDIATE")
            try:
                self._con.executemany("INSERT OR REPLACE INTO decode_errors VALUES (?, ?, ?, ?)",
                                      [(bytes.fromhex(s), fingerprint, k, m) for s, k, m in errors])
                self._con.execute("COMMIT")
            except BaseException:
                self._con.execute("ROLLBACK")
                raise

    def checkpoint(self) -> None:
        """Fold the write-ahead log into the database file, so that later scans read one contiguous file."""
        if self.readonly:
            return
        with self._lock:
            try:
                self._con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.OperationalError:
                pass  # a reader holds an old snapshot: SQLite checkpoints later

    def close(self) -> None:
        with self._lock:
            self._con.close()

    def __enter__(self) -> EmbeddingCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EmbeddingCache({str(self.path)!r}, encoder_id={self.encoder_id!r})"
