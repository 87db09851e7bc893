"""Speed of the calibrate stage and of the numpy path a policy runs on cached embeddings.

    python benchmarks/calibration_speed.py            # all sections (~2-3 minutes on 2 cores)
    python benchmarks/calibration_speed.py --rows 200000 --sections 2
    python benchmarks/calibration_speed.py --full-cv  # also time train_probe with CV on all 100k rows

0. The library's own path on 1M cached 512-d embeddings under the shipped 7-category ``default`` policy extended
   with 3 probes and 7 calibrators (pinned JSON artifacts in a temporary folder): ``Scorer.score`` ->
   ``calibrate`` -> ``decide_codes``, chunked as ``safeclip rescore`` does; embeddings/s and where the time goes.
1. ``Calibrator.predict_proba`` for a 7-category policy on 1M rows (sigmoid, isotonic, stacked): rows/s.
2. The whole policy path on 1M cached 512-d float32 embeddings: one matmul against the (512, P) prompt matrix
   (P = 7 x 16 prompts + 4 neutral), the per-category contrast ``logsumexp(pos) - logsumexp(neg)`` (several
   implementations, checked against a float64 reference), probe logits, calibrators and thresholds -> one int8
   action per row; embeddings/s and where the time goes.
3. ``train_probe`` + ``fit_calibrator`` + ``choose_thresholds`` on 100k labels (512-d for the probe).

Prints numbers and ratios only; nothing is asserted. Timings are best-of-N wall clock.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from safeclip.calibrate import Calibrator, calibrate, sigmoid
from safeclip.heads import LinearProbe
from safeclip.calibration import choose_thresholds, fit_calibrator, train_probe
from safeclip.decide import decide_codes
from safeclip.policy import load_policy
from safeclip.score import Scorer

D = 512
N_CAT = 7
N_POS = 8  # positive prompts per category
N_CON = 8  # contrast prompts per category (N_POS + N_CON = 16 per category)
N_NEU = 4  # neutral prompts shared by every category's negative side
SCALE = np.float32(100.0)  # CLIP logit scale
TINY = np.float32(1e-30)


def best_of(fn: Callable[[], object], repeat: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds / 1e6:7.2f} M/s ({seconds * 1e3:8.1f} ms)"


# ------------------------------------------------------------------------------------------- 0. library path


def _library_policy(folder: Path, rng: np.random.Generator) -> tuple[Scorer, dict[str, Calibrator], object]:
    """The shipped default policy (random text vectors: speed only) plus probes on 3 categories and calibrators
    on all 7, fitted on synthetic labels and referenced by sha256 the way ``safeclip calibrate`` writes them."""
    vecs: dict[str, np.ndarray] = {}

    def texts(ts: list[str]) -> np.ndarray:
        out = np.stack([vecs.setdefault(t, rng.normal(size=D) + 0.5) for t in ts]).astype(np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    base = load_policy("default")
    plain = Scorer(base, texts, encoder_id="bench")
    n = 20_000
    X = make_unit_rows(rng, n, plain.prompt_matrix.T)
    prompt = plain.score(X).prompt
    cats: dict[str, dict] = {}
    for j, name in enumerate(base.category_names):
        y = rng.random(n) < sigmoid(3.0 * (prompt[:, j] - np.quantile(prompt[:, j], 0.97)))
        entry: dict = {}
        signals: dict[str, np.ndarray] = {"prompt": prompt[:, j]}
        if j in (0, 2, 5):
            probe = train_probe(X, y, encoder_id="bench", Cs=(1.0,), cv=2, cv_max_samples=5_000)
            entry["probe"] = {"path": f"{name}.probe.json", "sha256": probe.save(folder / f"{name}.probe.json")}
            signals["probe"] = probe.decision_function(X)
        cal = fit_calibrator(signals, y, "sigmoid", tuple(signals))
        entry["calibrator"] = {"path": f"{name}.cal.json", "sha256": cal.save(folder / f"{name}.cal.json")}
        cats[name] = entry
    import yaml

    (folder / "policy.yaml").write_text(yaml.safe_dump(
        {"name": "bench", "version": "1", "extends": "default", "categories": cats}))
    pol = load_policy(folder / "policy.yaml")
    from safeclip.calibrate import load_calibrators

    return Scorer(pol, texts, encoder_id="bench"), load_calibrators(pol, "bench"), pol


def make_unit_rows(rng: np.random.Generator, rows: int, prompts: np.ndarray) -> np.ndarray:
    """Unit rows near random prompts (cosines ~0.2-0.35, like CLIP images against texts)."""
    X = np.empty((rows, prompts.shape[1]), np.float32)
    for a in range(0, rows, 65_536):
        b = min(a + 65_536, rows)
        x = rng.standard_normal((b - a, prompts.shape[1]), dtype=np.float32) * np.float32(0.04)
        x += prompts[rng.integers(0, len(prompts), b - a)] * np.float32(0.3)
        X[a:b] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return X


def section_library(rows: int, chunk: int) -> None:
    import tempfile

    print(f"\n== 0. Library path: Scorer.score -> calibrate -> decide_codes on {rows:,} cached 512-d embeddings ==")
    rng = np.random.default_rng(4)
    with tempfile.TemporaryDirectory() as tmp:
        scorer, cals, pol = _library_policy(Path(tmp), rng)
    print(f"  policy: {len(pol.categories)} categories, {scorer._fused.shape[0]} fused rows "
          f"({len(scorer.probes)} probes), {len(cals)} calibrators")
    X = make_unit_rows(rng, rows, scorer.prompt_matrix.T)

    def run() -> tuple[np.ndarray, dict[str, float]]:
        acc = dict.fromkeys(("score", "calibrate", "decide"), 0.0)
        actions = np.empty(rows, np.int8)
        for a in range(0, rows, chunk):
            t0 = time.perf_counter()
            sc = scorer.score(X[a:a + chunk])
            t1 = time.perf_counter()
            probs, _ = calibrate(sc, cals)
            t2 = time.perf_counter()
            actions[a:a + chunk] = decide_codes(probs, pol).max(axis=1)
            t3 = time.perf_counter()
            acc["score"] += t1 - t0
            acc["calibrate"] += t2 - t1
            acc["decide"] += t3 - t2
        return actions, acc

    best, best_acc, acts = float("inf"), {}, None
    for _ in range(3):
        t0 = time.perf_counter()
        acts, acc = run()
        el = time.perf_counter() - t0
        if el < best:
            best, best_acc = el, acc
    t_mm = best_of(lambda: [scorer._fused @ X[a:a + chunk].T for a in range(0, rows, chunk)], 2)
    parts = ", ".join(f"{k} {v / best:4.0%}" for k, v in best_acc.items())
    print(f"  score + calibrate + decide: {rows / best / 1e6:5.2f} M emb/s ({best:5.2f} s)  [{parts}]")
    print(f"  the matmul alone, same chunks: {rows / t_mm / 1e6:5.2f} M emb/s -> the path runs at "
          f"{t_mm / best:.0%} of its floor")
    print(f"  action mix: allow {np.mean(acts == 0):.1%}, flag {np.mean(acts == 1):.1%}, block {np.mean(acts == 2):.1%}")


# -------------------------------------------------------------------------------------------- 1. calibrators


def fitted_calibrators(rng: np.random.Generator) -> dict[str, Calibrator]:
    n = 20_000
    y = (rng.random(n) < 0.2).astype(int)
    prompt = rng.normal(np.where(y == 1, 1.5, -1.0), 1.2)
    probe = rng.normal(np.where(y == 1, 2.0, -2.0), 1.5)
    return {
        "sigmoid(prompt)": Calibrator("sigmoid").fit(prompt, y),
        "isotonic(prompt)": Calibrator("isotonic").fit(prompt, y),
        "sigmoid(prompt, probe)": Calibrator("sigmoid", ("prompt", "probe")).fit(np.c_[prompt, probe], y),
        "isotonic(prompt, probe)": Calibrator("isotonic", ("prompt", "probe")).fit(np.c_[prompt, probe], y),
    }


def section_calibrators(rows: int) -> None:
    print(f"\n== 1. Calibrator.predict_proba, {rows:,} rows, float32 signals ==")
    rng = np.random.default_rng(0)
    cals = fitted_calibrators(rng)
    one = rng.normal(-0.5, 1.5, rows).astype(np.float32)
    two = rng.normal(0, 1.5, (rows, 2)).astype(np.float32)
    per = {}
    for name, cal in cals.items():
        x = one if len(cal.inputs) == 1 else two
        t = best_of(lambda cal=cal, x=x: cal.predict_proba(x))
        per[name] = t
        print(f"  {name:26s} one category: {rate(rows, t)}")
    t_np = best_of(lambda: np.interp(one, cals["isotonic(prompt)"].x_thresholds_,
                                     cals["isotonic(prompt)"].y_thresholds_), 2)
    print(f"  {'np.interp (reference)':26s} one category: {rate(rows, t_np)}"
          f"  -> table lookup is {t_np / per['isotonic(prompt)']:.1f}x faster")
    t7 = 4 * per["sigmoid(prompt)"] + 3 * per["sigmoid(prompt, probe)"]
    print(f"  7 categories (4 prompt-only + 3 stacked, sigmoid): {rows * 7 / t7 / 1e6:.1f} M category-rows/s, "
          f"{rows / t7 / 1e6:.2f} M rows/s for all 7")
    t7i = 4 * per["isotonic(prompt)"] + 3 * per["isotonic(prompt, probe)"]
    print(f"  7 categories, isotonic: {rows / t7i / 1e6:.2f} M rows/s for all 7")


# ------------------------------------------------------------------------------------------- 2. policy path


class Policy:
    """A synthetic 7-category policy compiled to matrices, with columns grouped per category."""

    def __init__(self, rng: np.random.Generator) -> None:
        # Column order: [pos_0, con_0, pos_1, con_1, ..., neutral]; each group contiguous.
        p = N_CAT * (N_POS + N_CON) + N_NEU
        centre = rng.normal(size=D)
        w = rng.normal(size=(p, D)) + 0.5 * centre  # prompts share a common component, like CLIP texts
        w /= np.linalg.norm(w, axis=1, keepdims=True)
        self.P = p
        self.W = np.ascontiguousarray(w.T, np.float32)  # (D, P) unit columns
        self.groups = []  # (start, stop) per group: pos_j, con_j ..., neutral last
        for j in range(N_CAT):
            a = j * (N_POS + N_CON)
            self.groups += [(a, a + N_POS), (a + N_POS, a + N_POS + N_CON)]
        self.groups.append((p - N_NEU, p))
        self.pos_idx = [np.arange(*self.groups[2 * j]) for j in range(N_CAT)]
        self.neg_idx = [np.r_[np.arange(*self.groups[2 * j + 1]), np.arange(p - N_NEU, p)] for j in range(N_CAT)]
        self.pos_members = np.zeros((p, N_CAT), np.float32)
        self.neg_members = np.zeros((p, N_CAT), np.float32)
        for j in range(N_CAT):
            self.pos_members[self.pos_idx[j], j] = 1
            self.neg_members[self.neg_idx[j], j] = 1
        self.starts = np.array([g[0] for g in self.groups])
        # Probes on 3 categories, folded into the same matmul as extra columns (logit scale 1).
        self.probe_cats = [0, 2, 5]
        pc = rng.normal(size=(D, len(self.probe_cats))) * 1.5
        self.probe_coef = pc.astype(np.float32)
        self.probe_b = np.array([-1.0, -0.5, -2.0], np.float32)
        self.W_all = np.ascontiguousarray(np.c_[self.W * SCALE, self.probe_coef], np.float32)  # scale folded in
        self.WT_all = np.ascontiguousarray(self.W_all.T)
        self.flag = np.full(N_CAT, 0.5, np.float32)
        self.block = np.full(N_CAT, 0.85, np.float32)


# Contrast implementations. Input: logits (n, P) already at logit scale, float32. Output: (n, C) prompt log-odds.


def lse_membership_matmul(pol: Policy, L: np.ndarray) -> np.ndarray:
    """The current score stage: global row max, one exp of the whole matrix, two 0/1 membership matmuls."""
    L = L - L.max(axis=1, keepdims=True)
    np.exp(L, out=L)
    pos = np.log(np.maximum(L @ pol.pos_members, TINY))
    pos -= np.log(np.maximum(L @ pol.neg_members, TINY))
    return pos


def lse_logaddexp_reduce(pol: Policy, L: np.ndarray) -> np.ndarray:
    out = np.empty((L.shape[0], N_CAT), np.float32)
    for j in range(N_CAT):
        out[:, j] = np.logaddexp.reduce(L[:, pol.pos_idx[j]], axis=1) - np.logaddexp.reduce(L[:, pol.neg_idx[j]],
                                                                                            axis=1)
    return out


def _group_lse_rows(blk: np.ndarray) -> np.ndarray:
    m = blk.max(axis=1)
    e = blk - m[:, None]
    np.exp(e, out=e)
    return np.log(e.sum(axis=1)) + m


def lse_group_max(pol: Policy, L: np.ndarray) -> np.ndarray:
    """Per-group max (exact, no underflow floor), (n, P) row layout; neg = logaddexp(contrast, neutral)."""
    g = [_group_lse_rows(L[:, a:b]) for a, b in pol.groups]
    neu = g[-1]
    out = np.empty((L.shape[0], N_CAT), np.float32)
    for j in range(N_CAT):
        out[:, j] = g[2 * j] - np.logaddexp(g[2 * j + 1], neu)
    return out


def lse_global_max_reduceat(pol: Policy, L: np.ndarray) -> np.ndarray:
    """Global row max, one exp, then column-group sums with np.add.reduceat; neg = contrast + neutral sums."""
    L = L - L.max(axis=1, keepdims=True)
    np.exp(L, out=L)
    s = np.add.reduceat(L, pol.starts, axis=1)
    np.maximum(s, TINY, out=s)
    out = np.empty((L.shape[0], N_CAT), np.float32)
    for j in range(N_CAT):
        out[:, j] = np.log(s[:, 2 * j]) - np.log(s[:, 2 * j + 1] + s[:, -1])
    return out


def _group_lse_cols(blk: np.ndarray) -> np.ndarray:
    # blk: (g, n) contiguous rows; reductions over axis 0 are element-wise vector ops over n (SIMD-friendly).
    m = blk.max(axis=0)
    e = blk - m
    np.exp(e, out=e)
    s = e.sum(axis=0)
    np.log(s, out=s)
    s += m
    return s


def lse_group_max_T(pol: Policy, LT: np.ndarray) -> np.ndarray:
    """Per-group max on the transposed (P, n) layout. Returns (C, n)."""
    g = [_group_lse_cols(LT[a:b]) for a, b in pol.groups]
    neu = g[-1]
    out = np.empty((N_CAT, LT.shape[1]), np.float32)
    for j in range(N_CAT):
        np.subtract(g[2 * j], np.logaddexp(g[2 * j + 1], neu), out=out[j])
    return out


def lse_global_max_T(pol: Policy, LT: np.ndarray) -> np.ndarray:
    """Global column max + one exp + contiguous row-block sums, on the transposed (P, n) layout."""
    E = LT - LT.max(axis=0)
    np.exp(E, out=E)
    s = [E[a:b].sum(axis=0) for a, b in pol.groups]
    neu = s[-1]
    out = np.empty((N_CAT, LT.shape[1]), np.float32)
    for j in range(N_CAT):
        out[j] = np.log(np.maximum(s[2 * j], TINY)) - np.log(np.maximum(s[2 * j + 1] + neu, TINY))
    return out


def reference_contrast(pol: Policy, L: np.ndarray) -> np.ndarray:
    from scipy.special import logsumexp

    L = L.astype(np.float64)
    return np.stack([logsumexp(L[:, pol.pos_idx[j]], axis=1) - logsumexp(L[:, pol.neg_idx[j]], axis=1)
                     for j in range(N_CAT)], axis=1)


def actions_with_bound(pol: Policy, LT: np.ndarray, probe: np.ndarray, cals: dict, zf: np.ndarray,
                       zb: np.ndarray) -> tuple[np.ndarray, float]:
    """Action codes without exp for rows the max-trick bound already decides.

    ``max(g) <= logsumexp(g) <= max(g) + log(len(g))`` bounds each category's prompt log-odds, hence (calibrator
    coefficient > 0) its linear score; a row whose bound interval falls on one side of both thresholds is
    decided from group maxima alone. Only the other rows get the exact logsumexp. Returns codes and the share
    of (row, category) pairs that needed it.
    """
    gmax = [LT[a:b].max(axis=0) for a, b in pol.groups]
    neu = gmax[-1]
    codes = np.zeros(LT.shape[1], np.int8)
    exact = 0
    for j, cal in cals.items():
        (pa, pb), (ca, cb) = pol.groups[2 * j], pol.groups[2 * j + 1]
        mneg = np.maximum(gmax[2 * j + 1], neu)
        lo = gmax[2 * j] - mneg - np.float32(np.log(cb - ca + N_NEU))
        hi = gmax[2 * j] - mneg + np.float32(np.log(pb - pa))
        a = np.float32(cal.coef_[0])  # > 0 for a sensible prompt signal
        rest = np.float32(0.0)
        if j in pol.probe_cats:
            rest = probe[pol.probe_cats.index(j)] * np.float32(cal.coef_[1])
        zlo, zhi = lo * a + rest, hi * a + rest
        c = (zlo >= zf[j]).view(np.int8) + (zlo >= zb[j]).view(np.int8)
        amb = np.flatnonzero(c != (zhi >= zf[j]).view(np.int8) + (zhi >= zb[j]).view(np.int8))
        if amb.size:
            sub = LT[:, amb]
            pos = _group_lse_cols(sub[pa:pb])
            neg = np.logaddexp(_group_lse_cols(sub[ca:cb]), _group_lse_cols(sub[pol.P - N_NEU:pol.P]))
            z = (pos - neg) * a + (rest[amb] if np.ndim(rest) else rest)
            c[amb] = (z >= zf[j]).view(np.int8) + (z >= zb[j]).view(np.int8)
        exact += amb.size
        np.maximum(codes, c, out=codes)
    return codes, exact / (LT.shape[1] * len(cals))


def make_embeddings(rng: np.random.Generator, rows: int, pol: Policy) -> np.ndarray:
    X = np.empty((rows, D), np.float32)
    step = 65_536
    # Images near some prompts (cosines ~0.2-0.35 like CLIP), not isotropic noise.
    for a in range(0, rows, step):
        b = min(a + step, rows)
        x = rng.standard_normal((b - a, D), dtype=np.float32)
        x *= np.float32(0.04)
        x += pol.W.T[rng.integers(0, pol.P, b - a)] * np.float32(0.3)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        X[a:b] = x
    return X


def section_policy(rows: int, chunk: int) -> str:
    print(f"\n== 2. Policy path on {rows:,} cached 512-d float32 embeddings ({N_CAT} categories, "
          f"{N_CAT * (N_POS + N_CON) + N_NEU} prompts, 3 probes) ==")
    rng = np.random.default_rng(1)
    pol = Policy(rng)
    t0 = time.perf_counter()
    X = make_embeddings(rng, rows, pol)
    print(f"  (made {X.nbytes / 2**30:.2f} GiB of embeddings in {time.perf_counter() - t0:.1f} s)")

    # -- contrast implementations on one chunk
    xc = X[:chunk]
    S = xc @ pol.W_all  # (n, P + 3)
    L = np.ascontiguousarray(S[:, :pol.P])
    LT = np.ascontiguousarray((pol.WT_all @ xc.T)[:pol.P])
    ref = reference_contrast(pol, L)
    impls = {
        "A membership matmul (global max, current score.py)": (lambda: lse_membership_matmul(pol, L), False),
        "B np.logaddexp.reduce per category": (lambda: lse_logaddexp_reduce(pol, L), False),
        "C per-group max + exp + sum, (n, P) rows": (lambda: lse_group_max(pol, L), False),
        "D global max + exp + np.add.reduceat": (lambda: lse_global_max_reduceat(pol, L), False),
        "E per-group max, transposed (P, n)": (lambda: lse_group_max_T(pol, LT), True),
        "F global max + exp + row-block sums, transposed (P, n)": (lambda: lse_global_max_T(pol, LT), True),
    }
    print(f"  contrast logsumexp(pos) - logsumexp(neg) on a {chunk:,}-row chunk (matmul excluded):")
    times = dict.fromkeys(impls, float("inf"))
    for name, (fn, transposed) in impls.items():
        out = fn()
        errs = float(np.abs((out.T if transposed else out) - ref).max())
        impls[name] = (fn, transposed, errs)
    for _ in range(5):  # round-robin, best of 5: the machine is shared, so interleave rather than batch
        for name, (fn, _, _) in impls.items():
            t0 = time.perf_counter()
            fn()
            times[name] = min(times[name], time.perf_counter() - t0)
    for name, (_, _, err) in impls.items():
        print(f"    {name:56s} {rate(chunk, times[name])}  max|err| {err:.1e}")
    fastest = min(times, key=times.get)
    t_mm = best_of(lambda: xc @ pol.W_all, 3)
    t_mmT = best_of(lambda: pol.WT_all @ xc.T, 3)
    w128 = np.ascontiguousarray(np.c_[pol.W_all, np.zeros((D, 128 - pol.W_all.shape[1]), np.float32)])
    t_mm128 = best_of(lambda: xc @ w128, 3)
    t_exp = best_of(lambda: np.exp(L), 5)
    print(f"    fastest: {fastest}")
    print(f"  for scale, on the same chunk: matmul (n,512)@(512,{pol.W_all.shape[1]}) {rate(chunk, t_mm)}; "
          f"transposed {rate(chunk, t_mmT)}; padded to 128 columns {rate(chunk, t_mm128)}; "
          f"one exp over (n, P) {rate(chunk, t_exp)}")

    # -- calibrators fitted on this policy's own signals, with labels that make ~3% of images positive per
    # category (so most rows are allowed, as in production): 4 prompt-only, 3 stacked with the probe.
    cals = {}
    sig = lse_global_max_T(pol, LT)
    prb = (pol.WT_all @ xc.T)[pol.P:] + pol.probe_b[:, None]
    for j in range(N_CAT):
        s_j = sig[j].astype(np.float64)
        if j in pol.probe_cats:
            k = pol.probe_cats.index(j)
            score = s_j / s_j.std() + prb[k] / prb[k].std()
            y_j = rng.random(s_j.size) < sigmoid(4.0 * (score - np.quantile(score, 0.97)))
            cals[j] = Calibrator("sigmoid", ("prompt", "probe")).fit(np.c_[s_j, prb[k]], y_j)
        else:
            y_j = rng.random(s_j.size) < sigmoid(4.0 * (s_j / s_j.std() - np.quantile(s_j / s_j.std(), 0.97)))
            cals[j] = Calibrator("sigmoid").fit(s_j, y_j)

    zf = np.array([np.log(pol.flag[j] / (1 - pol.flag[j])) - cals[j].intercept_ for j in range(N_CAT)], np.float32)
    zb = np.array([np.log(pol.block[j] / (1 - pol.block[j])) - cals[j].intercept_ for j in range(N_CAT)], np.float32)

    def run(chunk_rows: int, contrast: str, decide: str) -> tuple[np.ndarray, dict[str, float], float]:
        acc = dict.fromkeys(("matmul", "contrast", "calibrate", "decide"), 0.0)
        actions = np.empty(rows, np.int8)
        exact_share = []
        for a in range(0, rows, chunk_rows):
            b = min(a + chunk_rows, rows)
            t0 = time.perf_counter()
            if contrast == "A":
                S = X[a:b] @ pol.W_all
                t1 = time.perf_counter()
                prompt = lse_membership_matmul(pol, S[:, :pol.P]).T.copy()
                probe = (S[:, pol.P:] + pol.probe_b).T.copy()
            else:
                ST = pol.WT_all @ X[a:b].T  # (P + 3, n)
                t1 = time.perf_counter()
                probe = ST[pol.P:] + pol.probe_b[:, None]
                if contrast == "bound":
                    codes, share = actions_with_bound(pol, ST[:pol.P], probe, cals, zf, zb)
                    exact_share.append(share)
                    actions[a:b] = codes
                    t2 = time.perf_counter()
                    acc["matmul"] += t1 - t0
                    acc["contrast"] += t2 - t1
                    continue
                prompt = (lse_group_max_T if contrast == "E" else lse_global_max_T)(pol, ST[:pol.P])  # (C, n)
            t2 = time.perf_counter()
            codes = np.zeros(b - a, np.int8)
            if decide == "probabilities":
                probs = np.empty((N_CAT, b - a), np.float32)
                for j, cal in cals.items():
                    if j in pol.probe_cats:
                        k = pol.probe_cats.index(j)
                        probs[j] = cal.predict_proba(np.column_stack([prompt[j], probe[k]]))
                    else:
                        probs[j] = cal.predict_proba(prompt[j])
                t3 = time.perf_counter()
                for j in range(N_CAT):
                    c = (probs[j] >= pol.flag[j]).view(np.int8) + (probs[j] >= pol.block[j]).view(np.int8)
                    np.maximum(codes, c, out=codes)
            else:
                # Thresholds moved onto the linear score: p >= t  <=>  z >= logit(t) (sigmoid is monotone).
                t3 = t2
                for j, cal in cals.items():
                    z = prompt[j] * np.float32(cal.coef_[0])
                    if j in pol.probe_cats:
                        z += probe[pol.probe_cats.index(j)] * np.float32(cal.coef_[1])
                    c = (z >= zf[j]).view(np.int8) + (z >= zb[j]).view(np.int8)
                    np.maximum(codes, c, out=codes)
            actions[a:b] = codes
            t4 = time.perf_counter()
            acc["matmul"] += t1 - t0
            acc["contrast"] += t2 - t1
            acc["calibrate"] += t3 - t2
            acc["decide"] += t4 - t3
        return actions, acc, float(np.mean(exact_share)) if exact_share else float("nan")

    t_mm_all = best_of(lambda: [pol.WT_all @ X[a:a + chunk].T for a in range(0, rows, chunk)], 1)
    print(f"  matmul alone over all rows (the floor of the path): {rows / t_mm_all / 1e6:.2f} M emb/s "
          f"({t_mm_all:.2f} s, {2 * rows * D * pol.W_all.shape[1] / t_mm_all / 1e9:.0f} GFLOP/s)")
    print("  full path (matmul -> contrast + probe -> calibrators -> thresholds -> int8 action per row):")
    results = {}
    configs = [
        (chunk, "A", "probabilities"),
        (chunk, "E", "probabilities"),
        (chunk, "F", "probabilities"),
        (chunk, "F", "logit thresholds"),
        (chunk, "bound", "logit thresholds"),
        (16_384, "F", "logit thresholds"),
    ]
    for chunk_rows, contrast, decide in configs:
        best, best_acc, acts, share = float("inf"), None, None, float("nan")
        for _ in range(2):
            t0 = time.perf_counter()
            acts, acc, share = run(chunk_rows, contrast, decide)
            el = time.perf_counter() - t0
            if el < best:
                best, best_acc = el, acc
        results[(chunk_rows, contrast, decide)] = acts
        parts = ", ".join(f"{k} {v / best:4.0%}" for k, v in best_acc.items())
        extra = f"  exact lse for {share:.1%} of (row, category)" if not np.isnan(share) else ""
        print(f"    chunk {chunk_rows:6,d}, contrast {contrast:5s}, {decide:17s}: {rows / best / 1e6:5.2f} M emb/s "
              f"({best:5.2f} s)  [{parts}]{extra}")
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        t0 = time.perf_counter()
        run(chunk, "F", "logit thresholds")
        el = time.perf_counter() - t0
    print(f"    same as row 4 with BLAS on 1 thread: {rows / el / 1e6:5.2f} M emb/s ({el:5.2f} s)")
    base = results[configs[0]]
    for key, acts in results.items():
        if not np.array_equal(acts, base):
            print(f"    note: {key} disagrees with the baseline on {np.mean(acts != base):.2e} of rows "
                  "(float32 rounding at thresholds)")
    print(f"  action mix: allow {np.mean(base == 0):.1%}, flag {np.mean(base == 1):.1%}, block {np.mean(base == 2):.1%}")
    return fastest


# ------------------------------------------------------------------------------------------------ 3. fitting


def section_fit(n: int, full_cv: bool) -> None:
    from threadpoolctl import threadpool_limits

    print(f"\n== 3. Fitting on {n:,} labels ==")
    rng = np.random.default_rng(2)
    X = rng.standard_normal((n, D), dtype=np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    w = rng.normal(size=D)
    w /= np.linalg.norm(w)
    logit = 80.0 * (X @ w) - 2.0
    y = (rng.random(n) < sigmoid(logit)).astype(np.int8)
    print(f"  data: {n:,} x {D} float32, {y.mean():.1%} positive")

    def timed(label: str, fn: Callable[[], object]) -> object:
        t0 = time.perf_counter()
        out = fn()
        print(f"  {label:62s} {time.perf_counter() - t0:6.2f} s")
        return out

    probe: LinearProbe = timed("train_probe (defaults: 19 Cs, 5-fold CV on a 20k subsample, refit)",
                               lambda: train_probe(X, y, encoder_id="bench"))
    with threadpool_limits(1):
        timed("  same, BLAS limited to 1 thread", lambda: train_probe(X, y, encoder_id="bench"))
    timed("train_probe, 3 Cs, 3-fold CV on a 10k subsample", lambda: train_probe(
        X, y, encoder_id="bench", Cs=(1e-2, 1e-1, 1.0), cv=3, cv_max_samples=10_000))
    if full_cv:
        timed("train_probe, 19 Cs, 5-fold CV on all rows (no subsample)",
              lambda: train_probe(X, y, encoder_id="bench", cv_max_samples=None))
    print(f"    chose C={probe.metadata['C']}, CV AUC {probe.metadata['cv_auc']:.4f}, "
          f"log-loss {probe.metadata['cv_log_loss']:.4f}, {probe.metadata['n_iter']} lbfgs iterations in the refit")
    z = timed("probe.decision_function", lambda: probe.decision_function(X))
    prompt = (logit + rng.normal(0, 2.0, n)).astype(np.float32)
    for method in ("sigmoid", "isotonic", "auto"):
        timed(f"fit_calibrator({method!r}, prompt)", lambda method=method: fit_calibrator(prompt, y, method))
    cal = timed("fit_calibrator('sigmoid', (prompt, probe))",
                lambda: fit_calibrator({"prompt": prompt, "probe": z}, y, "sigmoid", ("prompt", "probe")))
    p = cal.predict_proba(np.c_[prompt, z])
    th = timed("choose_thresholds (precision 0.95, recall 0.9)", lambda: choose_thresholds(p, y))
    print(f"    block {th.block}, flag {th.flag}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--chunk", type=int, default=65_536)
    ap.add_argument("--fit-rows", type=int, default=100_000)
    ap.add_argument("--sections", default="0123")
    ap.add_argument("--full-cv", action="store_true")
    a = ap.parse_args()
    import threadpoolctl

    print("numpy", np.__version__, "| BLAS:", ", ".join(
        f"{i['internal_api']} {i.get('version', '')} x{i['num_threads']}" for i in threadpoolctl.threadpool_info()))
    if "0" in a.sections:
        section_library(a.rows, a.chunk)
    if "1" in a.sections:
        section_calibrators(a.rows)
    if "2" in a.sections:
        fastest = section_policy(a.rows, a.chunk)
        print(f"\n  fastest contrast implementation: {fastest}")
    if "3" in a.sections:
        section_fit(a.fit_rows, a.full_cv)


if __name__ == "__main__":
    main()
