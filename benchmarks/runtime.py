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

    python benchmarks/runtime.py [--repeat 20] [--skip-nudenet] [--cache DIR]
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


def worker(args: list[str]) -> None:
    """One measurement in a process of its own: two runtimes' thread pools in one process spin against each other."""
    import numpy as np

    kind, ckpt, base, runtime, precision, repeat = args[0], args[1], Path(args[2]), args[3], args[4], int(args[5])
    out: dict[str, object] = {}
    if kind == "forward":
        from safeclip.embed import Encoder

        enc = Encoder("ViT-B-32", ckpt, cache_dir=base, runtime=runtime, precision=precision)
        px = np.random.default_rng(0).integers(0, 256, (16, 224, 224, 3), dtype=np.uint8)
        out["b1"] = pct(timings(lambda: enc.embed_pixels(px[:1]), repeat), .5)
        out["b16"] = pct(timings(lambda: enc.embed_pixels(px), max(3, repeat // 4)), .5) / 16
        np.save(base / f"emb-{runtime}-{precision}.npy", enc.embed_pixels(px))
        out["threads"] = enc.threads or os.cpu_count()
    else:
        import safeclip

        m = safeclip.Moderator(model="ViT-B-32", pretrained=ckpt, cache_dir=base, runtime=runtime)
        for path in args[6:]:
            out[path] = timings(lambda p=path: m.check(p), repeat)
    print(json.dumps(out))


def in_worker(*args: str) -> dict:
    _, proc = run_timed([sys.executable, "-W", "ignore", __file__, "--worker", *args])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def forward_section(ckpt: str, base: Path, repeat: int) -> None:
    import numpy as np

    runs = {"torch": ("torch", "fp32"), "onnx fp32": ("onnx", "fp32"), "onnx int8": ("onnx", "int8")}
    ms = {name: in_worker("forward", ckpt, str(base), rt, prec, str(repeat)) for name, (rt, prec) in runs.items()}
    print(f"\n1. image forward, ViT-B-32 (random weights), {ms['torch']['threads']} threads, each runtime in a process "
          "of its own")
    ref = np.load(base / "emb-torch-fp32.npy")
    for name, (rt, prec) in runs.items():
        one, sixteen = ms[name]["b1"] * 1e3, ms[name]["b16"] * 1e3
        cos = float((np.load(base / f"emb-{rt}-{prec}.npy") * ref).sum(1).min())
        print(f"   {name:10s} batch 1 {one:6.1f} ms   batch 16 {sixteen:6.1f} ms/img   speed-up vs torch "
              f"{ms['torch']['b1'] * 1e3 / one:4.2f}x / {ms['torch']['b16'] * 1e3 / sixteen:4.2f}x   "
              f"min cosine to torch {cos:.7f}")
    print("   (int8 cosine on random weights and noise images: not a measure of int8 on real weights)")


AUDIT_RE = re.compile(r"(\d+) processed in ([\d.]+)s \(([\d.]+) images/s, model load ([\d.]+)s\)")


def audit_section(ckpt: str, base: Path, jpegs: list[Path], skip_nudenet: bool) -> None:
    print(f"\n2. `safeclip audit` on {len(jpegs)} JPEGs of the photo corpus, whole command, warm caches "
          "(export + prompts cached, embeddings not)")
    rows = {}
    for runtime in ("onnx", "torch"):
        walls, steady, loads = [], [], []
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
                loads.append(model_load)
            shutil.rmtree(cache, ignore_errors=True)
        rows[runtime] = (min(walls), max(steady) if steady else float("nan"))
        print(f"   safeclip {runtime:5s}  {rows[runtime][0]:5.2f} s whole command   "
              f"steady state {rows[runtime][1]:6.1f} img/s   (the audit's own 'model load': "
              f"{min(loads) if loads else float('nan'):.2f} s)")
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
import time, sys
t0 = time.perf_counter()
import safeclip
m = safeclip.Moderator(model="ViT-B-32", pretrained=sys.argv[1], cache_dir=sys.argv[2], precision=sys.argv[4])
d = m.check(sys.argv[3])
t1 = time.perf_counter()
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1]
print(t1 - t0, int(hwm) / 1024, m.encoder.runtime, "torch" in sys.modules)
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

    big = next(p for p in photos({".jpg", ".jpeg"}) if Image.open(p).size[0] * Image.open(p).size[1] >= 8e6)
    png = min(photos({".png"}), key=lambda p: abs(Image.open(p).size[0] * Image.open(p).size[1] - 1e6))
    print(f"\n5. check p50/p95: {big.name} ({Image.open(big).size[0] * Image.open(big).size[1] / 1e6:.1f} MP "
          f"JPEG), {png.name} ({Image.open(png).size[0] * Image.open(png).size[1] / 1e6:.1f} MP PNG), each runtime "
          "in a process of its own")
    res = {rt: in_worker("check", ckpt, str(base), rt, "auto", str(repeat), str(big), str(png))
           for rt in ("onnx", "torch")}
    for label, path in (("large JPEG", big), ("1-MP PNG", png)):
        for rt in res:
            print(f"   {label:10s} {rt:5s} {summary(res[rt][str(path)])}")
        o, t = res["onnx"][str(path)], res["torch"][str(path)]
        print(f"   {label:10s} ONNX vs torch: p50 {pct(t, .5) / pct(o, .5):.2f}x, p95 {pct(t, .95) / pct(o, .95):.2f}x "
              "faster")


def cosine_section(ckpt: str, base: Path) -> None:
    import numpy as np
    import open_clip
    import torch
    from PIL import Image

    import safeclip

    sample = photos()[::6][:24]
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=ckpt)
    model.eval()
    m = safeclip.Moderator(model="ViT-B-32", pretrained=ckpt, cache_dir=base, runtime="onnx", fast_decode=False)
    spec = m.encoder.pixel_spec
    mean, std = np.array(spec.mean, np.float32), np.array(spec.std, np.float32)
    own, same_pixels = [], []
    with torch.inference_mode():
        for p in sample:
            im = Image.open(p)
            x = preprocess(im)
            ref = torch.nn.functional.normalize(model.encode_image(x[None]), dim=-1).numpy()[0]
            own.append(float(m.embed([p])[0] @ ref))
            # open_clip's own input tensor back as the uint8 pixels it was made from (ToTensor divides by 255)
            px = ((x.numpy().transpose(1, 2, 0) * std + mean) * 255).round().clip(0, 255).astype(np.uint8)
            same_pixels.append(float(m.encoder.embed_pixels(px[None])[0] @ ref))
    kinds = sorted({p.suffix.lower() for p in sample})
    print(f"\n6. ONNX fp32 vs open_clip encode_image(preprocess(img)) on {len(sample)} photos ({', '.join(kinds)}), "
          "target >= 0.99999")
    print(f"   open_clip's own input tensor (the runtime alone): min cosine {min(same_pixels):.7f}, median "
          f"{float(np.median(same_pixels)):.7f}")
    print(f"   Moderator.embed (safeclip's decode, exact mode): min cosine {min(own):.7f}, median "
          f"{float(np.median(own)):.7f}")
    for i in np.argsort(own)[:3]:
        im = Image.open(sample[i])
        exif = im.getexif().get(0x0112, 1)
        print(f"     {sample[i].name}: {own[i]:.7f} (mode {im.mode}, EXIF orientation {exif})")
    print("     (safeclip's decode applies EXIF orientation and composites transparency on a fixed background before "
          "resizing; open_clip's preprocess resizes RGBA and drops alpha after)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--skip-nudenet", action="store_true")
    ap.add_argument("--cache", help="a cache folder to keep the exports in between runs (default: a fresh one)")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker)
    print("Random-weight ViT-B-32: real compute, NOT a moderation result. " + load())
    ckpt = str(vit_b32_checkpoint())
    base = Path(args.cache) if args.cache else Path(tempfile.mkdtemp(prefix="safeclip-bench-runtime-"))
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
    print(f"warming the caches (exports fp32 + int8 unless kept, prompts): {time.perf_counter() - t:.1f} s")
    forward_section(ckpt, base, args.repeat)
    audit_section(ckpt, base, jpegs, args.skip_nudenet)
    start_section(ckpt, base, jpegs[0])
    check_section(ckpt, base, args.repeat)
    cosine_section(ckpt, base)
    print(f"\n{load()}")
    if not args.cache:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
