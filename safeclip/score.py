"""Score stage (numpy only): image embeddings -> per-category raw signals.

For each category up to three signals exist:

- ``prompt``: the log-odds of the category's prompt ensemble against its contrast prompts and the policy's neutral
  prompts, at the policy's logit scale: ``log sum_pos exp(s*cos) - log sum_neg exp(s*cos)``. Its sigmoid is the
  softmax mass of the positive prompts, which is the documented fallback probability of an uncalibrated category.
- ``probe``: a linear probe's logit on the embedding, where the policy names a probe artifact.
- ``banks``: what matches in the banks a category names force (:class:`~safeclip.banks.BankSignal`): known content
  found by PDQ hash or embedding similarity, deny or allow.
- ``head``: a trained head's logit (:class:`~safeclip.heads.MLPHead`, e.g. LAION's NSFW head), where the policy names
  one. A head that names its ``output`` (``punsafe``) also reports ``sigmoid(head)`` under that name.

A batch takes one matrix multiply, one ``exp`` and contiguous block sums. The prompt embeddings (logit scale
folded in) and the probe weights are stacked into one ``(R, D)`` matrix whose rows are laid out per category,
``[positives_j, contrasts_j]`` for each j, then the neutral prompts every category shares, then one row per probe.
``W @ X.T`` gives an ``(R, N)`` block whose per-category sums are sums of contiguous rows, i.e. element-wise vector
adds over N (the layout ``benchmarks/calibration_speed.py`` found fastest). The column maximum cancels in the
difference of the two log-sums.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .arrays import as_embeddings, row_product, sigmoid
from .banks import BankSignal, PolicyBanks
from .errors import EncoderMismatchError
from .heads import LinearProbe, MLPHead, load_head
from .policy import Policy

__all__ = ["Scorer", "Scores"]

# exp() of shifted logits can underflow to 0 for prompts far below the row's best one; keep log() finite.
_TINY = np.float32(1e-30)
_NO_PROMPTS = np.float32(-100.0)


@dataclass(frozen=True)
class Scores:
    """Raw per-category signals for N images. Arrays are ``(N, C)`` float32 in ``categories`` order."""

    categories: tuple[str, ...]
    prompt: np.ndarray
    probe: np.ndarray  # NaN in the columns of categories without a probe
    head: np.ndarray  # head logits, NaN in the columns of categories without a head
    encoder_id: str
    sims: np.ndarray | None = None  # (N, P) cosine similarities to each concept, kept for evidence when asked
    head_outputs: tuple[str | None, ...] = ()  # per category: the name a head gives its probability, or None
    banks: BankSignal | None = None  # bank matches per row, where the policy names banks

    def __len__(self) -> int:
        return int(self.prompt.shape[0])

    def row_signals(self, r: int) -> dict[str, np.ndarray]:
        """Every signal of row ``r`` as ``{name: (C,) array}`` (NaN where a category lacks it), heads' named
        probabilities (``punsafe``) included: what a Decision reports per category."""
        out = {"prompt": self.prompt[r], "probe": self.probe[r], "head": self.head[r]}
        for j, name in enumerate(self.head_outputs):
            if name is not None:
                col = out.setdefault(name, np.full(len(self.categories), np.nan, np.float32))
                col[j] = sigmoid(self.head[r, j:j + 1].astype(np.float64))[0]
        return out


class Scorer:
    """A policy compiled against one embedding space: prompt embedding matrix, membership matrices and probes.

    ``embed_texts`` maps a list of prompt texts to ``(n, D)`` L2-normalised embeddings (an
    :meth:`safeclip.embed.Encoder.embed_texts`, a cache lookup, or constructed vectors in tests).

    >>> import numpy as np
    >>> from safeclip.policy import load_policy
    >>> rng = np.random.default_rng(0)
    >>> def fake_texts(texts):
    ...     v = rng.normal(size=(len(texts), 8)).astype("float32")
    ...     return v / np.linalg.norm(v, axis=1, keepdims=True)
    >>> scorer = Scorer(load_policy("default"), fake_texts, encoder_id="demo")
    >>> scorer.score(fake_texts(["an upload"])).prompt.shape
    (1, 7)
    """

    def __init__(
        self,
        policy: Policy,
        embed_texts: Callable[[list[str]], np.ndarray],
        *,
        encoder_id: str,
    ) -> None:
        self.policy = policy
        self.encoder_id = encoder_id
        self.categories = policy.category_names
        # Concepts: each distinct (text, templates) pair once, embedded as the normalised mean over its templates.
        keys: dict[tuple[str, tuple[str, ...]], int] = {}
        pos: list[list[int]] = []
        neg: list[list[int]] = []

        def concept(text: str, templates: tuple[str, ...]) -> int:
            return keys.setdefault((text, templates), len(keys))

        for cat in policy.categories:
            pos.append([concept(t, cat.templates) for t in cat.prompts])
            neg.append([concept(t, cat.templates) for t in cat.contrast]
                       + [concept(t, cat.templates) for t in policy.neutral])
        concepts = list(keys)
        texts = [tpl.format(text) for text, tpls in concepts for tpl in tpls]
        flat = np.asarray(embed_texts(texts), dtype=np.float32)
        if flat.ndim != 2 or flat.shape[0] != len(texts):
            raise ValueError(f"embed_texts returned shape {flat.shape} for {len(texts)} texts")
        vecs, i = [], 0
        for _, tpls in concepts:
            v = flat[i:i + len(tpls)].mean(axis=0)
            vecs.append(v / max(float(np.linalg.norm(v)), 1e-12))
            i += len(tpls)
        self.concept_texts: tuple[str, ...] = tuple(text for text, _ in concepts)
        self.prompt_matrix = np.ascontiguousarray(np.stack(vecs).T, dtype=np.float32)  # (D, P)
        self.dim = int(self.prompt_matrix.shape[0])
        pos = [list(dict.fromkeys(p)) for p in pos]
        neg = [list(dict.fromkeys(n)) for n in neg]
        self.pos_index = tuple(tuple(p) for p in pos)

        # Row layout of the fused matrix (see the module doc). Neutral concepts shared by every category's negative
        # side (the same text under the same templates) get one shared block; anything else is repeated per block.
        shared = [c for c in neg[0] if all(c in n for n in neg[1:])] if neg else []
        rows: list[int] = []
        blocks: list[tuple[int, int, int]] = []  # (start of positives, start of negatives, end) per category
        for p, n in zip(pos, neg):
            a = len(rows)
            rows += p
            b = len(rows)
            rows += [c for c in n if c not in shared]
            blocks.append((a, b, len(rows)))
        self._blocks = tuple(blocks)
        self._shared = (len(rows), len(rows) + len(shared))
        rows += shared
        self._n_prompt_rows = len(rows)
        fused = [self.prompt_matrix.T[rows] * np.float32(policy.logit_scale)]

        self.probes: dict[str, LinearProbe] = {}
        self.heads: dict[str, MLPHead] = {}
        for cat in policy.categories:
            if cat.probe is not None:
                self.probes[cat.name] = LinearProbe.load(cat.probe.local_path(), cat.probe.sha256,
                                                         encoder_id=encoder_id)
            if cat.head is not None:
                self.heads[cat.name] = load_head(cat.head.local_path(), cat.head.sha256, encoder_id, dim=self.dim)
        self._head_cols = tuple((self.categories.index(name), head) for name, head in self.heads.items())
        self.head_outputs = tuple(self.heads[c].output if c in self.heads else None for c in self.categories)
        probe_cols, intercepts = [], []
        for name, probe in self.probes.items():
            coef = np.asarray(probe.coef_, np.float32).ravel()
            if coef.shape[0] != self.dim:
                raise EncoderMismatchError(
                    f"probe for {name!r} has dimension {coef.shape[0]}, embeddings have {self.dim}")
            fused.append(coef[None, :])
            probe_cols.append(self.categories.index(name))
            intercepts.append(float(probe.intercept_))
        self._probe_cols = np.asarray(probe_cols, np.intp)
        self._probe_intercept = np.asarray(intercepts, np.float32)[:, None]
        self._fused = np.ascontiguousarray(np.concatenate(fused, axis=0), dtype=np.float32)  # (R, D)
        self.banks = PolicyBanks(policy, encoder_id) if any(c.banks for c in policy.categories) else None

    def score(self, embeddings: np.ndarray, *, keep_sims: bool = False, encoder_id: str | None = None,
              pdq: np.ndarray | None = None, pdq_quality: np.ndarray | None = None, record: bool = True) -> Scores:
        """Score ``(N, D)`` L2-normalised embeddings. Pass ``encoder_id`` to have the space checked.

        ``pdq`` ``(N, 32)`` uint8 and ``pdq_quality`` ``(N,)``: the rows' PDQ hashes, matched against the policy's PDQ
        banks (a row without one, quality :data:`~safeclip.banks.NO_HASH`, is reported in ``banks.missing``).
        ``record``: count bank matches towards flood quarantine (live decisions do; ``explain`` and ``rescore`` not).

        Embeddings that are not finite float L2-normalised rows raise :class:`~safeclip.errors.DataError`: a score
        of something that is not a CLIP embedding would decide nothing true.
        """
        if encoder_id is not None and encoder_id != self.encoder_id:
            raise EncoderMismatchError(
                f"embeddings come from {encoder_id!r} but the policy was compiled for {self.encoder_id!r}")
        x = np.asarray(embeddings)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise EncoderMismatchError(f"embeddings must be (N, {self.dim}), got {x.shape}")
        x = as_embeddings(x, dim=self.dim)
        n, n_c, r = x.shape[0], len(self.categories), self._n_prompt_rows
        out = row_product(self._fused, x)  # (R, N): scaled prompt logits, then probe logits; layout-independent
        logits = out[:r]
        logits -= logits.max(axis=0)
        np.exp(logits, out=logits)
        a, b = self._shared
        shared = logits[a:b].sum(axis=0) if b > a else np.zeros(n, np.float32)
        prompt_t = np.empty((n_c, n), np.float32)
        for j, (p0, n0, end) in enumerate(self._blocks):
            neg = logits[n0:end].sum(axis=0)
            neg += shared
            np.log(np.maximum(neg, _TINY), out=neg)
            np.log(np.maximum(logits[p0:n0].sum(axis=0), _TINY), out=prompt_t[j])
            prompt_t[j] -= neg
            if p0 == n0:  # a category of banks only: no prompt evidence, probability 0
                prompt_t[j] = _NO_PROMPTS
        prompt = np.ascontiguousarray(prompt_t.T)
        probe = np.full((n, n_c), np.nan, np.float32)  # NaN in the columns of categories without a probe
        if len(self._probe_cols):
            probe[:, self._probe_cols] = (out[r:] + self._probe_intercept).T
        head = np.full((n, n_c), np.nan, np.float32)
        if self._head_cols:
            # Heads run in float64: each block of rows is converted once for all of them, and no more than a block
            # is ever held in float64.
            for start in range(0, n, MLPHead.BLOCK_ROWS):
                block = x[start:start + MLPHead.BLOCK_ROWS].astype(np.float64)
                for j, h in self._head_cols:
                    head[start:start + len(block), j] = h.decision_function(block)
        sims = row_product(self.prompt_matrix.T, x).T if keep_sims else None  # (N, P) cosines to each concept, for evidence
        banks = self.banks.match(x, pdq, pdq_quality, record=record) if self.banks else None
        return Scores(self.categories, prompt, probe, head, self.encoder_id, sims, self.head_outputs, banks)

    def top_prompts(self, sims_row: np.ndarray, j: int, k: int) -> tuple[tuple[str, float], ...]:
        """The ``k`` positive prompts of category ``j`` closest to one image, with their cosine similarity."""
        idx = sorted(self.pos_index[j], key=lambda p: -float(sims_row[p]))[:k]
        return tuple((self.concept_texts[p], round(float(sims_row[p]), 4)) for p in idx)

    def with_policy(self, policy: Policy, embed_texts: Callable[[list[str]], np.ndarray]) -> Scorer:
        """Compile another policy against the same space."""
        return Scorer(policy, embed_texts, encoder_id=self.encoder_id)
