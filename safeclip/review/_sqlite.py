"""The review store's SQLite back end: one file in WAL mode, one connection per store guarded by a lock.

Writers take the database's write lock at ``BEGIN IMMEDIATE`` (so a transaction never has to upgrade a read lock,
which SQLite refuses without waiting), and wait for another process's up to the busy timeout; readers never wait.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ..errors import ReviewError, ReviewStoreUnavailableError
from ._schema import Tx

__all__ = ["SQLiteDialect"]

T = TypeVar("T")
BUSY_TIMEOUT_S = 15.0
_DAMAGE = ("not a database", "malformed", "corrupt", "encrypted")
_BUSY = ("locked", "busy")


class _SQLiteTx:
    def __init__(self, con: sqlite3.Connection):
        self._con = con

    def run(self, sql: str, params: Sequence[Any] = ()) -> None:
        self._con.execute(sql, tuple(params))

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._con.execute(sql, tuple(params)).fetchall()


class SQLiteDialect:
    """A review store in the SQLite file ``path`` (created when missing and ``create``)."""

    backend = "sqlite"
    skip_locked = ""  # BEGIN IMMEDIATE already serialises the writers

    def __init__(self, path: Path, *, create: bool):
        self.location = str(path)
        self._lock = threading.RLock()
        if path.is_dir():
            raise ReviewError(f"review store {path} is a folder: give the path of a SQLite file (it is created)")
        if not create and not path.exists():
            raise ReviewError(f"review store {path} does not exist: give an existing store, or let it be created "
                              f"(create=True)")
        self._path = path
        self._inherited: list[sqlite3.Connection] = []
        self._con: sqlite3.Connection | None = None
        self._connect()

    def _connect(self) -> sqlite3.Connection:
        self._pid = os.getpid()
        try:
            self._con = sqlite3.connect(self._path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                        check_same_thread=False)
        except sqlite3.Error as e:
            raise self.error(e) from e
        try:
            self._con.execute("PRAGMA foreign_keys = ON")
            self._con.execute("PRAGMA journal_mode = WAL")
        except sqlite3.Error as e:
            self.close()
            raise self.error(e) from e
        return self._con

    def error(self, e: sqlite3.Error) -> ReviewError:
        """``e`` as one line naming the store and the fix."""
        msg = str(e)
        low = msg.lower()
        if any(m in low for m in _DAMAGE):
            return ReviewError(f"review store {self.location} is not a SQLite database or is corrupt ({msg}): "
                               f"restore it from a backup, or give another path")
        if any(m in low for m in _BUSY):
            return ReviewStoreUnavailableError(
                f"review store {self.location} stayed locked by another process for {BUSY_TIMEOUT_S:g} s ({msg}): "
                f"retry later, or stop the process that holds it")
        if "readonly" in low or "unable to open" in low or "disk" in low or "full" in low:
            return ReviewError(f"review store {self.location} cannot be opened or written ({msg}): check the "
                               f"folder's and file's permissions and the free space")
        return ReviewError(f"review store {self.location}: {msg}")

    def run(self, fn: Callable[[Tx], T], *, write: bool) -> T:
        """``fn`` in one transaction (``write``: holding the database's write lock); committed when it returns,
        rolled back when it raises."""
        self._after_fork()
        with self._lock:
            con = self._con
            if con is None:
                raise ReviewError(f"review store {self.location} is closed: open it again (open_store)")
            try:
                con.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    out = fn(_SQLiteTx(con))
                    con.execute("COMMIT")
                except BaseException:
                    if con.in_transaction:  # SQLite has rolled back already after some errors (disk full)
                        with contextlib.suppress(sqlite3.Error):
                            con.execute("ROLLBACK")
                    raise
            except sqlite3.Error as e:
                raise self.error(e) from e
            return out

    def migration_lock(self, tx: Tx) -> None:
        """Nothing to do: a write transaction holds the whole database."""

    def lock_keys(self, tx: Tx, keys: Sequence[str]) -> None:
        """Nothing to do: a write transaction holds the whole database."""

    def tables(self, tx: Tx) -> set[str]:
        return {str(r[0]) for r in tx.rows("SELECT name FROM sqlite_master WHERE type = 'table' "
                                           "AND name NOT LIKE 'sqlite!_%' ESCAPE '!'")}

    def _after_fork(self) -> None:
        """In a forked child: a connection of its own (SQLite connections do not cross fork); the parent's is kept,
        unused and unclosed: it is not the child's to close."""
        if self._pid != os.getpid() and self._con is not None:
            self._inherited.append(self._con)
            self._lock = threading.RLock()
            self._connect()

    def close(self) -> None:
        self._after_fork()
        with self._lock:
            if self._con is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._con.close()
                self._con = None
