"""Peak memory of ``audit --manifest``, ``rescore --from`` and ``diff`` on a tiny Parquet file of many identical rows.

    python benchmarks/hostile_parquet.py [--rows 5000000] [--baseline-tree DIR] [--only audit,rescore,diff]

The file is a real audit output (one photo audited with a tiny random-weight checkpoint) whose one row is repeated
``--rows`` times: dictionary and run-length encoding make 5M rows a few hundred KB. It is given to each command as
it is (as a manifest: it has a ``path`` column; to rescore: it is an audit output; to diff: against a copy of
itself). Each command runs in a fresh interpreter; the script prints its peak RSS (``VmHWM`` of the process, and
``ru_maxrss`` of its children: the audit's decode workers), wall time, exit code and last line of stderr.
``--baseline-tree DIR`` runs the same commands against another checkout's safeclip too (e.g. a ``git archive`` of
an older commit) and prints the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from _common import photos  # noqa: E402

_MEASURE = r"""
import json, resource, runpy, sys, time
sys.argv = ["safeclip"] + json.loads(sys.argv[1])
t = time.monotonic()
code = 0
try:
    runpy.run_module("safeclip", run_name="__main__", alter_sys=True)
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across exec
self_kib = int([x for x in open("/proc/self/status") if x.startswith("VmHWM:")][0].split()[1])
kids_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"code": code, "seconds": time.monotonic() - t, "self_mib": self_kib / 1024,
                  "children_mib": kids_kib / 1024}), file=sys.__stdout__)
"""


def build(work: Path, rows: int) -> dict[str, Path]:
    """The tiny checkpoint, a warm cache, and the hostile file (plus a copy to diff against)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from conftest import make_tiny_checkpoint

    model = work / "model"
    if not (model / "open_clip_config.json").exists():
        make_tiny_checkpoint(model)
    one = work / "one.parquet"
    if not one.exists():
        subprocess.run([sys.executable, "-m", "safeclip", "audit", str(photos()[0]), "--out", str(one), "--model",
                        f"local-dir:{model}", "--cache", str(work / "cache"), "--no-progress", "--workers", "1"],
                       check=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    hostile = work / f"hostile-{rows}.parquet"
    if not hostile.exists():
        t = pq.read_table(one)
        big = t.take(pa.array([0] * rows))
        pq.write_table(big, hostile, compression="zstd")
    copy = work / f"hostile-{rows}-copy.parquet"
    if not copy.exists():
        copy.write_bytes(hostile.read_bytes())
    return {"model": model, "cache": work / "cache", "hostile": hostile, "copy": copy}


def commands(files: dict[str, Path], work: Path) -> dict[str, list[str]]:
    return {
        "audit --manifest": ["audit", "--manifest", str(files["hostile"]), "--out", str(work / "audited.parquet"),
                             "--model", f"local-dir:{files['model']}", "--cache", str(files["cache"]),
                             "--no-progress", "--workers", "1", "--overwrite"],
        "rescore --from": ["rescore", "--from", str(files["hostile"]), "--out", str(work / "rescored.parquet"),
                           "--cache", str(files["cache"]), "--overwrite"],
        "diff": ["diff", str(files["hostile"]), str(files["copy"])],
    }


def measure(tree: Path, argv: list[str], work: Path) -> dict[str, object]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    p = subprocess.run([sys.executable, "-c", _MEASURE, json.dumps(argv)], cwd=work, env=env, capture_output=True,
                       text=True, timeout=3600)
    try:
        res = json.loads(p.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        res = {"code": p.returncode, "seconds": float("nan"), "self_mib": float("nan"),
               "children_mib": float("nan")}
    lines = p.stderr.strip().splitlines()
    res["stderr"] = lines[-1][:160] if lines else ""
    res["peak_mib"] = max(res["self_mib"], res["children_mib"])
    return res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--baseline-tree", type=Path, help="another checkout whose safeclip to compare against")
    parser.add_argument("--only", default="audit,rescore,diff", help="which commands (comma-separated)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "safeclip-hostile-parquet")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    files = build(args.work, args.rows)
    print(f"{files['hostile'].name}: {args.rows:,} identical rows, "
          f"{files['hostile'].stat().st_size / 1e6:.2f} MB on disk")
    trees = {"this tree": ROOT}
    if args.baseline_tree:
        trees["baseline"] = args.baseline_tree.resolve()
    wanted = args.only.split(",")
    for name, cmd in commands(files, args.work).items():
        if name.split()[0] not in wanted:
            continue
        got = {}
        for label, tree in trees.items():
            r = got[label] = measure(tree, cmd, args.work)
            print(f"{name:18s} {label:10s} peak {r['peak_mib']:8.0f} MiB  {r['seconds']:6.1f} s  exit {r['code']}  "
                  f"| {r['stderr']}", flush=True)
        if len(got) == 2 and got["this tree"]["peak_mib"]:
            print(f"{'':18s} baseline / this tree: {got['baseline']['peak_mib'] / got['this tree']['peak_mib']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
