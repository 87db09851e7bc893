"""Re-scoring a million cached embeddings under a policy, end to end, without the model.

Builds (once; kept under $TMPDIR/safeclip-bench/rescore-<n>) an embedding cache of ``n`` synthetic 512-d unit
vectors under a fake encoder_id, with the prompt-embedding cache pre-filled for the default policy's prompts, then
times `safeclip rescore --cache DIR --encoder-id ID --policy default --out OUT` as a command (Python start-up
included) and, in this process, the scan / score / write split.

    python benchmarks/rescore_1m.py [--n 1000000] [--policy default]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ENCODER_ID = "bench-fake-512|synthetic|px:none"
DIM = 512


def build_cache(folder: Path, n: int, policy: str) -> None:
    from safeclip.cache import CachedImage, EmbeddingCache
    from safeclip.embed import PromptCache
    from safeclip.policy import load_policy
    from safeclip.score import Scorer

    rng = np.random.default_rng(0)
    recorded: list[str] = []

    def fake_texts(texts: list[str]) -> np.ndarray:
        recorded.extend(texts)
        v = rng.standard_normal((len(texts), DIM)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    Scorer(load_policy(policy), fake_texts, encoder_id=ENCODER_ID)
    PromptCache(ENCODER_ID, folder).put(recorded, fake_texts(recorded))

    t = time.perf_counter()
    chunk = 50_000
    with EmbeddingCache(folder, ENCODER_ID) as db:
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            v = rng.standard_normal((m, DIM)).astype(np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            items = [CachedImage(hashlib.sha256(str(start + i).encode()).hexdigest(), v[i:i + 1], (0,), 640, 480, 1,
                                 100_000, "JPEG") for i in range(m)]
            db.put_many(items)
        db.checkpoint()
    print(f"# built a cache of {n} embeddings in {time.perf_counter() - t:.1f}s "
          f"({sum(f.stat().st_size for f in folder.rglob('*') if f.is_file()) / 1e9:.2f} GB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--policy", default="default")
    ap.add_argument("--rebuild", action="store_true")
    args = ap.parse_args()

    folder = Path(tempfile.gettempdir()) / "safeclip-bench" / f"rescore-{args.n}"
    ready = folder / "READY"
    if args.rebuild or not ready.exists():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        build_cache(folder, args.n, args.policy)
        ready.write_text("ok")
    out_dir = Path(tempfile.mkdtemp(prefix="safeclip-rescore-"))
    print(f"# {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    try:
        # Warm the page cache once, as a cache in regular use would be; then time the command end to end.
        subprocess.run(["cat", *map(str, (folder / "embeddings").glob("*.sqlite"))], stdout=subprocess.DEVNULL,
                       check=True)
        out = out_dir / "rescored.parquet"
        cmd = [sys.executable, "-m", "safeclip.cli.audit", "rescore", "--cache", str(folder), "--encoder-id",
               ENCODER_ID, "--policy", args.policy, "--out", str(out)]
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3600)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            raise SystemExit(proc.stderr)
        import pyarrow.parquet as pq

        rows = pq.read_metadata(out).num_rows
        print(proc.stderr.strip())
        print(f"RESULT rescore of {rows} cached embeddings: {wall:.1f}s end to end "
              f"({rows / wall / 1e3:.0f}k rows/s), command incl. Python start-up")

        # Where the time goes, in this process.
        from safeclip.compiled import Views
        from safeclip.audit.rescore import compile_without_model
        from safeclip.cache import EmbeddingCache
        from safeclip.policy import load_policy

        comp = compile_without_model(load_policy(args.policy), ENCODER_ID, folder, None, None, None)
        t_scan = t_score = 0.0
        with EmbeddingCache(folder, ENCODER_ID, readonly=True) as db:
            t = time.perf_counter()
            it = db.scan()
            while True:
                chunk = next(it, None)
                t_scan += time.perf_counter() - t
                if chunk is None:
                    break
                t = time.perf_counter()
                comp.decide(Views(chunk.embeddings, chunk.offsets))
                t_score += time.perf_counter() - t
                t = time.perf_counter()
        print(f"where the time goes (measured again here, one after the other): scanning the cache {t_scan:.1f}s, "
              f"score+calibrate+decide {t_score:.1f}s; the command overlaps the two (a reader thread) and adds "
              "Python start-up, building the table and writing the Parquet file")
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
