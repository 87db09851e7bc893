"""Decide stage: calibrated probabilities + policy thresholds -> allow / flag / block, with reasons.

The rules, each in one function: a category acts on its own thresholds (:func:`decide_codes`: ``block`` if
p >= block, else ``flag`` if p >= flag) and the worst category action is the view's action; an input seen in several
views (the frames of an animation, a transparent image on light and dark backgrounds) is decided by its worst view
(:func:`worst_views`); an input with any unusable view decides nothing (:func:`unusable_inputs`). A timed input (the
sampled frames of a video or animation, each with its time) is decided by its worst frame unless a category asks for
``k`` of its frames (:func:`min_frames_codes`), and its frames at or above a category's ``flag`` are reported as
segments (:func:`frame_segments`). They are applied together by one caller,
:meth:`safeclip.compiled.CompiledPolicy.decide`; :func:`build_decision` turns one input's result into a
:class:`Decision`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import DataError
from .policy import Policy

if TYPE_CHECKING:  # pragma: no cover
    from .banks import BankMatch

__all__ = ["ACTIONS", "CategoryResult", "Decision", "Segment", "apply_banks", "build_decision", "decide_codes",
           "error_decision", "frame_segments", "min_frames_codes", "nonfinite_rows", "unusable_inputs", "worst_views"]

ACTIONS: tuple[str, str, str] = ("allow", "flag", "block")
_ACTION_CODE = {a: i for i, a in enumerate(ACTIONS)}


def _thresholds(policy: Policy) -> tuple[np.ndarray, np.ndarray]:
    # A missing threshold never fires: +inf is above every probability.
    flag = np.array([np.inf if c.flag is None else c.flag for c in policy.categories], np.float32)
    block = np.array([np.inf if c.block is None else c.block for c in policy.categories], np.float32)
    return flag, block


def decide_codes(probabilities: np.ndarray, policy: Policy) -> np.ndarray:
    """Per-category action codes ``(N, C)`` int8 (0 allow, 1 flag, 2 block); ``codes.max(axis=1)`` is the action.

    A non-finite probability never allows: it gets code 2. Callers report such rows as errors (see
    :func:`nonfinite_rows`); the code is the backstop that keeps a missed check from failing open.

    >>> import numpy as np
    >>> from safeclip.policy import load_policy
    >>> p = load_policy("default")
    >>> probs = np.zeros((1, len(p.categories)), np.float32); probs[0, 0] = 0.99
    >>> ACTIONS[decide_codes(probs, p).max(axis=1)[0]]
    'block'
    """
    flag, block = _thresholds(policy)
    p = np.asarray(probabilities, np.float32)
    codes = (p >= flag).astype(np.int8) + (p >= block).astype(np.int8)
    codes[~np.isfinite(p)] = 2  # fail closed: NaN compares false with every threshold, which would mean allow
    return codes


def apply_banks(codes: np.ndarray, bank_codes: np.ndarray | None) -> np.ndarray:
    """Per-category codes ``(R, C)`` after what bank matches force (``bank_codes``, -1 where nothing matched; see
    :class:`~safeclip.banks.BankSignal`): ``0`` (an allow bank's exemplar) overrides the category's own code, ``1``
    or ``2`` (a deny bank's action) raises it."""
    if bank_codes is None:
        return codes
    out = codes.copy()
    allow = bank_codes == 0
    out[allow] = 0
    return np.maximum(out, bank_codes).astype(np.int8)


def nonfinite_rows(probabilities: np.ndarray) -> np.ndarray:
    """``(N,)`` bool: the rows of an ``(N, C)`` probability matrix that hold NaN or infinity (never decided)."""
    return ~np.isfinite(np.asarray(probabilities, np.float32)).all(axis=1)


def worst_views(codes: np.ndarray, probabilities: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The view that decides each input: ``(n,)`` absolute rows, for inputs whose views are rows
    ``offsets[i]:offsets[i + 1]`` of the ``(R, C)`` per-category ``codes`` and ``probabilities``.

    The worst view wins: the highest action, then the highest probability of any category, then the first such view.
    """
    offsets = np.asarray(offsets, np.int64)
    counts = np.diff(offsets)
    pick = offsets[:-1].copy()
    multi = np.flatnonzero(counts > 1)
    if len(multi):
        # (action, max probability) in lexicographic order as one float: probabilities lie in [0, 1] and actions
        # step by 2. A non-finite row never gets here (its input is unusable).
        action = codes.max(axis=1) if codes.shape[1] else np.zeros(len(codes), np.int8)
        top = probabilities.max(axis=1) if probabilities.shape[1] else np.zeros(len(codes), np.float32)
        key = action.astype(np.float64) * 2.0 + top.astype(np.float64)
        for i in multi:
            a, b = int(offsets[i]), int(offsets[i + 1])
            pick[i] = a + int(np.argmax(key[a:b]))  # argmax takes the first maximum
    return pick


def _frames_of(times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct sampled frames of one input's views: ``(frame times ascending, per view its frame)``. Views at
    the same time (one frame on several backgrounds) are one frame."""
    return np.unique(times, return_inverse=True)


def _timed_inputs(offsets: np.ndarray, times: np.ndarray | None) -> list[int]:
    """The inputs whose every view has a finite time (the sampled frames of a video or animation)."""
    if times is None:
        return []
    t = np.asarray(times, np.float64)
    finite = np.isfinite(t)
    if not finite.any():
        return []
    return [i for i in range(len(offsets) - 1)
            if offsets[i + 1] > offsets[i] and bool(finite[offsets[i]:offsets[i + 1]].all())]


def min_frames_codes(codes: np.ndarray, offsets: np.ndarray, times: np.ndarray | None,
                     min_frames: Sequence[int]) -> np.ndarray:
    """Per-category codes ``(R, C)`` after each category's ``k of n`` rule (``min_frames``, ``(C,)``, the policy's
    ``frames: {min_frames: k}``): in a timed input (every view has a time in ``times``, seconds), a category acts
    only at the highest action that at least ``k`` of its sampled frames reach (every frame, when fewer than ``k``
    were sampled); its codes are capped there. ``k = 1`` (the default) leaves the worst frame deciding. An untimed
    input (a still, a transparent image's backgrounds) is left as it is: its worst view decides.

    >>> import numpy as np
    >>> codes = np.array([[2], [0], [1]], np.int8)            # one clip, three frames, one category
    >>> min_frames_codes(codes, np.array([0, 3]), np.array([0.0, 1.0, 2.0]), [2]).ravel().tolist()
    [1, 0, 1]
    """
    k = np.asarray(min_frames, np.int64)
    if times is None or codes.shape[1] == 0 or not (k > 1).any():
        return codes
    offsets = np.asarray(offsets, np.int64)
    out = codes.copy()
    for i in _timed_inputs(offsets, times):
        a, b = int(offsets[i]), int(offsets[i + 1])
        ft, frame = _frames_of(np.asarray(times[a:b], np.float64))
        per_frame = np.zeros((len(ft), codes.shape[1]), np.int8)
        np.maximum.at(per_frame, frame, codes[a:b])
        need = np.minimum(k, len(ft))
        cap = np.where((per_frame >= 2).sum(axis=0) >= need, 2,
                       np.where((per_frame >= 1).sum(axis=0) >= need, 1, 0)).astype(np.int8)
        out[a:b] = np.minimum(out[a:b], cap[None, :])
    return out


@dataclass(frozen=True)
class Segment:
    """A run of consecutive sampled frames of a video or animation at or above one category's ``flag`` (after the
    category's ``k of n`` rule and bank matches): ``start_s`` is its first frame's time, ``end_s`` its last frame's
    (a one-frame segment has ``start_s == end_s``: the time between two samples was not seen), ``peak_probability``
    the category's highest probability in it and ``peak_s`` that frame's time, ``action`` the worst action of its
    frames (``flag`` or ``block``), ``frames`` how many sampled frames it holds."""

    category: str
    start_s: float
    end_s: float
    peak_probability: float
    peak_s: float
    action: str
    frames: int

    def to_dict(self) -> dict[str, Any]:
        return {"category": self.category, "start_s": self.start_s, "end_s": self.end_s,
                "peak_probability": self.peak_probability, "peak_s": self.peak_s, "action": self.action,
                "frames": self.frames}


def frame_segments(probabilities: np.ndarray, codes: np.ndarray, offsets: np.ndarray, times: np.ndarray | None,
                   policy: Policy) -> list[tuple[Segment, ...]]:
    """Per input, its :class:`Segment` s, in time order (then the policy's category order): for each category, the
    runs of consecutive sampled frames whose code (``codes``: per view and category, thresholds, ``k of n`` and
    banks applied) is ``flag`` or ``block``. A frame seen in several views counts with its worst. Untimed inputs
    (``times`` NaN or ``None``: stills) have none.

    >>> import numpy as np
    >>> from safeclip.policy import load_policy
    >>> p = load_policy("default")
    >>> probs = np.zeros((3, len(p.categories)), np.float32); probs[1:, 0] = 0.99
    >>> [s.to_dict()["start_s"] for s in frame_segments(probs, decide_codes(probs, p), np.array([0, 3]),
    ...                                                  np.array([0.0, 1.0, 2.0]), p)[0]]
    [1.0]
    """
    offsets = np.asarray(offsets, np.int64)
    out: list[tuple[Segment, ...]] = [()] * (len(offsets) - 1)
    names = policy.category_names
    for i in _timed_inputs(offsets, times):
        assert times is not None
        a, b = int(offsets[i]), int(offsets[i + 1])
        ft, frame = _frames_of(np.asarray(times[a:b], np.float64))
        c = np.zeros((len(ft), codes.shape[1]), np.int8)
        np.maximum.at(c, frame, codes[a:b])
        p = np.full((len(ft), codes.shape[1]), -np.inf, np.float64)
        np.maximum.at(p, frame, np.asarray(probabilities[a:b], np.float64))
        found: list[tuple[float, int, Segment]] = []
        for j in np.flatnonzero((c >= 1).any(axis=0)):
            on = np.concatenate([[False], c[:, j] >= 1, [False]])
            edges = np.flatnonzero(on[1:] != on[:-1])
            for s, e in zip(edges[::2], edges[1::2]):  # frames s .. e-1
                peak = s + int(np.argmax(p[s:e, j]))
                found.append((float(ft[s]), int(j), Segment(
                    names[j], float(ft[s]), float(ft[e - 1]), round(float(p[peak, j]), 6), float(ft[peak]),
                    ACTIONS[int(c[s:e, j].max())], int(e - s))))
        out[i] = tuple(seg for _, _, seg in sorted(found, key=lambda x: (x[0], x[1])))
    return out


def unusable_inputs(offsets: np.ndarray, row_problems: np.ndarray,
                    probabilities: np.ndarray | None = None) -> list[tuple[str, str] | None]:
    """Per input, ``None`` when it may decide, else ``(kind, why)``: ``("InvalidEmbedding", "embedding row k is
    not finite ...")`` when any of its views is not a finite L2-normalised embedding (``row_problems``: per row,
    :func:`~safeclip.arrays.embedding_row_problems`), ``("InvalidScore", ...)`` when any of its probabilities is not
    finite. One bad view makes the whole input undecided: the worst view could be the one that is missing."""
    offsets = np.asarray(offsets, np.int64)
    out: list[tuple[str, str] | None] = [None] * (len(offsets) - 1)
    for row in (k for k, why in enumerate(row_problems) if why is not None):
        i = int(np.searchsorted(offsets, row, side="right") - 1)
        if out[i] is None:
            out[i] = ("InvalidEmbedding", f"embedding row {int(row - offsets[i])} {row_problems[row]}")
    if probabilities is not None:
        bad_rows = np.flatnonzero(nonfinite_rows(probabilities))
        for row in bad_rows:
            i = int(np.searchsorted(offsets, row, side="right") - 1)
            if out[i] is None:
                out[i] = ("InvalidScore", "a probability is not finite (check the policy's calibrators and heads)")
    return out


@dataclass(frozen=True)
class CategoryResult:
    """One category's verdict on one image."""

    name: str
    probability: float
    action: str
    flag_threshold: float | None
    block_threshold: float | None
    calibrated: bool
    signals: Mapping[str, float]
    top_prompts: tuple[tuple[str, float], ...] = ()
    basis: str = "prompt"  # what ``probability`` is: "calibrator", "head" (its own probability) or "prompt"
    banks: tuple[BankMatch, ...] = ()  # bank entries this category's banks matched

    def to_dict(self) -> dict[str, Any]:
        return {
            "banks": [m.to_dict() for m in self.banks],
            "probability": self.probability,
            "action": self.action,
            "flag_threshold": self.flag_threshold,
            "block_threshold": self.block_threshold,
            "calibrated": self.calibrated,
            "basis": self.basis,
            "signals": dict(self.signals),
            "top_prompts": [list(t) for t in self.top_prompts],
        }


@dataclass(frozen=True)
class Decision:
    """The moderation result for one image.

    ``action`` is ``"allow"``, ``"flag"`` or ``"block"``; ``categories`` maps each policy category to its
    :class:`CategoryResult`; ``reasons`` lists, worst first, the categories that fired. ``error`` is set only
    when the image could not be decided and the moderator fails closed (``on_error="flag"|"block"``).
    ``frame_index`` names the frame that decided and, for an image with transparency (judged on several
    backgrounds, the worst view deciding), ``background`` the ``(r, g, b)`` colour it was seen on (``None``: opaque).
    ``matches`` lists the bank entries the deciding view matched (:class:`~safeclip.banks.BankMatch`: bank, entry,
    distance or similarity, what the match did).

    A video or animation is decided on its sampled frames (``sampling`` says how they were sampled,
    ``frames_scored`` how many were scored, ``duration_s`` its length): ``time_s`` is the deciding frame's time and
    ``segments`` the runs of frames at or above a category's ``flag`` (:class:`Segment`). ``stopped_early``: decoding
    stopped at the first chunk of frames that decided ``block`` (``Moderator.check``'s ``early_stop``), so the
    segments cover the frames up to there. A still has ``frames_scored`` 1 (its frame count for an animation
    decoded without times), no segments and ``time_s`` ``None``.
    """

    action: str
    categories: Mapping[str, CategoryResult]
    reasons: tuple[str, ...]
    policy: str
    encoder_id: str
    sha256: str | None = None
    source: str | None = None
    frame_index: int | None = None
    n_frames: int = 1
    error: str | None = None
    calibrated: bool = field(default=False)
    background: tuple[int, int, int] | None = None
    matches: tuple[BankMatch, ...] = ()
    segments: tuple[Segment, ...] = ()
    frames_scored: int = 1
    sampling: str | None = None
    duration_s: float | None = None
    time_s: float | None = None
    stopped_early: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "reasons": list(self.reasons),
            "policy": self.policy,
            "encoder_id": self.encoder_id,
            "sha256": self.sha256,
            "source": self.source,
            "frame_index": self.frame_index,
            "n_frames": self.n_frames,
            "background": None if self.background is None else list(self.background),
            "calibrated": self.calibrated,
            "error": self.error,
            "matches": [m.to_dict() for m in self.matches],
            "categories": {k: v.to_dict() for k, v in self.categories.items()},
            "frames_scored": self.frames_scored,
            "sampling": self.sampling,
            "duration_s": self.duration_s,
            "time_s": self.time_s,
            "stopped_early": self.stopped_early,
            "segments": [g.to_dict() for g in self.segments],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=False, allow_nan=False)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def build_decision(
    policy: Policy,
    probabilities: np.ndarray,
    calibrated: np.ndarray,
    signals: Mapping[str, np.ndarray],
    *,
    encoder_id: str,
    top_prompts: Mapping[str, tuple[tuple[str, float], ...]] | None = None,
    sha256: str | None = None,
    source: str | None = None,
    frame_index: int | None = None,
    n_frames: int = 1,
    background: tuple[int, int, int] | None = None,
    basis: tuple[str, ...] | None = None,
    codes: np.ndarray | None = None,
    matches: Sequence[BankMatch] = (),
    segments: Sequence[Segment] = (),
    frames_scored: int | None = None,
    sampling: str | None = None,
    duration_s: float | None = None,
    time_s: float | None = None,
    stopped_early: bool = False,
) -> Decision:
    """Build the :class:`Decision` for one image from its ``(C,)`` probabilities and signals.

    ``signals`` maps each signal name (``prompt``, ``probe``, ``head``, a head's named probability such as
    ``punsafe``) to its ``(C,)`` values, NaN where a category lacks it. ``basis`` says per category what the
    probability is (see :func:`safeclip.calibrate.probability_basis`); without it, calibrated or prompt.
    ``segments``, ``frames_scored`` (default ``n_frames``), ``sampling``, ``duration_s``, ``time_s`` (the deciding
    frame's) and ``stopped_early`` describe a video or animation (see :class:`Decision`).

    Non-finite probabilities raise :class:`~safeclip.errors.DataError`: they decide nothing (the caller turns that
    into its fail-closed action).
    """
    bad = [policy.categories[j].name for j in np.flatnonzero(~np.isfinite(np.asarray(probabilities, np.float64)))]
    if bad:
        raise DataError(f"the probability of {', '.join(bad)} is not a finite number (a corrupt embedding, probe or "
                        "calibrator); no decision is made from it")
    by_threshold = decide_codes(probabilities[None, :], policy)[0]
    codes = by_threshold if codes is None else np.asarray(codes, np.int8)
    results: dict[str, CategoryResult] = {}
    fired: list[tuple[int, float, str]] = []
    for j, cat in enumerate(policy.categories):
        p = float(probabilities[j])
        mine = tuple(m for m in matches if m.category == cat.name)
        sig = {k: float(v[j]) for k, v in signals.items() if not np.isnan(v[j])}
        res = CategoryResult(
            name=cat.name, probability=round(p, 6), action=ACTIONS[codes[j]], flag_threshold=cat.flag,
            block_threshold=cat.block, calibrated=bool(calibrated[j]), signals=MappingProxyType(sig),
            top_prompts=(top_prompts or {}).get(cat.name, ()),
            basis=basis[j] if basis is not None else ("calibrator" if calibrated[j] else "prompt"), banks=mine,
        )
        results[cat.name] = res
        for m in mine:
            if m.effect == "deny" and m.quarantined:
                fired.append((1, p, f"{cat.name}: {m.describe()} is in flood quarantine (it matched "
                                    f"{m.flood_count} distinct inputs in its window): flag for review, not "
                                    f"{m.effect}; a person confirms it with `safeclip bank confirm`"))
            elif m.effect == "deny":
                fired.append((_ACTION_CODE[m.action], 2.0, f"{cat.name}: known content: {m.describe()} "
                                                           f"(deny bank: {m.action})"))
            elif m.action == "allow" and by_threshold[j] > 0 and codes[j] == 0:
                limit = cat.block if by_threshold[j] == 2 else cat.flag
                fired.append((0, p, f"{cat.name}: allowed by {m.describe()}: overrides p={p:.3f} >= "
                                    f"{ACTIONS[by_threshold[j]]} threshold {_fmt(limit)}"))
        if mine and codes[j] != by_threshold[j]:
            continue  # the bank's reason says why
        if codes[j] > 0:
            limit = cat.block if codes[j] == 2 else cat.flag
            why = f"{cat.name}: p={p:.3f} >= {res.action} threshold {_fmt(limit)}"
            if res.basis == "head":
                why += " (uncalibrated: the head's own probability)"
            elif not res.calibrated:
                why += " (uncalibrated)"
            if time_s is not None:
                why += f" at {time_s:.2f} s"
            if res.top_prompts:
                why += f"; closest prompt: {res.top_prompts[0][0]!r}"
            fired.append((int(codes[j]), p, why))
    fired.sort(key=lambda t: (-t[0], -t[1]))
    return Decision(
        action=ACTIONS[int(codes.max()) if len(codes) else 0],
        categories=MappingProxyType(results),
        reasons=tuple(w for _, _, w in fired),
        matches=tuple(matches),
        policy=policy.id,
        encoder_id=encoder_id,
        sha256=sha256,
        source=source,
        frame_index=frame_index,
        n_frames=n_frames,
        calibrated=bool(np.all(calibrated)) if len(calibrated) else False,
        background=background,
        segments=tuple(segments),
        frames_scored=n_frames if frames_scored is None else int(frames_scored),
        sampling=sampling,
        duration_s=duration_s if duration_s is not None and np.isfinite(duration_s) else None,
        time_s=time_s,
        stopped_early=stopped_early,
    )


def error_decision(action: str, error: str, *, policy: Policy, encoder_id: str, source: str | None) -> Decision:
    """A fail-closed Decision for an input that could not be decided."""
    return Decision(
        action=action, categories=MappingProxyType({}), reasons=(f"error: {error}",), policy=policy.id,
        encoder_id=encoder_id, source=source, error=error,
    )
