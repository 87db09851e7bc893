"""Moderator: chains decode -> embed -> score -> calibrate -> decide for requests.

``safeclip.check(image)`` uses one process-wide :class:`Moderator`, built lazily, once, under a lock. A Moderator is
thread-safe: ``check`` decodes in the calling thread and ``check_async`` in a decode pool, then a micro-batcher
merges the requests in flight into one model forward (see ``safeclip._batcher``); ``check_many`` decodes in threads
and runs full batches itself. Compiled policies are cached per policy.

A video (or animation) given to ``check`` is decoded in chunks of sampled frames (``prepare_chunks``), each chunk
embedded in one forward and the frames so far decided by the decision object after each; with ``early_stop`` it stops
decoding at the first chunk after which the clip is ``block`` (the Decision says ``stopped_early`` and how many
frames were scored). Otherwise every sampled frame is scored and the Decision is the one the decision object gives
all of them at once. A clip whose frames cannot all be decoded is never allowed on the frames that did decode: it is
an error (``on_error``), or ``flag`` when the policy says ``video: {incomplete: flag}``; never less than what its
decoded frames decide.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np

from ._batcher import MicroBatcher, Ticket
from ._keywords import apply_keywords
from .banks import MIN_PDQ_QUALITY, NO_HASH, BankMatch
from .compiled import CompiledPolicy, Verdicts, Views
from .decide import ACTIONS, Decision, error_decision
from .decode import DecodeLimits
from .embed import DecodeOptions, Encoder, EncoderSpec, Prepared, prepare_chunks
from .errors import ConfigError, DataError, DecodeError, ModelLoadError
from .policy import Category, Policy, UnknownCategoryError, load_policy
from .review import ReviewQueue, ReviewStore, open_store
from .score import Scores

if TYPE_CHECKING:  # pragma: no cover
    from typing_extensions import Unpack

__all__ = ["BatchingOptions", "Explanation", "Moderator", "ModeratorKeywords", "check", "default_moderator",
           "set_default_moderator"]

_ON_ERROR = ("raise", "flag", "block")

_log = logging.getLogger("safeclip")


@dataclass(frozen=True)
class BatchingOptions:
    """How concurrent requests share forwards: requests arriving within ``max_wait_ms`` of each other are embedded
    together, up to ``max_batch`` views (``None``: the encoder's batch size); at most ``max_queue`` requests are in
    flight (``None``: four batches), one more raises :class:`~safeclip.errors.OverloadedError`."""

    max_batch: int | None = None
    max_wait_ms: float = 5.0
    max_queue: int | None = 256


@dataclass(frozen=True)
class Explanation:
    """Why an image got its Decision from the policy's banks (:meth:`Moderator.explain`).

    ``decision`` is the image's :class:`~safeclip.decide.Decision` (what :meth:`Moderator.check` answers);
    ``nearest`` maps each explained category to the ``k`` entries nearest to the deciding view in each bank the
    category uses (:class:`~safeclip.banks.BankMatch`, ``matched`` false beyond the bank's threshold); ``lines`` maps
    it to sentences (``blocked: it looks like entry 'e1' ('label') of bank 'incidents' at distance 2 (match <= 31)
    ...``, ``no bank entry within the threshold; nearest: ...``). ``view``: the view that decided (frame or
    background, counted from 0).
    """

    decision: Decision
    nearest: Mapping[str, tuple[BankMatch, ...]]
    lines: Mapping[str, tuple[str, ...]]
    view: int = 0

    def text(self) -> str:
        """The decision and each category's lines, as ``safeclip explain`` prints them."""
        d = self.decision
        out = [f"{d.source or 'image'}\t{d.action}"]
        out += [f"  reason: {r}" for r in d.reasons]
        for name, lines in self.lines.items():
            out += [f"  {name}: {line}" for line in lines]
        return "\n".join(out)

    def to_dict(self) -> dict[str, Any]:
        return {"decision": self.decision.to_dict(), "view": self.view,
                "categories": {name: {"lines": list(self.lines[name]),
                                      "nearest": [m.to_dict() for m in self.nearest.get(name, ())]}
                               for name in self.lines}}


_VERB = {"block": "blocked", "flag": "flagged", "allow": "allowed"}


def _explain_lines(category: Category, matched: Sequence[BankMatch], near: Sequence[BankMatch],
                   pdq_quality: int) -> list[str]:
    """The sentences of one category: what each matched entry did, else how near the nearest entries are."""
    if not category.banks:
        return [f"category {category.name!r} names no banks; its decision is its score alone"]
    out: list[str] = []
    for m in matched:
        if m.effect == "deny" and m.quarantined:
            out.append(f"flagged: it looks like {m.describe()}, an entry in flood quarantine (it matched "
                       f"{m.flood_count} distinct inputs in its window): flagged for review instead of its bank's "
                       "action until a person runs `safeclip bank confirm`")
        elif m.effect == "deny":
            out.append(f"{_VERB.get(m.action, m.action)}: it looks like {m.describe()} (deny bank)")
        elif m.action == "allow":
            out.append(f"allowed: it looks like {m.describe()} (allow bank: overrides the category's score)")
        else:
            out.append(f"not allowed: it looks like {m.describe()}, but that entry is in flood quarantine")
    if not matched:
        if near:
            out.append("no bank entry within the threshold; nearest: " + "; ".join(n.describe() for n in near))
        else:
            out.append("no bank entry within the threshold; the banks hold no enabled entry to compare with")
    if any(b.kind == "pdq" for b in category.banks) and pdq_quality < MIN_PDQ_QUALITY:
        why = ("no PDQ hash was computed for it" if pdq_quality == NO_HASH else
               f"its PDQ hash is of quality {pdq_quality} (below {MIN_PDQ_QUALITY}: too flat to match)")
        out.append(f"not matched against PDQ banks: {why}")
    return out


class ModeratorKeywords(TypedDict, total=False):
    """The keyword form of :class:`Moderator`'s option groups (each maps onto one field, see ``_KEYWORDS``)."""

    model: str | None
    pretrained: str | None
    device: str | None
    batch_size: int | None
    precision: str
    runtime: str | None
    threads: int | None
    cache_dir: str | os.PathLike[str] | None
    decode_limits: DecodeLimits
    fast_decode: bool
    decode_threads: int | None
    max_batch: int | None
    max_wait_ms: float
    max_queue: int | None


_KEYWORDS: dict[str, tuple[str, str]] = {
    "model": ("encoder", "model"), "pretrained": ("encoder", "pretrained"), "device": ("encoder", "device"),
    "batch_size": ("encoder", "batch_size"), "precision": ("encoder", "precision"),
    "runtime": ("encoder", "runtime"), "threads": ("encoder", "threads"), "cache_dir": ("encoder", "cache_dir"),
    "decode_limits": ("decoding", "limits"), "fast_decode": ("decoding", "fast"),
    "decode_threads": ("decoding", "workers"),
    "max_batch": ("batching", "max_batch"), "max_wait_ms": ("batching", "max_wait_ms"),
    "max_queue": ("batching", "max_queue"),
}


def _note_encoder_override(policy: Policy, spec: EncoderSpec, chosen_by: str) -> None:
    """Say so when the caller's encoder is not the one the policy names (its thresholds were set for that one)."""
    named = dict(policy.encoder)
    if chosen_by != "caller" or not named.get("model"):
        return
    if named.get("model") != spec.model or named.get("pretrained", spec.pretrained) != spec.pretrained:
        _log.info("policy %s names encoder %s/%s; using %s/%s as asked (decisions record its encoder_id)",
                  policy.id, named.get("model"), named.get("pretrained"), spec.model, spec.pretrained)


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

    The options come in groups (value objects): ``encoder`` (an :class:`~safeclip.embed.EncoderSpec`, or an already
    loaded :class:`~safeclip.embed.Encoder`), ``decoding`` (:class:`~safeclip.embed.DecodeOptions`: limits, fast
    decode, decode threads) and ``batching`` (:class:`BatchingOptions`). Each field also has a keyword of its own
    (``model=``, ``pretrained=``, ``device=``, ``decode_limits=``, ``max_queue=``, ...: :class:`ModeratorKeywords`).

    The encoder is the one the caller names (``model``/``pretrained``, else ``$SAFECLIP_MODEL``/
    ``$SAFECLIP_PRETRAINED``), else the policy's ``encoder:``, else the default; ``encoder_chosen_by`` says which
    (``"caller"``, ``"policy"`` or ``"default"``) and every Decision records the ``encoder_id`` that decided.

    ``on_error`` decides what an input that cannot be fully scored becomes (undecodable, or an embedding that is
    not finite and normalised): ``"raise"`` (a :class:`DecodeError` / :class:`DataError`), or a Decision whose
    action is ``"flag"`` or ``"block"`` with ``error`` set (fail closed, for upload handlers). Never ``allow``.

    ``early_stop`` (default True): :meth:`check` on a video stops decoding at the first chunk of frames after which
    the clip is ``block`` (override per call with ``check(..., early_stop=False)``).

    ``review`` (opt-in): a review store (a SQLite path, a ``postgresql://`` URL, a
    :class:`~safeclip.review.ReviewStore`) or a :class:`~safeclip.review.ReviewQueue`. The decisions of
    :meth:`check`, :meth:`check_async` and :meth:`check_many` that fall in the policy's review sample (``review:
    {sample: ...}``: every flag and block and 1% of allows by default) are written there in the background, with the
    deciding view's embedding and a thumbnail of what the model saw. A store that cannot be written never fails a
    request (see :class:`~safeclip.review.ReviewQueue`).

    Concurrent ``check`` / ``check_async`` calls share forwards (:class:`BatchingOptions`); at most ``max_queue``
    requests are in flight at once, one more raises :class:`~safeclip.errors.OverloadedError`.
    """

    def __init__(
        self,
        policy: str | os.PathLike[str] | Policy | None = None,
        *,
        encoder: Encoder | EncoderSpec | None = None,
        decoding: DecodeOptions | None = None,
        batching: BatchingOptions | None = None,
        on_error: str = "raise",
        allow_outside: bool = False,
        early_stop: bool = True,
        review: ReviewQueue | ReviewStore | str | os.PathLike[str] | None = None,
        **keywords: Unpack[ModeratorKeywords],
    ) -> None:
        if on_error not in _ON_ERROR:
            raise ConfigError(f"on_error must be one of {_ON_ERROR}, not {on_error!r}")
        if not isinstance(early_stop, bool):
            raise ConfigError(f"early_stop must be True or False, not {early_stop!r}")
        self.early_stop = early_stop
        loaded = None if encoder is None or isinstance(encoder, EncoderSpec) else encoder
        groups = apply_keywords("Moderator", keywords, _KEYWORDS, {
            "encoder": encoder if isinstance(encoder, EncoderSpec) else EncoderSpec(),
            "decoding": decoding or DecodeOptions(), "batching": batching or BatchingOptions()})
        self.on_error = on_error
        self.allow_outside = allow_outside
        self.policy = load_policy(policy, allow_outside=allow_outside)
        self.review: ReviewQueue | None = _review_queue(review, self.policy)
        if loaded is None:
            spec, self.encoder_chosen_by = groups["encoder"].resolve(self.policy.encoder)
            _note_encoder_override(self.policy, spec, self.encoder_chosen_by)
            loaded = spec.load()
        else:
            self.encoder_chosen_by = "caller"
        self.encoder = loaded
        self.decoding: DecodeOptions = groups["decoding"]
        if self.decoding.workers is None:
            self.decoding = dataclasses.replace(self.decoding, workers=min(4, os.cpu_count() or 1))
        b: BatchingOptions = groups["batching"]
        max_batch = self.encoder.batch_size if b.max_batch is None else b.max_batch
        self.batching = BatchingOptions(max_batch, b.max_wait_ms, 4 * max_batch if b.max_queue is None else b.max_queue)
        self.batcher = self._new_batcher()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._compiled: dict[tuple[str, str], CompiledPolicy] = {}
        self._compile_lock = threading.Lock()
        _live_moderators.add(self)
        self.compiled(self.policy)

    def _new_batcher(self) -> MicroBatcher:
        b = self.batching
        return MicroBatcher(self._embed_and_decide, max_batch=b.max_batch, max_wait_ms=b.max_wait_ms,
                            max_queue=b.max_queue)

    @property
    def encoder_id(self) -> str:
        return self.encoder.encoder_id

    @property
    def decode_limits(self) -> DecodeLimits:
        return self.decoding.limits

    @property
    def fast_decode(self) -> bool:
        return self.decoding.fast

    @property
    def decode_threads(self) -> int:
        return int(self.decoding.workers or 1)

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
        """``(N, D)`` L2-normalised float32 embeddings, one row per image: the view that decides it (for an
        animation or a transparent image, its worst frame or background under this Moderator's policy)."""
        prepared = [self._prepare(img) for img in images]
        if not prepared:
            return np.empty((0, self.encoder.dim), np.float32)
        emb = self.encoder.embed_pixels(np.concatenate([p.pixels for p in prepared]))
        if all(len(p.pixels) == 1 for p in prepared):
            return emb
        verdicts = self.compiled().decide(self._views(emb, prepared), record=False)
        return emb[verdicts.rows]

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
        """Score, calibrate and decide ``(N, D)`` embeddings under a policy, without the model. A row that is not a
        finite L2-normalised embedding is handled as ``on_error`` says (raised, or a fail-closed Decision).

        Embeddings carry no PDQ hash: under a policy that matches PDQ banks every row fails closed the same way,
        with the one-line error ``row i of the embeddings: no PDQ hash was computed for it, and the policy matches
        PDQ banks (...); it was not scored`` (a :class:`DataError`, or the ``error`` of a fail-closed Decision).
        Moderate the images themselves (:meth:`check`, :meth:`check_many`) to match them against PDQ banks."""
        comp = self.compiled(policy)
        verdicts = comp.decide(np.asarray(embeddings), evidence=True)
        out = [self._decision(comp, verdicts, i) for i in range(len(verdicts))]
        for d in out:
            if isinstance(d, DataError):
                raise d
        return out  # type: ignore[return-value]

    def explain(self, image: Any, category: str | None = None, k: int = 3, *, policy: Any = None) -> Explanation:
        """Why ``image`` gets its Decision from the policy's banks: the Decision (the same as :meth:`check`'s) and,
        for ``category`` (default: every category that names banks), the ``k`` entries of each of its banks nearest
        to the view that decided, matched or not. Explaining is not a new sighting: it does not count towards flood
        quarantine.

        >>> m.explain("upload.jpg").lines["known_csam"]                                # doctest: +SKIP
        ("blocked: it looks like entry 'case-118' ('report 118') of bank 'incidents' at distance 4 (match <= 31) \
(deny bank)",)
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"k must be a positive integer (entries per bank), not {k!r}")
        comp = self.compiled(policy)
        pol = comp.policy
        if category is not None and category not in pol.category_names:
            raise UnknownCategoryError(f"policy {pol.id} has no category {category!r}; it has "
                                       f"{', '.join(pol.category_names)}")
        cats = [c for c in pol.categories if (c.name == category if category is not None else c.banks)]
        prep = self._prepare(image)
        views = self._views(self.encoder.embed_pixels(prep.pixels), [prep])
        verdicts = comp.decide(views, evidence=True, record=False)
        decision = self._decision(comp, verdicts, 0, prep)
        if isinstance(decision, DataError):
            raise decision
        row = int(verdicts.rows[0])
        assert views.pdq is not None and views.pdq_quality is not None  # with_pdq set them
        quality = int(views.pdq_quality[row])
        banks = comp.scorer.banks
        nearest: dict[str, tuple[BankMatch, ...]] = {}
        lines: dict[str, tuple[str, ...]] = {}
        for cat in cats:
            near = tuple(banks.nearest(cat.name, views.embeddings[row], views.pdq[row], quality, k)) if (
                banks and cat.banks) else ()
            nearest[cat.name] = near
            matched = [m for m in decision.matches if m.category == cat.name]
            lines[cat.name] = tuple(_explain_lines(cat, matched, near, quality))
        return Explanation(decision, MappingProxyType(nearest), MappingProxyType(lines), int(verdicts.view[0]))

    # ------------------------------------------------------------------------------------ requests
    def check(self, image: Any, *, policy: Any = None, early_stop: bool | None = None, review: bool = True) -> Decision:
        """Moderate one image or video (path, bytes, file object, PIL image or numpy array).

        Decodes in the calling thread; the forward of a still is shared with the other requests in flight. A video is
        decoded in chunks of sampled frames, one forward each; ``early_stop`` (default: the Moderator's, True) stops
        at the first chunk after which it is ``block``. Its Decision has ``segments`` (runs of frames at or above a
        category's ``flag``, with times), ``frames_scored`` and ``sampling``. ``review=False`` keeps this one
        decision out of the review queue (a warm-up, a synthetic probe: not a decision on real content).

        >>> d = moderator.check("clip.mp4")                                              # doctest: +SKIP
        >>> d.action, [(s.category, s.start_s, s.end_s) for s in d.segments]             # doctest: +SKIP
        ('flag', [('violence', 12.0, 15.0)])
        """
        with self.batcher.admit() as ticket:
            prepared = self._prepare_request(image, policy, ticket, early_stop, review)
            return prepared if isinstance(prepared, Decision) else prepared.result()

    async def check_async(self, image: Any, *, policy: Any = None, ticket: Ticket | None = None,
                          review: bool = True) -> Decision:
        """:meth:`check` for asyncio code: decoding and the forward run in threads, never in the event loop.

        Cancelling the call (a timeout, a client gone) drops the request if it has not reached a forward yet.
        ``ticket`` is a place taken beforehand with :meth:`admit` (a server admits before reading the body).

        >>> decision = await moderator.check_async(upload_bytes, policy="strict")   # doctest: +SKIP
        """
        own = ticket is None
        ticket = self.admit() if ticket is None else ticket
        try:
            prepared = await asyncio.wrap_future(self._decode_pool().submit(self._prepare_request, image, policy,
                                                                            ticket, None, review))
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
        """Moderate many images, in input order: decoding in threads while the model runs full batches. At most a
        few batches of decoded images are held at once, however many inputs there are."""
        images = list(images)
        if len(images) <= 1:
            return self._run(images, policy, pool=None)
        with ThreadPoolExecutor(self.decode_threads, thread_name_prefix="safeclip-decode") as pool:
            return self._run(images, policy, pool=pool)

    def _prepare(self, image: Any) -> Prepared:
        """Every sampled view of ``image``: a still's one chunk, a video's chunks joined (no early stop)."""
        chunks = list(prepare_chunks(image, self.encoder.pixel_spec, self.decoding))
        if len(chunks) == 1:
            return chunks[0]
        if not chunks:
            raise DecodeError("the decoder gave no frames", _source_name(image))
        return _joined(chunks)

    def _decode_pool(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="safeclip-decode")
            return self._pool

    def _prepare_request(self, image: Any, policy: Any, ticket: Ticket, early_stop: bool | None = None,
                         review: bool = True) -> Decision | Future[Decision]:
        """Decode one request and queue it for a forward; an input that cannot be decoded is decided here, and so is
        a video (chunk by chunk, :meth:`_check_clip`)."""
        if ticket.cancelled:  # the caller gave up while this waited for a decode thread: decode nothing
            gone: Future[Decision] = Future()
            gone.cancel()
            return gone
        comp = self.compiled(policy)
        chunks = prepare_chunks(image, self.encoder.pixel_spec, self.decoding)
        first = self._next_chunk(chunks)
        if isinstance(first, DecodeError):
            return self._offer(comp, error_decision(self.on_error, str(first), policy=comp.policy,
                                                    encoder_id=self.encoder_id,
                                                    source=first.source or _source_name(image)), send=review)
        if first is None:
            raise DecodeError("the decoder gave no frames", _source_name(image))
        if first.timestamps:
            return self._check_clip(comp, [first], chunks, image, early_stop, review)
        more = self._next_chunk(chunks)  # a still is one chunk; anything more is decided with it, never dropped
        if more is None:
            return self.batcher.submit(ticket, (comp, first, review), len(first.pixels))
        return self._check_clip(comp, [first, more], chunks, image, early_stop, review)

    def _next_chunk(self, chunks: Iterator[Prepared]) -> Prepared | DecodeError | None:
        """The next chunk of ``chunks``, ``None`` at the end, or the DecodeError (raised when ``on_error="raise"``)."""
        try:
            return next(chunks, None)
        except DecodeError as e:
            if self.on_error == "raise":
                raise
            return e

    def _check_clip(self, comp: CompiledPolicy, head: list[Prepared | DecodeError], rest: Iterator[Prepared],
                    image: Any, early_stop: bool | None, review: bool = True) -> Decision:
        """A video's Decision: each chunk embedded in one forward, the frames so far decided after each; stops at
        the first ``block`` when ``early_stop`` (and as many frames as any category's ``min_frames`` were seen)."""
        stop = self.early_stop if early_stop is None else early_stop
        need = max((c.min_frames for c in comp.policy.categories), default=1)
        clip = _Clip(keep_pixels=self.review is not None and review)
        failed: DecodeError | None = None
        stopped = False
        pending: Iterator[Prepared | DecodeError | None] = iter(head)
        while True:
            chunk = next(pending, _END)
            if chunk is _END:
                try:
                    chunk = next(rest, None)
                except DecodeError as e:  # on_error="raise" too: first, what the decoded frames say
                    chunk = e
            if chunk is None:
                break
            if isinstance(chunk, DecodeError):
                failed = chunk
                break
            assert isinstance(chunk, Prepared)
            clip.add(chunk, self.encoder.embed_pixels(chunk.pixels))
            if stop and clip.frames() >= need:
                seen = comp.decide(clip.views(), record=False)
                if seen.problems[0] is not None or seen.action(0) == "block":
                    stopped = True
                    break
        if not clip.chunks:
            assert failed is not None
            return self._offer(comp, error_decision(self.on_error, str(failed), policy=comp.policy,
                                                    encoder_id=self.encoder_id,
                                                    source=failed.source or _source_name(image)), send=review)
        views = clip.views()
        verdicts = comp.decide(views, evidence=True)
        prepared = clip.prepared()
        decided = self._decision(comp, verdicts, 0, prepared, stopped_early=stopped and failed is None)
        if isinstance(decided, DataError):
            raise decided
        if failed is not None:
            decided = self._incomplete(comp, decided, failed, clip)
        row = int(verdicts.rows[0])
        return self._offer(comp, decided, views.embeddings[row],
                           prepared.pixels[row] if len(prepared.pixels) else None, send=review)

    def _incomplete(self, comp: CompiledPolicy, decided: Decision, failed: DecodeError, clip: _Clip) -> Decision:
        """A clip whose later frames could not be decoded: never allowed on the frames that did decode."""
        where = f"decoding stopped after {clip.frames()} frames, at {clip.last_time():.2f} s"
        why = f"{failed} ({where})"
        worst = max(ACTIONS.index(decided.action), 1)
        if comp.policy.video_incomplete == "flag":
            return dataclasses.replace(decided, action=ACTIONS[worst],
                                       reasons=(f"incomplete: {why}: flagged for review",) + decided.reasons)
        if self.on_error == "raise":
            raise type(failed)(f"{failed.reason} ({where})", failed.source) from failed
        action = ACTIONS[max(worst, ACTIONS.index(self.on_error))]
        return error_decision(action, why, policy=comp.policy, encoder_id=self.encoder_id, source=decided.source)

    def _embed_and_decide(self, items: list[tuple[CompiledPolicy, Prepared, bool]]) -> list[Decision | DataError]:
        """The micro-batcher's batch: one forward for every request, then each decided alone, under its policy."""
        emb = self.encoder.embed_pixels(np.concatenate([p.pixels for _, p, _ in items]))
        out, row = [], 0
        for comp, p, review in items:
            out.extend(self._decide_embedded(comp, emb[row:row + len(p.pixels)], [p], review=review))
            row += len(p.pixels)
        return out

    def _try_prepare(self, image: Any) -> Prepared | DecodeError:
        try:
            return self._prepare(image)
        except DecodeError as e:
            if self.on_error == "raise":
                raise
            return e

    def _prepared_stream(self, images: list[Any], pool: ThreadPoolExecutor | None) -> Iterator[Prepared | DecodeError]:
        """The inputs prepared in order, at most a few batches ahead of the model (memory bounded, not O(N))."""
        if pool is None:
            yield from map(self._try_prepare, images)
            return
        ahead = max(2 * self.decode_threads, 2 * self.encoder.batch_size)
        pending: list[Future[Prepared | DecodeError]] = []
        it = iter(images)
        for image in it:
            pending.append(pool.submit(self._try_prepare, image))
            if len(pending) >= ahead:
                break
        try:
            while pending:
                done = pending.pop(0)
                nxt = next(it, _END)
                if nxt is not _END:
                    pending.append(pool.submit(self._try_prepare, nxt))
                yield done.result()
        finally:
            for f in pending:
                f.cancel()

    def _run(self, images: list[Any], policy: Any, pool: ThreadPoolExecutor | None) -> list[Decision]:
        comp = self.compiled(policy)
        batch: list[tuple[int, Prepared]] = []
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

        for i, prep in enumerate(self._prepared_stream(images, pool)):
            if isinstance(prep, DecodeError):
                results[i] = self._offer(comp, error_decision(
                    self.on_error, str(prep), policy=comp.policy, encoder_id=self.encoder_id,
                    source=prep.source or _source_name(images[i])))
                continue
            batch.append((i, prep))
            n_frames += len(prep.pixels)
            if n_frames >= target:
                flush()
        flush()
        return [results[i] for i in range(len(images))]

    @staticmethod
    def _views(emb: np.ndarray, prepared: Sequence[Prepared]) -> Views:
        """The views of decoded inputs, with each view's PDQ hash (what PDQ banks match) and, for a video, time."""
        offsets = np.zeros(len(prepared) + 1, np.int64)
        np.cumsum([len(p.pixels) for p in prepared], out=offsets[1:])
        views = Views(emb, offsets).with_pdq(
            [None if p.pdq is None or p.pdq_quality is None else (p.pdq, p.pdq_quality) for p in prepared])
        if any(p.timestamps for p in prepared):
            views = views.with_times([p.timestamps for p in prepared])
        return views

    def _decide_embedded(self, comp: CompiledPolicy, emb: np.ndarray, prepared: list[Prepared],
                         review: bool = True) -> list[Decision | DataError]:
        """Decide the embeddings of ``prepared`` (their views' rows, in order). An input the decision object could
        not score fails alone, never its neighbours (see :meth:`_decision`). ``review``: offer the Decisions to the
        review queue."""
        verdicts = comp.decide(self._views(emb, prepared), evidence=True)
        out = [self._decision(comp, verdicts, i, p) for i, p in enumerate(prepared)]
        if self.review is not None and review:
            for i, (d, p) in enumerate(zip(out, prepared)):
                if isinstance(d, Decision):
                    view = int(verdicts.view[i])
                    self._offer(comp, d, emb[int(verdicts.rows[i])], p.pixels[view] if len(p.pixels) else None)
        return out

    def _offer(self, comp: CompiledPolicy, decision: Decision, embedding: np.ndarray | None = None,
               pixels: np.ndarray | None = None, *, send: bool = True) -> Decision:
        """Send a request's final Decision to the review queue (when there is one, ``send``, and it falls in the
        sample)."""
        if self.review is not None and send:
            self.review.offer(decision, comp.policy.review, embedding=embedding, pixels=pixels)
        return decision

    def _decision(self, comp: CompiledPolicy, verdicts: Verdicts, i: int,
                  prep: Prepared | None = None, stopped_early: bool = False) -> Decision | DataError:
        """Input ``i``'s Decision; one that could not be scored is a :class:`DataError` (``on_error="raise"``) or a
        fail-closed Decision."""
        try:
            if prep is None:
                # Only an input that did not decide is named (its error says which row); a Decision has no source.
                where = None if verdicts.problems[i] is None else f"row {i} of the embeddings"
                return verdicts.decision(i, source=where, encoder_id=self.encoder_id)
            return verdicts.decision(i, sha256=prep.sha256, source=prep.source, frame_indices=prep.frame_indices,
                                     backgrounds=prep.backgrounds, encoder_id=self.encoder_id,
                                     sampling=prep.sampling, duration_s=prep.duration_s, stopped_early=stopped_early)
        except DataError as err:
            if self.on_error == "raise":
                return err
            return error_decision(self.on_error, str(err), policy=comp.policy, encoder_id=self.encoder_id,
                                  source=prep.source if prep else None)

    def __repr__(self) -> str:
        return f"Moderator(policy={self.policy.id!r}, encoder={self.encoder_id!r}, on_error={self.on_error!r})"


_END: Any = object()


def _review_queue(review: ReviewQueue | ReviewStore | str | os.PathLike[str] | None, policy: Policy,
                  ) -> ReviewQueue | None:
    """A Moderator's review hook: a queue as given, else one over the store given or opened (bound to the
    Moderator's policy name; a store of another policy, corrupt or unreachable is refused here, at start-up)."""
    if review is None or isinstance(review, ReviewQueue):
        return review
    if isinstance(review, ReviewStore):
        return ReviewQueue(review)
    if isinstance(review, (str, os.PathLike)):
        return ReviewQueue(open_store(review, policy=policy.name))
    raise ConfigError(f"review must be a review store (path or postgresql:// URL), a ReviewStore or a ReviewQueue, "
                      f"not {type(review).__name__}")


def _joined(chunks: list[Prepared]) -> Prepared:
    """A video's chunks, in time order, as one :class:`Prepared`."""
    last = chunks[-1]

    def cat(arrays: list[np.ndarray | None]) -> np.ndarray | None:
        return None if any(a is None for a in arrays) else np.concatenate(arrays)  # type: ignore[arg-type]

    return dataclasses.replace(
        last, pixels=np.concatenate([p.pixels for p in chunks]),
        frame_indices=tuple(f for p in chunks for f in p.frame_indices),
        backgrounds=tuple(b for p in chunks for b in p.backgrounds),
        timestamps=tuple(t for p in chunks for t in p.timestamps),
        pdq=cat([p.pdq for p in chunks]), pdq_quality=cat([p.pdq_quality for p in chunks]))


class _Clip:
    """The chunks of one video decoded so far, with their embeddings (pixels dropped once embedded)."""

    def __init__(self, keep_pixels: bool = False) -> None:
        self.chunks: list[Prepared] = []
        self.embeddings: list[np.ndarray] = []
        self.keep_pixels = keep_pixels  # for the review queue's thumbnail of the deciding frame

    def add(self, chunk: Prepared, emb: np.ndarray) -> None:
        self.chunks.append(chunk if self.keep_pixels else dataclasses.replace(chunk, pixels=chunk.pixels[:0]))
        self.embeddings.append(emb)

    def prepared(self) -> Prepared:
        """The chunks as one :class:`Prepared` (no pixels unless kept): what a Decision reports."""
        return _joined(self.chunks)

    def views(self) -> Views:
        prep = self.prepared()
        emb = np.concatenate(self.embeddings)
        views = Views(emb, np.array([0, len(emb)], np.int64))
        if prep.pdq is not None and prep.pdq_quality is not None:
            views = views.with_pdq([(prep.pdq, prep.pdq_quality)])
        return views.with_times([prep.timestamps])

    def frames(self) -> int:
        return len({t for p in self.chunks for t in p.timestamps})

    def last_time(self) -> float:
        return max((t for p in self.chunks for t in p.timestamps), default=0.0)


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
        m.batcher = m._new_batcher()
        m._pool, m._pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def default_moderator() -> Moderator:
    """The process-wide Moderator, built once on first use from ``SAFECLIP_*`` environment variables."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                try:
                    _default = Moderator()
                except ModelLoadError as e:
                    # check() takes no model arguments: say how the default Moderator is chosen instead.
                    hint = (" safeclip.check() uses the process-wide default Moderator: name its weights with "
                            "$SAFECLIP_MODEL / $SAFECLIP_PRETRAINED (e.g. SAFECLIP_PRETRAINED=/path/to/weights), or "
                            "install your own with safeclip.set_default_moderator(safeclip.Moderator(model=..., "
                            "pretrained=...))")
                    raise ModelLoadError(f"{e}.{hint}", cli_message=e.cli_message) from e
    return _default


def set_default_moderator(moderator: Moderator | None) -> None:
    """Install the Moderator that :func:`check` uses (``None`` resets to lazy construction)."""
    global _default
    with _default_lock:
        _default = moderator


def check(image: Any, policy: str | os.PathLike[str] | Policy | None = None, *,
          early_stop: bool | None = None) -> Decision:
    """Moderate one image or video with the process-wide default Moderator (loaded once, thread-safe). A video
    stops decoding at its first ``block`` unless ``early_stop=False``.

    >>> import safeclip                       # doctest: +SKIP
    >>> safeclip.check("upload.jpg").action   # doctest: +SKIP
    'allow'
    >>> safeclip.check("clip.mp4").segments   # doctest: +SKIP
    (Segment(category='violence', start_s=12.0, end_s=15.0, peak_probability=0.93, peak_s=13.0, action='block', ...),)
    """
    return default_moderator().check(image, policy=policy, early_stop=early_stop)


