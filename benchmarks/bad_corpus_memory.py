"""Peak memory of decoding every bad (and tricky) corpus file in one process.

    python benchmarks/bad_corpus_memory.py [--corpus ../shared/corpus] [--repeat 2] [--target-size 224]

Prints the peak RSS (``resource.getrusage().ru_maxrss``) before and after, the files that raised the peak the most,
the current RSS after each pass (growth across passes would be a leak), and the outcomes by error type. Exits 1 if
anything but a DecodeError escapes for a bad file, or a tricky file fails.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from safeclip.decode import DecodeLimits, decode  # noqa: E402
from safeclip.errors import DecodeError  # noqa: E402

DOCS = {"MANIFEST.csv", "README.md", "PILLOW-LICENSE"}


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def current_mib() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def default_corpus() -> Path:
    here = Path(__file__).resolve().parents[2] / "shared" / "corpus"
    return here if here.is_dir() else Path(os.environ.get("SAFECLIP_CORPUS", "../shared/corpus")).resolve()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", type=Path, default=default_corpus())
    parser.add_argument("--repeat", type=int, default=2, help="passes over the files (leak check)")
    parser.add_argument("--target-size", type=int, default=None)
    args = parser.parse_args(argv)

    files = []
    for sub in ("bad", "tricky"):
        folder = args.corpus / sub
        files += [(sub, p) for p in sorted(folder.iterdir()) if p.is_file() and p.name not in DOCS]
    if not files:
        print(f"no corpus files under {args.corpus}")
        return 2
    import warnings

    warnings.simplefilter("ignore")
    limits = DecodeLimits()
    gc.collect()
    start_peak, start_rss = peak_mib(), current_mib()
    print(f"{len(files)} files; peak RSS before: {start_peak:.1f} MiB, current RSS: {start_rss:.1f} MiB")

    outcomes: Counter[str] = Counter()
    jumps: list[tuple[float, str]] = []
    problems: list[str] = []
    slowest = (0.0, "")
    for rep in range(args.repeat):
        for sub, path in files:
            before = peak_mib()
            t0 = time.perf_counter()
            try:
                d = decode(path, limits=limits, target_size=args.target_size)
                kind = "decoded"
                if sub == "bad":
                    problems.append(f"bad file decoded: {path.name}")
                del d
            except DecodeError as e:
                kind = type(e).__name__
                if sub == "tricky":
                    problems.append(f"tricky file failed: {e}")
            except Exception as e:  # noqa: BLE001 - counted and reported
                kind = f"UNEXPECTED {type(e).__name__}"
                problems.append(f"{path.name}: {type(e).__name__}: {e}")
            dt = time.perf_counter() - t0
            slowest = max(slowest, (dt, f"{sub}/{path.name}"))
            if rep == 0:
                outcomes[f"{sub}: {kind}"] += 1
                jumps.append((peak_mib() - before, f"{sub}/{path.name}"))
        gc.collect()
        print(f"after pass {rep + 1}: peak RSS {peak_mib():.1f} MiB, current RSS {current_mib():.1f} MiB")

    print(f"peak RSS after: {peak_mib():.1f} MiB (+{peak_mib() - start_peak:.1f} MiB over the start)")
    jumps.sort(reverse=True)
    print(f"largest per-file increase of the peak: {jumps[0][0]:.1f} MiB ({jumps[0][1]})")
    for inc, name in jumps[1:5]:
        if inc > 0:
            print(f"  then {inc:.1f} MiB ({name})")
    print(f"slowest file: {slowest[0] * 1000:.1f} ms ({slowest[1]})")
    print("outcomes (first pass):")
    for k, v in sorted(outcomes.items()):
        print(f"  {k:40s} {v}")
    for line in problems[:20]:
        print("PROBLEM:", line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
