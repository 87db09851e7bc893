"""Known-answer data shared by the calibration tests (not a test module).

- ``Sphere``: 512-d unit embeddings from two von Mises-Fisher distributions with a shared concentration kappa. Their
  densities are ``C(kappa) exp(kappa mu_y . x)`` with the same normaliser, so the Bayes posterior is exactly
  logistic in the normalised embedding: ``logit = kappa (mu_1 - mu_0) . x + log(prior / (1 - prior))``.
- ``calibrated_sample``: 1-D equal-variance Gaussians whose posterior is a known, perfectly calibrated probability,
  for thresholds and reports; ``Fresh`` measures a threshold's precision and recall on a million new rows.
- ``sample``: labelled embeddings in the tiny model's space, built around two directions per category: the
  direction its prompt signal responds to (its prompts minus its contrast and neutral prompts) and a direction
  orthogonal to every prompt, which only a trained probe can see. So the prompt signal alone is informative but
  weak, a probe plus the prompt is strong, and a fresh sample from the same generator tells whether the chosen
  thresholds keep their promise. The fixtures ``policy_file`` / ``synth`` / ``train_file`` build them; a test
  module imports the fixtures it uses.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from safeclip import Moderator, load_policy
from safeclip.calibrate import sigmoid

D = 512
KAPPA = 256.0
PRIOR = 0.2
THETA = 0.25  # angle between the class mean directions


def sample_vmf(rng: np.random.Generator, mu: np.ndarray, kappa: float, n: int) -> np.ndarray:
    """n unit vectors from vMF(mu, kappa) (Wood, 1994), float32."""
    d = mu.size
    b = (-2 * kappa + np.sqrt(4 * kappa**2 + (d - 1) ** 2)) / (d - 1)
    x0 = (1 - b) / (1 + b)
    c = kappa * x0 + (d - 1) * np.log(1 - x0**2)
    w = np.empty(0)
    while w.size < n:
        m = 2 * (n - w.size) + 16
        z = rng.beta((d - 1) / 2, (d - 1) / 2, m)
        cand = (1 - (1 + b) * z) / (1 - (1 - b) * z)
        accept = kappa * cand + (d - 1) * np.log(1 - x0 * cand) - c >= np.log(rng.random(m))
        w = np.r_[w, cand[accept]]
    w = w[:n]
    v = rng.normal(size=(n, d))
    v -= np.outer(v @ mu, mu)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return (w[:, None] * mu + np.sqrt(1 - w**2)[:, None] * v).astype(np.float32)


class Sphere:
    def __init__(self, seed: int = 123) -> None:
        g = np.random.default_rng(seed)
        a = g.normal(size=D)
        a /= np.linalg.norm(a)
        e = g.normal(size=D)
        e -= (e @ a) * a
        e /= np.linalg.norm(e)
        self.mu1 = np.cos(THETA / 2) * a + np.sin(THETA / 2) * e
        self.mu0 = np.cos(THETA / 2) * a - np.sin(THETA / 2) * e

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        y = (rng.random(n) < PRIOR).astype(np.int8)
        X = np.empty((n, D), np.float32)
        X[y == 1] = sample_vmf(rng, self.mu1, KAPPA, int(y.sum()))
        X[y == 0] = sample_vmf(rng, self.mu0, KAPPA, int(n - y.sum()))
        logit = KAPPA * (X.astype(np.float64) @ (self.mu1 - self.mu0)) + np.log(PRIOR / (1 - PRIOR))
        return X, y, sigmoid(logit)


def sphere_split(n_train: int = 2000, n_test: int = 20_000, seed: int = 0,
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The known-answer probe split: ``(X_train, y_train, X_test, y_test)`` from one ``Sphere()``, one seeded draw.

    2000 training rows in 512 dimensions: few enough that the choice of the L2 penalty shows in the held-out AUC."""
    s = Sphere()
    rng = np.random.default_rng(seed)
    X, y, _ = s.sample(rng, n_train)
    Xt, yt, _ = s.sample(rng, n_test)
    return X, y, Xt, yt


@pytest.fixture(scope="module", autouse=True)
def one_blas_thread():
    """Small lbfgs fits on a shared 2-core machine: OpenBLAS threads spin-wait and run 10-20x slower."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield


def calibrated_sample(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Perfectly calibrated p: the posterior of pos ~ N(2, 1), neg ~ N(0, 1), prior 0.2."""
    y = (rng.random(n) < PRIOR).astype(np.int8)
    s = rng.normal(2.0 * y, 1.0)
    return sigmoid(2.0 * s - 2.0 + np.log(PRIOR / (1 - PRIOR))), y


class Fresh:
    """Precision and recall of ``p >= t`` on one large fresh sample (1M rows), by binary search."""

    def __init__(self) -> None:
        p, y = calibrated_sample(np.random.default_rng(999), 1_000_000)
        order = np.argsort(-p)
        self.neg_p = -p[order]
        self.tp = np.cumsum(y[order])

    def _k(self, t: float) -> int:
        return int(np.searchsorted(self.neg_p, -t, side="right"))

    def precision(self, t: float) -> float:
        k = self._k(t)
        return self.tp[k - 1] / k if k else 1.0

    def recall(self, t: float) -> float:
        k = self._k(t)
        return self.tp[k - 1] / self.tp[-1] if k else 0.0


@pytest.fixture(scope="module")
def fresh() -> Fresh:
    return Fresh()


# The tiny model's space: a three-category policy and labelled embeddings around its prompt directions.
POLICY = """
name: synth
version: "1"
scoring:
  logit_scale: 100.0
  templates: ["a photo of {}."]
  neutral: ["a landscape", "a city street", "a bowl of fruit"]
categories:
  weapons:
    prompts: ["a handgun", "a rifle"]
    contrast: ["a toy water pistol"]
    thresholds: {flag: 0.5, block: 0.9}
  drugs:
    prompts: ["lines of cocaine", "a syringe with heroin"]
    contrast: ["sugar on a table"]
    thresholds: {flag: 0.5, block: 0.9}
  gambling:
    prompts: ["a casino slot machine"]
    contrast: ["a board game"]
    thresholds: {flag: 0.4, block: 0.8}
"""
TARGET_PRECISION = 0.9
TARGET_RECALL = 0.9
N_TRAIN = 2000  # rows per category


def _concept(embed, text: str, templates) -> np.ndarray:
    v = np.asarray(embed([t.format(text) for t in templates]), np.float64).mean(axis=0)
    return v / np.linalg.norm(v)


def directions(policy, embed, cat: str) -> tuple[np.ndarray, np.ndarray]:
    """(u, h): the prompt signal's direction for ``cat``, and a unit direction orthogonal to every prompt."""
    c = policy.category(cat)
    pos = np.stack([_concept(embed, p, c.templates) for p in c.prompts])
    neg = np.stack([_concept(embed, p, c.templates) for p in (*c.contrast, *policy.neutral)])
    u = pos.mean(axis=0) - neg.mean(axis=0)
    u /= np.linalg.norm(u)
    everything = np.stack([_concept(embed, p, c.templates) for cc in policy.categories
                           for p in (*cc.prompts, *cc.contrast, *policy.neutral)])
    q, _ = np.linalg.qr(everything.T)
    h = np.random.default_rng(zlib.crc32(cat.encode())).normal(size=u.size)
    h -= q @ (q.T @ h)
    return u, h / np.linalg.norm(h)


def sample(policy, embed, cat: str, n: int, rng: np.random.Generator, prior: float = 0.3,
           ) -> tuple[np.ndarray, np.ndarray]:
    """``n`` unit embeddings and 0/1 labels: class means +-(0.12 u + 0.1 h), isotropic noise 0.125 per axis."""
    u, h = directions(policy, embed, cat)
    y = (rng.random(n) < prior).astype(np.int8)
    sign = np.where(y == 1, 1.0, -1.0)[:, None]
    g = rng.normal(0.0, 0.125, size=(n, u.size)) + sign * (0.12 * u + 0.1 * h) + 1.0 / np.sqrt(u.size)
    return (g / np.linalg.norm(g, axis=1, keepdims=True)).astype(np.float32), y


def write_parquet(path: Path, x: np.ndarray, columns: dict, encoder_id: str | None = None) -> Path:
    cols = {"embedding": pa.array(list(x), pa.list_(pa.float32())), **columns}
    if encoder_id is not None:
        cols["encoder_id"] = [encoder_id] * len(x)
    pq.write_table(pa.table(cols), path)
    return path


# ------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("calibration")


@pytest.fixture(scope="module")
def policy_file(work: Path, tiny_encoder) -> Path:
    path = work / "policies" / "synth.yaml"
    path.parent.mkdir()
    path.write_text(POLICY)
    Moderator(policy=path, encoder=tiny_encoder)  # embeds the prompts once: later runs read the prompt cache
    return path


@pytest.fixture(scope="module")
def synth(policy_file: Path, tiny_encoder):
    pol = load_policy(policy_file)
    return lambda cat, n, seed: sample(pol, tiny_encoder.embed_texts, cat, n, np.random.default_rng(seed))


@pytest.fixture(scope="module")
def train_file(work: Path, synth, tiny_encoder) -> Path:
    """Two categories, one 0/1 column each; each half of the rows is labelled for one category only."""
    xw, yw = synth("weapons", N_TRAIN, 0)
    xd, yd = synth("drugs", N_TRAIN, 1)
    return write_parquet(work / "train.parquet", np.concatenate([xw, xd]), {
        "weapons": pa.array([*map(int, yw), *[None] * N_TRAIN], pa.int8()),
        "drugs": pa.array([*[None] * N_TRAIN, *map(int, yd)], pa.int8()),
    }, tiny_encoder.encoder_id)
