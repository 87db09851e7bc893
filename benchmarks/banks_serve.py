"""Banks on the request path: how soon a running server answers a new bank entry, and what matching costs a check.

Timing only: the model is ViT-B-32 with random weights (benchmarks/_common.py); nothing printed is a moderation
result.

(a) ``add_to_match``: a `safeclip serve` subprocess under a policy with an (empty) deny PDQ bank; a photo is added to
    the bank (``safeclip bank add`` when this checkout has the command, else ``Bank.open(..., writable=True).add``:
    the result says which), and the server is asked about the photo every 50 ms until it answers ``block``.
    Reported: seconds from the start of the add to the first ``block``. Target <= 10 s.
(b) ``check_overhead``: one warm Moderator, the same photos checked under the default policy and under the default
    policy plus a category that names a 1M-entry embedding bank (random unit vectors of the model's dimension) and a
    1M-entry PDQ bank (random hashes), deny; asked in turn so that drift on a shared machine hits both alike.
    Reported: the median check latency of each and their ratio. Target <= 1.05. (Random rows match nothing: the
    cost measured is the search, not the flood log.)

    python benchmarks/banks_serve.py [--entries 1000000] [--repeat 40] [--skip-serve] [--skip-overhead]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ServeProcess, photos, vit_b32_checkpoint  # noqa: E402

POLICY_HEAD = """name: {name}
version: "1"
extends: default
categories:
  known:
    banks:
"""
PDQ_REF = """      - path: {path}
        effect: deny
        action: block
"""
EMB_REF = """      - path: {path}
        effect: deny
        action: block
        min_similarity: 0.94
"""


def _has_bank_cli() -> bool:
    r = subprocess.run([sys.executable, "-m", "safeclip", "bank", "add", "--help"], capture_output=True,
                       cwd=tempfile.gettempdir(), env=_env())
    return r.returncode == 0


def _env() -> dict[str, str]:
    import os

    import safeclip

    code = str(Path(safeclip.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [code, os.environ.get("PYTHONPATH")]))}


def add_to_match(photo: Path | None = None, *, workdir: Path | None = None, poll_s: float = 0.05,
                 limit_s: float = 60.0) -> dict:
    """Seconds from adding ``photo`` to a running server's deny PDQ bank to its first ``block`` answer."""
    import httpx

    from safeclip.banks import Bank, NewEntry
    from safeclip.embed import PixelSpec, prepare

    photo = photo or photos()[0]
    work = Path(workdir or tempfile.mkdtemp(prefix="banks-serve-"))
    bank = Bank.create(work / "incidents", "pdq")
    bank.close()
    policy = work / "policy.yaml"
    policy.write_text(POLICY_HEAD.format(name="bench-banks") + PDQ_REF.format(path="incidents"))
    cache = Path(tempfile.gettempdir()) / "safeclip-bench" / "cache"
    server = ServeProcess("banks", vit_b32_checkpoint(), cache, ["--policy", str(policy), "--max-wait-ms", "5"])
    body = photo.read_bytes()
    try:
        server.wait_ready(httpx, time.monotonic() + 900)
        with httpx.Client(base_url=server.url, timeout=30) as client:
            before = client.post("/v1/check", content=body).json()
            if any(m["entry"] == "bench-1" for m in before.get("matches", [])):
                raise SystemExit("the bank matched before the entry was added")
            via_cli = _has_bank_cli()
            t0 = time.perf_counter()
            if via_cli:
                subprocess.run([sys.executable, "-m", "safeclip", "bank", "add", str(work / "incidents"), str(photo),
                                "--id", "bench-1", "--label", "benchmark"], check=True, capture_output=True,
                               env=_env(), cwd=tempfile.gettempdir())
            else:
                writer = Bank.open(work / "incidents", writable=True)
                pdq = prepare(body, PixelSpec(size=224)).pdq
                writer.add(pdq[:1], [NewEntry("bench-1", label="benchmark")])
                writer.close()
            added = time.perf_counter() - t0
            polls = 0
            while True:
                doc = client.post("/v1/check", content=body).json()
                polls += 1
                if doc["action"] == "block" and any(m["entry"] == "bench-1" for m in doc["matches"]):
                    break
                if time.perf_counter() - t0 > limit_s:
                    raise SystemExit(f"no block within {limit_s} s: {json.dumps(doc)[:400]}")
                time.sleep(poll_s)
            seconds = time.perf_counter() - t0
    finally:
        server.stop()
        if workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return {"seconds_to_match": round(seconds, 3), "add_seconds": round(added, 3), "polls": polls,
            "added_with": "safeclip bank add" if via_cli else "Bank.open(...).add (no `safeclip bank` here)",
            "target_s": 10.0, "ok": seconds <= 10.0}


def _fill(bank, rows_fn, n: int, chunk: int, prefix: str) -> None:
    from safeclip.banks import NewEntry

    for start in range(0, n, chunk):
        k = min(chunk, n - start)
        bank.add(rows_fn(k), [NewEntry(f"{prefix}{start + i}") for i in range(k)])


def check_overhead(entries: int = 1_000_000, *, repeat: int = 40, n_photos: int = 8,
                   workdir: Path | None = None) -> dict:
    """Median warm ``check`` latency with and without a policy category naming an ``entries``-row embedding bank and
    an ``entries``-row PDQ bank (random rows), and their ratio."""
    from safeclip import Moderator
    from safeclip.banks import Bank

    work = Path(workdir or tempfile.mkdtemp(prefix="banks-overhead-"))
    cache = Path(tempfile.gettempdir()) / "safeclip-bench" / "cache"
    m = Moderator(model="ViT-B-32", pretrained=str(vit_b32_checkpoint()), cache_dir=cache)
    rng = np.random.default_rng(0)

    def unit_rows(k: int) -> np.ndarray:
        v = rng.standard_normal((k, m.encoder.dim), dtype=np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    t = time.perf_counter()
    emb_bank = Bank.create(work / "exemplars", "embedding", dim=m.encoder.dim, encoder_id=m.encoder_id)
    _fill(emb_bank, unit_rows, entries, 250_000, "e")
    emb_bank.close()
    pdq_bank = Bank.create(work / "hashes", "pdq")
    _fill(pdq_bank, lambda k: rng.integers(0, 256, (k, 32), dtype=np.uint8), entries, 250_000, "h")
    pdq_bank.close()
    build_s = time.perf_counter() - t
    policy = work / "banks.yaml"
    policy.write_text(POLICY_HEAD.format(name="bench-banks") + EMB_REF.format(path="exemplars")
                      + PDQ_REF.format(path="hashes"))
    t = time.perf_counter()
    m.compiled(policy)  # opens both banks (maps their rows, loads their indexes)
    open_s = time.perf_counter() - t
    bodies = [p.read_bytes() for p in photos()[:n_photos]]
    for b in bodies[:2]:  # warm both
        m.check(b)
        m.check(b, policy=policy)
    plain: list[float] = []
    banks: list[float] = []
    for i in range(repeat):
        b = bodies[i % len(bodies)]
        for pol, out in ((None, plain), (policy, banks)) if i % 2 == 0 else ((policy, banks), (None, plain)):
            t = time.perf_counter()
            d = m.check(b, policy=pol)
            out.append(time.perf_counter() - t)
            assert pol is None or not d.matches, "random rows matched a photo"
    p50, b50 = statistics.median(plain), statistics.median(banks)
    if workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return {"entries": entries, "dim": m.encoder.dim, "build_s": round(build_s, 1), "open_s": round(open_s, 2),
            "median_ms_without": round(p50 * 1e3, 1), "median_ms_with": round(b50 * 1e3, 1),
            "ratio": round(b50 / p50, 3), "target_ratio": 1.05, "ok": b50 / p50 <= 1.05, "repeat": repeat}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--entries", type=int, default=1_000_000, help="rows of each bank in (b)")
    ap.add_argument("--repeat", type=int, default=40, help="checks per policy in (b)")
    ap.add_argument("--skip-serve", action="store_true")
    ap.add_argument("--skip-overhead", action="store_true")
    args = ap.parse_args()
    if not args.skip_serve:
        print("(a) add to match:", json.dumps(add_to_match()), flush=True)
    if not args.skip_overhead:
        print("(b) check overhead:", json.dumps(check_overhead(args.entries, repeat=args.repeat)), flush=True)


if __name__ == "__main__":
    main()
