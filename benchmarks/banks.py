"""Banks of known content (issue 22): every figure the issue asks for, from one command.

    python benchmarks/banks.py            # everything at full size (10M hashes, 1M embeddings: ~20 min, ~6 GB)
    python benchmarks/banks.py --small    # the same sections at a hundredth of the size (a smoke run)
    python benchmarks/banks.py --only pdq,store

Sections (each in its own module beside this one):
- ``pdq``: PDQ parity with the reference implementation (``pip install pdqhash`` in the benchmark's environment)
  and robustness of the PDQ bank (with and without dihedral variants) on 50 corpus photos under 7 transformations,
  false matches over all pairs of distinct photos (``banks_pdq.py``).
- ``scale``: the indexes alone: a 10M-hash PDQ index (build, RSS, lookups/s, RSS over 1M lookups) and a 1M x 512
  embedding index (recall@1 vs exact, p99 latency) (``banks_scale.py``).
- ``store``: the same through a bank folder (:class:`safeclip.banks.Bank`): bulk build of 10M hashes, lookups/s,
  and RSS over 1M add / match / disable cycles (below).
- ``serve``: seconds from ``safeclip bank add`` to the first match in a running ``safeclip serve``; the overhead of
  bank matching on a warm ``check`` (``banks_serve.py``).
- ``audit``: the overhead of banks on an audit's wall time, and of PDQ hashing in decode (``banks_audit.py``); what
  matching adds per image against the model's time, batched and per check (``banks_share.py``).

Embedding figures come from random-weight models or random vectors: they time the machinery; the PDQ figures are
real. Nothing printed is a moderation result.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import PHOTOS  # noqa: E402


def _rss_mb() -> tuple[float, float]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                k, v = line.split(":")
                out[k] = float(v.split()[0]) / 1024
    return out.get("VmRSS", 0.0), out.get("VmHWM", 0.0)


def store_scale(n: int = 10_000_000, queries: int = 20_000, cycles: int = 1_000_000, batch: int = 1000,
                seed: int = 0) -> dict:
    """A PDQ bank folder of ``n`` random hashes built through :meth:`Bank.add` (bulk, one index build), then
    lookups through :meth:`Bank.search_hamming` (5% planted near-copies), then ``cycles`` add / match / disable
    cycles in batches of ``batch`` with RSS after each tenth."""
    from safeclip.banks import Bank, NewEntry

    rng = np.random.default_rng(seed)
    out: dict = {"n": n}
    with tempfile.TemporaryDirectory(prefix="safeclip-bank-") as tmp:
        t0 = time.perf_counter()
        bank = Bank.create(Path(tmp) / "b", "pdq")
        chunk = 1_000_000
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            codes = rng.integers(0, 256, (m, 32), dtype=np.uint8)
            bank.add(codes, [NewEntry(f"h{start + i}") for i in range(m)], index=False)
        t_add = time.perf_counter() - t0
        bank.rebuild_index()
        out["build_s"] = round(time.perf_counter() - t0, 1)
        out["add_s"] = round(t_add, 1)
        bank.close()
        t0 = time.perf_counter()
        reader = Bank.open(Path(tmp) / "b")
        out["open_s"] = round(time.perf_counter() - t0, 2)
        out["rss_mb_after_open"] = round(_rss_mb()[0])
        data = np.asarray(reader.data[rng.integers(0, n, queries // 20)])
        flips = rng.integers(0, 256, (len(data), 32), dtype=np.uint8) & rng.integers(0, 256, (len(data), 32),
                                                                                     dtype=np.uint8)
        planted = data ^ (flips & 0x11)  # a few bits per byte: mostly within 31
        qs = np.concatenate([rng.integers(0, 256, (queries - len(planted), 32), dtype=np.uint8), planted])
        t0 = time.perf_counter()
        res = reader.search_hamming(qs, 31)
        dt = time.perf_counter() - t0
        out["lookups_per_s_batched"] = round(queries / dt)
        expect = int((np.bitwise_count(flips & 0x11).sum(axis=1) <= 31).sum())
        out["planted_found"] = f"{sum(1 for r, _ in res[-len(planted):] if len(r))}/{expect}"
        t0 = time.perf_counter()
        for q in qs[:2000]:
            reader.search_hamming(q[None], 31)
        out["lookups_per_s_single"] = round(2000 / (time.perf_counter() - t0))
        reader.close()

        # add / match / disable cycles through one writer, which is also the matcher.
        bank = Bank.open(Path(tmp) / "b", writable=True)
        rss = []
        t0 = time.perf_counter()
        rounds = cycles // batch
        for r in range(rounds):
            codes = rng.integers(0, 256, (batch, 32), dtype=np.uint8)
            ids = [f"c{r}-{i}" for i in range(batch)]
            bank.add(codes, [NewEntry(i) for i in ids])
            found = bank.search_hamming(codes, 31)
            assert all(len(rows) for rows, _ in found), "every new entry matches at once"
            bank.disable(ids)
            if (r + 1) % max(1, rounds // 10) == 0:
                rss.append(round(_rss_mb()[0]))
        out["cycles"] = rounds * batch
        out["cycles_s"] = round(time.perf_counter() - t0, 1)
        out["rss_mb_over_cycles"] = rss
        out["rss_growth_bytes_per_added_entry"] = round((rss[-1] - rss[0]) * 2**20 / max(1, cycles - cycles // 10))
        out["peak_rss_mb"] = round(_rss_mb()[1])
        bank.close()
    return out


def product_robustness(n: int = 50, min_similarity: float = 0.94) -> dict:
    """Recall of each edit of ``banks_pdq.EDITS`` through the product's own paths: PDQ as checks and audits hash
    (:func:`safeclip.embed.prepare`, and ``frame_hashes(dihedral=True)`` for a dihedral bank's rows) and the
    embedding bank at ``min_similarity``, with a random-weight ViT-B-32: its embedding figures time and exercise the
    machinery only; they say nothing of how real CLIP weights match. False matches over all pairs of distinct
    photos for both."""
    import banks_pdq
    from PIL import Image

    from _common import photos, vit_b32_checkpoint
    from safeclip import Moderator
    from safeclip.decode import decode
    from safeclip.pdq import DECODE_SIDE, frame_hashes

    files = photos({".jpg", ".jpeg", ".png", ".webp"})
    m = Moderator(model="ViT-B-32", pretrained=str(vit_b32_checkpoint()), device="cpu")
    originals = [banks_pdq._load(p) for p in files]

    def hashes(im: Image.Image, dihedral: bool = False) -> tuple[np.ndarray, np.ndarray]:
        return frame_hashes(decode(im, target_size=DECODE_SIDE).frames[:1], dihedral=dihedral)

    orig_codes = [hashes(im) for im in originals]
    usable = [i for i, (_, q) in enumerate(orig_codes) if q[0] >= 50]
    emb = m.embed(originals)
    out: dict = {"photos": len(files), "usable_pdq": len(usable), "weights": "random (ViT-B-32)"}
    codes = np.concatenate([c for c, _ in orig_codes])[usable]
    d = np.bitwise_count(codes[:, None, :] ^ codes[None, :, :]).sum(axis=2)
    iu = np.triu_indices(len(usable), 1)
    out["pdq_false_matches_pairs"] = f"{int((d[iu] <= 31).sum())}/{len(iu[0])}"
    sims = emb @ emb.T
    ju = np.triu_indices(len(files), 1)
    out["embedding_pairs_over_threshold_random_weights"] = f"{int((sims[ju] >= min_similarity).sum())}/{len(ju[0])}"
    edits: dict = {}
    sample = usable[:n]
    for name, edit in banks_pdq.EDITS.items():
        edited = [edit(originals[i]) for i in sample]
        pdq_hit = dih_hit = 0
        for i, im in zip(sample, edited):
            q, _ = hashes(im)
            dist = int(np.bitwise_count(q[0] ^ orig_codes[i][0][0]).sum())
            pdq_hit += dist <= 31
            rows, _ = hashes(originals[i], dihedral=True)
            dih_hit += int(np.bitwise_count(rows ^ q[0]).sum(axis=1).min()) <= 31
        e = m.embed(edited)
        cos = (e * emb[sample]).sum(axis=1)
        edits[name] = {"pdq_recall": round(pdq_hit / len(sample), 3), "pdq_recall_dihedral":
                       round(dih_hit / len(sample), 3),
                       "embedding_recall_random_weights": round(float((cos >= min_similarity).mean()), 3)}
    out["edits"] = edits
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="a hundredth of the sizes")
    ap.add_argument("--only", default="pdq,scale,store,serve,audit")
    args = ap.parse_args(argv)
    only = set(args.only.split(","))
    f = 100 if args.small else 1
    results: dict = {}
    if "pdq" in only:
        import banks_pdq

        results["pdq_parity"] = banks_pdq.parity(PHOTOS)
        results["pdq_robustness"] = banks_pdq.robustness(PHOTOS, n=50)
        results["product_robustness"] = product_robustness(n=50)
    if "scale" in only:
        import banks_scale

        results["index_pdq"] = banks_scale.pdq_scale(n=10_000_000 // f)
        results["index_pdq_memory"] = banks_scale.pdq_memory_flat(n=10_000_000 // f, lookups=1_000_000 // f)
        results["index_embedding"] = banks_scale.embedding_scale(n=1_000_000 // f)
    if "store" in only:
        results["store_pdq"] = store_scale(n=10_000_000 // f, cycles=1_000_000 // f)
    if "serve" in only:
        import banks_serve

        results["serve_add_to_match"] = banks_serve.add_to_match()
        results["serve_check_overhead"] = banks_serve.check_overhead(entries=1_000_000 // f)
    if "audit" in only:
        import banks_audit

        from _common import photos

        files = [str(p) for p in photos({".jpg", ".jpeg"})[:100]]
        results["audit_overhead"] = banks_audit.audit_overhead(files, entries=1_000_000 // f, model="vit-b-32")
        results["audit_overhead_tiny_model"] = banks_audit.audit_overhead(files, entries=1_000_000 // f)
        results["pdq_decode_cost"] = banks_audit.pdq_decode_cost(files)
        import banks_share

        results["matching_share"] = banks_share.matching_share(entries=1_000_000 // f)
    print(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
