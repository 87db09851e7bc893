"""The grouped stratified split (calibration.split): a seeded partition that keeps each part's class balance and
puts every copy of one image in the same part."""

from __future__ import annotations

import numpy as np

from safeclip.calibration import grouped_split as _split
from safeclip.calibration import identical_groups


def test_split_is_stratified_grouped_disjoint_and_seeded() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random(1000) < 0.2).astype(np.int8)
    groups = np.arange(1000)
    groups[500:520] = 7  # twenty copies of one image (row 7's group), labelled like row 7
    y[500:520] = y[7]
    parts = _split(y, groups, [0.35, 0.35, 0.3], np.random.default_rng(3))
    allrows = np.concatenate(parts)
    assert np.array_equal(np.sort(allrows), np.arange(1000))  # a partition
    for p in parts:
        assert abs(y[p].mean() - y.mean()) < 0.03  # stratified
    where = [k for k, p in enumerate(parts) if 7 in p]
    assert all(set(range(500, 520)) <= set(parts[k]) for k in where) and len(where) == 1  # duplicates together
    again = _split(y, groups, [0.35, 0.35, 0.3], np.random.default_rng(3))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    by_seed = _split(y, groups, [0.35, 0.35, 0.3], 3)  # an int seed is the same as its Generator
    assert all(np.array_equal(a, b) for a, b in zip(parts, by_seed))


def test_identical_rows_share_a_group_and_only_they_do() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 8)).astype(np.float32)
    x[40:] = x[:10]  # rows 40..49 repeat rows 0..9
    x[39] = np.nextafter(x[0], np.float32(np.inf))  # one ulp away from row 0: another image
    g = identical_groups(x)
    assert np.array_equal(g[40:], g[:10])
    assert len(set(g.tolist())) == 40 and g[39] != g[0]
