"""Fuzz the readers of audit outputs with malformed ones (issue 21.2): ``rescore --from``, ``rescore --embeddings``,
``diff`` (both sides) and an audit resumed over them (as its ``OUT``, and as a committed part of its parts folder)
finish or raise a :class:`~safeclip.errors.SafeclipError`, never anything else.

The inputs are a real audit output (with saved embeddings) mutated: its ``safeclip`` metadata (absent, not JSON, a
list, a string, deeply nested, each field of the wrong type or out of range), each column retyped (numbers, bools,
bytes, structs, lists, maps, timestamps, dictionaries, nulls), nulled or dropped, wrong embedding lengths and dims,
repeated rows and columns, more rows than the row limit, empty and truncated files. The fast test runs a fixed
sample of them through every reader; the ``slow`` one runs all of them plus seeded random combinations. Standalone,
for a longer run (prints the inputs tried, the outcomes and every unexpected exception with its case name)::

    python tests/test_fuzz_parquet.py [--random 500] [--seed 1] [--no-audit]
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # standalone: make the checkout importable without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from audit_helpers import bad_files, sample  # noqa: F401

from safeclip.errors import SafeclipError

Mutation = Callable[[pa.Table], "pa.Table | bytes"]

_ROW_LIMIT = 1000  # $SAFECLIP_MAX_ROWS while fuzzing: the "huge count" cases are over it


# ------------------------------------------------------------------------------------------------ the mutations
def _with_meta(raw: bytes | None) -> Mutation:
    def f(t: pa.Table) -> pa.Table:
        meta = dict(t.schema.metadata or {})
        meta.pop(b"safeclip", None)
        if raw is not None:
            meta[b"safeclip"] = raw
        return t.replace_schema_metadata(meta)
    return f


def _meta_of(t: pa.Table) -> dict[str, Any]:
    """The table's metadata as an object to change (an earlier mutation may have left none, or not an object)."""
    try:
        meta = json.loads((t.schema.metadata or {}).get(b"safeclip") or b"{}")
    except (ValueError, RecursionError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _meta_field(key: str, value: Any) -> Mutation:
    def f(t: pa.Table) -> pa.Table:
        meta = _meta_of(t)
        meta[key] = value
        return _with_meta(json.dumps(meta).encode())(t)
    return f


def _meta_without(key: str) -> Mutation:
    def f(t: pa.Table) -> pa.Table:
        meta = _meta_of(t)
        meta.pop(key, None)
        return _with_meta(json.dumps(meta).encode())(t)
    return f


def _set_column(name: str, make: Callable[[pa.Table], pa.Array]) -> Mutation:
    def f(t: pa.Table) -> pa.Table:
        arr = make(t)
        if name in t.column_names:
            return t.set_column(t.column_names.index(name), name, arr)
        return t.append_column(name, arr)
    return f


def _drop(name: str) -> Mutation:
    return lambda t: t.drop_columns([name]) if name in t.column_names else t


def _rows(make: Callable[[pa.Table], list[int]]) -> Mutation:
    return lambda t: t.take(pa.array(make(t), pa.int64()))


def _decided(t: pa.Table) -> int:
    return t.column("error").to_pylist().index(None)


_TYPED: dict[str, Callable[[int], pa.Array]] = {
    "int64": lambda n: pa.array(range(n), pa.int64()),
    "negative": lambda n: pa.array([-(2**62)] * n, pa.int64()),
    "float64": lambda n: pa.array([float("nan")] * n, pa.float64()),
    "bool": lambda n: pa.array([True] * n),
    "binary": lambda n: pa.array([b"\xff\x00\xfe"] * n, pa.binary()),
    "struct": lambda n: pa.array([{"a": 1, "b": "x"}] * n),
    "list<string>": lambda n: pa.array([["x", None]] * n),
    "list<list<float>>": lambda n: pa.array([[[0.5, 0.5]]] * n, pa.list_(pa.list_(pa.float64()))),
    "map": lambda n: pa.array([[("k", 1)]] * n, pa.map_(pa.string(), pa.int64())),
    "timestamp": lambda n: pa.array([0] * n, pa.timestamp("s")),
    "null": lambda n: pa.nulls(n),
    "text": lambda n: pa.array(["\x00 not what it should be \u2603"] * n),
    "empty text": lambda n: pa.array([""] * n),
    "dictionary": lambda n: pa.array(["x"] * n).dictionary_encode(),
    "large_string": lambda n: pa.array(["y" * 300] * n, pa.large_string()),
    "float32 inf": lambda n: pa.array([float("inf")] * n, pa.float32()),
    "fixed_size_list": lambda n: pa.array([[1.0, 0.0]] * n, pa.list_(pa.float32(), 2)),
}

_COLUMNS = ("path", "path_bytes", "sha256", "bytes", "width", "height", "frames", "background", "action",
            "p_sexual", "error", "encoder_id", "policy", "embedding", "embedding_backgrounds")


def _nulled(name: str) -> Mutation:
    return _set_column(name, lambda t: pa.nulls(t.num_rows, t.schema.field(name).type))


def _embedding(values: Callable[[pa.Table], list[Any]], typ: pa.DataType | None = None) -> Mutation:
    return _set_column("embedding", lambda t: pa.array(values(t), typ or t.schema.field("embedding").type))


def _frames_of(t: pa.Table, k: int) -> list[Any]:
    return t.column("embedding").to_pylist()[k] or [[0.0]]


def _file_level() -> dict[str, Callable[[pa.Table], bytes]]:
    import io

    def parquet_bytes(t: pa.Table) -> bytes:
        buf = io.BytesIO()
        pq.write_table(t, buf)
        return buf.getvalue()

    return {
        "file: empty": lambda t: b"",
        "file: not parquet": lambda t: b"PAR1 but not really" * 10,
        "file: truncated": lambda t: parquet_bytes(t)[: len(parquet_bytes(t)) // 2],
        "file: footer only": lambda t: parquet_bytes(t)[-200:],
        "file: damaged middle": lambda t: (lambda b: b[:len(b) // 3] + b"\xff" * 64 + b[len(b) // 3 + 64:])(
            parquet_bytes(t)),
    }


def cases() -> dict[str, Mutation]:
    """Every deterministic mutation, by name."""
    out: dict[str, Mutation] = {}
    for name, raw in {"absent": None, "empty": b"", "not json": b"{not json", "a list": b'["audit", 64]',
                      "a string": b'"audit"', "a number": b"64", "null": b"null", "not utf-8": b"\xff\xfe{}",
                      "deeply nested": b"[" * 100_000 + b"]" * 100_000, "huge": json.dumps(
                          {"kind": "audit", "pad": "x" * 2_000_000}).encode(),
                      "nan": b'{"kind": "audit", "dim": NaN}'}.items():
        out[f"meta: {name}"] = _with_meta(raw)
    for key, values in {
        "dim": ["64", -1, 0, 1.5, True, [64], {"d": 64}, 10**30, None, 3, 100_000],
        "encoder_id": [5, ["a"], {"x": 1}, "", "someone-else", None],
        "cwd": [5, ["/"], None, "", "\x00"],
        "thresholds": [[0.5], {"sexual": "x"}, {"sexual": [1]}, {"sexual": [None, "a"]}, {"sexual": {"flag": 1}},
                       5, None, {"sexual": [float("nan"), float("inf")]}],
        "categories": [5, [1, 2], None, "sexual"],
        "kind": [["audit"], 5, None, "rescore", "other"],
        "format": ["1", 99, None],
        "save_embeddings": ["yes", None],
        "policy": [5, None],
    }.items():
        for v in values:
            out[f"meta: {key}={json.dumps(v)[:40]}"] = _meta_field(key, v)
        out[f"meta: no {key}"] = _meta_without(key)
    for col in _COLUMNS:
        for tname, make in _TYPED.items():
            out[f"column {col}: {tname}"] = _set_column(col, lambda t, make=make: make(t.num_rows))
        out[f"column {col}: nulls"] = _nulled(col)
        out[f"column {col}: dropped"] = _drop(col)
    out["column: a second path"] = lambda t: t.append_column("path", t.column("path"))
    out["column: p_ with no name"] = _set_column("p_", lambda t: pa.array([0.5] * t.num_rows, pa.float32()))
    out["column: p_ of another category"] = _set_column("p_zzz", lambda t: pa.array([2.0] * t.num_rows, pa.float32()))
    out["column: mtime_ns text"] = _set_column("mtime_ns", lambda t: pa.array(["x"] * t.num_rows))
    out["rows: none"] = lambda t: t.slice(0, 0)
    out["rows: one repeated"] = _rows(lambda t: [_decided(t)] * 50)
    out["rows: all repeated"] = _rows(lambda t: list(range(t.num_rows)) * 2)
    out["rows: over the limit"] = _rows(lambda t: [_decided(t)] * (_ROW_LIMIT + 1))
    out["rows: mixed encoders"] = _set_column(
        "encoder_id", lambda t: pa.array([f"enc-{i % 2}" for i in range(t.num_rows)]))
    out["rows: sha256 not hex"] = _set_column("sha256", lambda t: pa.array(["zz" * 32] * t.num_rows))
    out["rows: sha256 upper case"] = _set_column(
        "sha256", lambda t: pa.array([None if s is None else s.upper() for s in t.column("sha256").to_pylist()]))
    out["rows: frames huge"] = _set_column("frames", lambda t: pa.array([2**31 - 1] * t.num_rows, pa.int32()))
    out["rows: bytes negative"] = _set_column("bytes", lambda t: pa.array([-5] * t.num_rows, pa.int64()))
    out["rows: action unknown"] = _set_column("action", lambda t: pa.array(["maybe"] * t.num_rows))
    out["rows: probabilities nan"] = _set_column("p_sexual", lambda t: pa.array([float("nan")] * t.num_rows,
                                                                                pa.float32()))
    out["rows: error and probabilities"] = _set_column("error", lambda t: pa.array(["boom"] * t.num_rows))
    out["embedding: empty lists"] = _embedding(lambda t: [[]] * t.num_rows)
    out["embedding: empty frames"] = _embedding(lambda t: [[[]]] * t.num_rows)
    out["embedding: null frames"] = _embedding(lambda t: [[None]] * t.num_rows)
    out["embedding: null floats"] = _embedding(lambda t: [[[None] * 64]] * t.num_rows)
    out["embedding: dim 3"] = _embedding(lambda t: [[[0.6, 0.8, 0.0]]] * t.num_rows)
    out["embedding: dim 5000"] = _embedding(lambda t: [[[0.0] * 4999 + [1.0]]] * t.num_rows)
    out["embedding: 300 frames"] = _embedding(lambda t: [_frames_of(t, _decided(t)) * 300] * t.num_rows)
    out["embedding: ragged frames"] = _embedding(
        lambda t: [[f, f[:-1]] for f in (_frames_of(t, _decided(t))[0],)] * t.num_rows)
    out["embedding: flat, not a multiple"] = _embedding(lambda t: [[0.1] * 65] * t.num_rows, pa.list_(pa.float32()))
    out["embedding: flat, empty"] = _embedding(lambda t: [[]] * t.num_rows, pa.list_(pa.float32()))
    out["embedding: int lists"] = _embedding(lambda t: [[[1] + [0] * 63]] * t.num_rows,
                                             pa.list_(pa.list_(pa.int64())))
    out["embedding: triple nested"] = _embedding(lambda t: [[[[0.5]]]] * t.num_rows,
                                                 pa.list_(pa.list_(pa.list_(pa.float32()))))
    out["embedding: large lists"] = _embedding(
        lambda t: t.column("embedding").to_pylist(), pa.large_list(pa.large_list(pa.float32())))
    out["embedding_backgrounds: wrong length"] = _set_column(
        "embedding_backgrounds", lambda t: pa.array([["#ffffff"] * 7] * t.num_rows, pa.list_(pa.string())))
    out.update(_file_level())  # type: ignore[arg-type]
    return out


def random_case(rng: random.Random, pool: dict[str, Mutation], k: int = 3) -> tuple[str, Mutation]:
    """``k`` table mutations of ``pool`` applied in turn (file-level ones excluded: they end a chain)."""
    names = rng.sample([n for n in pool if not n.startswith("file:")], k)

    def f(t: pa.Table) -> pa.Table | bytes:
        for n in names:
            t = pool[n](t)  # type: ignore[assignment]
            if isinstance(t, bytes):
                return t
        return t
    return " + ".join(names), f


# ------------------------------------------------------------------------------------------------ the readers
class Target:
    """A real audit output to mutate, its inputs, its cache and the encoder that made it."""

    def __init__(self, folder: Path, inputs: list[str], encoder: Any) -> None:
        self.folder, self.inputs, self.encoder = folder, inputs, encoder
        self.base = folder / "base.parquet"
        self.cache = folder / "cache"
        self.table = pq.read_table(self.base)

    @classmethod
    def make(cls, folder: Path, inputs: list[str], encoder: Any) -> Target:
        from safeclip.audit import audit

        folder.mkdir(parents=True, exist_ok=True)
        audit(inputs, out=folder / "base.parquet", cache=folder / "cache", encoder=encoder, save_embeddings=True,
              workers=1, verbose=False)
        return cls(folder, inputs, encoder)

    def write(self, name: str, mutate: Mutation, dst: Path) -> bool:
        """The mutated output at ``dst``; False when pyarrow cannot write it (not an input anyone can make)."""
        try:
            got = mutate(self.table)
            if isinstance(got, bytes):
                dst.write_bytes(got)
            else:
                pq.write_table(got, dst)
            return True
        except (pa.ArrowException, ValueError, TypeError, OverflowError, KeyError, IndexError):
            return False  # (a chain of mutations that does not apply: e.g. no decided row left to copy)

    def readers(self, src: Path, work: Path, audit_resume: bool) -> dict[str, Callable[[], object]]:
        from safeclip.audit import audit, diff, rescore

        out = work / "out.parquet"
        runs: dict[str, Callable[[], object]] = {
            "rescore --from": lambda: rescore(out=out, policy="default", cache=self.cache, from_audit=src,
                                              verbose=False, overwrite=True),
            "rescore --embeddings": lambda: rescore(out=out, policy="default", cache=self.cache, embeddings=src,
                                                    verbose=False, overwrite=True),
            "diff a": lambda: diff(src, self.base),
            "diff b": lambda: diff(self.base, src),
        }
        if audit_resume:
            def over_out() -> object:
                dst = work / "resume-out.parquet"
                shutil.copyfile(src, dst)
                return audit(self.inputs, out=dst, cache=self.cache, encoder=self.encoder, save_embeddings=True,
                             workers=1, verbose=False)

            def as_part() -> object:
                dst = work / "resume-part.parquet"
                parts = dst.with_name(dst.name + ".parts")
                parts.mkdir()
                (parts / "run.json").write_text(self.table.schema.metadata[b"safeclip"].decode())
                shutil.copyfile(src, parts / "part-000000.parquet")
                return audit(self.inputs, out=dst, cache=self.cache, encoder=self.encoder, save_embeddings=True,
                             workers=1, verbose=False)

            runs["audit resume over it"] = over_out
            runs["audit resume from it as a part"] = as_part
        return runs


def fuzz(target: Target, named: dict[str, Mutation], work: Path, *, audit_resume: bool = True) -> dict[str, Any]:
    """Run every reader on every mutated output; what happened, by outcome, and every unexpected exception."""
    outcomes: Counter[str] = Counter()
    unexpected: list[str] = []
    tried = skipped = 0
    old = os.environ.get("SAFECLIP_MAX_ROWS")
    os.environ["SAFECLIP_MAX_ROWS"] = str(_ROW_LIMIT)
    try:
        for i, (name, mutate) in enumerate(named.items()):
            case = work / f"case-{i}"
            case.mkdir(parents=True)
            src = case / "in.parquet"
            if not target.write(name, mutate, src):
                skipped += 1
                continue
            tried += 1
            for reader, run in target.readers(src, case, audit_resume).items():
                try:
                    run()
                    outcomes["finished"] += 1
                except SafeclipError as e:
                    outcomes[type(e).__name__] += 1
                    if "\n" in str(e).strip():
                        unexpected.append(f"{name} | {reader}: a {type(e).__name__} of several lines: {e!s:.300}")
                except Exception as e:  # noqa: BLE001 - what the fuzzer is looking for
                    outcomes["UNEXPECTED"] += 1
                    where = traceback.extract_tb(e.__traceback__)[-1]
                    unexpected.append(f"{name} | {reader}: {type(e).__name__}: {e!s:.200} "
                                      f"({Path(where.filename).name}:{where.lineno})")
            shutil.rmtree(case, ignore_errors=True)
    finally:
        if old is None:
            os.environ.pop("SAFECLIP_MAX_ROWS", None)
        else:
            os.environ["SAFECLIP_MAX_ROWS"] = old
    return {"tried": tried, "skipped": skipped, "outcomes": dict(outcomes), "unexpected": unexpected}


# ------------------------------------------------------------------------------------------------ the tests
@pytest.fixture(scope="module")
def target(sample, bad_files, tiny_encoder, tmp_path_factory) -> Target:
    return Target.make(tmp_path_factory.mktemp("fuzz-parquet"), sample[:2] + bad_files[:1], tiny_encoder)


# Every kind of mutation once, through every reader (the full set and random combinations run in the slow test).
FAST = ("meta: a list", "meta: not json", "meta: deeply nested", "meta: not utf-8", 'meta: dim="64"',
        "meta: dim=1000000000000000000000000000000", 'meta: dim=[64]', "meta: encoder_id=5", 'meta: cwd=["/"]',
        'meta: thresholds=[0.5]', 'meta: thresholds={"sexual": [1]}', 'meta: kind=["audit"]', "column path: int64", "column path: struct",
        "column path_bytes: text", "column sha256: list<string>", "column bytes: text", "column action: int64",
        "column error: struct", "column encoder_id: map", "column p_sexual: text", "column embedding: struct",
        "column embedding: text", "column embedding: list<string>", "column embedding: null",
        "column embedding_backgrounds: int64", "column width: struct", "column: a second path",
        "rows: one repeated", "rows: over the limit", "rows: mixed encoders", "embedding: dim 3",
        "embedding: triple nested", "embedding: null floats", "embedding: ragged frames", "file: truncated",
        "file: damaged middle", "column: mtime_ns text")
RESUME_FAST = ("meta: a list", "column path: int64", "column path: struct", "column embedding: struct",
               "column: mtime_ns text", "file: damaged middle", "rows: one repeated")


def test_malformed_audit_outputs_are_safeclip_errors(target, tmp_path):
    everything = cases()
    assert set(FAST) <= set(everything) and set(RESUME_FAST) <= set(everything)
    got = fuzz(target, {n: everything[n] for n in FAST if n not in RESUME_FAST}, tmp_path / "a", audit_resume=False)
    resumed = fuzz(target, {n: everything[n] for n in RESUME_FAST}, tmp_path / "b")
    assert got["unexpected"] + resumed["unexpected"] == []
    assert got["tried"] + resumed["tried"] == len(FAST)
    assert got["outcomes"].get("DataError", 0) > 0 and resumed["outcomes"].get("finished", 0) > 0


@pytest.mark.slow
def test_every_malformed_audit_output_and_random_combinations(target, tmp_path):
    everything = cases()
    rng = random.Random(0)
    combos = dict(random_case(rng, everything) for _ in range(150))
    got = fuzz(target, {**everything, **combos}, tmp_path)
    print(f"\n{got['tried']} malformed outputs tried ({got['skipped']} not writable), outcomes {got['outcomes']}")
    assert got["unexpected"] == []
    assert got["tried"] > 300


def main(argv: list[str] | None = None) -> int:
    import argparse
    import tempfile

    from conftest import make_tiny_checkpoint

    from safeclip.embed import Encoder

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--random", type=int, default=200, help="random combinations on top of the fixed cases")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-audit", action="store_true", help="skip the (slower) audit resume readers")
    args = parser.parse_args(argv)
    corpus = Path(os.environ.get("SAFECLIP_CORPUS", Path(__file__).resolve().parents[2] / "shared" / "corpus"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp_p = Path(tmp)
        model = make_tiny_checkpoint(tmp_p / "model")
        enc = Encoder(f"local-dir:{model}", cache_dir=tmp_p / "cache", device="cpu")
        photos = sorted((corpus / "photos").iterdir(), key=lambda p: p.stat().st_size)
        inputs = [str(photos[0]), str(photos[1]), str(sorted((corpus / "bad").iterdir())[0])]
        target = Target.make(tmp_p / "target", inputs, enc)
        everything = cases()
        rng = random.Random(args.seed)
        combos = dict(random_case(rng, everything) for _ in range(args.random))
        work = tmp_p / "work"
        work.mkdir()
        got = fuzz(target, {**everything, **combos}, work, audit_resume=not args.no_audit)
    print(f"{got['tried']} malformed outputs tried ({got['skipped']} not writable); reader outcomes: "
          f"{dict(sorted(got['outcomes'].items()))}")
    for line in got["unexpected"]:
        print("UNEXPECTED", line)
    print(f"unexpected exceptions: {len(got['unexpected'])}")
    return 1 if got["unexpected"] else 0


if __name__ == "__main__":
    sys.exit(main())
