"""A bank on disk: a folder holding a SQLite manifest of entries and an append-only file of rows.

Layout of a bank folder::

    bank.sqlite   what the bank is (kind, encoder_id, dimension) and its entries: id, label, source, added time,
                  quality (PDQ), content sha256, which rows are theirs, enabled/removed, quarantine confirmation
    rows.bin      the rows, appended only: 32 bytes per PDQ hash, 4*D bytes per float32 embedding
    index/        search indexes over committed rows (derived data: rebuilt when missing or damaged)
    hits.sqlite   which distinct inputs each entry matched, and when (flood quarantine)
    .lock         taken by writers, so that adds are serial

Crash safety: an add appends its rows to ``rows.bin`` and fsyncs them *before* the SQLite transaction that names
them commits. A ``kill -9`` between the two leaves rows nobody names; the next writer cuts them off. Readers only
ever look at rows a committed entry names, so they keep matching while a writer adds. Every change bumps a sequence
number in the manifest; a reader's :meth:`Bank.refresh` reads only what changed since it last looked.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..bankmeta import BANK_KINDS, DB, FORMAT, FORMAT_VERSION, PDQ_BYTES, ROWS, connect
from ..errors import BankError
from ..files import fsync_dir, locked_file, write_json_atomic
from ._index import HammingIndex, VectorIndex

__all__ = ["Bank", "BankEntry", "NewEntry"]


_INDEX = "index"
_LOCK = ".lock"

# Rows not yet in an index are searched exactly; past this many a new index segment is built over them. More than
# _MAX_SEGMENTS segments are merged into one (the cost of a rebuild stays proportional to what was added).
TAIL_ROWS = {"pdq": 16384, "embedding": 4096}
_MAX_SEGMENTS = 4

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    n INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    label TEXT NOT NULL DEFAULT '',
    source TEXT NOT NULL DEFAULT '',
    added REAL NOT NULL,
    row0 INTEGER NOT NULL,
    nrows INTEGER NOT NULL,
    quality INTEGER,
    sha256 TEXT,
    enabled INTEGER NOT NULL DEFAULT 1,
    removed INTEGER NOT NULL DEFAULT 0,
    confirmed REAL,
    changed INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_changed ON entries (changed);
CREATE INDEX IF NOT EXISTS entries_sha ON entries (sha256);
"""


@dataclass(frozen=True)
class BankEntry:
    """One entry of a bank: an image known by its hash or embedding (several rows: a PDQ hash's dihedral variants)."""

    id: str
    label: str
    source: str
    added: float
    enabled: bool
    quality: int | None = None
    sha256: str | None = None
    confirmed: float | None = None  # when a person confirmed it after a flood quarantine
    rows: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "label": self.label, "source": self.source,
                "added": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.added)), "enabled": self.enabled,
                "quality": self.quality, "sha256": self.sha256, "confirmed": self.confirmed is not None,
                "rows": self.rows}


@dataclass(frozen=True)
class NewEntry:
    """What :meth:`Bank.add` takes per entry besides its rows."""

    id: str
    label: str = ""
    source: str = ""
    quality: int | None = None
    sha256: str | None = None
    nrows: int = 1


class _Segment:
    """An index over some committed rows (``rows``: their numbers), searched with the index's own positions."""

    def __init__(self, name: str, rows: np.ndarray, index: Any):
        self.name, self.rows, self.index = name, rows, index
        self.inactive: tuple[np.ndarray | None, int] | None = None  # (the tail it was counted with, the count)


class Bank:
    """The bank folder at ``path``: create with :meth:`create`, open with :meth:`open`.

    Readers (``writable=False``) never write the manifest or the rows; they record flood hits in ``hits.sqlite``
    when they can write it and in memory otherwise. Thread-safe: one lock guards the in-memory view.
    """

    def __init__(self, path: Path, con: sqlite3.Connection, meta: dict[str, str], writable: bool):
        self.path = path
        self._con = con
        self.meta = meta
        self.writable = writable
        self.kind: str = meta["kind"]
        self.name: str = meta.get("name") or path.name
        self.encoder_id: str | None = meta.get("encoder_id") or None
        self.dim = int(meta["dim"])
        self.dihedral = meta.get("dihedral") == "1"
        self.row_bytes = PDQ_BYTES if self.kind == "pdq" else 4 * self.dim
        self._lock = threading.RLock()
        self._seq = -1
        self._n_rows = 0
        self._data: np.ndarray = self._empty()
        self._row_entry = np.zeros(0, np.int64)  # row -> entry number n
        self._active = np.zeros(0, bool)
        self._enabled = True
        self._segments: list[_Segment] = []
        self._index_stamp: tuple[float, int] | None = None
        self._tail_cache: np.ndarray | None = None
        self.refresh(force=True)

    # ---- opening -------------------------------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike[str], kind: str, *, dim: int | None = None, encoder_id: str | None = None,
               dihedral: bool = False, name: str | None = None, description: str = "") -> Bank:
        """Create an empty bank folder (refused when ``path`` holds anything)."""
        p = Path(path)
        if kind not in BANK_KINDS:
            raise BankError(f"{p}: a bank's kind is one of {', '.join(BANK_KINDS)}, not {kind!r}")
        if kind == "embedding":
            if not encoder_id:
                raise BankError(f"{p}: an embedding bank needs the encoder_id of its embeddings (one space per bank)")
            if not isinstance(dim, int) or dim < 1:
                raise BankError(f"{p}: an embedding bank needs its embedding dimension, got {dim!r}")
        elif dihedral not in (True, False):
            raise BankError(f"{p}: dihedral must be true or false")
        if p.exists() and (not p.is_dir() or any(p.iterdir())):
            raise BankError(f"{p}: already exists and is not an empty folder; choose a new folder for the bank")
        p.mkdir(parents=True, exist_ok=True)
        tmp = p / (DB + ".new")
        con = sqlite3.connect(tmp)
        try:
            con.executescript(_SCHEMA)
            meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "kind": kind,
                    "name": name or p.resolve().name, "description": description,
                    "encoder_id": encoder_id or "", "dim": str(dim if kind == "embedding" else PDQ_BYTES * 8),
                    "dihedral": "1" if (kind == "pdq" and dihedral) else "0", "created": str(time.time()),
                    "enabled": "1", "seq": "0"}
            con.executemany("INSERT INTO meta VALUES (?, ?)", sorted(meta.items()))
            con.commit()
        finally:
            con.close()
        (p / ROWS).touch()
        os.replace(tmp, p / DB)
        fsync_dir(p)
        return cls.open(p, writable=True)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, writable: bool = False) -> Bank:
        """Open the bank folder at ``path``; :class:`~safeclip.errors.BankError` names what is wrong."""
        p = Path(path)
        con, meta = connect(p, writable)
        return cls(p, con, meta, writable)

    def close(self) -> None:
        with self._lock:
            self._con.close()
            self._segments = []
            self._data = self._empty()

    def __enter__(self) -> Bank:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Bank({str(self.path)!r}, kind={self.kind!r}, rows={self._n_rows})"

    # ---- reading -------------------------------------------------------------------------------------------------

    def _empty(self) -> np.ndarray:
        return np.zeros((0, PDQ_BYTES), np.uint8) if self.kind == "pdq" else np.zeros((0, self.dim), np.float32)

    @property
    def enabled(self) -> bool:
        return self._enabled

    @property
    def n_rows(self) -> int:
        return self._n_rows

    @property
    def data(self) -> np.ndarray:
        """The committed rows: ``(R, 32)`` uint8 hashes or ``(R, D)`` float32 embeddings (memory-mapped)."""
        return self._data

    def active_rows(self) -> np.ndarray:
        """``(R,)`` bool: rows of enabled, not removed entries."""
        return self._active

    def refresh(self, *, force: bool = False) -> bool:
        """Pick up what writers committed since the last look (new, disabled, enabled, removed entries; a new index).
        Cheap when nothing changed: one read of the manifest's sequence number. Returns whether anything did."""
        with self._lock:
            try:
                meta = dict(self._con.execute("SELECT key, value FROM meta WHERE key IN ('seq', 'enabled')"))
            except sqlite3.Error as e:
                raise BankError(f"{self.path}: the bank manifest cannot be read ({e})") from e
            seq = int(meta.get("seq", "0"))
            changed = seq != self._seq
            if changed:
                self._enabled = meta.get("enabled", "1") == "1"
                since = self._load_state(seq) if self._seq < 0 else self._seq
                self._read_changes(since)
                self._seq = seq
            if self._load_index() or changed:
                return True
            return False

    def _read_changes(self, since: int) -> None:
        cur = self._con.execute(
            "SELECT n, row0, nrows, enabled = 1 AND removed = 0 FROM entries WHERE changed > ?",
            (since,))
        parts = []
        while True:
            chunk = cur.fetchmany(262144)
            if not chunk:
                break
            parts.append(np.array(chunk, np.int64).reshape(-1, 4))
        if not parts:
            return
        a = np.concatenate(parts)
        n_rows = max(self._n_rows, int((a[:, 1] + a[:, 2]).max()))
        if n_rows > self._n_rows:
            self._map_rows(n_rows)
            grow = n_rows - len(self._row_entry)
            self._row_entry = np.concatenate([self._row_entry, np.full(grow, -1, np.int64)])
            self._active = np.concatenate([self._active, np.zeros(grow, bool)])
        idx = np.repeat(a[:, 1], a[:, 2]) + _ranges(a[:, 2])
        self._row_entry[idx] = np.repeat(a[:, 0], a[:, 2])
        self._active[idx] = np.repeat(a[:, 3].astype(bool), a[:, 2])
        self._tail_cache = None

    def _load_state(self, seq: int) -> int:
        """A first look starts from the row -> entry map the last index build saved (``index/state.npz``, derived
        data, checked against the manifest); only entries changed since are read. Returns the sequence number it
        holds (-1: none usable, read everything)."""
        path = self.path / _INDEX / "state.npz"
        try:
            with np.load(path, allow_pickle=False) as z:
                at, entries, active = int(z["seq"]), z["entries"], z["active"]
            if not (0 <= at <= seq and entries.ndim == 1 and entries.dtype == np.int64 and active.dtype == bool
                    and active.shape == entries.shape):
                return -1
            self._map_rows(len(entries))
            self._row_entry, self._active = entries, active
            return at
        except (OSError, ValueError, KeyError, BankError):
            self._row_entry, self._active = np.zeros(0, np.int64), np.zeros(0, bool)
            self._n_rows, self._data = 0, self._empty()
            return -1

    def _map_rows(self, n_rows: int) -> None:
        path = self.path / ROWS
        size = path.stat().st_size
        need = n_rows * self.row_bytes
        if size < need:
            raise BankError(
                f"{self.path}: {ROWS} holds {size // self.row_bytes} rows but the bank lists {n_rows}: the file was "
                "truncated or damaged; restore the bank folder from a copy (or export what is left and re-import)")
        shape = (n_rows, PDQ_BYTES) if self.kind == "pdq" else (n_rows, self.dim)
        dtype = np.uint8 if self.kind == "pdq" else np.float32
        self._data = np.memmap(path, dtype=dtype, mode="r", shape=shape) if n_rows else self._empty()
        self._n_rows = n_rows

    def entry_numbers(self, rows: np.ndarray) -> np.ndarray:
        """The entry number of each row."""
        return self._row_entry[np.asarray(rows, np.int64)]

    def entries_by_number(self, numbers: Sequence[int]) -> dict[int, BankEntry]:
        """Entries by their internal numbers (what a match finds), read from the manifest."""
        out: dict[int, BankEntry] = {}
        nums = sorted({int(n) for n in numbers})
        with self._lock:
            for i in range(0, len(nums), 900):
                part = nums[i:i + 900]
                q = ",".join("?" * len(part))
                for r in self._con.execute(f"SELECT n, {_ENTRY_COLS} FROM entries WHERE n IN ({q})", part):
                    out[int(r[0])] = _entry(r[1:])
        return out

    def entries(self, *, include_disabled: bool = True) -> Iterator[BankEntry]:
        """Every entry that was not removed, in the order they were added."""
        with self._lock:
            rows = self._con.execute(
                f"SELECT {_ENTRY_COLS} FROM entries WHERE removed = 0"
                + ("" if include_disabled else " AND enabled = 1") + " ORDER BY n").fetchall()
        for r in rows:
            yield _entry(r)

    def entry(self, entry_id: str) -> BankEntry | None:
        with self._lock:
            r = self._con.execute(f"SELECT {_ENTRY_COLS} FROM entries WHERE id = ? AND removed = 0",
                                  (entry_id,)).fetchone()
        return None if r is None else _entry(r)

    def entry_rows(self, entry_id: str) -> np.ndarray:
        """The rows (hashes or embeddings) of one entry."""
        with self._lock:
            r = self._con.execute("SELECT row0, nrows FROM entries WHERE id = ? AND removed = 0",
                                  (entry_id,)).fetchone()
        if r is None:
            raise BankError(f"{self.path}: no entry {entry_id!r}")
        return np.asarray(self._data[r[0]:r[0] + r[1]])

    def __len__(self) -> int:
        with self._lock:
            return int(self._con.execute("SELECT count(*) FROM entries WHERE removed = 0").fetchone()[0])

    def counts(self) -> dict[str, int]:
        with self._lock:
            total, enabled = self._con.execute(
                "SELECT count(*), coalesce(sum(enabled), 0) FROM entries WHERE removed = 0").fetchone()
        return {"entries": int(total), "enabled": int(enabled), "disabled": int(total) - int(enabled),
                "rows": self._n_rows}

    # ---- searching -----------------------------------------------------------------------------------------------

    def _load_index(self) -> bool:
        """(Re)load the index segments when the pointer file changed. Damaged or missing segments are dropped (their
        rows are then searched exactly) and rebuilt by the next writer."""
        pointer = self.path / _INDEX / "current.json"
        try:
            st = pointer.stat()
            stamp: tuple[float, int] | None = (st.st_mtime, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp == self._index_stamp:
            return False
        self._index_stamp = stamp
        segments: list[_Segment] = []
        if stamp is not None:
            try:
                spec = json.loads(pointer.read_text())
                for seg in spec["segments"]:
                    folder = self.path / _INDEX / seg
                    rows = np.load(folder / "rows.npy", mmap_mode="r", allow_pickle=False)
                    if rows.ndim != 1 or (len(rows) and (int(rows.max()) >= self._n_rows or int(rows.min()) < 0)):
                        raise ValueError(f"segment {seg} names rows the bank does not hold")
                    sub = self._rows_of(np.asarray(rows))
                    cls = HammingIndex if self.kind == "pdq" else VectorIndex
                    segments.append(_Segment(seg, np.asarray(rows, np.int64), cls.load(folder, sub)))
            except Exception as e:  # derived data: searched exactly instead, and rebuilt by a writer
                _warn(f"{self.path}: its search index is damaged ({str(e)[:200]}); searching exactly until "
                      "`safeclip bank index` or the next add rebuilds it")
                segments = []
        self._segments = segments
        self._tail_cache = None
        return True

    def _inactive(self, seg: _Segment) -> int:
        """How many of a segment's rows are disabled or removed (a search asks for that many more neighbours);
        counted once per change, like the tail."""
        if self._tail_cache is None or seg.inactive is None or seg.inactive[0] is not self._tail_cache:
            self._tail()
            seg.inactive = (self._tail_cache, int(len(seg.rows) - self._active[seg.rows].sum()))
        return seg.inactive[1]

    def _rows_of(self, rows: np.ndarray) -> np.ndarray:
        """The data of ``rows``: a view of the memory map when they are one run (a segment over consecutive rows,
        the usual case: nothing is copied or read ahead), else a copy."""
        if not len(rows):
            return self._empty()
        a, b = int(rows[0]), int(rows[-1]) + 1
        if b - a == len(rows) and (len(rows) < 2 or bool((np.diff(rows) == 1).all())):
            return self._data[a:b]
        return np.asarray(self._data[rows])

    def _tail(self) -> np.ndarray:
        """Active rows no index segment covers (searched exactly); computed once per change."""
        if self._tail_cache is None:
            covered = np.zeros(self._n_rows, bool)
            for s in self._segments:
                covered[s.rows] = True
            self._tail_cache = np.flatnonzero(~covered & self._active)
        return self._tail_cache

    def search_hamming(self, queries: np.ndarray, max_distance: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query, the active rows within ``max_distance`` bits and their distances (sorted, nearest first)."""
        with self._lock:
            q = np.ascontiguousarray(queries, np.uint8).reshape(-1, PDQ_BYTES)
            parts: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(len(q))]
            for seg in self._segments:
                for i, (ids, dist) in enumerate(seg.index.search(q, max_distance)):
                    if len(ids):
                        parts[i].append((seg.rows[ids], np.asarray(dist)))
            tail = self._tail()
            if len(tail) and len(q):
                codes = np.asarray(self._data[tail])
                for i in range(len(q)):
                    d = _hamming(codes, q[i])
                    hit = d <= max_distance
                    if hit.any():
                        parts[i].append((tail[hit], d[hit]))
            return [self._merge(p, ascending=True) for p in parts]

    def search_vectors(self, queries: np.ndarray, min_similarity: float, k: int = 8
                       ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query, up to ``k`` active rows at cosine similarity >= ``min_similarity`` (best first)."""
        with self._lock:
            q = np.ascontiguousarray(queries, np.float32).reshape(-1, self.dim)
            parts: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(len(q))]
            for seg in self._segments:
                inactive = self._inactive(seg)
                kk = min(len(seg.rows), k + inactive)
                if kk == 0:
                    continue
                ids, sims = seg.index.search(q, kk)
                for i in range(len(q)):
                    ok = (ids[i] >= 0) & (sims[i] >= min_similarity)
                    if ok.any():
                        parts[i].append((seg.rows[ids[i][ok]], sims[i][ok]))
            tail = self._tail()
            if len(tail) and len(q):
                sims_t = q @ np.asarray(self._data[tail]).T
                for i in range(len(q)):
                    hit = sims_t[i] >= min_similarity
                    if hit.any():
                        parts[i].append((tail[hit], sims_t[i][hit]))
            return [self._merge(p, ascending=False, k=k) for p in parts]

    def nearest(self, query: np.ndarray, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` active rows nearest to one query (Hamming distance or cosine similarity), exact, whatever the
        threshold: what ``explain`` reports."""
        with self._lock:
            act = np.flatnonzero(self._active)
            if not len(act):
                return np.zeros(0, np.int64), np.zeros(0)
            if self.kind == "pdq":
                d = _hamming(np.asarray(self._data), np.asarray(query, np.uint8).reshape(PDQ_BYTES))[act]
                order = np.argsort(d, kind="stable")[:k]
                return act[order], d[order]
            s = np.asarray(self._data) @ np.asarray(query, np.float32).reshape(self.dim)
            s = s[act]
            order = np.argsort(-s, kind="stable")[:k]
            return act[order], s[order]

    def _merge(self, parts: list[tuple[np.ndarray, np.ndarray]], *, ascending: bool, k: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        if not parts:
            return np.zeros(0, np.int64), np.zeros(0)
        rows = np.concatenate([p[0] for p in parts]).astype(np.int64)
        vals = np.concatenate([np.asarray(p[1], np.float64) for p in parts])
        keep = self._active[rows]
        rows, vals = rows[keep], vals[keep]
        order = np.lexsort((rows, vals if ascending else -vals))
        if k is not None:
            order = order[:k]
        return rows[order], vals[order]

    # ---- writing -------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        if not self.writable:
            raise BankError(f"{self.path}: opened read-only; open it with writable=True to change it")
        with locked_file(self.path / _LOCK), self._lock:
            yield self._con

    def _committed_rows(self, con: sqlite3.Connection) -> int:
        r = con.execute("SELECT coalesce(max(row0 + nrows), 0) FROM entries").fetchone()
        return int(r[0])

    def _bump(self, con: sqlite3.Connection) -> int:
        seq = int(con.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()[0]) + 1
        con.execute("UPDATE meta SET value = ? WHERE key = 'seq'", (str(seq),))
        return seq

    def add(self, rows: np.ndarray, entries: Sequence[NewEntry], *, replace: bool = False, index: bool = True
            ) -> list[str]:
        """Append ``entries`` whose rows are ``rows`` (in order, ``entry.nrows`` each). An id that exists is refused
        unless ``replace`` (then the old entry is removed in the same transaction). Returns the ids added.

        The new rows match at once (searched exactly until indexed). ``index=False`` leaves them unindexed, for bulk
        loads that call :meth:`rebuild_index` once at the end."""
        data = self._check_rows(rows)
        need = sum(e.nrows for e in entries)
        if need != len(data):
            raise BankError(f"{self.path}: {len(entries)} entries name {need} rows, {len(data)} were given")
        ids = [e.id for e in entries]
        for e in entries:
            _check_id(e.id, self.path)
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise BankError(f"{self.path}: entry id {dup!r} is given twice")
        with self._writing() as con:
            base = self._committed_rows(con)
            path = self.path / ROWS
            with open(path, "r+b") as f:
                size = os.fstat(f.fileno()).st_size
                if size < base * self.row_bytes:
                    raise BankError(f"{self.path}: {ROWS} holds fewer rows than the bank lists: it was truncated; "
                                    "restore the bank folder from a copy")
                if size > base * self.row_bytes:  # rows of an add that died before its commit
                    f.truncate(base * self.row_bytes)
                f.seek(base * self.row_bytes)
                f.write(np.ascontiguousarray(data).tobytes())
                f.flush()
                os.fsync(f.fileno())
            now = time.time()
            with _transaction(con):
                existing = _existing(con, ids)
                if existing and not replace:
                    raise BankError(f"{self.path}: entry id {existing[0]!r} already exists (remove it first, or "
                                    "add with replace)")
                seq = self._bump(con)
                if existing:
                    self._tombstone(con, existing, seq)
                r = base
                values = []
                for e in entries:
                    values.append((e.id, e.label, e.source, now, r, e.nrows, e.quality, e.sha256, seq))
                    r += e.nrows
                con.executemany("INSERT INTO entries (id, label, source, added, row0, nrows, quality, sha256, "
                                "changed) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", values)
            self.refresh(force=True)
            if index and len(self._tail()) > TAIL_ROWS[self.kind]:
                self._index_tail()
        return ids

    def _check_rows(self, rows: np.ndarray) -> np.ndarray:
        a = np.asarray(rows)
        if self.kind == "pdq":
            if a.dtype != np.uint8 or a.ndim != 2 or a.shape[1] != PDQ_BYTES:
                raise BankError(f"{self.path}: PDQ rows must be (N, 32) uint8, got {a.dtype} {a.shape}")
            return a
        if a.ndim != 2 or a.shape[1] != self.dim:
            raise BankError(f"{self.path}: embeddings must be (N, {self.dim}) for this bank, got {a.shape}")
        a = a.astype(np.float32)
        norms = np.linalg.norm(a, axis=1) if len(a) else np.zeros(0)
        if not np.isfinite(a).all() or (len(a) and np.abs(norms - 1).max() > 1e-3):
            raise BankError(f"{self.path}: embeddings must be finite L2-normalised rows (as the encoder gives them)")
        return a

    def _tombstone(self, con: sqlite3.Connection, ids: Sequence[str], seq: int) -> None:
        # The row keeps its rows (the file is append-only); its id is freed for a new entry.
        for eid in ids:
            con.execute("UPDATE entries SET removed = 1, enabled = 0, id = id || '#removed-' || n, changed = ? "
                        "WHERE id = ? AND removed = 0", (seq, eid))

    def _update(self, ids: Sequence[str], sql: str, args: tuple[Any, ...] = ()) -> list[str]:
        """Run ``UPDATE entries SET <sql>, changed = seq WHERE id = ?`` for each id; unknown ids are refused."""
        with self._writing() as con:
            with _transaction(con):
                found = set(_existing(con, ids))
                missing = [i for i in ids if i not in found]
                if missing:
                    raise BankError(f"{self.path}: no entry {missing[0]!r}"
                                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
                seq = self._bump(con)
                if sql == "remove":
                    self._tombstone(con, ids, seq)
                else:
                    con.executemany(f"UPDATE entries SET {sql}, changed = ? WHERE id = ? AND removed = 0",
                                    [(*args, seq, i) for i in ids])
            self.refresh(force=True)
        return list(ids)

    def disable(self, ids: Sequence[str]) -> list[str]:
        """Stop matching these entries (kept, and enabled again with :meth:`enable`)."""
        return self._update(ids, "enabled = 0")

    def enable(self, ids: Sequence[str]) -> list[str]:
        return self._update(ids, "enabled = 1")

    def remove(self, ids: Sequence[str]) -> list[str]:
        """Remove entries (their ids may be added again)."""
        return self._update(ids, "remove")

    def confirm(self, ids: Sequence[str]) -> list[str]:
        """A person confirmed these entries: a flood of matches no longer quarantines them."""
        return self._update(ids, "confirmed = ?", (time.time(),))

    def set_enabled(self, enabled: bool) -> None:
        """Enable or disable the whole bank (a disabled bank matches nothing)."""
        with self._writing() as con:
            with _transaction(con):
                self._bump(con)
                con.execute("UPDATE meta SET value = ? WHERE key = 'enabled'", ("1" if enabled else "0",))
            self.refresh(force=True)

    def rebuild_index(self) -> None:
        """Rebuild the search index over every active row as one segment (``safeclip bank index``)."""
        with self._writing():
            self.refresh(force=True)
            self._write_segments([], np.flatnonzero(self._active))

    def _index_tail(self) -> None:
        """Index the rows no segment covers; merge segments when there are too many (caller holds the writer lock)."""
        keep = list(self._segments)
        tail = self._tail()
        if len(keep) + 1 > _MAX_SEGMENTS:
            # Merge every segment but the first (the big, old one) with the tail; all of them once the merged part
            # would be as big as the first: each rebuild stays proportional to what was added since the last.
            rest = np.concatenate([s.rows for s in keep[1:]] + [tail])
            if len(rest) * 2 >= len(keep[0].rows):
                keep, tail = [], np.concatenate([keep[0].rows, rest])
            else:
                keep, tail = keep[:1], rest
            tail = tail[self._active[tail]]
        self._write_segments(keep, np.sort(tail))

    def _write_segments(self, keep: list[_Segment], rows: np.ndarray) -> None:
        folder = self.path / _INDEX
        folder.mkdir(exist_ok=True)
        name = f"seg-{self._seq}-{os.getpid()}-{int(time.time() * 1000)}"
        tmp = folder / (name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        sub = self._rows_of(rows)
        index = (HammingIndex if self.kind == "pdq" else VectorIndex).build(sub)
        index.save(tmp)
        np.save(tmp / "rows.npy", rows.astype(np.int64), allow_pickle=False)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, folder / name)
        fsync_dir(folder)
        names = [s.name for s in keep] + [name]
        write_json_atomic(folder / "current.json", {"segments": names, "rows": self._n_rows}, durable=True)
        state = folder / ".state.npz.tmp"
        with open(state, "wb") as f:
            np.savez(f, seq=np.int64(self._seq), entries=self._row_entry, active=self._active)
        os.replace(state, folder / "state.npz")
        for old in folder.iterdir():  # segments no pointer names any more (readers holding them keep their maps)
            if old.is_dir() and old.name not in names:
                shutil.rmtree(old, ignore_errors=True)
        self._load_index()


@contextlib.contextmanager
def _transaction(con: sqlite3.Connection) -> Iterator[None]:
    """One write transaction (taken at once: writers are serial anyway), committed, or rolled back on any error."""
    con.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


_ENTRY_COLS = "id, label, source, added, enabled, quality, sha256, confirmed, nrows"


def _entry(r: Sequence[Any]) -> BankEntry:
    return BankEntry(id=r[0], label=r[1], source=r[2], added=float(r[3]), enabled=bool(r[4]),
                     quality=None if r[5] is None else int(r[5]), sha256=r[6],
                     confirmed=None if r[7] is None else float(r[7]), rows=int(r[8]))


def _existing(con: sqlite3.Connection, ids: Sequence[str]) -> list[str]:
    out: list[str] = []
    for i in range(0, len(ids), 900):
        part = list(ids[i:i + 900])
        q = ",".join("?" * len(part))
        out += [r[0] for r in con.execute(f"SELECT id FROM entries WHERE removed = 0 AND id IN ({q})", part)]
    order = {v: k for k, v in enumerate(ids)}
    return sorted(out, key=order.__getitem__)


def _check_id(entry_id: object, path: Path) -> None:
    if not isinstance(entry_id, str) or not entry_id or len(entry_id) > 256 or "#removed-" in entry_id or any(
            not ch.isprintable() for ch in entry_id):
        raise BankError(f"{path}: entry id {str(entry_id)[:80]!r} must be 1-256 printable characters")


def _ranges(counts: np.ndarray) -> np.ndarray:
    """``[0..c0), [0..c1), ...`` concatenated."""
    counts = np.asarray(counts, np.int64)
    if not len(counts):
        return np.zeros(0, np.int64)
    ends = np.cumsum(counts)
    return np.arange(int(ends[-1]), dtype=np.int64) - np.repeat(ends - counts, counts)


def _hamming(codes: np.ndarray, query: np.ndarray) -> np.ndarray:
    a = np.asarray(codes, np.uint8).view(np.uint64).reshape(-1, 4)
    b = np.asarray(query, np.uint8).view(np.uint64).reshape(4)
    return np.bitwise_count(a ^ b).sum(axis=1).astype(np.int64)


def _warn(message: str) -> None:
    from .._trust import say_once

    say_once(message)

