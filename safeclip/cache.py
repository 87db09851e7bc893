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

Transparency: since :data:`~safeclip.decode.DECODER_VERSION` 2 an image with real alpha is one view per background
(its embeddings hold one row per view; ``backgrounds`` says which colour each row was seen on, ``None`` for an opaque
frame). The database records the decoder version of each entry (schema 2). Entries of an older decoder (schema 1
databases are upgraded in place when opened for writing, with one line on stderr) are kept only for formats that
cannot carry transparency (JPEG, MPO); the others read as misses and are replaced when the file is embedded again.

PDQ: since schema 3 an entry also keeps each view's PDQ hash (``pdq``, ``(F, 32)`` uint8) and its quality
(``pdq_quality``, ``(F,)`` int16), so that PDQ banks can be matched (and re-matched by ``rescore``) without the image.
Older databases are upgraded in place when opened for writing; their entries read with ``pdq`` None, and an entry
without hashes is completed (not replaced otherwise) when the file is decoded again.

Clips: since schema 4 an entry of a video or animation decoded with frame times also keeps them (``times``, one per
embedding row, seconds, with the clip's duration and the decoder's words for its sampling) and the sampling settings
it was decoded under (``sampling``: what decides which frames a clip gives). A lookup that names a sampling (:meth:`EmbeddingCache.get_many` ``sampling=``) takes a clip's entry
only when it was decoded under that sampling (a still, with none, always): the entry is keyed by sha256 + sampling,
and one of another sampling is a miss and is replaced when the clip is embedded again. Older databases are upgraded
in place when opened for writing (both columns NULL: their entries are stills, or animations without times).

Damage: a database SQLite reports as malformed ("database disk image is malformed", "file is not a database") is
never read as "no entry". Opening it for writing moves it aside to ``<name>.corrupt-<timestamp>`` and starts an empty
one (one line on stderr). Damage found later raises :class:`~safeclip.errors.CacheError` (with
:attr:`EmbeddingCache.damaged` set); a writable instance moves the file aside first (:meth:`EmbeddingCache.quarantine`),
so running the same audit again rebuilds the cache.

A damaged *entry* (an embedding blob that is empty or not a whole number of ``D``-float32 rows, or whose rows are
not finite L2-normalised embeddings; a frame or background list that is not JSON or not one item per row; metadata
that is not an integer; PDQ blobs that are not one 32-byte hash and one int16 quality per row, or only one of the
two) never shifts another entry's rows and never raises: :meth:`EmbeddingCache.get_many` reads
it as a miss and, when writable, removes it (so the file is embedded again, never blamed);
:meth:`EmbeddingCache.scan` keeps its place with a placeholder row and says why in :attr:`CacheChunk.damaged`;
:meth:`EmbeddingCache.put_many` replaces it. A ``dim`` that is not a positive integer damages the whole database (a
:class:`~safeclip.errors.CacheError`; opening it for writing moves it aside).

Trust: a cache folder does not vouch for itself. The database is refused (:class:`~safeclip.errors.CacheError`
naming the fix) when the cache folder, ``embeddings/`` or the database files belong to another user or can be
written by other users (see :mod:`safeclip._trust`): embeddings someone else wrote would decide as if safeclip had
computed them.

Deterministic decode failures can be remembered too (:meth:`EmbeddingCache.put_decode_errors`), keyed by
``(sha256, decoder fingerprint)``: the same bytes under the same Pillow version and decode limits fail the same way,
so a re-run need not open a hostile file again.

>>> import numpy as np, tempfile
>>> cache = EmbeddingCache(tempfile.mkdtemp(), "demo-encoder")
>>> cache.put_many([CachedImage("ab" * 32, np.eye(1, 4, dtype=np.float32), (0,), 640, 480, 1, 1234, "JPEG")])
1
>>> cache.get_many(["ab" * 32])["ab" * 32].embeddings.shape
(1, 4)
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import _trust
from .arrays import NORM_TOLERANCE, embedding_row_problems
from .decode import DECODER_VERSION
from .errors import CacheError, DataError, EncoderMismatchError
from .banks import NO_HASH

__all__ = ["CacheChunk", "CachedImage", "EmbeddingCache", "is_damage", "list_cached_encoders"]

_SCHEMA_VERSION = "4"
_OPAQUE_FORMATS = ("JPEG", "MPO")  # entries of a decoder before version 2 stay valid only for these (no alpha)
_VALID = f"(decoder >= 2 OR format IN {_OPAQUE_FORMATS!r})"
_DAMAGE = ("malformed", "not a database", "file is encrypted", "database corrupt")
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
    backgrounds: tuple[str | None, ...] = ()  # per embedding row: "#rrggbb" it was composited on, None opaque
    pdq: np.ndarray | None = None  # (F, 32) uint8: each row's PDQ hash; None when not recorded (older entries)
    pdq_quality: np.ndarray | None = None  # (F,) int16: each hash's quality (NO_HASH where none was computed)
    times: tuple[float, ...] = ()  # a clip's: each row's time in seconds; () for a still
    sampling: str | None = None  # a clip's: the sampling settings its frames were taken under (part of its key)
    duration_s: float | None = None  # a clip's length, as the decoder said
    sampling_text: str | None = None  # a clip's sampling in words, as the decoder said (``Decision.sampling``)


def is_damage(e: BaseException) -> bool:
    """Whether a SQLite error says the database file itself is damaged (not busy, full or read-only)."""
    return isinstance(e, sqlite3.DatabaseError) and any(m in str(e).lower() for m in _DAMAGE)


_PDQ_MIN_Q, _PDQ_MAX_Q = NO_HASH, 100
_INT_MAX = {"width": 2**31 - 1, "height": 2**31 - 1, "n_frames": 2**31 - 1, "nbytes": 2**63 - 1}  # audit columns


class _Damaged(Exception):
    """An entry that disagrees with itself; the message says how (it becomes a miss or an error row, never a
    traceback)."""


def _dim(value: object) -> int:
    """The database's embedding dimension; :class:`_Damaged` unless it is a positive integer."""
    text = str(value)
    if not text.isascii() or not text.isdigit() or int(text) <= 0:
        raise _Damaged(f"its embedding dimension {str(value)[:40]!r} is not a positive integer")
    return int(text)


def _json_list(text: object, name: str, rows: int) -> list[object]:
    try:
        value = json.loads(text)  # type: ignore[arg-type]
    except (TypeError, ValueError, RecursionError):
        raise _Damaged(f"its {name} {str(text)[:40]!r} is not JSON") from None
    if not isinstance(value, list) or len(value) != rows:
        raise _Damaged(f"its {name} {str(text)[:40]!r} is not a list of {rows} (one per embedding row)")
    return value


def _check_entry(vec: object, fi: object, bgs: object, numbers: Sequence[tuple[str, object]],
                 dim: int) -> tuple[int, tuple[int, ...], tuple[str | None, ...]]:
    """``(rows, frame_indices, backgrounds)`` of one stored entry, after every column agrees with the others;
    :class:`_Damaged` otherwise."""
    if not isinstance(vec, bytes):
        raise _Damaged(f"its embedding is {type(vec).__name__}, not a float32 BLOB")
    rows, extra = divmod(len(vec), 4 * dim)
    if rows == 0 or extra:
        raise _Damaged(f"its embedding blob is {len(vec)} bytes, not a whole number (>= 1) of {dim}-d float32 "
                       f"rows ({4 * dim} bytes each)")
    for name, v in numbers:
        if type(v) is not int or not 0 <= v <= _INT_MAX[name]:
            raise _Damaged(f"its {name} {str(v)[:40]!r} is not an integer in [0, {_INT_MAX[name]}]")
    if fi is None:  # not recorded
        frames: tuple[int, ...] = ()
    elif rows == 1 and fi == "[0]":  # most entries: one still image
        frames = (0,)
    else:
        found = _json_list(fi, "frame_indices", rows)
        if not all(type(x) is int and x >= 0 for x in found):
            raise _Damaged(f"its frame_indices {str(fi)[:40]!r} are not non-negative integers")
        frames = tuple(found)  # type: ignore[arg-type]
    if bgs is None or bgs == "":
        backgrounds: tuple[str | None, ...] = ()
    else:
        found = _json_list(bgs, "backgrounds", rows)
        if not all(b is None or isinstance(b, str) for b in found):
            raise _Damaged(f"its backgrounds {str(bgs)[:40]!r} are not colours")
        backgrounds = tuple(found)  # type: ignore[arg-type]
    return rows, frames, backgrounds


def _check_pdq(codes: object, quality: object, rows: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``(pdq (rows, 32) uint8, pdq_quality (rows,) int16)`` of a stored entry, both None when it has none;
    :class:`_Damaged` unless both blobs are there and hold one hash and one quality per embedding row."""
    if codes is None and quality is None:
        return None, None
    if not isinstance(codes, bytes) or not isinstance(quality, bytes):
        have = "pdq" if quality is None else "pdq_quality"
        if codes is not None and quality is not None:
            raise _Damaged(f"its PDQ hashes are {type(codes).__name__}/{type(quality).__name__}, not BLOBs")
        raise _Damaged(f"it has {have} without {'pdq_quality' if have == 'pdq' else 'pdq'}")
    if len(codes) != 32 * rows or len(quality) != 2 * rows:
        raise _Damaged(f"its PDQ blobs are {len(codes)} and {len(quality)} bytes, not {32 * rows} and {2 * rows} "
                       f"(one 32-byte hash and one int16 quality per embedding row)")
    q = np.frombuffer(quality, np.int16)
    if ((q < _PDQ_MIN_Q) | (q > _PDQ_MAX_Q)).any():
        raise _Damaged(f"its PDQ qualities {q[:4].tolist()} are not in [{_PDQ_MIN_Q}, {_PDQ_MAX_Q}]")
    return np.frombuffer(codes, np.uint8).reshape(rows, 32), q


def _check_times(stored: object, rows: int) -> tuple[tuple[float, ...], float | None, str | None]:
    """A stored entry's ``(frame times, duration_s, sampling text)`` (``()`` when no times were recorded);
    :class:`_Damaged` unless one finite number per embedding row (and a number and a text, or nulls, beside them)."""
    if stored is None or stored == "":
        return (), None, None
    try:
        value = json.loads(stored)  # type: ignore[arg-type]
    except (TypeError, ValueError, RecursionError):
        raise _Damaged(f"its times {str(stored)[:40]!r} are not JSON") from None
    if not isinstance(value, dict):
        raise _Damaged(f"its times {str(stored)[:40]!r} are not an object with t, duration_s and sampling")
    found, duration, text = value.get("t"), value.get("duration_s"), value.get("sampling")
    if not isinstance(found, list) or len(found) != rows:
        raise _Damaged(f"its times {str(stored)[:40]!r} are not a list of {rows} (one per embedding row)")
    numbers = [float(t) for t in found if type(t) in (int, float)]
    if len(numbers) != len(found) or not np.isfinite(numbers).all():
        raise _Damaged(f"its times {str(stored)[:40]!r} are not finite numbers")
    if duration is not None and (type(duration) not in (int, float) or not np.isfinite(duration)):
        raise _Damaged(f"its duration {str(duration)[:40]!r} is not a finite number")
    if text is not None and not isinstance(text, str):
        raise _Damaged(f"its sampling {str(text)[:40]!r} is not text")
    return tuple(numbers), None if duration is None else float(duration), text


def _times_json(it: CachedImage) -> str:
    """What the ``times`` column keeps of a clip: its frame times, duration and sampling in words."""
    return json.dumps({"t": [float(t) for t in it.times], "duration_s": it.duration_s,
                       "sampling": it.sampling_text}, allow_nan=False)


def _pdq_blobs(it: CachedImage) -> tuple[bytes | None, bytes | None]:
    """An entry's PDQ hashes as the two BLOBs stored (None, None: not recorded); :class:`DataError` when they are
    not one hash and one quality per embedding row."""
    if it.pdq is None and it.pdq_quality is None:
        return None, None
    rows = len(it.embeddings)
    codes = None if it.pdq is None else np.asarray(it.pdq)
    quality = None if it.pdq_quality is None else np.asarray(it.pdq_quality)
    if (codes is None or quality is None or codes.shape != (rows, 32) or quality.shape != (rows,)
            or codes.dtype != np.uint8 or not np.issubdtype(quality.dtype, np.integer)
            or ((quality < _PDQ_MIN_Q) | (quality > _PDQ_MAX_Q)).any()):
        raise DataError(f"PDQ hashes of {it.sha256} must be (F, 32) uint8 with (F,) integer qualities in "
                        f"[{_PDQ_MIN_Q}, {_PDQ_MAX_Q}] (F = {rows} embedding rows), or both None; got "
                        f"{None if codes is None else (codes.shape, str(codes.dtype))} and "
                        f"{None if quality is None else quality.shape}")
    return np.ascontiguousarray(codes).tobytes(), np.ascontiguousarray(quality, np.int16).tobytes()


def _unusable_rows(emb: np.ndarray, offsets: np.ndarray) -> dict[int, str]:
    """``{image: why}`` for the images (rows ``offsets[i]:offsets[i + 1]`` of ``emb``) with a row that is not a
    finite L2-normalised embedding: stored like that, the entry is damaged (safeclip never stores one)."""
    with np.errstate(over="ignore", invalid="ignore"):
        sq = np.einsum("ij,ij->i", emb, emb)
        # Outside the band (NaN compares False: outside too) only may be unusable: those rows are checked exactly.
        suspect = ~((sq >= (1 - NORM_TOLERANCE) ** 2) & (sq <= (1 + NORM_TOLERANCE) ** 2))
    out: dict[int, str] = {}
    if not suspect.any():
        return out
    rows = np.flatnonzero(suspect)
    problems = embedding_row_problems(emb[rows])
    for row, why in zip(rows, problems):
        if why is not None:
            i = int(np.searchsorted(offsets, row, side="right") - 1)
            out.setdefault(i, f"its embedding row {int(row - offsets[i])} {why}")
    return out


def _sha_text(sha: object) -> str:
    return sha.hex() if isinstance(sha, bytes) else str(sha)


def _rollback(con: sqlite3.Connection) -> None:
    # SQLite has already rolled back after some errors (disk full): ROLLBACK would then hide the real cause.
    if con.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            con.execute("ROLLBACK")


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
    backgrounds: list[tuple[str | None, ...]] = dataclasses.field(default_factory=list)  # per image, per row
    damaged: dict[int, str] = dataclasses.field(default_factory=dict)
    """Images of this chunk whose entry is damaged -> why. Each keeps its place with placeholder rows (the unit
    vector ``e0``: any scorer takes it; its decision is never used, callers make the image an error row) and zeros
    for its metadata."""
    pdq: np.ndarray | None = None  # (total frames, 32) uint8: each row's PDQ hash (zeros where none)
    pdq_quality: np.ndarray | None = None  # (total frames,) int16: its quality, NO_HASH where none was recorded
    clips: dict[int, tuple[tuple[float, ...], float | None, str | None]] = dataclasses.field(default_factory=dict)
    """The clips of this chunk: image -> (its frame times, duration_s, sampling in words)."""

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
        self.damaged = False
        self.damaged_entries: dict[str, str] = {}  # sha256 -> why, of the damaged entries lookups met (misses)
        self._moved: Path | None = None
        self._lock = threading.RLock()
        found = _trust.first_untrusted(Path(cache_dir), *(Path("embeddings") / (self.path.name + suffix)
                                                          for suffix in ("", "-wal", "-shm")))
        if found is not None:  # its embeddings decide: nobody else may have been able to write them
            raise CacheError(f"refusing the embedding cache {self.path}: {found[0]} {found[1]}, so its embeddings "
                             f"may not be the ones safeclip computed; {_trust.fix_for(*found)}")
        if not self.path.exists() and (readonly or not create):
            raise CacheError(
                f"no embedding cache for encoder {encoder_id!r} in {Path(cache_dir)} "
                f"(known there: {list_cached_encoders(cache_dir) or 'none'})")
        try:
            try:
                meta = self._open()
                dim = _dim(meta["dim"]) if "dim" in meta else None
            except (sqlite3.DatabaseError, _Damaged) as e:
                if readonly or not (isinstance(e, _Damaged) or is_damage(e)):
                    raise
                moved = self.quarantine()  # a dimension that is not one leaves no entry readable: damage too
                print(f"safeclip: the embedding cache {self.path} was damaged ({e}): moved aside to {moved.name}; "
                      "starting an empty one (files are embedded again as they are audited)", file=sys.stderr)
                self._moved = None
                meta, dim = self._open(), None
        except sqlite3.Error as e:
            self.damaged = is_damage(e)
            raise CacheError(self._problem("open", e)) from e
        except _Damaged as e:
            self._con.close()
            raise self._damaged_dim(e) from None
        self.dim: int | None = dim
        stored = meta.get("encoder_id")
        if stored is not None and stored != encoder_id:
            raise EncoderMismatchError(f"{self.path} holds embeddings of {stored!r}, not {encoder_id!r}")

    def _open(self) -> dict[str, str]:
        self._con = self._connect()
        try:
            cols = {r[1] for r in self._con.execute("PRAGMA table_info(images)").fetchall()}
            self._views = "decoder" in cols  # False: a schema 1 database opened read-only
            self._hashes = "pdq" in cols  # False: a schema 1 or 2 database opened read-only
            self._clips = "times" in cols  # False: a schema 1 to 3 database opened read-only
            return dict(self._con.execute("SELECT key, value FROM meta").fetchall())
        except BaseException:
            self._con.close()
            raise

    def _problem(self, what: str, e: sqlite3.Error) -> str:
        if is_damage(e):
            return (f"the embedding cache {self.path} is damaged ({e}); move it aside (or delete it) and run again: "
                    "an audit rebuilds it as files are audited again, and opening it for writing moves it aside "
                    "itself")
        if "full" in str(e).lower():
            return (f"cannot {what} the embedding cache {self.path}: {e}; free some space there, or give another "
                    "--cache")
        if "readonly" in str(e).lower() or "read-only" in str(e).lower() or "unable to open" in str(e).lower():
            return (f"cannot {what} the embedding cache {self.path}: {e}; give a --cache folder you can write to, "
                    "or --no-cache")
        return f"cannot {what} the embedding cache {self.path}: {e}"

    def _damaged_dim(self, e: _Damaged) -> CacheError:
        self.damaged = True
        return CacheError(f"the embedding cache {self.path} is damaged ({e}); move it aside (or delete it) and run "
                          "again: an audit rebuilds it as files are audited again, and opening it for writing moves "
                          "it aside itself")

    def quarantine(self) -> Path:
        """Move the (damaged) database aside to ``<name>.corrupt-<timestamp>``, with its WAL; returns the new path.
        This instance is closed; a new :class:`EmbeddingCache` starts an empty database."""
        with self._lock:
            if self._moved is not None:
                return self._moved
            with contextlib.suppress(Exception):
                self._con.close()
            stamp = time.strftime("%Y%m%dT%H%M%S")
            dest = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
            for suffix in ("", "-wal", "-shm"):
                src = Path(str(self.path) + suffix)
                with contextlib.suppress(FileNotFoundError):
                    os.replace(src, Path(str(dest) + suffix))
            self._moved = dest
            return dest

    def _connect(self) -> sqlite3.Connection:
        if self.readonly:
            con = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=_BUSY_TIMEOUT_MS / 1000,
                                  check_same_thread=False, isolation_level=None)
            con.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            return con
        _trust.make_dirs(self.path.parent)
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
                "n_frames INTEGER, nbytes INTEGER, format TEXT, frame_indices TEXT, vec BLOB NOT NULL, "
                "decoder INTEGER, backgrounds TEXT, pdq BLOB, pdq_quality BLOB, times TEXT, sampling TEXT)")
            cols = {r[1] for r in con.execute("PRAGMA table_info(images)").fetchall()}
            if "decoder" not in cols:  # schema 1: every entry predates per-background views
                con.execute("ALTER TABLE images ADD COLUMN decoder INTEGER")
                con.execute("ALTER TABLE images ADD COLUMN backgrounds TEXT")
                con.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (_SCHEMA_VERSION,))
                print(f"safeclip: upgraded the embedding cache {self.path} to schema {_SCHEMA_VERSION}: entries of "
                      f"formats other than {', '.join(_OPAQUE_FORMATS)} made before the decoder judged transparency "
                      "on several backgrounds are embedded again when next seen", file=sys.stderr)
            if "pdq" not in cols:  # schema 1 or 2: no entry has PDQ hashes yet (both columns NULL)
                con.execute("ALTER TABLE images ADD COLUMN pdq BLOB")
                con.execute("ALTER TABLE images ADD COLUMN pdq_quality BLOB")
                con.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (_SCHEMA_VERSION,))
                if "decoder" in cols:  # (a schema 1 file said so above already)
                    print(f"safeclip: upgraded the embedding cache {self.path} to schema {_SCHEMA_VERSION}: its "
                          "entries keep their embeddings; their PDQ hashes are computed when the files are next "
                          "decoded (an audit whose policy matches PDQ banks decodes them again)", file=sys.stderr)
            if "times" not in cols:  # schema 1 to 3: no entry is a clip with times (both columns NULL)
                con.execute("ALTER TABLE images ADD COLUMN times TEXT")
                con.execute("ALTER TABLE images ADD COLUMN sampling TEXT")
                con.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (_SCHEMA_VERSION,))
            con.execute(
                "CREATE TABLE IF NOT EXISTS decode_errors (sha BLOB NOT NULL, fingerprint TEXT NOT NULL, "
                "kind TEXT NOT NULL, message TEXT NOT NULL, PRIMARY KEY (sha, fingerprint)) WITHOUT ROWID")
            con.execute("INSERT OR IGNORE INTO meta VALUES ('encoder_id', ?)", (self.encoder_id,))
            con.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (_SCHEMA_VERSION,))
            con.execute("COMMIT")
        except BaseException:
            _rollback(con)
            con.close()
            raise
        return con

    @contextlib.contextmanager
    def _locked(self, what: str) -> Iterator[None]:
        """This instance's lock; SQLite's errors (corrupt file, disk full, read-only folder) as a CacheError."""
        with self._lock:
            try:
                yield
            except sqlite3.Error as e:
                if is_damage(e) and not self.readonly and self._moved is None:
                    self.damaged = True
                    moved = self.quarantine()
                    raise CacheError(f"the embedding cache {self.path} is damaged ({e}): moved aside to {moved.name}; "
                                     "run the same command again (a new cache is built as files are embedded "
                                     "again)") from e
                self.damaged = self.damaged or is_damage(e)
                raise CacheError(self._problem(what, e)) from e

    # ------------------------------------------------------------------------------------------------ reads
    def __len__(self) -> int:
        with self._locked("read"):
            return int(self._con.execute("SELECT count(*) FROM images").fetchone()[0])

    def get_many(self, shas: Iterable[str], *, sampling: str | None = None) -> dict[str, CachedImage]:
        """The cached entries among ``shas`` (hex sha256), in one indexed query per 900 keys. A damaged entry is a
        miss (recorded in :attr:`damaged_entries`), and a writable instance removes it. ``sampling``: a clip's entry
        is found only when it was decoded under these sampling settings (``None``: whatever it was)."""
        keys = list(dict.fromkeys(shas))
        found: list[tuple[str, bytes, int, tuple[int, ...], tuple[str | None, ...], tuple[int, ...], str,
                          tuple[np.ndarray | None, np.ndarray | None],
                          tuple[tuple[float, ...], float | None, str | None], str | None]] = []
        same = " AND (sampling IS NULL OR sampling = ?)" if sampling is not None and self._clips else ""
        damaged: list[tuple[bytes, object, str]] = []
        with self._locked("read"):
            if self.dim is None:
                self._refresh_dim()
            for i in range(0, len(keys), _IN_CHUNK):
                chunk = [bytes.fromhex(k) for k in keys[i:i + _IN_CHUNK]]
                rows = self._con.execute(
                    f"SELECT sha, width, height, n_frames, nbytes, format, frame_indices, vec, {self._bg_col}, "
                    f"{self._pdq_cols}, {self._clip_cols} FROM images WHERE sha IN ({','.join('?' * len(chunk))}) "
                    f"AND {self._valid}{same}", [*chunk, sampling] if same else chunk).fetchall()
                for sha, w, h, nf, nb, fmt, fi, vec, bgs, pdq, pdq_q, times, samp in rows:
                    try:
                        if self.dim is None:  # entries but no dimension: nothing says how to split them
                            raise _Damaged("the database records no embedding dimension")
                        n, frames, backgrounds = _check_entry(
                            vec, fi, bgs, (("width", w), ("height", h), ("n_frames", nf), ("nbytes", nb)), self.dim)
                        hashes = _check_pdq(pdq, pdq_q, n)
                        clip = _check_times(times, n)
                    except _Damaged as e:
                        damaged.append((sha, vec, str(e)))
                        continue
                    found.append((sha.hex(), vec, n, frames, backgrounds, (w, h, nf, nb), str(fmt), hashes, clip,
                                  None if samp is None else str(samp)))  # clip: (times, duration_s, text)
            out: dict[str, CachedImage] = {}
            if found:
                emb = np.frombuffer(b"".join(f[1] for f in found), np.float32).reshape(-1, self.dim)
                offsets = np.zeros(len(found) + 1, np.int64)
                np.cumsum([f[2] for f in found], out=offsets[1:])
                unusable = _unusable_rows(emb, offsets)
                for k, (key, vec, _, frames, backgrounds, (w, h, nf, nb), fmt, hashes, clip, samp) in enumerate(
                        found):
                    if k in unusable:
                        damaged.append((bytes.fromhex(key), vec, unusable[k]))
                    else:
                        out[key] = CachedImage(key, emb[offsets[k]:offsets[k + 1]], frames, w, h, nf, nb, fmt,
                                               backgrounds, *hashes, times=clip[0], sampling=samp,
                                               duration_s=clip[1], sampling_text=clip[2])
            self.hits += len(out)
            self.misses += len(keys) - len(out)
            if damaged:
                self._drop_damaged(damaged)
        return out

    def _drop_damaged(self, damaged: Sequence[tuple[bytes, object, str]]) -> None:
        """Record damaged entries; a writable instance removes them (each only while it is still the damaged one:
        another process may have replaced it meanwhile), with one line on stderr."""
        self.damaged_entries.update((sha.hex(), why) for sha, _, why in damaged)
        if self.readonly:
            return
        self._con.execute("BEGIN IMMEDIATE")
        try:
            self._con.executemany("DELETE FROM images WHERE sha = ? AND vec IS ?", [(s, v) for s, v, _ in damaged])
            self._con.execute("COMMIT")
        except BaseException:
            _rollback(self._con)
            raise
        sha, _, why = damaged[0]
        print(f"safeclip: removed {len(damaged)} damaged entr{'y' if len(damaged) == 1 else 'ies'} from the "
              f"embedding cache {self.path} (first: {sha.hex()[:16]}..., {why}); those files are embedded again",
              file=sys.stderr)

    @property
    def _valid(self) -> str:
        return _VALID if self._views else f"format IN {_OPAQUE_FORMATS!r}"

    @property
    def _bg_col(self) -> str:
        return "backgrounds" if self._views else "NULL"

    @property
    def _pdq_cols(self) -> str:
        return "pdq, pdq_quality" if self._hashes else "NULL, NULL"

    @property
    def _clip_cols(self) -> str:
        return "times, sampling" if self._clips else "NULL, NULL"

    def get(self, sha256: str) -> CachedImage | None:
        """One entry, or None."""
        return self.get_many([sha256]).get(sha256)

    def _refresh_dim(self) -> None:
        row = self._con.execute("SELECT value FROM meta WHERE key = 'dim'").fetchone()
        if row is not None:
            self.dim = self._checked_dim(row[0])

    def _checked_dim(self, value: object) -> int:
        try:
            return _dim(value)
        except _Damaged as e:
            raise self._damaged_dim(e) from None

    def scan(self, chunk_rows: int = 65536) -> Iterator[CacheChunk]:
        """Every entry, in insertion order, as :class:`CacheChunk` s of up to ``chunk_rows`` images; a damaged entry
        keeps its place with a placeholder row and its reason in :attr:`CacheChunk.damaged`."""
        with self._locked("read"):
            self._refresh_dim()
            if self.dim is None:
                return
            dim = self.dim
            # A private read transaction: one consistent snapshot even while another process writes.
            con = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=_BUSY_TIMEOUT_MS / 1000)
        placeholder_row = np.zeros((1, dim), np.float32)
        placeholder_row[0, 0] = 1.0  # a unit vector: a scorer accepts it, and its decision is never used
        placeholder = placeholder_row.tobytes()
        no_code, no_quality = bytes(32), np.array([NO_HASH], np.int16).tobytes()
        bg = self._bg_col
        # SQLite tells the common entry (one well-formed row, opaque, integer metadata, one hash or none) apart in
        # C; only the others are checked one by one in Python.
        hashes = ("((pdq IS NULL AND pdq_quality IS NULL) OR (typeof(pdq) = 'blob' AND length(pdq) = 32 AND "
                  "typeof(pdq_quality) = 'blob' AND length(pdq_quality) = 2))" if self._hashes else "1")
        plain = (f"typeof(sha) = 'blob' AND length(sha) = 32 AND typeof(vec) = 'blob' AND length(vec) = {4 * dim} "
                 f"AND frame_indices = '[0]' AND {bg} IS NULL AND {hashes} AND "
                 + " AND ".join(f"typeof({c}) = 'integer' AND {c} BETWEEN 0 AND {_INT_MAX[c]}" for c in _INT_MAX))
        try:
            cur = con.execute(f"SELECT sha, width, height, n_frames, nbytes, vec, {bg}, frame_indices, {plain}, "
                              f"{self._pdq_cols}, {self._clip_cols} FROM images WHERE {self._valid} ORDER BY rowid")
            while True:
                rows = cur.fetchmany(chunk_rows)
                if not rows:
                    break
                n = len(rows)
                damaged: dict[int, str] = {}
                backgrounds: list[tuple[str | None, ...]] = [()] * n
                if all(r[8] for r in rows):  # the common chunk: every entry plain (r[8])
                    blobs = [r[5] for r in rows]
                    counts = np.ones(n, np.int64)
                    cols = np.array([np.fromiter((r[c] for r in rows), np.int64, n) for c in range(1, 5)])
                    codes = [no_code if r[9] is None else r[9] for r in rows]
                    quality = [no_quality if r[10] is None else r[10] for r in rows]
                else:
                    blobs, meta, codes, quality = [], [], [], []
                    counts = np.ones(n, np.int64)
                    for k, (sha, w, h, nf, nb, vec, bgs, fi, is_plain, pdq, pdq_q, *_) in enumerate(rows):
                        try:
                            if not is_plain:
                                if not isinstance(sha, bytes) or len(sha) != 32:
                                    raise _Damaged(f"its key {_sha_text(sha)[:70]!r} is not a sha256")
                                counts[k], _, backgrounds[k] = _check_entry(
                                    vec, fi, bgs, (("width", w), ("height", h), ("n_frames", nf), ("nbytes", nb)),
                                    dim)
                                pdq, pdq_q = _check_pdq(pdq, pdq_q, int(counts[k]))
                                pdq = None if pdq is None else pdq.tobytes()
                                pdq_q = None if pdq_q is None else pdq_q.tobytes()
                        except _Damaged as e:
                            damaged[k] = str(e)
                            counts[k] = 1
                            vec, w, h, nf, nb, pdq, pdq_q = placeholder, 0, 0, 0, 0, None, None
                            backgrounds[k] = ()
                        blobs.append(vec)
                        meta.append((w, h, nf, nb))
                        codes.append(no_code * int(counts[k]) if pdq is None else pdq)
                        quality.append(no_quality * int(counts[k]) if pdq_q is None else pdq_q)
                    cols = np.array(meta, np.int64).T.copy()
                clips: dict[int, tuple[tuple[float, ...], float | None, str | None]] = {}
                for k, r in enumerate(rows):
                    if r[11] is not None and k not in damaged:
                        try:
                            clips[k] = _check_times(r[11], int(counts[k]))
                        except _Damaged as e:
                            damaged[k] = str(e)
                offsets = np.zeros(n + 1, np.int64)
                np.cumsum(counts, out=offsets[1:])
                emb = np.frombuffer(b"".join(blobs), np.float32).reshape(-1, dim)
                pdq_rows = np.frombuffer(b"".join(codes), np.uint8).reshape(-1, 32)
                pdq_quality = np.frombuffer(b"".join(quality), np.int16)
                unusable = _unusable_rows(emb, offsets)
                for row in np.flatnonzero((pdq_quality < _PDQ_MIN_Q) | (pdq_quality > _PDQ_MAX_Q)):
                    k = int(np.searchsorted(offsets, row, side="right") - 1)
                    unusable.setdefault(k, f"its PDQ quality {int(pdq_quality[row])} is not in "
                                           f"[{_PDQ_MIN_Q}, {_PDQ_MAX_Q}]")
                if unusable:
                    emb, pdq_rows, pdq_quality = emb.copy(), pdq_rows.copy(), pdq_quality.copy()
                    for k in unusable:
                        emb[offsets[k]:offsets[k + 1]] = placeholder_row
                        pdq_rows[offsets[k]:offsets[k + 1]] = 0
                        pdq_quality[offsets[k]:offsets[k + 1]] = NO_HASH
                        cols[:, k] = 0
                        backgrounds[k] = ()
                    damaged.update(unusable)
                yield CacheChunk(
                    sha256=[r[0].hex() if r[8] else _sha_text(r[0]) for r in rows], embeddings=emb, offsets=offsets,
                    width=cols[0], height=cols[1], n_frames=cols[2], nbytes=cols[3], backgrounds=backgrounds,
                    damaged=damaged, pdq=pdq_rows, pdq_quality=pdq_quality,
                    clips={k: c for k, c in clips.items() if k not in damaged},
                )
        except sqlite3.Error as e:
            self.damaged = self.damaged or is_damage(e)
            raise CacheError(self._problem("read", e)) from e
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
            for name in ("frame_indices", "backgrounds", "times"):  # one per embedding row, or none recorded
                if len(getattr(it, name)) not in (0, len(it.embeddings)):
                    raise DataError(f"{name} of {it.sha256} must give one item per embedding row "
                                    f"({len(it.embeddings)}), got {len(getattr(it, name))}")
            if it.times and not np.isfinite(np.asarray(it.times, np.float64)).all():
                raise DataError(f"times of {it.sha256} must be finite seconds, got {list(it.times)[:4]}")
            if it.times and it.duration_s is not None and not np.isfinite(it.duration_s):
                raise DataError(f"duration_s of {it.sha256} must be finite seconds or None, got {it.duration_s}")
        rows = [(bytes.fromhex(it.sha256), int(it.width), int(it.height), int(it.n_frames), int(it.nbytes),
                 str(it.format), json.dumps(list(it.frame_indices)),
                 np.ascontiguousarray(it.embeddings, np.float32).tobytes(), DECODER_VERSION,
                 json.dumps(list(it.backgrounds)) if any(it.backgrounds) else None, *_pdq_blobs(it),
                 _times_json(it) if it.times else None,
                 it.sampling if it.times else None) for it in items]
        with self._locked("write to"):
            con = self._con
            con.execute("BEGIN IMMEDIATE")
            try:
                row = con.execute("SELECT value FROM meta WHERE key = 'dim'").fetchone()
                if row is None:
                    con.execute("INSERT INTO meta VALUES ('dim', ?)", (str(dim),))
                elif self._checked_dim(row[0]) != dim:
                    raise EncoderMismatchError(
                        f"{self.path} holds {row[0]}-d embeddings of {self.encoder_id!r}; refusing {dim}-d ones")
                self._drop_damaged_among([r[0] for r in rows], dim)
                before = con.total_changes
                # Present entries are kept, except those of a decoder before per-background views, and those
                # without PDQ hashes, which the same decoder's entry completes (its views are the same).
                con.executemany(
                    "INSERT INTO images (sha, width, height, n_frames, nbytes, format, frame_indices, vec, decoder, "
                    "backgrounds, pdq, pdq_quality, times, sampling) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (sha) DO "
                    "UPDATE SET width = excluded.width, height = excluded.height, n_frames = excluded.n_frames, "
                    "nbytes = excluded.nbytes, format = excluded.format, frame_indices = excluded.frame_indices, "
                    "vec = excluded.vec, decoder = excluded.decoder, backgrounds = excluded.backgrounds, "
                    "pdq = excluded.pdq, pdq_quality = excluded.pdq_quality, times = excluded.times, "
                    "sampling = excluded.sampling "
                    "WHERE images.decoder IS NULL OR images.decoder < excluded.decoder OR "
                    "(images.pdq IS NULL AND excluded.pdq IS NOT NULL AND images.decoder = excluded.decoder) OR "
                    "(excluded.times IS NOT NULL AND images.sampling IS NOT excluded.sampling)", rows)
                added = con.total_changes - before
                con.execute("COMMIT")
            except BaseException:
                _rollback(con)
                raise
            self.dim = dim
            self.written += added
        return added

    def _drop_damaged_among(self, keys: Sequence[bytes], dim: int) -> None:
        """Delete the damaged entries among ``keys`` (inside the caller's write transaction), so that the entries
        being written replace them instead of being refused as present."""
        for i in range(0, len(keys), _IN_CHUNK):
            chunk = keys[i:i + _IN_CHUNK]
            present = self._con.execute(
                "SELECT sha, width, height, n_frames, nbytes, frame_indices, vec, "
                f"{self._bg_col}, {self._pdq_cols}, {self._clip_cols} FROM images WHERE sha IN "
                f"({','.join('?' * len(chunk))})", chunk).fetchall()
            for sha, w, h, nf, nb, fi, vec, bgs, pdq, pdq_q, times, _ in present:
                try:
                    n, _, _ = _check_entry(vec, fi, bgs, (("width", w), ("height", h), ("n_frames", nf),
                                                          ("nbytes", nb)), dim)
                    _check_pdq(pdq, pdq_q, n)
                    _check_times(times, n)
                    ok = not _unusable_rows(np.frombuffer(vec, np.float32).reshape(-1, dim), np.array([0, n]))
                except _Damaged:
                    ok = False
                if not ok:
                    self._con.execute("DELETE FROM images WHERE sha = ?", (sha,))

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
                _rollback(self._con)
                raise

    def discard(self, shas: Iterable[str]) -> None:
        """Remove entries (embeddings found unusable: non-finite or not normalised), so they are embedded again."""
        keys = [bytes.fromhex(k) for k in dict.fromkeys(shas)]
        if not keys or self.readonly:
            return
        with self._locked("write to"):
            self._con.execute("BEGIN IMMEDIATE")
            try:
                for i in range(0, len(keys), _IN_CHUNK):
                    chunk = keys[i:i + _IN_CHUNK]
                    self._con.execute(f"DELETE FROM images WHERE sha IN ({','.join('?' * len(chunk))})", chunk)
                self._con.execute("COMMIT")
            except BaseException:
                _rollback(self._con)
                raise

    def checkpoint(self) -> None:
        """Fold the write-ahead log into the database file, so that later scans read one contiguous file."""
        if self.readonly:
            return
        with self._lock:
            try:
                self._con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass  # a reader holds an old snapshot (SQLite checkpoints later), or the file was moved aside

    def close(self) -> None:
        with self._lock:
            self._con.close()

    def __enter__(self) -> EmbeddingCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EmbeddingCache({str(self.path)!r}, encoder_id={self.encoder_id!r})"
