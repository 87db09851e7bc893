"""Issue 23 item 4: the CUDA path, end to end, in one short script. Run it whenever a GPU machine is available.

ViT-B-32 with RANDOM weights (the real model's compute; nothing printed is a moderation result), on N generated
JPEGs (default 3000, 1280x960, cut and re-encoded from the photo corpus so decoding is real work):

1. forward img/s at batch 64 on prepared pixels: torch fp32, torch fp16 autocast, ONNX Runtime's CUDA provider (fp32,
   needs ``onnxruntime-gpu``);
2. decode: PIL/libvips on the CPU cores (what the audit's decode workers do per file) vs nvJPEG
   (``torchvision.io.decode_jpeg(device="cuda")``, batched) with the resize to the model's input on the GPU;
3. the whole `safeclip audit` command on the N files (process start to exit, warm caches): ``--runtime torch
   --precision fp16`` and ``--runtime onnx``, img/s.

    python benchmarks/gpu.py [--n 3000] [--device cuda] [--skip-audit]

Without a GPU it says so and exits 0; ``--device cpu --n 32`` runs the same code on the CPU (a smoke test of the
script, not a measurement worth quoting).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import photos, vit_b32_checkpoint  # noqa: E402


def make_images(folder: Path, n: int) -> list[Path]:
    """``n`` 1280x960 JPEGs cut from the photo corpus at shifting offsets (each file different)."""
    from PIL import Image

    srcs = []
    for p in photos({".jpg", ".jpeg", ".png", ".webp"}):
        with Image.open(p) as im:
            if min(im.size) >= 480:
                srcs.append(im.convert("RGB").resize((1600, 1200)))
        if len(srcs) >= 24:
            break
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        im = srcs[i % len(srcs)]
        dx, dy = (i * 7) % 320, (i * 13) % 240
        path = folder / f"gen-{i:05d}.jpg"
        im.crop((dx, dy, dx + 1280, dy + 960)).save(path, quality=90)
        out.append(path)
    return out


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:8.1f} img/s"


def forward_section(ckpt: str, cache: Path, device: str, n: int) -> None:
    import numpy as np

    from safeclip.embed import Encoder

    print(f"\n1. forward at batch 64 on prepared pixels ({device})")
    px = np.random.default_rng(0).integers(0, 256, (min(n, 1024), 224, 224, 3), dtype=np.uint8)
    runs = [("torch fp32", "torch", "fp32"), ("torch fp16", "torch", "fp16"), ("onnx fp32", "onnx", "fp32")]
    for label, runtime, precision in runs:
        if device == "cpu" and precision == "fp16":
            continue
        try:
            enc = Encoder("ViT-B-32", ckpt, device=device, runtime=runtime, precision=precision, batch_size=64,
                          cache_dir=cache)
        except Exception as e:  # e.g. no onnxruntime-gpu: say so and go on
            print(f"   {label:11s} not run: {type(e).__name__}: {e}")
            continue
        enc.embed_pixels(px[:64])
        _sync(device)
        t = time.perf_counter()
        enc.embed_pixels(px)
        _sync(device)
        print(f"   {label:11s} {rate(len(px), time.perf_counter() - t)}")
        del enc


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def decode_section(files: list[Path], device: str) -> None:
    from safeclip.embed import DecodeOptions, PixelSpec, prepare

    spec = PixelSpec(size=224)
    k = min(len(files), 256)
    cores = len(os.sched_getaffinity(0))
    print(f"\n2. decode + resize to 224 px, {k} files")
    t = time.thread_time()
    for p in files[:k]:
        prepare(p.read_bytes(), spec, DecodeOptions())
    per = (time.thread_time() - t) / k
    print(f"   CPU (safeclip's prepare, default backend): {per * 1e3:.1f} core-ms/img -> {cores / per:.1f} img/s on "
          f"{cores} cores")
    if not device.startswith("cuda"):
        print("   nvJPEG: needs CUDA; not run")
        return
    import torch
    import torchvision
    from torchvision.io import decode_jpeg

    datas = [torchvision.io.read_file(str(p)) for p in files[:k]]
    decode_jpeg(datas[:8], device=device)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(0, k, 64):
        imgs = decode_jpeg(datas[i:i + 64], device=device)
        batch = torch.stack([torch.nn.functional.interpolate(im[None].float(), size=(224, 224), mode="bilinear",
                                                             antialias=True)[0] for im in imgs])
        batch.to(torch.uint8)
    torch.cuda.synchronize()
    print(f"   nvJPEG + GPU resize (torchvision, batches of 64): {rate(k, time.perf_counter() - t)}")


def audit_section(files: list[Path], ckpt: str, cache: Path, device: str) -> None:
    print(f"\n3. whole `safeclip audit` on {len(files)} files ({device}), warm caches")
    configs = [("torch fp16", ["--runtime", "torch", "--precision", "fp16"]), ("onnx fp32", ["--runtime", "onnx"])]
    if device == "cpu":
        configs = [("onnx fp32", ["--runtime", "onnx"])]
    for label, extra in configs:
        base = [sys.executable, "-m", "safeclip", "audit", "--model", "ViT-B-32", "--pretrained", ckpt, "--cache",
                str(cache), "--device", device, "--no-progress", *extra]
        warm = subprocess.run([*base, str(files[0]), "--out", str(cache / "warm.parquet")], capture_output=True,
                              text=True)
        if warm.returncode not in (0, 1):
            print(f"   {label:11s} not run: {warm.stderr.strip().splitlines()[-1] if warm.stderr else warm.returncode}")
            continue
        shutil.rmtree(cache / "embeddings", ignore_errors=True)
        t = time.perf_counter()
        r = subprocess.run([*base, *map(str, files), "--out", str(cache / "out.parquet")], capture_output=True,
                           text=True)
        wall = time.perf_counter() - t
        if r.returncode not in (0, 1):
            print(f"   {label:11s} failed: {r.stderr[-500:]}")
            continue
        print(f"   {label:11s} {wall:6.1f} s whole command = {rate(len(files), wall)}")
        (cache / "out.parquet").unlink(missing_ok=True)
        shutil.rmtree(cache / "embeddings", ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--skip-audit", action="store_true")
    args = ap.parse_args()
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device here: nothing measured (run this on a GPU machine; --device cpu for a smoke test)")
            return
        print(f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print("Random-weight ViT-B-32: real compute, NOT a moderation result.")
    ckpt = str(vit_b32_checkpoint())
    work = Path(tempfile.mkdtemp(prefix="safeclip-bench-gpu-"))
    try:
        t = time.perf_counter()
        files = make_images(work / "images", args.n)
        print(f"# generated {len(files)} JPEGs in {time.perf_counter() - t:.1f} s")
        forward_section(ckpt, work / "cache", args.device, args.n)
        decode_section(files, args.device)
        if not args.skip_audit:
            audit_section(files, ckpt, work / "cache", args.device)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
