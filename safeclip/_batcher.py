"""Cross-request micro-batching: concurrent requests merged into one model forward.

A :class:`MicroBatcher` owns one worker thread. Requests are admitted first (:meth:`MicroBatcher.admit` gives a
:class:`Ticket`, or raises :class:`~safeclip.errors.OverloadedError` when ``max_queue`` requests are already in
flight), then decoded by their caller, then submitted. The worker takes what is queued, up to ``max_batch`` frames,
and runs it as one batch. While the batch is not full and some admitted request is still decoding, it waits for it,
but never longer than ``max_wait_ms`` after the oldest queued request arrived; when nobody else is coming it runs at
once, so a lone request pays no wait. Requests that queue up during a forward form the next batch.

Each request gets its own result or exception; a cancelled request still queued is dropped before its batch runs.

>>> b = MicroBatcher(lambda items: [x * 2 for x in items], max_batch=8, max_wait_ms=2, max_queue=4)
>>> with b.admit() as ticket:
...     b.submit(ticket, 21).result()
42
>>> b.close()
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError, OverloadedError

__all__ = ["MicroBatcher", "Ticket"]

#: ``observer(n_requests, n_frames, seconds)``, called after each batch ran.
BatchObserver = Callable[[int, int, float], None]


class Ticket:
    """One admitted request's place in a :class:`MicroBatcher`'s bounded queue.

    Released when its result is set, when :meth:`release` is called, or at the end of a ``with`` block, whichever
    comes first (releasing twice is harmless). ``batch_requests`` and ``batch_frames`` say how many requests and
    frames shared the forward that served it (``None`` until then).
    """

    __slots__ = ("_batcher", "_released", "_future", "cancelled", "batch_requests", "batch_frames")

    def __init__(self, batcher: MicroBatcher) -> None:
        self._batcher = batcher
        self._released = False
        self._future: Future[Any] | None = None
        self.cancelled = False
        self.batch_requests: int | None = None
        self.batch_frames: int | None = None

    def release(self) -> None:
        self._batcher._release(self)

    def cancel(self) -> None:
        """The caller gave up: drop the request if it has not reached a forward yet, and free its place."""
        self.cancelled = True
        if self._future is not None:
            self._future.cancel()
        self.release()

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass
class _Entry:
    ticket: Ticket
    item: Any
    size: int
    future: Future[Any]
    arrived: float

    def dropped(self) -> bool:
        return self.ticket.cancelled or self.future.cancelled()


class MicroBatcher:
    """Runs ``run(items) -> results`` on batches of concurrently submitted items, in one worker thread.

    ``run`` returns one result per item, in order; a result that is an exception instance is raised to that item's
    caller alone. If ``run`` itself raises, every item of that batch gets the exception. ``size`` of an item is
    the number of frames it adds to a batch; a single item larger than ``max_batch`` runs alone.
    """

    def __init__(
        self,
        run: Callable[[list[Any]], Sequence[Any]],
        *,
        max_batch: int,
        max_wait_ms: float,
        max_queue: int,
        idle_s: float = 5.0,
        name: str = "safeclip-batcher",
    ) -> None:
        for what, value in (("max_batch", max_batch), ("max_queue", max_queue)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{what} must be a positive integer, not {value!r}")
        if isinstance(max_wait_ms, bool) or not isinstance(max_wait_ms, (int, float)) or not 0 <= max_wait_ms < 1e4:
            raise ConfigError(f"max_wait_ms must be a number of milliseconds in [0, 10000), not {max_wait_ms!r}")
        self._run = run
        self.max_batch = max_batch
        self.max_wait_ms = float(max_wait_ms)
        self.max_queue = max_queue
        self._idle_s = idle_s
        self._name = name
        self._cond = threading.Condition(threading.RLock())  # re-entrant: a cancel under it releases
        self._queue: deque[_Entry] = deque()
        self._admitted = 0  # tickets not yet released: decoding, queued or in a forward
        self._running = 0  # requests in the forward now
        self._thread: threading.Thread | None = None
        self._closed = False
        self._observers: list[BatchObserver] = []

    # ------------------------------------------------------------------------------------ state
    @property
    def in_flight(self) -> int:
        """Requests admitted and not yet answered (decoding, queued or in a forward)."""
        return self._admitted

    @property
    def waiting(self) -> int:
        """Requests admitted and not yet in a forward (decoding or queued)."""
        return max(0, self._admitted - self._running)

    def add_observer(self, observer: BatchObserver) -> None:
        """Call ``observer(n_requests, n_frames, seconds)`` after every batch (from the worker thread)."""
        self._observers.append(observer)

    # ------------------------------------------------------------------------------------ requests
    def admit(self) -> Ticket:
        """A place in the queue, or :class:`OverloadedError` when ``max_queue`` requests are in flight."""
        with self._cond:
            if self._closed:
                raise OverloadedError("the moderator is shutting down; retry on another instance")
            if self._admitted >= self.max_queue:
                raise OverloadedError(f"{self._admitted} requests are in flight, as many as the queue holds "
                                      f"(max_queue={self.max_queue}); retry later")
            self._admitted += 1
            return Ticket(self)

    def submit(self, ticket: Ticket, item: Any, size: int = 1) -> Future[Any]:
        """Queue ``item`` (``size`` frames) under an admitted ticket; the future gets its result."""
        future: Future[Any] = Future()
        if ticket._batcher is not self or ticket._released or ticket.cancelled:
            future.cancel()
            return future
        ticket._future = future
        future.add_done_callback(lambda _f: ticket.release())
        with self._cond:
            self._queue.append(_Entry(ticket, item, max(1, int(size)), future, time.monotonic()))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return future

    def close(self, timeout: float | None = None) -> None:
        """Admit nothing more; what is queued still runs; wait up to ``timeout`` s for the worker to finish."""
        with self._cond:
            self._closed = True
            thread = self._thread
            self._cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _release(self, ticket: Ticket) -> None:
        with self._cond:
            if ticket._released:
                return
            ticket._released = True
            self._admitted -= 1
            self._cond.notify_all()

    # ------------------------------------------------------------------------------------ the worker
    def _take_batch(self) -> list[_Entry] | None:
        """Wait for a batch worth running (under the condition); None when the worker should exit."""
        while True:
            self._drop_dropped()
            if not self._queue:
                if self._closed or not self._cond.wait(self._idle_s) and not self._queue:
                    self._thread = None  # idle: exit; the next submit starts a new worker
                    return None
                continue
            deadline = self._queue[0].arrived + self.max_wait_ms / 1e3
            while True:
                self._drop_dropped()
                if not self._queue:
                    break
                frames = sum(e.size for e in self._queue)
                coming = self._admitted - len(self._queue) - self._running  # admitted, still decoding
                remaining = deadline - time.monotonic()
                if frames >= self.max_batch or coming <= 0 or remaining <= 0 or self._closed:
                    batch, frames = [], 0
                    while self._queue and (not batch or frames + self._queue[0].size <= self.max_batch):
                        entry = self._queue.popleft()
                        batch.append(entry)
                        frames += entry.size
                    self._running = len(batch)
                    return batch
                self._cond.wait(remaining)

    def _drop_dropped(self) -> None:
        if any(e.dropped() for e in self._queue):
            kept = [e for e in self._queue if not e.dropped()]
            for e in self._queue:
                if e.dropped():
                    e.future.cancel()
            self._queue = deque(kept)

    def _loop(self) -> None:
        while True:
            with self._cond:
                batch = self._take_batch()
            if batch is None:
                return
            t0 = time.perf_counter()
            frames = sum(e.size for e in batch)
            try:
                results: Sequence[Any] = self._run([e.item for e in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"a batch of {len(batch)} gave {len(results)} results")
            except BaseException as e:  # noqa: BLE001 - handed to every caller of this batch
                results = [e] * len(batch)
            seconds = time.perf_counter() - t0
            for entry, result in zip(batch, results):
                entry.ticket.batch_requests, entry.ticket.batch_frames = len(batch), frames
                try:
                    if isinstance(result, BaseException):
                        entry.future.set_exception(result)
                    else:
                        entry.future.set_result(result)
                except InvalidStateError:  # cancelled while in the forward: its result is not wanted
                    pass
            with self._cond:
                self._running = 0
                self._cond.notify_all()
            for observer in list(self._observers):
                try:
                    observer(len(batch), frames, seconds)
                except Exception:  # noqa: BLE001 - metrics never fail a request
                    pass
