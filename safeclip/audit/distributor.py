"""The local engine's decode processes: a pool of workers, one pipe each, fed and drained by a pump thread.

Workers start with ``forkserver`` (they fork from a server that already imported the decode stack, no torch:
starting or replacing one costs milliseconds), else ``spawn``; never ``fork``, since the parent runs torch's thread
pools. Workers never import the caller's ``__main__`` (both start methods would: multiprocessing re-imports the
main script or module in each child so that a target defined there can be found), so a script without an
``if __name__ == "__main__":`` guard, a notebook or ``python -c`` can run an audit: a worker's target is
:func:`~safeclip.audit.worker.worker_main`, and the preparation data of a process named :data:`WORKER_NAME` leaves
the main module out. Each worker has one BLAS/OpenMP thread and runs at ``nice`` +10, so the model's threads win
the CPU and decoding fills the gaps. The pump thread keeps a bounded number of tasks in flight and drains the workers' pipes while torch
runs, so memory stays bounded for any number of inputs.

Worker failures: each worker processes its tasks in order, so when one dies (segfault, OOM kill, ``os._exit``) the
file it was on is known exactly. It is retried once in a fresh worker, and if that dies too the file becomes an
error row (``WorkerCrash``); the worker's other queued files are re-queued. A file whose decode outlives
``task_timeout`` gets its worker killed and becomes an error row (``WorkerTimeout``). Other workers are not
disturbed.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

from ..errors import EngineError
from .worker import FileResult, WorkerConfig, open_cache, process_file, worker_main

__all__ = ["DONE", "WORKER_NAME", "DecodePool", "ThreadDecodePool", "mp_context", "worker_env"]

WORKER_NAME = "safeclip-decode"
"""The name of every decode process (what :func:`mp_context` recognises to leave ``__main__`` out)."""

_WORKER_THREAD_ENV = {
    "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "NUMEXPR_NUM_THREADS": "1",
    "VECLIB_MAXIMUM_THREADS": "1", "BLIS_NUM_THREADS": "1",
}
_ENV_LOCK = threading.Lock()


@contextlib.contextmanager
def worker_env() -> Iterator[None]:
    """Start processes with one thread per math library (a forkserver started now keeps this environment)."""
    with _ENV_LOCK:
        saved = {k: os.environ.get(k) for k in _WORKER_THREAD_ENV}
        os.environ.update(_WORKER_THREAD_ENV)
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _hide_main_from_workers() -> None:
    """Wrap :func:`multiprocessing.spawn.get_preparation_data` (once) so that the data a decode process starts
    from names no main module to re-import. Only processes named :data:`WORKER_NAME` are affected; the name is
    what the stdlib passes, so this holds for ``spawn`` and ``forkserver`` alike and for every thread."""
    from multiprocessing import spawn

    original = spawn.get_preparation_data
    if getattr(original, "safeclip_hides_main", False):
        return

    def get_preparation_data(name: str) -> dict[str, Any]:
        data = original(name)
        if name == WORKER_NAME:
            data.pop("init_main_from_path", None)
            data.pop("init_main_from_name", None)
        return data

    get_preparation_data.safeclip_hides_main = True  # type: ignore[attr-defined]
    spawn.get_preparation_data = get_preparation_data


def mp_context() -> multiprocessing.context.BaseContext:
    """``forkserver`` where available (workers fork from a server that already imported the decode stack, no
    torch: starting or replacing a worker costs milliseconds), else ``spawn``. Never ``fork``: the parent runs
    torch's thread pools. Either way the workers do not import the caller's ``__main__``."""
    _hide_main_from_workers()
    if "forkserver" in multiprocessing.get_all_start_methods():
        from multiprocessing import forkserver

        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["safeclip.audit.worker"])
        # The server is started once per process, with the environment it will pass on to every worker. Starting
        # it only launches it; its imports run on their own while this process goes on.
        with worker_env():
            forkserver.ensure_running()
        return ctx
    return multiprocessing.get_context("spawn")


class _Handle:
    __slots__ = ("proc", "conn", "outstanding", "head_since", "configured", "timed_out")

    def __init__(self, proc: Any, conn: multiprocessing.connection.Connection) -> None:
        self.proc = proc
        self.conn = conn
        self.outstanding: deque[tuple[int, str]] = deque()
        self.head_since = 0.0
        self.configured = False
        self.timed_out = False


DONE = object()
"""What :meth:`DecodePool.get` returns after the last result."""


class _Results:
    """What both pools hand the engine: each :class:`FileResult` as it comes, ``DONE`` after the last, and a failure
    of the pool's own machinery raised in the engine's thread."""

    def __init__(self) -> None:
        self._ready: queue.Queue[Any] = queue.Queue()

    def get(self, timeout: float | None) -> Any:
        """The next :class:`FileResult`, ``DONE`` after the last one, or None if nothing came within ``timeout``."""
        try:
            item = self._ready.get(timeout=timeout)
        except queue.Empty:
            return None
        if isinstance(item, BaseException):
            raise EngineError(f"the local engine's decoding failed ({type(item).__name__}: {item}); what was "
                              "committed is kept: run the same command again to resume") from item
        return item


class DecodePool(_Results):
    """Decode workers with one pipe each, fed and drained by a pump thread (see the module docstring).

    :meth:`boot` starts the processes (they import the decode stack while the model loads), :meth:`run` configures
    them and starts feeding ``(task id, path)`` tasks, :meth:`get` returns their :class:`FileResult` s as they come
    (not in input order), :meth:`close` stops them. ``restarts`` counts replaced workers.
    """

    def __init__(self, n_workers: int, *, max_pending: int, prefetch: int = 2, task_timeout: float = 120.0,
                 max_attempts: int = 2) -> None:
        super().__init__()
        self.n_workers = max(1, int(n_workers))
        self.max_pending = max(max_pending, self.n_workers * prefetch)
        self.prefetch = prefetch
        self.task_timeout = task_timeout
        self.max_attempts = max_attempts
        self.restarts = 0
        self._ctx = mp_context()
        self._handles: list[_Handle] = []
        self._retry: deque[tuple[int, str]] = deque()
        self._tasks: Iterator[tuple[int, str]] = iter(())
        self._attempts: dict[int, int] = {}
        self._config: WorkerConfig | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _spawn(self) -> _Handle:
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=worker_main, args=(child,), daemon=True, name=WORKER_NAME)
        with worker_env() if self._ctx.get_start_method() == "spawn" else contextlib.nullcontext():
            proc.start()
        child.close()
        h = _Handle(proc, parent)
        if self._config is not None:
            parent.send(self._config)
            h.configured = True
        return h

    def boot(self) -> None:
        """Start the worker processes; they import the decode stack while the model loads."""
        self._handles = [self._spawn() for _ in range(self.n_workers)]

    def run(self, config: WorkerConfig, tasks: Iterable[tuple[int, str]]) -> None:
        """Configure the workers and start feeding them ``(task id, path)`` tasks."""
        self._config = config
        self._tasks = iter(tasks)
        if not self._handles:
            self.boot()
        for h in self._handles:
            if not h.configured:
                with contextlib.suppress(OSError):
                    h.conn.send(config)
                h.configured = True
        self._thread = threading.Thread(target=self._pump_safely, name="safeclip-audit-pump", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------------------------------- pump thread
    def _pump_safely(self) -> None:
        try:
            self._pump()
        except BaseException as e:  # surface pump bugs in the main thread instead of hanging it
            self._ready.put(e)

    def _next_task(self) -> tuple[int, str] | None:
        if self._retry:
            return self._retry.popleft()
        return next(self._tasks, None)

    def _pump(self) -> None:
        exhausted = False
        while not self._stop.is_set():
            inflight = sum(len(h.outstanding) for h in self._handles)
            # Feed: least-loaded workers first, within the global bound on decoded-but-unconsumed results.
            if not exhausted or self._retry:
                for h in sorted(self._handles, key=lambda h: len(h.outstanding)):
                    while (len(h.outstanding) < self.prefetch
                           and inflight + self._ready.qsize() < self.max_pending):
                        task = self._next_task()
                        if task is None:
                            exhausted = True
                            break
                        if not h.outstanding:
                            h.head_since = time.monotonic()
                        h.outstanding.append(task)
                        inflight += 1
                        try:
                            h.conn.send(task)
                        except OSError:
                            break  # dead worker: noticed below through its sentinel
                    if exhausted and not self._retry:
                        break
            if exhausted and not self._retry and inflight == 0:
                self._ready.put(DONE)
                return
            waitables: list[Any] = [h.conn for h in self._handles] + [h.proc.sentinel for h in self._handles]
            ready = multiprocessing.connection.wait(waitables, timeout=0.2)
            now = time.monotonic()
            for h in list(self._handles):
                dead = False
                if h.conn in ready or h.proc.sentinel in ready:
                    try:
                        while h.conn.poll():
                            res = h.conn.recv()
                            if h.outstanding and h.outstanding[0][0] == res.tid:
                                h.outstanding.popleft()
                            self._attempts.pop(res.tid, None)
                            self._ready.put(res)
                            h.head_since = now
                    except (EOFError, OSError):
                        dead = True
                    if h.proc.sentinel in ready or not h.proc.is_alive():
                        dead = True
                if not dead and h.outstanding and now - h.head_since > self.task_timeout:
                    h.timed_out = True
                    with contextlib.suppress(Exception):
                        h.proc.kill()
                    dead = True
                if dead:
                    self._replace(h)

    def _replace(self, h: _Handle) -> None:
        h.proc.join(timeout=5)
        code = h.proc.exitcode
        with contextlib.suppress(Exception):
            h.conn.close()
        if h.outstanding:
            tid, path = h.outstanding.popleft()
            n = self._attempts[tid] = self._attempts.get(tid, 0) + 1
            if h.timed_out:
                self._ready.put(FileResult(tid, "error", error_kind="WorkerTimeout", error=(
                    f"decoding took longer than {self.task_timeout:g}s; the worker was killed")))
            elif n >= self.max_attempts:
                self._ready.put(FileResult(tid, "error", error_kind="WorkerCrash", error=(
                    f"the decode worker died on this file ({_describe_exit(code)}), {n} times")))
            else:
                self._retry.appendleft((tid, path))
            # Its queued files were innocent: they go back to the front of the queue, in order.
            self._retry.extendleft(reversed(h.outstanding))
        self._handles.remove(h)
        if not self._stop.is_set():
            self._handles.append(self._spawn())
            self.restarts += 1

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        for h in self._handles:
            with contextlib.suppress(Exception):
                h.conn.send(None)
        deadline = time.monotonic() + 3
        for h in self._handles:
            h.proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if h.proc.is_alive():
                h.proc.kill()
                h.proc.join(timeout=5)
            with contextlib.suppress(Exception):
                h.conn.close()
        self._handles = []


class ThreadDecodePool(_Results):
    """:class:`DecodePool`'s interface over threads of this process: what a small audit decodes with, so that no
    worker process has to start (a fork server and its imports) before its first file is decoded.

    The same per-file unit runs (:func:`~safeclip.audit.worker.process_file`, each thread with its own read-only
    cache handle), as ``Moderator`` decodes requests: Pillow's and libvips' codecs release the GIL. What a thread
    cannot have is a hard kill: a file is bounded by the decoder's own CPU budget and wall-clock backstop
    (:class:`~safeclip.decode.DecodeLimits`) instead of ``task_timeout``, and a crash in a codec would take the
    audit with it; the engine uses processes for any larger run.
    """

    def __init__(self, n_workers: int, *, max_pending: int) -> None:
        super().__init__()
        self.n_workers = max(1, int(n_workers))
        self.max_pending = max(max_pending, self.n_workers)
        self.restarts = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._local = threading.local()

    def boot(self) -> None:
        """Nothing to start: the threads come with :meth:`run`."""

    def run(self, config: WorkerConfig, tasks: Iterable[tuple[int, str]]) -> None:
        """Start decoding ``(task id, path)`` tasks on ``n_workers`` threads."""
        self._thread = threading.Thread(target=self._pump_safely, args=(config, iter(tasks)),
                                        name="safeclip-audit-pump", daemon=True)
        self._thread.start()

    def _decode(self, config: WorkerConfig, tid: int, path: str) -> FileResult:
        if not hasattr(self._local, "cache"):
            self._local.cache = open_cache(config)
        return process_file(tid, path, config, self._local.cache, {})

    def _pump_safely(self, config: WorkerConfig, tasks: Iterator[tuple[int, str]]) -> None:
        from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

        try:
            with ThreadPoolExecutor(self.n_workers, thread_name_prefix="safeclip-decode") as ex:
                running: set[Future[FileResult]] = set()
                exhausted = False
                while not self._stop.is_set():
                    while not exhausted and len(running) + self._ready.qsize() < self.max_pending:
                        task = next(tasks, None)
                        if task is None:
                            exhausted = True
                            break
                        running.add(ex.submit(self._decode, config, *task))
                    if exhausted and not running:
                        self._ready.put(DONE)
                        return
                    if not running:  # the consumer is behind: wait for it to take results
                        self._stop.wait(0.05)
                        continue
                    done, running = wait(running, timeout=0.2, return_when=FIRST_COMPLETED)
                    for f in done:
                        self._ready.put(f.result())
        except BaseException as e:  # surface bugs in the main thread instead of hanging it
            self._ready.put(e)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "no exit status"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
