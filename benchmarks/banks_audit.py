"""What banks cost an audit: wall time with and without a policy naming a 1M-entry embedding bank and a 1M-hash PDQ
bank, and what PDQ hashing adds to decoding.

- **audit**: ``safeclip.audit.audit()`` in this process, model already loaded, fresh embedding cache each run, on the
  first ``--limit`` photos of /work/shared/corpus/photos; the policy without banks against the same policy plus a
  bank-only category naming both banks (deny; random entries, so nothing matches: the cost is the search). Runs
  alternate and the best of ``--repeat`` is kept. Opening the banks (compiling the policy) is part of the wall time.
- **decode**: per image, what a decode worker does besides hashing (decode with JPEG draft at the model's size,
  prepare pixels) against the PDQ hash of the decoded frames (``safeclip.pdq.pdq_hash``), single process.

The model is the tests' tiny random-weight CLIP (``--model tiny``, where decoding dominates: the worst case for a
relative overhead) or ViT-B-32 with random weights (``--model vit-b-32``). Target: banks add <= 5% to the audit.

    python benchmarks/banks_audit.py [--limit 100] [--entries 1000000] [--repeat 2] [--model tiny|vit-b-32]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _common import photos, vit_b32_checkpoint  # noqa: E402

POLICY = """
name: bench
version: "1"
scoring:
  logit_scale: 100.0
  templates: ["a photo of {}."]
  neutral: ["a landscape"]
categories:
  test_cat:
    prompts: ["a red ball"]
    contrast: ["a blue cube"]
    thresholds: {flag: 0.5, block: null}
"""
BANKS = """
  known:
    banks:
      - path: emb_bank
        effect: deny
        min_similarity: 0.95
      - path: pdq_bank
        effect: deny
        max_distance: 31
"""


def load_encoder(model: str, work: Path) -> Any:
    from safeclip.embed import Encoder

    if model == "tiny":
        from conftest import make_tiny_checkpoint

        folder = work / "tiny-clip"
        if not folder.is_dir():
            make_tiny_checkpoint(folder)
        return Encoder(f"local-dir:{folder}", None, device="cpu", cache_dir=work / "model-cache")
    return Encoder("ViT-B-32", str(vit_b32_checkpoint()), device="cpu", cache_dir=work / "model-cache")


def build_banks(folder: Path, encoder_id: str, dim: int, entries: int, chunk: int = 100_000) -> float:
    """A ``entries``-row embedding bank (random unit vectors) and PDQ bank (random hashes) under ``folder``, kept
    between runs; returns the seconds spent building them (0 when they were there)."""
    from safeclip.banks import Bank, NewEntry

    tag = folder / f"built-{entries}-{dim}-{hashlib.sha256(encoder_id.encode()).hexdigest()[:12]}"
    if tag.exists():
        return 0.0
    shutil.rmtree(folder / "emb_bank", ignore_errors=True)
    shutil.rmtree(folder / "pdq_bank", ignore_errors=True)
    t = time.perf_counter()
    rng = np.random.default_rng(0)
    emb = Bank.create(folder / "emb_bank", "embedding", dim=dim, encoder_id=encoder_id)
    pdq = Bank.create(folder / "pdq_bank", "pdq")
    for start in range(0, entries, chunk):
        n = min(chunk, entries - start)
        v = rng.normal(size=(n, dim)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        emb.add(v, [NewEntry(f"e{start + i}") for i in range(n)], index=False)
        pdq.add(rng.integers(0, 256, (n, 32), dtype=np.uint8), [NewEntry(f"h{start + i}") for i in range(n)],
                index=False)
    emb.rebuild_index()  # a bulk load indexes once, at the end
    pdq.rebuild_index()
    emb.close()
    pdq.close()
    tag.touch()
    return time.perf_counter() - t


def _audit_once(paths: list[str], policy: Path, enc: Any, work: Path) -> float:
    from safeclip.audit import audit

    run = Path(tempfile.mkdtemp(dir=work, prefix="run-"))
    try:
        # The prompt cache is warm (as after any first run); the embedding cache starts empty.
        t = time.perf_counter()
        s = audit(paths, out=run / "out.parquet", cache=run / "cache", encoder=enc, policy=policy, verbose=False,
                  progress=False)
        wall = time.perf_counter() - t
        assert s.errors == 0 and s.rows == len(paths), s
        return wall
    finally:
        shutil.rmtree(run, ignore_errors=True)


def audit_overhead(paths: list[str], *, entries: int = 1_000_000, repeat: int = 2, model: str = "tiny",
                   work: Path | None = None) -> dict[str, Any]:
    """The audit's wall time on ``paths`` with and without the two ``entries``-row banks (best of ``repeat``)."""
    work = Path(work or Path(tempfile.gettempdir()) / "safeclip-bench-banks")
    work.mkdir(parents=True, exist_ok=True)
    enc = load_encoder(model, work)
    build_s = build_banks(work, enc.encoder_id, enc.dim, entries)
    plain, banked = work / "plain.yaml", work / "banked.yaml"
    plain.write_text(POLICY)
    banked.write_text(POLICY + BANKS)
    _audit_once(paths[:4], plain, enc, work)  # warm-up: worker boot, prompt cache
    times: dict[str, list[float]] = {"plain": [], "banks": []}
    for _ in range(repeat):
        times["plain"].append(_audit_once(paths, plain, enc, work))
        times["banks"].append(_audit_once(paths, banked, enc, work))
    best = {k: min(v) for k, v in times.items()}
    return {"images": len(paths), "entries": entries, "model": model, "bank_build_s": build_s,
            "plain_s": best["plain"], "banks_s": best["banks"], "ratio": best["banks"] / best["plain"],
            "runs": times}


def pdq_decode_cost(paths: list[str], size: int = 224) -> dict[str, Any]:
    """Per image, single process: a decode worker's work without PDQ (decode at the model's size, pixels) against
    what it does now (decode at least :data:`~safeclip.pdq.DECODE_SIDE` on the short side, pixels, and
    :func:`~safeclip.pdq.frame_hashes`), alternating the two paths file by file."""
    from safeclip.decode import DecodeLimits, decode
    from safeclip.embed import PixelSpec, prepare_pixels
    from safeclip.pdq import DECODE_SIDE, frame_hashes

    spec = PixelSpec(size=size)
    before = after = 0.0
    for p in paths:
        t = time.perf_counter()
        d = decode(p, limits=DecodeLimits(), target_size=size)
        for f in d.frames:
            prepare_pixels(f, spec, fast=True)
        t1 = time.perf_counter()
        d = decode(p, limits=DecodeLimits(), target_size=max(size, DECODE_SIDE))
        for f in d.frames:
            prepare_pixels(f, spec, fast=True)
        frame_hashes(d.frames)
        t2 = time.perf_counter()
        before += t1 - t
        after += t2 - t1
    n = len(paths)
    return {"images": n, "decode_ms_without_pdq": 1e3 * before / n, "decode_ms_with_pdq": 1e3 * after / n,
            "ratio": after / before}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--model", choices=("tiny", "vit-b-32"), default="tiny")
    args = ap.parse_args()
    paths = [str(p) for p in photos()[:args.limit]]
    cost = pdq_decode_cost(paths)
    print(f"decode: {cost['decode_ms']:.1f} ms/image; PDQ hash of the decoded frames: {cost['pdq_ms']:.1f} "
          f"ms/image; decode with hash / without: {cost['ratio']:.3f}x", flush=True)
    r = audit_overhead(paths, entries=args.entries, repeat=args.repeat, model=args.model)
    if r["bank_build_s"]:
        print(f"built two {r['entries']:,}-entry banks in {r['bank_build_s']:.1f}s")
    print(f"audit of {r['images']} photos ({r['model']} model): no banks {r['plain_s']:.2f}s, with a "
          f"{r['entries']:,}-entry embedding bank + {r['entries']:,}-hash PDQ bank {r['banks_s']:.2f}s: "
          f"{r['ratio']:.3f}x (target <= 1.05); runs {r['runs']}")


if __name__ == "__main__":
    main()
