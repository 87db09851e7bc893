"""What bank matching adds to deciding, against the model's own time, measured in one process (so a loaded box
inflates both sides alike): a 1M-entry embedding bank and a 1M-hash PDQ bank (random rows) behind a policy, ViT-B-32
with random weights (its cost is that of real weights; nothing here is a moderation result).

    python benchmarks/banks_share.py [--entries 1000000] [--images 64]

Prints the per-image matching time for a batch (an audit's batch unit) and for one input at a time (a ``check``),
each as a share of the model's time for the same images.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import banks_audit  # noqa: E402
from _common import photos  # noqa: E402


def matching_share(entries: int = 1_000_000, images: int = 64, work: Path | None = None) -> dict:
    from safeclip.compiled import CompiledPolicy, Views
    from safeclip.embed import prepare
    from safeclip.policy import load_policy

    work = Path(work or Path(tempfile.gettempdir()) / "safeclip-bench-banks")
    work.mkdir(parents=True, exist_ok=True)
    enc = banks_audit.load_encoder("vit-b-32", work)
    banks_audit.build_banks(work, enc.encoder_id, enc.dim, entries)
    (work / "plain.yaml").write_text(banks_audit.POLICY)
    (work / "banked.yaml").write_text(banks_audit.POLICY + banks_audit.BANKS)
    preps = [prepare(str(f), enc.pixel_spec) for f in photos({".jpg", ".jpeg"})[:images]]
    t = time.perf_counter()
    emb = enc.embed_pixels(np.concatenate([p.pixels for p in preps]))
    embed_batch = time.perf_counter() - t
    t = time.perf_counter()
    enc.embed_pixels(preps[0].pixels)
    embed_one = time.perf_counter() - t
    out: dict = {"entries": entries, "images": len(preps), "embed_ms_per_image_batched": 1e3 * embed_batch / len(preps),
                 "embed_ms_one_image": 1e3 * embed_one}
    for name in ("plain", "banked"):
        t = time.perf_counter()
        comp = CompiledPolicy.build(load_policy(work / f"{name}.yaml"), enc.embed_texts, enc.encoder_id)
        out[f"compile_s_{name}"] = time.perf_counter() - t
        views = Views.single(emb).with_pdq([(p.pdq, p.pdq_quality) for p in preps])
        comp.decide(views, record=False)
        out[f"decide_ms_batch_{name}"] = 1e3 * min(
            _timed(lambda: comp.decide(views, record=False)) for _ in range(5))
        singles = [Views.single(emb[i:i + 1]).with_pdq([(p.pdq, p.pdq_quality)]) for i, p in enumerate(preps)]
        out[f"decide_ms_one_{name}"] = 1e3 * statistics.median(
            _timed(lambda v=v: comp.decide(v, record=False)) for v in singles)
    batch_extra = (out["decide_ms_batch_banked"] - out["decide_ms_batch_plain"]) / len(preps)
    one_extra = out["decide_ms_one_banked"] - out["decide_ms_one_plain"]
    out["matching_ms_per_image_batched"] = batch_extra
    out["share_of_model_batched"] = batch_extra / out["embed_ms_per_image_batched"]
    out["matching_ms_one_check"] = one_extra
    out["share_of_model_one_check"] = one_extra / out["embed_ms_one_image"]
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--images", type=int, default=64)
    args = ap.parse_args()
    print(json.dumps(matching_share(args.entries, args.images), indent=1))


if __name__ == "__main__":
    main()
