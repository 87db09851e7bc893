"""The per-file unit: read a file, hash it, look it up in the embedding cache, and only on a miss decode it and
prepare the model's pixels. Both engines run :func:`process_file`: the local engine in its decode processes
(:func:`worker_main`), the Ray engine in its decode tasks.

What one input became travels as a :class:`FileResult`: the worker fills in what it read and decoded, the batch
unit (:mod:`safeclip.audit.mapper`) its embeddings and decision. The local engine sends results through pipes
(pickled); the Ray engine through Ray's object store, as Arrow tables (:func:`results_to_arrow`).

A worker never imports torch: it runs the decode stage and the numpy half of the embed stage
(:func:`safeclip.embed.prepare_pixels`), the same path as ``Moderator``, so an audit row and ``Moderator.check``
agree on the same file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import signal
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..cache import EmbeddingCache
from ..decode import DECODER_VERSION, DecodeLimits, decoder_id, read_source
from ..embed import DecodeOptions, PixelSpec, prepare
from ..errors import (
    CacheError,
    DecodeError,
    DecodeTimeoutError,
    ImageTooLargeError,
    TruncatedImageError,
    UnsupportedFormatError,
)

if TYPE_CHECKING:  # pragma: no cover
    import multiprocessing.connection

    import pyarrow as pa

__all__ = ["TEST_HOOK_ENV", "FileResult", "WorkerConfig", "decoder_fingerprint", "open_cache",
           "process_file", "sampling_key", "results_from_arrow", "results_to_arrow", "worker_main"]

TEST_HOOK_ENV = "SAFECLIP_AUDIT_TEST_HOOK"
"""Test-only failure injection: JSON ``{"crash"|"abort"|"hang": [file names], "delay": s}`` (and the Ray engine's
own keys, see :mod:`safeclip.audit.ray`)."""

_DETERMINISTIC_ERRORS = (UnsupportedFormatError, ImageTooLargeError, TruncatedImageError)


@dataclass
class FileResult:
    """What one input (``tid``: its position in the audit's inputs) became.

    ``kind``: ``"hit"`` (``embeddings`` came from the cache), ``"pixels"`` (decoded into ``pixels``, ``(F, S, S, 3)``
    uint8, for the model) or ``"error"`` (``error_kind``, ``error``; ``cacheable_error`` when the same bytes fail the
    same way with the same decoder). The batch unit then sets ``embeddings`` (``(F, D)`` float32), ``code`` and
    ``probs`` (the decision), ``new`` (embedded by the model in this run) and ``duplicate`` (decoded, but the same
    bytes were embedded for another input). ``pdq`` ``(F, 32)`` uint8 and ``pdq_quality`` ``(F,)`` are each view's
    PDQ hash (decoded now, or from the cache; None for a cache entry made before hashes were kept); ``view`` (the
    deciding view) and ``matches`` (JSON: its bank matches) are set with ``code``.

    A video or animation decoded with times: ``timestamps`` (per embedding row, seconds), ``duration_s`` and
    ``sampling`` (what the decoder says of its sampling), and ``cache_sampling`` (:func:`sampling_key`: what keys
    its cache entry beside its sha256); the batch unit sets ``time_s`` (the deciding frame's), ``frames_scored`` and
    ``segments`` (JSON: a list of :meth:`~safeclip.decide.Segment.to_dict`) with ``code``.
    """

    tid: int
    kind: str
    sha256: str | None = None
    nbytes: int | None = None
    width: int | None = None
    height: int | None = None
    n_frames: int | None = None
    frame_indices: tuple[int, ...] = ()
    backgrounds: tuple[str | None, ...] = ()  # per embedding row: "#rrggbb" a transparent view was seen on
    format: str | None = None
    pixels: np.ndarray | None = None
    embeddings: np.ndarray | None = None
    error: str | None = None
    error_kind: str | None = None
    cacheable_error: bool = False
    decoded: bool = False
    restarts: int = 0  # earlier attempts of this file's decode task whose worker died (Ray)
    read_s: float = 0.0
    decode_s: float = 0.0
    code: int | None = None
    probs: np.ndarray | None = None
    new: bool = False
    duplicate: bool = False
    background: str | None = None  # the deciding view's background (set with ``code``)
    embed_s: float = 0.0
    score_s: float = 0.0
    pdq: np.ndarray | None = None
    pdq_quality: np.ndarray | None = None
    view: int | None = None
    matches: str | None = None
    timestamps: tuple[float, ...] = ()
    duration_s: float | None = None
    sampling: str | None = None
    time_s: float | None = None
    frames_scored: int | None = None
    segments: str | None = None
    cache_sampling: str | None = None

    @property
    def error_text(self) -> str:
        """The ``error`` column of this input's row."""
        return f"{self.error_kind or 'DecodeError'}: {self.error or 'no embedding'}"


@dataclass(frozen=True)
class WorkerConfig:
    """What a decode worker needs: the cache to look files up in, the encoder's pixel spec, the decode limits.
    ``needs_pdq``: the policy matches PDQ banks, so a cache entry without PDQ hashes is a miss (decoded again)."""

    cache_dir: str | None
    encoder_id: str
    spec: PixelSpec
    limits: DecodeLimits
    fingerprint: str
    nice: int
    hook: str | None
    fast: bool = True
    needs_pdq: bool = False
    backend: str = "auto"


def decoder_fingerprint(limits: DecodeLimits, target_size: int | None, backend: str = "auto") -> str:
    """What a decode failure depends on besides the bytes: Pillow, the decoder's version, its limits, the target
    size, the backend that decodes (with libvips' version) and PyAV's version (videos: its FFmpeg decides what is
    corrupt)."""
    import importlib.metadata

    import PIL

    try:
        pyav: str | None = importlib.metadata.version("av")
    except importlib.metadata.PackageNotFoundError:
        pyav = None
    parts: list[object] = [PIL.__version__, repr(limits), target_size, DECODER_VERSION, pyav]
    decoder = decoder_id(backend)
    if decoder != "pil":  # Pillow-only fingerprints stay as they were, so their remembered failures still count
        parts.append(decoder)
    blob = json.dumps(parts)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def sampling_key(limits: DecodeLimits) -> str:
    """What decides which frames a clip gives, as text: the decode limits that count frames or set a rate. A clip's
    cache entry is keyed by its sha256 and this (:meth:`~safeclip.cache.EmbeddingCache.get_many` ``sampling=``)."""
    chosen = {f.name: getattr(limits, f.name) for f in dataclasses.fields(limits)
              if "frame" in f.name or "per_second" in f.name or "fps" in f.name}
    return json.dumps(chosen, sort_keys=True, default=repr)


def open_cache(cfg: WorkerConfig) -> EmbeddingCache | None:
    """The cache, read-only, or None where this process cannot see it (then every file is decoded)."""
    if cfg.cache_dir is None:
        return None
    try:
        return EmbeddingCache(cfg.cache_dir, cfg.encoder_id, readonly=True)
    except CacheError:
        return None


def process_file(tid: int, path: str, cfg: WorkerConfig, cache: EmbeddingCache | None,
                 hook: Mapping[str, Any]) -> FileResult:
    """One file: read and hash it, look it up in the cache, and only on a miss decode it into model pixels. Never
    raises for a bad file: the failure is the result."""
    res = FileResult(tid, "error")
    try:
        t0 = time.perf_counter()
        data, _ = read_source(path, max_bytes=cfg.limits.max_bytes)
        if data is None:  # only for in-memory images, never for a path
            raise DecodeError("no bytes read", path)
        res.nbytes = len(data)
        res.sha256 = sha = hashlib.sha256(data).hexdigest()
        res.read_s = time.perf_counter() - t0
        if cache is not None:
            hit = cache.get_many([sha], sampling=sampling_key(cfg.limits)).get(sha)
            # An entry without PDQ hashes cannot be matched against a PDQ bank: decode the file again for them.
            if hit is not None and not (cfg.needs_pdq and hit.pdq is None):
                res.kind, res.embeddings = "hit", hit.embeddings
                res.width, res.height, res.n_frames = hit.width, hit.height, hit.n_frames
                res.frame_indices, res.format = hit.frame_indices, hit.format
                res.backgrounds = hit.backgrounds
                res.pdq, res.pdq_quality = hit.pdq, hit.pdq_quality
                res.timestamps, res.cache_sampling = hit.times, hit.sampling
                res.duration_s, res.sampling = hit.duration_s, hit.sampling_text
                return res
            known = cache.get_decode_errors([sha], cfg.fingerprint).get(sha)
            if known is not None:
                res.error_kind, res.error = known
                return res
        if hook:
            _test_hook(hook, path)
        t1 = time.perf_counter()
        res.decoded = True
        # The same prepare as Moderator's, so rows and Moderator.check agree (a video: every sampled frame, in one
        # decode: an audit scores them all, no early stop).
        prep = prepare(data, cfg.spec, DecodeOptions(cfg.limits, cfg.fast, backend=cfg.backend))
        res.pixels = prep.pixels
        res.pdq, res.pdq_quality = prep.pdq, prep.pdq_quality
        res.decode_s = time.perf_counter() - t1
        res.kind = "pixels"
        res.width, res.height = prep.size
        res.n_frames, res.frame_indices, res.format = prep.n_frames, prep.frame_indices, prep.format
        res.backgrounds = tuple(None if b is None else "#%02x%02x%02x" % tuple(b) for b in prep.backgrounds)
        if prep.timestamps:  # a clip (what its cache entry keeps too: a row is the same from a hit)
            res.timestamps, res.duration_s, res.sampling = tuple(prep.timestamps), prep.duration_s, prep.sampling
            res.cache_sampling = sampling_key(cfg.limits)
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
    """Test-only failure injection (see :data:`TEST_HOOK_ENV`): lets tests kill or hang a worker on a chosen file."""
    name = os.path.basename(path)
    if hook.get("delay"):
        time.sleep(float(hook["delay"]))
    if name in hook.get("crash", ()):
        os._exit(70)
    if name in hook.get("abort", ()):
        os.abort()
    if name in hook.get("hang", ()):
        time.sleep(3600)


def worker_main(conn: multiprocessing.connection.Connection) -> None:
    """A decode process: receives its :class:`WorkerConfig`, then ``(task id, path)`` tasks, answers each with a
    :class:`FileResult`, in order; ``None`` (or the parent going away, even by ``kill -9``) ends it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it then stops the workers
    warnings.simplefilter("ignore")  # Pillow's per-file UserWarnings: the outcome of each file is its row
    logging.getLogger("PIL").setLevel(logging.CRITICAL)  # and its per-file log lines ("More samples per pixel ...")
    try:
        cfg = conn.recv()
    except (EOFError, OSError):  # the parent went away before configuring us
        return
    if cfg is None:
        return
    if cfg.nice:
        with contextlib.suppress(OSError):
            os.nice(cfg.nice)
    cache = open_cache(cfg)
    hook = json.loads(cfg.hook) if cfg.hook else {}
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        res = process_file(task[0], task[1], cfg, cache, hook)
        try:
            conn.send(res)
        except OSError:
            return


# ------------------------------------------------------------------------------------------------ Arrow form
def _arrow_schema() -> pa.Schema:
    import pyarrow as pa

    return pa.schema([
        ("idx", pa.int64()), ("sha256", pa.string()), ("nbytes", pa.int64()), ("width", pa.int32()),
        ("height", pa.int32()), ("n_frames", pa.int32()), ("frame_indices", pa.list_(pa.int32())),
        ("backgrounds", pa.list_(pa.string())), ("background", pa.string()),
        ("format", pa.string()), ("kind", pa.string()), ("error_kind", pa.string()), ("error", pa.string()),
        ("cacheable", pa.bool_()), ("decoded", pa.bool_()), ("restarts", pa.int32()), ("read_s", pa.float64()),
        ("decode_s", pa.float64()), ("pixels", pa.large_binary()), ("emb", pa.large_binary()),
        ("code", pa.int8()), ("probs", pa.list_(pa.float32())), ("new", pa.bool_()), ("duplicate", pa.bool_()),
        ("embed_s", pa.float64()), ("score_s", pa.float64()), ("pdq", pa.binary()), ("pdq_quality", pa.binary()),
        ("view", pa.int32()), ("matches", pa.string()), ("timestamps", pa.list_(pa.float64())),
        ("duration_s", pa.float64()), ("sampling", pa.string()), ("time_s", pa.float64()),
        ("frames_scored", pa.int32()), ("segments", pa.string()), ("cache_sampling", pa.string()),
    ])


def _blob(a: np.ndarray | None, dtype: Any) -> bytes | None:
    return None if a is None else np.ascontiguousarray(a, dtype).tobytes()


def results_to_arrow(results: Sequence[FileResult]) -> pa.Table:
    """``results`` as one Arrow table (a row each; pixels and embeddings as bytes): how they cross Ray."""
    import pyarrow as pa

    cols: dict[str, list[Any]] = {
        "idx": [r.tid for r in results], "sha256": [r.sha256 for r in results],
        "nbytes": [r.nbytes for r in results], "width": [r.width for r in results],
        "height": [r.height for r in results], "n_frames": [r.n_frames for r in results],
        "frame_indices": [list(r.frame_indices) for r in results], "format": [r.format for r in results],
        "backgrounds": [list(r.backgrounds) for r in results], "background": [r.background for r in results],
        "kind": [r.kind for r in results], "error_kind": [r.error_kind for r in results],
        "error": [r.error for r in results], "cacheable": [bool(r.cacheable_error) for r in results],
        "decoded": [bool(r.decoded) for r in results], "restarts": [r.restarts for r in results],
        "read_s": [float(r.read_s) for r in results], "decode_s": [float(r.decode_s) for r in results],
        "pixels": [_blob(r.pixels, np.uint8) for r in results],
        "emb": [_blob(r.embeddings, np.float32) for r in results],
        "code": [r.code for r in results],
        "probs": [None if r.probs is None else np.asarray(r.probs, np.float32) for r in results],
        "new": [bool(r.new) for r in results], "duplicate": [bool(r.duplicate) for r in results],
        "embed_s": [float(r.embed_s) for r in results], "score_s": [float(r.score_s) for r in results],
        "pdq": [_blob(r.pdq, np.uint8) for r in results],
        "pdq_quality": [_blob(r.pdq_quality, np.int16) for r in results],
        "view": [r.view for r in results], "matches": [r.matches for r in results],
        "timestamps": [list(r.timestamps) for r in results], "duration_s": [r.duration_s for r in results],
        "sampling": [r.sampling for r in results], "time_s": [r.time_s for r in results],
        "frames_scored": [r.frames_scored for r in results], "segments": [r.segments for r in results],
        "cache_sampling": [r.cache_sampling for r in results],
    }
    return pa.Table.from_pydict(cols, schema=_arrow_schema())


def results_from_arrow(table: pa.Table, size: int, dim: int) -> list[FileResult]:
    """The results of a :func:`results_to_arrow` table (``size``: the pixel spec's, ``dim``: the embeddings')."""
    c = {name: table.column(name).to_pylist() for name in table.column_names}
    out = []
    for i in range(table.num_rows):
        pix, emb, probs, pdq, pdq_q = c["pixels"][i], c["emb"][i], c["probs"][i], c["pdq"][i], c["pdq_quality"][i]
        out.append(FileResult(
            tid=c["idx"][i], kind=c["kind"][i], sha256=c["sha256"][i], nbytes=c["nbytes"][i], width=c["width"][i],
            height=c["height"][i], n_frames=c["n_frames"][i], frame_indices=tuple(c["frame_indices"][i] or ()),
            backgrounds=tuple(c["backgrounds"][i] or ()), background=c["background"][i],
            format=c["format"][i], error=c["error"][i], error_kind=c["error_kind"][i],
            cacheable_error=bool(c["cacheable"][i]), decoded=bool(c["decoded"][i]), restarts=c["restarts"][i] or 0,
            read_s=c["read_s"][i], decode_s=c["decode_s"][i], code=c["code"][i], new=bool(c["new"][i]),
            duplicate=bool(c["duplicate"][i]), embed_s=c["embed_s"][i], score_s=c["score_s"][i],
            pixels=None if pix is None else np.frombuffer(pix, np.uint8).reshape(-1, size, size, 3),
            embeddings=None if emb is None else np.frombuffer(emb, np.float32).reshape(-1, dim),
            probs=None if probs is None else np.asarray(probs, np.float32),
            pdq=None if pdq is None else np.frombuffer(pdq, np.uint8).reshape(-1, 32),
            pdq_quality=None if pdq_q is None else np.frombuffer(pdq_q, np.int16), view=c["view"][i],
            matches=c["matches"][i], timestamps=tuple(c["timestamps"][i] or ()), duration_s=c["duration_s"][i],
            sampling=c["sampling"][i], time_s=c["time_s"][i], frames_scored=c["frames_scored"][i],
            segments=c["segments"][i], cache_sampling=c["cache_sampling"][i]))
    return out
