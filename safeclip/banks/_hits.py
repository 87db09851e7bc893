"""Flood counting: which distinct inputs each bank entry matched, and when (``hits.sqlite`` in the bank folder).

A shared hash that matches far more uploads than any real incident (a blank frame, a logo, a meme template) floods
review queues and blocks what it should not. Every match is recorded as ``(entry, input key, time)``, one row per
distinct input (the key is the input's PDQ hash or a digest of its embedding: the same file re-uploaded counts once).
A policy then asks how many distinct inputs an entry matched within its window (:meth:`HitLog.counts`).

Every process that matches records into the same database (WAL, a short busy timeout); where the bank folder cannot
be written, hits are counted in memory for this process only (one warning).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["HitLog"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS hits (entry TEXT NOT NULL, input TEXT NOT NULL, t REAL NOT NULL,
                                 PRIMARY KEY (entry, input)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS hits_t ON hits (entry, t);
"""


class HitLog:
    """The flood counts of one bank: :meth:`record` matches, :meth:`counts` per entry within a window."""

    def __init__(self, folder: Path):
        self.path = folder / "hits.sqlite"
        self._lock = threading.Lock()
        self._memory: dict[str, dict[str, float]] | None = None
        self._con: sqlite3.Connection | None = None
        try:
            con = sqlite3.connect(self.path, check_same_thread=False, timeout=5.0, isolation_level=None)
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=NORMAL")  # a lost last hit only delays a quarantine by one match
            con.executescript(_SCHEMA)
            self._con = con
        except sqlite3.Error as e:
            from .._trust import say_once

            say_once(f"{folder}: flood counts cannot be written there ({e}); they are kept in memory by this "
                     "process only")
            self._memory = {}

    def record(self, hits: Sequence[tuple[str, str]], now: float | None = None) -> None:
        """Record ``(entry id, input key)`` matches; an input already recorded for an entry keeps its first time."""
        if not hits:
            return
        t = time.time() if now is None else now
        with self._lock:
            if self._con is not None:
                try:
                    self._con.executemany("INSERT OR IGNORE INTO hits VALUES (?, ?, ?)", [(e, k, t) for e, k in hits])
                    return
                except sqlite3.Error:
                    self._memory = self._memory if self._memory is not None else {}
            assert self._memory is not None
            for e, k in hits:
                self._memory.setdefault(e, {}).setdefault(k, t)

    def counts(self, entries: Sequence[str], window_s: float, now: float | None = None) -> dict[str, int]:
        """Distinct inputs each entry matched within the last ``window_s`` seconds."""
        since = (time.time() if now is None else now) - window_s
        out = {e: 0 for e in entries}
        with self._lock:
            if self._con is not None:
                try:
                    for e in out:
                        out[e] = int(self._con.execute("SELECT count(*) FROM hits WHERE entry = ? AND t >= ?",
                                                       (e, since)).fetchone()[0])
                except sqlite3.Error:
                    pass
            if self._memory is not None:
                for e in out:
                    out[e] += sum(1 for t in self._memory.get(e, {}).values() if t >= since)
        return out

    def close(self) -> None:
        with self._lock:
            if self._con is not None:
                self._con.close()
                self._con = None
