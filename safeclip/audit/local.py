"""The local engine: decode processes on this machine feed the batch unit, which runs the model in this process.

    inputs -> DecodePool (worker processes: read, sha256, cache lookup, decode, pixels; distributor.py)
           -> batches of ``batch_size`` distinct images' frames -> BatchUnit.map (dedup, embed, score; mapper.py)
           -> store (cache, then rows) -> a part every ``part_rows`` rows or ``part_seconds`` (writer.py) -> merge

Start-up and thread budget
    The workers boot while the model loads. The encoder's identity is remembered in the cache folder
    (:mod:`safeclip.audit.identity`), so from the second run on, hashing, cache lookups and decoding start before
    the model has loaded; the loaded encoder is then checked against the guess, before anything is committed.
    When, besides, every prompt of the policy has a cached embedding in that space, the model is loaded (with a
    "loading model" line on stderr) only when a file first needs embedding: a re-run whose inputs are all cache
    hits or errors never loads it, its rows scored from cached embeddings and cached prompts of the remembered
    space. If a model loaded that late turns out not to be the remembered one, the run starts over under the
    real identity (rows committed under the guess belong to another configuration and are dropped). On a
    CPU torch gets every core and the workers (one per core) run at ``nice`` +10: measured on 2 cores, this beats
    giving torch fewer threads (which leaves a core idle whenever the model, not decoding, is the bottleneck) and
    matches un-niced workers, while keeping decoding from slowing the forward passes when it is not needed.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from .distributor import DONE, DecodePool, ThreadDecodePool, mp_context
from .identity import EncoderIdentity, encoder_memo_key
from .mapper import BatchUnit, compile_policy, needs_pdq, store
from .plan import SMALL_AUDIT_FILES, cpu_count, encoder_kwargs
from .summary import Tally
from .worker import TEST_HOOK_ENV, FileResult, WorkerConfig
from .writer import RunOutput, embedding_dir

if TYPE_CHECKING:  # pragma: no cover
    from pathlib import Path

    import numpy as np
    import pyarrow as pa

    from ..compiled import CompiledPolicy
    from ..embed import Encoder
    from ..policy import Policy
    from .plan import AuditPlan
    from .summary import AuditSummary

__all__ = ["run"]

_TIMINGS = ("model_load_s", "wait_s", "embed_s", "score_s", "write_s", "read_s", "decode_s", "merge_s")
_MAX_READY = 1024  # results (cache hits, errors) held before they are scored and stored without a model batch
_IDLE_FLUSH_S = 0.5  # a partial batch waits this long for more decoded files before it goes to the model


def run(plan: AuditPlan) -> AuditSummary:
    """Run ``plan`` on this machine (see the module doc)."""
    return _LocalRun(plan).run()


class _WrongGuess(Exception):
    """The model loaded late has another identity than the remembered one the run started with."""


def _compile_from_cache(policy: Policy, ident: EncoderIdentity, cache_dir: Path) -> CompiledPolicy | None:
    """``policy`` compiled from the prompt cache of ``ident``'s space alone, or None if a prompt is missing."""
    from ..compiled import CompiledPolicy
    from ..embed import PromptCache

    prompts = PromptCache(ident.encoder_id, cache_dir)
    try:
        return CompiledPolicy.build(policy, prompts.get, ident.encoder_id)
    except KeyError:
        return None


def _warm_pyarrow() -> None:
    with contextlib.suppress(Exception):
        import io

        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"x": [1]}), io.BytesIO(), compression="zstd")


class _Pending:
    """Results waiting for the next model batch; ``frames`` counts the frames of their distinct images."""

    def __init__(self) -> None:
        self.results: list[FileResult] = []
        self.shas: set[str] = set()
        self.frames = 0
        self.since = 0.0

    def take(self) -> list[FileResult]:
        out = self.results
        self.results, self.shas, self.frames = [], set(), 0
        return out

    def __len__(self) -> int:
        return len(self.results)

    def add(self, r: FileResult) -> None:
        if not self.results:
            self.since = time.monotonic()
        self.results.append(r)
        if r.kind == "pixels" and r.sha256 not in self.shas:
            self.shas.add(r.sha256)  # type: ignore[arg-type]
            self.frames += len(r.pixels)  # type: ignore[arg-type]


class _LocalRun:
    """One run of the local engine: its decode pool, output, encoder and counters."""

    def __init__(self, plan: AuditPlan) -> None:
        self.plan = plan
        self.hook = os.environ.get(TEST_HOOK_ENV) or None
        self.n_workers = plan.decoding.workers or min(cpu_count(), 32)
        self.tally = Tally(timings=dict.fromkeys(_TIMINGS, 0.0))
        self.pool: DecodePool | ThreadDecodePool | None = None
        # A small run decodes in threads of this process: no worker process starts before its first file.
        self.in_process = len(plan.inputs) <= SMALL_AUDIT_FILES and not self.hook
        self.output: RunOutput | None = None
        self.emb_dir: Path = plan.cache_dir
        self.pbar: Any = None
        self.torch_prev: int | None = None
        self.enc: Encoder | None = None
        self.ident: EncoderIdentity | None = None  # the identity the pool and the output were opened for
        self.memo_key: str | None = None
        self.loading: tuple[threading.Thread, dict[str, Any]] | None = None  # the model, loading beside decoding

    def run(self) -> AuditSummary:
        plan = self.plan
        # pyarrow's import and first Parquet write take ~0.4 s: pay them on a spare thread while the model loads.
        threading.Thread(target=_warm_pyarrow, name="safeclip-warm-pyarrow", daemon=True).start()
        with embedding_dir(plan.cache_dir if plan.use_cache else None) as self.emb_dir:
            try:
                t0 = time.monotonic()
                comp = self._start()
                self.tally.timings["model_load_s"] = time.monotonic() - t0
                while True:
                    output = self.output
                    assert output is not None and self.pool is not None  # opened by _start
                    output.begin()
                    todo_n = len(output.todo())
                    try:
                        self._stream(BatchUnit(self._embed_pixels, comp), todo_n)
                        break
                    except _WrongGuess:  # the model, loaded late, is not the remembered one: start over with it
                        comp = self._restart()
                with self.tally.timed("merge_s"):
                    table: pa.Table = output.merge()
                self.tally.worker_restarts += self.pool.restarts
            finally:
                self._close()
        return plan.summarize(table, self.tally, processed=todo_n,
                              startup_seconds=self.tally.timings["model_load_s"], encoder_id=self.ident.encoder_id,
                              label="safeclip audit")

    # ------------------------------------------------------------------------------------------------ start-up
    def _new_pool(self) -> DecodePool | ThreadDecodePool:
        max_pending = max(256, 4 * (self.plan.encoder.batch_size or 16), 4 * self.n_workers)
        if self.in_process:
            return ThreadDecodePool(self.n_workers, max_pending=max_pending)
        pool = DecodePool(self.n_workers, max_pending=max_pending, task_timeout=self.plan.task_timeout)
        pool.boot()  # the workers import the decode stack (no torch) while the model loads
        return pool

    def _open(self, pool: DecodePool | ThreadDecodePool, ident: EncoderIdentity) -> RunOutput:
        """Open the output and the cache of this embedding space; start decoding what is left to do."""
        plan = self.plan
        output = plan.open_output(ident, self.emb_dir)
        cfg = WorkerConfig(str(self.emb_dir), ident.encoder_id, ident.spec, plan.decoding.limits, output.fingerprint,
                           plan.engine.worker_nice, self.hook, plan.decoding.fast, needs_pdq(plan.policy),
                           plan.decoding.backend)
        pool.run(cfg, ((i, p) for i, p in enumerate(plan.inputs) if p not in output.done))  # lazily
        return output

    def _start(self) -> CompiledPolicy:
        """The policy compiled for the encoder, with the pool decoding and the output open for its identity. The
        encoder is loaded here unless its identity is remembered and every prompt is cached (then
        :meth:`_embed_pixels` loads it when a file first needs it)."""
        plan = self.plan
        if plan.loaded_encoder is not None:
            self.enc, self.ident = plan.loaded_encoder, EncoderIdentity.of(plan.loaded_encoder)
            self.pool = self._new_pool()
            self.output = self._open(self.pool, self.ident)
            if plan.encoder.threads:
                self._set_torch_threads(plan.encoder.threads)
            return compile_policy(plan.policy, plan.loaded_encoder, plan.cache_dir)
        # An audit run before with the same weights told us the encoder's identity: start hashing, cache lookups
        # and decoding now, while the model loads (seconds on a CPU), and check the guess after.
        self.memo_key = memo_key = encoder_memo_key(plan.encoder.model, plan.encoder.pretrained)
        guess = EncoderIdentity.recall(plan.cache_dir, memo_key)
        comp = None if guess is None else _compile_from_cache(plan.policy, guess, plan.cache_dir)
        if guess is not None and comp is not None:
            self.ident = guess
            self.pool = self._new_pool()
            self.output = self._open(self.pool, guess)
            return comp
        if not self.in_process:
            mp_context()  # start the fork server here, before torch is imported (it reads the environment)
        booted: dict[str, BaseException] = {}
        booter = threading.Thread(target=self._boot, args=(guess, booted), name="safeclip-audit-boot", daemon=True)
        booter.start()
        try:
            enc = self._load_encoder()
        finally:
            booter.join()  # the workers' boot waits on the fork server's imports
        if "error" in booted:
            raise booted["error"]
        actual = EncoderIdentity.of(enc)
        if guess != actual:
            if self.output is not None:  # a wrong guess: nothing was committed yet; start again, properly
                self._close_pool_and_output()
                self.pool = self._new_pool()
            assert self.pool is not None
            self.output = self._open(self.pool, actual)
            actual.remember(plan.cache_dir, memo_key)
        self.enc, self.ident = enc, actual
        return compile_policy(plan.policy, enc, plan.cache_dir)

    def _start_loading(self) -> None:
        """Load the model on a thread of its own from the first file that needs it, while the rest of its batch
        decodes (instead of after: a small audit's whole time would be decode, then load, then embed)."""
        if self.enc is not None or self.loading is not None:
            return
        box: dict[str, Any] = {}

        def load() -> None:
            t0 = time.monotonic()
            try:
                box["encoder"] = self._load_encoder()
            except BaseException as e:  # re-raised by the thread that needs the model
                box["error"] = e
            box["seconds"] = time.monotonic() - t0

        th = threading.Thread(target=load, name="safeclip-audit-load", daemon=True)
        self.loading = (th, box)
        th.start()

    def _embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        if self.enc is None:  # the first file that needs the model
            self._start_loading()
            assert self.loading is not None
            th, box = self.loading
            with self.tally.timed("wait_s"):
                th.join()
            self.tally.timings["model_load_s"] += box.get("seconds", 0.0)
            if "error" in box:
                raise box["error"]
            self.enc = box["encoder"]
            if EncoderIdentity.of(self.enc) != self.ident:
                raise _WrongGuess
        return self.enc.embed_pixels(pixels)

    def _restart(self) -> CompiledPolicy:
        """Start over with the loaded encoder's identity (parts committed under the wrong guess are dropped by
        :meth:`RunOutput.begin`; the embedding cache keeps what was computed)."""
        assert self.enc is not None
        plan = self.plan
        self._close_pool_and_output()
        self.ident = actual = EncoderIdentity.of(self.enc)
        actual.remember(plan.cache_dir, self.memo_key)
        load_s = self.tally.timings["model_load_s"]
        self.tally = Tally(timings=dict.fromkeys(_TIMINGS, 0.0))
        self.tally.timings["model_load_s"] = load_s
        self.pool = self._new_pool()
        self.output = self._open(self.pool, actual)
        return compile_policy(plan.policy, self.enc, plan.cache_dir)

    def _boot(self, guess: EncoderIdentity | None, booted: dict[str, BaseException]) -> None:
        try:
            self.pool = self._new_pool()
            if guess is not None:
                self.output = self._open(self.pool, guess)
        except BaseException as e:  # re-raised by the main thread once the model has loaded
            booted["error"] = e

    def _load_encoder(self) -> Encoder:
        from ..embed import Encoder, resolve_device

        plan = self.plan
        spec = plan.encoder
        dev = resolve_device(spec.device)
        if plan.verbose:
            weights = f" ({spec.pretrained})" if spec.pretrained else ""
            print(f"safeclip audit: loading model {spec.model}{weights} on {dev} ...", file=sys.stderr, flush=True)
        if "torch" in sys.modules and self.torch_prev is None:  # a caller's torch: give its thread count back
            self.torch_prev = sys.modules["torch"].get_num_threads()
        return Encoder(spec.model, spec.pretrained, device=dev, batch_size=spec.batch_size, cache_dir=plan.cache_dir,
                       **encoder_kwargs(spec, dev))

    def _set_torch_threads(self, n: int) -> None:
        import torch

        if self.torch_prev is None:
            self.torch_prev = torch.get_num_threads()
        torch.set_num_threads(n)

    # ------------------------------------------------------------------------------------------------ the loop
    def _target(self) -> int:
        """Frames per model batch (the encoder's default once it is loaded)."""
        return int(self.plan.encoder.batch_size or (self.enc.batch_size if self.enc is not None else 16))

    def _stream(self, unit: BatchUnit, todo_n: int) -> None:
        """Feed decoded files to the batch unit a model batch at a time, committing parts as they fill."""
        assert self.pool is not None and self.output is not None
        if self.plan.progress and todo_n:
            from tqdm import tqdm

            self.pbar = tqdm(total=todo_n, unit="img", file=sys.stderr, dynamic_ncols=True, smoothing=0.1,
                             desc="audit")
        pending = _Pending()
        last_commit = time.monotonic()
        while True:
            with self.tally.timed("wait_s"):
                res = self.pool.get(timeout=_IDLE_FLUSH_S if pending else 5.0)
            if res is DONE:
                break
            if res is not None:
                pending.add(res)
                if res.kind == "pixels":
                    self._start_loading()
            if pending and (pending.frames >= self._target() or len(pending) >= _MAX_READY or (
                    res is None and time.monotonic() - pending.since > _IDLE_FLUSH_S)):
                self._map(unit, pending.take())  # a partial batch when the decoders are slow right now
            rows = len(self.output.rows)
            if rows and (rows >= self.plan.output.part_rows or time.monotonic() - last_commit > self.plan.output.part_seconds):
                with self.tally.timed("write_s"):
                    self.output.commit()
                last_commit = time.monotonic()
        if pending:
            self._map(unit, pending.take())
        with self.tally.timed("write_s"):
            self.output.commit()
        if self.pbar is not None:
            self.pbar.close()
            self.pbar = None

    def _map(self, unit: BatchUnit, results: list[FileResult]) -> None:
        assert self.output is not None
        unit.map(results, known=self.output.db.get_many)
        with self.tally.timed("write_s"):
            store(results, self.output, self.tally)
        if self.pbar is not None:
            self.pbar.update(len(results))

    # ------------------------------------------------------------------------------------------------ the end
    def _close_pool_and_output(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        if self.output is not None:
            self.output.release()
            self.output = None

    def _close(self) -> None:
        if self.pbar is not None:
            self.pbar.close()
        self._close_pool_and_output()
        if self.torch_prev is not None:
            import torch

            torch.set_num_threads(self.torch_prev)
