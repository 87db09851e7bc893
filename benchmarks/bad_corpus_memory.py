"""Peak memory of decoding every bad (and tricky) corpus file in one process, and of hostile files built here.

    python benchmarks/bad_corpus_memory.py [--corpus ../shared/corpus] [--repeat 2] [--target-size 224]
                                           [--hostile-only] [--baseline-tree DIR]

Prints the peak RSS (``resource.getrusage().ru_maxrss``) before and after, the files that raised the peak the most,
the current RSS after each pass (growth across passes would be a leak), and the outcomes by error type. Exits 1 if
anything but a DecodeError escapes for a bad file, or a tricky file fails.

Then the hostile files of issue 9 item 6, each decoded in a fresh interpreter (peak RSS, seconds, outcome): a 1 KB
animated WebP of 20 tiny frames on an 8000x8000 canvas and a 23 KB GIF of 999 frames on one, at ``target_size`` 224
and at full resolution. ``--baseline-tree DIR`` runs them against another checkout's safeclip too (e.g. a
``git archive`` of an older commit) and prints the ratios.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from safeclip.decode import DecodeLimits, decode  # noqa: E402
from safeclip.errors import DecodeError  # noqa: E402
from tests.test_decode import gif_animation, peak_rss_of_decode, webp_animation  # noqa: E402

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
    parser.add_argument("--hostile-only", action="store_true", help="skip the corpus, run the hostile files only")
    parser.add_argument("--baseline-tree", type=Path, help="another checkout whose safeclip to compare against")
    args = parser.parse_args(argv)
    if args.hostile_only:
        return hostile(args.baseline_tree)

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
    return max(1 if problems else 0, hostile(args.baseline_tree))


def _outcome(out: dict) -> str:
    if "error" in out:
        return f"{out['error']}: {out['message'].split(': ', 2)[-1][:90]}"
    return f"{out['views']} frames of {out['frame_size'][0]}x{out['frame_size'][1]}"


def hostile(baseline: Path | None) -> int:
    """Each hostile file in a fresh interpreter: peak RSS, seconds and outcome (against ``baseline`` too)."""
    import tempfile

    cases = [
        ("animated WebP, 20 4x4 frames on 8000x8000", webp_animation((8000, 8000), 20)),
        ("GIF, 999 1x1 frames on 8000x8000", gif_animation((8000, 8000), 999)),
    ]
    trees = [("this checkout", ROOT)] + ([("baseline", baseline.resolve())] if baseline else [])
    print("hostile files (each decoded in a fresh interpreter, default limits):")
    with tempfile.TemporaryDirectory() as tmp:
        for label, data in cases:
            for target in (224, None):
                results = {}
                for tree_name, tree in trees:
                    out = peak_rss_of_decode(Path(tmp), data, root=tree, **({"target_size": target} if target else {}))
                    results[tree_name] = out
                    print(f"  {label} ({len(data)} bytes), target_size={target}, {tree_name}: peak RSS "
                          f"{out['peak_mib']:.0f} MiB (+{out['rise_mib']:.0f} MiB for the decode), "
                          f"{out['seconds']:.1f} s, {_outcome(out)}")
                if baseline:
                    new, old = results["this checkout"], results["baseline"]
                    print(f"    baseline / this checkout: peak RSS rise x{old['rise_mib'] / max(new['rise_mib'], 1):.1f},"
                          f" time x{old['seconds'] / max(new['seconds'], 1e-3):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
