"""Shared benchmark helpers: a ViT-B-32 checkpoint with random weights (timing only), corpus paths, stats.

Random weights have exactly the cost of real ones; nothing a benchmark prints is a moderation result.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

CORPUS = Path(os.environ.get("SAFECLIP_CORPUS", Path(__file__).resolve().parents[2] / "shared" / "corpus"))
PHOTOS = CORPUS / "photos"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


def photos(suffixes: set[str] | None = None) -> list[Path]:
    keep = suffixes or IMAGE_SUFFIXES
    return sorted(p for p in PHOTOS.iterdir() if p.suffix.lower() in keep)


def vit_b32_checkpoint() -> Path:
    """A ViT-B-32 state_dict with random weights, made once and kept in the temp folder."""
    path = Path(os.environ.get("SAFECLIP_BENCH_CKPT", Path(tempfile.gettempdir()) / "safeclip-bench" /
                                "vit-b-32-random.pt"))
    if not path.is_file():
        import open_clip
        import torch

        path.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        model = open_clip.create_model("ViT-B-32")
        tmp = path.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, path)
    return path


def timings(fn: Callable[[], object], repeat: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def summary(xs: list[float]) -> str:
    return f"p50 {pct(xs, .5) * 1e3:7.1f} ms  p95 {pct(xs, .95) * 1e3:7.1f} ms  mean {statistics.fmean(xs) * 1e3:7.1f} ms"
