"""Audit time of the photo corpus: the local engine vs the Ray engine on a local Ray runtime, on this machine.

ViT-B-32 with random weights (timing only: nothing printed here is a moderation result). Each run starts from an
empty embedding cache; the prompt embeddings and the encoder's identity are cached, as after any first run.

- **local (command)**: ``safeclip audit FILES --engine local`` as a subprocess (model load included).
- **ray (command)**: ``safeclip audit FILES --engine ray`` as a subprocess: it starts a local Ray runtime, runs the
  decode tasks and one model actor on it, and stops it (all included).
- **ray (runtime up)**: ``audit(..., engine="ray")`` in this process on a Ray runtime started beforehand: the
  audit without the runtime's start-up (the actor's model load is still included).

The outputs of the engines are compared row by row (paths, errors and actions equal, probabilities within 1e-5).

    python benchmarks/audit_ray_vs_local.py [--subset jpeg|all] [--limit N]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import photos, vit_b32_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SUBSETS = {"jpeg": {".jpg", ".jpeg"}, "all": {".jpg", ".jpeg", ".png", ".webp"}}


def fresh_cache(base: Path) -> Path:
    """A cache folder with the prompt embeddings and encoder memo of ``base``, and no image embeddings."""
    d = Path(tempfile.mkdtemp(prefix="cache-", dir=base.parent))
    shutil.copytree(base / "text", d / "text")
    shutil.copy(base / "encoders.json", d / "encoders.json")
    return d


def command(files: list[Path], out: Path, cache: Path, ckpt: Path, engine: str) -> tuple[float, str]:
    cmd = [sys.executable, "-m", "safeclip.cli.audit", "audit", *map(str, files), "--out", str(out), "--model",
           "ViT-B-32", "--pretrained", str(ckpt), "--cache", str(cache), "--device", "cpu", "--no-progress",
           "--engine", engine]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3600, check=False)
    wall = time.perf_counter() - t
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"{engine} audit failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    line = next((x for x in proc.stderr.splitlines() if x.startswith("safeclip audit")), "")
    return wall, line


def compare(a: Path, b: Path) -> str:
    import numpy as np
    import pyarrow.parquet as pq

    ta, tb = pq.read_table(a), pq.read_table(b)
    for c in ("path", "sha256", "error", "action"):
        if ta.column(c).to_pylist() != tb.column(c).to_pylist():
            return f"DIFFERENT {c}"
    cats = [c for c in ta.column_names if c.startswith("p_")]
    d = max(float(np.nanmax(np.abs(ta.column(c).to_numpy(zero_copy_only=False)
                                   - tb.column(c).to_numpy(zero_copy_only=False)), initial=0.0)) for c in cats)
    return f"same rows and actions, max |dp| {d:.1e}" + ("" if d <= 1e-5 else " (ABOVE 1e-5)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--subset", choices=sorted(SUBSETS), default="jpeg")
    ap.add_argument("--limit", type=int, help="at most N files")
    args = ap.parse_args()

    import ray

    from safeclip.audit import audit

    files = photos(SUBSETS[args.subset])[: args.limit]
    ckpt = vit_b32_checkpoint()
    cores = len(os.sched_getaffinity(0))
    print(f"# {cores} cores, ray {ray.__version__}, load average {os.getloadavg()[0]:.2f}; {len(files)} files "
          f"({args.subset}, {sum(p.stat().st_size for p in files) / 1e6:.1f} MB); ViT-B-32 random weights "
          "(timing only)")
    work = Path(tempfile.mkdtemp(prefix="safeclip-bench-ray-work-"))
    base = work / "base"
    try:
        # A first audit with this model leaves the prompt embeddings and the encoder's identity in the cache.
        command(files[:2], work / "warm.parquet", base, ckpt, "local")

        c_local = fresh_cache(base)
        wall_local, line_local = command(files, work / "local.parquet", c_local, ckpt, "local")
        print(f"local (command):         {wall_local:6.1f}s  | {line_local}")

        c_ray = fresh_cache(base)
        wall_ray, line_ray = command(files, work / "ray.parquet", c_ray, ckpt, "ray")
        print(f"ray (command):           {wall_ray:6.1f}s  | {line_ray}")

        t = time.perf_counter()
        ray.init(num_cpus=max(2, cores), object_store_memory=512 * 2**20, include_dashboard=False,
                 log_to_driver=False, logging_level="warning")
        t_init = time.perf_counter() - t
        try:
            s = audit([str(p) for p in files], out=work / "ray2.parquet", model="ViT-B-32", pretrained=str(ckpt),
                      device="cpu", cache=fresh_cache(base), engine="ray", verbose=False)
        finally:
            ray.shutdown()
        print(f"ray (runtime up):        {s.seconds:6.1f}s  | runtime start {t_init:.1f}s before it; "
              f"{s.images_per_s:.1f} img/s; decode {s.timings['decode_s']:.1f}s + model {s.timings['embed_s']:.1f}s "
              "(summed in tasks / the actor)")
        print(f"\nratio ray/local: commands {wall_ray / wall_local:.2f}x, runtime up {s.seconds / wall_local:.2f}x")
        print(f"local vs ray output: {compare(work / 'local.parquet', work / 'ray.parquet')}; "
              f"vs runtime-up run: {compare(work / 'local.parquet', work / 'ray2.parquet')}")
        per = re.search(r"processed in ([\d.]+)s", line_local)
        if per:
            print(f"(local audit() time inside its command: {per.group(1)}s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
