"""The decision object: a policy compiled for one embedding space, turning embeddings into decisions.

:class:`CompiledPolicy` holds what a policy needs to decide in one space (its scorer: prompt embeddings, probes and
heads; its calibrators; its thresholds) and :meth:`CompiledPolicy.decide` is the one place where score, calibrate and
decide are chained for N inputs seen in one or more views each (:class:`Views`). It applies every decide rule once
(unusable inputs, the worst view; :mod:`safeclip.decide`) and returns :class:`Verdicts`, the decisions in array form
(what audits and rescore write) that build full :class:`~safeclip.decide.Decision` objects on demand (what requests
return). The :class:`~safeclip.moderator.Moderator`, the audit batch unit, ``rescore`` and calibration's evaluation
all call it; none applies a decide rule of its own.

Why the compiled policy rather than a separate ``Decider``: deciding needs exactly what compiling produces (the
scorer, the calibrators and the policy's thresholds) for as long as the policy and the space live, so a second
object would only forward to this one. What comes next adds to it in place: bank matches are another signal of the
score stage (a column of :class:`~safeclip.score.Scores`), video frames are views with timestamps aggregated by the
same rule, and a policy's version travels in ``policy.id``.

Re-scoring needs only the prompt embeddings (from an encoder or a prompt cache), never the image model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import dataclasses
import functools
import os

import numpy as np

from .arrays import embedding_row_problems
from .banks import NO_HASH, BankMatch, read_meta
from .calibrate import Calibrator, calibrate, load_calibrators, missing_inputs, probability_basis
from .decide import (
    ACTIONS,
    Decision,
    Segment,
    apply_banks,
    build_decision,
    decide_codes,
    frame_segments,
    min_frames_codes,
    unusable_inputs,
    worst_views,
)
from .errors import DataError, SafeclipError
from .heads import LinearProbe, load_head
from .policy import Policy, PolicyError, load_policy
from .score import Scorer, Scores

__all__ = ["CompiledPolicy", "Verdicts", "Views", "lint_policy"]

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class Views:
    """The embeddings of N inputs, each seen in one or more views: input ``i``'s views are rows
    ``embeddings[offsets[i]:offsets[i + 1]]`` (frames of an animation, backgrounds of a transparent image).

    ``problems`` names, per input, why it cannot decide before any scoring (``(kind, why)``, e.g. no embedding);
    such an input holds one placeholder row. Build with :meth:`single` (one view per row) or :meth:`of` (a list of
    per-input ``(F_i, D)`` arrays, ``None`` for an input without one).

    ``times`` ``(R,)`` float64: each view's time in seconds from the start of a video or animation, NaN for a still
    (:meth:`with_times`). An input whose every view has a time is *timed*: its frames are aggregated per category
    (``k of n``) and its runs of frames at or above ``flag`` become segments.

    >>> v = Views.single(np.eye(2, dtype=np.float32))
    >>> len(v), v.offsets.tolist()
    (2, [0, 1, 2])
    """

    embeddings: np.ndarray
    offsets: np.ndarray
    problems: tuple[tuple[str, str] | None, ...] = ()
    pdq: np.ndarray | None = None  # (R, 32) uint8: each view's PDQ hash, where computed
    pdq_quality: np.ndarray | None = None  # (R,) its quality; NO_HASH (-1) where none was computed
    times: np.ndarray | None = None  # (R,) float64 seconds of each view in its video; NaN for a still

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def with_pdq(self, per_input: Sequence[tuple[np.ndarray, np.ndarray] | None]) -> Views:
        """These views with each input's PDQ hashes: ``(hashes (F_i, 32) uint8, qualities (F_i,))`` per input, one
        per view, or ``None`` where none was computed (such an input cannot be matched against a PDQ bank)."""
        n_rows = len(self.embeddings)
        codes = np.zeros((n_rows, 32), np.uint8)
        quality = np.full(n_rows, NO_HASH, np.int64)
        for i, item in enumerate(per_input):
            if item is None:
                continue
            a, b = int(self.offsets[i]), int(self.offsets[i + 1])
            h, q = np.asarray(item[0], np.uint8).reshape(-1, 32), np.asarray(item[1], np.int64).reshape(-1)
            if len(h) == b - a and len(q) == b - a:
                codes[a:b], quality[a:b] = h, q
        return dataclasses.replace(self, pdq=codes, pdq_quality=quality)

    def with_times(self, per_input: Sequence[Sequence[float]]) -> Views:
        """These views with each input's view times (seconds; one per view, as
        :attr:`~safeclip.embed.Prepared.timestamps`), ``()`` for a still. A list of another length than the input's
        views is not a timing: that input stays untimed (its worst view decides, it gets no segments)."""
        times = np.full(len(self.embeddings), np.nan, np.float64)
        for i, ts in enumerate(per_input):
            a, b = int(self.offsets[i]), int(self.offsets[i + 1])
            if len(ts) == b - a and b > a:
                times[a:b] = np.asarray(ts, np.float64)
        return dataclasses.replace(self, times=times if np.isfinite(times).any() else None)

    @classmethod
    def single(cls, embeddings: np.ndarray) -> Views:
        """One view per input: row ``i`` of ``(N, D)`` ``embeddings`` is input ``i``."""
        emb = np.asarray(embeddings)
        if emb.ndim != 2:
            raise DataError(f"embeddings must be a 2-D (N, D) array, got shape {emb.shape}")
        return cls(emb, np.arange(emb.shape[0] + 1, dtype=np.int64))

    @classmethod
    def of(cls, per_input: Sequence[np.ndarray | None], dim: int) -> Views:
        """Views from one ``(F_i, D)`` array per input; an input whose array is missing, empty, of another shape,
        dimension or dtype gets a problem (``InvalidEmbedding`` / ``NoEmbedding``) and one placeholder row."""
        rows: list[np.ndarray] = []
        problems: list[tuple[str, str] | None] = []
        for e in per_input:
            why = _shape_problem(e, dim)
            if why is None:
                rows.append(np.asarray(e, np.float32))
                problems.append(None)
            else:
                rows.append(_placeholder(1, dim))
                problems.append(why)
        offsets = np.zeros(len(rows) + 1, np.int64)
        np.cumsum([len(r) for r in rows], out=offsets[1:])
        emb = np.concatenate(rows) if rows else np.empty((0, dim), np.float32)
        return cls(emb, offsets, tuple(problems) if any(p is not None for p in problems) else ())


def _shape_problem(e: np.ndarray | None, dim: int) -> tuple[str, str] | None:
    if e is None:
        return ("NoEmbedding", "no embedding")
    a = np.asarray(e)
    if a.ndim != 2 or a.shape[0] == 0:
        return ("InvalidEmbedding", f"embedding of shape {a.shape}, not (frames >= 1, D)")
    if a.shape[1] != dim:
        return ("InvalidEmbedding", f"embedding of dimension {a.shape[1]}, this encoder's is {dim}")
    if not np.issubdtype(a.dtype, np.floating):
        return ("InvalidEmbedding", f"embedding of dtype {a.dtype}, not floating point")
    return None


def _placeholder(n: int, dim: int) -> np.ndarray:
    out = np.zeros((n, dim), np.float32)
    out[:, 0] = 1.0  # a unit vector, scored and then never used
    return out


@dataclass(frozen=True)
class Verdicts:
    """The decisions of N inputs in array form, from :meth:`CompiledPolicy.decide`.

    ``actions`` ``(N,)`` int8 codes into :data:`~safeclip.decide.ACTIONS`, ``probabilities`` ``(N, C)`` float32 and
    ``view`` ``(N,)`` (which of the input's views decided, counted from 0) are those of each input's deciding view;
    ``problems`` is ``None`` for an input that decided, else ``(kind, why)``: such an input has action code 2 (never
    allow) and NaN probabilities, and callers report it as an error. :meth:`decision` builds input ``i``'s
    :class:`~safeclip.decide.Decision`.
    """

    compiled: CompiledPolicy
    actions: np.ndarray
    probabilities: np.ndarray
    calibrated: np.ndarray
    view: np.ndarray
    problems: tuple[tuple[str, str] | None, ...]
    scores: Scores
    rows: np.ndarray  # (N,) the absolute row of each input's deciding view in ``scores``
    codes: np.ndarray | None = None  # (N, C) per-category action codes of the deciding views, banks applied
    times: np.ndarray | None = None  # (R,) each view's time (``Views.times``), None when no input is timed
    segments: tuple[tuple[Segment, ...], ...] = ()  # per input: its segments (timed inputs; else empty)
    frames: np.ndarray | None = None  # (N,) sampled frames scored per timed input (distinct times), else 0

    def matches(self, i: int) -> tuple[BankMatch, ...]:
        """The bank entries input ``i``'s deciding view matched (with the frame's time for a timed input)."""
        banks = self.scores.banks
        if banks is None:
            return ()
        row = int(self.rows[i])
        t = self.time(i)
        found = banks.matches[row]
        return found if t is None else tuple(dataclasses.replace(m, time_s=t) for m in found)

    def time(self, i: int) -> float | None:
        """The time (seconds) of input ``i``'s deciding view, ``None`` for an untimed input."""
        if self.times is None:
            return None
        t = float(self.times[int(self.rows[i])])
        return t if np.isfinite(t) else None

    def segments_of(self, i: int) -> tuple[Segment, ...]:
        """Input ``i``'s :class:`~safeclip.decide.Segment` s (empty for a still or an input that did not decide)."""
        return self.segments[i] if self.segments else ()

    def __len__(self) -> int:
        return len(self.actions)

    @property
    def ok(self) -> np.ndarray:
        """``(N,)`` bool: the inputs that decided."""
        return np.array([p is None for p in self.problems], bool)

    def action(self, i: int) -> str:
        return ACTIONS[int(self.actions[i])]

    def decision(
        self,
        i: int,
        *,
        sha256: str | None = None,
        source: str | None = None,
        frame_indices: Sequence[int] = (),
        backgrounds: Sequence[RGB | None] = (),
        encoder_id: str | None = None,
        sampling: str | None = None,
        duration_s: float | None = None,
        stopped_early: bool = False,
    ) -> Decision:
        """Input ``i``'s :class:`~safeclip.decide.Decision` (``frame_indices``/``backgrounds``: one per view, as
        decoded; ``sampling``, ``duration_s`` and ``stopped_early`` describe a video). An input that did not decide
        raises :class:`~safeclip.errors.DataError` naming why."""
        problem = self.problems[i]
        if problem is not None:
            raise DataError(f"{source or 'input'}: {problem[1]}; it was not scored")
        comp = self.compiled
        r = int(self.rows[i])
        v = int(self.view[i])
        k = comp.policy.top_prompts
        top = ({name: comp.scorer.top_prompts(self.scores.sims[r], j, k)
                for j, name in enumerate(comp.policy.category_names)}
               if (self.scores.sims is not None and k) else None)
        n_views = len(frame_indices) if frame_indices else None
        n_frames = len(set(frame_indices)) if n_views else 1
        timed = self.frames is not None and int(self.frames[i]) > 0
        return build_decision(
            comp.policy, self.probabilities[i], self.calibrated, self.scores.row_signals(r),
            encoder_id=encoder_id or comp.scorer.encoder_id, top_prompts=top, basis=comp.basis,
            sha256=sha256, source=source,
            frame_index=frame_indices[v] if frame_indices else None,
            n_frames=n_frames,
            background=backgrounds[v] if backgrounds else None,
            codes=None if self.codes is None else self.codes[i], matches=self.matches(i),
            segments=self.segments_of(i), frames_scored=int(self.frames[i]) if timed and self.frames is not None
            else n_frames, sampling=sampling, duration_s=duration_s, time_s=self.time(i),
            stopped_early=stopped_early,
        )


@dataclass(frozen=True)
class CompiledPolicy:
    """A policy bound to one embedding space: its scorer (prompts, probes) and calibrators."""

    policy: Policy
    scorer: Scorer
    calibrators: dict[str, Any]

    @classmethod
    def build(cls, policy: Policy, embed_texts: Any, encoder_id: str) -> CompiledPolicy:
        """Compile ``policy`` with prompt embeddings from ``embed_texts`` (an Encoder's, or a PromptCache's ``get``)."""
        return cls(policy, Scorer(policy, embed_texts, encoder_id=encoder_id), load_calibrators(policy, encoder_id))

    def probabilities(self, scores: Scores) -> tuple[np.ndarray, np.ndarray]:
        """``(N, C)`` probabilities and the ``(C,)`` mask of calibrated categories."""
        return calibrate(scores, self.calibrators)

    @functools.cached_property
    def basis(self) -> tuple[str, ...]:
        """Per category: ``"calibrator"``, ``"head"`` or ``"prompt"``, what its probability is."""
        return probability_basis(self.policy, self.calibrators)

    def decide(self, views: Views | np.ndarray, *, evidence: bool = False, record: bool = True) -> Verdicts:
        """Score, calibrate and decide N inputs: the one place every decide rule is applied.

        ``views``: a :class:`Views`, or an ``(N, D)`` array (one view per input). An input with any unusable view
        (not a finite L2-normalised embedding of this space's dimension) or a non-finite probability decides
        nothing (:func:`~safeclip.decide.unusable_inputs`); the others are decided by their worst view
        (:func:`~safeclip.decide.worst_views`). A timed input (``views.times``: the frames of a video) is decided
        by its worst frame after each category's ``k of n`` rule (:func:`~safeclip.decide.min_frames_codes`, before
        bank matches, which act on any one frame), and its runs of frames at or above ``flag`` become segments
        (:func:`~safeclip.decide.frame_segments`). ``evidence`` keeps the prompt similarities that
        :meth:`Verdicts.decision` reports as top prompts. ``record``: count bank matches towards flood quarantine
        (what live decisions do; ``explain`` and ``rescore``, which look again at inputs already seen, pass False).

        >>> verdicts = compiled.decide(embeddings)                 # doctest: +SKIP
        >>> verdicts.action(0), verdicts.decision(0).reasons       # doctest: +SKIP
        """
        if not isinstance(views, Views):
            views = Views.single(views)
        emb, offsets = views.embeddings, np.asarray(views.offsets, np.int64)
        if emb.ndim != 2 or (len(emb) and emb.shape[1] != self.scorer.dim):
            raise DataError(f"embeddings must be (N, {self.scorer.dim}), got shape {emb.shape}")
        if not np.issubdtype(emb.dtype, np.floating):
            raise DataError(f"embeddings must be floating point (float32), got dtype {emb.dtype}")
        row_problems = embedding_row_problems(emb)  # once: the costly pass over every row
        problems = unusable_inputs(offsets, row_problems)
        for i, p in enumerate(views.problems):
            if p is not None:
                problems[i] = p
        if any(p is not None for p in problems):
            emb = emb.copy()
            for i, p in enumerate(problems):
                if p is not None:
                    a, b = int(offsets[i]), int(offsets[i + 1])
                    emb[a:b] = _placeholder(b - a, emb.shape[1])
        with np.errstate(all="ignore"):
            scores = self.scorer.score(emb, keep_sims=evidence, pdq=views.pdq, pdq_quality=views.pdq_quality,
                                       record=record)
            probs, calibrated = self.probabilities(scores)
        probs = np.asarray(probs, np.float32)
        for i, p in enumerate(unusable_inputs(offsets, row_problems, probs)):
            if problems[i] is None and p is not None:
                problems[i] = p
        bank_codes = None
        if scores.banks is not None:
            bank_codes = scores.banks.codes
            for row, why in enumerate(scores.banks.missing):
                i = int(np.searchsorted(offsets, row, side="right") - 1)
                if why is not None and problems[i] is None:
                    problems[i] = ("NoHash", why)
        times = None if views.times is None else np.asarray(views.times, np.float64)
        if times is not None and times.shape != (len(emb),):
            raise DataError(f"times must hold one time per view ({len(emb)}), got shape {times.shape}")
        codes = decide_codes(probs, self.policy)
        if times is not None:
            codes = min_frames_codes(codes, offsets, times, [c.min_frames for c in self.policy.categories])
        codes = apply_banks(codes, bank_codes)
        rows = worst_views(codes, probs, offsets)
        actions = codes[rows].max(axis=1) if codes.shape[1] else np.zeros(len(rows), np.int8)
        chosen = probs[rows]
        bad = np.array([p is not None for p in problems], bool)
        if bad.any():
            actions = actions.copy()
            actions[bad] = 2  # never allow what was not fully scored
            chosen = chosen.copy()
            chosen[bad] = np.nan
        segments: tuple[tuple[Segment, ...], ...] = ()
        frames = None
        if times is not None:
            found = frame_segments(probs, codes, offsets, times, self.policy)
            segments = tuple(() if bad[i] else s for i, s in enumerate(found))
            frames = np.array([len(np.unique(times[offsets[i]:offsets[i + 1]]))
                               if np.isfinite(times[offsets[i]:offsets[i + 1]]).all() else 0
                               for i in range(len(offsets) - 1)], np.int64)
        return Verdicts(self, actions.astype(np.int8), chosen, calibrated, rows - offsets[:-1], tuple(problems),
                        scores, rows, codes[rows], times, segments, frames)


def lint_policy(
    source: str | os.PathLike[str] | Policy, *, allow_outside: bool = False, encoder_id: str | None = None
) -> Policy:
    """Load a policy and every artifact it names, checked as a Moderator would check them, without the model.

    Every problem (invalid fields, wrong sha256 pins, malformed or non-finite artifacts, artifacts of different
    embedding spaces or dimensions, a calibrator that needs a missing probe or head, a ``url`` artifact that cannot
    be fetched, an artifact that cannot run in the policy's own ``encoder:``; a bank folder that is missing, of
    another kind than its threshold or of another embedding space) is collected into one
    :class:`~safeclip.errors.PolicyError`. ``encoder_id`` also checks that every artifact and embedding bank belongs
    to that space.

    The space of the policy's ``encoder:`` is known without weights for a pretrained tag (from open_clip's
    configs); a local checkpoint is hashed when it exists here and skipped otherwise.

    >>> lint_policy("default").id
    'default@1.0'
    """
    policy = load_policy(source, allow_outside=allow_outside)
    problems: list[str] = []
    own: str | None = None
    if policy.encoder.get("model"):
        # Offline only: a tag's space is read from open_clip's configs (no weights are loaded or downloaded).
        from .embed import encoder_id_matches, known_encoder_id

        try:
            own = known_encoder_id(policy.encoder["model"], policy.encoder.get("pretrained"))
        except SafeclipError as e:
            problems.append(f"{policy.source}: encoder: {e}")
    spaces: dict[str, str] = {}
    dims: dict[int, str] = {}
    for cat in policy.categories:
        for key, ref in (("probe", cat.probe), ("head", cat.head), ("calibrator", cat.calibrator)):
            if ref is None:
                continue
            where = f"{policy.source}: categories.{cat.name}.{key}"
            art: Any
            try:
                path = ref.local_path()
                if key == "probe":
                    art = LinearProbe.load(path, ref.sha256, encoder_id=encoder_id)
                elif key == "head":
                    art = load_head(path, ref.sha256, encoder_id)
                else:
                    art = Calibrator.load(path, ref.sha256, encoder_id=encoder_id)
            except SafeclipError as e:
                problems.append(f"{where}: {e}")
                continue
            if art.encoder_id is not None:
                spaces.setdefault(art.encoder_id, where)
                if own is not None and not encoder_id_matches(art.encoder_id, own):
                    enc = " / ".join(policy.encoder.get(k, "?") for k in ("model", "pretrained"))
                    problems.append(f"{where}: was fitted in embedding space {art.encoder_id!r}, but the policy's "
                                    f"encoder: ({enc}) embeds into {own!r}: it cannot run there; set encoder: to "
                                    "the model and pretrained weights it was fitted with, or refit it")
            if key != "calibrator":
                dims.setdefault(art.dim, where)
            else:
                problems += [f"{where}: {p}" for p in missing_inputs(art, cat)]
        for i, bank in enumerate(cat.banks):
            if bank.kind != "embedding":
                continue
            where = f"{policy.source}: categories.{cat.name}.banks[{i}].path"
            try:
                bank_space = read_meta(bank.path)["encoder_id"]
            except SafeclipError as e:
                problems.append(f"{where}: {e}")
                continue
            spaces.setdefault(bank_space, where)
            for space, whose in ((own, "the policy's encoder:"), (encoder_id, "the encoder given")):
                if space is not None and bank_space != space and not (
                        space is own and encoder_id_matches(bank_space, space)):
                    problems.append(f"{where}: {bank.path} holds embeddings of {bank_space!r}, but {whose} embeds "
                                    f"into {space!r}: rebuild the bank with that encoder or run the one it was "
                                    "built with")
    if len(spaces) > 1:
        problems.append(f"{policy.source}: artifacts come from {len(spaces)} embedding spaces: "
                        + "; ".join(f"{sid!r} ({where})" for sid, where in spaces.items()))
    if len(dims) > 1:
        problems.append(f"{policy.source}: probes and heads of different dimensions: "
                        + "; ".join(f"{d} ({where})" for d, where in dims.items()))
    if problems:
        raise PolicyError(problems)
    return policy
