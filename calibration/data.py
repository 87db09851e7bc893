"""Labelled data: L2-normalised embeddings in one embedding space, and per-category 0/1 labels.

:func:`load_labeled` reads a labelled file (or an in-memory table) into a :class:`LabeledData`; build one directly
from arrays in a notebook. The format:

A Parquet (``.parquet``/``.pq``) or CSV (``.csv``) file, or a pyarrow Table / pandas DataFrame, one row per image,
with

- an ``embedding`` column: L2-normalised CLIP image embeddings (Parquet ``list<float>``; CSV a JSON list or
  space-separated floats). A ``safeclip audit --save-embeddings`` output works as is (an animation's row holds all
  its sampled frames; the first is used, as :meth:`~safeclip.moderator.Moderator.embed` does). Their embedding space
  is ``encoder_id=`` (``--encoder-id``), else an ``encoder_id`` column (audit outputs have one), else the encoder of
  ``model``/``pretrained``. Prompt embeddings come from the prompt cache; the model is loaded only when a prompt is
  missing there, and only if ``model``/``pretrained`` name it;
- or a ``path`` column of image files (relative paths are relative to the data file's folder, or to the working
  folder for a table), embedded with ``model``/``pretrained`` (else the policy's ``encoder:``, else the default)
  through the embedding cache (``cache``), by :func:`safeclip.audit.audit`, so a second run, or a run over images
  an audit has seen, reads the cache instead of running the model. Files that cannot be decoded are left out, with
  a :class:`DataWarning`. When both columns exist, ``embedding`` is used.

Labels, for each category ``C``:

1. a column named ``C`` holding 0/1 (also true/false, yes/no) labels it: one column per category, so a row can be
   positive for several categories; an empty cell means "not labelled for C" and the row is left out of C's data;
2. else the ``label_column`` (``--label-column``, default ``label``): holding 0/1, it labels the one category asked
   for (asking for several is an error); holding names, each row is the name of one policy category or ``none``,
   and the row is positive for ``C`` exactly when it says ``C`` (a single-label scheme: use rule 1 for multi-label
   data). A name that is neither a policy category nor ``none`` is an error (typos would silently become
   negatives).

Without ``categories``, every policy category the data labels is loaded: its own column, or named in the label
column (a 0/1 label column labels the policy's only category, else the categories must be named).

Row numbers, in messages and in :attr:`LabeledData.rows`, count the data file's rows from 0 (a CSV header is not a
row). Malformed data raises :class:`~safeclip.errors.DataError` naming the file, the row and the column.

>>> import numpy as np
>>> x = np.eye(3, 8, dtype=np.float32)
>>> d = LabeledData(x, {"drugs": [1, 0, -1]}, encoder_id="demo")
>>> len(d), d.categories, d.labelled("drugs").tolist()
(3, ('drugs',), [0, 1])
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from safeclip.artifacts import sha256_file
from safeclip.errors import ConfigError, DataError, EncoderMismatchError, ModelLoadError
from safeclip.policy import Policy, load_policy

from ._validate import CalibrationWarning
from .split import identical_groups

if TYPE_CHECKING:  # pragma: no cover
    from safeclip.embed import Encoder

__all__ = [
    "EMBEDDING_COLUMN",
    "ENCODER_COLUMN",
    "NONE_LABEL",
    "PATH_COLUMN",
    "DataWarning",
    "LabeledData",
    "LabeledSource",
    "check_categories",
    "load_labeled",
    "prompt_source",
]

EMBEDDING_COLUMN = "embedding"
PATH_COLUMN = "path"
ENCODER_COLUMN = "encoder_id"
NONE_LABEL = "none"
_TRUE = {"1", "true", "yes"}
_FALSE = {"0", "false", "no"}
_NORM_TOLERANCE = 1e-2  # |norm - 1| above this: not an L2-normalised embedding

log = logging.getLogger(__name__)

LabeledSource = str | os.PathLike[str] | Any
"""What :func:`load_labeled` reads: a Parquet or CSV file, or a pyarrow Table / pandas DataFrame."""


class DataWarning(CalibrationWarning):
    """Rows of the labelled data were left out (no embedding, or an image that could not be embedded)."""


def _warn(message: str, notes: list[str]) -> None:
    notes.append(message)
    warnings.warn(message, DataWarning, stacklevel=3)


# ============================================================================================== LabeledData
@dataclass(frozen=True, eq=False)
class LabeledData:
    """Labelled embeddings in one embedding space.

    ``embeddings``: ``(n, D)`` float32 unit rows (checked: finite, L2-normalised). ``labels``: per category an
    ``(n,)`` int8 array, 1 positive, 0 negative, -1 not labelled. ``rows``: the source row of each embedding
    (default ``0..n-1``); ``groups``: identical embeddings share a group (computed when not given), so a split keeps
    copies of one image together. ``source``, ``n_rows`` (rows in the source, embedded or not) and ``sha256`` (of
    the data file, else of the embeddings and labels) describe where the data came from; ``warnings`` what was left
    out. ``embed_texts`` embeds prompt texts in this space (the encoder that embedded the paths, or the prompt cache
    with a lazily loaded model); ``None``: the workflow reads the default prompt cache.
    """

    embeddings: np.ndarray
    labels: Mapping[str, np.ndarray]
    encoder_id: str
    rows: np.ndarray | None = None
    groups: np.ndarray | None = None
    source: Path | None = None
    n_rows: int | None = None
    sha256: str | None = None
    warnings: tuple[str, ...] = ()
    embed_texts: Callable[[list[str]], np.ndarray] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        where = str(self.source) if self.source is not None else "embeddings"
        x = np.asarray(self.embeddings)
        if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
            raise DataError(f"{where}: embeddings must be a non-empty (n, D) array, got shape {x.shape}")
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise DataError(f"{where}: embeddings must be numbers, got dtype {x.dtype}")
        n = x.shape[0]
        rows = np.arange(n, dtype=np.int64) if self.rows is None else np.asarray(self.rows, np.int64)
        if rows.shape != (n,):
            raise DataError(f"{where}: {rows.size} row numbers for {n} embeddings")
        if not isinstance(self.encoder_id, str) or not self.encoder_id:
            raise DataError(f"{where}: encoder_id must name the embedding space (a non-empty string)")
        labels: dict[str, np.ndarray] = {}
        for cat, v in dict(self.labels).items():
            arr = np.asarray(v)
            if arr.shape != (n,):
                raise DataError(f"{where}: labels for {cat!r} have shape {arr.shape}, expected ({n},)")
            if arr.dtype == bool:
                arr = arr.astype(np.int8)
            if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)) or not np.all(
                    (arr == 1) | (arr == 0) | (arr == -1)):
                raise DataError(f"{where}: labels for {cat!r} must hold 1 (positive), 0 (negative) or -1 (not "
                                "labelled)")
            labels[str(cat)] = arr.astype(np.int8)
        x = _normalised(np.asarray(x, np.float64 if x.dtype != np.float32 else np.float32), where, rows)
        groups = identical_groups(x) if self.groups is None else np.asarray(self.groups)
        if groups.shape != (n,):
            raise DataError(f"{where}: {groups.size} groups for {n} embeddings")
        sha = self.sha256 or _arrays_sha256(x, labels)
        for name, value in (("embeddings", x), ("labels", MappingProxyType(labels)), ("rows", rows), ("groups", groups),
                            ("n_rows", n if self.n_rows is None else int(self.n_rows)), ("sha256", sha),
                            ("warnings", tuple(self.warnings))):
            object.__setattr__(self, name, value)

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def categories(self) -> tuple[str, ...]:
        return tuple(self.labels)

    @property
    def name(self) -> str:
        """The data file's name, or ``"in-memory data"``."""
        return self.source.name if self.source is not None else "in-memory data"

    def labelled(self, category: str) -> np.ndarray:
        """Indices of the rows labelled (0 or 1) for ``category``."""
        if category not in self.labels:
            raise DataError(f"{self.source or 'the data'}: no labels for {category!r} (it labels "
                            f"{list(self.labels)})")
        return np.flatnonzero(self.labels[category] >= 0)

    def take(self, idx: np.ndarray) -> LabeledData:
        """The rows ``idx`` (indices into this data), e.g. a calibration's held-out rows for
        :func:`~safeclip.calibration.evaluate_policy`."""
        i = np.asarray(idx, np.intp)
        return LabeledData(self.embeddings[i], {c: v[i] for c, v in self.labels.items()}, self.encoder_id,
                           rows=self.rows[i], groups=self.groups[i], source=self.source, n_rows=self.n_rows,
                           embed_texts=self.embed_texts)


def _arrays_sha256(x: np.ndarray, labels: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    h.update(memoryview(np.ascontiguousarray(x, np.float32)).cast("B"))
    for c in sorted(labels):
        h.update(c.encode() + b"\0")
        h.update(memoryview(np.ascontiguousarray(labels[c], np.int8)).cast("B"))
    return h.hexdigest()


def _normalised(x: np.ndarray, where: str, rows: np.ndarray) -> np.ndarray:
    """``x`` as float32 unit rows; refuses rows that were not unit-norm already (``rows``: their row numbers)."""
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if bad.size:
        raise DataError(f"{where}: row {int(rows[bad[0]])}: the embedding holds NaN or infinity")
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    off = np.flatnonzero(np.abs(norms - 1.0) > _NORM_TOLERANCE)
    if off.size:
        raise DataError(
            f"{where}: row {int(rows[off[0]])}: embedding norm {norms[off[0]]:.4g}; {off.size} row(s) are not "
            "L2-normalised CLIP image embeddings (safeclip's embeddings and audit outputs are)")
    return (x / norms[:, None]).astype(np.float32)


# ================================================================================================ the table
@dataclass
class _Table:
    """A labelled file or table read into memory: its columns as Python lists (labels, paths) or Arrow."""

    where: str  # the file, for messages
    source: Path | None
    n: int
    names: list[str]
    columns: dict[str, Any]  # Arrow: pyarrow ChunkedArray; CSV: list[str]
    meta_encoder_id: str | None = None
    csv: bool = False

    def values(self, name: str) -> list[Any]:
        col = self.columns[name]
        return list(col) if self.csv else col.to_pylist()

    @property
    def base(self) -> Path:
        """The folder relative paths are read against."""
        return self.source.resolve().parent if self.source is not None else Path.cwd()


def _arrow_table(table: Any, where: str, source: Path | None) -> _Table:
    meta_id = None
    raw = (table.schema.metadata or {}).get(b"safeclip")
    if raw:
        try:
            meta_id = json.loads(raw).get("encoder_id")
        except (ValueError, AttributeError):
            meta_id = None
    return _Table(where, source, table.num_rows, list(table.column_names),
                  {n: table.column(n) for n in table.column_names}, meta_id if isinstance(meta_id, str) else None)


def _read_table(source: LabeledSource) -> _Table:
    """Read Parquet, CSV (every cell a string) or an in-memory table; an audit output's encoder_id comes along."""
    if not isinstance(source, (str, os.PathLike)):
        import pyarrow as pa

        where = "the labelled table"
        try:
            if isinstance(source, pa.Table):
                table = source
            elif type(source).__module__.partition(".")[0] == "pandas":
                table = pa.Table.from_pandas(source, preserve_index=False)
            else:
                table = pa.table(source)
        except (TypeError, ValueError, pa.ArrowException) as e:
            raise DataError(f"cannot read {type(source).__name__} as a table: {e}") from e
        return _arrow_table(table, where, None)
    src = Path(source)
    suffix = src.suffix.lower()
    if not src.is_file():
        raise DataError(f"--data {source}: no such file")
    if suffix in {".parquet", ".pq"}:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(src)
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"cannot read {src} as Parquet: {e}") from e
        return _arrow_table(table, str(src), src)
    if suffix == ".csv":
        try:
            with open(src, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                names = list(reader.fieldnames or [])
                cols: dict[str, list[str]] = {n: [] for n in names}
                for row in reader:
                    for n in names:
                        v = row.get(n)
                        cols[n].append("" if v is None else v)
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise DataError(f"cannot read {src} as CSV: {e}") from e
        n_rows = len(cols[names[0]]) if names else 0
        return _Table(str(src), src, n_rows, names, cols, csv=True)
    raise DataError(f"--data {source}: expected a .parquet or .csv file")


# =========================================================================================== the embeddings
def _frames_to_rows(lengths: np.ndarray, flat: np.ndarray, valid: np.ndarray, where: str,
                    rows: np.ndarray | None = None) -> np.ndarray:
    """First ``D``-vector of each valid row of a list column, float64.

    ``D`` is the most common row length (ties: the shortest); a row must hold whole ``D``-d embeddings (an
    animation's several frames), and the first that does not is named (``rows``: the row numbers to name).
    """
    ok = np.flatnonzero(valid)
    if ok.size == 0:
        return np.empty((0, 0))
    values, counts = np.unique(lengths[ok], return_counts=True)
    dim = int(values[np.argmax(counts)])  # np.unique sorts: argmax takes the shortest of the most common
    bad = ok[lengths[ok] % dim != 0] if dim else ok[lengths[ok] == 0]
    if bad.size:
        row = int(bad[0] if rows is None else rows[bad[0]])
        raise DataError(f"{where}: row {row}: embedding of length {int(lengths[bad[0]])}, most rows have {dim}; "
                        f"every row must hold whole {dim}-d embeddings")
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])[ok]
    return flat[starts[:, None] + np.arange(dim)[None, :]].astype(np.float64)


def _is_list(t: Any) -> bool:
    import pyarrow as pa

    return bool(pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t))


def _arrow_lists(col: Any, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(lengths, flat values, valid mask)`` of an Arrow list-of-floats column (nulls have length 0)."""
    import pyarrow as pa

    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    t = arr.type
    if _is_list(t) and _is_list(t.value_type):  # per-frame lists (safeclip audit --save-embeddings): concatenated
        frames = arr.flatten()
        counts = arr.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        per_frame = frames.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        ends = np.concatenate([[0], np.cumsum(per_frame)])
        rows = np.concatenate([[0], np.cumsum(counts)])
        arr = pa.LargeListArray.from_arrays(pa.array(ends[rows], pa.int64()), frames.flatten(),  # 64-bit offsets
                                            mask=arr.is_null())
        t = arr.type
    if not _is_list(t) or not (pa.types.is_floating(t.value_type) or pa.types.is_integer(t.value_type)):
        raise DataError(f"{where}: the {EMBEDDING_COLUMN!r} column must be a list of floats, not {t}")
    valid = arr.is_valid().to_numpy(zero_copy_only=False).astype(bool)
    if pa.types.is_fixed_size_list(t):
        lengths = np.where(valid, t.list_size, 0).astype(np.int64)
    else:
        lengths = arr.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = arr.flatten().to_numpy(zero_copy_only=False)  # the values of valid rows, in order
    return lengths, flat, valid


def _embedding_matrix(t: _Table) -> tuple[np.ndarray, np.ndarray]:
    """``(k, D)`` float64 embeddings of the rows that have one, and the ``(n,)`` mask of those rows (an audit
    output's error rows, or an empty CSV cell, have none). Multi-frame rows (animations) keep their first frame."""
    if t.csv:
        rows: list[np.ndarray] = []
        for i, s in enumerate(t.columns[EMBEDDING_COLUMN]):
            text = s.strip()
            if not text:
                rows.append(np.empty(0))
                continue
            try:
                vals = json.loads(text) if text.startswith("[") else [float(v) for v in text.replace(",", " ").split()]
                arr = np.asarray(vals, dtype=np.float64)
            except (ValueError, TypeError) as e:
                raise DataError(f"{t.where}: row {i}: cannot parse the embedding {text[:40]!r}: {e}") from e
            if arr.ndim != 1 or arr.size == 0:
                raise DataError(f"{t.where}: row {i}: the embedding must be a non-empty list of numbers")
            rows.append(arr)
        lengths = np.array([r.size for r in rows], np.int64)
        flat = np.concatenate(rows)
        valid = lengths > 0
    else:
        lengths, flat, valid = _arrow_lists(t.columns[EMBEDDING_COLUMN], t.where)
    if not valid.any():
        raise DataError(f"{t.where}: no row has an embedding")
    return _frames_to_rows(lengths, flat, valid, t.where), valid


def _data_encoder_id(t: _Table) -> str | None:
    ids: set[str] = set()
    if ENCODER_COLUMN in t.names:
        ids = {str(v) for v in t.values(ENCODER_COLUMN) if v not in (None, "")}
    if t.meta_encoder_id:
        ids.add(t.meta_encoder_id)
    if len(ids) > 1:
        raise EncoderMismatchError(f"{t.where} mixes embedding spaces: {sorted(ids)}")
    return next(iter(ids)) if ids else None


def _load_encoder(model: str | None, pretrained: str | None, device: str | None, cache: Path | None,
                  policy: Policy | None) -> Encoder:
    """The caller's model, else the policy's ``encoder:``, else the default (as the Moderator chooses)."""
    from safeclip.embed import Encoder, resolve_encoder_args

    model, pretrained, _ = resolve_encoder_args(model, pretrained, policy.encoder if policy else None)
    return Encoder(model, pretrained, device=device, cache_dir=cache)


def prompt_source(encoder_id: str, *, cache: str | os.PathLike[str] | None = None, model: str | None = None,
                  pretrained: str | None = None, device: str | None = None, policy: Policy | None = None,
                  ) -> Callable[[list[str]], np.ndarray]:
    """Prompt embeddings for ``encoder_id`` from the prompt cache, loading the model only for texts missing there
    and only when ``model``/``pretrained`` name it (it must then be the encoder of ``encoder_id``)."""
    from safeclip.embed import PromptCache, default_cache_dir

    cache_dir = Path(cache) if cache is not None else default_cache_dir()
    prompts = PromptCache(encoder_id, cache_dir)
    holder: dict[str, Encoder] = {}

    def embed_texts(texts: list[str]) -> np.ndarray:
        missing = prompts.missing(texts)
        if not missing:
            return prompts.get(texts)
        if "encoder" not in holder:
            if model is None and pretrained is None:
                raise ModelLoadError(
                    f"{len(missing)} prompt(s) have no cached embedding for encoder {encoder_id!r} in "
                    f"{cache_dir} (first: {missing[0]!r}); pass --model/--pretrained (the encoder that made "
                    "the embeddings) to embed them once, or --cache with the folder that has them")
            enc = _load_encoder(model, pretrained, device, cache_dir, policy)
            if enc.encoder_id != encoder_id:
                raise EncoderMismatchError(
                    f"--model/--pretrained load encoder {enc.encoder_id!r}, but the embeddings are from {encoder_id!r}")
            holder["encoder"] = enc
        return holder["encoder"].embed_texts(texts)

    return embed_texts


def _embed_paths(t: _Table, policy: Policy, encoder: Encoder, cache: Path | None, progress: bool | None,
                 notes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Embed the ``path`` column through the embedding cache (by way of :func:`safeclip.audit.audit`).

    Returns the ``(k, D)`` embeddings of the rows that could be embedded (first sampled frame) and the ``(n,)``
    mask of those rows.
    """
    import pyarrow.parquet as pq

    from safeclip.audit import audit

    raw = t.values(PATH_COLUMN)
    paths = [None if v in (None, "") else (str(v) if os.path.isabs(str(v)) else str(t.base / str(v))) for v in raw]
    unique = list(dict.fromkeys(p for p in paths if p is not None))
    if not unique:
        raise DataError(f"{t.where}: the {PATH_COLUMN!r} column names no files")
    with tempfile.TemporaryDirectory(prefix="safeclip-calibrate-") as tmp:
        out = Path(tmp) / "embeddings.parquet"
        summary = audit(unique, out=out, policy=policy, encoder=encoder, cache=cache, save_embeddings=True,
                        progress=progress, verbose=False)
        table = pq.read_table(out, columns=["path", "embedding", "error"])
    lengths, flat, valid = _arrow_lists(table.column("embedding"), "audit output")
    x = _frames_to_rows(lengths, flat, valid, "audit output")
    ok = np.flatnonzero(valid)
    found = {p: x[k] for k, p in enumerate(np.asarray(table.column("path").to_pylist(), object)[ok])}
    errors = {p: e or "not embedded" for p, e, v in zip(table.column("path").to_pylist(),
                                                         table.column("error").to_pylist(), valid) if not v}
    log.info("%d image(s) through the embedding cache: %d cache hit(s), %d embedded, %d error(s)",
             len(unique), summary.cache_hits, summary.embedded, summary.errors)
    keep = np.array([p is not None and p in found for p in paths], bool)
    dropped = np.flatnonzero(~keep)
    if dropped.size:
        i = int(dropped[0])
        why = "no path" if paths[i] is None else errors.get(paths[i], "not embedded")
        _warn(f"{dropped.size} of {t.n} row(s) have no embedding and are left out (first: row {i}: {paths[i]}: "
              f"{why})", notes)
    if not keep.any():
        raise DataError(f"{t.where}: none of the images could be embedded")
    return np.stack([found[p] for p, k in zip(paths, keep) if k]), keep


# ================================================================================================== labels
def _binary(v: Any) -> int | None:
    """0/1 for a binary-looking value, -1 for a missing one, None for anything else."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return -1
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, (int, float)):
        return int(v) if v in (0, 1) else None
    s = str(v).strip().lower()
    if s == "":
        return -1
    if s in _TRUE:
        return 1
    if s in _FALSE:
        return 0
    try:
        f = float(s)
    except ValueError:
        return None
    return int(f) if f in (0.0, 1.0) else None


def _labels(t: _Table, categories: Sequence[str], label_column: str, policy: Policy) -> dict[str, np.ndarray]:
    """Per category an ``(n,)`` int8 array: 1 positive, 0 negative, -1 not labelled (rules in the module doc)."""
    out: dict[str, np.ndarray] = {}
    from_label_column = [c for c in categories if c not in t.names]
    for c in categories:
        if c not in t.names:
            continue
        vals = t.values(c)
        lab = [_binary(v) for v in vals]
        bad = [i for i, v in enumerate(lab) if v is None]
        if bad:
            raise DataError(f"{t.where}: column {c!r}, row {bad[0]}: {vals[bad[0]]!r} is not a 0/1 label "
                            f"({len(bad)} such row(s))")
        out[c] = np.asarray(lab, np.int8)
    if not from_label_column:
        return out
    if label_column not in t.names:
        raise DataError(
            f"{t.where}: no labels for {from_label_column}: add a 0/1 column named after each category, or a "
            f"{label_column!r} column (--label-column) with category names or 'none' (columns: {t.names})")
    vals = t.values(label_column)
    binary = [_binary(v) for v in vals]
    if all(b is not None for b in binary):
        if len(from_label_column) != 1:
            raise DataError(
                f"{t.where}: column {label_column!r} holds 0/1 labels, which label one category, but "
                f"{from_label_column} need labels from it: give one 0/1 column per category (named after it), or "
                "put category names / 'none' in the label column")
        out[from_label_column[0]] = np.asarray(binary, np.int8)
        return out
    names = [None if (v is None or str(v).strip() == "") else str(v).strip() for v in vals]
    known = set(policy.category_names)
    unknown = sorted({s for s in names if s is not None and s not in known and s.lower() != NONE_LABEL})
    if unknown:
        first = next(i for i, s in enumerate(names) if s in unknown)
        raise DataError(
            f"{t.where}: column {label_column!r} holds {unknown[:5]}{' ...' if len(unknown) > 5 else ''}, which "
            f"are neither categories of policy {policy.id} ({sorted(known)}) nor {NONE_LABEL!r} (first: row "
            f"{first})")
    for c in from_label_column:
        out[c] = np.asarray([-1 if s is None else int(s == c) for s in names], np.int8)
    return out


def check_categories(policy: Policy, categories: Sequence[str]) -> list[str]:
    """``categories`` without repeats; a name the policy lacks is an error."""
    cats = list(dict.fromkeys(categories))
    unknown = [c for c in cats if c not in policy.category_names]
    if unknown:
        raise ConfigError(f"policy {policy.id} has no category {unknown} (it has {list(policy.category_names)})")
    return cats


def _labelled_categories(t: _Table, policy: Policy, label_column: str) -> list[str]:
    """Every policy category the data labels: its own column, or named in the label column (a 0/1 label column
    labels the policy's only category, else the categories must be named)."""
    cats = [c for c in policy.category_names if c in t.names]
    if label_column in t.names:
        vals = t.values(label_column)
        if all(_binary(v) is not None for v in vals):
            if len(policy.category_names) == 1:
                cats = list(policy.category_names)
            elif not cats:
                raise DataError(f"{t.where}: column {label_column!r} holds 0/1 labels for one category: "
                                "say which with --category")
        else:
            named = {str(v).strip() for v in vals if v is not None}
            cats += [c for c in policy.category_names if c in named and c not in cats]
    if not cats:
        raise DataError(f"{t.where}: no labels for any category of policy {policy.id}: add a 0/1 column named "
                        f"after a category, or a {label_column!r} column (columns: {t.names})")
    return cats


# ==================================================================================================== load
def load_labeled(
    source: LabeledSource,
    policy: str | os.PathLike[str] | Policy,
    categories: Sequence[str] | None = None,
    *,
    label_column: str = "label",
    encoder_id: str | None = None,
    encoder: Encoder | None = None,
    model: str | None = None,
    pretrained: str | None = None,
    device: str | None = None,
    cache: str | os.PathLike[str] | None = None,
    progress: bool | None = None,
) -> LabeledData:
    """Read labelled data (a file or a table, in the format of the module doc) for ``policy``'s ``categories``
    (default: every category the data labels).

    ``encoder``: an already loaded :class:`~safeclip.embed.Encoder`, used to embed a ``path`` column and the
    prompts (else ``model``/``pretrained``/``device``). ``cache``: the cache folder for embeddings and prompt
    embeddings (default ``$SAFECLIP_CACHE_DIR`` or ``~/.cache/safeclip``). ``progress``: a progress bar while
    images are embedded (default: when stderr is a terminal). Rows left out emit a :class:`DataWarning`.

    >>> data = load_labeled("labels.csv", "default", ["violence"], model="ViT-B-32")   # doctest: +SKIP
    >>> len(data), data.encoder_id                                                    # doctest: +SKIP
    (1200, 'ViT-B-32|laion2b_s34b_b79k|px:f1dc22a11b69')
    """
    pol = load_policy(policy)
    t = _read_table(source)
    cats = (check_categories(pol, categories) if categories is not None
            else _labelled_categories(t, pol, label_column))
    if t.n == 0:
        raise DataError(f"{t.where}: no rows")
    labels = _labels(t, cats, label_column, pol)
    cache_dir = Path(cache) if cache is not None else None
    notes: list[str] = []
    if EMBEDDING_COLUMN in t.names:
        x, keep = _embedding_matrix(t)
        if not keep.all():
            _warn(f"{int((~keep).sum())} of {t.n} row(s) have no embedding and are left out (first: row "
                  f"{int(np.flatnonzero(~keep)[0])})", notes)
        recorded = _data_encoder_id(t)
        if encoder_id and recorded not in (None, encoder_id):
            raise EncoderMismatchError(f"--encoder-id {encoder_id!r}, but {t.where} records {recorded!r}")
        space = encoder_id or recorded
        if encoder is not None and space not in (None, encoder.encoder_id):
            raise EncoderMismatchError(f"the encoder is {encoder.encoder_id!r}, but {t.where} records {space!r}")
        if space is None and encoder is None:
            if model is None and pretrained is None:
                raise DataError(
                    f"{t.where}: which embedding space are these embeddings in? Pass --encoder-id, add an "
                    f"{ENCODER_COLUMN!r} column, or name the encoder with --model/--pretrained")
            encoder = _load_encoder(model, pretrained, device, cache_dir, pol)
        space = space or encoder.encoder_id  # type: ignore[union-attr]
    elif PATH_COLUMN in t.names:
        encoder = encoder or _load_encoder(model, pretrained, device, cache_dir, pol)
        space = encoder.encoder_id
        if encoder_id and encoder_id != space:
            raise EncoderMismatchError(f"--encoder-id {encoder_id!r}, but the model is {space!r}")
        x, keep = _embed_paths(t, pol, encoder, cache_dir, progress, notes)
    else:
        raise DataError(f"{t.where}: needs an {EMBEDDING_COLUMN!r} or a {PATH_COLUMN!r} column "
                        f"(columns: {t.names})")
    embed_texts = encoder.embed_texts if encoder is not None else prompt_source(
        space, cache=cache_dir, model=model, pretrained=pretrained, device=device, policy=pol)
    return LabeledData(x, {c: v[keep] for c, v in labels.items()}, space, rows=np.flatnonzero(keep),
                       source=t.source, n_rows=t.n, sha256=sha256_file(t.source) if t.source else None,
                       warnings=tuple(notes), embed_texts=embed_texts)
