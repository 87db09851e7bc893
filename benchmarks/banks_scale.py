"""Bank indexes at scale: a 10M-hash PDQ bank and a 1M-entry 512-d embedding bank (Meta HMA's targets).

PDQ: build time, RSS (VmRSS / VmHWM) before and after, lookups/s at radius 31 batched (``search(threads=1)``, 2,
and the default) and one query at a time, on mostly random queries plus planted near-copies at distance <= 31 (all must be found); then RSS
over rounds of repeated lookups (must stay flat). Embeddings: build time, recall@1 against exact search on noisy
copies of bank rows (cosine 0.9-0.97, the near-duplicate case) and on random queries, p50/p99 single-query latency,
on uniform random unit rows (no structure) and on clustered CLIP-like rows (pairwise cosine ~0.37).
Run the two parts in separate processes on a shared box (``--part``).

    python benchmarks/banks_scale.py [--small] [--part pdq|memory|embedding|all]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from safeclip.banks._index import HammingIndex, VectorIndex, noisy_copies  # noqa: E402


def rss() -> dict[str, float]:
    """VmRSS and VmHWM of this process in MB."""
    out = {}
    for line in open("/proc/self/status"):
        if line.startswith(("VmRSS", "VmHWM")):
            out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out


def random_codes(n: int, rng: np.random.Generator, chunk: int = 1 << 20) -> np.ndarray:
    codes = np.empty((n, 32), np.uint8)
    for a in range(0, n, chunk):
        codes[a:a + chunk] = rng.integers(0, 256, (min(chunk, n - a), 32), dtype=np.uint8)
    return codes


def near_copies(codes: np.ndarray, dists: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    bits = np.unpackbits(codes, axis=1)
    for row, d in zip(bits, dists):
        row[rng.choice(256, size=int(d), replace=False)] ^= 1
    return np.packbits(bits, axis=1)


def pdq_queries(codes: np.ndarray, q: int, rng: np.random.Generator, planted_share: float = 0.05):
    planted = max(1, int(q * planted_share))
    src = rng.choice(len(codes), size=planted, replace=False)
    queries = np.concatenate([near_copies(codes[src], rng.integers(0, 32, planted), rng),
                              random_codes(q - planted, rng)])
    return queries, src


def pdq_scale(n: int = 10_000_000, queries: int = 20_000, single: int = 2_000, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out: dict = {"n": n, "rss_start_mb": rss()}
    codes = random_codes(n, rng)
    out["rss_codes_mb"] = rss()
    t = time.perf_counter()
    index = HammingIndex.build(codes)
    out["build_s"] = time.perf_counter() - t
    out["params"] = index.params
    out["rss_built_mb"] = rss()
    qs, src = pdq_queries(codes, queries, rng)
    out["load_avg_start"] = os.getloadavg()[0]
    for threads in (1, 2):
        t = time.perf_counter()
        res = index.search(qs, 31, threads=threads)
        out[f"batched_lookups_per_s_{threads}_thread{'s' if threads > 1 else ''}"] = round(
            queries / (time.perf_counter() - t))
        out[f"planted_found_{threads}"] = f"{sum(int(s in r[0]) for s, r in zip(src, res))}/{len(src)}"
    t = time.perf_counter()
    index.search(qs, 31)
    out["batched_lookups_per_s_default"] = round(queries / (time.perf_counter() - t))
    out["default_threads"] = min(4, os.cpu_count() or 1)
    out["random_queries_with_hits"] = sum(len(r[0]) > 0 for r in res[len(src):])
    lat = []
    for i in range(single):
        t = time.perf_counter()
        index.search(qs[i:i + 1], 31)
        lat.append(time.perf_counter() - t)
    out["single_lookups_per_s"] = single / sum(lat)
    out["single_p50_ms"] = float(np.percentile(lat, 50) * 1e3)
    out["single_p99_ms"] = float(np.percentile(lat, 99) * 1e3)
    out["rss_end_mb"] = rss()
    out.update(_faiss_pdq(codes, qs) or {})
    return out


def _faiss_pdq(codes: np.ndarray, qs: np.ndarray) -> dict | None:
    """Optional: faiss's binary multi-hash index on the same data, for comparison (skipped when not installed)."""
    try:
        import faiss
    except ImportError:
        return None
    t = time.perf_counter()
    index = faiss.IndexBinaryMultiHash(256, 16, 16)
    index.add(codes)
    build = time.perf_counter() - t
    index.nflip = 1
    t = time.perf_counter()
    index.range_search(qs, 32)
    return {"faiss_multihash_build_s": build, "faiss_multihash_lookups_per_s": len(qs) / (time.perf_counter() - t)}


def pdq_memory_flat(n: int = 10_000_000, lookups: int = 1_000_000, rounds: int = 10, seed: int = 0) -> dict:
    """RSS after each round of ``lookups / rounds`` searches over one built index (two threads)."""
    rng = np.random.default_rng(seed)
    codes = random_codes(n, rng)
    index = HammingIndex.build(codes)
    qs, _ = pdq_queries(codes, 20_000, rng)
    per_round = lookups // rounds
    out = {"n": n, "lookups": lookups, "rss_after_build_mb": rss()["VmRSS"], "rounds_rss_mb": []}
    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        for r in range(rounds):
            starts = [(r * per_round + a) % len(qs) for a in range(0, per_round, 1000)]
            list(pool.map(lambda a: index.search(np.take(qs, np.arange(a, a + 1000), axis=0, mode="wrap"), 31),
                          starts))
            m = rss()
            out["rounds_rss_mb"].append(round(m["VmRSS"], 1))
            print(f"  round {r + 1}/{rounds}: {(r + 1) * per_round} lookups, VmRSS {m['VmRSS']:.0f} MB, "
                  f"VmHWM {m['VmHWM']:.0f} MB", flush=True)
    out["lookups_per_s"] = lookups / (time.perf_counter() - t0)
    out["rss_growth_mb_after_round_1"] = out["rounds_rss_mb"][-1] - out["rounds_rss_mb"][0]
    out["hwm_mb"] = rss()["VmHWM"]
    return out


def unit_vectors(n: int, d: int, rng: np.random.Generator, chunk: int = 1 << 16) -> np.ndarray:
    v = np.empty((n, d), np.float32)
    for a in range(0, n, chunk):
        x = rng.standard_normal((min(chunk, n - a), d), dtype=np.float32)
        v[a:a + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return v


def clustered_vectors(n: int, d: int, rng: np.random.Generator, clusters: int = 20_000,
                      chunk: int = 1 << 16) -> np.ndarray:
    """Unit rows ``normalize(0.6 m + 0.6 c_k + 0.5 e / sqrt(d))``: one common direction, ``clusters`` random centres,
    noise; pairwise cosine about 0.37 (as real CLIP embeddings), about 0.74 within a cluster."""
    m = unit_vectors(1, d, rng)[0]
    centres = unit_vectors(clusters, d, rng)
    v = np.empty((n, d), np.float32)
    for a in range(0, n, chunk):
        k = min(chunk, n - a)
        x = 0.6 * m + 0.6 * centres[rng.integers(0, clusters, k)] \
            + 0.5 * rng.standard_normal((k, d), dtype=np.float32) / np.float32(np.sqrt(d))
        v[a:a + k] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return v


def _embedding_case(v: np.ndarray, queries: int, rng: np.random.Generator, seed: int) -> dict:
    n, d = v.shape
    out: dict = {}
    t = time.perf_counter()
    index = VectorIndex.build(v, seed=seed)
    out["build_s"] = round(time.perf_counter() - t, 1)
    out["params"] = index.params
    out["sketch_mb"] = round(index._sketches.nbytes / 2**20, 1) if index._sketches is not None else 0
    pairs = v[rng.choice(n, 2000)] @ v[rng.choice(n, 2000)].T
    out["pairwise_cosine_mean"] = round(float(pairs.mean()), 3)
    src = rng.choice(n, size=queries, replace=False)
    sims = rng.uniform(0.9, 0.97, size=queries)
    near = np.concatenate([noisy_copies(v[s:s + 1], float(c), rng) for s, c in zip(src, sims)])
    rand = unit_vectors(queries, d, rng)
    exact = VectorIndex.build(v, exact_below=n + 1)
    for name, q in [("near_copies", near), ("random", rand)]:
        want, want_s = exact.search(q, 1)
        got, _ = index.search(q, 1)
        out[f"recall@1_{name}"] = float((got[:, 0] == want[:, 0]).mean())
        if name == "random":
            out["random_best_similarity_max"] = round(float(want_s.max()), 3)
    t = time.perf_counter()
    got = index.search(near, 1)[0]
    out["batched_ms_per_query"] = round((time.perf_counter() - t) * 1e3 / queries, 3)
    out["recall@1_near_copies_is_source"] = float((got[:, 0] == src).mean())
    lat = []
    for i in range(queries):
        t = time.perf_counter()
        index.search(near[i:i + 1], 1)
        lat.append(time.perf_counter() - t)
    out["single_p50_ms"] = round(float(np.percentile(lat, 50) * 1e3), 3)
    out["single_p99_ms"] = round(float(np.percentile(lat, 99) * 1e3), 3)
    lat = []
    for i in range(min(queries, 50)):
        t = time.perf_counter()
        exact.search(near[i:i + 1], 1)
        lat.append(time.perf_counter() - t)
    out["exact_single_p50_ms"] = round(float(np.percentile(lat, 50) * 1e3), 1)
    return out


def embedding_scale(n: int = 1_000_000, d: int = 512, queries: int = 1000, seed: int = 0) -> dict:
    """Uniform random unit rows (no structure: the worst case for the lists) and clustered ones (CLIP-like)."""
    rng = np.random.default_rng(seed)
    out: dict = {"n": n, "d": d, "load_avg_start": os.getloadavg()[0]}
    for name, make in [("uniform", unit_vectors), ("clustered", clustered_vectors)]:
        v = make(n, d, rng)
        out[name] = _embedding_case(v, queries, rng, seed)
        print(f"  {name}: {out[name]}", flush=True)
        del v
    out["load_avg_end"] = os.getloadavg()[0]
    out["rss_end_mb"] = rss()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="100k hashes / 50k embeddings / 20k lookups")
    ap.add_argument("--part", choices=["pdq", "memory", "embedding", "all"], default="all")
    a = ap.parse_args(argv)
    print(f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}", flush=True)
    if a.part in ("pdq", "all"):
        print("pdq_scale:", pdq_scale(100_000 if a.small else 10_000_000, 5_000 if a.small else 20_000), flush=True)
    if a.part in ("memory", "all"):
        print("pdq_memory_flat:", pdq_memory_flat(100_000 if a.small else 10_000_000,
                                                  20_000 if a.small else 1_000_000), flush=True)
    if a.part in ("embedding", "all"):
        print("embedding_scale:", embedding_scale(50_000 if a.small else 1_000_000, 512,
                                                  200 if a.small else 1000), flush=True)


if __name__ == "__main__":
    main()
