"""THE batch unit of an audit: dedup by sha256 -> embed -> cache write -> score -> rows. Both engines run it;
neither has its own copy.

The unit has two halves, split where the model is:

- :meth:`BatchUnit.map`, where the model is: the batch's decoded files are deduplicated by sha256 (one forward per
  distinct image, even when the same bytes come under many names), embedded in one forward, and every row with an
  embedding (decoded now, or found in the cache by the worker) is scored and decided under the compiled policy;
- :func:`store`, where the output is: the new embeddings (and deterministic decode failures) are written to the
  embedding cache, then the rows go to the output's buffer, so no row is ever committed before its embedding.

The local engine runs both halves in its main process, one model batch at a time. The Ray engine runs ``map`` in
its model actors and ``store`` on the driver, per shard; the results travel between them in their Arrow form
(:func:`safeclip.audit.worker.results_to_arrow`). Deciding is the decision object's
(:meth:`safeclip.compiled.CompiledPolicy.decide`), as for ``Moderator``: for an animation the worst frame decides, and
for a transparent image the worst background (the row's ``background`` is the deciding view's).

Videos and animations decoded with times (``FileResult.timestamps``): the decision object gets each frame's time
(:meth:`~safeclip.compiled.Views.with_times`), so the worst frame decides after each category's ``k of n`` rule and
the row records the deciding frame's time, the frames scored and the segments (runs of frames at or above a
category's ``flag``). The cache keeps a clip's frame times with its embeddings, keyed by its sha256 and the sampling
settings it was decoded under (``FileResult.cache_sampling``): a run under other sampling settings decodes it again.
A duplicate clip is embedded once within a batch, but is never taken from an entry written since its worker looked
(that entry may be of another sampling).

PDQ banks: each view's PDQ hash (computed where the file is decoded, or read from the cache) goes to the decision
object with its embedding (:meth:`~safeclip.compiled.Views.with_pdq`), and the cache keeps it beside the embedding.
Under a policy that matches PDQ banks a cache entry without hashes (made before they were kept) is a miss for the
decode workers (:attr:`~safeclip.audit.worker.WorkerConfig.needs_pdq`): the file is decoded again and its entry
completed, never decided without its hash. A row reports the deciding view's hash and its bank matches.

Nothing unusable decides: an input the decision object reports as unusable (an embedding row that is not finite and
L2-normalised: a damaged cache entry, a model that overflowed) is an error row (``InvalidEmbedding``; a cached entry
is discarded so that the next run embeds the file again), and so is one with a non-finite probability
(``InvalidScore``). A cache that fails under a worker (damaged, unreadable) stops the audit
with :class:`~safeclip.errors.CacheError` instead of turning good files into decode errors; a damaged database is
moved aside first (:meth:`~safeclip.cache.EmbeddingCache.quarantine`), so the same command run again rebuilds it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..cache import CachedImage
from ..compiled import Views
from ..embed import PromptCache
from ..errors import CacheError
from .summary import Tally
from .worker import FileResult

if TYPE_CHECKING:  # pragma: no cover
    from ..compiled import CompiledPolicy
    from ..embed import Encoder
    from ..policy import Policy
    from .writer import RunOutput

__all__ = ["BatchUnit", "UNUSABLE_REMEDY", "compile_policy", "needs_pdq", "store"]

Lookup = Callable[[list[str]], Mapping[str, CachedImage]]

UNUSABLE_REMEDY: dict[str, str] = {
    "InvalidEmbedding": "; it never decides (a cached entry is discarded: the next run embeds the file again)",
    "InvalidScore": " (check the policy's calibrators); it never decides",
}
"""What an audit row adds to the decision object's reason, per kind of unusable input."""


def needs_pdq(policy: Policy) -> bool:
    """Whether ``policy`` matches PDQ banks (then every input needs its views' PDQ hashes to decide)."""
    return any(ref.kind == "pdq" for cat in policy.categories for ref in cat.banks)


def compile_policy(policy: Policy, enc: Encoder, cache_dir: Path) -> CompiledPolicy:
    """``policy`` compiled against ``enc``, leaving its prompt embeddings in ``cache_dir`` too (where
    :func:`~safeclip.audit.rescore` looks for them)."""
    from ..compiled import CompiledPolicy

    own = PromptCache(enc.encoder_id, cache_dir)

    def embed_texts(texts: list[str]) -> np.ndarray:
        vecs = enc.embed_texts(texts)
        missing = own.missing(texts)
        if missing and own.path != enc.prompt_cache.path:
            first = {t: i for i, t in reversed(list(enumerate(texts)))}
            own.put(missing, vecs[[first[t] for t in missing]])
        return vecs

    return CompiledPolicy.build(policy, embed_texts, enc.encoder_id)


class BatchUnit:
    """The model half of the batch unit: ``embed_pixels`` (``Encoder.embed_pixels``: ``(N, S, S, 3)`` uint8 ->
    ``(N, D)`` float32) and the policy compiled for that encoder."""

    def __init__(self, embed_pixels: Callable[[np.ndarray], np.ndarray], comp: CompiledPolicy) -> None:
        self.embed_pixels = embed_pixels
        self.comp = comp

    def map(self, results: Sequence[FileResult], known: Lookup | None = None) -> Sequence[FileResult]:
        """Dedup by sha256, embed, score: fills in ``embeddings``, ``code``, ``probs``, ``new``, ``duplicate`` and
        the per-row share of ``embed_s``/``score_s`` of ``results`` (in place; returned for chaining) and drops their
        pixels. ``known``: embeddings already in the cache by sha256 (files embedded since their worker looked)."""
        n = max(1, len(results))
        t = time.perf_counter()
        self._embed(results, known)
        embed_s = (time.perf_counter() - t) / n
        t = time.perf_counter()
        ok = [r for r in results if r.embeddings is not None and r.kind != "error"]
        if ok:
            views = Views.of([r.embeddings for r in ok], self.comp.scorer.dim)
            if any(r.pdq is not None for r in ok):
                views = views.with_pdq([None if r.pdq is None or r.pdq_quality is None else (r.pdq, r.pdq_quality)
                                        for r in ok])
            if any(r.timestamps for r in ok):
                views = views.with_times([r.timestamps for r in ok])
            verdicts = self.comp.decide(views)
            for k, r in enumerate(ok):
                problem = verdicts.problems[k]
                if problem is not None:
                    _unusable(r, problem[0], problem[1] + UNUSABLE_REMEDY.get(problem[0], ""))
                    continue
                r.code, r.probs = int(verdicts.actions[k]), verdicts.probabilities[k]
                r.view = view = int(verdicts.view[k])
                r.background = r.backgrounds[view] if view < len(r.backgrounds) else None
                r.matches = json.dumps([m.to_dict() for m in verdicts.matches(k)])
                if r.timestamps and verdicts.frames is not None and int(verdicts.frames[k]) > 0:
                    r.time_s, r.frames_scored = verdicts.time(k), int(verdicts.frames[k])
                    r.segments = json.dumps([g.to_dict() for g in verdicts.segments_of(k)])
        score_s = (time.perf_counter() - t) / n
        for r in results:
            r.embed_s, r.score_s = embed_s, score_s
        return results

    def _embed(self, results: Sequence[FileResult], known: Lookup | None) -> None:
        first: dict[str, FileResult] = {}
        copies: list[FileResult] = []
        for r in results:
            if r.kind != "pixels":
                continue
            if r.sha256 in first:
                r.duplicate = True
                copies.append(r)
            else:
                first[r.sha256] = r  # type: ignore[index]
        todo = list(first.values())
        stills = [r for r in todo if not r.timestamps]
        if known is not None and stills:
            found = known([r.sha256 for r in stills])  # type: ignore[misc]
            for r in stills:
                if r.sha256 in found:
                    r.embeddings, r.duplicate = found[r.sha256].embeddings, True  # type: ignore[index]
            todo = [r for r in todo if r.embeddings is None]
        if todo:
            flat = self.embed_pixels(np.concatenate([r.pixels for r in todo]))  # type: ignore[misc]
            row = 0
            for r in todo:
                k = len(r.pixels)  # type: ignore[arg-type]
                r.embeddings, r.new = flat[row:row + k], True
                row += k
        for r in copies:
            r.embeddings = first[r.sha256].embeddings  # type: ignore[index]
        for r in results:
            r.pixels = None


def _unusable(r: FileResult, kind: str, why: str) -> None:
    r.kind, r.error_kind, r.error, r.cacheable_error = "error", kind, why, False
    r.code = r.probs = r.background = r.view = r.matches = r.time_s = r.frames_scored = r.segments = None


def _hashes(r: FileResult) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``r``'s PDQ hashes as the cache keeps them: one per embedding row, or none."""
    if r.pdq is None or r.pdq_quality is None or r.embeddings is None or len(r.pdq) != len(r.embeddings):
        return None, None
    return r.pdq, r.pdq_quality


def _times(r: FileResult) -> tuple[float, ...]:
    """``r``'s frame times as the cache keeps them: one per embedding row (and its sampling known), or none (a
    clip without them is not cached: an entry without times would be read as a still)."""
    ok = r.embeddings is not None and len(r.timestamps) == len(r.embeddings) and r.cache_sampling is not None
    return tuple(r.timestamps) if ok else ()


def store(results: Sequence[FileResult], output: RunOutput, tally: Tally) -> None:
    """The output half of the batch unit: the new embeddings and deterministic decode failures of ``results`` into
    the cache (one transaction each), then their rows into ``output``'s buffer; ``tally`` counts them.

    A cache failure seen by a worker raises :class:`~safeclip.errors.CacheError` before any of these rows is
    buffered (a damaged database is moved aside first), so no good file becomes an error row."""
    failed = next((r for r in results if r.error_kind == "CacheError"), None)
    try:
        if failed is not None:
            if "damaged" in (failed.error or ""):
                output.db.damaged = True
            why = (failed.error or "").removeprefix("unexpected error while decoding: ")
            raise CacheError(f"the audit stopped: {why}")
        # New embeddings, and decoded files whose cache entry may lack the PDQ hashes (put_many completes those).
        entries = {r.sha256: CachedImage(r.sha256, r.embeddings, r.frame_indices, r.width or 0, r.height or 0,
                                         r.n_frames or 1, r.nbytes or 0, r.format or "", r.backgrounds,
                                         *_hashes(r), times=_times(r), sampling=r.cache_sampling,
                                         duration_s=r.duration_s, sampling_text=r.sampling)
                   for r in results if (r.new or (r.decoded and r.pdq is not None)) and r.sha256 is not None
                   and r.embeddings is not None and r.kind != "error" and (_times(r) or not r.timestamps)}
        output.db.put_many(list(entries.values()))  # before any row that uses these embeddings can be committed
        errors = [(r.sha256, r.error_kind or "DecodeError", r.error or "")
                  for r in results if r.kind == "error" and r.cacheable_error and r.sha256]
        output.db.put_decode_errors(errors, output.fingerprint)
        output.db.discard(r.sha256 for r in results if r.error_kind == "InvalidEmbedding" and r.sha256)
    except CacheError as e:
        if output.db.damaged and "moved aside to" not in str(e):
            moved = output.db.quarantine()
            raise CacheError(f"{e}. It was moved aside to {moved}: run the same command again (the rows committed "
                             "so far are kept; the cache is rebuilt as files are embedded again)") from e
        raise
    output.rows.extend(output.inputs, results)
    tally.add(results)
