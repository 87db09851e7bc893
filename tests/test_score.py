"""Known-answer scoring: prompt embeddings are orthonormal, so the right answer is known exactly."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import OrthoTexts, unit
from safeclip.errors import EncoderMismatchError
from safeclip.policy import load_policy
from safeclip.score import Scorer


@pytest.fixture(scope="module")
def scorer() -> Scorer:
    return Scorer(load_policy("default"), OrthoTexts(512), encoder_id="test-space")


def concept_vec(scorer: Scorer, text: str) -> np.ndarray:
    return scorer.prompt_matrix[:, scorer.concept_texts.index(text)]


def test_prompt_embedding_scores_its_category_highest(scorer):
    pol = scorer.policy
    for j, cat in enumerate(pol.categories):
        s = scorer.score(concept_vec(scorer, cat.prompts[0])[None, :])
        assert int(np.argmax(s.prompt[0])) == j, cat.name
        # the positive mass (sigmoid of the log-odds) is essentially 1 at CLIP's logit scale
        assert 1 / (1 + np.exp(-s.prompt[0, j])) > 0.99


def test_contrast_prompt_embedding_scores_low(scorer):
    for j, cat in enumerate(scorer.policy.categories):
        s = scorer.score(concept_vec(scorer, cat.contrast[0])[None, :])
        assert 1 / (1 + np.exp(-s.prompt[0, j])) < 0.01, cat.name


def test_log_odds_equal_the_softmax_mass_of_positive_prompts(scorer):
    rng = np.random.default_rng(0)
    x = unit(rng.normal(size=(5, 512)) + 3 * concept_vec(scorer, "a handgun"))
    s = scorer.score(x, keep_sims=True)
    pol = scorer.policy
    for j, cat in enumerate(pol.categories):
        pos = [scorer.concept_texts.index(t) for t in cat.prompts]
        neg = [scorer.concept_texts.index(t) for t in cat.contrast + pol.neutral]
        logits = pol.logit_scale * s.sims
        e = np.exp(logits - logits.max(axis=1, keepdims=True)).astype(np.float64)
        mass = e[:, pos].sum(1) / (e[:, pos].sum(1) + e[:, neg].sum(1))
        np.testing.assert_allclose(1 / (1 + np.exp(-s.prompt[:, j])), mass, rtol=1e-4, atol=1e-6)


def test_template_ensemble_is_the_normalised_mean(scorer):
    texts = OrthoTexts(512)
    sc = Scorer(load_policy("default"), texts, encoder_id="x")
    cat = sc.policy.category("drugs")
    idx = [texts.index[t.format(cat.prompts[0])] for t in cat.templates]
    v = concept_vec(sc, cat.prompts[0])
    assert np.allclose(v[idx], 1 / np.sqrt(len(idx)), atol=1e-6)
    assert np.isclose(np.linalg.norm(v), 1.0, atol=1e-6)


def test_wrong_dimension_or_space_is_refused(scorer):
    with pytest.raises(EncoderMismatchError):
        scorer.score(np.zeros((1, 64), np.float32))
    with pytest.raises(EncoderMismatchError):
        scorer.score(np.zeros((1, 512), np.float32), encoder_id="another-space")


def test_top_prompts_name_the_matching_prompt(scorer):
    cat = scorer.policy.category("weapons")
    s = scorer.score(concept_vec(scorer, cat.prompts[2])[None, :], keep_sims=True)
    j = scorer.categories.index("weapons")
    assert scorer.top_prompts(s.sims[0], j, 2)[0][0] == cat.prompts[2]


def test_no_probe_means_nan_probe_signal(scorer):
    s = scorer.score(np.eye(512, dtype=np.float32)[:3])
    assert np.isnan(s.probe).all() and s.prompt.dtype == np.float32


def test_fused_layout_matches_reference_when_concepts_overlap(tmp_path):
    """Per-category templates (so neutral concepts are not shared by all) and a text that is one category's
    positive and another's contrast: the block layout must still give each category exactly its own sets."""
    (tmp_path / "p.yaml").write_text("""
name: overlap
version: "1"
scoring:
  logit_scale: 50.0
  templates: ["a photo of {}."]
  neutral: ["a landscape", "a car"]
categories:
  knives:
    prompts: ["a kitchen knife", "a dagger"]
    contrast: ["a spoon"]
    thresholds: {flag: 0.5, block: 0.9}
  cutlery:
    prompts: ["a spoon", "a fork"]
    contrast: ["a kitchen knife"]
    templates: ["a drawing of {}.", "a photo of {}."]
    thresholds: {flag: 0.5, block: 0.9}
  vehicles:
    prompts: ["a truck"]
    contrast: ["a car"]
    thresholds: {flag: 0.5, block: 0.9}
""")
    pol = load_policy(tmp_path / "p.yaml")
    rng = np.random.default_rng(3)
    vecs: dict[str, np.ndarray] = {}

    def texts(ts: list[str]) -> np.ndarray:
        return np.stack([vecs.setdefault(t, unit(rng.normal(size=64))) for t in ts]).astype(np.float32)

    sc = Scorer(pol, texts, encoder_id="x")
    x = unit(rng.normal(size=(50, 64)) + 2 * sc.prompt_matrix.T[rng.integers(0, len(sc.concept_texts), 50)])
    s = sc.score(x, keep_sims=True)
    logits = pol.logit_scale * s.sims.astype(np.float64)
    for j, cat in enumerate(pol.categories):
        def own(text: str, cat=cat) -> int:
            """The concept column of ``text`` under this category's templates (concepts are keyed by both)."""
            v = texts([tpl.format(text) for tpl in cat.templates]).mean(axis=0)
            return int(np.argmax(sc.prompt_matrix.T @ (v / np.linalg.norm(v))))

        pos = [own(t) for t in cat.prompts]
        neg = [own(t) for t in set(cat.contrast) | set(pol.neutral)]
        ref = np.logaddexp.reduce(logits[:, pos], axis=1) - np.logaddexp.reduce(logits[:, neg], axis=1)
        np.testing.assert_allclose(s.prompt[:, j], ref, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("make,why", [
    (lambda e: e * 1000.0, "not L2-normalised"),
    (lambda e: np.where(np.arange(e.shape[1]) == 0, np.nan, e).astype(np.float32), "NaN or infinity"),
    (lambda e: np.full_like(e, np.inf), "NaN or infinity"),
    (lambda e: (e > 0).astype(np.int64), "floating point"),
    (lambda e: e > 0, "floating point"),
])
def test_embeddings_that_are_not_clip_embeddings_are_refused(scorer, make, why):
    """Regression (issue 9.1): NaN rows scored as allow; x1000, ints and bools changed actions silently."""
    from safeclip.errors import DataError

    good = unit(np.random.default_rng(0).normal(size=(3, scorer.dim)))
    with pytest.raises(DataError, match=why):
        scorer.score(make(good))


def test_a_head_gives_its_own_signal_and_named_probability(tmp_path):
    from safeclip.heads import MLPHead

    w = unit(np.random.default_rng(0).normal(size=512))
    head = MLPHead([(w[None, :] * 20, np.array([-1.0]))], encoder_id="test-space", output="punsafe")
    sha = head.save(tmp_path / "h.json")
    (tmp_path / "p.yaml").write_text("name: h\nversion: '1'\nextends: default\ncategories:\n  sexual:\n"
                                     f"    head: {{path: h.json, sha256: {sha}}}\n")
    sc = Scorer(load_policy(tmp_path / "p.yaml"), OrthoTexts(512), encoder_id="test-space")
    x = unit(np.stack([w, -w, np.eye(512)[0]]).astype(np.float32))
    s = sc.score(x)
    j = sc.categories.index("sexual")
    np.testing.assert_allclose(s.head[:, j], 20 * (x @ w) - 1, rtol=1e-5)
    assert np.isnan(np.delete(s.head, j, axis=1)).all()
    row = s.row_signals(0)
    assert set(row) == {"prompt", "probe", "head", "punsafe"}
    assert row["punsafe"][j] == pytest.approx(1 / (1 + np.exp(-19.0)), rel=1e-6)
    assert np.isnan(np.delete(row["punsafe"], j)).all()
    with pytest.raises(EncoderMismatchError):
        Scorer(load_policy(tmp_path / "p.yaml"), OrthoTexts(512), encoder_id="another-space")


def test_an_images_signals_are_the_same_bits_in_any_batch(tmp_path):
    """Issue 23 item 3: prompts, probe and head signals of one embedding are bit-identical whether it is scored alone
    or in any batch at any position, so re-run and resumed audits compare exactly (they differed by ~5e-7)."""
    from safeclip.heads import LinearProbe, MLPHead

    rng = np.random.default_rng(3)
    w1 = rng.normal(size=(32, 512)).astype(np.float32)
    head = MLPHead([(w1, rng.normal(size=32).astype(np.float32)), (rng.normal(size=(1, 32)).astype(np.float32),
                                                                   np.array([0.5], np.float32))],
                   encoder_id="test-space")
    head_sha = head.save(tmp_path / "h.json")
    probe = LinearProbe(rng.normal(size=512).astype(np.float32), -0.25, encoder_id="test-space")
    probe_sha = probe.save(tmp_path / "p.json")
    (tmp_path / "p.yaml").write_text(
        "name: h\nversion: '1'\nextends: default\ncategories:\n"
        f"  sexual:\n    head: {{path: h.json, sha256: {head_sha}}}\n"
        f"  violence:\n    probe: {{path: p.json, sha256: {probe_sha}}}\n")
    sc = Scorer(load_policy(tmp_path / "p.yaml"), OrthoTexts(512), encoder_id="test-space")
    x = unit(rng.normal(size=(150, 512))).astype(np.float32)
    whole = sc.score(x, keep_sims=True)
    for n, at in [(1, 0), (1, 77), (3, 10), (64, 5), (65, 80), (150, 0)]:
        part = sc.score(x[at:at + n], keep_sims=True)
        for name in ("prompt", "probe", "head", "sims"):
            got, want = getattr(part, name), getattr(whole, name)[at:at + n]
            assert np.array_equal(got, want, equal_nan=True), (name, n, at)
