"""The review store's PostgreSQL back end (psycopg 3, the ``review-pg`` extra): several servers share one queue.

One connection per store, guarded by a lock, in autocommit mode with an explicit transaction per operation; a lost
connection is opened again on the next operation. The queue claims rows with ``FOR UPDATE SKIP LOCKED``; a
transaction that PostgreSQL aborts as a deadlock or serialization failure is retried. A URL's password is never
shown: :func:`redact` gives what ``location`` and every message say.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from ..errors import ReviewError, ReviewStoreUnavailableError
from ._schema import Tx

if TYPE_CHECKING:
    import psycopg

__all__ = ["PostgresDialect", "is_postgres_url", "passwords", "redact"]

T = TypeVar("T")
CONNECT_TIMEOUT_S = 10  # unless the URL says (connect_timeout=N)
RETRIES = 5
_SECRET_KEYS = {"password", "sslpassword"}


def is_postgres_url(location: str) -> bool:
    return location.startswith(("postgresql://", "postgres://"))


def redact(url: str) -> str:
    """``url`` without its password (in the user part or the query)."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        user, _, host = netloc.rpartition("@")
        netloc = user.partition(":")[0] + "@" + host
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in _SECRET_KEYS])
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def passwords(url: str) -> list[str]:
    """The passwords in ``url``, as written and decoded (libpq's messages may quote either)."""
    parts = urlsplit(url)
    found = [v for k, v in parse_qsl(parts.query, keep_blank_values=True) if k in _SECRET_KEYS]
    found += [v for k, v in (p.split("=", 1) for p in parts.query.split("&") if "=" in p) if k in _SECRET_KEYS]
    user = parts.netloc.rpartition("@")[0]
    if ":" in user:
        found += [user.partition(":")[2], unquote(user.partition(":")[2])]
    return sorted({f for f in found if f}, key=len, reverse=True)


class _PgTx:
    def __init__(self, con: psycopg.Connection[Any]):
        self._con = con

    def run(self, sql: str, params: Sequence[Any] = ()) -> None:
        self._con.execute(sql.replace("?", "%s"), tuple(params) or None)

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._con.execute(sql.replace("?", "%s"), tuple(params) or None).fetchall()


class PostgresDialect:
    """A review store in the PostgreSQL database (and schema: the first of its ``search_path``) of ``url``."""

    backend = "postgresql"
    skip_locked = "FOR UPDATE SKIP LOCKED"

    def __init__(self, url: str):
        self._url = url
        self.location = redact(url)
        self._secrets = passwords(url)
        try:
            import psycopg
        except ImportError as e:
            raise ReviewError(f"review store {self.location}: PostgreSQL needs psycopg 3, which is not installed: "
                              f"pip install 'safeclip[review-pg]'") from e
        self._psycopg = psycopg
        self._lock = threading.RLock()
        self._closed = False
        self._con: psycopg.Connection[Any] | None = None
        self._pid = os.getpid()
        self._inherited: list[Any] = []
        self._connect()

    def _one_line(self, e: BaseException) -> str:
        """``e``'s message on one line, any password in it masked."""
        msg = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        for secret in self._secrets:
            msg = msg.replace(secret, "***")
        return msg

    def _connect(self) -> psycopg.Connection[Any]:
        psycopg = self._psycopg
        given = {k for k, _ in parse_qsl(urlsplit(self._url).query)}
        extra = {} if "connect_timeout" in given else {"connect_timeout": CONNECT_TIMEOUT_S}
        try:
            self._con = psycopg.connect(self._url, autocommit=True, **extra)
        except psycopg.OperationalError as e:
            raise ReviewStoreUnavailableError(
                f"review store {self.location} cannot be reached ({self._one_line(e)}): start PostgreSQL, or fix the "
                f"URL") from e
        except psycopg.Error as e:
            raise ReviewError(f"review store {self.location} cannot be opened ({self._one_line(e)}): fix the "
                              f"URL") from e
        return self._con

    def error(self, e: Exception) -> ReviewError:
        """``e`` (a psycopg error) as one line naming the store and the fix."""
        psycopg = self._psycopg
        msg = self._one_line(e)
        state = getattr(e, "sqlstate", None) or ""
        con = self._con
        if con is None or con.broken or con.closed or state.startswith(("08", "57P")):
            return ReviewStoreUnavailableError(f"review store {self.location}: the connection was lost ({msg}): "
                                               f"check that PostgreSQL is up; the next call connects again")
        if isinstance(e, psycopg.errors.InsufficientPrivilege):
            return ReviewError(f"review store {self.location}: not allowed ({msg}): grant the URL's user the "
                               f"rights to create and write tables in its database and schema")
        if state in ("3F000", "3D000") or "no schema has been selected" in msg:
            return ReviewError(f"review store {self.location}: {msg}: create the database / schema first, or fix "
                               f"the URL's search_path")
        return ReviewError(f"review store {self.location}: {msg}")

    def run(self, fn: Callable[[Tx], T], *, write: bool) -> T:
        """``fn`` in one transaction, retried when PostgreSQL aborts it as a deadlock or serialization failure;
        committed when it returns, rolled back when it raises."""
        psycopg = self._psycopg
        self._after_fork()
        with self._lock:
            for attempt in range(RETRIES):
                con = self._con
                if self._closed:
                    raise ReviewError(f"review store {self.location} is closed: open it again (open_store)")
                if con is None or con.closed or con.broken:
                    con = self._connect()
                try:
                    with con.transaction():
                        return fn(_PgTx(con))
                except psycopg.errors.TransactionRollback as e:  # deadlock, serialization failure: nothing written
                    if attempt == RETRIES - 1:
                        raise self.error(e) from e
                    time.sleep(0.01 * 2**attempt)
                except psycopg.Error as e:
                    raise self.error(e) from e
            raise AssertionError("unreachable")

    def migration_lock(self, tx: Tx) -> None:
        """One migrating process per schema at a time (concurrent CREATE TABLEs would collide)."""
        tx.rows("SELECT pg_advisory_xact_lock(hashtext('safeclip.review:' || coalesce(current_schema(), '')))")

    def lock_keys(self, tx: Tx, keys: Sequence[str]) -> None:
        """Lock the items' keys in one order for every writer before inserting them in the order given: two
        transactions adding overlapping items never wait on each other in a cycle."""
        for k in sorted({int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big", signed=True)
                         for key in keys}):
            tx.rows("SELECT pg_advisory_xact_lock(?)", (k,))

    def tables(self, tx: Tx) -> set[str]:
        return {str(r[0]) for r in tx.rows(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p', 'v', 'm', 'f')")}

    def _after_fork(self) -> None:
        """In a forked child: the parent's connection (its socket) is kept, unused and unclosed (closing it would end
        the parent's session); the child connects anew on its next call."""
        if self._pid != os.getpid():
            self._inherited.append(self._con)
            self._con, self._lock, self._pid = None, threading.RLock(), os.getpid()

    def close(self) -> None:
        self._after_fork()
        with self._lock:
            self._closed = True
            if self._con is not None:
                try:
                    self._con.close()
                except self._psycopg.Error:
                    pass
                self._con = None
