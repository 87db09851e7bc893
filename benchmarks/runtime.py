"""The CPU runtimes side by side, every figure measured in this one run (the machine is shared: ratios, not absolutes).

Timing uses a ViT-B-32 with RANDOM weights: exactly the compute of the real model, so the times are real, but no
embedding or decision printed here is a moderation result, and the int8 cosines say nothing about int8 on real
weights (``safeclip runtime verify`` measures that on your images with your weights).

1. image forward ms/img at batch 1 and 16: torch eager vs ONNX Runtime fp32 vs dynamic int8 (target fp32 >= 2x torch)
2. ``safeclip audit`` as a whole command (process start to exit) on the JPEGs of the photo corpus, warm caches (export
   and prompts cached, embeddings not): ONNX vs torch (``SAFECLIP_RUNTIME``), and NudeNet's detector loop on the same
   files in its own venv under /tmp (target: no slower than NudeNet; steady-state img/s >= 1.8x torch)
3. process start to the first decision (Moderator + check), warm caches (target <= 1.0 s)
4. peak RSS of a ready Moderator after one check, fp32 and int8 (targets <= 500 MB, <= 250 MB)
5. check p50/p95 on a >= 8-MP JPEG and a ~1-MP PNG, ONNX vs torch
6. cosine of ONNX fp32 embeddings to open_clip's own encode_image(preprocess(img)) on real photos (>= 0.99999)

    python benchmarks/runtime.py [--repeat 20] [--skip-nudenet]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import pct, photos, summary, timings, vit_b32_checkpoint  # noqa: E402

NUDENET_VENV = Path(tempfile.gettempdir()) / "safeclip-bench" / "nudenet-venv"


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"


def run_timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, subprocess.CompletedProcess]:
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    wall = time.perf_counter() - t
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{cmd[:4]}... failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return wall, proc


def warm_copy(base: Path) -> Path:
    """A cache with the export and the prompts of ``base`` but no embeddings (hard links: instant)."""
    d = Path(tempfile.mkdtemp(prefix="safeclip-bench-run-"))
    shutil.rmtree(d)
    shutil.copytree(base, d, copy_function=os.link, ignore=shutil.ignore_patterns("embeddings", "*.lock"))
    return d


def forward_section(ckpt: str, base: Path, repeat: int) -> None:
    import numpy as np
    import torch

    from safeclip.embed import Encoder

    rng = np.random.default_rng(0)
    px = rng.integers(0, 256, (16, 224, 224, 3), dtype=np.uint8)
    encs = {"torch": Encoder("ViT-B-32", ckpt, cache_dir=base, runtime="torch"),
            "onnx fp32": Encoder("ViT-B-32", ckpt, cache_dir=base, runtime="onnx"),
            "onnx int8": Encoder("ViT-B-32", ckpt, cache_dir=base, runtime="onnx", precision="int8")}
    print(f"\n1. image forward, ViT-B-32 (random weights), torch {torch.get_num_threads()} threads, ORT "
          f"{encs['onnx fp32'].threads or os.cpu_count()} intra-op threads")
    ms = {}
    for name, enc in encs.items():
        b1 = timings(lambda: enc.embed_pixels(px[:1]), repeat)
        b16 = timings(lambda: enc.embed_pixels(px), max(3, repeat // 4))
        ms[name] = (pct(b1, .5) * 1e3, pct(b16, .5) * 1e3 / 16)
    ref = encs["torch"].embed_pixels(px)
    for name, (one, sixteen) in ms.items():
        cos = float((encs[name].embed_pixels(px) * ref).sum(1).min())
        print(f"   {name:10s} batch 1 {one:6.1f} ms   batch 16 {sixteen:6.1f} ms/img   "
              f"speed-up vs torch {ms['torch'][0] / one:4.2f}x / {ms['torch'][1] / sixteen:4.2f}x   "
              f"min cosine to torch {cos:.7f}")
    print("   (int8 cosine on random weights and noise images: not a measure of int8 on real weights)")
    del encs


AUDIT_RE = re.compile(r"(\d+) processed in ([\d.]+)s \(([\d.]+) images/s, model load ([\d.]+)s\)")


def audit_section(ckpt: str, base: Path, jpegs: list[Path], skip_nudenet: bool) -> None:
    print(f"\n2. `safeclip audit` on {len(jpegs)} JPEGs of the photo corpus, whole command, warm caches "
          "(export + prompts cached, embeddings not)")
    rows = {}
    for runtime in ("onnx", "torch"):
        walls, steady = [], []
        for _ in range(2):
            cache = warm_copy(base)
            out = cache / "audit.parquet"
            wall, proc = run_timed([sys.executable, "-m", "safeclip", "audit", *map(str, jpegs), "--out", str(out),
                                    "--cache", str(cache), "--model", "ViT-B-32", "--pretrained", ckpt,
                                    "--no-progress"], env={"SAFECLIP_RUNTIME": runtime})
            m = AUDIT_RE.search(proc.stdout + proc.stderr)
            walls.append(wall)
            if m:
                n, total, _, model_load = (float(g) for g in m.groups())
                steady.append(n / max(1e-9, total - model_load))
            shutil.rmtree(cache, ignore_errors=True)
        rows[runtime] = (min(walls), max(steady) if steady else float("nan"))
        print(f"   safeclip {runtime:5s}  {rows[runtime][0]:5.2f} s whole command   "
              f"steady state {rows[runtime][1]:6.1f} img/s")
    print(f"   ONNX vs torch: whole command {rows['torch'][0] / rows['onnx'][0]:.2f}x faster, "
          f"steady state {rows['onnx'][1] / rows['torch'][1]:.2f}x the img/s (target >= 1.8x)")
    if skip_nudenet:
        return
    py = nudenet_python()
    if py is None:
        print("   NudeNet: could not be installed in its venv; skipped")
        return
    script = ("import sys\nfrom nudenet import NudeDetector\nd = NudeDetector()\n"
              "for p in sys.argv[1:]:\n    d.detect(p)\n")
    walls = [run_timed([str(py), "-c", script, *map(str, jpegs)])[0] for _ in range(2)]
    print(f"   NudeNet detector loop (its own venv)  {min(walls):5.2f} s whole command")
    print(f"   safeclip ONNX audit vs NudeNet: {min(walls) / rows['onnx'][0]:.2f}x "
          "(>= 1.0: safeclip's whole command no slower)")


def nudenet_python() -> Path | None:
    py = NUDENET_VENV / "bin" / "python"
    if not py.exists():
        print(f"   (installing nudenet into {NUDENET_VENV}: not a dependency of safeclip)")
        subprocess.run([sys.executable, "-m", "venv", str(NUDENET_VENV)], check=True)
        r = subprocess.run([str(py), "-m", "pip", "install", "-q", "nudenet"], capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stderr[-1000:])
            return None
    return py


START = """
import time, sys, resource
t0 = time.perf_counter()
import safeclip
m = safeclip.Moderator(model="ViT-B-32", pretrained=sys.argv[1], cache_dir=sys.argv[2], precision=sys.argv[4])
d = m.check(sys.argv[3])
t1 = time.perf_counter()
print(t1 - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, m.encoder.runtime,
      "torch" in sys.modules)
"""


def start_section(ckpt: str, base: Path, jpeg: Path) -> None:
    print("\n3./4. process start to the first decision and peak RSS of a ready Moderator after one check "
          "(warm caches)")
    for label, runtime, precision in (("onnx fp32", "onnx", "fp32"), ("onnx int8", "onnx", "int8"),
                                      ("torch fp32", "torch", "fp32")):
        best = None
        for _ in range(3):
            wall, proc = run_timed([sys.executable, "-W", "ignore", "-c", START, ckpt, str(base), str(jpeg),
                                    precision], env={"SAFECLIP_RUNTIME": runtime})
            inside, rss, used, torch_loaded = proc.stdout.split()
            if best is None or wall < best[0]:
                best = (wall, float(inside), float(rss), used, torch_loaded)
        wall, inside, rss, used, torch_loaded = best
        print(f"   {label:10s} process start to decision {wall:5.2f} s (in Python {inside:5.2f} s)   peak RSS "
              f"{rss:6.0f} MB   runtime {used}, torch imported: {torch_loaded}")


def check_section(ckpt: str, base: Path, repeat: int) -> None:
    from PIL import Image

    import safeclip

    big = next(p for p in photos({".jpg", ".jpeg"}) if Image.open(p).size[0] * Image.open(p).size[1] >= 8e6)
    png = min(photos({".png"}), key=lambda p: abs(Image.open(p).size[0] * Image.open(p).size[1] - 1e6))
    print(f"\n5. check p50/p95: {big.name} ({Image.open(big).size[0] * Image.open(big).size[1] / 1e6:.1f} MP "
          f"JPEG), {png.name} ({Image.open(png).size[0] * Image.open(png).size[1] / 1e6:.1f} MP PNG)")
    mods = {rt: safeclip.Moderator(model="ViT-B-32", pretrained=ckpt, cache_dir=base, runtime=rt)
            for rt in ("onnx", "torch")}
    for label, path in (("large JPEG", big), ("1-MP PNG", png)):
        res = {rt: timings(lambda m=m: m.check(path), repeat) for rt, m in mods.items()}
        for rt, xs in res.items():
            print(f"   {label:10s} {rt:5s} {summary(xs)}")
        print(f"   {label:10s} ONNX vs torch: p50 {pct(res['torch'], .5) / pct(res['onnx'], .5):.2f}x, "
              f"p95 {pct(res['torch'], .95) / pct(res['onnx'], .95):.2f}x faster")


def cosine_section(ckpt: str, base: Path) -> None:
    import numpy as np
    import open_clip
    import torch
    from PIL import Image

    import safeclip

    sample = photos()[::6][:24]
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=ckpt)
    model.eval()
    with torch.inference_mode():
        ref = torch.stack([preprocess(Image.open(p)) for p in sample])
        ref = torch.nn.functional.normalize(model.encode_image(ref), dim=-1).numpy()
    m = safeclip.Moderator(model="ViT-B-32", pretrained=ckpt, cache_dir=base, runtime="onnx", fast_decode=False)
    cos = (m.embed(sample) * ref).sum(1)
    kinds = sorted({p.suffix.lower() for p in sample})
    print(f"\n6. ONNX fp32 (exact decode) vs open_clip encode_image(preprocess(img)) on {len(sample)} photos "
          f"({', '.join(kinds)}): min cosine {float(np.min(cos)):.7f}, median {float(np.median(cos)):.7f} "
          "(target >= 0.99999)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--skip-nudenet", action="store_true")
    args = ap.parse_args()
    print("Random-weight ViT-B-32: real compute, NOT a moderation result. " + load())
    ckpt = str(vit_b32_checkpoint())
    base = Path(tempfile.mkdtemp(prefix="safeclip-bench-runtime-"))
    jpegs = photos({".jpg", ".jpeg"})
    t = time.perf_counter()
    # Warm the caches once: both exports, the policy's prompts, the audit's memo (what a second start finds).
    import safeclip

    for precision in ("fp32", "int8"):
        safeclip.Moderator(model="ViT-B-32", pretrained=ckpt, cache_dir=base, precision=precision)
    warm = base / "warm-audit.parquet"
    for runtime in ("onnx", "torch"):
        run_timed([sys.executable, "-m", "safeclip", "audit", str(jpegs[0]), "--out", str(warm), "--cache",
                   str(base), "--model", "ViT-B-32", "--pretrained", ckpt, "--no-progress"],
                  env={"SAFECLIP_RUNTIME": runtime})
        warm.unlink(missing_ok=True)
        shutil.rmtree(base / "audit.parquet.parts", ignore_errors=True)
    print(f"cold start (exports fp32 + int8, prompts): {time.perf_counter() - t:.1f} s, once per cache")
    forward_section(ckpt, base, args.repeat)
    audit_section(ckpt, base, jpegs, args.skip_nudenet)
    start_section(ckpt, base, jpegs[0])
    check_section(ckpt, base, args.repeat)
    cosine_section(ckpt, base)
    print(f"\n{load()}")
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
