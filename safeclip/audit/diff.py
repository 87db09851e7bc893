"""Comparing two audit/rescore outputs: :func:`diff` lists the inputs whose action changed."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa

__all__ = ["diff"]


_COLUMNS = {"key": "string", "action_a": "string", "action_b": "string", "category": "string", "p_a": "float32",
            "p_b": "float32", "delta": "float32"}


def diff(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> pa.Table:
    """The inputs whose action differs between two audit/rescore outputs.

    Rows are matched by ``path`` (by ``sha256`` when the outputs have no paths, as whole-cache re-scores). Columns:
    ``key, action_a, action_b, category, p_a, p_b, delta``: the category whose probability moved most (among those
    both outputs have) and its move. An error row's action reads ``"error"``, an input missing on one side
    ``"missing"``. A file that is not an audit or rescore output raises :class:`~safeclip.errors.DataError`.

    >>> diff("default.parquet", "strict.parquet").to_pandas()   # doctest: +SKIP
    """
    import pyarrow as pa

    ta, tb = _read(a), _read(b)
    use_path = ta.column("path").null_count < ta.num_rows and tb.column("path").null_count < tb.num_rows
    key = "path" if use_path else "sha256"
    cats = [c for c in ta.column_names if c.startswith("p_") and c in tb.column_names]
    ia, acts_a, pa_ = _index(ta, key, cats)
    ib, acts_b, pb_ = _index(tb, key, cats)
    out: dict[str, list[Any]] = {k: [] for k in _COLUMNS}
    for k in list(ia) + [k for k in ib if k not in ia]:
        i, j = ia.get(k), ib.get(k)
        act_a = acts_a[i] if i is not None else "missing"
        act_b = acts_b[j] if j is not None else "missing"
        if act_a == act_b:
            continue
        cat = pa_v = pb_v = delta = None
        if i is not None and j is not None and cats:
            d = pb_[j] - pa_[i]
            absd = np.where(np.isnan(d), -1.0, np.abs(d))
            m = int(np.argmax(absd))
            if absd[m] >= 0:
                cat, pa_v, pb_v, delta = cats[m][2:], float(pa_[i, m]), float(pb_[j, m]), float(d[m])
        for name, v in zip(out, (k, act_a, act_b, cat, pa_v, pb_v, delta)):
            out[name].append(v)
    return pa.table({name: pa.array(out[name], getattr(pa, t)()) for name, t in _COLUMNS.items()},
                    metadata={b"safeclip.key": key.encode()})


def _read(src: str | os.PathLike[str]) -> pa.Table:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        t = pq.read_table(src)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"cannot read {src}: {e}") from e
    if not {"path", "sha256", "action", "error"} <= set(t.column_names):
        raise DataError(f"{src} is not a safeclip audit or rescore output (it lacks the path, sha256, action and "
                        "error columns)")
    return t


def _index(t: pa.Table, key: str, cats: list[str]) -> tuple[dict[str, int], list[str], np.ndarray]:
    """Row of each key, each row's action (``"error"`` for error rows) and its ``(n, len(cats))`` probabilities."""
    keys = t.column(key).to_pylist()
    acts = [("error" if e is not None else (x or "error"))
            for x, e in zip(t.column("action").to_pylist(), t.column("error").to_pylist())]
    probs = np.column_stack([t.column(c).to_numpy(zero_copy_only=False).astype(np.float32) for c in cats]) \
        if cats else np.zeros((t.num_rows, 0), np.float32)
    return {k: i for i, k in enumerate(keys) if k is not None}, acts, probs
