"""Bank search indexes: HammingIndex is exact at every radius, VectorIndex exact below its threshold and finds
near-duplicates above it; both round-trip through .npy files loaded with mmap and refuse damaged ones."""

from __future__ import annotations

import numpy as np
import pytest

from safeclip.banks._index import HammingIndex, VectorIndex, noisy_copies
from safeclip.errors import DataError


_DIST: dict[int, np.ndarray] = {}


def brute(codes: np.ndarray, queries: np.ndarray, r: int) -> list[set[tuple[int, int]]]:
    key = id(codes)
    if key not in _DIST:
        popcount = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(axis=1)
        _DIST[key] = np.stack([popcount[codes ^ q].sum(axis=1) for q in queries])
    d = _DIST[key]
    return [{(int(i), int(row[i])) for i in np.flatnonzero(row <= r)} for row in d]


def flip(code: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    bits = np.unpackbits(code)
    bits[rng.choice(256, size=k, replace=False)] ^= 1
    return np.packbits(bits)


@pytest.fixture(scope="module")
def bank() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (30_000, 32), dtype=np.uint8)
    # near-copies at every distance 0..32 of some rows, plus rows close to each other, plus random queries
    planted = [flip(codes[i * 7], i % 33, rng) for i in range(66)]
    codes[1000:1010] = [flip(codes[999], 3 * j, rng) for j in range(10)]
    queries = np.concatenate([np.stack(planted), codes[999:1000], rng.integers(0, 256, (40, 32), dtype=np.uint8)])
    return codes, queries


@pytest.mark.parametrize("chunks", [None, 0, 16])
@pytest.mark.parametrize("r", [0, 10, 31, 32, 40])
def test_hamming_search_is_exact(bank, chunks, r):
    codes, queries = bank
    index = HammingIndex.build(codes, chunks=chunks)
    got = index.search(queries, r)
    want = brute(codes, queries, r)
    assert len(got) == len(queries)
    for (ids, dist), w in zip(got, want):
        assert ids.dtype == np.int64 and dist.dtype == np.int64
        assert set(zip(ids.tolist(), dist.tolist())) == w
        assert list(zip(dist.tolist(), ids.tolist())) == sorted(zip(dist.tolist(), ids.tolist()))


@pytest.mark.parametrize("threads", [1, 3])
def test_hamming_threads_are_exact(bank, threads):
    codes, queries = bank
    index = HammingIndex.build(codes, chunks=16)
    many = np.concatenate([queries] * 8)  # past the batch length that is split over threads
    got = index.search(many, 31, threads=threads)
    want = brute(codes, queries, 31)
    for i, (ids, dist) in enumerate(got):
        assert set(zip(ids.tolist(), dist.tolist())) == want[i % len(queries)]
    assert [a.tolist() for a, _ in got] == [a.tolist() for a, _ in index.search(many, 31)]
    with pytest.raises(DataError, match="threads"):
        index.search(queries, 31, threads=0)


def test_hamming_planted_found_at_31_not_32(bank):
    codes, queries = bank
    index = HammingIndex.build(codes)
    assert index.params["kind"] == "mih"
    got = index.search(queries[:66], 31)
    for i, (ids, dist) in enumerate(got):
        if i % 33 <= 31:
            assert i * 7 in ids.tolist() and dist[ids.tolist().index(i * 7)] == i % 33
        else:
            assert i * 7 not in ids.tolist()


def test_hamming_small_and_empty():
    one = np.arange(32, dtype=np.uint8)[None, :]
    index = HammingIndex.build(one)
    assert len(index) == 1 and index.params["kind"] == "scan"
    (ids, dist), = index.search(one, 0)
    assert ids.tolist() == [0] and dist.tolist() == [0]
    assert index.search(np.zeros((0, 32), np.uint8), 31) == []
    empty = HammingIndex.build(np.zeros((0, 32), np.uint8))
    (ids, dist), = empty.search(one, 31)
    assert len(ids) == 0 and len(dist) == 0
    assert empty.nearest(one[0], 3)[0].tolist() == []


def test_hamming_nearest(bank):
    codes, queries = bank
    index = HammingIndex.build(codes)
    ids, dist = index.nearest(queries[5], 4)
    d = np.unpackbits(codes ^ queries[5], axis=1).sum(axis=1)
    assert dist.tolist() == sorted(d)[:4] and (d[ids] == dist).all()


@pytest.mark.parametrize("bad", [np.zeros((3, 31), np.uint8), np.zeros((3, 32), np.int64), np.zeros(32, np.uint8),
                                 [[0] * 32]])
def test_hamming_bad_input(bad):
    with pytest.raises(DataError, match="uint8 PDQ codes"):
        HammingIndex.build(bad)
    with pytest.raises(DataError, match="uint8 PDQ codes"):
        HammingIndex.build(np.zeros((2, 32), np.uint8)).search(bad, 31)


def test_hamming_save_load_mmap(bank, tmp_path):
    codes, queries = bank
    index = HammingIndex.build(codes)
    index.save(tmp_path)
    np.save(tmp_path / "codes.npy", codes)
    mapped = np.load(tmp_path / "codes.npy", mmap_mode="r")
    loaded = HammingIndex.load(tmp_path, mapped, verify=True)
    assert loaded.params == index.params
    assert isinstance(loaded._ids, np.memmap)
    for (a, da), (b, db) in zip(index.search(queries, 31), loaded.search(queries, 31)):
        assert a.tolist() == b.tolist() and da.tolist() == db.tolist()
    with pytest.raises(DataError, match="built over 30000 rows but the bank has 29999"):
        HammingIndex.load(tmp_path, codes[:-1])


def test_hamming_load_refuses_damage(bank, tmp_path):
    codes, _ = bank
    HammingIndex.build(codes).save(tmp_path)
    ids = tmp_path / "hamming.ids.npy"
    data = ids.read_bytes()
    ids.write_bytes(data[:len(data) // 2])
    with pytest.raises(DataError, match="rebuild the index"):
        HammingIndex.load(tmp_path, codes)
    ids.write_bytes(data)
    offsets = np.load(tmp_path / "hamming.offsets.npy")
    offsets[5] = -3
    np.save(tmp_path / "hamming.offsets.npy", offsets)
    with pytest.raises(DataError, match="offsets decrease"):
        HammingIndex.load(tmp_path, codes, verify=True)
    offsets[0] = 7
    np.save(tmp_path / "hamming.offsets.npy", offsets)
    with pytest.raises(DataError, match="do not span"):
        HammingIndex.load(tmp_path, codes)
    HammingIndex.build(codes).save(tmp_path)
    srt = np.load(tmp_path / "hamming.sorted.npy")
    srt[0, 12345, 2] ^= np.uint64(1)
    np.save(tmp_path / "hamming.sorted.npy", srt)
    with pytest.raises(DataError, match="sorted codes do not match"):
        HammingIndex.load(tmp_path, codes, verify=True)
    np.save(tmp_path / "hamming.sorted.npy", srt[:, :-1])
    with pytest.raises(DataError, match="hamming.sorted.npy"):
        HammingIndex.load(tmp_path, codes)


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_vector_exact_matches_brute_force():
    rng = np.random.default_rng(1)
    v, q = unit(rng, 3000, 64), unit(rng, 20, 64)
    index = VectorIndex.build(v)
    assert index.exact and len(index) == 3000
    ids, sims = index.search(q, 5)
    s = q @ v.T
    want = np.argsort(-s, axis=1, kind="stable")[:, :5]
    assert (ids == want).all()
    np.testing.assert_allclose(sims, np.take_along_axis(s, want, axis=1), rtol=1e-5)
    ids, sims = index.search(q[:1], 5000)
    assert (ids[0, 3000:] == -1).all() and np.isneginf(sims[0, 3000:]).all()


def test_vector_ivf_finds_near_duplicates(tmp_path):
    rng = np.random.default_rng(2)
    v = unit(rng, 8000, 64)
    index = VectorIndex.build(v, exact_below=1000, seed=3)
    assert not index.exact and index.params["nlist"] > 1
    src = rng.choice(len(v), 300, replace=False)
    q = noisy_copies(v[src], 0.9, rng)
    ids, sims = index.search(q, 1)
    assert (ids[:, 0] == src).mean() >= 0.98
    np.testing.assert_allclose(sims[ids[:, 0] == src, 0], 0.9, atol=1e-4)
    again = VectorIndex.build(v, exact_below=1000, seed=3)
    assert again.params == index.params and (again.search(q, 1)[0] == ids).all()
    index.save(tmp_path)
    loaded = VectorIndex.load(tmp_path, v)
    assert loaded.params == index.params and (loaded.search(q, 1)[0] == ids).all()
    with pytest.raises(DataError, match="rebuild the index"):
        VectorIndex.load(tmp_path, v[:-1])
    sk = np.load(tmp_path / "ivf.sketches.npy")
    np.save(tmp_path / "ivf.sketches.npy", sk[:-1])
    with pytest.raises(DataError, match="ivf.sketches.npy"):
        VectorIndex.load(tmp_path, v)
    np.save(tmp_path / "ivf.sketches.npy", sk)
    lists = tmp_path / "ivf.lists.npy"
    lists.write_bytes(lists.read_bytes()[:-8])
    with pytest.raises(DataError, match="rebuild the index"):
        VectorIndex.load(tmp_path, v)


def test_vector_ivf_clustered_rows_split_lists():
    """CLIP-like rows (a common direction, tight clusters): big lists are split and near-duplicates still found."""
    rng = np.random.default_rng(4)
    d = 64
    m, centres = unit(rng, 1, d)[0], unit(rng, 200, d)
    x = 0.6 * m + 0.6 * centres[rng.integers(0, 200, 6000)] + 0.5 * rng.standard_normal((6000, d)) / np.sqrt(d)
    v = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    index = VectorIndex.build(v, exact_below=1000, seed=5)
    sizes = np.diff(index._list_offsets)
    assert sizes.max() <= 1.5 * len(v) / 64 + 1 or index.params["nlist"] > 64
    src = rng.choice(len(v), 300, replace=False)
    q = noisy_copies(v[src], 0.9, rng)
    exact = VectorIndex.build(v, exact_below=len(v) + 1)
    got, want = index.search(q, 3)[0], exact.search(q, 3)[0]
    assert (got[:, 0] == want[:, 0]).mean() >= 0.98
    assert (index.search(q[:5], 3)[0] == got[:5]).all()  # a few queries (no BLAS) agree with a batch


@pytest.mark.parametrize("bad", [np.zeros((3, 8), np.float64), np.zeros(8, np.float32), np.full((2, 8), 2, np.float32)])
def test_vector_bad_input(bad):
    with pytest.raises(DataError, match="embeddings|normalise"):
        VectorIndex.build(bad)
