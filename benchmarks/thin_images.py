"""Issue 21 item 1: very thin images through ``Moderator.check``, and the prepared pixels of the corpora.

    python benchmarks/thin_images.py [--heights 20000 100000] [--baseline-tree DIR] [--compare-corpus] [--serve]
                                     [--corpus ../shared/corpus]

1. For each height, a 1 x height RGB PNG (a few hundred bytes, built here) goes through ``Moderator.check`` in a
   fresh interpreter, with the tiny random-weight model of tests/conftest.py (``image_size`` 64) and the default
   ``fast_decode``: the peak RSS before and after the check, the seconds it took, and the outcome. With
   ``--baseline-tree DIR`` (e.g. ``git archive`` of an older commit, unpacked) the same against that checkout.
2. ``--compare-corpus`` (needs ``--baseline-tree``): every photo and tricky file, decoded and prepared
   (``decode`` then ``prepare_pixels``) by each checkout, for input sides 224, 64 and 336 and both ``fast`` settings;
   prints how many cases give byte-identical prepared frames (sha256 of each) and names the others.

Nothing printed is a moderation result: the weights are random.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from _common import CORPUS  # noqa: E402
from test_decode import thin_png  # noqa: E402

_CHECK = r"""
import io, json, resource, sys, time, warnings
warnings.simplefilter("ignore")
from PIL import Image
from safeclip import Moderator
model, cache, path = sys.argv[1:4]
m = Moderator(model=model, device="cpu", cache_dir=cache)
buf = io.BytesIO()
Image.new("RGB", (96, 64), (120, 30, 200)).save(buf, "PNG")
m.check(buf.getvalue())  # warm: the first check loads what every later one reuses
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
data = open(path, "rb").read()
t0 = time.perf_counter()
try:
    d = m.check(data)
    out = {"outcome": f"decision {d.action}"}
except Exception as e:
    out = {"outcome": f"{type(e).__name__}: {str(e)[:120]}"}
out["seconds"] = time.perf_counter() - t0
out["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
out["rise_mib"] = out["peak_mib"] - base
out["spec"] = m.encoder.pixel_spec.size
print(json.dumps(out))
"""

_PREPARED = r"""
import hashlib, json, sys, warnings
warnings.simplefilter("ignore")
import numpy as np
from pathlib import Path
from safeclip.decode import decode
from safeclip.embed import PixelSpec, prepare_pixels
from safeclip.errors import DecodeError
out = {}
for path in sorted(p for d in sys.argv[1:] for p in Path(d).iterdir() if p.is_file()):
    for size in (224, 64, 336):
        spec = PixelSpec(size=size)
        for fast in (False, True):
            key = f"{path.parent.name}/{path.name} size={size} fast={fast}"
            try:
                dec = decode(path, target_size=size if fast else None)
            except DecodeError as e:
                out[key] = type(e).__name__
                continue
            out[key] = [hashlib.sha256(prepare_pixels(f, spec, fast=fast).tobytes()).hexdigest() for f in dec.frames]
print(json.dumps(out))
"""


def _run(root: Path, code: str, *args: str, timeout: float = 900) -> dict:
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=root)
    if proc.returncode != 0:
        return {"outcome": f"interpreter exited {proc.returncode}: {proc.stderr.strip()[-300:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def thin_checks(heights: list[int], trees: list[tuple[str, Path]]) -> None:
    from conftest import make_tiny_checkpoint

    with tempfile.TemporaryDirectory(prefix="safeclip-thin-") as tmp:
        model = f"local-dir:{make_tiny_checkpoint(Path(tmp) / 'tiny')}"
        for height in heights:
            data = thin_png(1, height)
            path = Path(tmp) / f"thin-1x{height}.png"
            path.write_bytes(data)
            for label, root in trees:
                cache = Path(tmp) / f"cache-{label.replace(' ', '-')}"
                out = _run(root, _CHECK, model, str(cache), str(path))
                if "seconds" in out:
                    print(f"1x{height} PNG ({len(data)} bytes), Moderator.check, input side {out['spec']}, {label}: "
                          f"{out['seconds']:.2f} s, peak RSS {out['peak_mib']:.0f} MiB "
                          f"(+{out['rise_mib']:.0f} MiB for the check), {out['outcome']}", flush=True)
                else:
                    print(f"1x{height} PNG ({len(data)} bytes), {label}: {out['outcome']}", flush=True)


def _vm_hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def thin_serve(heights: list[int], trees: list[tuple[str, Path]]) -> None:
    """The same PNGs posted to ``safeclip serve`` (started from its CLI, 127.0.0.1 only): the server's peak RSS
    (VmHWM) after a warm-up request and after each thin upload."""
    import socket
    import time
    import urllib.request

    from conftest import make_tiny_checkpoint

    with tempfile.TemporaryDirectory(prefix="safeclip-thin-serve-") as tmp:
        model = f"local-dir:{make_tiny_checkpoint(Path(tmp) / 'tiny')}"
        for label, root in trees:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            env = {**os.environ, "PYTHONPATH": str(root), "SAFECLIP_CACHE_DIR": str(Path(tmp) / f"cache-{port}"),
                   "OMP_NUM_THREADS": "1"}
            server = subprocess.Popen([sys.executable, "-m", "safeclip", "serve", "--model", model, "--device", "cpu",
                                       "--port", str(port), "--on-error", "block"], env=env, cwd=tmp,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                url = f"http://127.0.0.1:{port}"
                deadline = time.monotonic() + 300
                while time.monotonic() < deadline:
                    try:
                        if urllib.request.urlopen(f"{url}/readyz", timeout=2).status == 200:
                            break
                    except OSError:
                        time.sleep(0.5)
                warm = thin_png(64, 48)
                urllib.request.urlopen(urllib.request.Request(f"{url}/v1/check", data=warm, method="POST"),
                                       timeout=60).read()
                base = _vm_hwm_mib(server.pid)
                for height in heights:
                    data = thin_png(1, height)
                    t0 = time.perf_counter()
                    req = urllib.request.Request(f"{url}/v1/check", data=data, method="POST")
                    try:
                        with urllib.request.urlopen(req, timeout=600) as r:
                            outcome = f"{r.status} {json.loads(r.read()).get('action')}"
                    except urllib.error.HTTPError as e:
                        outcome = f"{e.code}"
                    print(f"1x{height} PNG ({len(data)} bytes), safeclip serve, {label}: "
                          f"{time.perf_counter() - t0:.2f} s, server peak RSS {_vm_hwm_mib(server.pid):.0f} MiB "
                          f"(after warm-up {base:.0f} MiB), answer {outcome}", flush=True)
            finally:
                server.terminate()
                server.wait(timeout=30)


def compare_corpus(corpus: Path, baseline: Path) -> int:
    folders = [str(corpus / "photos"), str(corpus / "tricky")]
    new = _run(ROOT, _PREPARED, *folders)
    old = _run(baseline, _PREPARED, *folders)
    if "outcome" in new or "outcome" in old:
        print("comparison failed:", new.get("outcome"), old.get("outcome"))
        return 1
    same = differ = 0
    for key in sorted(set(new) | set(old)):
        if new.get(key) == old.get(key):
            same += 1
        else:
            differ += 1
            print(f"  differs: {key}")
    print(f"prepared pixels of the photo and tricky corpora ({same + differ} file x size x fast cases, sha256 of "
          f"every prepared frame): {same} identical to the baseline's, {differ} different")
    return 1 if differ else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heights", type=int, nargs="+", default=[20000, 100000])
    parser.add_argument("--baseline-tree", type=Path, help="another checkout whose safeclip to compare against")
    parser.add_argument("--compare-corpus", action="store_true")
    parser.add_argument("--serve", action="store_true", help="also post each PNG to `safeclip serve` (peak RSS)")
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    args = parser.parse_args(argv)
    trees = [("this checkout", ROOT)] + ([("baseline", args.baseline_tree.resolve())] if args.baseline_tree else [])
    if args.compare_corpus:
        if not args.baseline_tree:
            parser.error("--compare-corpus needs --baseline-tree")
        return compare_corpus(args.corpus, args.baseline_tree.resolve())
    thin_checks(args.heights, trees)
    if args.serve:
        thin_serve(args.heights, trees)
    return 0


if __name__ == "__main__":
    sys.exit(main())
