"""The Ray engine (Ray Data): CPU tasks decode, an actor pool runs the batch unit's model half, the driver commits.

``audit(..., engine="ray")`` / ``safeclip audit ... --engine ray [--address ADDR]`` run this instead of the local
engine (:mod:`safeclip.audit.local`), over the same worker, batch unit and writer, and write the same output:

    inputs (driver, input order) -> shards of ``part_rows`` consecutive inputs (by position: a re-run of the
                                    same inputs makes the same shards)
      -> ray.data.from_arrow(blocks of ``decode_batch`` (index, path) rows)
      -> map_batches(_decode_batch)   CPU tasks: ``worker.process_file`` per file (read, sha256, cache lookup,
                                      decode at the model's input size, the model's pixels)
      -> map_batches(_EmbedScore)     an actor pool holding the model (``num_gpus=1`` per actor where the cluster
                                      has GPUs, a fraction of a CPU otherwise): ``mapper.BatchUnit.map`` (dedup,
                                      embed, score) under the policy compiled once on the driver
      -> the driver                   when every row of a shard has arrived: ``mapper.store`` (its new embeddings
                                      into the cache, then its rows) and one part in ``OUT.parquet.parts/``
      -> merge                        ``OUT.parquet``: input order, one row per input

Results cross Ray's object store in their Arrow form (``worker.results_to_arrow``): decoded pixels (~150 KB per
image at 224 px) on the way to the model, embeddings and decisions on the way back.

Resumable, exactly once
    The parts are the local engine's (``writer.RunOutput``, same ``run.json``): a re-run skips every input with a
    committed row, so completed shards are never recomputed, whichever engine wrote them; a shard's rows are
    committed only after its embeddings are in the cache. Ray may run a task twice (a retry after a worker died);
    only the driver writes, once per shard, so no row is ever written twice.

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
    ``encoder`` passed in gives them, else the identity remembered from an earlier audit of the same weights
    (:mod:`safeclip.audit.identity`; every actor checks it against the model it loaded and refuses to start on a
    mismatch, before any row is committed, and the audit then starts over with the real one), else a short-lived
    prober actor loads the model once, which also embeds the policy's prompts missing from the prompt cache.

Inputs
    Paths are made absolute on the driver and must be readable at that path from every node (a shared or mounted
    file system); a path a node cannot read is an error row, as locally.

Not hanging
    Ray Data's no-progress timeout is ``stall_timeout``, and calls to the prober wait as long. A stalled run raises
    :class:`~safeclip.errors.EngineStalledError`, a failed one :class:`~safeclip.errors.EngineError`; both keep the
    committed shards. Without Ray, with one too old, or with a cluster out of reach:
    :class:`~safeclip.errors.EngineUnavailableError`.

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
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..files import write_json_atomic
from ..embed import EncoderSpec, PromptCache
from ..errors import (
    AuditError,
    EncoderMismatchError,
    EngineError,
    EngineStalledError,
    EngineUnavailableError,
    ModelLoadError,
    SafeclipError,
)
from ..policy import Policy
from .identity import EncoderIdentity, encoder_memo_key
from .mapper import BatchUnit, compile_policy, needs_pdq, store
from .plan import RayOptions, cpu_count, encoder_kwargs
from .summary import Tally
from .worker import (
    TEST_HOOK_ENV,
    FileResult,
    WorkerConfig,
    open_cache,
    process_file,
    results_from_arrow,
    results_to_arrow,
)
from .writer import RunOutput, embedding_dir

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa

    from ..compiled import CompiledPolicy
    from .plan import AuditPlan
    from .summary import AuditSummary

__all__ = ["INSTALL_HINT", "import_ray", "run"]

INSTALL_HINT = "pip install 'safeclip[ray]'"
_MIN_RAY = (2, 40)
_MISMATCH = "safeclip-encoder-mismatch"  # marks an actor's refusal of a wrong encoder guess in Ray's error text
_MAX_CRASHES = 2  # a file on which the decoder died this many times becomes an error row (the local engine's rule)
_JOURNALS_SWEPT = False
_TIMINGS = ("model_load_s", "read_s", "decode_s", "embed_s", "score_s", "write_s", "merge_s")


def import_ray() -> Any:
    """``ray`` with Ray Data, or an :class:`~safeclip.errors.EngineUnavailableError` saying how to install it."""
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise EngineUnavailableError(f"the Ray engine needs Ray Data, which is not installed: {INSTALL_HINT}") from e
    try:
        version = tuple(int(x) for x in ray.__version__.split(".")[:2])
    except ValueError:
        version = _MIN_RAY
    if version < _MIN_RAY:
        raise EngineUnavailableError(f"the Ray engine needs ray[data] >= {'.'.join(map(str, _MIN_RAY))}, found "
                                     f"{ray.__version__}: {INSTALL_HINT}")
    return ray


def run(plan: AuditPlan) -> AuditSummary:
    """Run ``plan`` on Ray Data (see the module doc)."""
    return _RayRun(plan).run()


# ================================================================================================ decode (CPU tasks)
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

    def verdict(self, tid: int, path: str) -> FileResult | None:
        """The error row of a file that killed or hung earlier attempts, or None to decode it (again)."""
        if path in self.timeouts:
            return FileResult(tid, "error", error_kind="WorkerTimeout",
                           error="decoding took longer than the task timeout; the Ray worker was stopped")
        n = self.crashes.get(path, 0)
        if n >= _MAX_CRASHES:
            return FileResult(tid, "error", error_kind="WorkerCrash",
                           error=f"the decode worker (a Ray task) died on this file, {n} times")
        return None

    def _write(self, **extra: Any) -> None:
        state = {"crashes": self.crashes, "timeouts": sorted(self.timeouts), "current": self.current,
                 "restarts": self.restarts, **extra}
        with contextlib.suppress(OSError):
            write_json_atomic(self.path, state)

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


def _decode_batch(batch: pa.Table, cfg: WorkerConfig, task_timeout: float) -> pa.Table:
    """Ray Data UDF (CPU task): ``(idx, path)`` rows -> one ``worker.process_file`` result per row, in their Arrow
    form."""
    hook = json.loads(cfg.hook) if cfg.hook else {}
    journal = _Journal.open()
    cache = open_cache(cfg)
    results: list[FileResult] = []
    watchdog = _Watchdog(journal, task_timeout)
    failed = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's per-file warnings: each file's outcome is its row
            for tid, raw in zip(batch.column("idx").to_pylist(), batch.column("path").to_pylist()):
                path = os.fsdecode(raw)
                res = journal.verdict(tid, path) if journal is not None else None
                if res is None:
                    if journal is not None:
                        journal.enter(path)
                    watchdog.watch(path)
                    if hook:
                        _ray_test_hook(hook, path)
                    res = process_file(tid, path, cfg, cache, hook)
                    watchdog.watch(None)
                results.append(res)
        failed = False
    finally:
        watchdog.close()
        if cache is not None:
            cache.close()
        if failed and journal is not None:
            journal.clear()  # an exception, not a dead worker: a retry must not blame the current file
    if journal is not None:
        if results:
            results[0].restarts = journal.restarts
        journal.clear()
    return results_to_arrow(results)


# ================================================================================================ model (actors)
class _EmbedScore:
    """Ray Data UDF (actor): holds the model and runs the batch unit's model half on every batch."""

    def __init__(self, spec: EncoderSpec, expected: EncoderIdentity, comp: CompiledPolicy) -> None:
        from ..embed import Encoder, resolve_device

        dev = resolve_device(spec.device)
        # Ray gives a fractional-CPU actor one OpenMP thread; the model, like the local engine's, takes the node's
        # cores (the decode tasks fill the gaps): encoder_kwargs says so for a CPU device.
        self.enc = Encoder(spec.model, spec.pretrained, device=dev, batch_size=spec.batch_size,
                           **encoder_kwargs(spec, dev),
                           cache_dir=spec.cache_path)  # the node's own export; prompts come compiled
        actual = EncoderIdentity.of(self.enc)
        if actual != expected:
            raise EncoderMismatchError(
                f"{_MISMATCH}: this node loaded encoder {actual.encoder_id!r} ({actual.spec}, dim {actual.dim}), "
                f"the audit expects {expected.encoder_id!r} ({expected.spec}, dim {expected.dim})")
        self.ident = actual
        self.unit = BatchUnit(self.enc.embed_pixels, comp)

    def __call__(self, batch: pa.Table) -> pa.Table:
        results = results_from_arrow(batch, self.ident.spec.size, self.ident.dim)
        return results_to_arrow(self.unit.map(results))


class _Prober:
    """A short-lived actor that loads the model once: the encoder's identity, and prompt embeddings."""

    def __init__(self, spec: EncoderSpec) -> None:
        from ..embed import Encoder, resolve_device

        self.enc = Encoder(spec.model, spec.pretrained, device=resolve_device(spec.device),
                           cache_dir=spec.cache_path, **encoder_kwargs(spec))

    def identity(self) -> EncoderIdentity:
        return EncoderIdentity.of(self.enc)

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
            ray.init(num_cpus=max(2, cpu_count()), object_store_memory=_local_object_store_bytes(), **common)
    except Exception as e:  # ConnectionError, RuntimeError, ValueError: whatever ray.init raises
        where = f"the Ray cluster at {address!r}" if address else "a local Ray runtime"
        raise EngineUnavailableError(f"cannot start or reach {where}: {type(e).__name__}: {e}") from e
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


def _resources(ray: Any, device: str | None, opts: RayOptions) -> tuple[dict[str, float], int]:
    """Ray resources of one model actor and how many actors: a GPU each where the cluster has GPUs, else a fraction
    of a CPU (so that the decode tasks are never starved of CPU slots), one per node."""
    total = ray.cluster_resources()
    gpus = float(total.get("GPU", 0))
    want = (device or os.environ.get("SAFECLIP_DEVICE") or "auto").lower()
    if want.startswith("cuda") and gpus == 0 and not opts.actor_gpus:
        raise EngineUnavailableError(
            "device 'cuda' was asked for, but the Ray cluster has no GPUs (ray.cluster_resources())")
    use_gpu = bool(opts.actor_gpus) or (gpus > 0 and not want.startswith(("cpu", "mps")))
    if use_gpu:
        per = float(opts.actor_gpus or 1.0)
        n = opts.actors or max(1, int(gpus // per))
        return {"num_gpus": per, "num_cpus": float(opts.actor_cpus if opts.actor_cpus is not None else 1.0)}, n
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    return {"num_cpus": float(opts.actor_cpus if opts.actor_cpus is not None else 0.5)}, opts.actors or max(1, nodes)


def _stalled(e: BaseException) -> bool:
    """Whether Ray gave up waiting (no progress within the stall timeout) rather than failed."""
    cur: BaseException | None = e
    for _ in range(8):
        if cur is None:
            return False
        if isinstance(cur, TimeoutError) or type(cur).__name__ == "ExecutionTimeoutError":
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def _shard_blocks(todo: Sequence[tuple[int, str]], decode_batch: int) -> list[pa.Table]:
    import pyarrow as pa

    out = []
    for i in range(0, len(todo), decode_batch):
        chunk = todo[i:i + decode_batch]
        out.append(pa.table({"idx": pa.array([t[0] for t in chunk], pa.int64()),
                             # bytes: a file name need not be valid UTF-8 (see safeclip.audit.reader)
                             "path": pa.array([os.fsencode(os.path.abspath(t[1])) for t in chunk], pa.binary())}))
    return out


class _Committer:
    """Driver side: gathers each shard's results and, once a shard is complete, runs the batch unit's output half
    on it and commits it as one part."""

    def __init__(self, output: RunOutput, tally: Tally, todo_counts: dict[int, int], hook: Mapping[str, Any]) -> None:
        self.output = output
        self.tally = tally
        self.remaining = dict(todo_counts)
        self.shard_rows = output.options.part_rows
        self.pending: dict[int, list[pa.Table]] = {}
        self.seen: dict[int, set[int]] = {}
        self.begun = False
        self.shards = 0
        self._exit_after = hook.get("driver_exit_after_shards")  # test-only: the driver dies after n commits

    def add(self, block: pa.Table) -> None:
        """Take one block of scored results; commit every shard it completes."""
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

        ident = self.output.ident
        with self.tally.timed("write_s"):
            table = pa.concat_tables(self.pending.pop(shard))
            results = sorted(results_from_arrow(table, ident.spec.size, ident.dim), key=lambda r: r.tid)
            if not self.begun:  # an actor confirmed the encoder (it refuses to start otherwise): the folder is ours
                self.output.begin()
                self.begun = True
            store(results, self.output, self.tally)
            self.output.commit()
            self.shards += 1
        if self._exit_after is not None and self.shards >= int(self._exit_after):
            os._exit(75)  # as kill -9 would, right after a commit


def _compile(get: Any, pol: Policy, cache_dir: Path, ident: EncoderIdentity | None, verified: bool,
             start_prober: Any) -> tuple[CompiledPolicy, EncoderIdentity, bool]:
    """Compile ``pol`` from the prompt cache; prompts never embedded under this encoder come from the prober (which
    also checks a guessed identity). Returns the compiled policy, the identity and whether it is verified."""
    from ..compiled import CompiledPolicy

    holder: dict[str, Any] = {}

    def prober_identity() -> EncoderIdentity:
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


class _RayRun:
    """One run of the Ray engine, the driver's side: the identity, the Ray Data pipeline, the commits."""

    def __init__(self, plan: AuditPlan) -> None:
        self.plan = plan
        self.ray = import_ray()
        self.hook = os.environ.get(TEST_HOOK_ENV) or None
        self.tally = Tally(timings=dict.fromkeys(_TIMINGS, 0.0))
        self.memo_key = (None if plan.loaded_encoder is not None
                         else encoder_memo_key(plan.encoder.model, plan.encoder.pretrained))
        self.probers: list[Any] = []
        self.output: RunOutput | None = None
        self.resources: dict[str, float] = {}
        self.n_actors = 1

    def run(self) -> AuditSummary:
        plan = self.plan
        started = False
        with embedding_dir(plan.cache_dir if plan.use_cache else None) as emb_dir:
            try:
                t0 = time.monotonic()
                started = _connect(self.ray, plan.engine.address, plan.verbose)
                self.resources, self.n_actors = _resources(self.ray, plan.encoder.device, plan.engine.ray)
                ident, comp, verified = self._identify()
                startup = self.tally.timings["model_load_s"] = time.monotonic() - t0
                todo_n, ident = self._commit_all(emb_dir.resolve(), ident, comp, verified)
                assert self.output is not None
                with self.tally.timed("merge_s"):
                    table = self.output.merge()
            finally:
                self._kill_probers()
                if self.output is not None:
                    self.output.release()
                if started:
                    self.ray.shutdown()
        return plan.summarize(table, self.tally, processed=todo_n, startup_seconds=startup,
                              encoder_id=ident.encoder_id, label="safeclip audit (ray)")

    # ------------------------------------------------------------------------------------------------ identity
    def _get(self, ref: Any) -> Any:  # Ray waits forever by default
        return self.ray.get(ref, timeout=self.plan.engine.ray.stall_timeout)

    def _prober(self) -> Any:
        if not self.probers:
            plan = self.plan
            actor = self.ray.remote(**self.resources)(_Prober)
            self.probers.append(actor.remote(plan.encoder))
        return self.probers[0]

    def _kill_probers(self) -> None:
        for p in self.probers:
            with contextlib.suppress(Exception):
                self.ray.kill(p)
        self.probers.clear()

    def _identify(self, guess: bool = True) -> tuple[EncoderIdentity, CompiledPolicy, bool]:
        """``(identity, compiled policy, verified)``: exact from a loaded encoder, else remembered from an earlier
        run (``guess``; the actors check it before any row exists), else from a prober actor that loads the model
        once."""
        plan = self.plan
        if plan.loaded_encoder is not None:
            loaded = plan.loaded_encoder
            return EncoderIdentity.of(loaded), compile_policy(plan.policy, loaded, plan.cache_dir), True
        remembered = EncoderIdentity.recall(plan.cache_dir, self.memo_key) if guess else None
        comp, ident, verified = _with_timeout(
            plan.engine.ray.stall_timeout, "load the model to learn its identity and embed the policy's prompts",
            lambda: _compile(self._get, plan.policy, plan.cache_dir, remembered, not guess, self._prober))
        if verified:
            ident.remember(plan.cache_dir, self.memo_key)
        self._kill_probers()
        return ident, comp, verified

    # ------------------------------------------------------------------------------------------------ commits
    def _commit_all(self, emb_dir: Path, ident: EncoderIdentity, comp: CompiledPolicy,
                    verified: bool) -> tuple[int, EncoderIdentity]:
        """Stream every input without a committed row through Ray; return how many there were and the identity
        that wrote them (a remembered identity the actors refused is replaced by the real one, once)."""
        for attempt in (0, 1):
            self.output = self.plan.open_output(ident, emb_dir)
            todo = self.output.todo()
            try:
                committer = self._stream(todo, emb_dir, ident, comp, verified)
                break
            except _IdentityMismatch:
                self.output.release()
                self.output = None
                if attempt or verified:
                    raise EngineError("the Ray actors loaded another encoder than the audit expects") from None
                # The remembered identity was stale: learn the real one (nothing was committed under the guess).
                ident, comp, verified = self._identify(guess=False)
        if not committer.begun:
            self.output.begin()
        return len(todo), ident

    def _stream(self, todo: Sequence[tuple[int, str]], emb_dir: Path, ident: EncoderIdentity, comp: CompiledPolicy,
                verified: bool) -> _Committer:
        """Stream the ``todo`` inputs through decode tasks and model actors, committing each shard as it completes."""
        assert self.output is not None
        counts: dict[int, int] = {}
        for i, _ in todo:
            counts[i // self.plan.output.part_rows] = counts.get(i // self.plan.output.part_rows, 0) + 1
        committer = _Committer(self.output, self.tally, counts, json.loads(self.hook or "{}"))
        if not todo:
            return committer
        with self._data_context():
            ds = self._pipeline(todo, emb_dir, ident, comp)
            try:
                for block in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
                    committer.add(block)
            except SafeclipError:
                raise
            except Exception as e:  # RayError, Ray Data's ExecutionTimeoutError, ...: keep what was committed
                text = _cause_text(e)
                if _MISMATCH in text and not verified and not committer.begun:
                    raise _IdentityMismatch from e
                kind = EngineStalledError if _stalled(e) else EngineError
                raise kind(f"the Ray audit stopped: {text[:2000]}\n{committer.shards} shard(s) of {len(counts)} "
                           f"were committed in {self.output.parts.dir}; run the same command again to resume") from e
        if committer.remaining:
            raise AuditError(f"Ray returned no rows for {sum(committer.remaining.values())} input(s) of "
                             f"{len(committer.remaining)} shard(s); what was committed is kept: run the same command "
                             "again to resume")
        return committer

    @contextlib.contextmanager
    def _data_context(self) -> Iterator[None]:
        """Ray Data's settings for this run: its progress display and its no-progress timeout."""
        ray, plan = self.ray, self.plan
        with warnings.catch_warnings():  # Ray Data's own copies of its context warn about its deprecated fields
            warnings.filterwarnings("ignore", r"`use_\w+` is deprecated", DeprecationWarning)
            ctx = ray.data.DataContext.get_current().copy()
        ctx.enable_progress_bars = plan.progress
        ctx.print_on_execution_start = plan.progress
        ctx.execution_no_progress_timeout_s = plan.engine.ray.stall_timeout  # (a positive wait_for_min_actors_s would hold
        # decoding back until the model has loaded; actors that never start are caught by this timeout instead)
        with ray.data.DataContext.current(ctx), _quiet_ray_data(plan.progress), warnings.catch_warnings():
            warnings.filterwarnings("ignore", r"`use_\w+` is deprecated", DeprecationWarning)
            yield

    def _pipeline(self, todo: Sequence[tuple[int, str]], emb_dir: Path, ident: EncoderIdentity,
                  comp: CompiledPolicy) -> Any:
        """The Ray Data pipeline: decode tasks, then the model actors."""
        ray, plan, res = self.ray, self.plan, self.resources
        assert self.output is not None
        cfg = WorkerConfig(str(emb_dir), ident.encoder_id, ident.spec, plan.decoding.limits, self.output.fingerprint,
                           0, self.hook, plan.decoding.fast, needs_pdq(plan.policy), plan.decoding.backend)
        gpu = bool(res.get("num_gpus"))
        ds = ray.data.from_arrow(_shard_blocks(todo, plan.engine.ray.decode_batch))
        decode_kw: dict[str, Any] = {}
        if plan.decoding.workers:
            strategy = getattr(ray.data, "TaskPoolStrategy", None)
            decode_kw = {"compute": strategy(size=plan.decoding.workers)} if strategy else {"concurrency": plan.decoding.workers}
        ds = ds.map_batches(_decode_batch, batch_format="pyarrow", batch_size=None, num_cpus=1,
                            fn_kwargs={"cfg": cfg, "task_timeout": plan.task_timeout}, **decode_kw)
        return ds.map_batches(
            _EmbedScore, batch_format="pyarrow", batch_size=int(plan.encoder.batch_size or (64 if gpu else 16)),
            compute=ray.data.ActorPoolStrategy(size=self.n_actors), zero_copy_batch=True,
            fn_constructor_kwargs={"spec": plan.encoder, "expected": ident, "comp": comp},
            **({"num_gpus": res["num_gpus"], "num_cpus": res["num_cpus"]} if gpu else {"num_cpus": res["num_cpus"]}))


def _with_timeout(timeout: float, what: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` (which waits on Ray for at most ``timeout`` s a call), turning Ray's errors into safeclip's."""
    import ray.exceptions as rex

    try:
        return fn()
    except rex.GetTimeoutError as e:
        raise EngineStalledError(
            f"no Ray worker could {what} within {timeout:g}s: are the resources an actor needs (a GPU, or CPUs) "
            "available in the cluster? (stall_timeout raises this limit)") from e
    except rex.RayError as e:
        text = _cause_text(e)
        if "ModelLoadError" in text or "could not load CLIP weights" in text:
            raise ModelLoadError(f"a Ray worker could not load the model: {text}") from e
        raise EngineError(f"a Ray worker failed to {what}: {text}") from e


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


