"""Re-deciding cached embeddings under another policy, without the model: :func:`rescore`.

The embeddings come from the embedding cache (by sha256: the rows of an earlier audit, or every image cached for an
encoder) or from an audit written with ``save_embeddings=True``; the prompt embeddings from the prompt cache. The
deciding is the decision object's (:meth:`safeclip.compiled.CompiledPolicy.decide`), as in the audit's batch unit,
so a re-score equals a fresh audit under the new policy.

Banks are matched again too, against their entries of today: the PDQ hashes come from the cache beside the
embeddings (or from the ``embedding_pdq`` column of an output written with ``save_embeddings=True``), so files
audited before an entry was added are found without decoding them ("which past files match what we added today").
An image whose hashes were never recorded cannot be matched against a PDQ bank: under a policy that names one it is
an error row (``NoHash``: audit the file again).

Videos: a clip's cache entry keeps its frame times, so re-scoring a video row from the cache decides it as a clip
(``k of n``, segments). From an output written with ``save_embeddings=True`` its frames are re-decided without their
times: the worst frame decides (never less strict than a ``k of n`` rule) and the row has no segments. A re-score of
the whole cache (no source output) decides every entry as the worst of its views.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..banks import NO_HASH
from ..cache import EmbeddingCache, list_cached_encoders
from ..compiled import Verdicts, Views
from ..decide import ACTIONS, Decision
from ..embed import PromptCache, default_cache_dir, resolve_encoder_args
from ..errors import (
    CacheError,
    ConfigError,
    DataError,
    EncoderMismatchError,
    ModelLoadError,
)
from ..files import write_parquet_atomic
from ..policy import Policy, load_policy
from .reader import check_output_columns, open_parquet, parquet_batches
from .summary import ERROR_ACTION, AuditSummary, Tally, summarize
from .writer import (
    FORMAT_VERSION,
    Rows,
    check_output,
    output_error,
    output_schema,
    policy_fingerprint,
    policy_thresholds,
    read_meta,
)

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa

    from ..compiled import CompiledPolicy

__all__ = ["AuditDecision", "audit_decisions", "compile_without_model", "rescore"]


def compile_without_model(policy: Policy, encoder_id: str, cache_dir: Path, model: str | None,
                          pretrained: str | None, device: str | None) -> CompiledPolicy:
    """Compile ``policy`` from cached prompt embeddings. Only when some are missing and the caller named weights
    (``model``/``pretrained``, completed from the policy's ``encoder:`` by
    :func:`~safeclip.embed.resolve_encoder_args`) is the model loaded, to embed them."""
    from ..compiled import CompiledPolicy

    prompts = PromptCache(encoder_id, cache_dir)

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

        name, weights, _ = resolve_encoder_args(model, pretrained, policy.encoder)
        enc = Encoder(name, weights, device=device, cache_dir=cache_dir)
        if enc.encoder_id != encoder_id:
            raise EncoderMismatchError(
                f"--model/--pretrained load encoder {enc.encoder_id!r}, but the embeddings are from {encoder_id!r}")
        return enc.embed_texts(texts)

    return CompiledPolicy.build(policy, embed_texts, encoder_id)


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
    overwrite: bool = False,
) -> AuditSummary:
    """Re-decide cached embeddings under ``policy`` without the model; write the rows to ``out`` (Parquet).

    Sources: ``from_audit`` (a previous audit's output: the same rows and paths, new decisions; embeddings from the
    cache by sha256), ``embeddings`` (an audit output written with ``save_embeddings=True``; no cache needed), or
    neither: every image in the cache of ``encoder_id`` (one row per sha256, ``path`` null). ``encoder_id`` defaults
    to the source's, or to the only encoder in the cache. Prompt embeddings come from the prompt cache; if the
    policy has prompts never embedded under this encoder, ``model``/``pretrained`` (optional) load it just for
    them, else :class:`~safeclip.errors.ModelLoadError` explains what to do. A source that is not an audit output
    raises :class:`~safeclip.errors.DataError`.

    Every source row that cannot decide is an error row of its own (action ``error``, no probabilities): a source
    error row, a malformed sha256, an embedding not cached, a saved embedding that is null, empty, of the wrong
    length, non-finite or not normalised. ``out`` is checked as an audit's is
    (:func:`~safeclip.audit.writer.check_output`: never the source, never a file that is not a safeclip output, an
    output of other rows only with ``overwrite=True``); :class:`~safeclip.errors.OutputError` otherwise.

    >>> s = rescore(out="strict.parquet", policy="strict", from_audit="audit.parquet")   # doctest: +SKIP
    """
    t_start = time.monotonic()
    if from_audit is not None and embeddings is not None:
        raise ConfigError("give either from_audit (embeddings from the cache) or embeddings, not both")
    pol = load_policy(policy)
    cache_dir = Path(cache) if cache is not None else default_cache_dir()
    save_emb = embeddings is not None
    source = from_audit if from_audit is not None else embeddings
    src = None
    if source is not None:
        src, encoder_id = _read_source(source, encoder_id, save_emb)
    out = Path(out)
    check_output(out, [source] if source is not None else [], overwrite=overwrite, what="rescore",
                 rows=src.paths if src is not None else [])
    if encoder_id is None:
        encoder_id = _only_cached_encoder(cache_dir)

    comp = compile_without_model(pol, encoder_id, cache_dir, model, pretrained, device)
    categories = pol.category_names
    meta = {"format": FORMAT_VERSION, "kind": "rescore", "encoder_id": encoder_id, "policy": pol.id,
            "policy_fingerprint": policy_fingerprint(pol), "categories": list(categories), "dim": comp.scorer.dim,
            "cwd": src.cwd if src is not None else os.getcwd(), "thresholds": policy_thresholds(pol)}
    schema = output_schema(categories, meta, save_emb)
    if src is None:
        with EmbeddingCache(cache_dir, encoder_id, readonly=True) as db:
            table, hits = _rescore_cache(comp, db, schema, chunk_rows)
    elif save_emb:
        table, hits = _rescore_table(comp, src, schema, None, chunk_rows)
    else:
        with EmbeddingCache(cache_dir, encoder_id, readonly=True) as db:
            table, hits = _rescore_table(comp, src, schema, db, chunk_rows)
    try:
        write_parquet_atomic(table.replace_schema_metadata(schema.metadata), out)
    except OSError as e:
        raise output_error(e, out) from e
    summary = summarize(table, Tally(cache_hits=hits), out=str(out), processed=table.num_rows, resumed=0,
                        started_at=t_start, startup_seconds=0.0, encoder_id=encoder_id, policy=pol.id)
    if verbose:
        print(f"safeclip rescore: {summary.format()}", file=sys.stderr)
    return summary


@dataclass(frozen=True, eq=False)
class AuditDecision:
    """One row of an audit output, re-decided from its embeddings (:func:`audit_decisions`): ``row`` (0-based),
    ``path``, ``sha256``, the ``action`` the audit wrote, and the full ``decision`` rebuilt by the decision object
    with the ``embedding`` of its deciding view (``(D,)``); both ``None`` for a row that cannot be re-decided (an
    error row, an embedding not cached: ``error`` says why)."""

    row: int
    path: str | None
    sha256: str | None
    action: str
    decision: Decision | None
    embedding: np.ndarray | None
    error: str | None


def audit_decisions(
    source: str | os.PathLike[str],
    policy: str | os.PathLike[str] | Policy,
    *,
    actions: Sequence[str] | None = None,
    cache: str | os.PathLike[str] | None = None,
    model: str | None = None,
    pretrained: str | None = None,
    device: str | None = None,
    chunk_rows: int = 4096,
) -> Iterator[AuditDecision]:
    """The rows of an audit output whose action is in ``actions`` (default: all), each with its full Decision
    rebuilt from its embeddings (the output's saved ``embedding`` column, else the cache by sha256) under
    ``policy``, which must be the policy that wrote the audit (a :class:`~safeclip.errors.DataError` otherwise:
    a Decision is only ever what that policy decided). What ``safeclip review add --from`` puts in a review
    store.

    >>> flagged = list(audit_decisions("audit.parquet", "default", actions=["flag"]))   # doctest: +SKIP
    """
    import pyarrow as pa

    pol = load_policy(policy)
    src, encoder_id = _read_source(source, None, False)
    saved = "embedding" in src.schema.names
    if saved:
        _check_embedding_types(src.schema, source)
    written_by = src.meta.get("policy")
    if written_by != pol.id:
        raise DataError(f"{source} was decided by policy {written_by!r}, not {pol.id!r}: pass the policy that wrote "
                        "it (--policy), so that each review item holds the decision that was made")
    if encoder_id is None:
        raise DataError(f"{source} names no encoder_id: not a safeclip audit output")
    wanted = None if actions is None else set(actions)
    cache_dir = Path(cache) if cache is not None else default_cache_dir()
    comp = compile_without_model(pol, encoder_id, cache_dir, model, pretrained, device)
    cols = [c for c in _SOURCE_ROWS + ("action",) + _SAVED_EMBEDDING_COLUMNS if c in src.schema.names]
    db = None if saved else EmbeddingCache(cache_dir, encoder_id, readonly=True)
    try:
        base = 0
        for batch in parquet_batches(src.file, cols, f"audit output {src.name}", batch_rows=max(1, chunk_rows)):
            part = pa.Table.from_batches([batch])
            row_actions = _column(part, "action")
            keep = [i for i, a in enumerate(row_actions) if wanted is None or a in wanted]
            if keep:
                part = part.take(pa.array(keep, pa.int64()))
                embs, times = _row_embeddings(part, db, comp.scorer.dim, encoder_id)
                yield from _redecided(comp, part, embs, times, [base + i for i in keep],
                                      [row_actions[i] for i in keep])
            base += batch.num_rows
    finally:
        if db is not None:
            db.close()


def _redecided(comp: CompiledPolicy, part: pa.Table, embs: Sequence[Source], times: Sequence[tuple[float, ...]],
               rows: Sequence[int], actions: Sequence[str]) -> Iterator[AuditDecision]:
    c = {k: _column(part, k) for k in ("path", "sha256", "error", "duration_s", "sampling")}
    ok = [i for i, (e, _, _, _) in enumerate(embs) if c["error"][i] is None and e is not None]
    verdicts = None
    if ok:
        verdicts = comp.decide(_views_of(embs, times, ok, comp.scorer.dim), evidence=True, record=False)
    k_of = {i: k for k, i in enumerate(ok)}
    for i in range(part.num_rows):
        decision = embedding = None
        error = c["error"][i] or embs[i][2]
        k = k_of.get(i)
        if k is not None and verdicts is not None:
            if verdicts.problems[k] is not None:
                error = _unusable_text(verdicts.problems[k])  # type: ignore[arg-type]
            else:
                n_views = len(embs[i][0])  # type: ignore[arg-type]
                decision = verdicts.decision(
                    k, sha256=c["sha256"][i], source=c["path"][i], frame_indices=tuple(range(n_views)),
                    encoder_id=comp.scorer.encoder_id, duration_s=_float(c["duration_s"][i]),
                    sampling=c["sampling"][i] if isinstance(c["sampling"][i], str) else None)
                embedding = embs[i][0][int(verdicts.view[k])]  # type: ignore[index]
        yield AuditDecision(rows[i], c["path"][i], c["sha256"][i], str(actions[i]), decision, embedding, error)


@dataclass(frozen=True)
class _Source:
    """A previous audit output, checked and opened for reading a batch at a time (:func:`_read_source`)."""

    name: str
    file: Any  # pyarrow.parquet.ParquetFile
    schema: pa.Schema
    meta: Mapping[str, Any]
    paths: list[str | None]  # each row's path (for check_output)

    @property
    def cwd(self) -> str:
        cwd = self.meta.get("cwd")
        return cwd if isinstance(cwd, str) and cwd else os.getcwd()

    @property
    def dim(self) -> int | None:
        dim = self.meta.get("dim")
        return dim if isinstance(dim, int) and not isinstance(dim, bool) and dim > 0 else None


_SOURCE_TEXT = ("path", "sha256", "error", "encoder_id")
_NUMBERS = ("bytes", "width", "height", "frames")
_SOURCE_ROWS = ("path", "path_bytes", "sha256", "error", "bytes", "width", "height", "frames",  # _decided_rows'
                "duration_s", "sampling")


def _read_source(source: str | os.PathLike[str], encoder_id: str | None,
                 need_embeddings: bool) -> tuple[_Source, str | None]:
    """A previous audit output and its encoder_id (checked against ``encoder_id`` when given). Read once, a batch
    at a time, to check it: column types, one encoder, each input once (a repeated row is a
    :class:`~safeclip.errors.DataError`, so a file of millions of copies of one row stops at the second)."""
    import pyarrow as pa

    pf = open_parquet(source, DataError, "audit output")
    schema = pf.schema_arrow
    names = schema.names
    check_output_columns(schema, source, _SOURCE_TEXT, "audit output")
    if need_embeddings:
        if "embedding" not in names:
            raise DataError(f"{source} has no embedding column: audit with --save-embeddings, or use --from with "
                            "the cache")
        _check_embedding_types(schema, source)
    meta = read_meta(schema)
    numbers = [f for f in output_schema((), {}, False) if f.name in _NUMBERS and f.name in names]
    for f in numbers:
        typ = schema.field(f.name).type
        if not (pa.types.is_integer(typ) or pa.types.is_null(typ)):
            raise DataError(f"{source}: column {f.name!r} is {typ}, not a whole number: not a safeclip audit output")
    cols = ["path", "sha256", "encoder_id"] + (["path_bytes"] if "path_bytes" in names else [])
    cols += [f.name for f in numbers]
    ids: set[str] = set()
    paths: list[str | None] = []
    seen_names: set[Any] = set()
    seen_shas: set[str] = set()
    for batch in parquet_batches(pf, cols, f"audit output {source}"):
        c = {name: batch.column(k) for k, name in enumerate(cols)}
        for f in numbers:  # each value fits the output's column (a width of -2**62 does not)
            try:
                c[f.name].cast(f.type)
            except (pa.ArrowException, ValueError) as e:
                raise DataError(f"{source}: column {f.name!r} holds a value out of range for {f.type} "
                                f"({' '.join(str(e).split())[:120]}): not a safeclip audit output") from e
        ids.update(v for v in c["encoder_id"].unique().to_pylist() if v)
        if len(ids) > 1:
            raise EncoderMismatchError(f"{source} mixes encoders {sorted(ids)[:5]}")
        texts = c["path"].to_pylist()
        raw = c["path_bytes"].to_pylist() if "path_bytes" in c else [None] * batch.num_rows
        for r, (text, b, sha) in enumerate(zip(texts, raw, c["sha256"].to_pylist())):
            key, seen = (b if isinstance(b, bytes) else text), seen_names
            if key is None:  # a whole-cache re-score: its rows are its sha256s
                key, seen = sha, seen_shas
            if key is None:
                continue
            if key in seen:
                what = "path" if seen is seen_names else "sha256"
                raise DataError(f"{source}: row {len(paths) + r} repeats the {what} {str(key)[:200]!r} of an "
                                "earlier row: an audit output holds one row per input (write each input once)")
            seen.add(key)
        paths.extend(texts)
    src_id = meta.get("encoder_id") if isinstance(meta.get("encoder_id"), str) else None
    src_id = src_id or (next(iter(ids)) if len(ids) == 1 else None)
    if encoder_id is not None and src_id is not None and encoder_id != src_id:
        raise EncoderMismatchError(f"{source} was audited with {src_id!r}, not {encoder_id!r}")
    return _Source(os.fspath(source), pf, schema, meta, paths), encoder_id or src_id


def _check_embedding_types(schema: pa.Schema, source: Any) -> None:
    """The saved embedding columns' types: a list of per-frame lists of floats (or the previous flat list of
    floats), and a list of texts; anything else is not an audit output's (one :class:`DataError`)."""
    import pyarrow as pa

    def listish(t: pa.DataType) -> bool:
        return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)

    typ = schema.field("embedding").type
    inner = typ.value_type if listish(typ) else None
    ok = pa.types.is_null(typ) or (inner is not None and (
        pa.types.is_floating(inner) or pa.types.is_integer(inner) or pa.types.is_null(inner)
        or (listish(inner) and (pa.types.is_floating(inner.value_type) or pa.types.is_integer(inner.value_type)
                                or pa.types.is_null(inner.value_type)))))
    if not ok:
        raise DataError(f"{source}: column 'embedding' is {typ}, not a list of per-frame lists of floats: not an "
                        "audit output written with --save-embeddings")
    if "embedding_backgrounds" in schema.names:
        typ = schema.field("embedding_backgrounds").type
        if not (pa.types.is_null(typ) or (listish(typ) and (pa.types.is_string(typ.value_type)
                                                            or pa.types.is_large_string(typ.value_type)
                                                            or pa.types.is_null(typ.value_type)))):
            raise DataError(f"{source}: column 'embedding_backgrounds' is {typ}, not a list of texts: not an audit "
                            "output written with --save-embeddings")


def _only_cached_encoder(cache_dir: Path) -> str:
    known = list_cached_encoders(cache_dir)
    if len(known) != 1:
        raise CacheError(f"say which encoder's embeddings to re-score (--encoder-id); the cache {cache_dir} holds "
                         f"{known or 'none'}")
    return known[0]


def _rescore_cache(comp: CompiledPolicy, db: EmbeddingCache, schema: pa.Schema,
                   chunk_rows: int) -> tuple[pa.Table, int]:
    """One row per image in the cache (``path`` null), scanned in insertion order; an entry that cannot decide
    (damaged, non-finite, not normalised) is an error row."""
    import pyarrow as pa

    pieces, hits = [], 0
    for chunk in _prefetched(db.scan(chunk_rows)):  # SQLite reads the next chunk while numpy scores
        damaged = tuple(("DamagedCacheEntry", chunk.damaged[i]) if i in chunk.damaged else None
                        for i in range(len(chunk))) if chunk.damaged else ()
        views = Views(chunk.embeddings, chunk.offsets, damaged, chunk.pdq, chunk.pdq_quality)
        if chunk.clips:
            views = views.with_times([chunk.clips[i][0] if i in chunk.clips else () for i in range(len(chunk))])
        verdicts = comp.decide(views, record=False)
        bad = {i: _unusable_text(p) for i, p in enumerate(verdicts.problems) if p is not None}
        hits += len(chunk) - len(bad)
        bgs = chunk.backgrounds or [()] * len(chunk)
        background = [_view(bgs[i], int(verdicts.view[i])) for i in range(len(chunk))]
        n = len(chunk)
        hashes: list[str | None] = [None] * n
        quality = np.full(n, NO_HASH, np.int64)
        if chunk.pdq is not None and chunk.pdq_quality is not None:
            chosen = np.asarray(verdicts.rows, np.int64)
            quality = chunk.pdq_quality[chosen].astype(np.int64)
            for i in np.flatnonzero(quality >= 0):
                hashes[i] = chunk.pdq[chosen[i]].tobytes().hex()
        matches: list[str | None] = ([json.dumps([m.to_dict() for m in verdicts.matches(i)]) for i in range(n)]
                                     if verdicts.scores.banks is not None else ["[]"] * n)
        pieces.append(_columns_table(schema, comp, chunk.sha256, chunk.nbytes, chunk.width, chunk.height,
                                     chunk.n_frames, verdicts.actions, verdicts.probabilities, background, bad,
                                     (hashes, quality, matches), _clip_columns(verdicts, chunk.clips, bad)))
    return (pa.concat_tables(pieces) if pieces else schema.empty_table()), hits


def _clip_columns(verdicts: Verdicts, clips: Mapping[int, tuple[tuple[float, ...], float | None, str | None]],
                  bad: Mapping[int, str]) -> dict[str, list[Any]]:
    """The video columns of a chunk's rows: a clip's frames scored, deciding time, duration, sampling and segments;
    nulls for a still and for an image that did not decide."""
    n = len(verdicts)
    cols: dict[str, list[Any]] = {k: [None] * n for k in _VIDEO_COLUMNS}
    for i, (_, duration, text) in clips.items():
        if i in bad or verdicts.frames is None or int(verdicts.frames[i]) == 0:
            continue
        cols["frames_scored"][i], cols["time_s"][i] = int(verdicts.frames[i]), verdicts.time(i)
        cols["duration_s"][i], cols["sampling"][i] = duration, text
        cols["segments"][i] = [g.to_dict() for g in verdicts.segments_of(i)]
    return cols


def _view(backgrounds: Sequence[str | None], k: int) -> str | None:
    return backgrounds[k] if 0 <= k < len(backgrounds) else None


_REMEDY = {"InvalidEmbedding": "; it never decides (audit the file again)",
           "DamagedCacheEntry": "; audit the file again"}


def _unusable_text(problem: tuple[str, str]) -> str:
    """The ``error`` of a row the decision object could not decide."""
    kind, why = problem
    return f"{kind}: {why}{_REMEDY.get(kind, '')}"


def _rescore_table(comp: CompiledPolicy, src: _Source, schema: pa.Schema, db: EmbeddingCache | None,
                   chunk_rows: int) -> tuple[pa.Table, int]:
    """The rows of a previous audit, re-decided a batch at a time: embeddings from ``db`` by sha256, else from
    its embedding column."""
    import pyarrow as pa

    dim = src.dim or comp.scorer.dim
    wanted = _SOURCE_ROWS + (_SAVED_EMBEDDING_COLUMNS if db is None else ())
    cols = [c for c in wanted if c in src.schema.names]
    pieces, hits = [], 0
    for batch in parquet_batches(src.file, cols, f"audit output {src.name}", batch_rows=max(1, chunk_rows)):
        part = pa.Table.from_batches([batch])
        embs, times = _row_embeddings(part, db, dim, comp.scorer.encoder_id)
        piece, n_hits = _decided_rows(comp, part, embs, schema, save_emb=db is None, times=times)
        hits += n_hits
        pieces.append(piece)
    return (pa.concat_tables(pieces) if pieces else schema.empty_table()), hits


_SAVED_EMBEDDING_COLUMNS = ("embedding", "embedding_backgrounds", "embedding_pdq", "embedding_pdq_quality",
                            "embedding_times", "pdq", "pdq_quality")


def _row_embeddings(part: pa.Table, db: EmbeddingCache | None, dim: int,
                    encoder_id: str) -> tuple[list[Source], list[tuple[float, ...]]]:
    """Each row's embeddings and clip frame times: from ``db`` by sha256, else from the saved embedding columns."""
    if db is None:
        embs = _embedding_column(part, dim)
        return embs, _saved_times(part, embs)
    return _cached_embeddings(part, db, encoder_id)


def _views_of(embs: Sequence[Source], times: Sequence[tuple[float, ...]] | None, ok: Sequence[int],
              dim: int) -> Views:
    """The views of rows ``ok``: their embeddings, PDQ hashes and, where a row is a clip, frame times."""
    views = Views.of([embs[i][0] for i in ok], dim).with_pdq([embs[i][3] for i in ok])
    if times is not None and any(times[i] for i in ok):
        views = views.with_times([times[i] for i in ok])
    return views


Hashes = tuple[np.ndarray, np.ndarray] | None
Source = tuple[np.ndarray | None, Sequence[str | None], str | None, Hashes]
"""One row's embeddings ``(F, D)``, the background of each, or why there are none (an error text), and the PDQ
hash ``(F, 32)`` and quality ``(F,)`` of each (None where they were not recorded)."""


def _embedding_column(table: pa.Table, dim: int) -> list[Source]:
    """The saved embeddings of each row, in either layout (per-frame lists, or the previous flat list of frames x D
    floats); every malformed row (null, empty, a length that is not frames x D) is an error of its own."""
    import pyarrow as pa

    col = table.column("embedding").combine_chunks()
    inner = getattr(col.type, "value_type", None)  # (a null column has none: no row has an embedding)
    flat = not (inner is not None and (pa.types.is_list(inner) or pa.types.is_fixed_size_list(inner)
                                       or pa.types.is_large_list(inner)))
    bgs = (table.column("embedding_backgrounds").to_pylist() if "embedding_backgrounds" in table.column_names
           else [None] * table.num_rows)
    per_view = [_column(table, k) for k in ("embedding_pdq", "embedding_pdq_quality", "pdq", "pdq_quality")]
    out: list[Source] = []
    for i, value in enumerate(col.to_pylist()):
        if value is None:
            out.append((None, (), "NoEmbedding: this row has no saved embedding (audit with --save-embeddings)",
                        None))
            continue
        try:
            frames = [value] if flat else value
            if flat:
                if not value or len(value) % dim:
                    raise ValueError(f"{len(value)} floats, not a whole number of {dim}-d frames")
                arr = np.asarray(value, np.float32).reshape(-1, dim)
            else:
                if not frames:
                    raise ValueError("no frames")
                bad = [len(f) for f in frames if f is None or len(f) != dim]
                if bad or any(f is None for f in frames):
                    raise ValueError(f"frames of {sorted(set(map(str, bad)))} floats, not {dim}")
                arr = np.asarray(frames, np.float32)
        except (ValueError, TypeError) as e:
            out.append((None, (), f"InvalidEmbedding: malformed saved embedding ({e})", None))
            continue
        row_bgs = bgs[i] or ()
        codes, qualities, one, one_q = (c[i] for c in per_view)
        if codes is None and len(arr) == 1 and one is not None:  # an output without per-view hashes: one view
            codes, qualities = [one], [one_q]
        out.append((arr, tuple(row_bgs) if len(row_bgs) == len(arr) else (), None,
                    _saved_hashes(codes, qualities, len(arr))))
    return out


def _saved_times(table: pa.Table, embs: Sequence[Source]) -> list[tuple[float, ...]]:
    """Each row's saved clip frame times (``embedding_times``), ``()`` where none (a still) or malformed (then its
    frames decide untimed: the worst frame, never less strict)."""
    out: list[tuple[float, ...]] = []
    for t, (e, *_) in zip(_column(table, "embedding_times"), embs):
        ok = (isinstance(t, list) and e is not None and len(t) == len(e)
              and all(isinstance(x, float) and np.isfinite(x) for x in t))
        out.append(tuple(t) if ok else ())  # type: ignore[arg-type]
    return out


def _saved_hashes(codes: Any, qualities: Any, rows: int) -> Hashes:
    """The saved PDQ hashes of one row's ``rows`` views (hex texts, null where none was computed, and their
    qualities), or None where they are missing or malformed (then it cannot be matched against a PDQ bank)."""
    if not isinstance(codes, list) or not isinstance(qualities, list) or len(codes) != rows or len(qualities) != rows:
        return None
    out = np.zeros((rows, 32), np.uint8)
    quality = np.full(rows, NO_HASH, np.int64)
    for k, (h, q) in enumerate(zip(codes, qualities)):
        if h is None:
            continue
        try:
            raw = bytes.fromhex(h) if isinstance(h, str) else b""
        except ValueError:
            return None
        if len(raw) != 32 or not isinstance(q, int) or not 0 <= q <= 100:
            return None
        out[k], quality[k] = np.frombuffer(raw, np.uint8), q
    return out, quality


def _cached_embeddings(part: pa.Table, db: EmbeddingCache,
                       encoder_id: str) -> tuple[list[Source], list[tuple[float, ...]]]:
    """Each row's embeddings from the cache by sha256, and its frame times (a clip's; ``()`` for a still)."""
    shas, errors = part.column("sha256").to_pylist(), part.column("error").to_pylist()
    valid = [isinstance(s, str) and len(s) == 64 and all(ch in _HEX for ch in s.lower()) for s in shas]
    found = db.get_many([s.lower() for s, ok, err in zip(shas, valid, errors) if ok and err is None])
    out: list[Source] = []
    times: list[tuple[float, ...]] = []
    for s, ok, err in zip(shas, valid, errors):
        hit = found.get(s.lower()) if ok and err is None else None
        times.append(hit.times if hit is not None else ())
        if err is not None:
            out.append((None, (), err, None))
        elif not ok:
            why = f"InvalidSha256: {str(s)[:80]!r} is not a sha256 (64 hex digits); audit the file again"
            out.append((None, (), why, None))
        elif hit is not None:
            hashes = None if hit.pdq is None or hit.pdq_quality is None else (hit.pdq, hit.pdq_quality)
            out.append((hit.embeddings, hit.backgrounds, None, hashes))
        else:
            why = f"EmbeddingNotCached: no embedding for sha256 {s} under encoder {encoder_id!r}; audit this file again"
            out.append((None, (), why, None))
    return out, times


_HEX = frozenset("0123456789abcdef")
_VIDEO_COLUMNS = ("frames_scored", "time_s", "duration_s", "sampling", "segments")


def _decided_rows(comp: CompiledPolicy, part: pa.Table, embs: Sequence[Source], schema: pa.Schema,
                  save_emb: bool, times: Sequence[tuple[float, ...]] | None = None) -> tuple[pa.Table, int]:
    """Re-decide one slice of a previous audit's rows; its error rows stay error rows, and so does every row
    without usable embeddings (each one its own: no row ever takes another's decision). ``times``: per row, a
    clip's frame times (from the cache), so that it is decided as a clip, with its segments."""
    c = {k: _column(part, k) for k in ("path", "sha256", "error", "bytes", "width", "height", "frames",
                                       "duration_s", "sampling")}
    categories = comp.policy.category_names
    rows = Rows(len(categories), save_emb)
    errors: dict[int, str] = {}
    ok: list[int] = []
    for i, (e, _, why, _) in enumerate(embs):
        if c["error"][i] is not None or e is None:  # an error row of the source stays one, with its own error
            errors[i] = c["error"][i] or why or "no embedding"
        else:
            ok.append(i)
    decided: dict[int, tuple[int, np.ndarray, str | None, int, str]] = {}
    clips: dict[int, tuple[int, float | None, str]] = {}
    if ok:
        verdicts = comp.decide(_views_of(embs, times, ok, comp.scorer.dim), record=False)
        for k, i in enumerate(ok):
            problem = verdicts.problems[k]
            if problem is not None:
                errors[i] = _unusable_text(problem)
            else:
                view = int(verdicts.view[k])
                decided[i] = (int(verdicts.actions[k]), verdicts.probabilities[k], _view(embs[i][1], view), view,
                              json.dumps([m.to_dict() for m in verdicts.matches(k)]))
                if verdicts.frames is not None and int(verdicts.frames[k]) > 0:
                    clips[i] = (int(verdicts.frames[k]), verdicts.time(k),
                                json.dumps([g.to_dict() for g in verdicts.segments_of(k)]))
    for i in range(part.num_rows):
        action = probs_i = background = None
        chosen: int | None = None
        matches: str | None = None
        if i in decided:
            code, probs_i, background, chosen, matches = decided[i]
            action = ACTIONS[code]
        hashes = embs[i][3]
        frames_scored, time_s, segments = clips.get(i, (None, None, None))
        rows.add(c["path"][i], c["sha256"][i], _int(c["bytes"][i]), _int(c["width"][i]), _int(c["height"][i]),
                 _int(c["frames"][i]), action, probs_i, errors.get(i), embs[i][0] if i in decided else None,
                 background=background, emb_backgrounds=embs[i][1], pdq=None if hashes is None else hashes[0],
                 pdq_quality=None if hashes is None else hashes[1], view=chosen, matches=matches,
                 frames_scored=frames_scored, time_s=time_s, duration_s=_float(c["duration_s"][i]),
                 sampling=c["sampling"][i] if isinstance(c["sampling"][i], str) else None, segments=segments,
                 emb_times=times[i] if times is not None else ())
    return rows.table(schema, categories, comp.scorer.encoder_id, comp.policy.id), len(decided)


def _column(t: pa.Table, name: str) -> list[Any]:
    if name not in t.column_names:
        return [None] * t.num_rows
    values = t.column(name).to_pylist()
    if name == "path" and "path_bytes" in t.column_names:  # the exact name, where it is not UTF-8
        raw = t.column("path_bytes").to_pylist()
        values = [os.fsdecode(b) if isinstance(b, bytes) else v for v, b in zip(values, raw)]
    if name in ("path", "sha256", "error"):
        return [v if v is None or isinstance(v, str) else str(v) for v in values]
    return values


def _int(v: Any) -> int | None:
    try:
        return None if v is None else int(v)
    except (TypeError, ValueError):
        return None


def _float(v: Any) -> float | None:
    """A finite number of a source column, else None."""
    try:
        f = None if v is None or isinstance(v, bool) else float(v)
    except (TypeError, ValueError):
        return None
    return f if f is not None and np.isfinite(f) else None


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


def _columns_table(schema: pa.Schema, comp: CompiledPolicy, shas: Sequence[str], nbytes: np.ndarray,
                   width: np.ndarray, height: np.ndarray, frames: np.ndarray, codes: np.ndarray,
                   probs: np.ndarray, background: Sequence[str | None], bad: dict[int, str],
                   hashes: tuple[list[str | None], np.ndarray, list[str | None]],
                   video: Mapping[str, list[Any]] | None = None) -> pa.Table:
    """A table of rows without paths, built straight from column arrays (the whole-cache fast path); the images
    in ``bad`` are error rows (action ``error``, no probabilities, ``error`` from ``bad``). ``hashes``: per image,
    the deciding view's PDQ hash (hex, or None), its quality (NO_HASH: none) and the bank matches (JSON)."""
    import pyarrow as pa

    n = len(shas)
    codes = codes.astype(np.int32)
    valid = np.ones(n, bool)
    if bad:
        idx = np.fromiter(bad, np.int64, len(bad))
        codes[idx] = len(ACTIONS)
        valid[idx] = False
        background = [None if i in bad else b for i, b in enumerate(background)]
    pdq, quality, matches = hashes
    has = np.asarray(quality) >= 0
    if bad:
        has[idx] = False
        pdq = [None if i in bad else h for i, h in enumerate(pdq)]
        matches = [None if i in bad else m for i, m in enumerate(matches)]
    actions = pa.DictionaryArray.from_arrays(pa.array(codes), pa.array([*ACTIONS, ERROR_ACTION]))
    cols: dict[str, Any] = {
        "path": pa.nulls(n, pa.string()),
        "path_bytes": pa.nulls(n, pa.binary()),
        "sha256": pa.array(shas, pa.string()),
        "bytes": pa.array(nbytes, pa.int64()),
        "width": pa.array(width, pa.int32()),
        "height": pa.array(height, pa.int32()),
        "frames": pa.array(frames, pa.int32()),
        "background": pa.array(background, pa.string()),
        "action": actions.cast(pa.string()),
        "error": pa.array([bad.get(i) for i in range(n)], pa.string()) if bad else pa.nulls(n, pa.string()),
        "encoder_id": pa.array([comp.scorer.encoder_id] * n, pa.string()),
        "policy": pa.array([comp.policy.id] * n, pa.string()),
        "pdq": pa.array(pdq, pa.string()),
        "pdq_quality": pa.array(np.asarray(quality, np.int16), pa.int16(), mask=~has),
        "matches": pa.array(matches, pa.string()),
    }
    for j, name in enumerate(comp.policy.category_names):
        cols[f"p_{name}"] = pa.array(np.ascontiguousarray(probs[:, j]), pa.float32(), mask=~valid)
    for f in schema:  # a clip's columns (nulls for stills)
        if f.name in _VIDEO_COLUMNS:
            cols[f.name] = pa.array(video[f.name], f.type) if video else pa.nulls(n, f.type)
    return pa.Table.from_arrays([cols[f.name] for f in schema], schema=schema)
