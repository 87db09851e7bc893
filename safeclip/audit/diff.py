"""Comparing two audit/rescore outputs: :func:`diff` lists the inputs whose action changed.

Rows are matched by path, normalised: a relative path is resolved against the folder the audit ran in (its
metadata's ``cwd``; the current folder for outputs that do not record it), so the same files audited with relative
and absolute paths match. When no path matches but contents do (the files were moved or copied), rows are matched
by ``sha256`` instead; outputs without paths (whole-cache re-scores) are always matched by ``sha256``. The result's
metadata says which key was used (``safeclip.key``) and how many inputs the two outputs share (``safeclip.shared``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DataError
from .reader import check_output_columns, open_parquet, parquet_batches
from .summary import ERROR_ACTION
from .writer import read_meta

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa

__all__ = ["diff"]


_COLUMNS = {"key": "string", "action_a": "string", "action_b": "string", "category": "string", "p_a": "float32",
            "p_b": "float32", "delta": "float32", "change": "string"}
_TEXT_COLUMNS = ("path", "sha256", "action", "error")


def diff(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> pa.Table:
    """The inputs whose action differs between two audit/rescore outputs.

    Rows are matched as the module docstring says. Columns: ``key, action_a, action_b, category, p_a, p_b, delta,
    change``: ``category`` is the category whose own action changed (its probability crossed one of its thresholds,
    or one of its thresholds moved past it; the one that moved most when several did), else the category whose
    probability moved most; none when no probability moved. ``change`` says it in words: the probability's move
    (only when it moved: ``sexual 0.256 -> 0.412 (+0.156)``, else ``sexual 0.256``) and each of the category's
    thresholds that differ between the two outputs' policies (``flag 0.300 -> 0.200``; ``off``: never fires). An
    error row's action reads ``"error"``, an input missing on one side ``"missing"``. A file that is not an audit or
    rescore output, or whose columns have the wrong types, raises :class:`~safeclip.errors.DataError`.
    Each output is read a record batch at a time, keeping the first row of each input (a repeated row adds
    nothing); its row count is limited (:func:`~safeclip.audit.reader.max_rows`).

    >>> diff("default.parquet", "strict.parquet").to_pandas()   # doctest: +SKIP
    """
    import pyarrow as pa

    fa, fb = _Output.open(a), _Output.open(b)
    cats = [c for c in fa.schema.names if c.startswith("p_") and c in fb.schema.names]
    thr_a, thr_b = _thresholds(fa.meta, cats), _thresholds(fb.meta, cats)
    sa, sb = _scan(fa, cats), _scan(fb, cats)
    key = "path" if sa.by_path and sb.by_path else "sha256"
    ia, ib = (sa.by_path, sb.by_path) if key == "path" else (sa.by_sha, sb.by_sha)
    if key == "path" and not ia.keys() & ib.keys() and sa.by_sha.keys() & sb.by_sha.keys():
        key, ia, ib = "sha256", sa.by_sha, sb.by_sha
    shared = len(ia.keys() & ib.keys())
    out: dict[str, list[Any]] = {k: [] for k in _COLUMNS}
    for k in list(ia) + [k for k in ib if k not in ia]:
        i, j = ia.get(k), ib.get(k)
        act_a = sa.actions[i] if i is not None else "missing"
        act_b = sb.actions[j] if j is not None else "missing"
        if act_a == act_b:
            continue
        cat = pa_v = pb_v = delta = change = None
        if i is not None and j is not None and cats:
            m = _largest_change(sa.probs[i], sb.probs[j], thr_a, thr_b)
            if m is not None:
                x, y = float(sa.probs[i, m]), float(sb.probs[j, m])
                cat, pa_v, pb_v, delta = cats[m][2:], x, y, y - x
                change = _change_text(cat, x, y, None if thr_a is None else thr_a[m],
                                      None if thr_b is None else thr_b[m])
        label = sa.labels[i] if i is not None else sb.labels[j]  # type: ignore[index]
        for name, v in zip(out, (label if key == "path" else k, act_a, act_b, cat, pa_v, pb_v, delta, change)):
            out[name].append(v)
    return pa.table({name: pa.array(out[name], getattr(pa, t)()) for name, t in _COLUMNS.items()},
                    metadata={b"safeclip.key": key.encode(), b"safeclip.shared": str(shared).encode()})


_LEVELS = ("flag", "block")


def _change_text(cat: str, x: float, y: float, thr_a: np.ndarray | None, thr_b: np.ndarray | None) -> str:
    """``category p_a -> p_b (delta)`` (just ``category p`` when it did not move), then the category's thresholds
    that differ (``flag 0.300 -> 0.200``)."""
    if x == y or (np.isnan(x) and np.isnan(y)):
        words = [f"{cat} {x:.3f}"]
    else:
        digits = 3  # enough digits to show the move: a crossing by 1e-5 must not read 0.300 -> 0.300
        while digits < 9 and np.isfinite(x) and np.isfinite(y) and round(x, digits) == round(y, digits):
            digits += 1
        words = [f"{cat} {x:.{digits}f} -> {y:.{digits}f} ({y - x:+.{digits}f})"]
    if thr_a is not None and thr_b is not None:
        for level, old, new in zip(_LEVELS, thr_a, thr_b):
            if old != new:
                words.append(f"{level} {_threshold_text(old)} -> {_threshold_text(new)}")
    return ", ".join(words)


def _threshold_text(v: float) -> str:
    return f"{v:.3f}" if np.isfinite(v) else "off"


def _largest_change(pa_: np.ndarray, pb_: np.ndarray, thr_a: np.ndarray | None,
                    thr_b: np.ndarray | None) -> int | None:
    """The category whose own action changed (largest move among them), else the largest non-zero move."""
    with np.errstate(invalid="ignore"):
        d = np.abs(pb_.astype(np.float64) - pa_.astype(np.float64))
    d = np.where(np.isnan(d), -1.0, d)
    if thr_a is not None and thr_b is not None:
        changed = _levels(pa_, thr_a) != _levels(pb_, thr_b)
        if changed.any():
            return int(np.flatnonzero(changed)[np.argmax(d[changed])])
    m = int(np.argmax(d))
    return m if d[m] > 0 else None


def _levels(p: np.ndarray, thr: np.ndarray) -> np.ndarray:
    """Per-category action codes of one row, as :func:`~safeclip.decide.decide_codes` gives them."""
    with np.errstate(invalid="ignore"):
        return (p >= thr[:, 0]).astype(np.int8) + (p >= thr[:, 1]).astype(np.int8)


def _thresholds(meta: Mapping[str, Any], cats: list[str]) -> np.ndarray | None:
    """``(len(cats), 2)`` flag/block thresholds from an output's metadata (+inf: never fires), or None."""
    thr = meta.get("thresholds")
    if not isinstance(thr, Mapping):
        return None
    out = np.full((len(cats), 2), np.inf)
    for k, c in enumerate(cats):
        pair = thr.get(c[2:])
        if not isinstance(pair, list) or len(pair) != 2:
            return None
        for m, v in enumerate(pair):
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[k, m] = float(v)
    return out


@dataclass(frozen=True)
class _Output:
    """An audit/rescore output opened for reading: its file, schema and metadata (checked, nothing read yet)."""

    src: str
    file: Any  # pyarrow.parquet.ParquetFile
    schema: pa.Schema
    meta: Mapping[str, Any]

    @classmethod
    def open(cls, src: str | os.PathLike[str]) -> _Output:
        import pyarrow as pa

        pf = open_parquet(src)
        schema = pf.schema_arrow
        check_output_columns(schema, src, _TEXT_COLUMNS, "audit or rescore output")
        for name in schema.names:
            typ = schema.field(name).type
            if name.startswith("p_") and not (pa.types.is_floating(typ) or pa.types.is_null(typ)):
                raise DataError(f"{src}: column {name!r} is {typ}, not a probability: not a safeclip audit or "
                                "rescore output")
        return cls(os.fspath(src), pf, schema, read_meta(schema))


@dataclass
class _Rows:
    """The rows of one output that can be matched: the first row of each path and of each sha256 (row ids into
    ``labels``, ``actions`` and ``probs``)."""

    by_path: dict[str, int]
    by_sha: dict[str, int]
    labels: list[str | None]
    actions: list[str]
    probs: np.ndarray


def _scan(o: _Output, cats: list[str]) -> _Rows:
    """Read ``o`` a batch at a time, keeping only the rows that are the first of their path or sha256."""
    import pyarrow as pa

    cwd = o.meta.get("cwd")
    base = cwd if isinstance(cwd, str) else os.getcwd()
    raw_col = "path_bytes" in o.schema.names
    cols = ["path", "sha256", "action", "error", *cats] + (["path_bytes"] if raw_col else [])
    by_path: dict[str, int] = {}
    by_sha: dict[str, int] = {}
    labels: list[str | None] = []
    actions: list[str] = []
    probs: list[np.ndarray] = []
    for batch in parquet_batches(o.file, cols, o.src):
        c = {name: batch.column(k) for k, name in enumerate(cols)}
        first = pa.array(_first_rows([c[k] for k in ("path", "sha256", "path_bytes") if k in c]), pa.int64())
        paths, shas = c["path"].take(first).to_pylist(), c["sha256"].take(first).to_pylist()
        raw = c["path_bytes"].take(first).to_pylist() if raw_col else [None] * len(first)
        keep = []
        for r, p, b, s in zip(first.to_pylist(), paths, raw, shas):
            name = os.fsdecode(b) if isinstance(b, bytes) else p
            pk = None if name is None else os.path.normpath(os.path.join(base, name))
            sk = None if s is None else s.lower()
            new = (pk is not None and pk not in by_path) or (sk is not None and sk not in by_sha)
            if not new:
                continue  # a row of an input already seen (or of none): the first one counts
            n = len(labels) + len(keep)
            if pk is not None:
                by_path.setdefault(pk, n)
            if sk is not None:
                by_sha.setdefault(sk, n)
            keep.append(r)
        if not keep:
            continue
        idx = pa.array(keep, pa.int64())
        acts, errs = c["action"].take(idx).to_pylist(), c["error"].take(idx).to_pylist()
        labels.extend(c["path"].take(idx).to_pylist())
        actions.extend(ERROR_ACTION if e is not None else (x or ERROR_ACTION) for x, e in zip(acts, errs))
        probs.append(np.column_stack([c[name].take(idx).cast(pa.float32(), safe=False)
                                      .to_numpy(zero_copy_only=False).astype(np.float32) for name in cats])
                     if cats else np.zeros((len(keep), 0), np.float32))
    return _Rows(by_path, by_sha, labels, actions,
                 np.concatenate(probs) if probs else np.zeros((0, len(cats)), np.float32))


def _first_rows(columns: list[pa.Array]) -> np.ndarray:
    """The rows of a batch whose values (in all ``columns``) no earlier row of the batch has, in order: a copy of
    an earlier row cannot be the first of its input, so it is skipped without a look."""
    n = len(columns[0])
    codes = [col.dictionary_encode().indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64) + 1
             for col in columns]  # each row's dictionary code in each column (null: 0)
    if (n + 1) ** len(codes) < 2**63:  # mixed into one int64 per row: a 1-d unique is much faster
        key = np.zeros(n, np.int64)
        for c in codes:
            key = key * (n + 1) + c
        _, first = np.unique(key, return_index=True)
    else:
        _, first = np.unique(np.stack(codes, axis=1), axis=0, return_index=True)
    return np.sort(first)
