"""Sending a Moderator's decisions to a review store, off the request path.

:class:`ReviewQueue` takes each decision a Moderator makes, keeps those that fall in the policy's sample
(:func:`~safeclip.review.in_sample` at the policy's ``review: {sample: ...}`` rate for the decision's action) and
writes them to the store from one background thread, in batches. A moderation request never waits on the store and
never fails because of it: a write that fails is logged at ERROR (``safeclip.review`` logger, one line naming the
store and the cause), counted in :attr:`ReviewQueue.stats`, and, with a ``spool`` file, appended there and written to
the store on the next successful write (``safeclip review add STORE --from-spool FILE`` replays one by hand).
Without a spool, what could not be written is lost and counted as ``failed``: say ``spool=`` where that matters.
"""

from __future__ import annotations

import atexit
import base64
import json
import logging
import os
import queue
import threading
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError, ReviewError, one_line
from ..files import locked_file
from ._model import NewItem, in_sample, thumbnail_jpeg
from ._store import ReviewStore

if TYPE_CHECKING:
    from ..decide import Decision
    from ..policy import ReviewRates

__all__ = ["ReviewQueue", "ReviewQueueStats", "read_spool", "replay_spool", "write_spool"]

log = logging.getLogger("safeclip.review")

_BATCH = 64
_STOP: Any = object()


@dataclass(frozen=True)
class ReviewQueueStats:
    """Counts since the queue started: decisions ``offered``; ``sampled`` into review; ``written`` to the store
    (``duplicates`` of those were there already); ``failed`` writes lost (no spool); ``spooled`` to the spool file;
    ``replayed`` from it; ``dropped`` because ``max_pending`` items were already waiting (and no spool); ``pending``
    now."""

    offered: int
    sampled: int
    written: int
    duplicates: int
    failed: int
    spooled: int
    replayed: int
    dropped: int
    pending: int


class ReviewQueue:
    """The review hook of a :class:`~safeclip.Moderator` (``Moderator(review=...)``) and of ``safeclip serve
    --review``: decisions in the policy's sample go to ``store`` from a background thread.

    ``origin`` is recorded with each item (``"check"``, ``"serve"``); ``spool``: a local file where items the store
    could not take are kept until it can; ``max_pending``: items waiting at most (more go to the spool, or are
    dropped and counted).

    >>> queue = ReviewQueue(open_store("review.db", policy="default"), spool="review-spool.jsonl")  # doctest: +SKIP
    >>> moderator = Moderator("default", review=queue)                                             # doctest: +SKIP
    """

    def __init__(self, store: ReviewStore, *, origin: str = "check", spool: str | os.PathLike[str] | None = None,
                 max_pending: int = 10_000) -> None:
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise ConfigError(f"max_pending must be a positive integer, not {max_pending!r}")
        self.store = store
        self.origin = origin
        self.spool = None if spool is None else Path(spool)
        self.max_pending = max_pending
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(("offered", "sampled", "written", "duplicates", "failed", "spooled",
                                      "replayed", "dropped"), 0)
        self._warned_policies: set[str] = set()
        self._queue: queue.Queue[Any] = queue.Queue(max_pending)
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        _live_queues.add(self)

    # ------------------------------------------------------------------------------------------ offering
    def offer(self, decision: Decision, rates: ReviewRates, *, embedding: np.ndarray | None = None,
              pixels: np.ndarray | None = None) -> float | None:
        """Send ``decision`` to review if it falls in the sample at ``rates``: the probability it had, else
        ``None``. ``embedding``: the deciding view's ``(D,)`` embedding; ``pixels``: its ``(H, W, 3)`` frame, made
        into the thumbnail in the background. Never raises for the store's sake."""
        self._count("offered")
        policy_name = decision.policy.rpartition("@")[0]
        bound = self.store.policy_name
        if bound is not None and policy_name != bound:
            if policy_name not in self._warned_policies:
                self._warned_policies.add(policy_name)
                log.error("review store %s belongs to policy %r: decisions under %s are not sent to review (give "
                          "them a store of their own)", self.store.location, bound, decision.policy)
            return None
        rate = rates.rate(decision.action)
        key = decision.sha256 or f"unhashed:{uuid.uuid4().hex}"  # an input that never decoded has no content hash
        if not in_sample(key, decision.policy, rate):
            return None
        self._count("sampled")
        job = (key, decision, rate, None if embedding is None else np.array(embedding, np.float32, copy=True),
               None if pixels is None else np.array(pixels, np.uint8, copy=True))
        self._ensure_thread()
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            item = self._item(*job)
            if self.spool is not None and self._spool([item]):
                return rate
            self._count("dropped")
            log.error("review queue for %s is full (%d items waiting): decision %s on %s was not sent to review; "
                      "give the queue a spool file or a faster store", self.store.location, self.max_pending,
                      decision.action, key)
        return rate

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Wait until every item offered so far is written or spooled; False when ``timeout`` passed first."""
        if self._thread is None or not self._thread.is_alive():
            return self._queue.unfinished_tasks == 0
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def close(self, timeout: float | None = 30.0) -> None:
        """Flush, then stop the background thread (the store stays open: its owner closes it)."""
        self.flush(timeout)
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._queue.put(_STOP)
            thread.join(timeout)
        self._thread = None

    @property
    def stats(self) -> ReviewQueueStats:
        with self._lock:
            return ReviewQueueStats(**self._counts, pending=self._queue.qsize())

    # ------------------------------------------------------------------------------------------ writing
    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def _ensure_thread(self) -> None:
        if os.getpid() != self._pid:  # a forked child: the parent's thread and its queue are not here
            self._pid, self._queue, self._thread = os.getpid(), queue.Queue(self.max_pending), None
        if self._thread is None or not self._thread.is_alive():
            with self._lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._run, name="safeclip-review", daemon=True)
                    self._thread.start()

    def _item(self, key: str, decision: Decision, rate: float, embedding: np.ndarray | None,
              pixels: np.ndarray | None) -> NewItem:
        thumb = None
        if pixels is not None:
            try:
                thumb = thumbnail_jpeg(pixels)
            except Exception as e:  # noqa: BLE001 -- a thumbnail is for the reviewer's eyes; the item is kept without one
                log.warning("review: no thumbnail for %s: %s", key, e)
        emb = None if embedding is None else np.asarray(embedding, np.float32).reshape(-1)
        return NewItem(sha256=key, policy=decision.policy, encoder_id=decision.encoder_id, action=decision.action,
                       decision=decision.to_dict(), probability=rate, origin=self.origin, source=decision.source,
                       embedding=emb, thumbnail=thumb)

    def _run(self) -> None:
        q = self._queue
        while True:
            first = q.get()
            jobs = [first]
            while len(jobs) < _BATCH:
                try:
                    jobs.append(q.get_nowait())
                except queue.Empty:
                    break
            items = [self._item(*j) for j in jobs if isinstance(j, tuple)]
            if items:
                self._write(items)
            for j in jobs:
                if isinstance(j, threading.Event):
                    j.set()
                q.task_done()
            if any(j is _STOP for j in jobs):
                return

    def _write(self, items: Sequence[NewItem]) -> None:
        try:
            ids = self.store.add(items)
        except Exception as e:  # noqa: BLE001 -- ReviewError, or anything a driver raised: never reaches a moderation request
            where = f"kept in {self.spool}" if self.spool is not None and self._spool(items) else "lost"
            if where == "lost":
                self._count("failed", len(items))
            log.error("review store %s: could not write %d item(s) (%s): %s", self.store.location, len(items),
                      where, one_line(e))
            return
        self._count("written", len(items))
        self._count("duplicates", sum(i is None for i in ids))
        if self.spool is not None and _has_bytes(self.spool):  # a replayed spool is left empty, not removed
            try:
                self._count("replayed", replay_spool(self.store, self.spool))
            except Exception as e:  # noqa: BLE001 -- kept in the spool for the next try
                log.error("review store %s: the spool %s could not be replayed yet: %s", self.store.location,
                          self.spool, one_line(e))

    def _spool(self, items: Sequence[NewItem]) -> bool:
        assert self.spool is not None
        try:
            write_spool(self.spool, items)
        except (OSError, ValueError) as e:
            log.error("review spool %s cannot be written: %s", self.spool, one_line(e))
            return False
        self._count("spooled", len(items))
        return True


def _has_bytes(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except FileNotFoundError:
        return False


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def _item_json(item: NewItem) -> dict[str, Any]:
    emb = None if item.embedding is None else np.asarray(item.embedding, "<f4").tobytes()
    return {"sha256": item.sha256, "policy": item.policy, "encoder_id": item.encoder_id, "action": item.action,
            "decision": dict(item.decision), "probability": item.probability, "origin": item.origin,
            "source": item.source, "embedding": _b64(emb), "thumbnail": _b64(item.thumbnail)}


def write_spool(path: str | os.PathLike[str], items: Sequence[NewItem]) -> None:
    """Append ``items`` to a spool file (one JSON object per line, under its lock, synced to disk). A line torn by a
    crash mid-write is ended first, so that it costs only its own items, never the next ones."""
    text = "".join(json.dumps(_item_json(i), allow_nan=False) + "\n" for i in items).encode("utf-8")
    with locked_file(path, "a+b") as f:  # processes sharing a spool never interleave lines
        end = f.seek(0, os.SEEK_END)
        if end:
            f.seek(end - 1)
            if f.read(1) != b"\n":
                text = b"\n" + text
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def read_spool(path: str | os.PathLike[str]) -> tuple[list[NewItem], int]:
    """The items of a spool file and how many lines could not be read (a line torn by a crash mid-write)."""
    items, bad = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                d = json.loads(line)
                emb = d["embedding"]
                items.append(NewItem(
                    sha256=str(d["sha256"]), policy=str(d["policy"]), encoder_id=str(d["encoder_id"]),
                    action=str(d["action"]), decision=d["decision"], probability=float(d["probability"]),
                    origin=str(d["origin"]), source=d["source"],
                    embedding=None if emb is None else np.frombuffer(base64.b64decode(emb), "<f4").copy(),
                    thumbnail=None if d["thumbnail"] is None else base64.b64decode(d["thumbnail"])))
            except (ValueError, KeyError, TypeError):
                bad += 1
    return items, bad


def replay_spool(store: ReviewStore, path: str | os.PathLike[str]) -> int:
    """Write a spool file's items to ``store`` and empty it (under its lock); returns the items written. Items
    already in the store are skipped (the store is idempotent), so a replay that was interrupted can run again."""
    p = Path(path)
    try:
        with locked_file(p, "r+", encoding="utf-8") as f:
            items, bad = read_spool(p)
            if bad:
                log.warning("review spool %s: %d line(s) could not be read (torn by a crash mid-write) and are "
                            "skipped", p, bad)
            for start in range(0, len(items), _BATCH):
                store.add(items[start:start + _BATCH])
            f.truncate(0)
    except FileNotFoundError:
        return 0
    except OSError as e:
        raise ReviewError(f"review spool {p} cannot be read: {e}") from e
    return len(items)


_live_queues: weakref.WeakSet[ReviewQueue] = weakref.WeakSet()


@atexit.register
def _flush_at_exit() -> None:
    """A short-lived process (a script, a CLI run) writes what it sampled before it exits."""
    for q in list(_live_queues):
        if q._thread is not None and q._thread.is_alive() and q._pid == os.getpid():
            q.flush(timeout=10.0)
