"""The review store: SQLite (one file, WAL) by default, PostgreSQL by URL. One schema, versioned migrations.

SKELETON: the interface every other part of the review loop codes against. Bodies are to be implemented.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from types import TracebackType

import numpy as np

from ._model import NewItem, ReviewItem, StratumCount, Verdict

__all__ = ["ReviewStore", "SCHEMA_VERSION", "open_store"]

SCHEMA_VERSION = 1


class ReviewStore:
    """A review queue and its verdicts. Thread-safe; every process opens its own. Use :func:`open_store`.

    ``location``: what it was opened from (a path, or the URL with any password removed); ``backend``:
    ``"sqlite"`` or ``"postgresql"``; ``policy_name``: the policy the store belongs to (bound by the first item
    added, or by ``open_store(policy=...)``; ``None`` while empty and unbound).
    """

    location: str
    backend: str
    policy_name: str | None
    schema_version: int

    # ------------------------------------------------------------------------------------------ writing
    def add(self, items: Sequence[NewItem]) -> list[int | None]:
        """Add items in one transaction; per item its new id, or ``None`` when ``(sha256, policy)`` was already
        there (idempotent: nothing changes). Items of a policy named other than the store's are refused
        (:class:`~safeclip.errors.ReviewError`, nothing added). Safe under concurrent writers."""
        raise NotImplementedError

    def next(self, reviewer: str, *, lease_s: float = 600.0) -> ReviewItem | None:
        """Claim the oldest item with no verdict that no other reviewer holds a live lease on (the one this
        reviewer already claims comes back first); ``None`` when the queue is empty. Two reviewers calling at
        once never get the same item."""
        raise NotImplementedError

    def verdict(self, item_id: int, action: str, *, reviewer: str, category: str | None = None,
                note: str | None = None) -> Verdict:
        """Record a verdict (``allow`` / ``flag`` / ``block``; ``category`` must be one of the item's decision's
        categories); earlier verdicts on the item are kept. Releases the reviewer's lease on it. Raises
        :class:`~safeclip.errors.ReviewError` for an unknown item, action or category, an empty reviewer."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ reading
    def get(self, item_id: int) -> ReviewItem:
        """The item with its verdicts; :class:`~safeclip.errors.ReviewError` when there is none."""
        raise NotImplementedError

    def items(self, *, reviewed: bool | None = None, action: str | None = None, policy: str | None = None,
              after_id: int = 0, limit: int | None = None) -> Iterator[ReviewItem]:
        """Items in id order, with their verdicts, read in pages (memory stays bounded): ``reviewed`` True / False
        keeps those with / without a verdict; ``action`` the decided action; ``policy`` one policy id."""
        raise NotImplementedError

    def thumbnail(self, item_id: int) -> bytes | None:
        raise NotImplementedError

    def embeddings(self, item_ids: Sequence[int]) -> np.ndarray:
        """``(len(item_ids), D)`` float32 in that order; rows of items without one are NaN."""
        raise NotImplementedError

    def strata(self) -> list[StratumCount]:
        """Per ``(policy, action)``: items and items with at least one verdict."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ life
    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> ReviewStore:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def open_store(location: str | os.PathLike[str], *, policy: str | None = None, create: bool = True) -> ReviewStore:
    """Open (``create``: or create) a review store: ``postgresql://user@host/db`` (psycopg 3, the ``review-pg``
    extra), else a SQLite file path.

    ``policy``: a policy *name*; a store bound to another is refused. A store that is corrupt, not a review store,
    or of a newer schema than this safeclip knows is refused with a :class:`~safeclip.errors.ReviewError` naming
    it and the fix; an older schema is migrated (each migration in one transaction, recorded). A database that
    cannot be reached raises :class:`~safeclip.errors.ReviewStoreUnavailableError`.

    >>> store = open_store(tmp_path / "review.db", policy="default")   # doctest: +SKIP
    """
    raise NotImplementedError
