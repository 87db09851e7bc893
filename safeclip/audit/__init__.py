"""Batch audits: moderate many files into one Parquet table, keep the model busy, lose nothing, resume, re-score.

:func:`audit` chains the stages for a whole collection (the other place that does so is
:class:`~safeclip.moderator.Moderator`, for requests), with the same decode -> prepare -> embed -> score -> calibrate
-> decide path, so an audit row and ``Moderator.check`` agree on the same file.

Pipeline
    Decode worker processes (``forkserver``, else ``spawn``; torch is never imported there; one BLAS/OpenMP thread
    each; ``nice`` +10 so the model's threads win the CPU and decoding fills the gaps) read each file, hash its
    bytes, look the sha256 up in the embedding cache, and only on a miss decode it (JPEG draft mode at the model's
    input size) and prepare the model's ``(S, S, 3)`` uint8 pixels. The main process runs full model batches,
    writes the new embeddings to the cache, scores, decides and commits rows. A pump thread keeps a bounded number
    of tasks in flight and drains the workers' pipes while torch runs, so memory stays bounded for any number of
    inputs.

Exactly once, resumable
    Rows are committed as Parquet part files in ``OUT.parquet.parts/`` (each written to a temporary name, fsynced,
    then renamed), always *after* the embeddings they use were committed to the cache. A re-run of the same
    command skips every input that has a committed row, and finds the embeddings of the rest in the cache, so
    after ``kill -9`` at any moment nothing committed is computed again. At the end the parts are merged, in input
    order and one row per input, into ``OUT.parquet`` (temporary file + rename), and the parts folder is removed.

Start-up and thread budget
    The workers boot while the model loads. The encoder's identity (encoder_id, pixel spec) is remembered in the
    cache folder (``encoders.json``, keyed by the model arguments and the weight files' path, size and mtime), so
    from the second run on, hashing, cache lookups and decoding start before the model has loaded; the loaded
    encoder is then checked against the guess, before anything is committed. On a CPU torch gets every core and the
    workers (one per core) run at ``nice`` +10: measured on 2 cores, this beats giving torch fewer threads (which
    leaves a core idle whenever the model, not decoding, is the bottleneck) and matches un-niced workers, while
    keeping decoding from slowing the forward passes when it is not needed.

Worker failures
    Each worker has its own pipe and processes its tasks in order, so when a worker dies (segfault, OOM kill,
    ``os._exit``) the file it was on is known exactly: it is retried once in a fresh worker, and if that dies too
    the file becomes an error row; the worker's other queued files are re-queued. A file whose decode outlives
    ``task_timeout`` gets its worker killed and becomes an error row. Other workers are not disturbed.

>>> from safeclip.audit import audit                                             # doctest: +SKIP
>>> s = audit(["photos/"], out="audit.parquet", pretrained="/models/vit-b-32.pt") # doctest: +SKIP
>>> s.actions, s.errors                                                          # doctest: +SKIP
({'allow': 220, 'flag': 2, 'block': 0}, 0)
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import multiprocessing
import multiprocessing.connection
import os
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from ..cache import CachedImage, EmbeddingCache, list_cached_encoders
from ..decide import ACTIONS, decide_codes
from ..embed import PixelSpec, PromptCache, default_cache_dir
from ..errors import (
    DecodeError,
    DecodeTimeoutError,
    EncoderMismatchError,
    ImageTooLargeError,
    ModelLoadError,
    SafeclipError,
    TruncatedImageError,
    UnsupportedFormatError,
)
from ..policy import Policy, load_policy

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa

    from ..decode import DecodeLimits
    from ..embed import Encoder
    from .._compiled import CompiledPolicy

__all__ = [
    "AuditSummary",
    "FAIL_LEVELS",
    "IMAGE_EXTENSIONS",
    "audit",
    "collect_inputs",
    "diff",
    "read_manifest",
    "rescore",
]

IMAGE_EXTENSIONS: frozenset[str] = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".webp", ".gif", ".bmp", ".dib", ".tif", ".tiff", ".mpo",
    ".avif", ".heic", ".heif",
})
"""File extensions (lower case) collected when a folder is walked. Files named explicitly are audited whatever
their extension (a non-image becomes an error row)."""

FAIL_LEVELS: tuple[str, ...] = ("flag", "block", "error")
"""``--fail-on`` levels, in increasing severity: an undecidable file (error) is worse than a block (fail closed)."""

_TEST_HOOK_ENV = "SAFECLIP_AUDIT_TEST_HOOK"  # test-only: JSON {"crash"|"abort"|"hang": [file names], "delay": s}
_WORKER_THREAD_ENV = {
    "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "NUMEXPR_NUM_THREADS": "1",
    "VECLIB_MAXIMUM_THREADS": "1", "BLIS_NUM_THREADS": "1",
}
_DETERMINISTIC_ERRORS = (UnsupportedFormatError, ImageTooLargeError, TruncatedImageError)
_FORMAT_VERSION = 1


# ================================================================================================ summary
@dataclass(frozen=True)
class AuditSummary:
    """What an :func:`audit` or :func:`rescore` run produced.

    Counts over the whole output: ``rows``, ``actions`` (allow/flag/block), ``errors``. This run only:
    ``processed`` (rows computed now), ``resumed`` (rows kept from the committed parts of an interrupted run),
    ``decoded`` (files decoded into pixels), ``embedded`` (distinct images the model embedded), ``cache_hits``
    (rows whose embedding the worker found in the cache, including copies of a file embedded earlier in this run),
    ``duplicates`` (rows decoded in this run whose sha256 was already embedded or waiting in the model's batch),
    ``worker_restarts``. ``seconds`` is the wall time of the call, ``startup_seconds`` the part spent
    loading the model, ``images_per_s`` = processed / seconds. ``timings`` breaks the time down (worker-side
    ``read_s``/``decode_s`` are summed over workers).
    """

    out: str
    rows: int
    actions: Mapping[str, int]
    errors: int
    processed: int
    resumed: int
    decoded: int
    embedded: int
    cache_hits: int
    duplicates: int
    worker_restarts: int
    seconds: float
    startup_seconds: float
    images_per_s: float
    encoder_id: str
    policy: str
    timings: Mapping[str, float] = field(default_factory=dict)

    def fails(self, level: str | None) -> bool:
        """Whether any row reaches ``level`` (``flag`` < ``block`` < ``error``); ``None`` never fails."""
        if level is None:
            return False
        if level not in FAIL_LEVELS:
            raise ValueError(f"fail-on level must be one of {FAIL_LEVELS}, not {level!r}")
        n = self.errors
        if level in ("flag", "block"):
            n += self.actions.get("block", 0)
        if level == "flag":
            n += self.actions.get("flag", 0)
        return n > 0

    def format(self) -> str:
        acts = ", ".join(f"{a} {self.actions.get(a, 0)}" for a in ACTIONS)
        return (f"{self.rows} rows -> {self.out}: {acts}, errors {self.errors} | this run: {self.processed} "
                f"processed in {self.seconds:.1f}s ({self.images_per_s:.1f} images/s, model load "
                f"{self.startup_seconds:.1f}s), {self.decoded} decoded, {self.embedded} embedded, "
                f"{self.cache_hits} cache hits, {self.duplicates} duplicates, {self.resumed} resumed"
                + (f", {self.worker_restarts} worker restarts" if self.worker_restarts else ""))


# ================================================================================================ inputs
def _walk(folder: str) -> Iterator[str]:
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                yield os.path.join(root, name)


def read_manifest(path: str | os.PathLike[str]) -> list[str]:
    """The paths a manifest lists: a ``.csv`` or ``.parquet`` file with a ``path`` column, else a text file with one
    path per line (blank lines and lines starting with ``#`` are skipped). Paths are used as written (relative ones
    relative to the working directory)."""
    p = Path(path)
    suffix = p.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            schema = pq.read_schema(p)
            if "path" not in schema.names:
                raise SafeclipError(f"manifest {p}: no 'path' column (columns: {schema.names})")
            col = pq.read_table(p, columns=["path"]).column("path")
            return [str(v) for v in col.to_pylist() if v is not None and str(v) != ""]
        if suffix == ".csv":
            with open(p, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                if reader.fieldnames is None or "path" not in reader.fieldnames:
                    raise SafeclipError(f"manifest {p}: no 'path' column (header: {reader.fieldnames})")
                return [row["path"] for row in reader if row.get("path")]
        with open(p, encoding="utf-8") as f:
            return [s for s in (line.strip() for line in f) if s and not s.startswith("#")]
    except SafeclipError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, csv.Error) as e:
        raise SafeclipError(f"cannot read manifest {p}: {e}") from e


def collect_inputs(
    paths: Iterable[str | os.PathLike[str]] = (), manifests: Iterable[str | os.PathLike[str]] = ()
) -> list[str]:
    """The inputs of an audit, in order, each once: files as given, folders walked recursively (sorted, image
    extensions only, see :data:`IMAGE_EXTENSIONS`), then the paths of each manifest (:func:`read_manifest`)."""
    out: list[str] = []
    for p in paths:
        s = os.fspath(p)
        if os.path.isdir(s):
            out.extend(_walk(s))
        else:
            out.append(s)  # a missing file becomes an error row, not a crash
    for m in manifests:
        out.extend(read_manifest(m))
    return list(dict.fromkeys(out))


# ================================================================================================ workers
@dataclass(frozen=True)
class _WorkerConfig:
    cache_dir: str | None
    encoder_id: str
    spec: PixelSpec
    limits: Any  # DecodeLimits (imported lazily: the parent may not need decode at import time)
    fingerprint: str
    nice: int
    hook: str | None
    fast: bool = True


@dataclass
class _Result:
    tid: int
    kind: str  # "hit" | "pixels" | "error"
    sha256: str | None = None
    nbytes: int | None = None
    width: int | None = None
    height: int | None = None
    n_frames: int | None = None
    frame_indices: tuple[int, ...] = ()
    format: str | None = None
    pixels: np.ndarray | None = None  # (F, S, S, 3) uint8
    embeddings: np.ndarray | None = None  # (F, D) float32, cache hits
    error: str | None = None
    error_kind: str | None = None
    cacheable_error: bool = False  # a deterministic decode failure of these bytes
    decoded: bool = False
    read_s: float = 0.0
    decode_s: float = 0.0


def _decoder_fingerprint(limits: Any, target_size: int | None) -> str:
    """What a decode failure depends on besides the bytes: Pillow, the decoder's version, its limits, the target size."""
    import PIL

    from ..decode import DECODER_VERSION

    blob = json.dumps([PIL.__version__, repr(limits), target_size, DECODER_VERSION])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _worker_main(conn: multiprocessing.connection.Connection) -> None:
    """A decode worker: receives its config, then ``(task id, path)`` tasks, answers each with a :class:`_Result`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it then stops the workers
    import warnings

    warnings.simplefilter("ignore")  # Pillow's per-file UserWarnings: the outcome of each file is its row
    try:
        msg = conn.recv()
    except (EOFError, OSError):  # the parent went away before configuring us
        return
    if msg is None:
        return
    cfg: _WorkerConfig = msg
    if cfg.nice:
        with contextlib.suppress(OSError):
            os.nice(cfg.nice)
    from ..decode import decode, read_source
    from ..embed import prepare_pixels

    cache = None
    if cfg.cache_dir is not None:
        with contextlib.suppress(SafeclipError):
            cache = EmbeddingCache(cfg.cache_dir, cfg.encoder_id, readonly=True)
    hook = json.loads(cfg.hook) if cfg.hook else {}
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):  # the parent is gone (even kill -9): nothing left to do
            return
        if task is None:
            return
        res = _process(task[0], task[1], cfg, cache, hook, decode, read_source, prepare_pixels)
        try:
            conn.send(res)
        except OSError:
            return


def _process(tid: int, path: str, cfg: _WorkerConfig, cache: EmbeddingCache | None, hook: Mapping[str, Any],
             decode: Any, read_source: Any, prepare_pixels: Any) -> _Result:
    """One file: read and hash it, look it up in the cache, and only on a miss decode it into model pixels."""
    res = _Result(tid, "error")
    try:
        t0 = time.perf_counter()
        data, _ = read_source(path, max_bytes=cfg.limits.max_bytes)
        if data is None:  # only for in-memory images, never for a path
            raise DecodeError("no bytes read", path)
        res.nbytes = len(data)
        res.sha256 = sha = hashlib.sha256(data).hexdigest()
        res.read_s = time.perf_counter() - t0
        if cache is not None:
            hit = cache.get(sha)
            if hit is not None:
                res.kind, res.embeddings = "hit", hit.embeddings
                res.width, res.height, res.n_frames = hit.width, hit.height, hit.n_frames
                res.frame_indices, res.format = hit.frame_indices, hit.format
                return res
            known = cache.get_decode_errors([sha], cfg.fingerprint).get(sha)
            if known is not None:
                res.error_kind, res.error = known
                return res
        if hook:
            _test_hook(hook, path)
        t1 = time.perf_counter()
        res.decoded = True
        # The same decode and pixel path as Moderator._prepare, so rows and Moderator.check agree.
        dec = decode(data, limits=cfg.limits, target_size=cfg.spec.size if cfg.fast else None)
        res.pixels = np.stack([prepare_pixels(f, cfg.spec, fast=cfg.fast) for f in dec.frames])
        res.decode_s = time.perf_counter() - t1
        res.kind = "pixels"
        res.width, res.height = dec.size
        res.n_frames, res.frame_indices, res.format = dec.n_frames, tuple(dec.frame_indices), dec.format
    except DecodeError as e:
        res.error_kind, res.error = type(e).__name__, e.reason
        res.cacheable_error = (res.sha256 is not None and isinstance(e, _DETERMINISTIC_ERRORS)
                               and not isinstance(e, DecodeTimeoutError) and "memory" not in e.reason)
    except MemoryError:
        res.error_kind, res.error = "MemoryError", "ran out of memory decoding this file"
    except Exception as e:  # decode promises DecodeError only; never let one file take the worker down
        res.error_kind, res.error = type(e).__name__, f"unexpected error while decoding: {e}"
    return res


def _test_hook(hook: Mapping[str, Any], path: str) -> None:
    """Test-only failure injection (see ``_TEST_HOOK_ENV``): lets tests kill or hang a worker on a chosen file."""
    name = os.path.basename(path)
    if hook.get("delay"):
        time.sleep(float(hook["delay"]))
    if name in hook.get("crash", ()):
        os._exit(70)
    if name in hook.get("abort", ()):
        os.abort()
    if name in hook.get("hang", ()):
        time.sleep(3600)


_ENV_LOCK = threading.Lock()


@contextlib.contextmanager
def _worker_env() -> Iterator[None]:
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


def _mp_context() -> multiprocessing.context.BaseContext:
    """``forkserver`` where available (workers fork from a server that already imported the decode stack, no
    torch: starting or replacing a worker costs milliseconds), else ``spawn``. Never ``fork``: the parent runs
    torch's thread pools."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        from multiprocessing import forkserver

        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["safeclip.audit", "safeclip.decode", "safeclip.embed"])
        # The server is started once per process, with the environment it will pass on to every worker. Starting
        # it only launches it; its imports run on their own while this process goes on.
        with _worker_env():
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


_DONE = object()


class _DecodePool:
    """Decode workers with one pipe each, fed and drained by a pump thread (see the module docstring)."""

    def __init__(self, n_workers: int, *, max_pending: int, prefetch: int = 2, task_timeout: float = 120.0,
                 max_attempts: int = 2) -> None:
        self.n_workers = max(1, int(n_workers))
        self.max_pending = max(max_pending, self.n_workers * prefetch)
        self.prefetch = prefetch
        self.task_timeout = task_timeout
        self.max_attempts = max_attempts
        self.restarts = 0
        self._ctx = _mp_context()
        self._handles: list[_Handle] = []
        self._ready: queue.Queue[Any] = queue.Queue()
        self._retry: deque[tuple[int, str]] = deque()
        self._tasks: Iterator[tuple[int, str]] = iter(())
        self._attempts: dict[int, int] = {}
        self._config: _WorkerConfig | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _spawn(self) -> _Handle:
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=_worker_main, args=(child,), daemon=True, name="safeclip-decode")
        with _worker_env() if self._ctx.get_start_method() == "spawn" else contextlib.nullcontext():
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

    def run(self, config: _WorkerConfig, tasks: Iterable[tuple[int, str]]) -> None:
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

    def get(self, timeout: float | None) -> Any:
        """The next :class:`_Result`, ``_DONE`` after the last one, or None if nothing came within ``timeout``."""
        try:
            item = self._ready.get(timeout=timeout)
        except queue.Empty:
            return None
        if isinstance(item, BaseException):
            raise RuntimeError("the audit's decode pump failed") from item
        return item

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
                self._ready.put(_DONE)
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
                self._ready.put(_Result(tid, "error", error_kind="WorkerTimeout", error=(
                    f"decoding took longer than {self.task_timeout:g}s; the worker was killed")))
            elif n >= self.max_attempts:
                self._ready.put(_Result(tid, "error", error_kind="WorkerCrash", error=(
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


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "no exit status"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


# ================================================================================================ rows
def _categories_of(policy: Policy) -> tuple[str, ...]:
    return policy.category_names


def _schema(categories: Sequence[str], meta: Mapping[str, Any], save_embeddings: bool) -> pa.Schema:
    import pyarrow as pa

    fields = [
        pa.field("path", pa.string()),
        pa.field("sha256", pa.string()),
        pa.field("bytes", pa.int64()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("frames", pa.int32()),
        pa.field("action", pa.string()),
        *[pa.field(f"p_{c}", pa.float32()) for c in categories],
        pa.field("error", pa.string()),
        pa.field("encoder_id", pa.string()),
        pa.field("policy", pa.string()),
    ]
    if save_embeddings:
        fields.append(pa.field("embedding", pa.list_(pa.float32())))
    return pa.schema(fields, metadata={b"safeclip": json.dumps(dict(meta), sort_keys=True).encode()})


def _read_meta(schema: pa.Schema) -> dict[str, Any]:
    raw = (schema.metadata or {}).get(b"safeclip")
    try:
        return json.loads(raw) if raw else {}
    except ValueError:
        return {}


def _decide(comp: CompiledPolicy, emb: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image ``(action codes (n,), probabilities (n, C))`` for images whose frames are
    ``emb[offsets[i]:offsets[i + 1]]``: the worst frame wins (highest action, then highest probability, first
    such frame), the rule of ``Moderator._decision``."""
    scores = comp.scorer.score(emb)
    probs, _ = comp.probabilities(scores)
    probs = np.asarray(probs, np.float32)
    codes = decide_codes(probs, comp.policy)
    counts = np.diff(offsets)
    pick = offsets[:-1].copy()
    multi = np.nonzero(counts > 1)[0]
    if len(multi):
        # (code, max prob) in lexicographic order as one float: probabilities lie in [0, 1] and codes step by 2.
        key = codes.max(axis=1).astype(np.float64) * 2.0 + probs.max(axis=1).astype(np.float64)
        for i in multi:
            a, b = int(offsets[i]), int(offsets[i + 1])
            pick[i] = a + int(np.argmax(key[a:b]))  # argmax takes the first maximum, like max() does
    codes = codes[pick]
    return (codes.max(axis=1) if codes.shape[1] else np.zeros(len(pick), np.int8)), probs[pick]


def _decide_frames(comp: CompiledPolicy, embs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_decide` for a list of per-image ``(F_i, D)`` frame embeddings (the form both engines hold them in)."""
    offsets = np.zeros(len(embs) + 1, np.int64)
    np.cumsum([len(e) for e in embs], out=offsets[1:])
    return _decide(comp, np.concatenate(embs), offsets)


class _Rows:
    """A columnar buffer of output rows."""

    def __init__(self, n_categories: int, save_embeddings: bool) -> None:
        self.c = n_categories
        self.save_embeddings = save_embeddings
        self.cols: dict[str, list[Any]] = {k: [] for k in (
            "path", "sha256", "bytes", "width", "height", "frames", "action", "error")}
        self.probs: list[np.ndarray | None] = []
        self.emb: list[np.ndarray | None] = []

    def __len__(self) -> int:
        return len(self.probs)

    def add(self, path: str | None, sha: str | None, nbytes: int | None, width: int | None, height: int | None,
            frames: int | None, action: str | None, probs: np.ndarray | None, error: str | None,
            emb: np.ndarray | None = None) -> None:
        c = self.cols
        c["path"].append(path)
        c["sha256"].append(sha)
        c["bytes"].append(nbytes)
        c["width"].append(width)
        c["height"].append(height)
        c["frames"].append(frames)
        c["action"].append(action)
        c["error"].append(error)
        self.probs.append(probs)
        if self.save_embeddings:
            self.emb.append(emb)

    def table(self, schema: pa.Schema, categories: Sequence[str], encoder_id: str, policy_id: str) -> pa.Table:
        import pyarrow as pa

        n = len(self)
        arrays: dict[str, Any] = {k: v for k, v in self.cols.items()}
        mat = np.full((n, self.c), np.nan, np.float32)
        valid = np.zeros(n, bool)
        for i, p in enumerate(self.probs):
            if p is not None:
                mat[i] = p
                valid[i] = True
        for j, name in enumerate(categories):
            arrays[f"p_{name}"] = pa.array(mat[:, j], pa.float32(), mask=~valid)
        arrays["encoder_id"] = [encoder_id] * n
        arrays["policy"] = [policy_id] * n
        if self.save_embeddings:
            arrays["embedding"] = [None if e is None else np.asarray(e, np.float32).ravel() for e in self.emb]
        return pa.Table.from_arrays([pa.array(arrays[f.name], f.type) for f in schema], schema=schema)


# ================================================================================================ parts
def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_parquet_atomic(table: pa.Table, path: Path) -> None:
    import pyarrow.parquet as pq

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    _fsync_dir(path.parent)


class _Parts:
    """``OUT.parquet.parts/``: the committed rows of a run in progress (see the module docstring)."""

    def __init__(self, out: Path, run: Mapping[str, Any]) -> None:
        self.out = out
        self.dir = out.with_name(out.name + ".parts")
        self.run = dict(run)
        self._lock_fd: int | None = None
        self._next = 0
        self.previous: Any = None

    def open(self) -> set[str]:
        """Lock the folder; return the paths that already have a committed row of this same run. Nothing is
        deleted until :meth:`begin` (the run's identity may still be a prediction)."""
        import pyarrow.parquet as pq

        self.out.parent.mkdir(parents=True, exist_ok=True)
        for stale in self.out.parent.glob(f"{self.dir.name}.done-*"):
            shutil.rmtree(stale, ignore_errors=True)
        self.dir.mkdir(exist_ok=True)
        self._lock()
        for tmp in self.dir.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        try:
            self.previous = json.loads((self.dir / "run.json").read_text())
        except (OSError, ValueError):
            self.previous = None
        done: set[str] = set()
        if self.previous != self.run:
            return done
        for p in sorted(self.dir.glob("part-*.parquet")):
            try:
                done.update(v for v in pq.read_table(p, columns=["path"]).column("path").to_pylist() if v)
            except Exception:  # parts are renamed into place whole, so this is outside damage: recompute them
                p.unlink(missing_ok=True)
                continue
            self._next = max(self._next, int(p.stem.split("-")[1]) + 1)
        return done

    def begin(self) -> None:
        """Make the folder this run's: parts of another configuration (policy, encoder) are dropped."""
        if self.previous == self.run:
            return
        parts = sorted(self.dir.glob("part-*.parquet"))
        if parts:
            print(f"safeclip audit: {self.dir} holds rows of another configuration "
                  f"({(self.previous or {}).get('policy')}, {(self.previous or {}).get('encoder_id')}); starting "
                  "over (the embedding cache still saves the model work)", file=sys.stderr)
        for p in parts:
            p.unlink()
        self._next = 0
        tmp = self.dir / f".run.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(self.run, sort_keys=True))
        os.replace(tmp, self.dir / "run.json")
        _fsync_dir(self.dir)
        self.previous = self.run

    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - no advisory locks on this platform
            return
        fd = os.open(self.dir / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            raise SafeclipError(f"another audit is writing {self.out} (lock held on {self.dir / 'LOCK'})") from e
        self._lock_fd = fd

    def commit(self, table: pa.Table) -> None:
        if table.num_rows:
            _write_parquet_atomic(table, self.dir / f"part-{self._next:06d}.parquet")
            self._next += 1

    def merge(self, inputs: Sequence[str], schema: pa.Schema) -> pa.Table:
        """Merge the parts into ``OUT`` (input order, one row per input), then remove the parts folder."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        tables = [pq.read_table(p).cast(schema) for p in sorted(self.dir.glob("part-*.parquet"))]
        table = pa.concat_tables(tables) if tables else schema.empty_table()
        idx = pc.index_in(table.column("path"), value_set=pa.array(inputs, pa.string()))
        table = table.filter(pc.is_valid(idx))
        idx = pc.drop_null(idx).to_numpy()
        order = np.argsort(idx, kind="stable")
        idx = idx[order]
        keep = np.ones(len(idx), bool)
        keep[1:] = idx[1:] != idx[:-1]  # exactly once, even if a part were ever duplicated
        table = table.take(pa.array(order[keep]))
        if table.num_rows != len(inputs):
            raise RuntimeError(f"internal error: {table.num_rows} rows for {len(inputs)} inputs in {self.dir}")
        _write_parquet_atomic(table.replace_schema_metadata(schema.metadata), self.out)
        self.remove()
        return table

    def remove(self) -> None:
        gone = self.dir.with_name(f"{self.dir.name}.done-{os.getpid()}")
        with contextlib.suppress(OSError):
            os.replace(self.dir, gone)  # one atomic step: a kill now leaves only a folder to delete
            _fsync_dir(self.dir.parent)
            shutil.rmtree(gone, ignore_errors=True)
        self.release()

    def release(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = None


# ================================================================================================ audit
def _release(parts: _Parts | None, db: EmbeddingCache | None, scratch: str | None) -> None:
    """End of a run, however it ended: unlock the output, checkpoint and close the cache, drop a private cache."""
    if parts is not None:
        parts.release()
    if db is not None:
        db.checkpoint()
        db.close()
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)


def _warm_pyarrow() -> None:
    with contextlib.suppress(Exception):
        import io

        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"x": [1]}), io.BytesIO(), compression="zstd")


def _cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _policy_fingerprint(policy: Policy) -> str:
    return hashlib.sha256(repr(policy).encode()).hexdigest()[:16]


def _summarize(table: pa.Table, **kw: Any) -> AuditSummary:
    import pyarrow.compute as pc

    counts = {a: 0 for a in ACTIONS}
    vc = pc.value_counts(table.column("action")).to_pylist() if table.num_rows else []
    for item in vc:
        if item["values"] is not None:
            counts[item["values"]] = int(item["counts"])
    errors = int(table.num_rows - pc.count(table.column("error"), mode="only_null").as_py()) if table.num_rows else 0
    seconds = kw.pop("seconds")
    processed = kw["processed"]
    return AuditSummary(rows=table.num_rows, actions=MappingProxyType(counts), errors=errors, seconds=seconds,
                        images_per_s=processed / seconds if seconds > 0 else 0.0, **kw)


@dataclass(frozen=True)
class _Identity:
    """What the workers and the output depend on: the embedding space, its pixel spec and dimension."""

    encoder_id: str
    spec: PixelSpec
    dim: int

    @classmethod
    def of(cls, enc: Encoder) -> _Identity:
        return cls(enc.encoder_id, enc.pixel_spec, int(enc.dim))

    def run_meta(self, policy: Policy, save_embeddings: bool) -> dict[str, Any]:
        return {"format": _FORMAT_VERSION, "kind": "audit", "encoder_id": self.encoder_id, "policy": policy.id,
                "policy_fingerprint": _policy_fingerprint(policy), "categories": list(policy.category_names),
                "dim": self.dim, "save_embeddings": bool(save_embeddings)}

    @staticmethod
    def recall(cache_dir: Path, key: str | None) -> _Identity | None:
        if key is None:
            return None
        try:
            entry = json.loads((cache_dir / "encoders.json").read_text())[key]
            return _Identity(str(entry["encoder_id"]), PixelSpec(**{
                k: tuple(v) if isinstance(v, list) else v for k, v in entry["spec"].items()}), int(entry["dim"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def remember(self, cache_dir: Path, key: str | None) -> None:
        if key is None:
            return
        path = cache_dir / "encoders.json"
        try:
            memo = json.loads(path.read_text())
        except (OSError, ValueError):
            memo = {}
        memo[key] = {"encoder_id": self.encoder_id, "spec": dataclasses.asdict(self.spec), "dim": self.dim}
        with contextlib.suppress(OSError):
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".encoders.json.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(memo, indent=1, sort_keys=True))
            os.replace(tmp, path)


def _encoder_memo_key(model: str | None, pretrained: str | None) -> str | None:
    """A key for what ``Encoder(model, pretrained)`` will load: the arguments, the weight files' identity
    (path, size, mtime, as the encoder's own checkpoint-hash memo uses), and the code that derives the identity."""
    import importlib.metadata

    model = model or os.environ.get("SAFECLIP_MODEL")
    pretrained = pretrained or os.environ.get("SAFECLIP_PRETRAINED")
    files: list[Any] = []
    candidates: list[Path] = []
    if model and model.startswith("local-dir:"):
        folder = Path(model[len("local-dir:"):])
        candidates += sorted(folder.iterdir()) if folder.is_dir() else []
    if pretrained and Path(pretrained).expanduser().is_file():
        candidates.append(Path(pretrained).expanduser())
    for f in candidates:
        with contextlib.suppress(OSError):
            st = f.stat()
            files.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    from ..embed import IDENTITY_VERSION

    try:
        code = [importlib.metadata.version("open_clip_torch"), IDENTITY_VERSION]
    except importlib.metadata.PackageNotFoundError:
        return None
    blob = json.dumps([model, pretrained, files, code])
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _prompts_also_in(cache_dir: Path, enc: Encoder) -> Callable[[list[str]], np.ndarray]:
    """``enc.embed_texts`` that also leaves the prompt embeddings in ``cache_dir``, where :func:`rescore` looks."""
    own = PromptCache(enc.encoder_id, cache_dir)

    def embed_texts(texts: list[str]) -> np.ndarray:
        vecs = enc.embed_texts(texts)
        missing = own.missing(texts)
        if missing and own.path != enc.prompt_cache.path:
            first = {t: i for i, t in reversed(list(enumerate(texts)))}
            own.put(missing, vecs[[first[t] for t in missing]])
        return vecs

    return embed_texts


class _Item:
    __slots__ = ("idx", "sha", "nbytes", "width", "height", "n_frames", "frame_indices", "format", "emb")

    def __init__(self, idx: int, r: _Result) -> None:
        self.idx = idx
        self.sha = r.sha256
        self.nbytes = r.nbytes
        self.width = r.width
        self.height = r.height
        self.n_frames = r.n_frames
        self.frame_indices = r.frame_indices
        self.format = r.format
        self.emb: np.ndarray | None = r.embeddings


def audit(
    paths: Iterable[str | os.PathLike[str]] = (),
    *,
    out: str | os.PathLike[str],
    manifests: Iterable[str | os.PathLike[str]] = (),
    policy: str | os.PathLike[str] | Policy | None = None,
    model: str | None = None,
    pretrained: str | None = None,
    device: str | None = None,
    cache: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    workers: int | None = None,
    batch_size: int | None = None,
    encoder: Encoder | None = None,
    save_embeddings: bool = False,
    decode_limits: DecodeLimits | None = None,
    fast_decode: bool = True,
    part_rows: int = 2048,
    part_seconds: float = 60.0,
    task_timeout: float | None = None,
    torch_threads: int | None = None,
    worker_nice: int = 10,
    progress: bool | None = None,
    verbose: bool = True,
    engine: str = "local",
    address: str | None = None,
    ray_options: Mapping[str, Any] | None = None,
) -> AuditSummary:
    """Moderate every input into ``out`` (Parquet, one row per input, input order); resumable; see the module doc.

    ``paths``: files and folders (walked recursively for :data:`IMAGE_EXTENSIONS`); ``manifests``: text / CSV /
    Parquet lists of paths (:func:`read_manifest`). ``cache``: the cache folder (embeddings and prompt embeddings;
    default :func:`~safeclip.embed.default_cache_dir`); ``use_cache=False`` neither reads nor writes embeddings.
    ``workers``: decode processes (default: one per core); ``batch_size``: images per model forward (default: the
    encoder's). ``encoder``: an already loaded :class:`~safeclip.embed.Encoder` (then ``model``/``pretrained``/
    ``device`` are unused). ``save_embeddings`` adds an ``embedding`` column (frames x D, flattened) that
    :func:`rescore` can use instead of the cache. ``part_rows``/``part_seconds``: how often rows are committed.
    ``task_timeout``: seconds before a stuck decode worker is killed (default ``6 x decode_limits.timeout_s``).
    ``torch_threads``: the model's intra-op threads (default: every core on CPU), restored afterwards.
    ``verbose``: print the summary to stderr; ``progress``: a progress bar on stderr (default: when it is a TTY).
    ``engine="ray"`` runs the same decode and embed/score functions on Ray Data (``pip install 'safeclip[ray]'``;
    ``address``: the cluster, else the running or a new local Ray runtime; ``ray_options``: the keyword arguments
    of :func:`safeclip.audit_ray.audit_ray`), writing the same ``out``; see :mod:`safeclip.audit_ray`.

    Columns: ``path, sha256, bytes, width, height, frames, action, p_<category>..., error, encoder_id, policy``.
    A file that cannot be read or decoded is a row with ``error`` set and ``action`` null. With the ``spawn``/
    ``forkserver`` start methods a script calling this must guard its entry point with
    ``if __name__ == "__main__":``.

    >>> import pandas as pd, tempfile, os
    >>> from safeclip.audit import audit
    >>> out = os.path.join(tempfile.mkdtemp(), "audit.parquet")
    >>> s = audit(["photos/"], out=out, pretrained="/models/vit-b-32.pt")   # doctest: +SKIP
    >>> s.rows == len(pd.read_parquet(out))                                  # doctest: +SKIP
    True
    """
    from ..decode import DecodeLimits

    t_start = time.monotonic()
    out = Path(out)
    manifests = list(manifests)
    inputs = collect_inputs(paths, manifests)
    if not inputs:
        raise SafeclipError("no inputs: give image files, folders with image files, or a manifest")
    if out.is_dir():
        raise SafeclipError(f"--out {out} is a folder; give the path of the Parquet file to write")
    pol = load_policy(policy)
    cache_dir = Path(cache) if cache is not None else default_cache_dir()
    limits = decode_limits or DecodeLimits()
    n_workers = max(1, int(workers)) if workers else min(_cpu_count(), 32)
    if part_rows < 1:
        raise ValueError(f"part_rows must be >= 1, got {part_rows}")
    if engine not in ("local", "ray"):
        raise SafeclipError(f"engine must be 'local' or 'ray', not {engine!r}")
    if engine == "ray":
        from .ray import audit_ray

        return audit_ray(
            inputs, out=out, policy=pol, model=model, pretrained=pretrained, device=device, cache_dir=cache_dir,
            use_cache=use_cache, workers=workers, batch_size=batch_size, encoder=encoder,
            save_embeddings=save_embeddings, decode_limits=limits, fast_decode=fast_decode, shard_rows=part_rows,
            task_timeout=task_timeout, torch_threads=torch_threads, progress=progress, verbose=verbose,
            address=address, t_start=t_start, **dict(ray_options or {}))
    if address is not None or ray_options:
        raise SafeclipError("address and ray_options are for engine='ray'")
    hook = os.environ.get(_TEST_HOOK_ENV) or None

    timings = dict.fromkeys(("model_load_s", "wait_s", "embed_s", "score_s", "write_s", "read_s", "decode_s",
                             "merge_s"), 0.0)
    pool: _DecodePool | None = None
    parts: _Parts | None = None
    db: EmbeddingCache | None = None
    pbar: Any = None
    torch_prev: int | None = None
    scratch = None if use_cache else tempfile.mkdtemp(prefix="safeclip-audit-")  # a private, per-run cache
    emb_dir = Path(scratch) if scratch else cache_dir
    categories = _categories_of(pol)

    def new_pool() -> _DecodePool:
        p = _DecodePool(n_workers, max_pending=max(256, 4 * (batch_size or 16), 4 * n_workers),
                        task_timeout=task_timeout or max(60.0, 6 * float(limits.timeout_s)))
        p.boot()  # the workers import the decode stack (no torch) while the model loads
        return p

    def start(pool: _DecodePool, ident: _Identity) -> tuple[_Parts, set[str], EmbeddingCache]:
        """Open the output's parts and the cache of this embedding space; start decoding what is left to do."""
        meta = ident.run_meta(pol, save_embeddings)
        prts = _Parts(out, meta)
        done = prts.open()
        cache_db = EmbeddingCache(emb_dir, ident.encoder_id)  # created before the workers open it read-only
        fp = _decoder_fingerprint(limits, ident.spec.size if fast_decode else None)
        pool.run(_WorkerConfig(str(emb_dir), ident.encoder_id, ident.spec, limits, fp, worker_nice, hook,
                               fast_decode), ((i, p) for i, p in enumerate(inputs) if p not in done))  # lazily
        return prts, done, cache_db

    # pyarrow's import and first Parquet write take ~0.4 s: pay them on a spare thread while the model loads.
    threading.Thread(target=_warm_pyarrow, name="safeclip-warm-pyarrow", daemon=True).start()
    booting: dict[str, Any] = {}
    booter: threading.Thread | None = None
    try:
        t0 = time.monotonic()
        if encoder is not None:
            enc = encoder
            pool = new_pool()
            parts, committed, db = start(pool, _Identity.of(enc))
            if torch_threads:
                import torch

                torch_prev = torch.get_num_threads()
                torch.set_num_threads(torch_threads)
        else:
            # An audit run before with the same weights told us the encoder's identity: start hashing, cache
            # lookups and decoding now, while the model loads (seconds on a CPU), and check the guess after.
            memo_key = _encoder_memo_key(model, pretrained)
            guess = _Identity.recall(cache_dir, memo_key)
            _mp_context()  # start the fork server here, before torch is imported (it reads the environment)

            def boot() -> None:  # waits on the fork server's imports: a thread, so the model load goes on
                try:
                    booting["pool"] = new_pool()
                    if guess is not None:
                        booting["started"] = start(booting["pool"], guess)
                except BaseException as e:
                    booting["error"] = e

            booter = threading.Thread(target=boot, name="safeclip-audit-boot", daemon=True)
            booter.start()
            import torch

            from ..embed import Encoder, resolve_device

            torch_prev = torch.get_num_threads()
            dev = resolve_device(device)
            if not dev.startswith(("cuda", "mps")):
                torch.set_num_threads(torch_threads or _cpu_count())
            enc = Encoder(model, pretrained, device=dev, batch_size=batch_size, cache_dir=cache_dir)
            booter.join()
            booter = None
            pool = booting.get("pool")
            if "error" in booting:
                raise booting["error"]
            assert pool is not None  # set by boot() unless it raised
            parts, committed, db = booting.get("started", (None, set(), None))
            actual = _Identity.of(enc)
            if guess != actual:
                if guess is not None:  # a wrong guess: nothing was committed yet; start again, properly
                    pool.close()
                    pool = new_pool()
                    if parts is not None:
                        parts.release()
                    if db is not None:
                        db.close()
                parts, committed, db = start(pool, actual)
                actual.remember(cache_dir, memo_key)
        from .._compiled import CompiledPolicy

        comp = CompiledPolicy.build(pol, _prompts_also_in(cache_dir, enc), enc.encoder_id)
        timings["model_load_s"] = startup = time.monotonic() - t0
        meta = _Identity.of(enc).run_meta(pol, save_embeddings)
        schema = _schema(categories, meta, save_embeddings)
        parts.begin()
        fingerprint = _decoder_fingerprint(limits, enc.pixel_spec.size if fast_decode else None)
        resumed = len(committed & set(inputs))
        todo_n = len(inputs) - resumed

        if progress is None:
            progress = verbose and sys.stderr.isatty()
        if progress and todo_n:
            from tqdm import tqdm

            pbar = tqdm(total=todo_n, unit="img", file=sys.stderr, dynamic_ncols=True, smoothing=0.1,
                        desc="audit")
        target = int(batch_size or enc.batch_size)
        rows = _Rows(len(categories), save_embeddings)
        stats = dict.fromkeys(("decoded", "embedded", "cache_hits", "duplicates"), 0)
        batch: dict[str, tuple[_Item, np.ndarray, list[_Item]]] = {}
        batch_frames = 0
        batch_since = 0.0
        ready: list[_Item] = []
        new_errors: list[tuple[str, str, str]] = []
        last_commit = time.monotonic()

        def score_ready() -> None:
            if not ready:
                return
            t = time.monotonic()
            codes, probs = _decide_frames(comp, [it.emb for it in ready])  # type: ignore[arg-type]
            for k, it in enumerate(ready):
                rows.add(inputs[it.idx], it.sha, it.nbytes, it.width, it.height, it.n_frames, ACTIONS[codes[k]],
                         probs[k], None, it.emb)
            if pbar is not None:
                pbar.update(len(ready))
            ready.clear()
            timings["score_s"] += time.monotonic() - t

        def flush() -> None:
            nonlocal batch_frames
            if batch:
                t = time.monotonic()
                emb = enc.embed_pixels(np.concatenate([pix for _, pix, _ in batch.values()]))
                timings["embed_s"] += time.monotonic() - t
                t = time.monotonic()
                new: list[CachedImage] = []
                row = 0
                for sha, (first, pix, waiters) in batch.items():
                    e = emb[row:row + len(pix)]
                    row += len(pix)
                    new.append(CachedImage(sha, e, first.frame_indices, first.width or 0, first.height or 0,
                                           first.n_frames or 1, first.nbytes or 0, first.format or ""))
                    for it in waiters:
                        it.emb = e
                        ready.append(it)
                db.put_many(new)  # before any row that uses these embeddings is committed
                stats["embedded"] += len(batch)
                batch.clear()
                batch_frames = 0
                timings["write_s"] += time.monotonic() - t
            score_ready()

        def commit(force: bool = False) -> None:
            nonlocal rows, last_commit
            if not len(rows) or not (force or len(rows) >= part_rows or time.monotonic() - last_commit > part_seconds):
                return
            # Every row in `rows` already has its embedding committed to the cache (flush writes the cache first).
            t = time.monotonic()
            if new_errors:
                db.put_decode_errors(new_errors, fingerprint)
                new_errors.clear()
            parts.commit(rows.table(schema, categories, enc.encoder_id, pol.id))  # type: ignore[union-attr]
            rows = _Rows(len(categories), save_embeddings)
            last_commit = time.monotonic()
            timings["write_s"] += time.monotonic() - t

        while True:
            t = time.monotonic()
            res = pool.get(timeout=0.5 if batch else 5.0)
            timings["wait_s"] += time.monotonic() - t
            if res is _DONE:
                break
            if res is None:
                if batch and time.monotonic() - batch_since > 0.5:
                    flush()  # the decoders are slow right now: do not hold a partial batch
                commit()
                continue
            timings["read_s"] += res.read_s
            timings["decode_s"] += res.decode_s
            stats["decoded"] += res.decoded
            path = inputs[res.tid]
            if res.kind == "error":
                rows.add(path, res.sha256, res.nbytes, None, None, None, None, None,
                         f"{res.error_kind}: {res.error}")
                if res.cacheable_error and res.sha256:
                    new_errors.append((res.sha256, res.error_kind or "DecodeError", res.error or ""))
                if pbar is not None:
                    pbar.update(1)
            elif res.kind == "hit":
                stats["cache_hits"] += 1
                ready.append(_Item(res.tid, res))
            else:
                item = _Item(res.tid, res)
                sha = res.sha256
                if sha in batch:
                    stats["duplicates"] += 1
                    batch[sha][2].append(item)
                elif (hit := db.get(sha)) is not None:  # embedded since the worker looked (a duplicate)
                    stats["duplicates"] += 1
                    item.emb = hit.embeddings
                    ready.append(item)
                else:
                    if not batch:
                        batch_since = time.monotonic()
                    batch[sha] = (item, res.pixels, [item])
                    batch_frames += len(res.pixels)
            if batch_frames >= target:
                flush()
            elif len(ready) >= 1024:
                score_ready()
            commit()
        flush()
        commit(force=True)
        if pbar is not None:
            pbar.close()
            pbar = None
        t = time.monotonic()
        table = parts.merge(inputs, schema)
        timings["merge_s"] = time.monotonic() - t
        restarts = pool.restarts
    finally:
        if pbar is not None:
            pbar.close()
        if booter is not None:  # the model failed to load while the workers booted
            booter.join()
            pool = booting.get("pool")
            parts, _, db = booting.get("started", (parts, None, db))
        if pool is not None:
            pool.close()
        _release(parts, db, scratch)
        if torch_prev is not None:
            import torch

            torch.set_num_threads(torch_prev)

    summary = _summarize(
        table, out=str(out), processed=todo_n, resumed=resumed, worker_restarts=restarts,
        seconds=time.monotonic() - t_start, startup_seconds=startup, encoder_id=enc.encoder_id, policy=pol.id,
        timings=MappingProxyType({k: round(v, 4) for k, v in timings.items()}), **stats)
    if verbose:
        print(f"safeclip audit: {summary.format()}", file=sys.stderr)
    return summary


# ================================================================================================ rescore
def _compile_without_model(policy: Policy, encoder_id: str, cache_dir: Path, model: str | None,
                           pretrained: str | None, device: str | None) -> CompiledPolicy:
    """Compile ``policy`` from cached prompt embeddings; load the model only if some are missing and it was named."""
    from .._compiled import CompiledPolicy

    prompts = PromptCache(encoder_id, cache_dir)
    holder: dict[str, Any] = {}

    def embed_texts(texts: list[str]) -> np.ndarray:
        missing = prompts.missing(texts)
        if not missing:
            return prompts.get(texts)
        if model is None and pretrained is None:
            raise ModelLoadError(
                f"{len(missing)} prompt(s) of policy {policy.id} have no cached embedding for encoder "
                f"{encoder_id!r} in {cache_dir} (first: {missing[0]!r}). Re-scoring never loads the model unless "
                "asked: pass --model/--pretrained (the encoder that made the embeddings) to embed them once, or "
                "run one `safeclip audit` with this policy.")
        from ..embed import Encoder

        enc = Encoder(model, pretrained, device=device, cache_dir=cache_dir)
        if enc.encoder_id != encoder_id:
            raise EncoderMismatchError(
                f"--model/--pretrained load encoder {enc.encoder_id!r}, but the embeddings are from {encoder_id!r}")
        holder["encoder"] = enc
        return enc.embed_texts(texts)

    return CompiledPolicy.build(policy, embed_texts, encoder_id)


def _embedding_column(table: pa.Table, dim: int) -> list[np.ndarray | None]:
    col = table.column("embedding").combine_chunks()
    out: list[np.ndarray | None] = []
    offsets = col.offsets.to_numpy()
    values = col.values.to_numpy(zero_copy_only=False)
    valid = col.is_valid().to_numpy(zero_copy_only=False)
    for i in range(len(col)):
        out.append(values[offsets[i]:offsets[i + 1]].reshape(-1, dim) if valid[i] else None)
    return out


def rescore(
    *,
    out: str | os.PathLike[str],
    policy: str | os.PathLike[str] | Policy | None = None,
    cache: str | os.PathLike[str] | None = None,
    from_audit: str | os.PathLike[str] | None = None,
    embeddings: str | os.PathLike[str] | None = None,
    encoder_id: str | None = None,
    model: str | None = None,
    pretrained: str | None = None,
    device: str | None = None,
    chunk_rows: int = 65536,
    verbose: bool = True,
) -> AuditSummary:
    """Re-decide cached embeddings under ``policy`` without the model; write the rows to ``out`` (Parquet).

    Sources: ``from_audit`` (a previous audit's output: the same rows and paths, new decisions; embeddings from the
    cache by sha256), ``embeddings`` (an audit output written with ``save_embeddings=True``; no cache needed), or
    neither: every image in the cache of ``encoder_id`` (one row per sha256, ``path`` null). ``encoder_id`` defaults
    to the source's, or to the only encoder in the cache. Prompt embeddings come from the prompt cache; if the
    policy has prompts never embedded under this encoder, ``model``/``pretrained`` (optional) load it just for
    them, else :class:`~safeclip.errors.ModelLoadError` explains what to do.

    >>> s = rescore(out="strict.parquet", policy="strict", from_audit="audit.parquet")   # doctest: +SKIP
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    t_start = time.monotonic()
    if from_audit is not None and embeddings is not None:
        raise SafeclipError("give either from_audit (embeddings from the cache) or embeddings, not both")
    pol = load_policy(policy)
    cache_dir = Path(cache) if cache is not None else default_cache_dir()
    source = from_audit if from_audit is not None else embeddings
    src_table = None
    if source is not None:
        try:
            src_table = pq.read_table(source)
        except (OSError, pa.ArrowException) as e:
            raise SafeclipError(f"cannot read audit output {source}: {e}") from e
        missing_cols = {"path", "sha256", "error", "encoder_id"} - set(src_table.column_names)
        if missing_cols:
            raise SafeclipError(f"{source} is not a safeclip audit output (missing columns {sorted(missing_cols)})")
        src_meta = _read_meta(src_table.schema)
        ids = {v for v in src_table.column("encoder_id").unique().to_pylist() if v}
        src_id = src_meta.get("encoder_id") or (next(iter(ids)) if len(ids) == 1 else None)
        if len(ids) > 1:
            raise EncoderMismatchError(f"{source} mixes encoders {sorted(ids)}")
        if encoder_id is not None and src_id is not None and encoder_id != src_id:
            raise EncoderMismatchError(f"{source} was audited with {src_id!r}, not {encoder_id!r}")
        encoder_id = encoder_id or src_id
        if embeddings is not None and "embedding" not in src_table.column_names:
            raise SafeclipError(f"{source} has no embedding column: audit with --save-embeddings, or use --from "
                                "with the cache")
    if encoder_id is None:
        known = list_cached_encoders(cache_dir)
        if len(known) != 1:
            raise SafeclipError(f"say which encoder's embeddings to re-score (--encoder-id); the cache {cache_dir} "
                                f"holds {known or 'none'}")
        encoder_id = known[0]

    comp = _compile_without_model(pol, encoder_id, cache_dir, model, pretrained, device)
    categories = _categories_of(pol)
    meta = {"format": _FORMAT_VERSION, "kind": "rescore", "encoder_id": encoder_id, "policy": pol.id,
            "policy_fingerprint": _policy_fingerprint(pol), "categories": list(categories)}
    save_emb = embeddings is not None
    schema = _schema(categories, meta, save_emb)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pieces: list[pa.Table] = []
    hits = 0
    db: EmbeddingCache | None = None
    try:
        if src_table is None:
            db = EmbeddingCache(cache_dir, encoder_id, readonly=True)
            for chunk in _prefetched(db.scan(chunk_rows)):  # SQLite reads the next chunk while numpy scores
                codes, probs = _decide(comp, chunk.embeddings, chunk.offsets)
                hits += len(chunk)
                pieces.append(_columns_table(schema, categories, encoder_id, pol.id, None, chunk.sha256,
                                             chunk.nbytes, chunk.width, chunk.height, chunk.n_frames, codes, probs))
        else:
            dim = int(_read_meta(src_table.schema).get("dim") or 0)
            if save_emb and not dim:
                raise SafeclipError(f"{source}: no embedding dimension recorded in its metadata")
            if not save_emb:
                db = EmbeddingCache(cache_dir, encoder_id, readonly=True)
            for start in range(0, src_table.num_rows, chunk_rows):
                part = src_table.slice(start, chunk_rows)
                piece, n_hits = _rescore_rows(comp, part, schema, categories, encoder_id, pol.id, db, dim, save_emb)
                hits += n_hits
                pieces.append(piece)
    finally:
        if db is not None:
            db.close()
    table = pa.concat_tables(pieces) if pieces else schema.empty_table()
    _write_parquet_atomic(table.replace_schema_metadata(schema.metadata), out)
    seconds = time.monotonic() - t_start
    summary = _summarize(table, out=str(out), processed=table.num_rows, resumed=0, decoded=0, embedded=0,
                         cache_hits=hits, duplicates=0, worker_restarts=0, seconds=seconds, startup_seconds=0.0,
                         encoder_id=encoder_id, policy=pol.id)
    if verbose:
        print(f"safeclip rescore: {summary.format()}", file=sys.stderr)
    return summary


def _prefetched(items: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Iterate ``items`` in a background thread, ``depth`` ahead (SQLite and numpy both release the GIL)."""
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    end = object()
    stop = threading.Event()

    def put(x: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for x in items:
                if not put(x):
                    return
            put(end)
        except BaseException as e:  # re-raised in the consumer
            put(e)

    t = threading.Thread(target=produce, name="safeclip-prefetch", daemon=True)
    t.start()
    try:
        while True:
            x = q.get()
            if x is end:
                return
            if isinstance(x, BaseException):
                raise x
            yield x
    finally:
        stop.set()
        t.join(timeout=10)


def _columns_table(schema: pa.Schema, categories: Sequence[str], encoder_id: str, policy_id: str,
                   paths: Sequence[str | None] | None, shas: Sequence[str], nbytes: np.ndarray, width: np.ndarray,
                   height: np.ndarray, frames: np.ndarray, codes: np.ndarray, probs: np.ndarray) -> pa.Table:
    """A table of decided rows built straight from column arrays (the re-score fast path)."""
    import pyarrow as pa

    n = len(shas)
    actions = pa.DictionaryArray.from_arrays(pa.array(codes.astype(np.int32)), pa.array(list(ACTIONS)))
    cols: dict[str, Any] = {
        "path": pa.array(paths if paths is not None else [None] * n, pa.string()),
        "sha256": pa.array(shas, pa.string()),
        "bytes": pa.array(nbytes, pa.int64()),
        "width": pa.array(width, pa.int32()),
        "height": pa.array(height, pa.int32()),
        "frames": pa.array(frames, pa.int32()),
        "action": actions.cast(pa.string()),
        "error": pa.nulls(n, pa.string()),
        "encoder_id": pa.array([encoder_id] * n, pa.string()),
        "policy": pa.array([policy_id] * n, pa.string()),
    }
    for j, name in enumerate(categories):
        cols[f"p_{name}"] = pa.array(np.ascontiguousarray(probs[:, j]), pa.float32())
    return pa.Table.from_arrays([cols[f.name] for f in schema], schema=schema)


def _rescore_rows(comp: CompiledPolicy, part: pa.Table, schema: pa.Schema, categories: Sequence[str],
                  encoder_id: str, policy_id: str, db: EmbeddingCache | None, dim: int,
                  save_emb: bool) -> tuple[pa.Table, int]:
    """Re-decide one slice of a previous audit's rows; its error rows stay error rows."""
    c = {k: part.column(k).to_pylist() for k in ("path", "sha256", "error")}
    for k in ("bytes", "width", "height", "frames"):
        c[k] = part.column(k).to_pylist() if k in part.column_names else [None] * part.num_rows
    embs: list[np.ndarray | None]
    if save_emb:
        embs = _embedding_column(part, dim)
    else:
        if db is None:
            raise RuntimeError("internal error: re-scoring from the cache without a cache")
        found = db.get_many([s for s, err in zip(c["sha256"], c["error"]) if s and err is None])
        embs = [found[s].embeddings if (s in found and err is None) else None
                for s, err in zip(c["sha256"], c["error"])]
    ok = [i for i, (e, err) in enumerate(zip(embs, c["error"])) if e is not None and err is None]
    rows = _Rows(len(categories), save_emb)
    decided: dict[int, tuple[int, np.ndarray]] = {}
    if ok:
        sel = [embs[i] for i in ok]
        offsets = np.zeros(len(sel) + 1, np.int64)
        np.cumsum([len(e) for e in sel], out=offsets[1:])  # type: ignore[arg-type]
        codes, probs = _decide(comp, np.concatenate(sel), offsets)  # type: ignore[arg-type]
        decided = {i: (int(codes[k]), probs[k]) for k, i in enumerate(ok)}
    for i in range(part.num_rows):
        err = c["error"][i]
        if i in decided:
            code, p = decided[i]
            action, probs_i = ACTIONS[code], p
        else:
            action, probs_i = None, None
            if err is None:
                err = (f"EmbeddingNotCached: no embedding for sha256 {c['sha256'][i]} under encoder {encoder_id!r}; "
                       "audit this file again")
        rows.add(c["path"][i], c["sha256"][i], c["bytes"][i], c["width"][i], c["height"][i], c["frames"][i],
                 action, probs_i, err, embs[i])
    return rows.table(schema, categories, encoder_id, policy_id), len(decided)


# ================================================================================================ diff
def diff(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> pa.Table:
    """The inputs whose action differs between two audit/rescore outputs.

    Rows are matched by ``path`` (by ``sha256`` when the outputs have no paths, as whole-cache re-scores). Columns:
    ``key, action_a, action_b, category, p_a, p_b, delta``: the category whose probability moved most (among those
    both outputs have) and its move. An error row's action reads ``"error"``, an input missing on one side
    ``"missing"``.

    >>> diff("default.parquet", "strict.parquet").to_pandas()   # doctest: +SKIP
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    tabs = []
    for src in (a, b):
        try:
            tabs.append(pq.read_table(src))
        except (OSError, pa.ArrowException) as e:
            raise SafeclipError(f"cannot read {src}: {e}") from e
    ta, tb = tabs
    for t, src in ((ta, a), (tb, b)):
        if not {"path", "sha256", "action", "error"} <= set(t.column_names):
            raise SafeclipError(f"{src} is not a safeclip audit or rescore output")
    use_path = ta.column("path").null_count < ta.num_rows and tb.column("path").null_count < tb.num_rows
    key = "path" if use_path else "sha256"
    cats = [c for c in ta.column_names if c.startswith("p_") and c in tb.column_names]

    def index(t: pa.Table) -> tuple[dict[str, int], list[str], np.ndarray]:
        keys = t.column(key).to_pylist()
        acts = [("error" if e is not None else (x or "error"))
                for x, e in zip(t.column("action").to_pylist(), t.column("error").to_pylist())]
        probs = np.column_stack([t.column(c).to_numpy(zero_copy_only=False).astype(np.float32) for c in cats]) \
            if cats else np.zeros((t.num_rows, 0), np.float32)
        return {k: i for i, k in enumerate(keys) if k is not None}, acts, probs

    ia, acts_a, pa_ = index(ta)
    ib, acts_b, pb_ = index(tb)
    out: dict[str, list[Any]] = {k: [] for k in ("key", "action_a", "action_b", "category", "p_a", "p_b", "delta")}
    for k in list(ia) + [k for k in ib if k not in ia]:
        i, j = ia.get(k), ib.get(k)
        act_a = acts_a[i] if i is not None else "missing"
        act_b = acts_b[j] if j is not None else "missing"
        if act_a == act_b:
            continue
        cat = pa_v = pb_v = delta = None
        if i is not None and j is not None and cats:
            d = pb_[j] - pa_[i]
            absd = np.where(np.isnan(d), -1.0, np.abs(d))
            m = int(np.argmax(absd))
            if absd[m] >= 0:
                cat, pa_v, pb_v, delta = cats[m][2:], float(pa_[i, m]), float(pb_[j, m]), float(d[m])
        for name, v in zip(out, (k, act_a, act_b, cat, pa_v, pb_v, delta)):
            out[name].append(v)
    return pa.table({
        "key": pa.array(out["key"], pa.string()),
        "action_a": pa.array(out["action_a"], pa.string()),
        "action_b": pa.array(out["action_b"], pa.string()),
        "category": pa.array(out["category"], pa.string()),
        "p_a": pa.array(out["p_a"], pa.float32()),
        "p_b": pa.array(out["p_b"], pa.float32()),
        "delta": pa.array(out["delta"], pa.float32()),
    }, metadata={b"safeclip.key": key.encode()})
