"""Every Decision on the photo corpus, as JSON, so a refactor can prove it changed none of them byte for byte.

Runs the request path (``Moderator.check_many``, ``check`` one by one, ``decide`` on cached embeddings), an audit
and a rescore over ``../shared/corpus/photos`` and ``../shared/corpus/tricky`` (transparent, animated, rotated
files) with a tiny random-weight open_clip model (seeded, so every run builds the same weights), under the shipped
``default`` and ``strict`` policies, and writes one JSON line per decision. Random weights: the decisions are
mechanics, never a moderation result.

    python benchmarks/decisions_golden.py --write before.jsonl     # on the old code
    python benchmarks/decisions_golden.py --compare before.jsonl   # on the new code: prints identical / differing
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CORPUS, photos  # noqa: E402

TINY_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def tiny_model(folder: Path) -> str:
    import open_clip
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CFG)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG, "preprocess_cfg": {}}))
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return f"local-dir:{folder}"


def inputs() -> list[Path]:
    tricky = sorted(p for p in (CORPUS / "tricky").iterdir()
                    if p.suffix.lower() in {".png", ".gif", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp"})
    return photos() + tricky


def records(work: Path) -> list[str]:
    import numpy as np
    import pyarrow.parquet as pq

    import safeclip

    model = tiny_model(work / "model")
    cache = work / "cache"
    files = inputs()
    lines: list[str] = []

    def add(kind: str, name: str, payload: dict) -> None:
        payload = dict(payload)
        if payload.get("source"):
            payload["source"] = os.path.basename(payload["source"])
        lines.append(json.dumps({"kind": kind, "input": name, "decision": payload}, sort_keys=True))

    for policy in ("default", "strict"):
        m = safeclip.Moderator(policy=policy, model=model, cache_dir=cache, device="cpu", runtime="torch",
                               on_error="block", batch_size=16)
        for f, d in zip(files, m.check_many([str(f) for f in files])):
            add(f"check_many/{policy}", f.name, d.to_dict())
        for f in files[-40:]:  # transparent and animated files take the micro-batcher's path
            add(f"check/{policy}", f.name, m.check(str(f)).to_dict())
        rng = np.random.default_rng(7)
        emb = rng.normal(size=(64, m.encoder.dim)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        for i, d in enumerate(m.decide(emb)):
            add(f"decide/{policy}", f"random-{i}", d.to_dict())

    # batch_size=1: every image is scored in a forward of its own, so the rows do not depend on which files happened
    # to share a batch (float32 scoring differs in the last bits between batch layouts).
    out = work / "audit.parquet"
    safeclip.audit([str(f) for f in files], out=str(out), policy="strict", model=model, cache=str(cache),
                   device="cpu", runtime="torch", batch_size=1, workers=2, verbose=False)
    for policy, path in (("strict", out), ("default", work / "rescore.parquet")):
        if policy == "default":
            safeclip.rescore(out=str(path), policy="default", from_audit=str(out), cache=str(cache), verbose=False)
        t = pq.read_table(path).to_pylist()
        for row in t:
            row = {k: v for k, v in row.items() if k not in ("path", "path_bytes")}
            add(f"audit-row/{policy}", os.path.basename(row.get("sha256") or ""), row)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--write", type=Path)
    g.add_argument("--compare", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="safeclip-golden-") as tmp:
        lines = records(Path(tmp))
    if args.write:
        args.write.write_text("\n".join(lines) + "\n")
        print(f"wrote {len(lines)} decisions to {args.write}")
        return
    before = args.compare.read_text().splitlines()
    same = sum(a == b for a, b in zip(before, lines))
    differ = [i for i, (a, b) in enumerate(zip(before, lines)) if a != b]
    print(f"decisions: {len(lines)} now, {len(before)} before; byte-identical: {same}; differing: {len(differ)}"
          + (f"; count differs by {len(lines) - len(before)}" if len(lines) != len(before) else ""))
    for i in differ[:5]:
        print(f"  before: {before[i][:300]}\n  now:    {lines[i][:300]}")
    sys.exit(0 if same == len(before) == len(lines) else 1)


if __name__ == "__main__":
    main()
