"""Issue 23 (throughput): the whole `safeclip audit` command against NudeNet's ONNX loop on the same mixed-format
photos, the CPU bound per format, how busy the cores are, RSS, torch for reference, and the worker/thread rule.

ViT-B-32 with RANDOM weights: the compute of the real model, so times are real; no score printed here (none is) would
be a moderation result. Every ratio comes from this one run; run it on a quiet machine (it prints the load average).

The set: the largest 13 JPEG, 28 WebP and 25 PNG files of the photo corpus (66 files, the issue's mix).

1. CPU bound per format: decode core-ms per image (each backend, what a decode worker does: read, sha256, decode,
   pixels, PDQ; ``time.thread_time`` of one thread) + forward core-ms per image (ONNX Runtime at batch 16, the
   process's CPU time over every thread, times the image's views: a transparent image is judged on two backgrounds),
   over the cores: bound img/s = cores / (decode + forward core-s).
2. The whole command (process start to exit, warm caches: export, prompts and the audit's identity memo; no
   embedding cache), ``--runtime onnx`` vs NudeNet's detector loop in its own venv, alternated, 3 pairs, medians.
   Cores busy: the CPU seconds of the audit's own processes (main and decode workers, /proc/PID/stat) sampled every
   50 ms, over wall seconds x cores; steady state = the window after the model is loaded and the first rows flow
   (from 25% to 90% of the wall time). The whole machine's busy share in that window (/proc/stat) is printed beside
   it: other load shows there. RSS: /proc/PID/status VmRSS of the audit's
   main process and of its decode workers (peak of each; workers summed), sampled at the same rate.
3. Steady-state throughput per format (the audit in this process, model loaded: n / (seconds - start-up)) against
   the format's bound.
4. ``--runtime torch`` for reference (target: ONNX >= 1.8x its img/s after model load, same run).
5. ``--rule``: the worker / thread / spin grid on all cores and on 1 core (``taskset``), steady state.
6. A small audit (2 files): in-process decode threads (the default for small runs) vs decode processes.

    python benchmarks/throughput.py [--pairs 3] [--skip-nudenet] [--rule] [--decoder auto|pil|vips]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import photos, vit_b32_checkpoint
from runtime import nudenet_python

MIX = {".jpg": 13, ".webp": 28, ".png": 25}
AUDIT_RE = re.compile(r"(\d+) processed in ([\d.]+)s \(([\d.]+) images/s, model load ([\d.]+)s\)")
NUDENET = ("import sys\nfrom nudenet import NudeDetector\nd = NudeDetector()\n"
           "for p in sys.argv[1:]:\n    d.detect(p)\n")


def mixed_set() -> dict[str, list[Path]]:
    """The largest files of each format, by pixel count (ties by name)."""
    from PIL import Image

    out: dict[str, list[Path]] = {}
    for suffix, k in MIX.items():
        suffixes = {".jpg", ".jpeg"} if suffix == ".jpg" else {suffix}
        sized = []
        for p in photos(suffixes):
            with Image.open(p) as im:
                sized.append((-(im.size[0] * im.size[1]), p.name, p))
        out[suffix.strip(".").upper().replace("JPG", "JPEG")] = [p for *_, p in sorted(sized)[:k]]
    return out


# ------------------------------------------------------------------------------------------------ measuring a run

def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float | None:
    """utime + stime of one process, in seconds (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, IndexError, ValueError):
        return None


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class Run:
    """One command, timed, with the machine's busy fraction and the process tree's RSS sampled every 50 ms."""

    def __init__(self, cmd: list[str], env: dict[str, str] | None = None) -> None:
        self.samples: list[tuple[float, int, int]] = []
        self.own: list[tuple[float, float]] = []  # (wall, CPU seconds of the command's processes so far)
        last: dict[int, float] = {}
        self.main_rss = self.workers_rss = 0.0
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, **(env or {})})
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                busy, total = _cpu_times()
                self.samples.append((time.perf_counter() - t0, busy, total))
                pids = _tree(proc.pid)
                for p in pids:
                    c = _cpu_s(p)
                    if c is not None:
                        last[p] = c
                self.own.append((time.perf_counter() - t0, sum(last.values())))
                self.main_rss = max(self.main_rss, _rss_mb(proc.pid))
                self.workers_rss = max(self.workers_rss, sum(_rss_mb(p) for p in pids[1:]))
                stop.wait(0.05)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        self.out, self.err = proc.communicate()
        self.wall = time.perf_counter() - t0
        stop.set()
        th.join()
        if proc.returncode != 0:
            raise SystemExit(f"{cmd[:4]}... failed ({proc.returncode}):\n{self.err[-2000:]}")
        m = AUDIT_RE.search(self.out + self.err)
        self.model_load = float(m.group(4)) if m else float("nan")
        self.n = int(m.group(1)) if m else 0

    def busy(self, start: float, end: float) -> float:
        """The fraction of all cores the command's own processes kept busy between ``start`` and ``end`` of the wall
        time (0..1): their CPU seconds over wall seconds x cores, whatever else runs on the machine."""
        s = [x for x in self.own if start * self.wall <= x[0] <= end * self.wall]
        if len(s) < 2:
            return float("nan")
        return (s[-1][1] - s[0][1]) / max(1e-9, (s[-1][0] - s[0][0]) * len(os.sched_getaffinity(0)))

    def machine_busy(self, start: float, end: float) -> float:
        """The fraction of all cores busy on the whole machine in the same window (/proc/stat)."""
        s = [x for x in self.samples if start * self.wall <= x[0] <= end * self.wall]
        if len(s) < 2:
            return float("nan")
        return (s[-1][1] - s[0][1]) / max(1, s[-1][2] - s[0][2])


def audit_cmd(files: list[Path], ckpt: str, cache: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "safeclip", "audit", *map(str, files), "--out", str(cache / "out.parquet"),
            "--cache", str(cache), "--model", "ViT-B-32", "--pretrained", ckpt, "--no-progress", *extra]


def warm_copy(base: Path) -> Path:
    """A cache with the export, the prompts and the identity memo of ``base`` but no embeddings (hard links)."""
    d = Path(tempfile.mkdtemp(prefix="safeclip-bench-run-"))
    shutil.rmtree(d)
    shutil.copytree(base, d, copy_function=os.link, ignore=shutil.ignore_patterns("embeddings", "*.lock", "*.parquet*"))
    return d


def run_audit(files: list[Path], ckpt: str, base: Path, *extra: str, env: dict[str, str] | None = None,
              prefix: tuple[str, ...] = ()) -> Run:
    cache = warm_copy(base)
    try:
        return Run([*prefix, *audit_cmd(files, ckpt, cache, *extra)], env)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ sections

def bound_section(sets: dict[str, list[Path]], ckpt: str, base: Path, decoders: list[str]) -> dict[str, dict]:
    import numpy as np

    from safeclip.decode import DecodeLimits
    from safeclip.embed import DecodeOptions, Encoder, prepare
    from safeclip.pdq import DECODE_SIDE  # noqa: F401  (prepare decodes at least this large for PDQ)

    enc = Encoder("ViT-B-32", ckpt, cache_dir=base, device="cpu", spin_wait=False)  # spinning would count as work
    cores = len(os.sched_getaffinity(0))
    px = np.random.default_rng(0).integers(0, 256, (16, 224, 224, 3), dtype=np.uint8)
    enc.embed_pixels(px)
    reps = 4
    c0 = time.process_time()
    for _ in range(reps):
        enc.embed_pixels(px)
    fwd = (time.process_time() - c0) / (reps * 16)
    print(f"\n1. CPU bound per format ({cores} cores): forward {fwd * 1e3:.1f} core-ms/img (ONNX Runtime, batch 16)")
    out: dict[str, dict] = {}
    for dec in decoders:
        try:
            opts = DecodeOptions(limits=DecodeLimits(), backend=dec)  # type: ignore[call-arg]
        except TypeError:
            if dec != "pil":
                print(f"   decoder {dec}: this checkout has no decode backends; skipped")
                continue
            opts = DecodeOptions()
        for fmt, files in sets.items():
            ms, views = [], []
            for p in files:
                t = time.thread_time()
                data = p.read_bytes()
                __import__("hashlib").sha256(data).hexdigest()
                views.append(len(prepare(data, enc.pixel_spec, opts).pixels))
                ms.append(time.thread_time() - t)
            dec_s = statistics.fmean(ms)
            per_image = fwd * statistics.fmean(views)  # a transparent image is two views: two forwards
            bound = cores / (dec_s + per_image)
            out.setdefault(fmt, {})[dec] = {"decode": dec_s, "forward": per_image, "bound": bound}
            print(f"   {dec:5s} {fmt:5s} n={len(files):3d}  decode {dec_s * 1e3:6.1f} core-ms/img + forward "
                  f"{per_image * 1e3:6.1f} ({statistics.fmean(views):.2f} views/img) -> bound {bound:5.2f} img/s")
    return out


def command_section(files: list[Path], ckpt: str, base: Path, pairs: int, nudenet: bool,
                    extra: tuple[str, ...]) -> tuple[list[Run], list[float]]:
    print(f"\n2. whole commands on the mix ({len(files)} files), {pairs} pairs alternated, warm caches")
    py = nudenet_python() if nudenet else None
    runs, peer = [], []
    for _ in range(pairs):
        runs.append(run_audit(files, ckpt, base, "--runtime", "onnx", *extra))
        if py is not None:
            t = time.perf_counter()
            subprocess.run([str(py), "-c", NUDENET, *map(str, files)], check=True, capture_output=True)
            peer.append(time.perf_counter() - t)
    walls = [r.wall for r in runs]
    med = statistics.median(walls)
    steady = [r.n / max(1e-9, r.wall - r.model_load) for r in runs]
    print(f"   safeclip audit (onnx): median {med:5.2f} s (runs {', '.join(f'{w:.2f}' for w in walls)}), "
          f"after model load {statistics.median(steady):.2f} img/s")
    print(f"   cores busy with the audit's processes: whole run {statistics.median(r.busy(0, 1) for r in runs):.0%}, "
          f"steady state (25%-90% of the wall) {statistics.median(r.busy(.25, .9) for r in runs):.0%} "
          f"(the whole machine in that window: {statistics.median(r.machine_busy(.25, .9) for r in runs):.0%})")
    print(f"   peak RSS: main process {max(r.main_rss for r in runs):.0f} MB, decode workers together "
          f"{max(r.workers_rss for r in runs):.0f} MB")
    if peer:
        pm = statistics.median(peer)
        print(f"   NudeNet detector loop: median {pm:5.2f} s (runs {', '.join(f'{w:.2f}' for w in peer)})")
        print(f"   RATIO safeclip / NudeNet time = {med / pm:.2f}x (target <= 0.6)")
    return runs, peer


def steady_section(sets: dict[str, list[Path]], ckpt: str, base: Path, bounds: dict[str, dict], decoder: str) -> None:
    print("\n3. steady state per format (in-process audit, model loaded) vs the CPU bound")
    import safeclip
    from safeclip.embed import Encoder

    enc = Encoder("ViT-B-32", ckpt, cache_dir=base, device="cpu", spin_wait=False)
    for fmt, files in sets.items():
        cache = warm_copy(base)
        try:
            kw = {} if decoder == "auto" else {"decoder": decoder}
            s = safeclip.audit([str(p) for p in files], out=cache / "o.parquet", cache=cache, encoder=enc,
                               progress=False, verbose=False, **kw)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        rate = len(files) / max(1e-9, s.seconds - s.startup_seconds)
        b = bounds.get(fmt, {})
        best = b.get(decoder) or b.get("vips") or b.get("pil")
        ratio = f"{rate / best['bound']:.2f} of the bound" if best else "no bound"
        print(f"   {fmt:5s} {rate:5.2f} img/s = {ratio} (target >= 0.9)")


def steady_rate(files: list[Path], ckpt: str, base: Path, runtime: str) -> float:
    """img/s of the audit in this process with the model already loaded (``runtime``), on the engine's own rule."""
    import safeclip
    from safeclip.audit.plan import cpu_count
    from safeclip.embed import Encoder

    enc = Encoder("ViT-B-32", ckpt, cache_dir=base, device="cpu", runtime=runtime, threads=cpu_count(),
                  spin_wait=False)
    cache = warm_copy(base)
    try:
        s = safeclip.audit([str(p) for p in files], out=cache / "o.parquet", cache=cache, encoder=enc,
                           progress=False, verbose=False)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return len(files) / max(1e-9, s.seconds - s.startup_seconds)


def torch_section(files: list[Path], ckpt: str, base: Path, onnx: list[Run], extra: tuple[str, ...]) -> None:
    print("\n4. the same audit with --runtime torch (reference)")
    runs = [run_audit(files, ckpt, base, "--runtime", "torch", *extra) for _ in range(2)]
    t_wall = statistics.median(r.wall for r in runs)
    o_wall = statistics.median(r.wall for r in onnx)
    rates = {rt: max(steady_rate(files, ckpt, base, rt) for _ in range(2)) for rt in ("onnx", "torch")}
    print(f"   whole command: torch median {t_wall:5.2f} s vs onnx {o_wall:5.2f} s: RATIO {t_wall / o_wall:.2f}x")
    print(f"   steady state (model loaded, in this process): onnx {rates['onnx']:.2f} img/s, torch "
          f"{rates['torch']:.2f} img/s: RATIO {rates['onnx'] / rates['torch']:.2f}x (target >= 1.8)")


def rule_section(files: list[Path], ckpt: str, base: Path, decoder: str) -> None:
    """Steady-state img/s of the audit in this process (model loaded) per decode workers x model threads x spin."""
    import safeclip
    from safeclip.embed import Encoder

    cores = len(os.sched_getaffinity(0))
    print(f"\n5. the worker / thread / spin rule on {cores} core{'s' if cores > 1 else ''}: steady-state img/s of "
          "the audit on the mix (model loaded; best of 2)")
    kw = {} if decoder == "auto" else {"decoder": decoder}
    for threads in sorted({1, cores}):
        for spin in (False, True):
            enc = Encoder("ViT-B-32", ckpt, cache_dir=base, device="cpu", threads=threads, spin_wait=spin)
            for workers in sorted({1, cores, cores + 1, 2 * cores}):
                rates = []
                for _ in range(2):
                    cache = warm_copy(base)
                    try:
                        s = safeclip.audit([str(p) for p in files], out=cache / "o.parquet", cache=cache,
                                           encoder=enc, workers=workers, progress=False, verbose=False, **kw)
                    finally:
                        shutil.rmtree(cache, ignore_errors=True)
                    rates.append(len(files) / max(1e-9, s.seconds - s.startup_seconds))
                print(f"   workers {workers}  model threads {threads}  spin {'on ' if spin else 'off'}: "
                      f"{max(rates):5.2f} img/s")
            del enc


SMALL = ("import importlib, sys\nlocal = importlib.import_module('safeclip.audit.local')\n"
         "local.SMALL_AUDIT_FILES = int(sys.argv[1])\n"
         "from safeclip.cli import main\nraise SystemExit(main(sys.argv[2:]))\n")


def small_section(files: list[Path], ckpt: str, base: Path, repeat: int = 5) -> None:
    """A small audit's whole command: decode threads in the process (the default up to SMALL_AUDIT_FILES inputs)
    vs decode processes (what it was before), alternated."""
    from safeclip.audit.plan import SMALL_AUDIT_FILES

    few = files[:2]
    print(f"\n6. a small audit ({len(few)} files), whole command, warm caches: in-process decode threads vs decode "
          f"processes (median of {repeat})")
    walls: dict[str, list[float]] = {"threads": [], "processes": []}
    for _ in range(repeat):
        for mode, limit in (("threads", SMALL_AUDIT_FILES), ("processes", 0)):
            cache = warm_copy(base)
            try:
                cmd = [sys.executable, "-c", SMALL, str(limit), *audit_cmd(few, ckpt, cache)[3:]]
                walls[mode].append(Run(cmd).wall)
            finally:
                shutil.rmtree(cache, ignore_errors=True)
    th, pr = statistics.median(walls["threads"]), statistics.median(walls["processes"])
    print(f"   threads {th:5.2f} s, processes {pr:5.2f} s: RATIO {pr / th:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--skip-nudenet", action="store_true")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--rule", action="store_true", help="also the worker/thread/spin grid (several minutes)")
    ap.add_argument("--decoder", default="auto", help="the audit's --decoder (auto, pil, vips)")
    ap.add_argument("--rule-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    one, five, _ = os.getloadavg()
    print(f"Random-weight ViT-B-32: real compute, NOT a moderation result. Load average {one:.2f} / {five:.2f} on "
          f"{os.cpu_count()} CPUs")
    ckpt = str(vit_b32_checkpoint())
    sets = mixed_set()
    files = [p for fs in sets.values() for p in fs]
    base = Path(tempfile.mkdtemp(prefix="safeclip-bench-throughput-"))
    if args.rule_only:
        Run(audit_cmd(files[:1], ckpt, base, "--runtime", "onnx"))
        shutil.rmtree(base / "embeddings", ignore_errors=True)
        rule_section(files, ckpt, base, args.decoder)
        shutil.rmtree(base, ignore_errors=True)
        return
    extra: tuple[str, ...] = () if args.decoder == "auto" else ("--decoder", args.decoder)
    try:
        # Warm the cache folder once: the export, the prompts and the audit's identity memo.
        for runtime in ("onnx", "torch"):
            Run(audit_cmd(files[:1], ckpt, base, "--runtime", runtime))
            (base / "out.parquet").unlink(missing_ok=True)
        shutil.rmtree(base / "embeddings", ignore_errors=True)
        bounds = bound_section(sets, ckpt, base, ["pil", "vips"])
        runs, _ = command_section(files, ckpt, base, args.pairs, not args.skip_nudenet, extra)
        steady_section(sets, ckpt, base, bounds, args.decoder)
        if not args.skip_torch:
            torch_section(files, ckpt, base, runs, extra)
        small_section(files, ckpt, base)
        if args.rule:
            rule_section(files, ckpt, base, args.decoder)
            if len(os.sched_getaffinity(0)) > 1:  # the same grid on one core, in a process pinned to it
                subprocess.run(["taskset", "-c", "0", sys.executable, __file__, "--rule-only", "--decoder",
                                args.decoder], check=False)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
