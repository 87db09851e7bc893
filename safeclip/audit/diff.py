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
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DataError
from .summary import ERROR_ACTION
from .writer import read_meta

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa

__all__ = ["diff"]


_COLUMNS = {"key": "string", "action_a": "string", "action_b": "string", "category": "string", "p_a": "float32",
            "p_b": "float32", "delta": "float32"}
_TEXT_COLUMNS = ("path", "sha256", "action", "error")


def diff(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> pa.Table:
    """The inputs whose action differs between two audit/rescore outputs.

    Rows are matched as the module docstring says. Columns: ``key, action_a, action_b, category, p_a, p_b, delta``:
    ``category`` is the category whose own action changed (its probability crossed one of its thresholds; the one
    that moved most when several did), else the category whose probability moved most; none when no probability
    moved. An error row's action reads ``"error"``, an input missing on one side ``"missing"``. A file that is not
    an audit or rescore output, or whose columns have the wrong types, raises :class:`~safeclip.errors.DataError`.

    >>> diff("default.parquet", "strict.parquet").to_pandas()   # doctest: +SKIP
    """
    import pyarrow as pa

    ta, tb = _read(a), _read(b)
    cats = [c for c in ta.column_names if c.startswith("p_") and c in tb.column_names]
    thr_a, thr_b = _thresholds(ta, cats), _thresholds(tb, cats)
    use_path = ta.column("path").null_count < ta.num_rows and tb.column("path").null_count < tb.num_rows
    key = "path" if use_path else "sha256"
    ka, kb = _keys(ta, key), _keys(tb, key)
    if key == "path" and not set(ka) & set(kb):
        sa, sb = _keys(ta, "sha256"), _keys(tb, "sha256")
        if set(sa) & set(sb):
            key, ka, kb = "sha256", sa, sb
    ia, acts_a, pa_ = _index(ta, ka, cats)
    ib, acts_b, pb_ = _index(tb, kb, cats)
    shared = len(set(ia) & set(ib))
    out: dict[str, list[Any]] = {k: [] for k in _COLUMNS}
    for k in list(ia) + [k for k in ib if k not in ia]:
        i, j = ia.get(k), ib.get(k)
        act_a = acts_a[i] if i is not None else "missing"
        act_b = acts_b[j] if j is not None else "missing"
        if act_a == act_b:
            continue
        cat = pa_v = pb_v = delta = None
        if i is not None and j is not None and cats:
            m = _largest_change(pa_[i], pb_[j], thr_a, thr_b)
            if m is not None:
                cat, pa_v, pb_v, delta = cats[m][2:], float(pa_[i, m]), float(pb_[j, m]), float(pb_[j, m] - pa_[i, m])
        label = _label(ta, i) if i is not None else _label(tb, j)  # type: ignore[arg-type]
        for name, v in zip(out, (label if key == "path" else k, act_a, act_b, cat, pa_v, pb_v, delta)):
            out[name].append(v)
    return pa.table({name: pa.array(out[name], getattr(pa, t)()) for name, t in _COLUMNS.items()},
                    metadata={b"safeclip.key": key.encode(), b"safeclip.shared": str(shared).encode()})


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


def _thresholds(t: pa.Table, cats: list[str]) -> np.ndarray | None:
    """``(len(cats), 2)`` flag/block thresholds from an output's metadata (+inf: never fires), or None."""
    thr = read_meta(t.schema).get("thresholds")
    if not isinstance(thr, Mapping):
        return None
    out = np.full((len(cats), 2), np.inf)
    for k, c in enumerate(cats):
        pair = thr.get(c[2:])
        if not isinstance(pair, list) or len(pair) != 2:
            return None
        for m, v in enumerate(pair):
            if isinstance(v, (int, float)):
                out[k, m] = float(v)
    return out


def _read(src: str | os.PathLike[str]) -> pa.Table:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not os.path.exists(src):
        raise DataError(f"cannot read {src}: no such file")
    try:
        t = pq.read_table(src)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"cannot read {src}: {e}") from e
    if not {"path", "sha256", "action", "error"} <= set(t.column_names):
        raise DataError(f"{src} is not a safeclip audit or rescore output (it lacks the path, sha256, action and "
                        "error columns)")
    for name in t.column_names:
        typ = t.schema.field(name).type
        if name in _TEXT_COLUMNS and not (pa.types.is_string(typ) or pa.types.is_large_string(typ)
                                          or pa.types.is_null(typ)):
            raise DataError(f"{src}: column {name!r} is {typ}, not text: not a safeclip audit or rescore output")
        if name.startswith("p_") and not (pa.types.is_floating(typ) or pa.types.is_null(typ)):
            raise DataError(f"{src}: column {name!r} is {typ}, not a probability: not a safeclip audit or rescore "
                            "output")
    return t


def _keys(t: pa.Table, key: str) -> list[str | None]:
    """Each row's key: its sha256, or its path made absolute against the folder its audit ran in."""
    if key == "sha256":
        return [None if s is None else s.lower() for s in t.column("sha256").to_pylist()]
    cwd = read_meta(t.schema).get("cwd")
    base = cwd if isinstance(cwd, str) else os.getcwd()
    raw = t.column("path_bytes").to_pylist() if "path_bytes" in t.column_names else [None] * t.num_rows
    out: list[str | None] = []
    for p, b in zip(t.column("path").to_pylist(), raw):
        name = os.fsdecode(b) if isinstance(b, bytes) else p
        out.append(None if name is None else os.path.normpath(os.path.join(base, name)))
    return out


def _label(t: pa.Table, i: int) -> str | None:
    return t.column("path").slice(i, 1).to_pylist()[0]


def _index(t: pa.Table, keys: list[str | None], cats: list[str]) -> tuple[dict[str, int], list[str], np.ndarray]:
    """Row of each key, each row's action (``"error"`` for error rows) and its ``(n, len(cats))`` probabilities."""
    acts = [(ERROR_ACTION if e is not None else (x or ERROR_ACTION))
            for x, e in zip(t.column("action").to_pylist(), t.column("error").to_pylist())]
    probs = np.column_stack([t.column(c).to_numpy(zero_copy_only=False).astype(np.float32) for c in cats]) \
        if cats else np.zeros((t.num_rows, 0), np.float32)
    index: dict[str, int] = {}
    for i, k in enumerate(keys):
        if k is not None:
            index.setdefault(k, i)
    return index, acts, probs
