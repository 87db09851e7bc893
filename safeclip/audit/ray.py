"""The audit on a Ray cluster (Ray Data): CPU tasks decode, an actor pool embeds and scores, the driver commits.

``audit(..., engine="ray")`` / ``safeclip audit ... --engine ray [--address ADDR]`` run this instead of the local
pipeline of :mod:`safeclip.audit`, with the same per-item and per-batch functions and the same output:

    inputs (driver, input order) -> shards of ``shard_rows`` consecutive inputs (by position: a re-run of the
                                    same inputs makes the same shards)
      -> ray.data.from_arrow(blocks of ``decode_batch`` (index, path) rows)
      -> map_batches(_decode_batch)   CPU tasks: ``safeclip.audit._process`` per file (read, sha256, cache lookup,
                                      decode at the model's input size, prepare the model's pixels)
      -> map_batches(_EmbedScore)     an actor pool holding the model (``num_gpus=1`` per actor where the cluster
                                      has GPUs, a fraction of a CPU otherwise): ``Encoder.embed_pixels`` and
                                      ``safeclip.audit._decide`` under the policy compiled once on the driver
      -> the driver                   when every row of a shard has arrived: its new embeddings into the cache,
                                      then the shard's rows as one part in ``OUT.parquet.parts/``
      -> merge                        ``OUT.parquet``: input order, one row per input (``_Parts.merge``)

Resumable, exactly once
    Parts are the local engine's (:class:`safeclip.audit._Parts`, same ``run.json``): a re-run skips every input
    with a committed row, so completed shards are never recomputed, whichever engine wrote them; a shard's rows
    are committed only after its embeddings are in the cache. Ray may run a task twice (a retry after a worker
    died); only the driver writes, once per shard, so no row is ever written twice.

The embedding cache
    The driver writes the cache (its ``cache_dir``). Decode tasks look files up in the same folder when their node
    sees it (one machine, or a shared file system); elsewhere they decode and the model embeds (the cache is
    content-addressed, so any copy of it is right).

A file that kills its decoder
    Each decode task keeps a journal (node-local temp folder, keyed by its Ray task id, which a retry keeps): a file
    on which the worker died twice, or that outlived ``task_timeout`` (a watchdog thread then exits the worker),
    becomes an error row on the retry (``WorkerCrash`` / ``WorkerTimeout``), as in the local engine. Ray Data
    retries a task whose worker died without limit; with the journal every retry gets further.

The encoder's identity
    The decode tasks need the model's pixel spec and ``encoder_id`` before any actor has loaded the model: an
    ``encoder`` passed in gives them, else the identity remembered from an earlier audit of the same weights (as
    the local engine does; every actor checks it against the model it loaded and refuses to start on a mismatch,
    before any row is committed, and the audit then starts over with the real one), else a short-lived prober
    actor loads the model once, which also embeds the policy's prompts missing from the prompt cache.

Inputs
    Paths are made absolute on the driver and must be readable at that path from every node (a shared or mounted
    file system); a path a node cannot read is an error row, as locally.

Not hanging
    Ray Data's no-progress timeout is ``stall_timeout``, and calls to the prober wait as long. A stalled run raises
    :class:`~safeclip.errors.SafeclipError` and keeps its committed shards.

Ray is imported only here, and only when an audit runs on it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from . import (
    _TEST_HOOK_ENV,
    AuditSummary,
    _categories_of,
    _decide_frames,
    _decoder_fingerprint,
    _encoder_memo_key,
    _Identity,
    _Parts,
    _process,
    _release,
    _prompts_also_in,
    _Result,
    _Rows,
    _schema,
    _summarize,
    _WorkerConfig,
)
from ..cache import CachedImage, EmbeddingCache
from ..decide import ACTIONS
from ..embed import PromptCache
from ..errors import EncoderMismatchError, ModelLoadError, SafeclipError
from ..policy import Policy

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa

    from ..decode import DecodeLimits
    from ..embed import Encoder
    from .._compiled import CompiledPolicy

__all__ = ["INSTALL_HINT", "audit_ray"]

INSTALL_HINT = "pip install 'safeclip[ray]'"
_MIN_RAY = (2, 40)
_MISMATCH = "safeclip-encoder-mismatch"  # marks an actor's refusal of a wrong encoder guess in Ray's error text
_MAX_CRASHES = 2  # a file on which the decoder died this many times becomes an error row (the local engine's rule)
_JOURNALS_SWEPT = False


def _import_ray() -> Any:
    """``ray`` with Ray Data, or a :class:`SafeclipError` saying how to install it."""
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise SafeclipError(f"the Ray engine needs Ray Data, which is not installed: {INSTALL_HINT}") from e
    try:
        version = tuple(int(x) for x in ray.__version__.split(".")[:2])
    except ValueError:
        version = _MIN_RAY
    if version < _MIN_RAY:
        raise SafeclipError(f"the Ray engine needs ray[data] >= {'.'.join(map(str, _MIN_RAY))}, found "
                            f"{ray.__version__}: {INSTALL_HINT}")
    return ray


# ================================================================================================ decode (CPU tasks)
def _decoded_schema() -> pa.Schema:
    import pyarrow as pa

    return pa.schema([
        ("idx", pa.int64()), ("sha256", pa.string()), ("nbytes", pa.int64()), ("width", pa.int32()),
        ("height", pa.int32()), ("n_frames", pa.int32()), ("frame_indices", pa.list_(pa.int32())),
        ("format", pa.string()), ("kind", pa.string()), ("error_kind", pa.string()), ("error", pa.string()),
        ("cacheable", pa.bool_()), ("decoded", pa.bool_()), ("read_s", pa.float64()), ("decode_s", pa.float64()),
        ("restarts", pa.int32()), ("pixels", pa.large_binary()), ("emb", pa.large_binary()),
    ])


def _scored_schema(n_categories: int) -> pa.Schema:
    import pyarrow as pa

    base = [f for f in _decoded_schema() if f.name != "pixels"]
    return pa.schema([*base, pa.field("code", pa.int8()), pa.field("probs", pa.list_(pa.float32(), n_categories)),
                      pa.field("emb_new", pa.bool_()), pa.field("duplicate", pa.bool_()),
                      pa.field("embed_s", pa.float64()), pa.field("score_s", pa.float64())])


class _Journal:
    """What a decode task was doing when its worker died, kept for the task's retry (same task id, see the module
    doc). ``None`` outside a Ray task."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.crashes: dict[str, int] = {}
        self.timeouts: set[str] = set()
        self.restarts = 0  # earlier attempts of this task whose worker died
        self.current: str | None = None
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        self.crashes = {str(k): int(v) for k, v in state.get("crashes", {}).items()}
        self.timeouts = set(state.get("timeouts", []))
        self.restarts = int(state.get("restarts", 0)) + 1  # a journal is left only by a worker that died
        if state.get("current"):  # the previous attempt died while on this file
            self.crashes[state["current"]] = self.crashes.get(state["current"], 0) + 1
        elif state.get("timed_out"):
            self.timeouts.add(state["timed_out"])

    @classmethod
    def open(cls) -> _Journal | None:
        try:
            import ray

            ctx = ray.get_runtime_context()
            task_id = ctx.get_task_id()
        except Exception:  # not in a Ray task (direct calls in tests) or no runtime context
            return None
        if not task_id:
            return None
        try:
            base = Path(ctx.get_temp_dir())  # the node's Ray session folder
        except Exception:  # older Ray
            base = Path(tempfile.gettempdir())
        folder = base / "safeclip-decode-journal"
        global _JOURNALS_SWEPT
        with contextlib.suppress(OSError):
            folder.mkdir(parents=True, exist_ok=True)
            if not _JOURNALS_SWEPT:  # journals of tasks whose job died with them (once per worker process)
                _JOURNALS_SWEPT = True
                old = time.time() - 86400
                for f in folder.glob("*.json"):
                    if f.stat().st_mtime < old:
                        f.unlink(missing_ok=True)
        return cls(folder / f"{task_id}.json")

    def verdict(self, tid: int, path: str) -> _Result | None:
        """The error row of a file that killed or hung earlier attempts, or None to decode it (again)."""
        if path in self.timeouts:
            return _Result(tid, "error", error_kind="WorkerTimeout",
                           error="decoding took longer than the task timeout; the Ray worker was stopped")
        n = self.crashes.get(path, 0)
        if n >= _MAX_CRASHES:
            return _Result(tid, "error", error_kind="WorkerCrash",
                           error=f"the decode worker (a Ray task) died on this file, {n} times")
        return None

    def _write(self, **extra: Any) -> None:
        state = {"crashes": self.crashes, "timeouts": sorted(self.timeouts), "current": self.current,
                 "restarts": self.restarts, **extra}
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with contextlib.suppress(OSError):
            tmp.write_text(json.dumps(state))
            os.replace(tmp, self.path)

    def enter(self, path: str) -> None:
        self.current = path
        self._write()

    def timed_out(self, path: str) -> None:
        self.current = None
        self._write(timed_out=path)

    def clear(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()


class _Watchdog:
    """Stops the worker when one file decodes for longer than ``timeout`` s; the task's retry reports the file."""

    def __init__(self, journal: _Journal | None, timeout: float) -> None:
        self._journal = journal
        self._timeout = timeout
        self._current: tuple[str, float] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="safeclip-decode-watchdog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            cur = self._current
            if cur is not None and time.monotonic() - cur[1] > self._timeout:
                if self._journal is not None:
                    self._journal.timed_out(cur[0])
                os._exit(71)  # a decode stuck in C cannot be interrupted; Ray retries the task

    def watch(self, path: str | None) -> None:
        self._current = (path, time.monotonic()) if path is not None else None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _ray_test_hook(hook: Mapping[str, Any], path: str) -> None:
    """Test-only failures of the Ray engine (``SAFECLIP_AUDIT_TEST_HOOK``, read by the driver and shipped here):
    ``exit_once``: ``{"names": [...], "marker": dir}`` exits the worker on those files the first time only;
    ``fail``: ``{"names": [...], "after_parts": [parts dir, n], "wait_s": s}`` raises on those files, once ``n``
    parts were committed (or after ``wait_s``); ``record``: a folder where each decode task lists the files it
    read."""
    name = os.path.basename(path)
    once = hook.get("exit_once")
    if once and name in once.get("names", ()):
        marker = Path(once["marker"]) / f"{name}.exited"
        if not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text("1")
            os._exit(70)
    if hook.get("record"):
        with open(Path(hook["record"]) / f"{os.getpid()}.txt", "a", encoding="utf-8") as f:
            f.write(path + "\n")
    fail = hook.get("fail")
    if fail and name in fail.get("names", ()):
        deadline = time.monotonic() + float(fail.get("wait_s", 30))
        folder, n = fail.get("after_parts", (None, 0))
        while folder and time.monotonic() < deadline and len(list(Path(folder).glob("part-*.parquet"))) < int(n):
            time.sleep(0.05)
        raise RuntimeError(f"injected failure on {name}")


def _open_cache(cfg: _WorkerConfig) -> EmbeddingCache | None:
    if cfg.cache_dir is None:
        return None
    try:
        return EmbeddingCache(cfg.cache_dir, cfg.encoder_id, readonly=True)
    except SafeclipError:  # not visible from this node: decode everything
        return None


def _decode_batch(batch: pa.Table, cfg: _WorkerConfig, task_timeout: float) -> pa.Table:
    """Ray Data UDF (CPU task): ``(idx, path)`` rows -> one :func:`safeclip.audit._process` result per row, with
    the pixels (``F x S x S x 3`` uint8) or cached embeddings (``F x D`` float32) as bytes."""

    import pyarrow as pa

    from ..decode import decode, read_source
    from ..embed import prepare_pixels

    hook = json.loads(cfg.hook) if cfg.hook else {}
    journal = _Journal.open()
    cache = _open_cache(cfg)
    cols: dict[str, list[Any]] = {f.name: [] for f in _decoded_schema()}
    watchdog = _Watchdog(journal, task_timeout)
    failed = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's per-file warnings: each file's outcome is its row
            for tid, path in zip(batch.column("idx").to_pylist(), batch.column("path").to_pylist()):
                res = journal.verdict(tid, path) if journal is not None else None
                if res is None:
                    if journal is not None:
                        journal.enter(path)
                    watchdog.watch(path)
                    if hook:
                        _ray_test_hook(hook, path)
                    res = _process(tid, path, cfg, cache, hook, decode, read_source, prepare_pixels)
                    watchdog.watch(None)
                _append_result(cols, res)
        failed = False
    finally:
        watchdog.close()
        if cache is not None:
            cache.close()
        if failed and journal is not None:
            journal.clear()  # an exception, not a dead worker: a retry must not blame the current file
    if journal is not None:
        if cols["restarts"]:
            cols["restarts"][0] = journal.restarts
        journal.clear()
    return pa.Table.from_pydict(cols, schema=_decoded_schema())


def _append_result(cols: dict[str, list[Any]], r: _Result) -> None:
    cols["idx"].append(r.tid)
    cols["sha256"].append(r.sha256)
    cols["nbytes"].append(r.nbytes)
    cols["width"].append(r.width)
    cols["height"].append(r.height)
    cols["n_frames"].append(r.n_frames)
    cols["frame_indices"].append(list(r.frame_indices))
    cols["format"].append(r.format)
    cols["kind"].append(r.kind)
    cols["error_kind"].append(r.error_kind)
    cols["error"].append(r.error)
    cols["cacheable"].append(bool(r.cacheable_error))
    cols["decoded"].append(bool(r.decoded))
    cols["read_s"].append(float(r.read_s))
    cols["decode_s"].append(float(r.decode_s))
    cols["restarts"].append(0)
    cols["pixels"].append(np.ascontiguousarray(r.pixels).tobytes() if r.pixels is not None else None)
    cols["emb"].append(np.ascontiguousarray(r.embeddings, np.float32).tobytes() if r.embeddings is not None
                       else None)


# ================================================================================================ embed (actors)
class _EmbedScore:
    """Ray Data UDF (actor): holds the model; embeds decoded pixels and decides every row of a batch."""

    def __init__(self, model: str | None, pretrained: str | None, device: str | None, batch_size: int | None,
                 torch_threads: int | None, expected: _Identity, comp: CompiledPolicy) -> None:
        import torch

        from . import _cpu_count
        from ..embed import Encoder, resolve_device

        dev = resolve_device(device)
        if not dev.startswith(("cuda", "mps")):
            # Ray gives a fractional-CPU actor one OpenMP thread; the model, like the local engine's, takes the
            # node's cores (the decode tasks fill the gaps).
            torch.set_num_threads(torch_threads or _cpu_count())
        self.enc = Encoder(model, pretrained, device=dev, batch_size=batch_size,
                           cache_dir=tempfile.gettempdir())  # never writes there: prompts come compiled
        actual = _Identity.of(self.enc)
        if actual != expected:
            raise EncoderMismatchError(
                f"{_MISMATCH}: this node loaded encoder {actual.encoder_id!r} ({actual.spec}, dim {actual.dim}), "
                f"the audit expects {expected.encoder_id!r} ({expected.spec}, dim {expected.dim})")
        self.ident = actual
        self.comp = comp

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow as pa

        n = batch.num_rows
        size = self.ident.spec.size
        kinds = batch.column("kind").to_pylist()
        shas = batch.column("sha256").to_pylist()
        pixels = batch.column("pixels").to_pylist()
        cached = batch.column("emb").to_pylist()
        embs: list[np.ndarray | None] = [None] * n
        new = [False] * n
        dup = [False] * n
        first: dict[str, int] = {}
        todo: list[int] = []
        for i in range(n):
            if kinds[i] == "hit" and cached[i] is not None:
                embs[i] = np.frombuffer(cached[i], np.float32).reshape(-1, self.ident.dim)
            elif kinds[i] == "pixels" and pixels[i] is not None:
                if shas[i] in first:
                    dup[i] = True
                else:
                    first[shas[i]] = i
                    todo.append(i)
        t = time.perf_counter()
        if todo:
            pix = [np.frombuffer(pixels[i], np.uint8).reshape(-1, size, size, 3) for i in todo]
            flat = self.enc.embed_pixels(np.concatenate(pix))
            row = 0
            for i, p in zip(todo, pix):
                embs[i] = flat[row:row + len(p)]
                new[i] = True
                row += len(p)
            for i in range(n):
                if dup[i]:
                    embs[i] = embs[first[shas[i]]]
        embed_s = time.perf_counter() - t
        t = time.perf_counter()
        ok = [i for i in range(n) if embs[i] is not None]
        codes: list[int | None] = [None] * n
        probs: list[np.ndarray | None] = [None] * n
        if ok:
            c, p = _decide_frames(self.comp, [embs[i] for i in ok])  # type: ignore[arg-type]
            for k, i in enumerate(ok):
                codes[i], probs[i] = int(c[k]), p[k]
        score_s = time.perf_counter() - t
        out = batch.drop_columns(["pixels", "emb"])
        n_cat = len(self.comp.policy.category_names)
        extra = {
            "emb": pa.array([None if e is None else np.ascontiguousarray(e, np.float32).tobytes() for e in embs],
                            pa.large_binary()),
            "code": pa.array(codes, pa.int8()),
            "probs": pa.array([None if p is None else np.asarray(p, np.float32) for p in probs],
                              pa.list_(pa.float32(), n_cat)),
            "emb_new": pa.array(new, pa.bool_()),
            "duplicate": pa.array(dup, pa.bool_()),
            "embed_s": pa.array([embed_s / max(1, n)] * n, pa.float64()),
            "score_s": pa.array([score_s / max(1, n)] * n, pa.float64()),
        }
        for name, arr in extra.items():
            out = out.append_column(name, arr)
        return out.select(_scored_schema(n_cat).names)


class _Prober:
    """A short-lived actor that loads the model once: the encoder's identity, and prompt embeddings."""

    def __init__(self, model: str | None, pretrained: str | None, device: str | None) -> None:
        from ..embed import Encoder, resolve_device

        self.enc = Encoder(model, pretrained, device=resolve_device(device), cache_dir=tempfile.gettempdir())

    def identity(self) -> _Identity:
        return _Identity.of(self.enc)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        return self.enc.embed_texts(texts, use_cache=False)


# ================================================================================================ driver
def _local_object_store_bytes() -> int:
    """The object store of a local runtime: 10% of RAM, 256 MiB..2 GiB (Ray's default, 30% of RAM in /dev/shm,
    is more than an audit needs and more than many containers give /dev/shm)."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        ram = 8 * 2**30
    return int(min(2 * 2**30, max(256 * 2**20, ram // 10)))


def _connect(ray: Any, address: str | None, verbose: bool) -> bool:
    """Use the running Ray runtime, else connect to ``address``, else start a local one; True if we started it."""
    from . import _cpu_count

    address = address or os.environ.get("RAY_ADDRESS") or None
    if ray.is_initialized():
        if address is not None and verbose:
            print(f"safeclip audit: Ray is already initialized in this process; using it, not {address!r}",
                  file=sys.stderr)
        return False
    common: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING,
                              "log_to_driver": verbose}
    try:
        if address is not None:
            ray.init(address=address, **common)
        else:
            ray.init(num_cpus=max(2, _cpu_count()), object_store_memory=_local_object_store_bytes(), **common)
    except Exception as e:  # ConnectionError, RuntimeError, ValueError: whatever ray.init raises
        where = f"the Ray cluster at {address!r}" if address else "a local Ray runtime"
        raise SafeclipError(f"cannot start or reach {where}: {type(e).__name__}: {e}") from e
    return True


def _cause_text(e: BaseException) -> str:
    seen: list[str] = []
    cur: BaseException | None = e
    while cur is not None and len(seen) < 8:
        seen.append(f"{type(cur).__name__}: {cur}")
        cur = cur.__cause__ or cur.__context__
    return " <- ".join(seen)


class _IdentityMismatch(Exception):
    """An actor loaded another encoder than the remembered guess (nothing was committed)."""


def _resources(ray: Any, device: str | None, actor_gpus: float | None, actor_cpus: float | None,
               actors: int | None) -> tuple[dict[str, float], int]:
    """Ray resources of one model actor and how many actors: a GPU each where the cluster has GPUs, else a fraction
    of a CPU (so that the decode tasks are never starved of CPU slots), one per node."""
    total = ray.cluster_resources()
    gpus = float(total.get("GPU", 0))
    want = (device or os.environ.get("SAFECLIP_DEVICE") or "auto").lower()
    if want.startswith("cuda") and gpus == 0 and not actor_gpus:
        raise SafeclipError("device 'cuda' was asked for, but the Ray cluster has no GPUs (ray.cluster_resources())")
    use_gpu = bool(actor_gpus) or (gpus > 0 and not want.startswith(("cpu", "mps")))
    if use_gpu:
        per = float(actor_gpus or 1.0)
        n = actors or max(1, int(gpus // per))
        return {"num_gpus": per, "num_cpus": float(actor_cpus if actor_cpus is not None else 1.0)}, n
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    return {"num_cpus": float(actor_cpus if actor_cpus is not None else 0.5)}, actors or max(1, nodes)


def _shard_blocks(todo: Sequence[tuple[int, str]], decode_batch: int) -> list[pa.Table]:
    import pyarrow as pa

    out = []
    for i in range(0, len(todo), decode_batch):
        chunk = todo[i:i + decode_batch]
        out.append(pa.table({"idx": pa.array([t[0] for t in chunk], pa.int64()),
                             "path": pa.array([os.path.abspath(t[1]) for t in chunk], pa.string())}))
    return out


class _Committer:
    """Driver side: gathers each shard's rows and commits the shard (cache first, then its part) once complete."""

    def __init__(self, inputs: Sequence[str], todo_counts: dict[int, int], shard_rows: int, parts: _Parts,
                 db: EmbeddingCache, schema: pa.Schema, categories: Sequence[str], ident: _Identity,
                 policy_id: str, fingerprint: str, save_embeddings: bool) -> None:
        self.inputs = inputs
        self.remaining = dict(todo_counts)
        self.shard_rows = shard_rows
        self.parts = parts
        self.db = db
        self.schema = schema
        self.categories = categories
        self.ident = ident
        self.policy_id = policy_id
        self.fingerprint = fingerprint
        self.save_embeddings = save_embeddings
        self.pending: dict[int, list[pa.Table]] = {}
        self.seen: dict[int, set[int]] = {}
        self.begun = False
        self.stats = dict.fromkeys(("decoded", "embedded", "cache_hits", "duplicates", "worker_restarts",
                                    "shards"), 0)
        self.timings = dict.fromkeys(("read_s", "decode_s", "embed_s", "score_s", "write_s"), 0.0)
        hook = json.loads(os.environ.get(_TEST_HOOK_ENV) or "{}")
        self._exit_after = hook.get("driver_exit_after_shards")  # test-only: the driver dies after n commits

    def add(self, block: pa.Table) -> None:
        """Take one block of scored rows; commit every shard it completes."""
        import pyarrow as pa

        if not block.num_rows:
            return
        idx = block.column("idx").to_numpy()
        shard = idx // self.shard_rows
        for s in map(int, np.unique(shard)):
            # Exactly once even if Ray ever handed a block over twice: rows already held or committed are dropped.
            if s not in self.remaining:
                continue
            seen = self.seen.setdefault(s, set())
            keep = (shard == s) & np.fromiter((i not in seen for i in idx.tolist()), bool, len(idx))
            if not keep.any():
                continue
            piece = block.filter(pa.array(keep, pa.bool_()))
            seen.update(piece.column("idx").to_pylist())
            self.pending.setdefault(s, []).append(piece)
            self.remaining[s] -= piece.num_rows
            if self.remaining[s] == 0:
                del self.remaining[s], self.seen[s]
                self._commit(s)

    def _commit(self, shard: int) -> None:
        import pyarrow as pa

        t = time.monotonic()
        table = pa.concat_tables(self.pending.pop(shard))
        table = table.take(np.argsort(table.column("idx").to_numpy(), kind="stable"))
        c = {k: table.column(k).to_pylist() for k in (
            "idx", "sha256", "nbytes", "width", "height", "n_frames", "frame_indices", "format", "kind",
            "error_kind", "error", "cacheable", "decoded", "restarts", "code", "emb_new", "duplicate")}
        probs = table.column("probs").to_pylist()
        embs = table.column("emb").to_pylist()
        for k in ("read_s", "decode_s", "embed_s", "score_s"):
            self.timings[k] += float(np.nansum(table.column(k).to_numpy(zero_copy_only=False)))
        rows = _Rows(len(self.categories), self.save_embeddings)
        new: list[CachedImage] = []
        errors: list[tuple[str, str, str]] = []
        dim = self.ident.dim
        for i in range(table.num_rows):
            path = self.inputs[c["idx"][i]]
            self.stats["decoded"] += bool(c["decoded"][i])
            self.stats["worker_restarts"] += int(c["restarts"][i] or 0)
            if c["code"][i] is None:
                kind = c["error_kind"][i] or "DecodeError"
                reason = c["error"][i] or "no embedding"
                rows.add(path, c["sha256"][i], c["nbytes"][i], None, None, None, None, None, f"{kind}: {reason}")
                if c["cacheable"][i] and c["sha256"][i]:
                    errors.append((c["sha256"][i], kind, reason))
                continue
            emb = np.frombuffer(embs[i], np.float32).reshape(-1, dim)
            if c["kind"][i] == "hit":
                self.stats["cache_hits"] += 1
            elif c["duplicate"][i]:
                self.stats["duplicates"] += 1
            if c["emb_new"][i]:
                self.stats["embedded"] += 1
                new.append(CachedImage(c["sha256"][i], emb, tuple(c["frame_indices"][i] or ()), c["width"][i] or 0,
                                       c["height"][i] or 0, c["n_frames"][i] or 1, c["nbytes"][i] or 0,
                                       c["format"][i] or ""))
            rows.add(path, c["sha256"][i], c["nbytes"][i], c["width"][i], c["height"][i], c["n_frames"][i],
                     ACTIONS[c["code"][i]], np.asarray(probs[i], np.float32), None, emb)
        if not self.begun:  # an actor confirmed the encoder (it refuses to start otherwise): the folder is ours
            self.parts.begin()
            self.begun = True
        self.db.put_many(new)  # before the rows that use these embeddings are committed
        if errors:
            self.db.put_decode_errors(errors, self.fingerprint)
        self.parts.commit(rows.table(self.schema, self.categories, self.ident.encoder_id, self.policy_id))
        self.stats["shards"] += 1
        self.timings["write_s"] += time.monotonic() - t
        if self._exit_after is not None and self.stats["shards"] >= int(self._exit_after):
            os._exit(75)  # as kill -9 would, right after a commit


def _compile(get: Any, pol: Policy, cache_dir: Path, ident: _Identity | None, verified: bool,
             start_prober: Any) -> tuple[CompiledPolicy, _Identity, bool]:
    """Compile ``pol`` from the prompt cache; prompts never embedded under this encoder come from the prober (which
    also checks a guessed identity). Returns the compiled policy, the identity and whether it is verified."""
    from .._compiled import CompiledPolicy

    holder: dict[str, Any] = {}

    def prober_identity() -> _Identity:
        if "ident" not in holder:
            holder["ident"] = get(start_prober().identity.remote())
        return holder["ident"]

    if ident is None:
        ident, verified = prober_identity(), True
    prompts = PromptCache(ident.encoder_id, cache_dir)

    def embed_texts(texts: list[str]) -> np.ndarray:
        missing = prompts.missing(texts)
        if missing:
            if not verified and prober_identity() != ident:
                raise _IdentityMismatch
            prompts.put(missing, get(start_prober().embed_texts.remote(missing)))
        return prompts.get(texts)

    try:
        return CompiledPolicy.build(pol, embed_texts, ident.encoder_id), ident, verified or "ident" in holder
    except _IdentityMismatch:
        ident = holder["ident"]
        comp, ident, _ = _compile(get, pol, cache_dir, ident, True, start_prober)
        return comp, ident, True


def audit_ray(
    inputs: Sequence[str],
    *,
    out: str | os.PathLike[str],
    policy: Policy,
    model: str | None = None,
    pretrained: str | None = None,
    device: str | None = None,
    cache_dir: Path,
    use_cache: bool = True,
    workers: int | None = None,
    batch_size: int | None = None,
    encoder: Encoder | None = None,
    save_embeddings: bool = False,
    decode_limits: DecodeLimits,
    fast_decode: bool = True,
    shard_rows: int = 2048,
    task_timeout: float | None = None,
    torch_threads: int | None = None,
    progress: bool | None = None,
    verbose: bool = True,
    address: str | None = None,
    t_start: float | None = None,
    actors: int | None = None,
    actor_gpus: float | None = None,
    actor_cpus: float | None = None,
    decode_batch: int = 32,
    stall_timeout: float = 900.0,
) -> AuditSummary:
    """Run :func:`safeclip.audit.audit` on Ray Data (see the module doc); called by ``audit(engine="ray")``, which
    collects ``inputs``, loads the policy and checks the arguments.

    Ray-only options (``audit(..., ray_options={...})``): ``actors`` (model actors; default one per GPU, or one per
    node on CPU clusters), ``actor_gpus`` / ``actor_cpus`` (resources per actor; default 1 GPU + 1 CPU, or 0.5 CPU
    without GPUs), ``decode_batch`` (files per decode task), ``stall_timeout`` (seconds without progress, or
    waiting for the model, before the run fails instead of hanging). ``workers`` caps concurrent decode tasks;
    ``shard_rows`` (``--part-rows``) is the shard size: the unit of commit and of resumption.
    """
    t_start = time.monotonic() if t_start is None else t_start
    if decode_batch < 1 or shard_rows < 1:
        raise ValueError("decode_batch and shard_rows must be >= 1")
    ray = _import_ray()
    out = Path(out)
    categories = _categories_of(policy)
    scratch = None if use_cache else tempfile.mkdtemp(prefix="safeclip-audit-")
    emb_dir = (Path(scratch) if scratch else Path(cache_dir)).resolve()
    hook = os.environ.get(_TEST_HOOK_ENV) or None
    memo_key = None if encoder is not None else _encoder_memo_key(model, pretrained)
    started = False
    prober: list[Any] = []
    parts: _Parts | None = None
    db: EmbeddingCache | None = None
    timings = dict.fromkeys(("model_load_s", "read_s", "decode_s", "embed_s", "score_s", "write_s", "merge_s"), 0.0)
    try:
        t0 = time.monotonic()
        started = _connect(ray, address, verbose)
        res, n_actors = _resources(ray, device, actor_gpus, actor_cpus, actors)

        def get(ref: Any) -> Any:  # Ray waits forever by default
            return ray.get(ref, timeout=stall_timeout)

        def start_prober() -> Any:
            if not prober:
                prober.append(ray.remote(**res)(_Prober).remote(model, pretrained, device))
            return prober[0]

        # The encoder's identity: exact from a loaded encoder, else remembered from an earlier run (the actors
        # check it before any row exists), else from a prober actor that loads the model once.
        if encoder is not None:
            from .._compiled import CompiledPolicy

            ident: _Identity = _Identity.of(encoder)
            comp = CompiledPolicy.build(policy, _prompts_also_in(Path(cache_dir), encoder), ident.encoder_id)
            verified = True
            model, pretrained = encoder.model_name, encoder.pretrained
        else:
            guess = _Identity.recall(Path(cache_dir), memo_key)
            comp, ident, verified = _with_timeout(
                stall_timeout, "load the model to learn its identity and embed the policy's prompts",
                lambda: _compile(get, policy, Path(cache_dir), guess, False, start_prober))
            if verified:
                ident.remember(Path(cache_dir), memo_key)
        for p in prober:
            ray.kill(p)
        prober.clear()
        timings["model_load_s"] = startup = time.monotonic() - t0

        for attempt in (0, 1):
            parts = _Parts(out, ident.run_meta(policy, save_embeddings))
            done = parts.open()
            db = EmbeddingCache(emb_dir, ident.encoder_id)  # exists before the tasks open it read-only
            todo = [(i, p) for i, p in enumerate(inputs) if p not in done]
            try:
                committer = _run(ray, inputs, todo, parts, db, policy, categories, ident, comp, verified,
                                 save_embeddings, decode_limits, fast_decode, shard_rows, task_timeout,
                                 torch_threads, progress, verbose, hook, emb_dir, model, pretrained, device,
                                 batch_size, workers, res, n_actors, decode_batch, stall_timeout)
                break
            except _IdentityMismatch:
                parts.release()
                db.close()
                parts, db = None, None
                if attempt or verified:
                    raise SafeclipError("the Ray actors loaded another encoder than the audit expects") from None
                # The remembered identity was stale: learn the real one (nothing was committed under the guess).
                comp, ident, verified = _with_timeout(
                    stall_timeout, "load the model to learn its identity",
                    lambda: _compile(get, policy, Path(cache_dir), None, True, start_prober))
                ident.remember(Path(cache_dir), memo_key)
                for p in prober:
                    ray.kill(p)
                prober.clear()
        if not committer.begun:
            parts.begin()
        for k, v in committer.timings.items():
            timings[k] += v
        t = time.monotonic()
        schema = _schema(categories, ident.run_meta(policy, save_embeddings), save_embeddings)
        table: pa.Table = parts.merge(list(inputs), schema)
        timings["merge_s"] = time.monotonic() - t
    finally:
        for p in prober:
            with contextlib.suppress(Exception):
                ray.kill(p)
        _release(parts, db, scratch)
        if started:
            ray.shutdown()

    stats = committer.stats
    summary = _summarize(
        table, out=str(out), processed=len(todo), resumed=len(inputs) - len(todo),
        worker_restarts=stats["worker_restarts"], seconds=time.monotonic() - t_start, startup_seconds=startup,
        encoder_id=ident.encoder_id, policy=policy.id,
        timings=MappingProxyType({k: round(v, 4) for k, v in timings.items()}),
        decoded=stats["decoded"], embedded=stats["embedded"], cache_hits=stats["cache_hits"],
        duplicates=stats["duplicates"])
    if verbose:
        print(f"safeclip audit (ray): {summary.format()}", file=sys.stderr)
    return summary


def _with_timeout(timeout: float, what: str, fn: Any) -> Any:
    """Run ``fn`` (which waits on Ray for at most ``timeout`` s a call), turning Ray's errors into
    :class:`SafeclipError` s that say what failed."""
    import ray.exceptions as rex

    try:
        return fn()
    except rex.GetTimeoutError as e:
        raise SafeclipError(
            f"no Ray worker could {what} within {timeout:g}s: are the resources an actor needs (a GPU, or CPUs) "
            "available in the cluster? (stall_timeout raises this limit)") from e
    except rex.RayError as e:
        text = _cause_text(e)
        if "ModelLoadError" in text or "could not load CLIP weights" in text:
            raise ModelLoadError(f"a Ray worker could not load the model: {text}") from e
        raise SafeclipError(f"a Ray worker failed to {what}: {text}") from e


@contextlib.contextmanager
def _quiet_ray_data(show: bool) -> Iterator[None]:
    """Ray Data's INFO lines (plans, progress) only when a progress display was asked for."""
    logger = logging.getLogger("ray.data")
    level = logger.level
    if not show:
        logger.setLevel(logging.ERROR)  # also "progress bars disabled" warnings; failures raise anyway
    try:
        yield
    finally:
        logger.setLevel(level)


def _run(ray: Any, inputs: Sequence[str], todo: Sequence[tuple[int, str]], parts: _Parts, db: EmbeddingCache,
         policy: Policy, categories: Sequence[str], ident: _Identity, comp: CompiledPolicy, verified: bool,
         save_embeddings: bool, limits: DecodeLimits, fast_decode: bool, shard_rows: int,
         task_timeout: float | None, torch_threads: int | None, progress: bool | None, verbose: bool,
         hook: str | None, emb_dir: Path, model: str | None, pretrained: str | None, device: str | None,
         batch_size: int | None, workers: int | None, res: Mapping[str, float], n_actors: int, decode_batch: int,
         stall_timeout: float) -> _Committer:
    """Stream the ``todo`` inputs through decode tasks and model actors, committing each shard as it completes."""
    import ray.data

    fingerprint = _decoder_fingerprint(limits, ident.spec.size if fast_decode else None)
    counts: dict[int, int] = {}
    for i, _ in todo:
        counts[i // shard_rows] = counts.get(i // shard_rows, 0) + 1
    schema = _schema(categories, ident.run_meta(policy, save_embeddings), save_embeddings)
    committer = _Committer(inputs, counts, shard_rows, parts, db, schema, categories, ident, policy.id,
                           fingerprint, save_embeddings)
    if not todo:
        return committer
    cfg = _WorkerConfig(str(emb_dir), ident.encoder_id, ident.spec, limits, fingerprint, 0, hook, fast_decode)
    timeout = float(task_timeout or max(60.0, 6 * float(limits.timeout_s)))
    gpu = bool(res.get("num_gpus"))
    show = bool(progress) if progress is not None else (verbose and sys.stderr.isatty())

    with warnings.catch_warnings():  # Ray Data's own copies of its context warn about its deprecated fields
        warnings.filterwarnings("ignore", r"`use_\w+` is deprecated", DeprecationWarning)
        ctx = ray.data.DataContext.get_current().copy()
    ctx.enable_progress_bars = show
    ctx.print_on_execution_start = show
    ctx.execution_no_progress_timeout_s = stall_timeout  # (a positive wait_for_min_actors_s would hold decoding
    # back until the model has loaded; actors that never start are caught by this timeout instead)
    with ray.data.DataContext.current(ctx), _quiet_ray_data(show), warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`use_\w+` is deprecated", DeprecationWarning)
        ds = ray.data.from_arrow(_shard_blocks(todo, decode_batch))
        decode_kw: dict[str, Any] = {}
        if workers:
            strategy = getattr(ray.data, "TaskPoolStrategy", None)
            decode_kw = {"compute": strategy(size=int(workers))} if strategy else {"concurrency": int(workers)}
        ds = ds.map_batches(_decode_batch, batch_format="pyarrow", batch_size=None, num_cpus=1,
                            fn_kwargs={"cfg": cfg, "task_timeout": timeout}, **decode_kw)
        ds = ds.map_batches(
            _EmbedScore, batch_format="pyarrow", batch_size=int(batch_size or (64 if gpu else 16)),
            compute=ray.data.ActorPoolStrategy(size=n_actors), zero_copy_batch=True,
            fn_constructor_kwargs={"model": model, "pretrained": pretrained, "device": device,
                                   "batch_size": batch_size, "torch_threads": torch_threads, "expected": ident,
                                   "comp": comp},
            **({"num_gpus": res["num_gpus"], "num_cpus": res["num_cpus"]} if gpu else {"num_cpus": res["num_cpus"]}))
        try:
            for block in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
                committer.add(block)
        except SafeclipError:
            raise
        except Exception as e:  # RayError, Ray Data's ExecutionTimeoutError, ...: keep what was committed
            text = _cause_text(e)
            if _MISMATCH in text and not verified and not committer.begun:
                raise _IdentityMismatch from e
            done = committer.stats["shards"]
            raise SafeclipError(
                f"the Ray audit stopped: {text[:2000]}\n{done} shard(s) of {len(counts)} were committed in "
                f"{parts.dir}; run the same command again to resume") from e
    left = committer.remaining
    if left:
        raise SafeclipError(f"internal error: Ray returned no rows for {sum(left.values())} input(s) of "
                            f"{len(left)} shard(s); run the same command again to resume")
    return committer
