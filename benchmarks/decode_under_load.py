"""Issue 21 item 2: a benign large WebP decoded alone and while other processes keep every core busy.

    python benchmarks/decode_under_load.py [--side 4096] [--hogs 0 (= 3 x cores)] [--repeat 3] [--baseline-tree DIR]

Prints, for each checkout (this one, and ``--baseline-tree`` if given), the wall-clock and CPU seconds of each decode
and its outcome, with ``DecodeLimits.timeout_s`` set to twice the CPU time one decode takes alone: a budget the decode
fits in by its own work, that a wall-clock budget misses once the machine is busy enough. (The wall-clock backstop,
``wall_timeout_s``, is set out of the way: it is there for stalled decoders, and scales with the budget.)
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_DECODE = r"""
import json, sys, time, warnings
warnings.simplefilter("ignore")
from safeclip.decode import DecodeLimits, decode
from safeclip.errors import DecodeError
data = open(sys.argv[1], "rb").read()
budget, repeat = float(sys.argv[2]), int(sys.argv[3])
# the wall-clock backstop (where there is one) is for stalled decoders: out of the way of a merely slow machine
extra = {"wall_timeout_s": max(600.0, budget)} if "wall_timeout_s" in DecodeLimits.__dataclass_fields__ else {}
out = []
for _ in range(repeat):
    w, c = time.monotonic(), time.thread_time()
    try:
        decode(data, limits=DecodeLimits(timeout_s=budget, **extra))
        outcome = "decoded"
    except DecodeError as e:
        outcome = f"{type(e).__name__}: {e.reason[:110]}"
    out.append({"wall": time.monotonic() - w, "cpu": time.thread_time() - c, "outcome": outcome})
print(json.dumps(out))
"""


def _spin(stop_at: float) -> None:  # pragma: no cover - a CPU hog
    x = 0
    while time.monotonic() < stop_at:
        x += 1


def _decode(root: Path, path: Path, budget: float, repeat: int) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-c", _DECODE, str(path), str(budget), str(repeat)], capture_output=True,
                          text=True, env=env, cwd=root, timeout=600)
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    return json.loads(proc.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--side", type=int, default=4096)
    parser.add_argument("--hogs", type=int, default=0, help="busy processes (0: 3 x the cores)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--baseline-tree", type=Path)
    args = parser.parse_args(argv)
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    buf = io.BytesIO()
    small.resize((args.side, args.side), Image.Resampling.BICUBIC).save(buf, "WEBP", quality=80)
    trees = [("this checkout", ROOT)] + ([("baseline", args.baseline_tree.resolve())] if args.baseline_tree else [])
    hogs = args.hogs or 3 * (os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "benign.webp"
        path.write_bytes(buf.getvalue())
        alone = _decode(ROOT, path, 1000.0, args.repeat)
        cpu = min(r["cpu"] for r in alone)
        budget = round(2 * cpu, 2)
        print(f"{args.side}x{args.side} WebP ({len(buf.getvalue())} bytes): alone {min(r['wall'] for r in alone):.2f} s "
              f"wall, {cpu:.2f} s CPU; budget (timeout_s) {budget:g} s; then with {hogs} busy processes:")
        for label, root in trees:
            stop_at = time.monotonic() + 600
            procs = [multiprocessing.Process(target=_spin, args=(stop_at,), daemon=True) for _ in range(hogs)]
            for p in procs:
                p.start()
            try:
                loaded = _decode(root, path, budget, args.repeat)
            finally:
                for p in procs:
                    p.terminate()
                for p in procs:
                    p.join()
            for r in loaded:
                print(f"  {label}: {r['wall']:.2f} s wall, {r['cpu']:.2f} s CPU: {r['outcome']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
