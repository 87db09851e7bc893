"""Moderator: chains decode -> embed -> score -> calibrate -> decide for requests.

``safeclip.check(image)`` uses one process-wide :class:`Moderator`, built lazily, once, under a lock. A Moderator is
thread-safe: ``check`` decodes in the calling thread and ``check_async`` in a decode pool, then a micro-batcher
merges the requests in flight into one model forward (see ``safeclip._batcher``); ``check_many`` decodes in threads
and runs full batches itself. Compiled policies are cached per policy.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import weakref
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._batcher import MicroBatcher, Ticket
from .compiled import CompiledPolicy
from .arrays import embedding_row_problems
from .decide import Decision, build_decision, decide_codes, error_decision, nonfinite_rows
from .decode import DecodeLimits, decode
from .embed import Encoder, prepare_pixels, resolve_encoder_args
from .errors import ConfigError, DataError, DecodeError
from .policy import Policy, load_policy
from .score import Scores

__all__ = ["Moderator", "check", "default_moderator", "set_default_moderator"]

_ON_ERROR = ("raise", "flag", "block")


@dataclass(frozen=True)
class _Prepared:
    pixels: np.ndarray  # (F, S, S, 3) uint8
    frame_indices: tuple[int, ...]
    sha256: str
    source: str | None
    backgrounds: tuple[tuple[int, int, int] | None, ...] = ()  # per row: the colour a transparent frame was seen on


_log = logging.getLogger("safeclip")


def _note_encoder_override(policy: Policy, model: str, pretrained: str | None, chosen_by: str) -> None:
    """Say so when the caller's encoder is not the one the policy names (its thresholds were set for that one)."""
    named = dict(policy.encoder)
    if chosen_by != "caller" or not named.get("model"):
        return
    if named.get("model") != model or named.get("pretrained", pretrained) != pretrained:
        _log.info("policy %s names encoder %s/%s; using %s/%s as asked (decisions record its encoder_id)",
                     policy.id, named.get("model"), named.get("pretrained"), model, pretrained)


def _source_name(image: Any) -> str | None:
    return os.fspath(image) if isinstance(image, (str, os.PathLike)) else None


class Moderator:
    """Moderates images under a policy with one CLIP encoder.

    >>> m = Moderator(policy="strict", model="ViT-B-32", pretrained="/models/vit-b-32.pt")   # doctest: +SKIP
    >>> d = m.check("upload.jpg")                                                            # doctest: +SKIP
    >>> d.action, d.reasons                                                                  # doctest: +SKIP
    ('allow', ())

    Each stage is usable alone: ``emb = m.embed(images)``, ``scores = m.score(emb)``,
    ``probs, calibrated = m.calibrate(scores)``, ``m.decide(emb)`` (score + calibrate + decide, no model).

    The encoder is the one the caller names (``model``/``pretrained``, else ``$SAFECLIP_MODEL``/
    ``$SAFECLIP_PRETRAINED``), else the policy's ``encoder:``, else the default; ``encoder_chosen_by`` says which
    (``"caller"``, ``"policy"`` or ``"default"``) and every Decision records the ``encoder_id`` that decided.

    ``on_error`` decides what an input that cannot be fully scored becomes (undecodable, or an embedding that is
    not finite and normalised): ``"raise"`` (a :class:`DecodeError` / :class:`DataError`), or a Decision whose
    action is ``"flag"`` or ``"block"`` with ``error`` set (fail closed, for upload handlers). Never ``allow``.

    Concurrent ``check`` / ``check_async`` calls share forwards: requests arriving within ``max_wait_ms`` of each
    other are embedded together, up to ``max_batch`` frames (default: the encoder's batch size). At most
    ``max_queue`` requests are in flight at once (``None``: four batches); one more raises
    :class:`~safeclip.errors.OverloadedError`.
    """

    def __init__(
        self,
        policy: str | os.PathLike[str] | Policy | None = None,
        *,
        model: str | None = None,
        pretrained: str | None = None,
        device: str | None = None,
        batch_size: int | None = None,
        precision: str = "auto",
        runtime: str | None = None,
        threads: int | None = None,
        on_error: str = "raise",
        decode_limits: DecodeLimits | None = None,
        fast_decode: bool = True,
        decode_threads: int | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        allow_outside: bool = False,
        encoder: Encoder | None = None,
        max_batch: int | None = None,
        max_wait_ms: float = 5.0,
        max_queue: int | None = 256,
    ) -> None:
        if on_error not in _ON_ERROR:
            raise ConfigError(f"on_error must be one of {_ON_ERROR}, not {on_error!r}")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise ConfigError(f"batch_size must be a positive integer, not {batch_size!r}")
        self.on_error = on_error
        self.allow_outside = allow_outside
        self.policy = load_policy(policy, allow_outside=allow_outside)
        if encoder is None:
            model, pretrained, self.encoder_chosen_by = resolve_encoder_args(model, pretrained, self.policy.encoder)
            _note_encoder_override(self.policy, model, pretrained, self.encoder_chosen_by)
            encoder = Encoder(model, pretrained, device=device, precision=precision, batch_size=batch_size,
                              cache_dir=cache_dir, runtime=runtime, threads=threads)
        else:
            self.encoder_chosen_by = "caller"
        self.encoder = encoder
        self.decode_limits = decode_limits or DecodeLimits()
        self.fast_decode = fast_decode
        self.decode_threads = decode_threads or min(4, os.cpu_count() or 1)
        max_batch = self.encoder.batch_size if max_batch is None else max_batch
        self._batching = {"max_batch": max_batch, "max_wait_ms": max_wait_ms,
                          "max_queue": 4 * max_batch if max_queue is None else max_queue}
        self.batcher = MicroBatcher(self._embed_and_decide, **self._batching)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._compiled: dict[tuple[str, str], CompiledPolicy] = {}
        self._compile_lock = threading.Lock()
        _live_moderators.add(self)
        self.compiled(self.policy)

    @property
    def encoder_id(self) -> str:
        return self.encoder.encoder_id

    def compiled(self, policy: str | os.PathLike[str] | Policy | None = None) -> CompiledPolicy:
        """The policy (default: this Moderator's) compiled against this encoder, cached."""
        pol = self.policy if policy is None else load_policy(policy, allow_outside=self.allow_outside)
        key = (pol.source or pol.id, repr(pol))
        with self._compile_lock:
            found = self._compiled.get(key)
            if found is None:
                found = CompiledPolicy.build(pol, self.encoder.embed_texts, self.encoder_id)
                self._compiled[key] = found
            return found

    # ------------------------------------------------------------------------------------ single stages
    def embed(self, images: Iterable[Any]) -> np.ndarray:
        """``(N, D)`` L2-normalised float32 embeddings, one row per image (an animation's first sampled frame)."""
        prepared = [self._prepare(img) for img in images]
        if not prepared:
            return np.empty((0, self.encoder.dim), np.float32)
        return self.encoder.embed_pixels(np.stack([p.pixels[0] for p in prepared]))

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """``(N, D)`` L2-normalised text embeddings in the same space as :meth:`embed`."""
        return self.encoder.embed_texts(list(texts))

    def score(self, embeddings: np.ndarray, *, policy: Any = None) -> Scores:
        """Raw per-category signals for cached embeddings (no model involved)."""
        return self.compiled(policy).scorer.score(embeddings)

    def calibrate(self, scores: Scores, *, policy: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """``(N, C)`` probabilities and the ``(C,)`` calibrated mask."""
        return self.compiled(policy).probabilities(scores)

    def decide(self, embeddings: np.ndarray, *, policy: Any = None) -> list[Decision]:
        """Score, calibrate and decide ``(N, D)`` embeddings under a policy, without the model."""
        comp = self.compiled(policy)
        scores = comp.scorer.score(embeddings, keep_sims=True)
        probs, calibrated = comp.probabilities(scores)
        return [self._decision(comp, scores, probs, calibrated, [i]) for i in range(len(scores))]

    # ------------------------------------------------------------------------------------ requests
    def check(self, image: Any, *, policy: Any = None) -> Decision:
        """Moderate one image (path, bytes, file object, PIL image or numpy array).

        Decodes in the calling thread; the forward is shared with the other requests in flight.
        """
        with self.batcher.admit() as ticket:
            prepared = self._prepare_request(image, policy, ticket)
            return prepared if isinstance(prepared, Decision) else prepared.result()

    async def check_async(self, image: Any, *, policy: Any = None, ticket: Ticket | None = None) -> Decision:
        """:meth:`check` for asyncio code: decoding and the forward run in threads, never in the event loop.

        Cancelling the call (a timeout, a client gone) drops the request if it has not reached a forward yet.
        ``ticket`` is a place taken beforehand with :meth:`admit` (a server admits before reading the body).

        >>> decision = await moderator.check_async(upload_bytes, policy="strict")   # doctest: +SKIP
        """
        own = ticket is None
        ticket = self.admit() if ticket is None else ticket
        try:
            prepared = await asyncio.wrap_future(self._decode_pool().submit(self._prepare_request, image, policy,
                                                                            ticket))
            return prepared if isinstance(prepared, Decision) else await asyncio.wrap_future(prepared)
        except asyncio.CancelledError:
            ticket.cancel()
            raise
        finally:
            if own:
                ticket.release()

    def admit(self) -> Ticket:
        """A place among the ``max_queue`` requests in flight, or :class:`~safeclip.errors.OverloadedError`."""
        return self.batcher.admit()

    def check_many(self, images: Iterable[Any], *, policy: Any = None) -> list[Decision]:
        """Moderate many images, in input order: decoding in threads while the model runs full batches."""
        images = list(images)
        if len(images) <= 1:
            return self._run(images, policy, pool=None)
        with ThreadPoolExecutor(self.decode_threads, thread_name_prefix="safeclip-decode") as pool:
            return self._run(images, policy, pool=pool)

    def _prepare(self, image: Any) -> _Prepared:
        spec = self.encoder.pixel_spec
        dec = decode(image, limits=self.decode_limits, target_size=spec.size if self.fast_decode else None)
        pixels = np.stack([prepare_pixels(f, spec, fast=self.fast_decode) for f in dec.frames])
        return _Prepared(pixels, dec.frame_indices, dec.sha256, dec.source or _source_name(image), dec.backgrounds)

    def _decode_pool(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="safeclip-decode")
            return self._pool

    def _prepare_request(self, image: Any, policy: Any, ticket: Ticket) -> Decision | Future[Decision]:
        """Decode one request and queue it for a forward; an input that cannot be decoded is decided here."""
        if ticket.cancelled:  # the caller gave up while this waited for a decode thread: decode nothing
            gone: Future[Decision] = Future()
            gone.cancel()
            return gone
        comp = self.compiled(policy)
        prep = self._try_prepare(image)
        if isinstance(prep, DecodeError):
            return error_decision(self.on_error, str(prep), policy=comp.policy, encoder_id=self.encoder_id,
                                  source=prep.source or _source_name(image))
        return self.batcher.submit(ticket, (comp, prep), len(prep.pixels))

    def _embed_and_decide(self, items: list[tuple[CompiledPolicy, _Prepared]]) -> list[Decision | DataError]:
        """The micro-batcher's batch: one forward for every request, then each scored alone, under its policy."""
        emb = self.encoder.embed_pixels(np.concatenate([p.pixels for _, p in items]))
        out, row = [], 0
        for comp, p in items:
            out.extend(self._decide_embedded(comp, emb[row:row + len(p.pixels)], [p]))
            row += len(p.pixels)
        return out

    def _try_prepare(self, image: Any) -> _Prepared | DecodeError:
        try:
            return self._prepare(image)
        except DecodeError as e:
            if self.on_error == "raise":
                raise
            return e

    def _run(self, images: list[Any], policy: Any, pool: ThreadPoolExecutor | None) -> list[Decision]:
        comp = self.compiled(policy)
        prepared_iter = pool.map(self._try_prepare, images) if pool else map(self._try_prepare, images)
        batch: list[tuple[int, _Prepared]] = []
        results: dict[int, Decision] = {}
        n_frames = 0
        target = self.encoder.batch_size

        def flush() -> None:
            nonlocal batch, n_frames
            if not batch:
                return
            emb = self.encoder.embed_pixels(np.concatenate([p.pixels for _, p in batch]))
            for (i, _), decided in zip(batch, self._decide_embedded(comp, emb, [p for _, p in batch])):
                if isinstance(decided, DataError):
                    raise decided
                results[i] = decided
            batch, n_frames = [], 0

        for i, prep in enumerate(prepared_iter):
            if isinstance(prep, DecodeError):
                results[i] = error_decision(self.on_error, str(prep), policy=comp.policy,
                                            encoder_id=self.encoder_id, source=prep.source or _source_name(images[i]))
                continue
            batch.append((i, prep))
            n_frames += len(prep.pixels)
            if n_frames >= target:
                flush()
        flush()
        return [results[i] for i in range(len(images))]

    def _decide_embedded(self, comp: CompiledPolicy, emb: np.ndarray,
                         prepared: list[_Prepared]) -> list[Decision | DataError]:
        """Score, calibrate and decide the embeddings of ``prepared`` (their frames' rows, in order). A row the model
        got wrong (NaN, not normalised) fails its own image, never its neighbours: a :class:`DataError` in its place
        (``on_error="raise"``), else a fail-closed Decision."""
        problems = embedding_row_problems(emb)
        unusable = problems != None  # noqa: E711 - elementwise on an object array
        if unusable.any():
            emb = emb.copy()
            emb[unusable] = 0.0
            emb[unusable, 0] = 1.0  # a placeholder unit vector; its rows are reported as errors below
        scores = comp.scorer.score(emb, keep_sims=True)
        probs, calibrated = comp.probabilities(scores)
        unusable |= nonfinite_rows(probs)
        out: list[Decision | DataError] = []
        row = 0
        for p in prepared:
            rows = list(range(row, row + len(p.pixels)))
            row += len(p.pixels)
            if unusable[rows].any():
                why = next((str(problems[r]) for r in rows if problems[r] is not None),
                           "its probabilities are not finite")
                err = DataError(f"{p.source or 'input'}: the embedding {why}; it was not scored")
                out.append(err if self.on_error == "raise" else
                           error_decision(self.on_error, str(err), policy=comp.policy, encoder_id=self.encoder_id,
                                          source=p.source))
                continue
            out.append(self._decision(comp, scores, probs, calibrated, rows, p))
        return out

    def _decision(
        self,
        comp: CompiledPolicy,
        scores: Scores,
        probs: np.ndarray,
        calibrated: np.ndarray,
        rows: list[int],
        prep: _Prepared | None = None,
    ) -> Decision:
        # Animated inputs and transparent ones (one row per background): the worst row wins (highest action, then
        # highest probability).
        codes = decide_codes(probs[rows], comp.policy)
        worst = max(range(len(rows)), key=lambda k: (int(codes[k].max()), float(probs[rows[k]].max())))
        r = rows[worst]
        k = comp.policy.top_prompts
        top = {name: comp.scorer.top_prompts(scores.sims[r], j, k)
               for j, name in enumerate(comp.policy.category_names)} if (scores.sims is not None and k) else None
        return build_decision(
            comp.policy, probs[r], calibrated,
            scores.row_signals(r),
            encoder_id=self.encoder_id, top_prompts=top, basis=comp.basis,
            sha256=prep.sha256 if prep else None, source=prep.source if prep else None,
            frame_index=prep.frame_indices[worst] if prep else None,
            n_frames=len(set(prep.frame_indices)) if prep else len(rows),
            background=prep.backgrounds[worst] if prep and prep.backgrounds else None,
        )

    def __repr__(self) -> str:
        return f"Moderator(policy={self.policy.id!r}, encoder={self.encoder_id!r}, on_error={self.on_error!r})"


# ---------------------------------------------------------------------------------------- process default
_default: Moderator | None = None
_default_lock = threading.Lock()
_live_moderators: weakref.WeakSet[Moderator] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """Fresh locks in a forked child: a lock held by another thread of the parent at fork time stays held."""
    global _default_lock
    _default_lock = threading.Lock()
    for m in list(_live_moderators):
        m._compile_lock = threading.Lock()
        # The batcher's worker and the decode pool's threads are not in the child; its locks may be held.
        m.batcher = MicroBatcher(m._embed_and_decide, **m._batching)
        m._pool, m._pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def default_moderator() -> Moderator:
    """The process-wide Moderator, built once on first use from ``SAFECLIP_*`` environment variables."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = Moderator()
    return _default


def set_default_moderator(moderator: Moderator | None) -> None:
    """Install the Moderator that :func:`check` uses (``None`` resets to lazy construction)."""
    global _default
    with _default_lock:
        _default = moderator


def check(image: Any, policy: str | os.PathLike[str] | Policy | None = None) -> Decision:
    """Moderate one image with the process-wide default Moderator (loaded once, thread-safe).

    >>> import safeclip                       # doctest: +SKIP
    >>> safeclip.check("upload.jpg").action   # doctest: +SKIP
    'allow'
    """
    return default_moderator().check(image, policy=policy)


