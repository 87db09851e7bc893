"""Throughput of `safeclip audit` on ViT-B-32 (random weights: timing only) against a naive loop and a bound.

For each subset of /work/shared/corpus/photos (JPEG; and the decode-heavy PNG and WebP ones):

- **audit (command)**: `safeclip audit FILES --out ... --model ViT-B-32 --pretrained CKPT` as a subprocess, model
  load included, fresh embedding cache (the prompt-embedding cache is warm, as after any first run).
- **naive (command)**: the loop a user would write, also a subprocess with its model load: PIL open, open_clip's
  preprocess, `encode_image` one image at a time (it does not even embed the prompts or decide).
- **bound** = 1 / (t_forward at its best batch size + t_decode), measured in this process: t_forward per image on
  already prepared pixels with every core; t_decode per image = what a decode worker does for one file (read,
  sha256, decode with JPEG draft, prepare pixels), single process.
- **audit (pipeline)**: `safeclip.audit.audit()` in this process with the model already loaded: the steady-state
  rate the bound is about, with the time breakdown (worker-side decode seconds, model seconds, time the model
  waited for decoders).

    python benchmarks/audit_throughput.py [--limit N] [--quick] [--subsets jpeg,png,webp] [--explore]

Targets (2-core CPU): audit >= 1.8x naive, and >= 0.85 of the bound. ``--explore`` also times thread/worker
budgets (decode workers, their nice level, torch threads) on the JPEG subset.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import photos, vit_b32_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SUBSETS = {"jpeg": {".jpg", ".jpeg"}, "png": {".png"}, "webp": {".webp"}, "all": {".jpg", ".jpeg", ".png", ".webp"}}

NAIVE = textwrap.dedent("""
    import sys, torch, open_clip
    from PIL import Image
    ckpt, paths = sys.argv[1], sys.argv[2:]
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=ckpt)
    model.eval()
    with torch.inference_mode():
        for p in paths:
            x = preprocess(Image.open(p).convert("RGB")).unsqueeze(0)
            f = model.encode_image(x)
            f = f / f.norm(dim=-1, keepdim=True)
""")


def audit_command() -> list[str]:
    """`safeclip audit` through the main CLI when it registers the subcommand, else through audit_cli."""
    import contextlib
    import io

    try:
        from safeclip.cli import build_parser

        with contextlib.redirect_stderr(io.StringIO()):
            build_parser().parse_args(["audit", "x", "--out", "y"])
        return [sys.executable, "-m", "safeclip.cli"]
    except SystemExit:
        return [sys.executable, "-m", "safeclip.cli.audit"]


def run_command(cmd: list[str]) -> tuple[float, str]:
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"{cmd[:4]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall, proc.stderr


def fresh_cache(base: Path) -> Path:
    """A cache folder with the prompt embeddings and encoder memo of `base`, and no image embeddings."""
    d = Path(tempfile.mkdtemp(prefix="safeclip-bench-cache-"))
    if (base / "text").is_dir():
        shutil.copytree(base / "text", d / "text")
    if (base / "encoders.json").is_file():
        shutil.copy(base / "encoders.json", d / "encoders.json")
    return d


def measure_bound(enc, files: list[Path], batch_sizes: list[int], fast: bool = True) -> dict:
    import numpy as np

    from safeclip.decode import decode, read_source
    from safeclip.embed import prepare_pixels

    spec = enc.pixel_spec
    pixels = []
    split = {"read+hash": 0.0, "decode": 0.0, "prepare": 0.0}
    for p in files:
        t0 = time.perf_counter()
        data, _ = read_source(p)
        hashlib.sha256(data).hexdigest()
        t1 = time.perf_counter()
        dec = decode(data, target_size=spec.size if fast else None)
        t2 = time.perf_counter()
        pixels.extend(prepare_pixels(f, spec, fast=fast) for f in dec.frames)
        t3 = time.perf_counter()
        split["read+hash"] += t1 - t0
        split["decode"] += t2 - t1
        split["prepare"] += t3 - t2
    t_dec = sum(split.values()) / len(files)
    px = np.stack(pixels)
    fwd = {}
    saved = enc.batch_size
    try:
        for bs in batch_sizes:
            enc.batch_size = bs
            x = np.resize(px, (max(bs, 2 * bs), *px.shape[1:]))
            enc.embed_pixels(x[:bs])  # warm-up
            n, t = 0, time.perf_counter()
            while time.perf_counter() - t < 3.0 or n < 2 * bs:
                enc.embed_pixels(x[:bs])
                n += bs
            fwd[bs] = (time.perf_counter() - t) / n
    finally:
        enc.batch_size = saved
    best = min(fwd, key=fwd.get)
    return {"t_decode": t_dec, "t_forward": fwd[best], "best_batch": best, "forward_by_batch": fwd,
            "bound": 1.0 / (fwd[best] + t_dec), "decode_split": {k: v / len(files) for k, v in split.items()}}


def pipeline(enc, files: list[Path], base_cache: Path, **kw) -> object:
    from safeclip.audit import audit

    cache = fresh_cache(base_cache)
    out = cache / "out.parquet"
    try:
        return audit([str(p) for p in files], out=out, cache=cache, encoder=enc, verbose=False, **kw)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, help="at most N files per subset")
    ap.add_argument("--quick", action="store_true", help="--limit 24, JPEG only, one batch size for the bound")
    ap.add_argument("--subsets", default="jpeg,png,webp", help="comma-separated: jpeg, png, webp, all")
    ap.add_argument("--no-naive", action="store_true", help="skip the naive loop for the PNG/WebP subsets")
    ap.add_argument("--explore", action="store_true", help="also time other worker/thread budgets (JPEG)")
    ap.add_argument("--batch-sizes", default="1,8,16,32")
    args = ap.parse_args()
    if args.quick:
        args.limit = args.limit or 24
        args.subsets = "jpeg"
        args.batch_sizes = "16"

    import torch

    from safeclip.embed import Encoder

    ckpt = vit_b32_checkpoint()
    cores = len(os.sched_getaffinity(0))
    print(f"# {cores} cores, torch {torch.__version__}, load average {os.getloadavg()[0]:.2f} at start; "
          f"checkpoint {ckpt}")
    base_cache = Path(tempfile.mkdtemp(prefix="safeclip-bench-base-"))
    torch.set_num_threads(cores)
    t = time.perf_counter()
    enc = Encoder("ViT-B-32", str(ckpt), device="cpu", cache_dir=base_cache)
    print(f"# Encoder load in this process: {time.perf_counter() - t:.1f}s (Python imports excluded)")
    cmd0 = audit_command()
    # A first audit with this model (2 files) leaves what any later run finds in the cache folder: the prompt
    # embeddings and the encoder's identity (which lets decoding start while the model loads).
    warm = [*cmd0, "audit", *map(str, photos()[:2]), "--out", str(base_cache / "warm.parquet"), "--model",
            "ViT-B-32", "--pretrained", str(ckpt), "--cache", str(base_cache), "--no-progress", "--device", "cpu"]
    wall, _ = run_command(warm)
    shutil.rmtree(base_cache / "embeddings", ignore_errors=True)
    print(f"# first-ever audit command (2 files, cold prompt cache): {wall:.1f}s")
    results = []
    for name in args.subsets.split(","):
        files = photos(SUBSETS[name])[: args.limit]
        n = len(files)
        print(f"\n## {name}: {n} files, {sum(p.stat().st_size for p in files) / 1e6:.1f} MB")
        b = measure_bound(enc, files, [int(x) for x in args.batch_sizes.split(",")])
        fwd = ", ".join(f"b{k}: {v * 1e3:.1f}" for k, v in b["forward_by_batch"].items())
        dsplit = " + ".join(f"{k} {v * 1e3:.1f}" for k, v in b["decode_split"].items())
        print(f"forward ms/img ({fwd}); t_decode {b['t_decode'] * 1e3:.1f} ms/img single process ({dsplit}) "
              f"-> bound {b['bound']:.2f} img/s")

        s = pipeline(enc, files, base_cache)
        tm = s.timings
        pipe = n / (s.seconds - s.startup_seconds)
        print(f"audit (pipeline, model loaded): {pipe:.2f} img/s = {pipe / b['bound']:.2f}x bound | model "
              f"{tm['embed_s']:.1f}s, waiting for decoders {tm['wait_s']:.1f}s, workers read+hash "
              f"{tm['read_s']:.1f}s + decode+prepare {tm['decode_s']:.1f}s (summed over workers), scoring "
              f"{tm['score_s']:.2f}s, writes {tm['write_s'] + tm['merge_s']:.2f}s")

        cache = fresh_cache(base_cache)
        try:
            cmd = [*cmd0, "audit", *map(str, files), "--out", str(cache / "out.parquet"), "--model", "ViT-B-32",
                   "--pretrained", str(ckpt), "--cache", str(cache), "--no-progress", "--device", "cpu"]
            wall, err = run_command(cmd)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        m = re.search(r"model load ([\d.]+)s", err)
        load = float(m.group(1)) if m else float("nan")
        cmd_rate = n / wall
        print(f"audit (command): {wall:.1f}s wall = {cmd_rate:.2f} img/s = {cmd_rate / b['bound']:.2f}x bound "
              f"(of which model load {load:.1f}s inside audit(); after it: {n / (wall - load):.2f} img/s)")

        naive_rate = None
        if name == "jpeg" or not args.no_naive:
            wall_n, _ = run_command([sys.executable, "-c", NAIVE, str(ckpt), *map(str, files)])
            naive_rate = n / wall_n
            print(f"naive loop (command): {wall_n:.1f}s wall = {naive_rate:.2f} img/s")
            print(f"RATIO audit/naive = {cmd_rate / naive_rate:.2f}x (target >= 1.8)")
        print(f"RATIO audit/bound = {cmd_rate / b['bound']:.2f} whole command, {pipe / b['bound']:.2f} pipeline "
              "(target >= 0.85)")
        results.append((name, n, b, pipe, cmd_rate, naive_rate))

        if args.explore and name == "jpeg":
            print("\n### thread/worker budgets (pipeline, JPEG)")
            for workers, nice, threads in ((1, 0, cores), (1, 10, cores), (cores, 0, cores), (cores, 10, cores),
                                           (1, 0, max(1, cores - 1)), (cores + 1, 10, cores)):
                torch.set_num_threads(cores)
                s = pipeline(enc, files, base_cache, workers=workers, worker_nice=nice, torch_threads=threads)
                rate = n / (s.seconds - s.startup_seconds)
                print(f"workers {workers} nice {nice:2d} torch threads {threads}: {rate:.2f} img/s "
                      f"({rate / b['bound']:.2f}x bound), model waited {s.timings['wait_s']:.1f}s")
            torch.set_num_threads(cores)

    print("\n## summary (img/s)")
    print("subset  files  bound  pipeline  command  naive   cmd/naive  cmd/bound  pipe/bound")
    for name, n, b, pipe, cmd_rate, naive_rate in results:
        nv = f"{naive_rate:6.2f}" if naive_rate else "     -"
        rn = f"{cmd_rate / naive_rate:9.2f}" if naive_rate else "        -"
        print(f"{name:6s} {n:6d} {b['bound']:6.2f} {pipe:9.2f} {cmd_rate:8.2f} {nv} {rn} "
              f"{cmd_rate / b['bound']:10.2f} {pipe / b['bound']:11.2f}")
    print(f"# load average {os.getloadavg()[0]:.2f} at end (other processes on these cores skew timings)")
    shutil.rmtree(base_cache, ignore_errors=True)


if __name__ == "__main__":
    main()
