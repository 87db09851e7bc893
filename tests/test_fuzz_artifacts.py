"""Fuzz the artifact loaders and ``lint_policy`` with mutated policies, heads, probes and calibrators: every input
loads or raises a :class:`~safeclip.errors.SafeclipError`, nothing else; and whatever loads scores finite numbers.

Inputs are valid artifacts and policies, mutated: numbers (NaN, inf, 1e308, 3e38, subnormals, huge integers, wrong
types), shapes and lengths, types and nesting of every node, missing and unknown keys, other kinds and formats,
bytes (truncated, flipped, not UTF-8, deeply nested, over the size cap) and policy fields (pins, paths, URLs,
extends). Each input runs through ``lint_policy`` and through the loader of each artifact it names. A loaded head or
probe must give finite logits for unit embeddings, a loaded calibrator finite probabilities in [0, 1] for any signal
the score stage can produce; ``lint_policy`` passing means each direct load passes.

In the test run: a fixed-seed batch of :data:`FAST_INPUTS`; the ``slow`` test runs for 60 s. Standalone::

    python tests/test_fuzz_artifacts.py --seconds 120 [--seed 1]

prints the inputs tried, outcomes by kind and each unexpected exception with the ``seed:index`` that regenerates it
(``--replay SEED:INDEX``).
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # standalone: make the checkout importable without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pytest

from safeclip import artifacts
from safeclip.artifacts import MAX_LOGIT_BOUND, sha256_bytes
from safeclip.calibrate import Calibrator
from safeclip.compiled import lint_policy
from safeclip.errors import SafeclipError
from safeclip.heads import LinearProbe, MLPHead, load_head

FAST_INPUTS = 300
DIM = 8
SPACE = "fuzz-space"
# A small size cap in the fuzz run, so that size refusals are reached without writing 62 MiB files.
FUZZ_JSON_CAP = 64 << 10

SPECIAL_NUMBERS: tuple[Any, ...] = (
    float("nan"), float("inf"), -float("inf"), 1e308, -1e308, 3.4e38, 3.5e38, 1e39, 1e30, 1e-320, 5e-324, 1e-300,
    -0.0, 0.0, 1, -1, 10**40, -(10**400), 2**63, True, False, None, "1.0", "nan", [], {}, [1.0], {"v": 1.0},
)
SPECIAL_INTS: tuple[Any, ...] = (0, -1, 1, 2, DIM - 1, DIM + 1, 10**9, 2**62, 10**400, 1.0, 8.5, True, None, "8", [8])
KINDS = ("safeclip.probe", "safeclip.mlp_head", "safeclip.calibrator", "safeclip.other", "", None, 1)


# ----------------------------------------------------------------------------------------------- valid seeds


def _seed_head(rng: np.random.Generator, std: bool) -> dict[str, Any]:
    hidden = int(rng.integers(1, 6))
    layers = [(rng.normal(size=(hidden, DIM)), rng.normal(size=hidden)),
              (rng.normal(size=(1, hidden)), rng.normal(size=1))]
    standardize = None
    if std:
        standardize = {"mean": rng.normal(size=DIM) * 0.01, "variance": rng.random(DIM) * 1e-3, "epsilon": 1e-10}
    return MLPHead(layers, encoder_id=SPACE, standardize=standardize, output="p_fuzz",
                   metadata={"source": "fuzz"}).to_dict()


def _seed_probe(rng: np.random.Generator) -> dict[str, Any]:
    return LinearProbe(rng.normal(size=DIM), float(rng.normal()), encoder_id=SPACE, metadata={"C": 1.0}).to_dict()


def _seed_calibrators() -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    y = (rng.random(1200) < 0.3).astype(int)
    sig = np.column_stack([rng.normal(2 * y - 1, 1), rng.normal(3 * y - 1, 1)])
    out = []
    for method, inputs in (("sigmoid", ("prompt",)), ("isotonic", ("prompt",)), ("sigmoid", ("prompt", "probe")),
                           ("isotonic", ("prompt", "head")), ("sigmoid", ("head",))):
        k = len(inputs)
        out.append(Calibrator(method, inputs, encoder_id=SPACE).fit(sig[:, :k] if k > 1 else sig[:, 0], y).to_dict())
    return out


CALIBRATOR_SEEDS = _seed_calibrators()


# ------------------------------------------------------------------------------------------------ mutations


def _paths(node: Any, prefix: tuple = ()) -> Iterator[tuple]:
    """Every path to a node of a JSON tree (the root included)."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node[:50]):  # long number lists: the first 50 are enough to reach
            yield from _paths(v, prefix + (i,))


def _get(node: Any, path: tuple) -> Any:
    for p in path:
        node = node[p]
    return node


def _set(root: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    _get(root, path[:-1])[path[-1]] = value
    return root


def _mutate_node(rnd: random.Random, value: Any) -> Any:
    """One mutation of one node: the special value of its kind, another type, another length, other nesting."""
    r = rnd.random()
    if isinstance(value, bool) or value is None:
        return rnd.choice(SPECIAL_NUMBERS + SPECIAL_INTS)
    if isinstance(value, (int, float)):
        if r < 0.7:
            return rnd.choice(SPECIAL_INTS if isinstance(value, int) else SPECIAL_NUMBERS)
        try:
            return value * rnd.choice((float(f"1e{rnd.randint(-330, 330)}"), -1, 1e38, 0))  # 1e330: inf
        except OverflowError:  # a huge int times a float
            return float("inf")
    if isinstance(value, str):
        return rnd.choice(("", "relu", "tanh", "safeclip.probe", "prompt", "head", "probe", "punsafe", "p unsafe",
                           "x" * rnd.randint(1, 5000), "\x00", SPACE, "other-space", 1, None, ["prompt"]))
    if isinstance(value, list):
        if r < 0.2 and value:
            return value[: rnd.randint(0, len(value) - 1)]  # shorter
        if r < 0.35:
            return value + [rnd.choice(value) if value else 0.0 for _ in range(rnd.randint(1, 3))]  # longer
        if r < 0.45 and value:
            i = rnd.randrange(len(value))
            return value[:i] + [rnd.choice(SPECIAL_NUMBERS)] + value[i + 1:]
        if r < 0.55:
            return [value]  # nested one deeper
        if r < 0.6:
            big = rnd.choice((1000, 20_000, 200_000))
            return [rnd.gauss(0, 1) for _ in range(big)]  # far too many numbers (sizes)
        if r < 0.7 and value:
            return value[::-1]  # reversed: knots out of order, layers in the wrong order
        return rnd.choice(({}, "list", None, 3.0, [[1.0, 2.0], [3.0]]))
    if isinstance(value, dict):
        v = dict(value)
        if r < 0.35 and v:
            del v[rnd.choice(list(v))]  # a missing key
        elif r < 0.5:
            v[rnd.choice(("extra", "kind", "format", "shape", "weight", "layers", "coef"))] = rnd.choice(
                SPECIAL_NUMBERS)
        elif r < 0.6:
            return [v]
        elif r < 0.7:
            return rnd.choice((None, [], "object", 1))
        else:
            for k in list(v)[: rnd.randint(1, 3)]:
                v[k] = _mutate_node(rnd, v[k])
        return v
    return value


def _mutate_tree(rnd: random.Random, tree: Any) -> Any:
    tree = copy.deepcopy(tree)
    for _ in range(rnd.choice((1, 1, 1, 2, 3, 6))):
        if rnd.random() < 0.15 and isinstance(tree, dict):
            focused = {  # the fields that matter most, mutated on purpose
                "kind": lambda: rnd.choice(KINDS), "format": lambda: rnd.choice((0, 1, 2, "1", 1.0, None)),
                "dim": lambda: rnd.choice(SPECIAL_INTS), "encoder_id": lambda: rnd.choice((SPACE, "", None, 7, "b")),
            }
            key = rnd.choice(list(focused))
            tree[key] = focused[key]()
            continue
        paths = list(_paths(tree))
        path = rnd.choice(paths)
        tree = _set(tree, path, _mutate_node(rnd, _get(tree, path)))
    return tree


def _std_mutation(rnd: random.Random, head: dict[str, Any]) -> dict[str, Any]:
    """The standardisations that fold badly: zero variances over tiny epsilons, huge means (issue 21.1)."""
    n = head["dim"] if isinstance(head.get("dim"), int) and 0 < head["dim"] < 100 else DIM
    head = copy.deepcopy(head)
    head["standardize"] = {
        "mean": [rnd.choice((0.0, 1e38, -3e38, 1e-30)) for _ in range(n)],
        "variance": [rnd.choice((0.0, 0.0, 1e-45, 1e-38, 1.0, 3e38)) for _ in range(n)],
        "epsilon": rnd.choice((0.0, 1e-320, 5e-324, 1e-300, 1e-45, 1e-10, 1e30)),
    }
    return head


def _to_bytes(rnd: random.Random, obj: Any) -> bytes:
    """JSON text of ``obj`` (NaN and inf as JavaScript literals), sometimes damaged at the byte level."""
    try:
        text = json.dumps(obj, indent=rnd.choice((None, 1)))
    except (ValueError, OverflowError):
        text = "{}"
    data = text.encode()
    r = rnd.random()
    if r < 0.03:
        data = data[: rnd.randint(0, len(data))]  # truncated
    elif r < 0.06 and data:
        i = rnd.randrange(len(data))
        data = data[:i] + bytes([rnd.randrange(256)]) + data[i + 1:]  # one byte flipped (maybe not UTF-8)
    elif r < 0.08:
        data = b"[" * 100_000 + b"]" * 100_000  # nested too deeply
    elif r < 0.10:
        data = data + b" " * FUZZ_JSON_CAP  # over the (fuzz) size cap
    elif r < 0.11:
        data = b"\xef\xbb\xbf" + data  # a byte-order mark
    elif r < 0.12:
        data = data.replace(b"1", b"1" * 5000, 1)  # an integer beyond Python's str -> int digit limit
    elif r < 0.13:
        data = b'{"a": ' + b"1e999" + b"}"
    return data


# ----------------------------------------------------------------------------------------------- one input


@dataclass
class Case:
    """One fuzz input: artifact files (name -> bytes) and a policy naming some of them."""

    files: dict[str, bytes]
    policy: str
    kinds: dict[str, str]  # file name -> "probe" | "head" | "calibrator" (the loader to run on it)
    pins: dict[str, str] = field(default_factory=dict)
    plain: set[str] = field(default_factory=set)  # files the (undamaged) policy names by a plain path and pin


def make_case(seed: int, index: int) -> Case:
    rnd = random.Random(f"{seed}:{index}")
    nrng = np.random.default_rng(rnd.randrange(2**32))
    files: dict[str, bytes] = {}
    kinds: dict[str, str] = {}
    pins: dict[str, str] = {}
    plain: set[str] = set()
    entries: dict[str, dict[str, str]] = {}
    cats = ["sexual", "violence", "drugs", "weapons"]
    rnd.shuffle(cats)
    for cat in cats[: rnd.randint(1, 3)]:
        entry: dict[str, str] = {}
        for key in rnd.sample(("probe", "head", "calibrator"), rnd.randint(1, 3)):
            if key == "head":
                obj: Any = _seed_head(nrng, std=rnd.random() < 0.5)
                if rnd.random() < 0.3:
                    obj = _std_mutation(rnd, obj)
            elif key == "probe":
                obj = _seed_probe(nrng)
            else:
                obj = copy.deepcopy(rnd.choice(CALIBRATOR_SEEDS))
            if rnd.random() < 0.75:
                obj = _mutate_tree(rnd, obj)
            data = _to_bytes(rnd, obj)
            name = f"{cat}_{key}.json"
            files[name], kinds[name] = data, key
            pin = sha256_bytes(data)
            r = rnd.random()
            if r < 0.04:
                pin = "0" * 64  # a wrong pin
            elif r < 0.06:
                pin = rnd.choice(("", "abc", 64 * "g", 7))  # not a pin
            pins[name] = pin if isinstance(pin, str) else ""
            where = rnd.random()
            if where < 0.08:
                ref = f"{{url: 'https://example.invalid/a/{name}', sha256: {pin}}}"  # offline, maybe in the mirror
            elif where < 0.1:
                ref = f"{{path: '../{name}', sha256: {pin}}}"  # outside the policy's folder
            elif where < 0.12:
                ref = rnd.choice(("null", "[]", "3", "{path: 7, sha256: 1}", f"{{sha256: {pin}}}"))
            else:
                ref = f"{{path: {name}, sha256: {pin}}}"
                plain.add(name)
            entry[key] = ref
        entries[cat] = entry
    if rnd.random() < 0.2:  # on top of the shipped policy (parsing it is most of a case's time)
        lines = ["name: fuzz", "version: '1'", "extends: default", "categories:"]
        for cat, entry in entries.items():
            lines.append(f"  {cat}:")
            lines += [f"    {key}: {ref}" for key, ref in entry.items()]
    else:
        lines = ["name: fuzz", "version: '1'", "scoring:", "  logit_scale: 100.0", "  templates: ['a photo of {}.']",
                 "  neutral: [a landscape]", "categories:"]
        for cat, entry in entries.items():
            lines += [f"  {cat}:", f"    prompts: [{cat} content]", "    thresholds: {flag: 0.5, block: 0.9}"]
            lines += [f"    {key}: {ref}" for key, ref in entry.items()]
    policy = "\n".join(lines) + "\n"
    if rnd.random() < 0.05:  # the policy text itself damaged
        i = rnd.randrange(len(policy))
        policy = policy[:i] + rnd.choice(("\x00", ":", "{", "*a", "&a ", "\n  - ", "")) + policy[i + 1:]
        plain = set()
    return Case(files, policy, kinds, pins, plain)


# ------------------------------------------------------------------------------------------------ running it


UNIT = np.concatenate([np.eye(DIM), -np.eye(DIM), np.random.default_rng(1).normal(size=(32, DIM))])
UNIT = (UNIT / np.linalg.norm(UNIT, axis=1, keepdims=True)).astype(np.float32)
UNIT_WIDE = UNIT * np.float32(1.0099)  # the largest norm the score stage accepts


def _check_loaded(kind: str, art: Any) -> None:
    """What loading promises: finite signals and probabilities. An AssertionError here is a finding too."""
    if kind in ("probe", "head"):
        if art.dim != DIM:
            return
        for x in (UNIT, UNIT_WIDE):
            z = np.asarray(art.decision_function(x), np.float64)
            assert np.isfinite(z).all(), f"a loaded {kind} scored {z[~np.isfinite(z)][:3]}"
            assert np.isfinite(z.astype(np.float32)).all(), f"a loaded {kind}'s logit overflows float32"
        return
    k = len(art.inputs)
    rng = np.random.default_rng(2)
    # The largest signals the score stage gives: a prompt log-odds of at most 2 * logit_scale (1e4) plus a log of the
    # prompt count; a probe's or head's logit within MAX_LOGIT_BOUND.
    largest = np.array([2.1e4 if s == "prompt" else MAX_LOGIT_BOUND for s in art.inputs])
    for scale in (1.0, 1e3, None):
        sig = rng.normal(size=(64, k)) * (largest if scale is None else scale)
        sig = sig.clip(-largest, largest)
        for s in (sig, sig.astype(np.float32)):
            p = np.asarray(art.predict_proba(s if k > 1 else s[:, 0]), np.float64)
            assert np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all(), f"calibrator gave {p[:4]}"


_LOADERS: dict[str, Callable[[Path, str], Any]] = {
    "probe": lambda p, sha: LinearProbe.load(p, sha, encoder_id=SPACE),
    "head": lambda p, sha: load_head(p, sha, SPACE),
    "calibrator": lambda p, sha: Calibrator.load(p, sha, encoder_id=SPACE),
}


@dataclass
class Report:
    tried: int = 0
    outcomes: Counter = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"inputs tried: {self.tried} (artifact loads: {sum(v for k, v in self.outcomes.items() if ':' in k)})",
                 f"unexpected exceptions: {len(self.unexpected)}"]
        lines += [f"  {k}: {v}" for k, v in sorted(self.outcomes.items())]
        lines += self.unexpected[:20]
        return "\n".join(lines)


@contextmanager
def fuzz_environment(root: Path) -> Iterator[Path]:
    """Offline, a mirror holding every artifact under its plain name, and the fuzz size cap."""
    saved = {k: os.environ.get(k) for k in ("SAFECLIP_OFFLINE", "SAFECLIP_ARTIFACTS_DIR", "SAFECLIP_CACHE_DIR")}
    cap = artifacts.MAX_ARTIFACT_JSON_BYTES
    mirror = root / "mirror"
    mirror.mkdir(parents=True, exist_ok=True)
    os.environ.update(SAFECLIP_OFFLINE="1", SAFECLIP_ARTIFACTS_DIR=str(mirror), SAFECLIP_CACHE_DIR=str(root / "cache"))
    artifacts.MAX_ARTIFACT_JSON_BYTES = FUZZ_JSON_CAP
    try:
        yield mirror
    finally:
        artifacts.MAX_ARTIFACT_JSON_BYTES = cap
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_case(case: Case, folder: Path, mirror: Path, report: Report, label: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in list(mirror.iterdir()):
        name.unlink()
    for name, data in case.files.items():
        (folder / name).write_bytes(data)
        if name.startswith(("s", "d")):  # some of them in the mirror too, for the url references
            (mirror / name).write_bytes(data)
    policy = folder / "sub" / "p.yaml"  # in a subfolder, so that '../name' lies outside it
    policy.parent.mkdir(exist_ok=True)
    for name, data in case.files.items():
        (policy.parent / name).write_bytes(data)
    policy.write_text(case.policy, encoding="utf-8", errors="surrogateescape")
    report.tried += 1
    linted = False
    try:
        lint_policy(policy, encoder_id=SPACE)
        linted = True
        report.outcomes["lint: passed"] += 1
    except SafeclipError as e:
        report.outcomes[f"lint: {type(e).__name__}"] += 1
    except Exception:  # noqa: BLE001 - the finding this fuzzer looks for
        report.unexpected.append(f"{label} lint_policy: {traceback.format_exc(limit=-3)}")
    for name, kind in case.kinds.items():
        try:
            art = _LOADERS[kind](folder / name, case.pins[name])
        except SafeclipError as e:
            report.outcomes[f"{kind}: {type(e).__name__}"] += 1
            if linted and name in case.plain:
                report.unexpected.append(f"{label} lint_policy passed, but {name} does not load: {e}")
            continue
        except Exception:  # noqa: BLE001
            report.unexpected.append(f"{label} load {kind} {name}: {traceback.format_exc(limit=-3)}")
            continue
        report.outcomes[f"{kind}: loaded"] += 1
        try:
            _check_loaded(kind, art)
        except AssertionError as e:
            report.unexpected.append(f"{label} {kind} {name} loaded but: {e}")
        except Exception:  # noqa: BLE001
            report.unexpected.append(f"{label} use {kind} {name}: {traceback.format_exc(limit=-3)}")


def fuzz(seed: int, *, count: int | None = None, seconds: float | None = None,
         root: Path | None = None) -> Report:
    report = Report()
    with tempfile.TemporaryDirectory(dir=root) as tmp, fuzz_environment(Path(tmp)) as mirror:
        t_end = time.monotonic() + (seconds if seconds is not None else math.inf)
        index = 0
        while (count is None or index < count) and time.monotonic() < t_end:
            run_case(make_case(seed, index), Path(tmp) / "case", mirror, report, f"[{seed}:{index}]")
            index += 1
    return report


# ------------------------------------------------------------------------------------------------------ tests


def test_fuzz_artifacts_fast(tmp_path: Path) -> None:
    report = fuzz(0, count=FAST_INPUTS, root=tmp_path)
    print(report)
    assert report.tried == FAST_INPUTS
    assert report.unexpected == [], str(report)
    # The run reaches both sides: artifacts that load, and each kind of refusal.
    assert report.outcomes["lint: passed"] > 0 and report.outcomes["lint: PolicyError"] > 0
    for kind in ("probe", "head", "calibrator"):
        assert report.outcomes[f"{kind}: loaded"] > 0 and report.outcomes[f"{kind}: ArtifactIntegrityError"] > 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fuzz_artifacts_long(tmp_path: Path) -> None:
    report = fuzz(1, seconds=60, root=tmp_path)
    print(report)
    assert report.tried > FAST_INPUTS and report.unexpected == [], str(report)


def test_the_folding_mutations_are_all_refused_or_finite(tmp_path: Path) -> None:
    """The inputs of issue 21.1, exhaustively: every combination of a bad standardisation loads finite or is refused."""
    rng = np.random.default_rng(3)
    base = _seed_head(rng, std=True)
    report = Report()
    with fuzz_environment(tmp_path) as mirror:
        for i, (var, eps, mean) in enumerate((v, e, m) for v in (0.0, 1e-45, 1e-38, 1.0, 3e38)
                                             for e in (0.0, 1e-320, 5e-324, 1e-300, 1e-45, 1e-10, 1e30)
                                             for m in (0.0, 3e38)):
            head = dict(base, standardize={"mean": [mean] * DIM, "variance": [var] * DIM, "epsilon": eps})
            data = json.dumps(head).encode()
            case = Case({"sexual_head.json": data}, "name: fuzz\nversion: '1'\nscoring: {templates: ['{}'], "
                        "neutral: [a landscape], logit_scale: 100}\ncategories:\n  sexual:\n    prompts: [nudity]\n"
                        "    thresholds: {flag: 0.5}\n"
                        f"    head: {{path: sexual_head.json, sha256: {sha256_bytes(data)}}}\n",
                        {"sexual_head.json": "head"}, {"sexual_head.json": sha256_bytes(data)})
            run_case(case, tmp_path / "case", mirror, report, f"[fold:{i}]")
    assert report.tried == 70 and report.unexpected == [], str(report)
    assert report.outcomes["head: loaded"] > 0 and report.outcomes["head: ArtifactIntegrityError"] > 0


# ------------------------------------------------------------------------------------------------ standalone


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--replay", metavar="SEED:INDEX", help="run one input and print it")
    args = ap.parse_args(argv)
    if args.replay:
        seed, index = (int(x) for x in args.replay.split(":"))
        case = make_case(seed, index)
        print(case.policy)
        for name, data in case.files.items():
            print(f"--- {name} ({len(data)} bytes): {data[:400]!r}")
        report = Report()
        with tempfile.TemporaryDirectory() as tmp, fuzz_environment(Path(tmp)) as mirror:
            run_case(case, Path(tmp) / "case", mirror, report, args.replay)
        print(report)
        return 1 if report.unexpected else 0
    t0 = time.monotonic()
    report = fuzz(args.seed, seconds=args.seconds)
    print(report)
    print(f"{report.tried / (time.monotonic() - t0):.1f} inputs/s")
    return 1 if report.unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
