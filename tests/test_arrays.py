"""Shared numpy helpers: the batch-layout-independent product every score goes through."""

from __future__ import annotations

import numpy as np
import pytest

from safeclip.arrays import PRODUCT_BLOCK, row_product


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_rows_product_does_not_depend_on_its_batch(dtype):
    """Issue 23 item 3: numpy's ``w @ x.T`` gives other last bits for a row alone (a gemv) or in a few rows (a
    small-matrix kernel) than in a large batch. ``row_product`` must not."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((37, 512)).astype(dtype)
    x = rng.standard_normal((3 * PRODUCT_BLOCK + 11, 512)).astype(dtype)
    whole = row_product(w, x)
    assert whole.dtype == dtype and whole.shape == (37, len(x))
    np.testing.assert_allclose(whole, w @ x.T, rtol=1e-5, atol=1e-4)
    for n, at in [(1, 0), (1, 150), (2, 7), (5, 60), (PRODUCT_BLOCK - 1, 1), (PRODUCT_BLOCK, 3),
                  (PRODUCT_BLOCK + 1, 100), (len(x), 0)]:
        part = x[at:at + n]
        assert np.array_equal(row_product(w, part), whole[:, at:at + n]), (n, at)
        shuffled = rng.permutation(len(part))  # the same rows at other positions of the batch
        assert np.array_equal(row_product(w, part[shuffled]), whole[:, at:at + n][:, shuffled]), (n, at)


def test_the_plain_product_is_what_differs():
    """Why ``row_product`` exists: without it, the single-row result differs here (if a BLAS ever makes the plain
    product layout-independent, this test says so and the helper can go)."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((60, 512)).astype(np.float32)
    x = rng.standard_normal((300, 512)).astype(np.float32)
    batch = w @ x.T
    alone = np.stack([w @ x[i] for i in range(len(x))], axis=1)
    if np.array_equal(alone, batch):
        pytest.skip("this BLAS gives the same bits for a row alone and in a batch")
    assert np.array_equal(row_product(w, x[:1]), row_product(w, x)[:, :1])


def test_empty_and_one_row_inputs():
    w = np.ones((2, 4), np.float32)
    assert row_product(w, np.zeros((0, 4), np.float32)).shape == (2, 0)
    assert row_product(w, np.ones((1, 4), np.float32)).tolist() == [[4.0], [4.0]]
