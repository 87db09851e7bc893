"""The review store's one schema (SQLite and PostgreSQL), its versioned migrations, and what a back end provides.

Tables (times are Unix seconds, float, from the writing process's clock; ids grow in insertion order):

``safeclip_review_meta`` -- one row (``id`` = 1): ``schema_version`` (the last migration applied),
``policy_name`` (the policy the store belongs to; NULL until the first item or ``open_store(policy=...)`` binds it),
``store_id`` (random hex, names this store), ``created_at``.

``safeclip_review_migrations`` -- one row per migration applied: ``version`` (primary key), ``applied_at``.

``items`` -- a decision sent to review, one per ``(sha256, policy)`` (UNIQUE: adding it again does nothing):
``id`` (primary key), ``sha256``, ``policy`` (``name@version``), ``policy_name``, ``encoder_id``, ``action``
(allow / flag / block, what was decided), ``probability`` (the chance it had of being sent to review, in (0, 1]),
``origin`` (check / serve / audit), ``source`` (a path or name, or NULL), ``decision`` (the Decision as JSON text),
``thumbnail`` (JPEG bytes or NULL), ``embedding`` (float32 little-endian bytes or NULL) with ``dim`` (its length),
``created_at``, ``claimed_by`` / ``claimed_until`` (a reviewer's lease from ``next``), ``n_verdicts`` (how many
verdicts it has: kept with each verdict, in the same transaction, so the queue is an index scan), ``queue_pos``
(NULL: the item's place in the queue is its ``id``; a skipped item's is one past the last place at the time).

``verdicts`` -- what a reviewer decided, never updated or deleted (a second opinion is a second row): ``id``
(primary key), ``item_id`` (references ``items``), ``reviewer``, ``action``, ``category`` (one of the item's
decision's categories, or NULL), ``note``, ``created_at``.

Indexes: ``items_queue_order`` (``COALESCE(queue_pos, id), id`` of the items without a verdict: ``next``'s order;
``items_queue`` on ``id`` is version 1's), ``items_claims`` (``claimed_by`` of those: a reviewer's own lease first),
``items_strata`` (``policy, action, n_verdicts``: the strata counts), ``verdicts_item`` (``item_id``).

Versions: 1, the tables above without ``queue_pos``; 2, ``queue_pos`` and ``items_queue_order``.

On PostgreSQL the tables live in the first schema of the connection's ``search_path``; a store refuses a database
(or schema) that holds other tables, as SQLite refuses a file that does.

A migration is applied in one transaction with its record (a row of ``safeclip_review_migrations`` and
``schema_version``), so it runs once however many processes open the store at the same time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

__all__ = ["Dialect", "MIGRATIONS", "META", "MIGRATIONS_TABLE", "Migration", "Tx", "pending"]

T = TypeVar("T")
META = "safeclip_review_meta"
MIGRATIONS_TABLE = "safeclip_review_migrations"


@dataclass(frozen=True)
class Migration:
    """Schema version ``version``: the statements that take a store from ``version - 1`` to it, per back end."""

    version: int
    sqlite: tuple[str, ...]
    postgresql: tuple[str, ...]

    def statements(self, backend: str) -> tuple[str, ...]:
        return self.sqlite if backend == "sqlite" else self.postgresql


def _v1(key: str, ref: str, blob: str, real: str) -> tuple[str, ...]:
    """Version 1 in one back end's words: ``key`` an auto-increment primary key (``ref`` its type), ``blob`` bytes,
    ``real`` a double."""
    return (
        f"""CREATE TABLE {META} (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            schema_version INTEGER NOT NULL,
            policy_name TEXT,
            store_id TEXT NOT NULL,
            created_at {real} NOT NULL)""",
        f"""CREATE TABLE {MIGRATIONS_TABLE} (
            version INTEGER PRIMARY KEY,
            applied_at {real} NOT NULL)""",
        f"""CREATE TABLE items (
            id {key},
            sha256 TEXT NOT NULL,
            policy TEXT NOT NULL,
            policy_name TEXT NOT NULL,
            encoder_id TEXT NOT NULL,
            action TEXT NOT NULL CHECK (action IN ('allow', 'flag', 'block')),
            probability {real} NOT NULL CHECK (probability > 0 AND probability <= 1),
            origin TEXT NOT NULL,
            source TEXT,
            decision TEXT NOT NULL,
            thumbnail {blob},
            embedding {blob},
            dim INTEGER,
            created_at {real} NOT NULL,
            claimed_by TEXT,
            claimed_until {real},
            n_verdicts INTEGER NOT NULL DEFAULT 0,
            UNIQUE (sha256, policy))""",
        f"""CREATE TABLE verdicts (
            id {key},
            item_id {ref} NOT NULL REFERENCES items (id),
            reviewer TEXT NOT NULL,
            action TEXT NOT NULL CHECK (action IN ('allow', 'flag', 'block')),
            category TEXT,
            note TEXT,
            created_at {real} NOT NULL)""",
        "CREATE INDEX items_queue ON items (id) WHERE n_verdicts = 0",
        "CREATE INDEX items_claims ON items (claimed_by) WHERE n_verdicts = 0",
        "CREATE INDEX items_strata ON items (policy, action, n_verdicts)",
        "CREATE INDEX verdicts_item ON verdicts (item_id)",
    )


def _v2(integer: str) -> tuple[str, ...]:
    """Version 2: ``queue_pos``, an item's place in the queue once skipped (``ReviewStore.skip``)."""
    return (
        f"ALTER TABLE items ADD COLUMN queue_pos {integer}",
        "CREATE INDEX items_queue_order ON items ((COALESCE(queue_pos, id)), id) WHERE n_verdicts = 0",
    )


MIGRATIONS: list[Migration] = [
    Migration(1, sqlite=_v1("INTEGER PRIMARY KEY AUTOINCREMENT", "INTEGER", "BLOB", "REAL"),
              postgresql=_v1("BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", "BIGINT", "BYTEA",
                                 "DOUBLE PRECISION")),
    Migration(2, sqlite=_v2("INTEGER"), postgresql=_v2("BIGINT")),
]
"""In version order, ending at ``SCHEMA_VERSION`` (safeclip.review._store). Append, never edit a released one."""


class Tx(Protocol):
    """One transaction on a store's connection; SQL is written with ``?`` placeholders (the back end converts)."""

    def run(self, sql: str, params: Sequence[Any] = ()) -> None: ...

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...


class Dialect(Protocol):
    """What a back end provides the store: transactions (holding the store's lock, errors mapped to
    :class:`~safeclip.errors.ReviewError`), the tables its database already has, and its few SQL differences."""

    backend: str
    location: str
    skip_locked: str  # appended to a queue SELECT: "FOR UPDATE SKIP LOCKED" where rows can be locked

    def run(self, fn: Callable[[Tx], T], *, write: bool) -> T: ...

    def migration_lock(self, tx: Tx) -> None: ...

    def lock_keys(self, tx: Tx, keys: Sequence[str]) -> None: ...

    def tables(self, tx: Tx) -> set[str]: ...

    def close(self) -> None: ...


def pending(version: int) -> Iterator[Migration]:
    """The migrations after ``version``, in order (read at call time: tests append one)."""
    return (m for m in MIGRATIONS if m.version > version)
