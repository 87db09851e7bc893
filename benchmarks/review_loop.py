"""The review loop end to end on embeddings whose truth is known: decide a stream, sample it for review, answer with
the truth, recalibrate from the verdicts, and measure the new policy on a fresh stream.

64-d unit embeddings: one category's positives (base rate ~5%) lean along the direction its prompt points to, with
noise; the other category has no positives. The policy's ``weapons`` thresholds are set off (flag at the median
positive's probability: recall ~0.5, far under the target). A stream of decisions is decided by the real decision
object (:class:`~safeclip.compiled.CompiledPolicy`), sampled by the real rule (:func:`safeclip.review.in_sample`
at the policy's ``review: {sample: ...}`` rates), put into a real SQLite review store, given verdicts from the truth
(``store.verdict``), and recalibrated with :func:`~safeclip.calibration.calibrate_from_review`; the written version
is reloaded and measured on held-out decisions of the same distribution. Twice: 100% of flags + 2% of allows
sampled, then flags only (allow rate 0), which cannot see the positives the policy misses.

    python benchmarks/review_loop.py [--n 10000] [--held-out 200000] [--coverage 20]

Prints a table; the embeddings are synthetic, so nothing here is a moderation result. ``--coverage K`` repeats the
sampled loop with K seeds and counts how often each bound held (true value >= lower bound) and each target was met.
The test ``tests/test_calibration_review.py::test_review_loop_*`` runs the same loop and asserts its direction.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from safeclip.calibration import ThresholdWarning, calibrate_from_review
from safeclip.compiled import CompiledPolicy
from safeclip.policy import Policy, load_policy
from safeclip.review import NewItem, ReviewStore, in_sample, open_store

D = 64
BASE_RATE = 0.05
ENCODER = "known-truth-64"
CATEGORY = "weapons"
TARGETS = {"block_precision": 0.9, "flag_recall": 0.7, "confidence": 0.9}
_DIRS = {"weapon": 0, "tool": 1, "neutral": 2, "drug": 3, "candy": 4}


def embed_texts(texts: list[str]) -> np.ndarray:
    """The stand-in text tower: each prompt a fixed axis (unknown texts a fixed random direction)."""
    out = np.zeros((len(texts), D), np.float32)
    for i, t in enumerate(texts):
        if t in _DIRS:
            out[i, _DIRS[t]] = 1.0
        else:
            v = np.random.default_rng(zlib.crc32(t.encode())).normal(size=D)
            out[i] = v / np.linalg.norm(v)
    return out


def stream(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` unit embeddings and their truth for ``weapons``: positives lean along its prompt's axis."""
    y = (rng.random(n) < BASE_RATE).astype(np.int8)
    z = rng.normal(size=(n, D)) / np.sqrt(D)
    z[:, 0] += np.where(y == 1, rng.normal(0.5, 0.25, n), 0.0)
    return (z / np.linalg.norm(z, axis=1, keepdims=True)).astype(np.float32), y


def write_policy(folder: Path, *, allow_rate: float, flag: float, block: float) -> Path:
    path = folder / "policy.yaml"
    path.write_text(f"""name: loop
version: "1.0"
scoring: {{logit_scale: 10.0, templates: ["{{}}"], neutral: [neutral], top_prompts: 0}}
categories:
  {CATEGORY}: {{prompts: [weapon], contrast: [tool], thresholds: {{flag: {flag!r}, block: {block!r}}}}}
  drugs: {{prompts: [drug], contrast: [candy], thresholds: {{flag: 0.9, block: 0.99}}}}
review: {{sample: {{block: 1.0, flag: 1.0, allow: {allow_rate!r}}}}}
""")
    return path


def off_thresholds(seed: int = 99) -> tuple[float, float]:
    """A flag at the median positive's probability (recall ~0.5) and a block at its 90th percentile."""
    with tempfile.TemporaryDirectory() as tmp:
        pol = load_policy(write_policy(Path(tmp), allow_rate=0.0, flag=0.5, block=0.5))
    x, y = stream(np.random.default_rng(seed), 20_000)
    p = CompiledPolicy.build(pol, embed_texts, ENCODER).decide(x, record=False).probabilities[:, 0]
    return round(float(np.quantile(p[y == 1], 0.5)), 4), round(float(np.quantile(p[y == 1], 0.9)), 4)


def fill_store(store: ReviewStore, pol: Policy, x: np.ndarray, y: np.ndarray, tag: str) -> dict[str, int]:
    """Decide the stream, send the sampled decisions to the store, and answer each with the truth."""
    comp = CompiledPolicy.build(pol, embed_texts, ENCODER)
    v = comp.decide(x, record=False)
    items, truth = [], []
    for i in range(len(x)):
        sha = hashlib.sha256(f"{tag}/{i}".encode()).hexdigest()
        rate = pol.review.rate(v.action(i))
        if in_sample(sha, pol.id, rate):
            items.append(NewItem(sha, pol.id, ENCODER, v.action(i), v.decision(i, sha256=sha).to_dict(), rate,
                                 "check", embedding=x[i]))
            truth.append(int(y[i]))
    ids = store.add(items)
    for item_id, t in zip(ids, truth):
        assert item_id is not None
        store.verdict(item_id, "block" if t else "allow", reviewer="truth", category=CATEGORY if t else None)
    return {"decisions": len(x), "sampled": len(items), "flagged": int((v.actions >= 1).sum())}


def true_rates(pol: Policy, x: np.ndarray, y: np.ndarray) -> dict[str, tuple[float, float, float]]:
    """Per kind (flag, block): the true precision, recall and share acted on of the policy's ``weapons``
    decisions."""
    comp = CompiledPolicy.build(pol, embed_texts, ENCODER)
    codes = comp.decide(x, record=False).codes
    assert codes is not None
    out = {}
    for kind, level in (("flag", 1), ("block", 2)):
        acted = codes[:, 0] >= level
        tp = int((acted & (y == 1)).sum())
        out[kind] = (tp / acted.sum() if acted.any() else float("nan"), tp / max(int(y.sum()), 1),
                     float(acted.mean()))
    return out


@dataclass
class LoopResult:
    label: str
    counts: dict[str, int]
    result: Any  # ReviewCalibration
    before: dict[str, tuple[float, float, float]]
    after: dict[str, tuple[float, float, float]] | None
    written: bool


def run_loop(folder: Path, *, n: int, n_held_out: int, allow_rate: float, seed: int = 0,
             store_factory: Callable[[Path], ReviewStore] | None = None, targets: dict[str, float] = TARGETS,
             ) -> LoopResult:
    """One pass of the loop in ``folder``: decide ``n``, review the sample, refit, write, measure on held-out."""
    folder.mkdir(parents=True, exist_ok=True)
    flag, block = off_thresholds()
    pol = load_policy(write_policy(folder, allow_rate=allow_rate, flag=flag, block=block))
    rng = np.random.default_rng(seed)
    x, y = stream(rng, n)
    x_new, y_new = stream(rng, n_held_out)
    store = (store_factory or (lambda p: open_store(p, policy=pol.name)))(folder / "review.db")
    with store:
        counts = fill_store(store, pol, x, y, f"{seed}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ThresholdWarning)
            result = calibrate_from_review(pol, store, embed_texts=embed_texts, **targets)
    before = true_rates(pol, x_new, y_new)
    written = not result.disabled
    after = None
    if written:
        after = true_rates(load_policy(result.write(folder / "policy.yaml")), x_new, y_new)
    label = f"flags + {allow_rate:.0%} allows" if allow_rate else "flags only"
    return LoopResult(label, counts, result, before, after, written)


def table(runs: list[LoopResult], targets: dict[str, float] = TARGETS) -> str:
    lines = [f"targets: flag recall >= {targets['flag_recall']}, block precision >= {targets['block_precision']} "
             f"at {targets['confidence']:.0%} confidence; true values on held-out decisions",
             f"{'sampling':<20}{'':<6}{'old':>8}{'new':>8}  {'metric':<10}{'true before':>12}{'true after':>11}  "
             f"{'estimate (>= bound) at new':<27}{'true >= bound':>13}  {'acts on before/after':>20}"]
    for r in runs:
        c = r.result.categories.get(CATEGORY)
        if c is None:
            lines.append(f"{r.label:<24}{CATEGORY} not refitted")
            continue
        for kind, metric, k in (("flag", "recall", 1), ("block", "precision", 0)):
            old_t = c.old_flag if kind == "flag" else c.old_block
            new_t = c.new_flag if kind == "flag" else c.new_block
            est = c.new_rates[kind]
            tb = r.before[kind][k]
            ta = r.after[kind][k] if r.after else float("nan")
            if est is None:
                e, ok = "none (never fires)", "-"
            else:
                val, bnd = (est.recall, est.recall_bound) if metric == "recall" else (est.precision,
                                                                                     est.precision_bound)
                e, ok = f"{val:.3f} (>= {bnd:.3f})", ("yes" if ta >= bnd else "NO")
            nt = "none" if new_t is None else f"{new_t:.4f}"
            share = f"{r.before[kind][2]:.1%} / " + (f"{r.after[kind][2]:.1%}" if r.after else "-")
            lines.append(f"{r.label:<20}{kind:<6}{old_t:>8.4f}{nt:>8}  {metric:<10}{tb:>12.3f}{ta:>11.3f}  "
                         f"{e:<27}{ok:>13}  {share:>20}")
        old = c.old_rates["flag"]
        lines.append(f"{'':<20}recall at the OLD flag: estimated {old.recall:.3f} (>= {old.recall_bound:.3f}), "
                     f"true {r.before['flag'][1]:.3f}; {r.counts['sampled']} of {r.counts['decisions']} decisions "
                     f"reviewed (Kish effective n {c.n_eff:.1f}); {c.flips} stored decisions flip "
                     f"(~{c.flips_weighted:,.0f} of the stream)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--held-out", type=int, default=200_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--coverage", type=int, default=0, metavar="K",
                    help="also repeat the sampled loop with K seeds and count how often the bounds held")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        runs = [run_loop(Path(tmp) / name, n=args.n, n_held_out=args.held_out, allow_rate=rate, seed=args.seed)
                for name, rate in (("sampled", 0.02), ("flags-only", 0.0))]
    for r in runs:
        print(f"--- {r.label}: report")
        print(r.result.format())
    print()
    print(table(runs))
    if args.coverage:
        print()
        print(coverage(args.coverage, args.n, min(args.held_out, 50_000)))
    return 0


def coverage(k: int, n: int, n_held_out: int) -> str:
    """How often, over ``k`` seeds of the sampled loop, each lower bound lay at or below the true value."""
    held = {"recall at old flag": 0, "recall at new flag": 0, "precision at new block": 0}
    seen = dict.fromkeys(held, 0)
    met = {"flag recall": 0, "block precision": 0}
    refused = no_flag = 0
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(k):
            r = run_loop(Path(tmp) / str(seed), n=n, n_held_out=n_held_out, allow_rate=0.02, seed=seed)
            c = r.result.categories[CATEGORY]
            checks = [("recall at old flag", c.old_rates["flag"], "recall_bound", r.before["flag"][1])]
            no_flag += c.new_flag is None
            if r.after is None:
                refused += 1
            else:
                checks += [("recall at new flag", c.new_rates["flag"], "recall_bound", r.after["flag"][1]),
                           ("precision at new block", c.new_rates["block"], "precision_bound", r.after["block"][0])]
                met["flag recall"] += r.after["flag"][1] >= TARGETS["flag_recall"]
                met["block precision"] += r.after["block"][0] >= TARGETS["block_precision"]
            for name, rates, attr, true in checks:
                if rates is not None:
                    seen[name] += 1
                    held[name] += true >= getattr(rates, attr)
    lines = [f"coverage over {k} seeds (flags + 2% allows, {n} decisions; nominal {TARGETS['confidence']:.0%}):"]
    lines += [f"  {name}: true >= bound in {held[name]} of {seen[name]}" for name in held]
    lines.append(f"  targets met on held-out: flag recall {met['flag recall']}, block precision "
                 f"{met['block precision']} of {k - refused} written ({no_flag} with no supported flag threshold, "
                 f"flag: null); {refused} refused (no threshold met a target)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
