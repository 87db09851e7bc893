"""Search indexes of a bank: exact Hamming-radius search over PDQ codes, cosine search over CLIP embeddings.

Both are built once from the bank's rows and never change; the rows themselves belong to the store, which passes
them (usually memory-mapped) to ``build`` and ``load``. An index's own arrays are ``.npy`` files that load with
``mmap_mode="r"``, so every process on a host shares one copy of their pages.

``HammingIndex`` is multi-index hashing (Norouzi et al.): the 256 bits are cut into ``m`` chunks; two codes within
``r`` bits agree to within ``r // m`` bits on at least one chunk (pigeonhole; the remainder of ``r / m`` lets some
chunks probe one bit less), so probing every chunk's table at the query's key and its neighbours within that
radius, then checking every candidate's full distance, finds every row within ``r`` and nothing else. Each chunk
keeps a copy of the codes sorted by its key, so a probe's candidates are one contiguous run (no gather by id); a
long batch is split over threads (numpy releases the GIL). The chunk
count is picked at build from the bank size and the radius the bank expects (31 for PDQ) so that probes and
candidates cost least; a search whose radius makes the probe lists grow
past the cost of a full scan scans instead, so every radius stays exact. Small banks are always scanned.

``VectorIndex`` is exact (one matrix product) below ``exact_below`` rows and an inverted file above: spherical
k-means centroids from a seeded sample (lists far above the mean size split by k-means of their own rows), rows
grouped by nearest centroid (a permutation and list offsets; the rows themselves are not copied). Each row is also
reduced to a 128-bit sign sketch (random hyperplanes through the rows' mean; Hamming distance estimates the angle),
stored in list order: a query scans the sketches of its ``nprobe`` nearest lists as contiguous slices, and scores
only its ``rerank`` nearest sketches exactly against the full rows.
"""

from __future__ import annotations

import itertools
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError

__all__ = ["HammingIndex", "VectorIndex", "PDQ_BYTES", "noisy_copies"]

PDQ_BYTES = 32
_WORDS = PDQ_BYTES // 8
_BITS = PDQ_BYTES * 8

# Cost model of a lookup, in units of one verified candidate (measured with benchmarks/banks_scale.py on an AVX-512
# box: a probe reads two offsets, a candidate gathers its row and counts bits, a scanned row is a vectorised XOR).
_PROBE_COST = 0.5
_CANDIDATE_COST = 1.0
_SCAN_ROW_COST = 0.25
_MIN_INDEXED_ROWS = 4096  # below this a scan beats the tables' fixed per-query work
_MAX_CHUNK_BITS = 24
_CANDIDATES_PER_BATCH = 1 << 21
_SCAN_BLOCK_ROWS = 1 << 15
_THREADED_BATCH = 256  # a batch this long per thread is split over threads


def _shape_error(name: str, arr: Any, want: str) -> DataError:
    a = np.asarray(arr) if not isinstance(arr, np.ndarray) else arr
    return DataError(f"{name} must be {want}, got {a.dtype} of shape {a.shape}")


def _as_codes(codes: Any, name: str, *, ndim: int = 2) -> np.ndarray:
    """``codes`` as C-contiguous (N, 32) (or (32,)) uint8, or a DataError naming what is wrong."""
    want = "(N, 32) uint8 PDQ codes" if ndim == 2 else "one (32,) uint8 PDQ code"
    if not isinstance(codes, np.ndarray) or codes.dtype != np.uint8 or codes.ndim != ndim \
            or codes.shape[-1] != PDQ_BYTES:
        raise _shape_error(name, codes, want)
    return np.ascontiguousarray(codes)


def _words(codes: np.ndarray) -> np.ndarray:
    """(N, 32) uint8 as (N, 4) little-endian uint64 (a view; bit order is irrelevant to Hamming distance)."""
    return codes.view("<u8").reshape(len(codes), _WORDS)


def _chunk_layout(m: int) -> list[tuple[int, int]]:
    """``m`` chunks (start bit, bit count) covering all 256 bits, the first ``256 % m`` one bit longer."""
    base, extra = divmod(_BITS, m)
    out, start = [], 0
    for i in range(m):
        b = base + (1 if i < extra else 0)
        out.append((start, b))
        start += b
    return out


def _extract(words: np.ndarray, start: int, bits: int) -> np.ndarray:
    """Bits ``[start, start + bits)`` of each 256-bit row of ``words`` as int64 keys."""
    w, off = divmod(start, 64)
    lo = words[:, w] >> np.uint64(off)
    if off + bits > 64:
        lo = lo | (words[:, w + 1] << np.uint64(64 - off))
    return (lo & np.uint64((1 << bits) - 1)).astype(np.int64)


_MASKS: dict[tuple[int, int], np.ndarray] = {}


def _probe_masks(bits: int, radius: int) -> np.ndarray:
    """Every XOR mask of at most ``radius`` set bits among ``bits`` (the key itself first)."""
    key = (bits, radius)
    if key not in _MASKS:
        masks = [0]
        for r in range(1, radius + 1):
            masks.extend(sum(1 << i for i in c) for c in itertools.combinations(range(bits), r))
        _MASKS[key] = np.asarray(masks, dtype=np.int64)
    return _MASKS[key]


def _probe_count(bits: int, radius: int) -> int:
    return sum(math.comb(bits, r) for r in range(min(radius, bits) + 1))


def _chunk_radii(layout: list[tuple[int, int]], radius: int) -> list[int]:
    """Probe radius per chunk. With ``radius = s*m + a`` (0 <= a < m), a row within ``radius`` is within ``s`` on
    one of any ``a + 1`` chunks or within ``s - 1`` on one of the others (else its distance is at least
    ``(a+1)(s+1) + (m-a-1)s > radius``); the longest chunks, whose probe lists are longest, get ``s - 1``."""
    m = len(layout)
    s, a = divmod(radius, m)
    radii = [s] * m
    if s > 0:
        for i in sorted(range(m), key=lambda i: -layout[i][1])[:m - a - 1]:
            radii[i] = s - 1
    return radii


def _mih_cost(n: int, layout: list[tuple[int, int]], radius: int) -> float:
    return sum(_probe_count(b, s) * (_PROBE_COST + _CANDIDATE_COST * n / (1 << b))
               for (_, b), s in zip(layout, _chunk_radii(layout, radius)))


def _choose_chunks(n: int, radius: int) -> int:
    """The chunk count of least lookup cost at ``radius``, with each chunk's table no larger than ~2 entries a row
    (so small banks never carry large offset tables), or 0 when scanning is cheaper."""
    if n < _MIN_INDEXED_ROWS:
        return 0
    max_bits = min(_MAX_CHUNK_BITS, max(8, int(math.log2(n)) + 1))
    best_m, best = 0, n * _SCAN_ROW_COST
    for m in range(8, 33):
        layout = _chunk_layout(m)
        if layout[0][1] > max_bits:
            continue
        cost = _mih_cost(n, layout, radius)
        if cost < best:
            best_m, best = m, cost
    return best_m


def _popcount_rows(x: np.ndarray) -> np.ndarray:
    """Row sums of the set bits of a (T, 4) uint64 array, as int64."""
    c = np.bitwise_count(x)
    return (c[:, 0].astype(np.int64) + c[:, 1]) + (c[:, 2].astype(np.int64) + c[:, 3])


class HammingIndex:
    """Exact search of 256-bit PDQ codes within a Hamming radius (see the module docstring)."""

    def __init__(self, codes: np.ndarray, layout: list[tuple[int, int]], offsets: np.ndarray | None,
                 ids: np.ndarray | None, radius_hint: int, sorted_words: np.ndarray | None = None):
        self._codes = codes
        self._words = _words(codes)
        self._layout = layout
        self._offsets = offsets
        self._ids = ids
        # per chunk, the rows' words in that chunk's key order: a probe's candidates are one contiguous run
        self._sorted = sorted_words
        self._radius_hint = radius_hint
        self._bases = np.cumsum([0] + [(1 << b) + 1 for _, b in layout]).astype(np.int64)

    # -- construction ----------------------------------------------------------------------------------------
    @classmethod
    def build(cls, codes: np.ndarray, *, radius_hint: int = 31, chunks: int | None = None) -> HammingIndex:
        """Index ``codes`` ((N, 32) uint8). ``radius_hint`` is the radius searches will mostly use (the chunking is
        chosen for it; other radii stay exact); ``chunks`` forces a chunk count (0: always scan)."""
        codes = _as_codes(codes, "codes")
        n = len(codes)
        if n >= 2**31 - 1:
            raise DataError(f"codes has {n} rows; a HammingIndex holds fewer than 2**31 - 1")
        if not 0 <= radius_hint <= _BITS:
            raise DataError(f"radius_hint must be in 0..{_BITS}, got {radius_hint}")
        m = _choose_chunks(n, radius_hint) if chunks is None else int(chunks)
        if m and (m > _BITS or _chunk_layout(m)[0][1] > _MAX_CHUNK_BITS):
            raise DataError(f"chunks must be 0 or give chunks of at most {_MAX_CHUNK_BITS} bits, got {m}")
        if m == 0:
            return cls(codes, [], None, None, radius_hint)
        layout = _chunk_layout(m)
        words = _words(codes)
        offsets = np.empty(sum((1 << b) + 1 for _, b in layout), dtype=np.int32)
        ids = np.empty((m, n), dtype=np.int32)
        sorted_words = np.empty((m, n, _WORDS), dtype=np.uint64)
        pos = 0
        for c, (start, b) in enumerate(layout):
            key = _extract(words, start, b)
            counts = np.bincount(key, minlength=1 << b)
            offsets[pos] = 0
            np.cumsum(counts, out=offsets[pos + 1:pos + 1 + (1 << b)])
            ids[c] = np.argsort(key.astype(np.uint32), kind="stable")
            np.take(words, ids[c], axis=0, out=sorted_words[c])
            pos += (1 << b) + 1
            del key, counts
        return cls(codes, layout, offsets, ids, radius_hint, sorted_words)

    @property
    def params(self) -> dict[str, Any]:
        """The build parameters: rows, chunk count, chunk bit widths, the radius they were chosen for."""
        return {"kind": "mih" if self._layout else "scan", "rows": len(self), "chunks": len(self._layout),
                "chunk_bits": [b for _, b in self._layout], "radius_hint": self._radius_hint}

    def __len__(self) -> int:
        return len(self._codes)

    def __repr__(self) -> str:
        return f"HammingIndex({self.params})"

    # -- persistence -----------------------------------------------------------------------------------------
    def save(self, folder: Path | str) -> None:
        """Write ``hamming.layout.npy`` (start bit, bits, radius hint per chunk), ``hamming.offsets.npy``,
        ``hamming.ids.npy`` and ``hamming.sorted.npy`` (each chunk's copy of the codes in key order) into ``folder``
        (which must exist). The codes themselves are the store's and are not written."""
        folder = Path(folder)
        layout = np.asarray([[s, b, self._radius_hint] for s, b in self._layout] or np.empty((0, 3)),
                            dtype=np.int64).reshape(-1, 3)
        header = np.asarray([[len(self), len(self._layout), self._radius_hint]], dtype=np.int64)
        np.save(folder / "hamming.layout.npy", np.concatenate([header, layout]))
        offsets = self._offsets if self._offsets is not None else np.zeros(0, np.int32)
        ids = self._ids if self._ids is not None else np.zeros((0, len(self)), np.int32)
        np.save(folder / "hamming.offsets.npy", offsets)
        np.save(folder / "hamming.ids.npy", ids)
        np.save(folder / "hamming.sorted.npy",
                self._sorted if self._sorted is not None else np.zeros((0, len(self), _WORDS), np.uint64))

    @classmethod
    def load(cls, folder: Path | str, codes: np.ndarray, *, verify: bool = False) -> HammingIndex:
        """The index saved in ``folder`` over ``codes`` (the same rows it was built from), memory-mapped.

        Shapes, dtypes, each table's end points and a sample of each sorted copy are always checked; ``verify``
        also checks that every offset table is non-decreasing, every id in range and every sorted copy equal to the
        codes it copies (reads every page)."""
        folder = Path(folder)
        codes = _as_codes(codes, "codes")
        try:
            head = np.load(folder / "hamming.layout.npy")
            offsets = np.load(folder / "hamming.offsets.npy", mmap_mode="r")
            ids = np.load(folder / "hamming.ids.npy", mmap_mode="r")
            sorted_words = np.load(folder / "hamming.sorted.npy", mmap_mode="r")
        except (OSError, ValueError, EOFError) as e:
            raise DataError(f"{folder}: the Hamming index files cannot be read ({e}); rebuild the index") from e
        where = f"{folder}: Hamming index"
        if head.dtype != np.int64 or head.ndim != 2 or head.shape[1] != 3 or len(head) < 1:
            raise DataError(f"{where}: hamming.layout.npy is malformed; rebuild the index")
        n, m, radius_hint = (int(x) for x in head[0])
        layout = [(int(s), int(b)) for s, b, _ in head[1:]]
        if n != len(codes):
            raise DataError(f"{where} was built over {n} rows but the bank has {len(codes)}; rebuild the index")
        if m != len(layout) or (m and layout != _chunk_layout(m)):
            raise DataError(f"{where}: hamming.layout.npy is malformed; rebuild the index")
        if m == 0:
            return cls(codes, [], None, None, radius_hint)
        want_off = sum((1 << b) + 1 for _, b in layout)
        if offsets.dtype != np.int32 or offsets.shape != (want_off,):
            raise DataError(f"{where}: hamming.offsets.npy holds {offsets.dtype} {offsets.shape}, expected int32 "
                            f"({want_off},); rebuild the index")
        if ids.dtype != np.int32 or ids.shape != (m, n):
            raise DataError(f"{where}: hamming.ids.npy holds {ids.dtype} {ids.shape}, expected int32 ({m}, {n}); "
                            "rebuild the index")
        if sorted_words.dtype != np.uint64 or sorted_words.shape != (m, n, _WORDS):
            raise DataError(f"{where}: hamming.sorted.npy holds {sorted_words.dtype} {sorted_words.shape}, expected "
                            f"uint64 ({m}, {n}, {_WORDS}); rebuild the index")
        index = cls(codes, layout, offsets, ids, radius_hint, sorted_words)
        words = _words(codes)
        sample = np.unique(np.linspace(0, n - 1, 64).astype(np.int64))
        for c in range(m):
            a, b = int(index._bases[c]), int(index._bases[c + 1]) - 1
            if offsets[a] != 0 or offsets[b] != n:
                raise DataError(f"{where}: chunk {c}'s offsets do not span 0..{n}; rebuild the index")
            if verify:
                if np.any(np.diff(offsets[a:b + 1]) < 0):
                    raise DataError(f"{where}: chunk {c}'s offsets decrease; rebuild the index")
                if n and (ids[c].min() < 0 or ids[c].max() >= n):
                    raise DataError(f"{where}: chunk {c} holds ids outside 0..{n - 1}; rebuild the index")
            rows = np.arange(n) if verify else sample
            for a in range(0, len(rows), _SCAN_BLOCK_ROWS * 8):
                r = rows[a:a + _SCAN_BLOCK_ROWS * 8]
                got = np.asarray(ids[c][r])
                if n and (got.min() < 0 or got.max() >= n
                          or not np.array_equal(np.asarray(sorted_words[c][r]), words[got])):
                    raise DataError(f"{where}: chunk {c}'s sorted codes do not match the bank; rebuild the index")
        return index

    # -- search ----------------------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, max_distance: int, *,
               threads: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Every row within ``max_distance`` bits of each query: one ``(ids, distances)`` pair (both int64) per
        query, ordered by distance then id. A batch of at least ``_THREADED_BATCH`` queries is split over
        ``threads`` threads (default: the CPU count, at most 4; numpy releases the GIL in the work)."""
        queries = _as_codes(queries, "queries")
        if isinstance(max_distance, bool) or not isinstance(max_distance, (int, np.integer)) or max_distance < 0:
            raise DataError(f"max_distance must be a non-negative int, got {max_distance!r}")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, (int, np.integer))
                                    or threads < 1):
            raise DataError(f"threads must be a positive int or None, got {threads!r}")
        r = int(max_distance)
        q = len(queries)
        if q == 0:
            return []
        if len(self) == 0:
            return [(np.zeros(0, np.int64), np.zeros(0, np.int64)) for _ in range(q)]
        qwords = _words(queries)
        use_tables = bool(self._layout) and _mih_cost(len(self), self._layout, r) < len(self) * _SCAN_ROW_COST
        if use_tables:
            radii = _chunk_radii(self._layout, r)
            step = max(1, int(_CANDIDATES_PER_BATCH / _mih_cost(len(self), self._layout, r)))
        else:
            step = max(1, (1 << 22) // max(1, min(len(self), _SCAN_BLOCK_ROWS)))
        nthreads = min(4, os.cpu_count() or 1) if threads is None else int(threads)
        nthreads = max(1, min(nthreads, q // _THREADED_BATCH if threads is None else q))
        step = min(step, -(-q // nthreads))

        def part(a: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            if use_tables:
                return self._probe(qwords[a:a + step], r, radii, a)
            return self._scan(qwords[a:a + step], r, a)

        starts = range(0, q, step)
        if nthreads > 1 and len(starts) > 1:
            with ThreadPoolExecutor(nthreads) as pool:
                hits = list(pool.map(part, starts))
        else:
            hits = [part(a) for a in starts]
        return _group(hits, q, len(self))

    def _probe(self, qwords: np.ndarray, r: int, radii: list[int],
               first: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = len(self)
        assert self._offsets is not None and self._ids is not None and self._sorted is not None
        nq = len(qwords)
        chunks = list(zip(self._layout, radii))
        cells = np.concatenate([(_extract(qwords, start, b)[:, None] ^ _probe_masks(b, s)[None, :])
                                + self._bases[c] for c, ((start, b), s) in enumerate(chunks)], axis=1)
        table = np.concatenate([np.full(len(_probe_masks(b, s)), c * n, dtype=np.int64)
                                for c, ((_, b), s) in enumerate(chunks)])
        st = np.take(self._offsets, cells)
        ln = (np.take(self._offsets, cells + 1) - st).ravel()
        st = (st + table[None, :]).ravel()
        total = int(ln.sum())
        # positions of every candidate in the flattened tables: run starts repeated, plus 0..len-1 in each run
        run_start = np.cumsum(ln) - ln
        pos = np.repeat(st - run_start, ln)
        pos += np.arange(total, dtype=np.int64)
        qloc = np.repeat(np.arange(nq, dtype=np.int64), ln.reshape(nq, -1).sum(axis=1))
        x = np.take(self._sorted.reshape(-1, _WORDS), pos, axis=0)
        x ^= np.take(qwords, qloc, axis=0)
        d = _popcount_rows(x)
        keep = np.flatnonzero(d <= r)
        cand = np.take(self._ids.reshape(-1), pos[keep]).astype(np.int64)
        return qloc[keep] + first, cand, d[keep]

    def _scan(self, qwords: np.ndarray, r: int, first: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        qs, ids, ds = [], [], []
        for a in range(0, len(self), _SCAN_BLOCK_ROWS):
            d = _scan_distances(self._words[a:a + _SCAN_BLOCK_ROWS], qwords)
            qi, ri = np.nonzero(d <= r)
            qs.append(qi + first)
            ids.append(ri + a)
            ds.append(d[qi, ri])
        return np.concatenate(qs), np.concatenate(ids), np.concatenate(ds)

    def nearest(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` rows nearest ``query`` ((32,) uint8) by a full scan, ordered by distance then id."""
        query = _as_codes(query, "query", ndim=1)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise DataError(f"k must be a non-negative int, got {k!r}")
        k = min(int(k), len(self))
        if k == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        qw = _words(query.reshape(1, PDQ_BYTES))
        d = np.concatenate([_scan_distances(self._words[a:a + _SCAN_BLOCK_ROWS], qw)[0]
                            for a in range(0, len(self), _SCAN_BLOCK_ROWS)])
        top = np.argpartition(d, k - 1)[:k] if k < len(d) else np.arange(len(d))
        top = top[np.lexsort((top, d[top]))]
        return top.astype(np.int64), d[top]


def _scan_distances(block: np.ndarray, qwords: np.ndarray) -> np.ndarray:
    """(Q, R) Hamming distances (int64) between (Q, 4) query words and (R, 4) row words."""
    d = np.zeros((len(qwords), len(block)), dtype=np.int64)
    for w in range(_WORDS):
        d += np.bitwise_count(qwords[:, w, None] ^ block[None, :, w])
    return d


def _group(hits: list[tuple[np.ndarray, np.ndarray, np.ndarray]], q: int, n: int) -> list[tuple[np.ndarray,
                                                                                                  np.ndarray]]:
    qidx = np.concatenate([h[0] for h in hits])
    ids = np.concatenate([h[1] for h in hits])
    dist = np.concatenate([h[2] for h in hits])
    # a row found through several chunks is one hit
    _, first = np.unique(qidx * max(n, 1) + ids, return_index=True)
    qidx, ids, dist = qidx[first], ids[first], dist[first]
    order = np.lexsort((ids, dist, qidx))
    qidx, ids, dist = qidx[order], ids[order], dist[order]
    bounds = np.searchsorted(qidx, np.arange(q + 1))
    return [(ids[bounds[i]:bounds[i + 1]], dist[bounds[i]:bounds[i + 1]]) for i in range(q)]


_NORM_TOLERANCE = 1e-2
_EXACT_BELOW = 10_000
_TUNE_QUERIES = 500
_TUNE_RECALL = 0.995
_KMEANS_ITERS = 8
_MATMUL_ROWS = 1 << 16


def _as_vectors(x: Any, name: str, d: int | None = None) -> np.ndarray:
    want = f"(N, {d if d is not None else 'D'}) float32 L2-normalised embeddings"
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 2 or (d is not None and x.shape[1] != d) \
            or x.shape[1] == 0:
        raise _shape_error(name, x, want)
    return np.ascontiguousarray(x)


def _check_norms(x: np.ndarray, name: str) -> None:
    for a in range(0, len(x), _MATMUL_ROWS):
        norms = np.linalg.norm(x[a:a + _MATMUL_ROWS], axis=1)
        bad = np.flatnonzero(~(np.abs(norms - 1) <= _NORM_TOLERANCE))
        if len(bad):
            raise DataError(f"{name} row {a + int(bad[0])} has L2 norm {norms[bad[0]]:.4g}, not 1: normalise the "
                            "embeddings (x / ||x||) first")


def _top_k(sims: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best of one query's candidate ``sims`` (best first, ties by id), padded with -1 / -inf."""
    out_i = np.full(k, -1, np.int64)
    out_s = np.full(k, -np.inf, np.float32)
    if len(sims):
        kk = min(k, len(sims))
        top = np.argpartition(-sims, kk - 1)[:kk] if kk < len(sims) else np.arange(len(sims))
        top = top[np.lexsort((ids[top], -sims[top]))]
        out_i[:kk], out_s[:kk] = ids[top], sims[top]
    return out_i, out_s


_SKETCH_WORDS = 2  # 128 sign bits per row
_RERANK = 128
_SPLIT_ABOVE = 1.5
_SPLIT_ROUNDS = 4
_EINSUM_QUERIES = 8


def _sketch(x: np.ndarray, proj: np.ndarray) -> np.ndarray:
    """Sign bits of ``x @ proj[:-1] - proj[-1]`` (hyperplanes through the rows' mean) as (N, 2) uint64: their
    Hamming distance estimates the angle."""
    out = np.empty((len(x), _SKETCH_WORDS), np.uint64)
    for a in range(0, len(x), _MATMUL_ROWS):
        xa = np.asarray(x[a:a + _MATMUL_ROWS])
        y = (np.einsum("nd,db->nb", xa, proj[:-1]) if len(xa) <= _EINSUM_QUERIES else xa @ proj[:-1]) - proj[-1]
        out[a:a + len(y)] = np.packbits(y > 0, axis=1).view(np.uint64)
    return out


def _sketch_distances(block: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Hamming distances (uint16) of (R, 2) uint64 sketches to one."""
    c = np.bitwise_count(block ^ q)  # (R, 2) uint8
    # a row's two byte counts summed by one multiply (the top byte of the product; at most 128, no carry out)
    return (c.view(np.uint16)[:, 0] * np.uint16(0x0101)) >> np.uint16(8)


class VectorIndex:
    """Cosine search over L2-normalised embeddings: exact below ``exact_below`` rows, an inverted file of sign
    sketches with exact reranking above (see the module docstring)."""

    def __init__(self, vectors: np.ndarray, centroids: np.ndarray | None, order: np.ndarray | None,
                 list_offsets: np.ndarray | None, nprobe: int, seed: int, proj: np.ndarray | None = None,
                 sketches: np.ndarray | None = None, rerank: int = _RERANK):
        self._vectors = vectors
        self._centroids = centroids
        self._order = order
        self._list_offsets = list_offsets
        self._proj = proj
        self._sketches = sketches
        self.nprobe = nprobe
        self.rerank = rerank
        self._seed = seed

    @classmethod
    def build(cls, vectors: np.ndarray, *, seed: int = 0, exact_below: int = _EXACT_BELOW, nlist: int | None = None,
              nprobe: int | None = None, tune_similarity: float = 0.9, rerank: int = _RERANK) -> VectorIndex:
        """Index ``vectors`` ((N, D) float32, unit rows). Exact below ``exact_below`` rows. Above, ``nlist`` lists
        (default about sqrt(N)) stored as 128-bit sign sketches of random hyperplanes, ``nprobe`` lists scanned
        per query and its ``rerank`` nearest sketches scored exactly; when not given, ``nprobe`` is the least that
        reaches the source row's list for 99.5% of seeded noisy copies at cosine ``tune_similarity`` (the
        near-duplicate queries a bank answers)."""
        vectors = _as_vectors(vectors, "vectors")
        _check_norms(vectors, "vectors")
        n, d = vectors.shape
        if n < max(exact_below, 2):
            return cls(vectors, None, None, None, 0, seed)
        if isinstance(rerank, bool) or not isinstance(rerank, (int, np.integer)) or rerank < 1:
            raise DataError(f"rerank must be a positive int, got {rerank!r}")
        rng = np.random.default_rng(seed)
        nlist = int(nlist) if nlist is not None else max(1, int(2 ** round(math.log2(math.sqrt(n)))))
        if not 1 <= nlist <= n:
            raise DataError(f"nlist must be in 1..{n}, got {nlist}")
        centroids = _spherical_kmeans(vectors, nlist, rng)
        assign = _nearest(vectors, centroids)
        # Lists far above the mean size (dense regions: clustered embeddings) are split by k-means on their own
        # rows, so a query near a dense region scans about as many rows as any other.
        target = n / nlist
        for _ in range(_SPLIT_ROUNDS):
            counts = np.bincount(assign, minlength=len(centroids))
            big = np.flatnonzero(counts > _SPLIT_ABOVE * target)
            if not len(big):
                break
            members = np.argsort(assign, kind="stable")
            ends = np.cumsum(counts)
            parts = [centroids]
            for j in big:
                rows = members[ends[j] - counts[j]:ends[j]]
                x = np.take(vectors, rows, axis=0)
                sub = _spherical_kmeans(x, int(math.ceil(counts[j] / target)), rng)
                # the list's rows go to the nearest of its own sub-centroids: the first replaces it, the rest are new
                local = _nearest(x, sub)
                base = sum(len(p) for p in parts)
                assign[rows] = np.where(local == 0, j, base + local - 1)
                centroids[j] = sub[0]
                parts.append(sub[1:])
            centroids = np.concatenate(parts).astype(np.float32)
            del members
        if len(centroids) > nlist:
            # every row to its nearest centroid again: a query's nearest lists must be its source row's
            nlist = len(centroids)
            assign = _nearest(vectors, centroids)
        order = np.argsort(assign, kind="stable").astype(np.int64)
        list_offsets = np.zeros(nlist + 1, np.int64)
        np.cumsum(np.bincount(assign, minlength=nlist), out=list_offsets[1:])
        del assign
        # centred on the sample mean, so a common direction shared by every row does not waste the sign bits
        sample = np.take(vectors, np.sort(rng.choice(n, size=min(n, 1 << 15), replace=False)), axis=0)
        planes = rng.standard_normal((d, 64 * _SKETCH_WORDS)).astype(np.float32)
        proj = np.concatenate([planes, sample.mean(axis=0, keepdims=True) @ planes]).astype(np.float32)
        sketches = np.empty((n, _SKETCH_WORDS), np.uint64)
        for a in range(0, n, _MATMUL_ROWS):
            sketches[a:a + _MATMUL_ROWS] = _sketch(np.take(vectors, order[a:a + _MATMUL_ROWS], axis=0), proj)
        index = cls(vectors, centroids, order, list_offsets, 1, seed, proj, sketches, int(rerank))
        index.nprobe = int(nprobe) if nprobe is not None else index._tune(rng, tune_similarity)
        if not 1 <= index.nprobe <= nlist:
            raise DataError(f"nprobe must be in 1..{nlist}, got {index.nprobe}")
        return index

    def _tune(self, rng: np.random.Generator, similarity: float) -> int:
        n = len(self._vectors)
        src = rng.choice(n, size=min(_TUNE_QUERIES, n), replace=False)
        queries = noisy_copies(self._vectors[src], similarity, rng)
        nlist = len(self._list_offsets) - 1
        # the rank of each source row's list among its query's lists: nprobe must cover the 99.5th percentile
        inv = np.empty(n, np.int64)
        inv[self._order] = np.arange(n)
        src_list = np.searchsorted(self._list_offsets, inv[src], side="right") - 1
        assert self._centroids is not None
        cs = queries @ self._centroids.T
        rank = (cs > cs[np.arange(len(src)), src_list][:, None]).sum(axis=1)
        need = int(np.ceil(np.quantile(rank + 1, _TUNE_RECALL)))
        return max(1, min(nlist, need))

    @property
    def exact(self) -> bool:
        """True when every search is a full scan."""
        return self._centroids is None

    @property
    def params(self) -> dict[str, Any]:
        """The build parameters: rows, dimension, exact or not, lists, lists probed, rows reranked, seed."""
        nlist = 0 if self._list_offsets is None else len(self._list_offsets) - 1
        return {"kind": "exact" if self.exact else "ivf", "rows": len(self), "dim": int(self._vectors.shape[1]),
                "nlist": nlist, "nprobe": self.nprobe, "rerank": 0 if self.exact else self.rerank,
                "seed": self._seed}

    def __len__(self) -> int:
        return len(self._vectors)

    def __repr__(self) -> str:
        return f"VectorIndex({self.params})"

    def save(self, folder: Path | str) -> None:
        """Write ``ivf.params.npy`` (rows, dim, nprobe, seed, exact, rerank) and, when not exact,
        ``ivf.centroids.npy``, ``ivf.order.npy``, ``ivf.lists.npy``, ``ivf.proj.npy`` (hyperplanes and offsets) and
        ``ivf.sketches.npy`` (in list order) into ``folder`` (which must exist)."""
        folder = Path(folder)
        n, d = self._vectors.shape
        np.save(folder / "ivf.params.npy",
                np.asarray([n, d, self.nprobe, self._seed, int(self.exact), self.rerank], np.int64))
        if not self.exact:
            np.save(folder / "ivf.centroids.npy", self._centroids)
            np.save(folder / "ivf.order.npy", self._order)
            np.save(folder / "ivf.lists.npy", self._list_offsets)
            np.save(folder / "ivf.proj.npy", self._proj)
            np.save(folder / "ivf.sketches.npy", self._sketches)

    @classmethod
    def load(cls, folder: Path | str, vectors: np.ndarray) -> VectorIndex:
        """The index saved in ``folder`` over ``vectors`` (the rows it was built from), memory-mapped."""
        folder = Path(folder)
        vectors = _as_vectors(vectors, "vectors")
        where = f"{folder}: vector index"
        try:
            p = np.load(folder / "ivf.params.npy")
            if p.dtype != np.int64 or p.shape != (6,):
                raise DataError(f"{where}: ivf.params.npy is malformed; rebuild the index")
            n, d, nprobe, seed, exact, rerank = (int(x) for x in p)
            if (n, d) != vectors.shape:
                raise DataError(f"{where} was built over ({n}, {d}) vectors but the bank has {vectors.shape}; "
                                "rebuild the index")
            if exact:
                return cls(vectors, None, None, None, 0, seed)
            centroids = np.load(folder / "ivf.centroids.npy", mmap_mode="r")
            order = np.load(folder / "ivf.order.npy", mmap_mode="r")
            lists = np.load(folder / "ivf.lists.npy", mmap_mode="r")
            proj = np.load(folder / "ivf.proj.npy")
            sketches = np.load(folder / "ivf.sketches.npy", mmap_mode="r")
        except (OSError, ValueError, EOFError) as e:
            if isinstance(e, DataError):
                raise
            raise DataError(f"{where}: the index files cannot be read ({e}); rebuild the index") from e
        if centroids.dtype != np.float32 or centroids.ndim != 2 or centroids.shape[1] != d or len(centroids) < 1:
            raise DataError(f"{where}: ivf.centroids.npy holds {centroids.dtype} {centroids.shape}; rebuild the index")
        nlist = len(centroids)
        if order.dtype != np.int64 or order.shape != (n,):
            raise DataError(f"{where}: ivf.order.npy holds {order.dtype} {order.shape}, expected int64 ({n},); "
                            "rebuild the index")
        if lists.dtype != np.int64 or lists.shape != (nlist + 1,) or lists[0] != 0 or lists[-1] != n \
                or np.any(np.diff(lists) < 0):
            raise DataError(f"{where}: ivf.lists.npy is not {nlist + 1} non-decreasing offsets from 0 to {n}; "
                            "rebuild the index")
        if proj.dtype != np.float32 or proj.shape != (d + 1, 64 * _SKETCH_WORDS):
            raise DataError(f"{where}: ivf.proj.npy holds {proj.dtype} {proj.shape}, expected float32 "
                            f"({d + 1}, {64 * _SKETCH_WORDS}); rebuild the index")
        if sketches.dtype != np.uint64 or sketches.shape != (n, _SKETCH_WORDS):
            raise DataError(f"{where}: ivf.sketches.npy holds {sketches.dtype} {sketches.shape}, expected uint64 "
                            f"({n}, {_SKETCH_WORDS}); rebuild the index")
        if not 1 <= nprobe <= nlist or rerank < 1:
            raise DataError(f"{where}: nprobe {nprobe} or rerank {rerank} is out of range; rebuild the index")
        return cls(vectors, np.asarray(centroids), order, np.asarray(lists), nprobe, seed, proj, sketches, rerank)

    def search(self, queries: np.ndarray, k: int, *, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most similar rows per query: ``(ids (Q, k) int64, sims (Q, k) float32)``, best first, padded
        with -1 / -inf. ``nprobe`` overrides the built one for this call."""
        queries = _as_vectors(queries, "queries", self._vectors.shape[1])
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise DataError(f"k must be a positive int, got {k!r}")
        k = int(k)
        q = len(queries)
        ids = np.full((q, k), -1, np.int64)
        sims = np.full((q, k), -np.inf, np.float32)
        if q == 0 or len(self) == 0:
            return ids, sims
        if self.exact:
            top_s, top_i = [], []
            for a in range(0, len(self), _MATMUL_ROWS):
                block = queries @ self._vectors[a:a + _MATMUL_ROWS].T
                kk = min(k, block.shape[1])
                part = np.argpartition(-block, kk - 1, axis=1)[:, :kk] if kk < block.shape[1] else \
                    np.broadcast_to(np.arange(block.shape[1]), block.shape)
                top_s.append(np.take_along_axis(block, part, axis=1))
                top_i.append(part + a)
            cand_s, cand_i = np.concatenate(top_s, axis=1), np.concatenate(top_i, axis=1).astype(np.int64)
            for i in range(q):
                ids[i], sims[i] = _top_k(cand_s[i], cand_i[i], k)
            return ids, sims
        assert self._centroids is not None and self._order is not None and self._list_offsets is not None
        assert self._proj is not None and self._sketches is not None
        nprobe = self.nprobe if nprobe is None else int(nprobe)
        nlist = len(self._centroids)
        if not 1 <= nprobe <= nlist:
            raise DataError(f"nprobe must be in 1..{nlist}, got {nprobe}")
        # a few queries without BLAS, whose threads cost more than they save on so small a product
        cs = np.einsum("qd,cd->qc", queries, self._centroids) if q <= _EINSUM_QUERIES else \
            queries @ self._centroids.T
        probe = np.argpartition(-cs, nprobe - 1, axis=1)[:, :nprobe] if nprobe < nlist else \
            np.broadcast_to(np.arange(nlist), (q, nlist))
        qsk = _sketch(queries, self._proj)
        keep = max(self.rerank, k)
        for i in range(q):
            lists = np.sort(probe[i])
            starts, ends = self._list_offsets[lists], self._list_offsets[lists + 1]
            # neighbouring probed lists read as one slice
            brk = np.flatnonzero(starts[1:] != ends[:-1]) + 1
            starts, ends = starts[np.r_[0, brk]], ends[np.r_[brk - 1, len(ends) - 1]]
            if len(starts) == 1:
                pos = np.arange(starts[0], ends[0])
                dist = _sketch_distances(self._sketches[starts[0]:ends[0]], qsk[i])
            else:
                lens = ends - starts
                pos = np.repeat(starts - (np.cumsum(lens) - lens), lens) + np.arange(int(lens.sum()))
                dist = _sketch_distances(np.take(self._sketches, pos, axis=0), qsk[i])
            if len(dist) > keep:
                # the `keep` smallest distances by a histogram (cheaper than a partition): all below the threshold
                # distance, then the first rows at it
                t = int(np.searchsorted(np.cumsum(np.bincount(dist, minlength=64 * _SKETCH_WORDS + 1)), keep))
                below = np.flatnonzero(dist < t)
                at = np.flatnonzero(dist == t)[:keep - len(below)]
                pos = pos[np.concatenate([below, at])]
            cand = np.take(self._order, pos)
            s = np.take(self._vectors, cand, axis=0) @ queries[i]
            ids[i], sims[i] = _top_k(s, cand, k)
        return ids, sims


def _nearest(vectors: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """The index of each row's most similar centroid."""
    return np.concatenate([np.argmax(vectors[a:a + _MATMUL_ROWS] @ centroids.T, axis=1)
                           for a in range(0, len(vectors), _MATMUL_ROWS)])


def _spherical_kmeans(vectors: np.ndarray, nlist: int, rng: np.random.Generator) -> np.ndarray:
    """``nlist`` unit centroids from k-means (by cosine) on a seeded sample of ``vectors``."""
    n = len(vectors)
    sample = np.sort(rng.choice(n, size=min(n, 32 * nlist), replace=False))
    x = np.take(vectors, sample, axis=0)
    c = x[rng.choice(len(x), size=nlist, replace=False)].copy()
    for _ in range(_KMEANS_ITERS):
        assign = np.concatenate([np.argmax(x[a:a + _MATMUL_ROWS] @ c.T, axis=1)
                                 for a in range(0, len(x), _MATMUL_ROWS)])
        sums = np.zeros_like(c)
        np.add.at(sums, assign, x)
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        empty = norms[:, 0] == 0
        # an empty list takes a random sample row, so every list keeps a centroid
        sums[empty] = x[rng.choice(len(x), size=int(empty.sum()), replace=False)]
        norms[empty] = 1
        c = (sums / norms).astype(np.float32)
    return c


def noisy_copies(vectors: np.ndarray, similarity: float, rng: np.random.Generator) -> np.ndarray:
    """Unit vectors at cosine ``similarity`` to each row of ``vectors`` (random directions), float32."""
    v = np.asarray(vectors, dtype=np.float64)
    noise = rng.standard_normal(v.shape)
    noise -= (noise * v).sum(axis=1, keepdims=True) * v
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    out = similarity * v + math.sqrt(max(0.0, 1 - similarity**2)) * noise
    return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)
