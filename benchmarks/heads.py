"""What LAION's heads add to re-scoring: the numpy path on cached embeddings under the LAION policies vs `default`.

Scores ``n`` synthetic unit embeddings (no model: prompt embeddings are random unit vectors, heads are LAION's real
ones read from ``$SAFECLIP_ARTIFACTS_DIR``, default ``../shared/peers/laion-nsfw``) through ``Scorer.score`` ->
``calibrate`` -> ``decide_codes``, chunked as ``safeclip rescore`` does, and prints embeddings/s for

- ``default`` (7 prompt categories) and ``laion-nsfw-b32`` (the same + LAION's B/32 head + violence vectors), 512-d;
- ``laion-nsfw-l14`` at 768-d (the L/14 head is ~7x the B/32 head's multiply-adds);
- each head alone (``MLPHead.decision_function``), and the ratio of the LAION policy's time to ``default``'s.

    python benchmarks/heads.py [--n 200000] [--chunk 65536]

Prints numbers and ratios only; nothing is asserted. Best-of-3 wall clock.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.normal(size=(n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _best(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--chunk", type=int, default=65_536)
    args = ap.parse_args()
    os.environ.setdefault("SAFECLIP_ARTIFACTS_DIR", str(REPO.parent / "shared" / "peers" / "laion-nsfw"))
    os.environ.setdefault("SAFECLIP_CACHE_DIR", str(Path(tempfile.gettempdir()) / "safeclip-bench" / "cache"))
    os.environ["SAFECLIP_OFFLINE"] = "1"

    from safeclip.compiled import CompiledPolicy
    from safeclip.decide import decide_codes
    from safeclip.embed import tag_encoder_id
    from safeclip.policy import load_policy

    rng = np.random.default_rng(0)

    def texts(d: int):
        return lambda t: _unit(rng, len(t), d)

    results: dict[str, float] = {}
    for name, model, d in (("default", "ViT-B-32", 512), ("laion-nsfw-b32", "ViT-B-32", 512),
                           ("laion-nsfw-l14", "ViT-L-14", 768)):
        comp = CompiledPolicy.build(load_policy(name), texts(d), tag_encoder_id(model, "openai"))
        x = _unit(rng, args.n, d)

        def run() -> None:
            for i in range(0, args.n, args.chunk):
                probs, _ = comp.probabilities(comp.scorer.score(x[i:i + args.chunk]))
                decide_codes(probs, comp.policy)

        t = _best(run)
        results[name] = t
        print(f"{name:16s} {d}-d  {args.n / t:12,.0f} embeddings/s  ({t * 1e3:.0f} ms for {args.n:,})")
        for cat, head in comp.scorer.heads.items():
            th = _best(lambda: [head.decision_function(x[i:i + args.chunk]) for i in range(0, args.n, args.chunk)])
            print(f"    {cat:9s} head {head!r}: {args.n / th:12,.0f} rows/s alone ({th / t:.0%} of the policy)")
    print(f"laion-nsfw-b32 / default time ratio: {results['laion-nsfw-b32'] / results['default']:.2f}x")
    print(f"laion-nsfw-l14 / default time ratio: {results['laion-nsfw-l14'] / results['default']:.2f}x "
          "(768-d embeddings as well as the bigger head)")


if __name__ == "__main__":
    main()
