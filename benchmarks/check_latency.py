"""Request-path costs of Moderator.check on ViT-B-32 (CPU unless a GPU is present).

1. p50/p95 of `check` on a large JPEG (>= 8 MP) and a ~1-MP PNG against the bare batch-1 forward
   (`encode_image` on an already-preprocessed tensor): the ratio is what decode, preprocessing, scoring and the
   decision add. Target: check <= 1.25x the bare forward.
2. `check_many` on 64 photos against 64 sequential `check` calls. Target: >= 1.5x on CPU.
3. Start-up: `Moderator(...)` to the first decision with a cold prompt cache vs a warm one.

    python benchmarks/check_latency.py [--repeat 30]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import photos, summary, timings, vit_b32_checkpoint, pct  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--many", type=int, default=64)
    args = ap.parse_args()

    import numpy as np
    import torch
    from PIL import Image

    import safeclip

    ckpt = str(vit_b32_checkpoint())
    cache = tempfile.mkdtemp(prefix="safeclip-bench-cache-")

    t0 = time.perf_counter()
    m = safeclip.Moderator(model="ViT-B-32", pretrained=ckpt, cache_dir=cache)
    big_jpeg = next(p for p in photos({".jpg"}) if Image.open(p).size[0] * Image.open(p).size[1] >= 8e6)
    m.check(big_jpeg)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    m2 = safeclip.Moderator(model="ViT-B-32", pretrained=ckpt, cache_dir=cache)
    m2.check(big_jpeg)
    warm = time.perf_counter() - t0
    del m2

    png = min(photos({".png"}), key=lambda p: abs(Image.open(p).size[0] * Image.open(p).size[1] - 1e6))
    print(f"device {m.encoder.device}, runtime {m.encoder.runtime}, torch threads {torch.get_num_threads()}, "
          f"{m.encoder_id}")
    size = m.encoder.pixel_spec.size
    x = np.random.default_rng(0).integers(0, 256, (1, size, size, 3), dtype=np.uint8)

    def bare() -> None:  # the encoder's own batch-1 forward on prepared pixels: the bound check() can approach
        m.encoder.embed_pixels(x)

    fwd = timings(bare, args.repeat)
    print(f"bare batch-1 forward          {summary(fwd)}")
    for label, path in (("large JPEG", big_jpeg), ("1-MP PNG", png)):
        w, h = Image.open(path).size
        t = timings(lambda: m.check(path), args.repeat)
        print(f"check {label:10s} {w}x{h:<6d} {summary(t)}   ratio p50 {pct(t, .5) / pct(fwd, .5):.2f}x"
              f"  p95 {pct(t, .95) / pct(fwd, .95):.2f}x (target <= 1.25x)")
        exact = safeclip.Moderator(model="ViT-B-32", pretrained=ckpt, cache_dir=cache, fast_decode=False,
                                   encoder=m.encoder)
        t = timings(lambda: exact.check(path), max(5, args.repeat // 3), warmup=1)
        print(f"  (without JPEG draft decoding: {summary(t)}   ratio p50 {pct(t, .5) / pct(fwd, .5):.2f}x)")

    sample = photos()[: args.many]
    t = time.perf_counter()
    for p in sample:
        m.check(p)
    seq = time.perf_counter() - t
    t = time.perf_counter()
    m.check_many(sample)
    many = time.perf_counter() - t
    print(f"{len(sample)} photos: sequential check {seq:.2f} s ({len(sample) / seq:.1f} img/s), check_many "
          f"{many:.2f} s ({len(sample) / many:.1f} img/s): ratio {seq / many:.2f}x (target >= 1.5x)")
    print(f"start-up to first decision: cold prompt cache {cold:.2f} s, warm {warm:.2f} s: ratio {cold / warm:.2f}x")


if __name__ == "__main__":
    main()
