"""The grouped, stratified split: rows into disjoint parts with each part's class balance kept, and identical
embeddings (the same image twice) always in the same part, so no image is both fitted on and measured on.

>>> import numpy as np
>>> x = np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 0, 1, 2, 3]]      # every image twice
>>> y = np.array([1, 0, 1, 0, 1, 0, 1, 0])
>>> a, b = grouped_split(y, identical_groups(x), [0.5, 0.5], seed=0)
>>> sorted(set(identical_groups(x)[a]) & set(identical_groups(x)[b]))   # no image on both sides
[]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["grouped_split", "identical_groups"]


def identical_groups(x: np.ndarray) -> np.ndarray:
    """Row -> group id over the rows of a 2-D array; identical rows (the same image) share one."""
    x = np.ascontiguousarray(x)
    view = x.view(np.dtype((np.void, x.dtype.itemsize * x.shape[1]))).ravel()
    _, inv = np.unique(view, return_inverse=True)
    return inv.ravel()


def grouped_split(y: np.ndarray, groups: np.ndarray, fractions: Sequence[float],
                  seed: int | np.random.Generator = 0) -> list[np.ndarray]:
    """Split rows ``0..n-1`` into ``len(fractions)`` parts (sorted row indices), stratified by the 0/1 labels ``y``,
    with every group in one part; seeded.

    Groups are what is shuffled and cut: a group with any positive row counts as positive, and each class's groups
    are cut at the cumulative ``fractions`` (so a part's share is exact in groups, close in rows).
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    uniq, inv = np.unique(groups, return_inverse=True)
    inv = inv.ravel()
    glabel = np.zeros(uniq.size, np.int8)
    np.maximum.at(glabel, inv, np.asarray(y, np.int8))
    assign = np.empty(uniq.size, np.intp)
    cuts = np.cumsum(fractions)[:-1]
    for c in (0, 1):
        g = rng.permutation(np.flatnonzero(glabel == c))
        for k, part in enumerate(np.split(g, np.round(cuts * g.size).astype(np.intp))):
            assign[part] = k
    row_part = assign[inv]
    return [np.flatnonzero(row_part == k) for k in range(len(fractions))]
