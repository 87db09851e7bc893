"""The calibration probe against scikit-learn's ``LogisticRegressionCV``: held-out ROC AUC and fit time.

    python benchmarks/probe_vs_sklearn.py              # both data sets, seed 0 (~30 s on 2 cores)
    python benchmarks/probe_vs_sklearn.py --seeds 5    # also the mean over 5 seeded draws, and who won each

Two generated data sets of unit-norm 512-d embeddings, each a training draw and a 20,000-row held-out draw:

- ``known``: the known-answer vMF sphere of tests/calibration_known.py (``sphere_split``: 2000 training rows, the
  split the regression test uses). The Bayes direction is the class-mean difference, so a strong penalty ranks best.
- ``harder``: Gaussian classes whose mean difference lies partly in 16 high-variance nuisance directions (the best
  direction is not the mean difference, and the best penalty is in the middle of the grid), a 10% positive rate and
  3% flipped labels; 3000 training rows.

Contenders, all with balanced class weights (the probe's training loss) and BLAS limited to one thread:
``train_probe`` with its defaults, and ``LogisticRegressionCV`` with its defaults (10 Cs from 1e-4 to 1e4, 5
stratified folds, lbfgs) scored by ``roc_auc`` and by ``neg_log_loss``. C is shown on the raw embeddings (the
probe's C times D). Prints numbers only; nothing is asserted (tests/test_calibration_probes.py asserts the known
split).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from calibration_known import sphere_split  # noqa: E402

from safeclip.calibration import train_probe  # noqa: E402

D = 512
N_TEST = 20_000
Split = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def harder_split(seed: int, n_train: int = 3000, n_test: int = N_TEST) -> Split:
    """Shared covariance 0.05^2 (I + 30 V V^T) with V 16 nuisance directions; class means +-delta/2 with delta
    0.12 (u + V c), |c| = 1; prior 0.1; 3% of labels flipped; a common offset, then normalised to unit length."""
    g = np.random.default_rng(7)  # the problem is fixed; the seed only draws the rows
    q, _ = np.linalg.qr(g.normal(size=(D, 17)))
    u, v = q[:, 0], q[:, 1:]
    c = g.normal(size=16)
    delta = 0.12 * (u + v @ (c / np.linalg.norm(c)))
    rng = np.random.default_rng(seed)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = (rng.random(n) < 0.1).astype(np.int8)
        z = rng.normal(size=(n, D)) + np.sqrt(30.0) * rng.normal(size=(n, 16)) @ v.T
        x = 0.05 * z + np.where(y == 1, 0.5, -0.5)[:, None] * delta + 1 / np.sqrt(D)
        y = np.where(rng.random(n) < 0.03, 1 - y, y).astype(np.int8)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y

    return (*draw(n_train), *draw(n_test))


def contenders() -> dict[str, Callable[[np.ndarray, np.ndarray], tuple[Callable[[np.ndarray], np.ndarray], float]]]:
    from sklearn.linear_model import LogisticRegressionCV

    def probe(X: np.ndarray, y: np.ndarray) -> tuple[Callable[[np.ndarray], np.ndarray], float]:
        p = train_probe(X, y, encoder_id="bench")
        return p.decision_function, p.metadata["C"] * X.shape[1]

    def lrcv(scoring: str):
        def fit(X: np.ndarray, y: np.ndarray) -> tuple[Callable[[np.ndarray], np.ndarray], float]:
            m = LogisticRegressionCV(scoring=scoring, class_weight="balanced", max_iter=1000).fit(X, y)
            return m.decision_function, float(m.C_[0])
        return fit

    return {"train_probe": probe, "LRCV roc_auc": lrcv("roc_auc"), "LRCV neg_log_loss": lrcv("neg_log_loss")}


def run(split: Split) -> dict[str, tuple[float, float, float]]:
    """{contender: (held-out AUC, C on raw embeddings, fit seconds)}."""
    from sklearn.metrics import roc_auc_score

    X, y, Xt, yt = split
    out = {}
    for name, fit in contenders().items():
        t = time.perf_counter()
        score, c = fit(X, y)
        seconds = time.perf_counter() - t
        out[name] = (float(roc_auc_score(yt, score(Xt))), c, seconds)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=1, help="seeded draws per data set (the first is seed 0)")
    args = ap.parse_args()
    from threadpoolctl import threadpool_limits

    warnings.filterwarnings("ignore", category=FutureWarning)  # LogisticRegressionCV's 1.10 announcements
    sets: dict[str, Callable[[int], Split]] = {
        "known": lambda seed: sphere_split(seed=seed),
        "harder": harder_split,
    }
    with threadpool_limits(1):
        for set_name, make in sets.items():
            results = []
            for seed in range(args.seeds):
                split = make(seed)
                res = run(split)
                results.append(res)
                if seed == 0:
                    print(f"{set_name} (seed 0, {split[0].shape[0]} training rows, {N_TEST} held out)")
                    for name, (auc, c, s) in res.items():
                        print(f"  {name:<18} held-out AUC {auc:.4f}   C {c:9.3g}   fit {s:5.2f} s")
            if args.seeds > 1:
                print(f"{set_name}: mean over {args.seeds} seeds")
                for name in results[0]:
                    aucs = np.array([r[name][0] for r in results])
                    secs = np.array([r[name][2] for r in results])
                    print(f"  {name:<18} held-out AUC {aucs.mean():.4f}   fit {secs.mean():5.2f} s")
                diff = np.array([r["train_probe"][0] - r["LRCV roc_auc"][0] for r in results])
                print(f"  train_probe - LRCV roc_auc: mean {diff.mean():+.4f}, min {diff.min():+.4f}, "
                      f">= on {int((diff >= -1e-9).sum())} of {diff.size} seeds")


if __name__ == "__main__":
    main()
