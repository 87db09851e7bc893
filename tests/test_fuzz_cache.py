"""Fuzz the embedding cache's reads with damaged rows: ``get``/``get_many`` and a whole-cache ``rescore`` raise
nothing but :class:`~safeclip.errors.SafeclipError` and never give one entry another entry's embeddings.

Each case copies a clean cache of :data:`N_ENTRIES` entries (1 to 3 rows each, some with backgrounds), damages a
few rows the way a bad disk, a foreign writer or a bug could (random blob lengths, text or numbers where a blob
belongs, NaN, garbage or mis-sized JSON, text/float/negative metadata, a key that is not a sha256, the database's
dimension as text or as another number), then checks, against the clean cache:

- ``rescore`` over the whole cache: one row per entry in order; a row that decides has exactly its own entry's
  reference probabilities (a damaged neighbour never shifts them), a damaged entry is an error row;
- ``get_many`` (read-only, then writable): every entry it returns holds the embeddings stored under its own key;
  after the writable lookup no damaged entry is left.

In the test run a fixed number of seeded cases run (a few seconds); standalone, for longer::

    python tests/test_fuzz_cache.py --seconds 60 [--seed 1]

It prints the inputs tried, the outcomes by kind and any failure (with the seed:case that replays it:
``python tests/test_fuzz_cache.py --replay SEED:CASE``).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import math
import random
import shutil
import sqlite3
import struct
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # standalone: make the checkout importable without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pyarrow.parquet as pq

from safeclip.audit import rescore
from safeclip.cache import CachedImage, EmbeddingCache
from safeclip.compiled import CompiledPolicy
from safeclip.embed import PromptCache
from safeclip.errors import SafeclipError
from safeclip.policy import load_policy

ENCODER_ID = "fuzz-enc|synthetic|px:none"
DIM = 16
N_ENTRIES = 24
POLICY = """
name: fuzz
version: "1"
scoring:
  logit_scale: 100.0
  templates: ["a photo of {}."]
  neutral: ["a landscape"]
categories:
  red:
    prompts: ["a red ball"]
    contrast: ["a blue cube"]
    thresholds: {flag: 0.3, block: 0.7}
  green:
    prompts: ["a green tree"]
    contrast: ["a grey wall"]
    thresholds: {flag: 0.3, block: null}
"""
META = ("width", "height", "n_frames", "nbytes")


def sha(i: int) -> str:
    return hashlib.sha256(f"fuzz-{i}".encode()).hexdigest()


def build_clean(folder: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """A clean cache (entries and the policy's prompt embeddings) and each entry's embeddings by sha256."""
    rng = np.random.default_rng(7)
    pol_file = folder / "policy.yaml"
    pol_file.write_text(POLICY)
    prompts = PromptCache(ENCODER_ID, folder)

    def texts(t: list[str]) -> np.ndarray:
        v = rng.normal(size=(len(t), DIM)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        prompts.put(t, v)
        return v

    CompiledPolicy.build(load_policy(pol_file), texts, ENCODER_ID)
    items = []
    for i in range(N_ENTRIES):
        rows = 1 + i % 3
        v = rng.normal(size=(rows, DIM)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        bgs = ("#ffffff", "#000000") + (None,) * (rows - 2) if rows >= 2 and i % 2 else ()
        items.append(CachedImage(sha(i), v, tuple([0] * rows), 10 + i, 20 + i, 1, 100 + i, "PNG", bgs))
    with EmbeddingCache(folder, ENCODER_ID) as db:
        db.put_many(items)
        db.checkpoint()
    return pol_file, {it.sha256: it.embeddings for it in items}


def _blob(rng: random.Random, vec: bytes) -> object:
    kind = rng.randrange(9)
    if kind == 0:
        return b""
    if kind == 1:
        return vec[:rng.randrange(len(vec))]
    if kind == 2:
        return vec + bytes(rng.randrange(1, 4 * DIM))
    if kind == 3:
        return bytes(rng.randrange(256) for _ in range(rng.choice([4 * DIM, 8 * DIM, rng.randrange(200)])))
    if kind == 4:  # NaN / inf in place
        a = bytearray(vec)
        k = rng.randrange(len(vec) // 4)
        a[4 * k:4 * k + 4] = struct.pack("<f", rng.choice([math.nan, math.inf, -math.inf]))
        return bytes(a)
    if kind == 5:
        return "a blob as text"
    if kind == 6:
        return rng.choice([0, -1, 3.5])
    if kind == 7:  # rows of another dimension
        return bytes(4 * (DIM + rng.choice([-1, 1])))
    return vec * 2  # twice the rows its frame list says


JSON_GARBAGE = ("", "[", "]", "{}", "null", '"x"', "[1.5]", "[-1]", '["a"]', "[[0]]", "[0, 0, 0, 0, 0, 0]", "[]",
                "[" * 5000 + "]" * 5000, "NaN", "[NaN]", "\x00", "[0]", "[0, 0]")
BG_GARBAGE = ("", "[", "{}", "null", "[1]", '["#ffffff"]', '["#ffffff", "#000000", "#ffffff", null]', "[null, 3]",
              "[" * 5000 + "]" * 5000, '["#ffffff", "#000000"]', "[null]")
NUMBER_GARBAGE = ("wide", "", "12", 1.5, -3, None, 2**62, b"\x01")
DIM_GARBAGE = ("sixteen", "16.0", "0", "-16", "", " 16", "1e3", "８", str(DIM * 2), str(DIM // 2), "1")


def damage(path: Path, rng: random.Random, kinds: collections.Counter) -> set[str]:
    """Damage a few rows of the database at ``path``; the sha256s whose embedding blob changed."""
    con = sqlite3.connect(path)
    changed: set[str] = set()
    rows = con.execute("SELECT rowid, sha, vec FROM images").fetchall()
    for rowid, key, vec in rng.sample(rows, rng.randint(1, 6)):
        what = rng.choice(["vec", "vec", "frame_indices", "backgrounds", "meta", "sha"])
        kinds[what] += 1
        if what == "vec":
            con.execute("UPDATE images SET vec = ? WHERE rowid = ?", (_blob(rng, vec), rowid))
            changed.add(key.hex())
        elif what == "frame_indices":
            con.execute("UPDATE images SET frame_indices = ? WHERE rowid = ?", (rng.choice(JSON_GARBAGE), rowid))
        elif what == "backgrounds":
            con.execute("UPDATE images SET backgrounds = ? WHERE rowid = ?", (rng.choice(BG_GARBAGE), rowid))
        elif what == "meta":
            con.execute(f"UPDATE images SET {rng.choice(META)} = ? WHERE rowid = ?",
                        (rng.choice(NUMBER_GARBAGE), rowid))
        else:
            bad_key = rng.choice([f"abc{rowid}", key[:31], rowid * 1000 + 7])
            con.execute("UPDATE images SET sha = ? WHERE rowid = ?", (bad_key, rowid))
    if rng.random() < 0.15:
        kinds["dim"] += 1
        con.execute("UPDATE meta SET value = ? WHERE key = 'dim'", (rng.choice(DIM_GARBAGE),))
    con.commit()
    con.close()
    return changed


class Fuzz:
    """The clean cache, its reference rescore, and one method per case."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.clean = work / "clean"
        self.clean.mkdir(parents=True)
        self.policy, self.embeddings = build_clean(self.clean)
        rescore(out=work / "ref.parquet", policy=self.policy, cache=self.clean, encoder_id=ENCODER_ID, verbose=False)
        self.reference = {r["sha256"]: r for r in pq.read_table(work / "ref.parquet").to_pylist()}
        assert len(self.reference) == N_ENTRIES and all(r["error"] is None for r in self.reference.values())
        self.tried = 0
        self.outcomes: collections.Counter = collections.Counter()
        self.kinds: collections.Counter = collections.Counter()

    def case(self, seed: int, index: int) -> None:
        rng = random.Random(f"{seed}:{index}")
        folder = self.work / f"case-{seed}-{index}"
        shutil.copytree(self.clean, folder)
        db_path = next((folder / "embeddings").glob("*.sqlite"))
        changed = damage(db_path, rng, self.kinds)
        self.tried += 1
        try:
            self._rescore(folder)
            self._lookups(folder, changed)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _rescore(self, folder: Path) -> None:
        out = folder / "out.parquet"
        try:
            rescore(out=out, policy=self.policy, cache=folder, encoder_id=ENCODER_ID, verbose=False)
        except SafeclipError as e:
            self.outcomes[f"rescore raised {type(e).__name__}"] += 1
            return
        rows = pq.read_table(out).to_pylist()
        assert len(rows) == N_ENTRIES, f"{len(rows)} rows for {N_ENTRIES} entries"
        for r in rows:
            ref = self.reference.get(r["sha256"])
            if r["error"] is not None:
                assert r["action"] == "error" and all(r[f"p_{c}"] is None for c in ("red", "green"))
                self.outcomes[f"rescore error row {r['error'].split(':')[0]}"] += 1
                continue
            assert ref is not None, f"{r['sha256']!r} decided but is not one of the cache's keys"
            for c in ("red", "green"):  # its own probabilities, never a neighbour's
                assert abs(r[f"p_{c}"] - ref[f"p_{c}"]) < 1e-6, (r, ref)
            assert r["action"] == ref["action"]
            self.outcomes["rescore row decided"] += 1

    def _lookups(self, folder: Path, changed: set[str]) -> None:
        keys = list(self.embeddings)
        for readonly in (True, False):
            try:
                with EmbeddingCache(folder, ENCODER_ID, readonly=readonly) as db:
                    got = db.get_many(keys)
                    got.update({k: v for k in keys[:3] if (v := db.get(k)) is not None})
                    for key, hit in got.items():
                        if key not in changed:  # its own embeddings, never a neighbour's
                            np.testing.assert_array_equal(hit.embeddings, self.embeddings[key])
                        assert hit.embeddings.shape[0] >= 1 and hit.embeddings.shape[1] == db.dim
                        assert len(hit.frame_indices) in (0, len(hit.embeddings))
                        assert len(hit.backgrounds) in (0, len(hit.embeddings))
                    self.outcomes["lookup hits"] += len(got)
                    self.outcomes["lookup misses (damaged)"] += len(db.damaged_entries)
                    if not readonly:  # nothing damaged is left behind
                        again = db.get_many(keys)
                        assert set(again) == set(got)
                        with EmbeddingCache(folder, ENCODER_ID, readonly=True) as ro:
                            ro.get_many(keys)
                            assert not ro.damaged_entries, ro.damaged_entries
            except SafeclipError as e:
                self.outcomes[f"lookup raised {type(e).__name__}"] += 1


def test_an_empty_blob_is_an_error_row_of_its_own_and_shifts_no_neighbour(tmp_path):
    fuzz = Fuzz(tmp_path)
    db_path = next((fuzz.clean / "embeddings").glob("*.sqlite"))
    con = sqlite3.connect(db_path)
    con.execute("UPDATE images SET vec = ? WHERE sha = ?", (b"", bytes.fromhex(sha(0))))
    con.execute("UPDATE images SET vec = ? WHERE sha = ?", (b"\0" * (4 * DIM + 4), bytes.fromhex(sha(5))))
    con.commit()
    con.close()
    rescore(out=tmp_path / "o.parquet", policy=fuzz.policy, cache=fuzz.clean, encoder_id=ENCODER_ID, verbose=False)
    rows = pq.read_table(tmp_path / "o.parquet").to_pylist()
    assert [r["sha256"] for r in rows] == [sha(i) for i in range(N_ENTRIES)]
    for i, r in enumerate(rows):
        if i in (0, 5):
            assert r["action"] == "error" and r["error"].startswith("DamagedCacheEntry: its embedding blob is ")
        else:
            ref = fuzz.reference[r["sha256"]]
            assert r["error"] is None and r["action"] == ref["action"]
            assert abs(r["p_red"] - ref["p_red"]) < 1e-6 and abs(r["p_green"] - ref["p_green"]) < 1e-6


def test_damaged_cache_rows_are_errors_or_misses_never_a_neighbours_embeddings(tmp_path, capsys):
    fuzz = Fuzz(tmp_path)
    for index in range(40):
        fuzz.case(0, index)
    with capsys.disabled():
        print(f"\n# cache fuzz: {fuzz.tried} damaged caches, damage {dict(fuzz.kinds)}, "
              f"outcomes {dict(sorted(fuzz.outcomes.items()))}")
    assert fuzz.outcomes["rescore row decided"] > 0 and fuzz.outcomes["lookup misses (damaged)"] > 0


def main() -> int:
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--replay", help="SEED:CASE")
    args = ap.parse_args()
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        fuzz = Fuzz(Path(tmp))
        cases = ([tuple(map(int, args.replay.split(":")))] if args.replay else
                 ((args.seed, i) for i in range(10**9)))
        deadline = time.monotonic() + args.seconds
        for seed, index in cases:
            if not args.replay and time.monotonic() > deadline:
                break
            try:
                fuzz.case(seed, index)
            except Exception as e:  # noqa: BLE001 - every failure is reported with what replays it
                failures.append(f"{seed}:{index}: {type(e).__name__}: {str(e)[:300]}")
        print(json.dumps({"inputs_tried": fuzz.tried, "damage": dict(fuzz.kinds),
                          "outcomes": dict(sorted(fuzz.outcomes.items())), "failures": failures}, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
