"""Re-deciding cached embeddings under another policy, without the model: :func:`rescore`.

The embeddings come from the embedding cache (by sha256: the rows of an earlier audit, or every image cached for an
encoder) or from an audit written with ``save_embeddings=True``; the prompt embeddings from the prompt cache. The
scoring is the batch unit's (:func:`safeclip.audit.mapper.decide_images`), so a re-score equals a fresh audit under
the new policy.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._files import write_parquet_atomic
from ..cache import EmbeddingCache, list_cached_encoders
from ..decide import ACTIONS
from ..embed import PromptCache, default_cache_dir, resolve_encoder_args
from ..errors import CacheError, ConfigError, DataError, EncoderMismatchError, ModelLoadError
from ..policy import Policy, load_policy
from .mapper import decide_images
from .summary import AuditSummary, Tally, summarize
from .writer import FORMAT_VERSION, Rows, output_schema, policy_fingerprint, read_meta

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa

    from .._compiled import CompiledPolicy

__all__ = ["compile_without_model", "rescore"]


def compile_without_model(policy: Policy, encoder_id: str, cache_dir: Path, model: str | None,
                          pretrained: str | None, device: str | None) -> CompiledPolicy:
    """Compile ``policy`` from cached prompt embeddings. Only when some are missing and the caller named weights
    (``model``/``pretrained``, completed from the policy's ``encoder:`` by
    :func:`~safeclip.embed.resolve_encoder_args`) is the model loaded, to embed them."""
    from .._compiled import CompiledPolicy

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
) -> AuditSummary:
    """Re-decide cached embeddings under ``policy`` without the model; write the rows to ``out`` (Parquet).

    Sources: ``from_audit`` (a previous audit's output: the same rows and paths, new decisions; embeddings from the
    cache by sha256), ``embeddings`` (an audit output written with ``save_embeddings=True``; no cache needed), or
    neither: every image in the cache of ``encoder_id`` (one row per sha256, ``path`` null). ``encoder_id`` defaults
    to the source's, or to the only encoder in the cache. Prompt embeddings come from the prompt cache; if the
    policy has prompts never embedded under this encoder, ``model``/``pretrained`` (optional) load it just for
    them, else :class:`~safeclip.errors.ModelLoadError` explains what to do. A source that is not an audit output
    raises :class:`~safeclip.errors.DataError`.

    >>> s = rescore(out="strict.parquet", policy="strict", from_audit="audit.parquet")   # doctest: +SKIP
    """
    t_start = time.monotonic()
    if from_audit is not None and embeddings is not None:
        raise ConfigError("give either from_audit (embeddings from the cache) or embeddings, not both")
    pol = load_policy(policy)
    cache_dir = Path(cache) if cache is not None else default_cache_dir()
    save_emb = embeddings is not None
    source = from_audit if from_audit is not None else embeddings
    src_table = None
    if source is not None:
        src_table, encoder_id = _read_source(source, encoder_id, save_emb)
    if encoder_id is None:
        encoder_id = _only_cached_encoder(cache_dir)

    comp = compile_without_model(pol, encoder_id, cache_dir, model, pretrained, device)
    categories = pol.category_names
    meta = {"format": FORMAT_VERSION, "kind": "rescore", "encoder_id": encoder_id, "policy": pol.id,
            "policy_fingerprint": policy_fingerprint(pol), "categories": list(categories)}
    schema = output_schema(categories, meta, save_emb)
    out = Path(out)
    if src_table is None:
        with EmbeddingCache(cache_dir, encoder_id, readonly=True) as db:
            table, hits = _rescore_cache(comp, db, schema, chunk_rows)
    elif save_emb:
        table, hits = _rescore_table(comp, src_table, schema, None, chunk_rows, source)
    else:
        with EmbeddingCache(cache_dir, encoder_id, readonly=True) as db:
            table, hits = _rescore_table(comp, src_table, schema, db, chunk_rows, source)
    write_parquet_atomic(table.replace_schema_metadata(schema.metadata), out)
    summary = summarize(table, Tally(cache_hits=hits), out=str(out), processed=table.num_rows, resumed=0,
                        started_at=t_start, startup_seconds=0.0, encoder_id=encoder_id, policy=pol.id)
    if verbose:
        print(f"safeclip rescore: {summary.format()}", file=sys.stderr)
    return summary


def _read_source(source: str | os.PathLike[str], encoder_id: str | None,
                 need_embeddings: bool) -> tuple[pa.Table, str | None]:
    """A previous audit output and its encoder_id (checked against ``encoder_id`` when given)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(source)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"cannot read audit output {source}: {e}") from e
    missing_cols = {"path", "sha256", "error", "encoder_id"} - set(table.column_names)
    if missing_cols:
        raise DataError(f"{source} is not a safeclip audit output (missing columns {sorted(missing_cols)})")
    ids = {v for v in table.column("encoder_id").unique().to_pylist() if v}
    src_id = read_meta(table.schema).get("encoder_id") or (next(iter(ids)) if len(ids) == 1 else None)
    if len(ids) > 1:
        raise EncoderMismatchError(f"{source} mixes encoders {sorted(ids)}")
    if encoder_id is not None and src_id is not None and encoder_id != src_id:
        raise EncoderMismatchError(f"{source} was audited with {src_id!r}, not {encoder_id!r}")
    if need_embeddings and "embedding" not in table.column_names:
        raise DataError(f"{source} has no embedding column: audit with --save-embeddings, or use --from with the "
                        "cache")
    return table, encoder_id or src_id


def _only_cached_encoder(cache_dir: Path) -> str:
    known = list_cached_encoders(cache_dir)
    if len(known) != 1:
        raise CacheError(f"say which encoder's embeddings to re-score (--encoder-id); the cache {cache_dir} holds "
                         f"{known or 'none'}")
    return known[0]


def _rescore_cache(comp: CompiledPolicy, db: EmbeddingCache, schema: pa.Schema,
                   chunk_rows: int) -> tuple[pa.Table, int]:
    """One row per image in the cache (``path`` null), scanned in insertion order."""
    import pyarrow as pa

    pieces, hits = [], 0
    for chunk in _prefetched(db.scan(chunk_rows)):  # SQLite reads the next chunk while numpy scores
        codes, probs = decide_images(comp, chunk.embeddings, chunk.offsets)
        hits += len(chunk)
        pieces.append(_columns_table(schema, comp, chunk.sha256, chunk.nbytes, chunk.width, chunk.height,
                                     chunk.n_frames, codes, probs))
    return (pa.concat_tables(pieces) if pieces else schema.empty_table()), hits


def _rescore_table(comp: CompiledPolicy, src: pa.Table, schema: pa.Schema, db: EmbeddingCache | None,
                   chunk_rows: int, source: Any) -> tuple[pa.Table, int]:
    """The rows of a previous audit, re-decided: embeddings from ``db`` by sha256, else from its embedding column."""
    import pyarrow as pa

    dim = int(read_meta(src.schema).get("dim") or 0)
    if db is None and not dim:
        raise DataError(f"{source}: no embedding dimension recorded in its metadata")
    pieces, hits = [], 0
    for start in range(0, src.num_rows, chunk_rows):
        part = src.slice(start, chunk_rows)
        embs = _embedding_column(part, dim) if db is None else _cached_embeddings(part, db)
        piece, n_hits = _decided_rows(comp, part, embs, schema, save_emb=db is None)
        hits += n_hits
        pieces.append(piece)
    return (pa.concat_tables(pieces) if pieces else schema.empty_table()), hits


def _embedding_column(table: pa.Table, dim: int) -> list[np.ndarray | None]:
    col = table.column("embedding").combine_chunks()
    out: list[np.ndarray | None] = []
    offsets = col.offsets.to_numpy()
    values = col.values.to_numpy(zero_copy_only=False)
    valid = col.is_valid().to_numpy(zero_copy_only=False)
    for i in range(len(col)):
        out.append(values[offsets[i]:offsets[i + 1]].reshape(-1, dim) if valid[i] else None)
    return out


def _cached_embeddings(part: pa.Table, db: EmbeddingCache) -> list[np.ndarray | None]:
    shas, errors = part.column("sha256").to_pylist(), part.column("error").to_pylist()
    found = db.get_many([s for s, err in zip(shas, errors) if s and err is None])
    return [found[s].embeddings if (s in found and err is None) else None for s, err in zip(shas, errors)]


def _decided_rows(comp: CompiledPolicy, part: pa.Table, embs: Sequence[np.ndarray | None], schema: pa.Schema,
                  save_emb: bool) -> tuple[pa.Table, int]:
    """Re-decide one slice of a previous audit's rows; its error rows stay error rows."""
    c = {k: part.column(k).to_pylist() for k in ("path", "sha256", "error")}
    for k in ("bytes", "width", "height", "frames"):
        c[k] = part.column(k).to_pylist() if k in part.column_names else [None] * part.num_rows
    ok = [i for i, (e, err) in enumerate(zip(embs, c["error"])) if e is not None and err is None]
    categories = comp.policy.category_names
    rows = Rows(len(categories), save_emb)
    decided: dict[int, tuple[int, np.ndarray]] = {}
    if ok:
        sel = [embs[i] for i in ok]
        offsets = np.zeros(len(sel) + 1, np.int64)
        np.cumsum([len(e) for e in sel], out=offsets[1:])  # type: ignore[arg-type]
        codes, probs = decide_images(comp, np.concatenate(sel), offsets)  # type: ignore[arg-type]
        decided = {i: (int(codes[k]), probs[k]) for k, i in enumerate(ok)}
    for i in range(part.num_rows):
        err = c["error"][i]
        action, probs_i = None, None
        if i in decided:
            code, probs_i = decided[i]
            action = ACTIONS[code]
        elif err is None:
            err = (f"EmbeddingNotCached: no embedding for sha256 {c['sha256'][i]} under encoder "
                   f"{comp.scorer.encoder_id!r}; audit this file again")
        rows.add(c["path"][i], c["sha256"][i], c["bytes"][i], c["width"][i], c["height"][i], c["frames"][i],
                 action, probs_i, err, embs[i])
    return rows.table(schema, categories, comp.scorer.encoder_id, comp.policy.id), len(decided)


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
                   probs: np.ndarray) -> pa.Table:
    """A table of decided rows without paths, built straight from column arrays (the whole-cache fast path)."""
    import pyarrow as pa

    n = len(shas)
    actions = pa.DictionaryArray.from_arrays(pa.array(codes.astype(np.int32)), pa.array(list(ACTIONS)))
    cols: dict[str, Any] = {
        "path": pa.nulls(n, pa.string()),
        "sha256": pa.array(shas, pa.string()),
        "bytes": pa.array(nbytes, pa.int64()),
        "width": pa.array(width, pa.int32()),
        "height": pa.array(height, pa.int32()),
        "frames": pa.array(frames, pa.int32()),
        "action": actions.cast(pa.string()),
        "error": pa.nulls(n, pa.string()),
        "encoder_id": pa.array([comp.scorer.encoder_id] * n, pa.string()),
        "policy": pa.array([comp.policy.id] * n, pa.string()),
    }
    for j, name in enumerate(comp.policy.category_names):
        cols[f"p_{name}"] = pa.array(np.ascontiguousarray(probs[:, j]), pa.float32())
    return pa.Table.from_arrays([cols[f.name] for f in schema], schema=schema)
