"""The review store: SQLite (one file, WAL) by default, PostgreSQL by URL. One schema (``_schema``: tables, keys,
migrations), the same SQL on both back ends but for the few differences a back end states (``_sqlite``,
``_postgres``).

Every write is one transaction. Idempotency is the database's: ``INSERT ... ON CONFLICT (sha256, policy) DO
NOTHING``. The queue is ``items`` without a verdict; ``next`` claims one by writing a lease (``claimed_by``,
``claimed_until``) in the transaction that chose it (PostgreSQL: ``FOR UPDATE SKIP LOCKED``; SQLite: the write
lock), so two reviewers never get the same item.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from ..errors import InvalidVerdictError, ReviewError, ReviewItemNotFoundError, one_line
from . import _schema
from ._model import ACTIONS, NewItem, ReviewItem, StratumCount, Verdict
from ._postgres import PostgresDialect, is_postgres_url
from ._schema import META, MIGRATIONS_TABLE, Dialect, Tx
from ._sqlite import SQLiteDialect

__all__ = ["ReviewStore", "SCHEMA_VERSION", "open_store"]

SCHEMA_VERSION = 2

PAGE = 500  # items read per query by items() / embeddings()
def _quoted(value: object) -> str:
    """A value a caller gave, as a refusal quotes it: its repr, cut short (it may be a whole request body)."""
    return one_line(repr(value), 60)


_QUEUE_ORDER = "COALESCE(queue_pos, id), id"  # the index items_queue_order
_ITEM = ("id, sha256, policy, encoder_id, action, decision, probability, origin, source, created_at, "
         "embedding IS NOT NULL, thumbnail IS NOT NULL, claimed_by, claimed_until")
_VERDICT = "id, item_id, reviewer, action, category, note, created_at"
_INSERT = ("INSERT INTO items (sha256, policy, policy_name, encoder_id, action, probability, origin, source, "
           "decision, thumbnail, embedding, dim, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
           "ON CONFLICT (sha256, policy) DO NOTHING RETURNING id")


def _marks(n: int) -> str:
    return ", ".join("?" * n)


class ReviewStore:
    """A review queue and its verdicts. Thread-safe; every process opens its own. Use :func:`open_store`.

    ``location``: what it was opened from (a path, or the URL with any password removed); ``backend``:
    ``"sqlite"`` or ``"postgresql"``; ``policy_name``: the policy the store belongs to (bound by the first item
    added, or by ``open_store(policy=...)``; ``None`` while empty and unbound); ``store_id``: a random hex name
    given at creation.
    """

    location: str
    backend: str
    policy_name: str | None
    schema_version: int
    store_id: str

    def __init__(self, dialect: Dialect, *, policy: str | None = None, create: bool = True):
        self._d = dialect
        self.location = dialect.location
        self.backend = dialect.backend
        if policy is not None and (not isinstance(policy, str) or not policy or "@" in policy):
            raise ReviewError(f"review store {self.location}: policy={policy!r} is not a policy name: give the "
                              f"name alone ('default', not 'default@1.0')")
        self._open(policy, create)

    # ------------------------------------------------------------------------------------------ opening
    def _meta(self, tx: Tx, create: bool) -> tuple[int, str | None, str]:
        """``(schema_version, policy_name, store_id)``; version 0 for an empty database that may be created."""
        tables = self._d.tables(tx)
        if META not in tables:
            if tables:
                shown = ", ".join(sorted(tables)[:5])
                raise ReviewError(f"{self.location} is not a review store (it holds other tables: {shown}): give "
                                  f"a new file, or an empty database or schema")
            if not create:
                raise ReviewError(f"there is no review store at {self.location} yet: create it (create=True), or "
                                  f"give the right location")
            return 0, None, ""
        rows = tx.rows(f"SELECT schema_version, policy_name, store_id FROM {META}")
        if len(rows) != 1 or type(rows[0][0]) is not int or rows[0][0] < 1:
            raise ReviewError(f"review store {self.location} is damaged (its {META} table does not hold one row "
                              f"with a schema version): restore it from a backup")
        version, name, store_id = rows[0]
        if version > SCHEMA_VERSION:
            raise ReviewError(f"review store {self.location} has schema version {version}, newer than this "
                              f"safeclip knows ({SCHEMA_VERSION}): upgrade safeclip")
        return version, name, str(store_id)

    def _open(self, policy: str | None, create: bool) -> None:
        """Read the store's state; migrate it (each migration in its own transaction, recorded with it) and bind
        ``policy`` when needed."""
        version, name, store_id = self._d.run(lambda tx: self._meta(tx, create), write=False)
        while version < SCHEMA_VERSION or (policy is not None and name is None):
            version, name, store_id = self._d.run(lambda tx: self._step(tx, create, policy), write=True)
        if policy is not None and name != policy:
            raise ReviewError(f"review store {self.location} belongs to policy {name!r}, not {policy!r}: open "
                              f"policy {policy!r}'s own store (or a new one)")
        self.schema_version, self.policy_name, self.store_id = version, name, store_id

    def _step(self, tx: Tx, create: bool, policy: str | None) -> tuple[int, str | None, str]:
        """Apply the next migration, or else bind ``policy`` to an unbound store (under the migration lock: another
        process may have done either since the store was read)."""
        self._d.migration_lock(tx)
        version, name, store_id = self._meta(tx, create)
        if version < SCHEMA_VERSION:
            m = next(_schema.pending(version), None)
            if m is None or m.version != version + 1:
                raise AssertionError(f"no migration to schema version {version + 1} (SCHEMA_VERSION {SCHEMA_VERSION})")
            for statement in m.statements(self.backend):
                tx.run(statement)
            now = time.time()
            if version == 0:
                store_id = uuid.uuid4().hex
                tx.run(f"INSERT INTO {META} (id, schema_version, policy_name, store_id, created_at) "
                       f"VALUES (1, ?, NULL, ?, ?)", (m.version, store_id, now))
            else:
                tx.run(f"UPDATE {META} SET schema_version = ? WHERE id = 1", (m.version,))
            tx.run(f"INSERT INTO {MIGRATIONS_TABLE} (version, applied_at) VALUES (?, ?)", (m.version, now))
            return m.version, name, store_id
        if policy is not None and name is None:
            tx.run(f"UPDATE {META} SET policy_name = ? WHERE id = 1", (policy,))
            name = policy
        return version, name, store_id

    # ------------------------------------------------------------------------------------------ writing
    def _row(self, i: int, it: NewItem) -> tuple[Any, ...]:
        """The ``items`` row of ``it`` (``created_at`` appended at insert); one line naming the problem when bad."""
        def bad(what: str) -> ReviewError:
            return ReviewError(f"review store {self.location}: item {i} ({str(getattr(it, 'sha256', ''))[:16]}) "
                               f"{what}")

        if not isinstance(it, NewItem):
            raise bad(f"is a {type(it).__name__}, not a NewItem: build items with safeclip.review.NewItem")
        if not isinstance(it.sha256, str) or not it.sha256:
            raise bad("has no sha256: give the content's sha256 hex digest")
        name, _, version = it.policy.rpartition("@") if isinstance(it.policy, str) else ("", "", "")
        if not name or not version:
            raise bad(f"has policy {it.policy!r}, not a policy id 'name@version': give Policy.id")
        if it.action not in ACTIONS:
            raise bad(f"has action {it.action!r}, not one of {', '.join(ACTIONS)}")
        p = it.probability
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 < float(p) <= 1.0):
            raise bad(f"has probability {p!r}, not in (0, 1]: give the chance it had of being sent to review")
        for field in ("encoder_id", "origin"):
            if not isinstance(getattr(it, field), str) or not getattr(it, field):
                raise bad(f"has no {field}: give it as text")
        if it.source is not None and not isinstance(it.source, str):
            raise bad(f"has source {it.source!r}, not text or None")
        if not isinstance(it.decision, Mapping):
            raise bad(f"has a {type(it.decision).__name__} for decision: give Decision.to_dict()")
        try:
            decision = json.dumps(dict(it.decision))
        except (TypeError, ValueError) as e:
            raise bad(f"has a decision that is not JSON ({e}): give Decision.to_dict()") from e
        emb = dim = None
        if it.embedding is not None:
            vec = np.asarray(it.embedding)
            if vec.ndim != 1 or vec.size == 0 or not np.issubdtype(vec.dtype, np.floating):
                raise bad(f"has an embedding of shape {vec.shape} and dtype {vec.dtype}: give one (D,) float32 "
                          f"vector or None")
            emb, dim = np.ascontiguousarray(vec, "<f4").tobytes(), int(vec.size)
        thumb = it.thumbnail
        if thumb is not None:
            if not isinstance(thumb, (bytes, bytearray, memoryview)):
                raise bad(f"has a {type(thumb).__name__} for thumbnail: give JPEG bytes (thumbnail_jpeg) or None")
            thumb = bytes(thumb)
        return (it.sha256, it.policy, name, it.encoder_id, it.action, float(p), it.origin, it.source, decision,
                thumb, emb, dim)

    def add(self, items: Sequence[NewItem]) -> list[int | None]:
        """Add items in one transaction; per item its new id, or ``None`` when ``(sha256, policy)`` was already
        there (idempotent: nothing changes). Items of a policy named other than the store's are refused
        (:class:`~safeclip.errors.ReviewError`, nothing added). Safe under concurrent writers."""
        rows = [self._row(i, it) for i, it in enumerate(items)]
        if not rows:
            return []
        names = sorted({r[2] for r in rows})
        if len(names) > 1:
            raise ReviewError(f"review store {self.location}: items of several policies ({', '.join(names)}) in "
                              f"one add: a store holds one policy's items; add each policy's to its own store")
        name = names[0]
        self._check_policy(name)
        def write(tx: Tx) -> list[int | None]:
            if self.policy_name is None:  # bind an unbound store, unless another process bound it first
                tx.run(f"UPDATE {META} SET policy_name = ? WHERE id = 1 AND policy_name IS NULL", (name,))
                bound = tx.rows(f"SELECT policy_name FROM {META}")[0][0]
                if bound != name:
                    self._check_policy(name, bound)
            self._d.lock_keys(tx, [f"{r[0]}\0{r[1]}" for r in rows])
            now = time.time()
            ids: list[int | None] = []
            for row in rows:  # in the order given: ids follow it (the first of duplicates gets one)
                got = tx.rows(_INSERT, (*row, now))
                ids.append(int(got[0][0]) if got else None)
            return ids

        ids = self._d.run(write, write=True)
        self.policy_name = name
        return ids

    def _check_policy(self, name: str, bound: str | None = None) -> None:
        bound = bound or self.policy_name
        if bound is not None and bound != name:
            raise ReviewError(f"review store {self.location} belongs to policy {bound!r}: items of policy {name!r} "
                              f"are refused; put them in {name!r}'s own store")

    def next(self, reviewer: str, *, lease_s: float = 600.0) -> ReviewItem | None:
        """Claim the first item in the queue with no verdict that no other reviewer holds a live lease on (the one
        this reviewer already claims comes back first); ``None`` when the queue is empty. The queue runs oldest
        first, a skipped item behind what was waiting when it was skipped. Two reviewers calling at
        once never get the same item."""
        reviewer = self._reviewer(reviewer)
        if isinstance(lease_s, bool) or not isinstance(lease_s, (int, float)) or not (0 < lease_s < math.inf):
            raise ReviewError(f"review store {self.location}: lease_s={lease_s!r} is not a positive number of "
                              f"seconds")
        lock = self._d.skip_locked

        def claim(tx: Tx) -> ReviewItem | None:
            now = time.time()
            found = tx.rows(f"SELECT id FROM items WHERE n_verdicts = 0 AND claimed_by = ? ORDER BY {_QUEUE_ORDER} "
                            f"LIMIT 1 {lock}", (reviewer,))
            if not found:
                found = tx.rows(f"SELECT id FROM items WHERE n_verdicts = 0 AND (claimed_until IS NULL OR "
                                f"claimed_until <= ?) ORDER BY {_QUEUE_ORDER} LIMIT 1 {lock}", (now,))
            if not found:
                return None
            row = tx.rows(f"UPDATE items SET claimed_by = ?, claimed_until = ? WHERE id = ? RETURNING {_ITEM}",
                          (reviewer, now + float(lease_s), found[0][0]))[0]
            return self._item(row, ())

        return self._d.run(claim, write=True)

    def skip(self, item_id: int, reviewer: str) -> bool:
        """Pass an item on: give back this reviewer's lease on it and send it to the back of the queue, behind every
        item waiting now, so that ``next`` gives them another. ``True`` when the reviewer held the item; an item
        with a verdict, or held by someone else (this reviewer's lease ran out), is left as it is and gives
        ``False``. :class:`~safeclip.errors.ReviewItemNotFoundError` for an unknown item."""
        item_id = self._id(item_id)
        reviewer = self._reviewer(reviewer)

        def write(tx: Tx) -> bool:
            got = tx.rows("UPDATE items SET claimed_by = NULL, claimed_until = NULL, queue_pos = (SELECT "
                          "MAX(COALESCE(queue_pos, id)) + 1 FROM items) WHERE id = ? AND claimed_by = ? AND "
                          "n_verdicts = 0 RETURNING id", (item_id, reviewer))
            if not got and not tx.rows("SELECT id FROM items WHERE id = ?", (item_id,)):
                raise self._no_item(item_id)
            return bool(got)

        return self._d.run(write, write=True)

    def verdict(self, item_id: int, action: str, *, reviewer: str, category: str | None = None,
                note: str | None = None) -> Verdict:
        """Record a verdict (``allow`` / ``flag`` / ``block``; ``category`` must be one of the item's decision's
        categories); earlier verdicts on the item are kept. Releases the reviewer's lease on it. Raises
        :class:`~safeclip.errors.ReviewItemNotFoundError` for an unknown item,
        :class:`~safeclip.errors.InvalidVerdictError` for an unknown action or category, an empty reviewer."""
        item_id = self._id(item_id)
        reviewer = self._reviewer(reviewer, verdict=True)
        if action not in ACTIONS:
            raise self._invalid(f"verdict {_quoted(action)} on item {item_id} is not one of {', '.join(ACTIONS)}")
        for field, value in (("category", category), ("note", note)):
            if value is not None and not isinstance(value, str):
                raise self._invalid(f"a verdict's {field} is text or None, not {type(value).__name__}")

        def write(tx: Tx) -> Verdict:
            now = time.time()
            got = tx.rows("UPDATE items SET n_verdicts = n_verdicts + 1, "
                          "claimed_by = CASE WHEN claimed_by = ? THEN NULL ELSE claimed_by END, "
                          "claimed_until = CASE WHEN claimed_by = ? THEN NULL ELSE claimed_until END "
                          "WHERE id = ? RETURNING decision", (reviewer, reviewer, item_id))
            if not got:
                raise self._no_item(item_id)
            if category is not None:
                categories = json.loads(got[0][0]).get("categories") or {}
                if category not in categories:
                    raise self._invalid(f"category {_quoted(category)} is not one of item {item_id}'s categories "
                                        f"({', '.join(categories) or 'none'}): give one of them, or none")
            vid = tx.rows("INSERT INTO verdicts (item_id, reviewer, action, category, note, created_at) "
                          "VALUES (?, ?, ?, ?, ?, ?) RETURNING id", (item_id, reviewer, action, category, note, now))
            return Verdict(int(vid[0][0]), item_id, reviewer, action, category, note, now)

        return self._d.run(write, write=True)

    def _reviewer(self, reviewer: object, *, verdict: bool = False) -> str:
        if not isinstance(reviewer, str) or not reviewer.strip():
            reason = f"reviewer {reviewer!r} is empty: say who reviews (a name or login)"
            raise self._invalid(reason) if verdict else ReviewError(f"review store {self.location}: {reason}")
        return reviewer.strip()

    def _invalid(self, reason: str) -> InvalidVerdictError:
        return InvalidVerdictError(f"review store {self.location}: {reason}", reason)

    def _id(self, item_id: object) -> int:
        if isinstance(item_id, bool) or not isinstance(item_id, (int, np.integer)):
            raise ReviewError(f"review store {self.location}: item id {item_id!r} is not an integer")
        return int(item_id)

    def _no_item(self, item_id: int) -> ReviewItemNotFoundError:
        return ReviewItemNotFoundError(f"review store {self.location} has no item {item_id}: list its items with "
                                       f"`safeclip review list {self.location}`", item_id)

    # ------------------------------------------------------------------------------------------ reading
    @staticmethod
    def _item(row: Sequence[Any], verdicts: Sequence[Verdict]) -> ReviewItem:
        (iid, sha, policy, encoder_id, action, decision, probability, origin, source, created_at, has_emb,
         has_thumb, claimed_by, claimed_until) = row
        return ReviewItem(int(iid), sha, policy, encoder_id, action, json.loads(decision), float(probability),
                          origin, source, float(created_at), bool(has_emb), bool(has_thumb), tuple(verdicts),
                          claimed_by, None if claimed_until is None else float(claimed_until))

    @staticmethod
    def _verdicts(tx: Tx, ids: Sequence[int]) -> dict[int, list[Verdict]]:
        out: dict[int, list[Verdict]] = {}
        if ids:
            for vid, iid, reviewer, action, category, note, created_at in tx.rows(
                    f"SELECT {_VERDICT} FROM verdicts WHERE item_id IN ({_marks(len(ids))}) ORDER BY id", ids):
                out.setdefault(int(iid), []).append(
                    Verdict(int(vid), int(iid), reviewer, action, category, note, float(created_at)))
        return out

    def get(self, item_id: int) -> ReviewItem:
        """The item with its verdicts; :class:`~safeclip.errors.ReviewError` when there is none."""
        item_id = self._id(item_id)

        def read(tx: Tx) -> ReviewItem:
            rows = tx.rows(f"SELECT {_ITEM} FROM items WHERE id = ?", (item_id,))
            if not rows:
                raise self._no_item(item_id)
            return self._item(rows[0], self._verdicts(tx, [item_id]).get(item_id, ()))

        return self._d.run(read, write=False)

    def items(self, *, reviewed: bool | None = None, action: str | None = None, policy: str | None = None,
              after_id: int = 0, limit: int | None = None) -> Iterator[ReviewItem]:
        """Items in id order, with their verdicts, read in pages (memory stays bounded): ``reviewed`` True / False
        keeps those with / without a verdict; ``action`` the decided action; ``policy`` one policy id."""
        if action is not None and action not in ACTIONS:
            raise ReviewError(f"review store {self.location}: action {action!r} is not one of {', '.join(ACTIONS)}")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise ReviewError(f"review store {self.location}: limit={limit!r} is not a count (an integer >= 0)")
        where, params = ["id > ?"], list[Any]()
        if reviewed is not None:
            where.append("n_verdicts > 0" if reviewed else "n_verdicts = 0")
        if action is not None:
            where.append("action = ?")
            params.append(action)
        if policy is not None:
            where.append("policy = ?")
            params.append(policy)
        sql = f"SELECT {_ITEM} FROM items WHERE {' AND '.join(where)} ORDER BY id LIMIT ?"
        return self._pages(sql, params, self._id(after_id), limit)

    def _pages(self, sql: str, params: list[Any], after_id: int, limit: int | None) -> Iterator[ReviewItem]:
        left = limit
        while left is None or left > 0:
            n = PAGE if left is None else min(PAGE, left)

            def read(tx: Tx, after: int = after_id, n: int = n) -> list[ReviewItem]:
                rows = tx.rows(sql, (after, *params, n))
                verdicts = self._verdicts(tx, [int(r[0]) for r in rows])
                return [self._item(r, verdicts.get(int(r[0]), ())) for r in rows]

            page = self._d.run(read, write=False)
            yield from page
            if len(page) < n:
                return
            after_id = page[-1].id
            if left is not None:
                left -= len(page)

    def thumbnail(self, item_id: int) -> bytes | None:
        """The item's JPEG thumbnail, or ``None`` when it has none; :class:`~safeclip.errors.ReviewError` when
        there is no such item."""
        item_id = self._id(item_id)

        def read(tx: Tx) -> bytes | None:
            rows = tx.rows("SELECT thumbnail FROM items WHERE id = ?", (item_id,))
            if not rows:
                raise self._no_item(item_id)
            return None if rows[0][0] is None else bytes(rows[0][0])

        return self._d.run(read, write=False)

    def embeddings(self, item_ids: Sequence[int]) -> np.ndarray:
        """``(len(item_ids), D)`` float32 in that order; rows of items without one are NaN. ``D``: the width of
        their embeddings (the store's first embedding's when none of them has one; 0 when the store has none)."""
        ids = [self._id(i) for i in item_ids]
        wanted = sorted(set(ids))
        found: dict[int, np.ndarray] = {}
        for start in range(0, len(wanted), PAGE):
            chunk = wanted[start:start + PAGE]

            def read(tx: Tx, chunk: list[int] = chunk) -> list[tuple[Any, ...]]:
                return tx.rows(f"SELECT id, embedding FROM items WHERE id IN ({_marks(len(chunk))}) "
                               f"AND embedding IS NOT NULL", chunk)

            found.update((int(i), np.frombuffer(bytes(b), "<f4")) for i, b in self._d.run(read, write=False))
        widths = sorted({v.size for v in found.values()})
        if len(widths) > 1:
            raise ReviewError(f"review store {self.location}: these items' embeddings have different widths "
                              f"({', '.join(map(str, widths))}: different encoders): ask for one encoder's items")
        if widths:
            dim = widths[0]
        else:
            rows = self._d.run(lambda tx: tx.rows("SELECT dim FROM items WHERE dim IS NOT NULL ORDER BY id LIMIT 1"),
                               write=False)
            dim = int(rows[0][0]) if rows else 0
        out = np.full((len(ids), dim), np.nan, np.float32)
        for row, i in enumerate(ids):
            if i in found:
                out[row] = found[i]
        return out

    def strata(self) -> list[StratumCount]:
        """Per ``(policy, action)``: items and items with at least one verdict."""
        rows = self._d.run(lambda tx: tx.rows(
            "SELECT policy, action, COUNT(*), SUM(CASE WHEN n_verdicts > 0 THEN 1 ELSE 0 END) FROM items "
            "GROUP BY policy, action ORDER BY policy, action"), write=False)
        return [StratumCount(str(p), str(a), int(n), int(r)) for p, a, n, r in rows]

    # ------------------------------------------------------------------------------------------ life
    def close(self) -> None:
        self._d.close()

    def __enter__(self) -> ReviewStore:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ReviewStore({self.location!r}, backend={self.backend!r}, policy_name={self.policy_name!r})"


def open_store(location: str | os.PathLike[str], *, policy: str | None = None, create: bool = True) -> ReviewStore:
    """Open (``create``: or create) a review store: ``postgresql://user@host/db`` (psycopg 3, the ``review-pg``
    extra), else a SQLite file path.

    ``policy``: a policy *name*; a store bound to another is refused. A store that is corrupt, not a review store,
    or of a newer schema than this safeclip knows is refused with a :class:`~safeclip.errors.ReviewError` naming
    it and the fix; an older schema is migrated (each migration in one transaction, recorded). A database that
    cannot be reached raises :class:`~safeclip.errors.ReviewStoreUnavailableError`.

    A PostgreSQL store lives in the first schema of the URL's ``search_path`` (``?options=-csearch_path%3Dreview``
    for another than ``public``), which must hold nothing else; ``connect_timeout`` defaults to 10 s.

    >>> store = open_store(tmp_path / "review.db", policy="default")   # doctest: +SKIP
    >>> store.add([NewItem(sha, "default@1.0", encoder_id, "flag", decision.to_dict(), 1.0, "check")])  # doctest: +SKIP
    [1]
    """
    text = os.fsdecode(location)
    dialect: Dialect = PostgresDialect(text) if is_postgres_url(text) else SQLiteDialect(Path(text), create=create)
    try:
        return ReviewStore(dialect, policy=policy, create=create)
    except BaseException:
        dialect.close()
        raise
