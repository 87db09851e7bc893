from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

import safeclip
from safeclip import DecodeError, Moderator
from safeclip.compiled import CompiledPolicy


@pytest.fixture(scope="module")
def moderator(tiny_model, cache_dir) -> Moderator:
    return Moderator(model=tiny_model, device="cpu", cache_dir=cache_dir, batch_size=4)


def test_check_returns_a_full_decision(moderator, photos):
    path = photos[0]
    d = moderator.check(path)
    assert d.action in safeclip.ACTIONS
    assert set(d.categories) == set(moderator.policy.category_names)
    assert d.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert d.source == str(path) and d.encoder_id == moderator.encoder_id and d.policy == "default@1.0"
    for c in d.categories.values():
        assert 0.0 <= c.probability <= 1.0 and c.calibrated is False
        assert len(c.top_prompts) == moderator.policy.top_prompts
    # every input kind gives the same embedding
    raw = path.read_bytes()
    with open(path, "rb") as f:
        kinds = [path, str(path), raw, f, Image.open(path)]
        probs = [[c.probability for c in moderator.check(k).categories.values()] for k in kinds]
    np.testing.assert_allclose(probs[0], probs[2], atol=1e-6)
    np.testing.assert_allclose(probs[0], probs[3], atol=1e-6)


def test_check_many_matches_sequential_checks_in_order(moderator, photos):
    sample = photos[:9]
    many = moderator.check_many(sample)
    one = [moderator.check(p) for p in sample]
    assert [d.source for d in many] == [str(p) for p in sample]
    for a, b in zip(many, one):
        assert a.action == b.action and a.sha256 == b.sha256
        for name in a.categories:
            assert abs(a.categories[name].probability - b.categories[name].probability) < 1e-4


def test_decide_on_prompt_embeddings_picks_that_category(moderator):
    comp = moderator.compiled()
    scorer = comp.scorer
    for j, cat in enumerate(moderator.policy.categories):
        emb = scorer.prompt_matrix[:, scorer.concept_texts.index(cat.prompts[0])][None, :]
        d = moderator.decide(emb)[0]
        assert max(d.categories.values(), key=lambda c: c.probability).name in {cat.name} | {
            c.name for c in moderator.policy.categories if cat.prompts[0] in c.prompts}


def test_known_answer_with_orthogonal_prompts(moderator):
    """With prompt embeddings built to be orthonormal, the answer is known exactly."""
    from conftest import OrthoTexts

    comp = CompiledPolicy.build(moderator.policy, OrthoTexts(512), "constructed-space")
    for cat in moderator.policy.categories:
        pos = comp.scorer.prompt_matrix[:, comp.scorer.concept_texts.index(cat.prompts[0])][None, :]
        neg = comp.scorer.prompt_matrix[:, comp.scorer.concept_texts.index(cat.contrast[0])][None, :]
        probs, _ = comp.probabilities(comp.scorer.score(np.vstack([pos, neg])))
        j = moderator.policy.category_names.index(cat.name)
        assert int(np.argmax(probs[0])) == j and probs[0, j] >= (cat.block or cat.flag)
        assert probs[1, j] < cat.flag


def test_other_policy_per_call(moderator, photos):
    strict = moderator.check(photos[1], policy="strict")
    assert strict.policy == "strict@1.0"
    assert strict.categories["sexual"].flag_threshold == 0.3


def test_on_error_raise_or_fail_closed(tiny_model, cache_dir, corpus):
    bad = next(p for p in sorted((corpus / "bad").iterdir()) if p.suffix == ".jpg" or p.suffix == ".png")
    raising = Moderator(model=tiny_model, device="cpu", cache_dir=cache_dir)
    with pytest.raises(DecodeError):
        raising.check(bad)
    closed = Moderator(model=tiny_model, device="cpu", cache_dir=cache_dir, on_error="block")
    d = closed.check(bad)
    assert d.action == "block" and d.error and str(bad.name) in d.error and not d.categories
    ok, failed = closed.check_many([corpus / "tricky" / "hopper.jpg", bad])
    assert ok.error is None and failed.action == "block"
    with pytest.raises(ValueError):
        Moderator(model=tiny_model, device="cpu", cache_dir=cache_dir, on_error="ignore")


def test_animated_worst_frame_is_reported(moderator, corpus):
    d = moderator.check(corpus / "tricky" / "iss634.gif")
    assert d.n_frames > 1 and d.frame_index is not None


def test_module_check_from_16_threads_equals_sequential(tiny_model, cache_dir, photos, monkeypatch):
    monkeypatch.setenv("SAFECLIP_MODEL", tiny_model)
    monkeypatch.setenv("SAFECLIP_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("SAFECLIP_DEVICE", "cpu")
    built = []
    original = safeclip.moderator.Encoder.__init__

    def counting_init(self, *a, **k):
        built.append(threading.get_ident())
        original(self, *a, **k)

    monkeypatch.setattr(safeclip.moderator.Encoder, "__init__", counting_init)
    safeclip.set_default_moderator(None)
    try:
        images = photos[:16]
        barrier = threading.Barrier(16)

        def run(p):
            barrier.wait()
            return safeclip.check(p)

        with ThreadPoolExecutor(16) as pool:
            parallel = list(pool.map(run, images))
        sequential = [safeclip.check(p) for p in images]
        assert len(built) == 1  # the default model loaded once
        for a, b in zip(parallel, sequential):
            assert a.to_dict() == b.to_dict()
    finally:
        safeclip.set_default_moderator(None)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_preloaded_default_serves_forked_workers(moderator, photos):
    """A pre-forking server (gunicorn --preload) loads the model, runs it, then forks workers. torch's OpenMP pool
    does not survive fork(): without safeclip's at-fork repair a child's first forward hangs for ever."""
    import json
    import signal
    import time

    safeclip.set_default_moderator(moderator)
    try:
        expected = safeclip.check(photos[0]).to_dict()  # the parent has run the model on its thread pool
        children = []
        for _ in range(2):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # pragma: no cover - runs in the child
                try:
                    os.close(r)
                    os.write(w, json.dumps(safeclip.check(photos[0]).to_dict()).encode())
                finally:
                    os._exit(0)
            os.close(w)
            children.append((pid, r))
        deadline = time.monotonic() + 60
        hung = False
        for pid, r in children:
            while not hung and os.waitpid(pid, os.WNOHANG) == (0, 0):
                hung = time.monotonic() > deadline
                time.sleep(0.05)
            if hung:  # reap every child, or a hung one keeps the test run's pipes open for ever
                for other, _ in children:
                    try:
                        os.kill(other, signal.SIGKILL)
                        os.waitpid(other, 0)
                    except (ProcessLookupError, ChildProcessError):
                        pass
                pytest.fail("a forked worker hung in its first forward")
            with os.fdopen(r, "rb") as f:
                assert json.loads(f.read()) == expected
    finally:
        safeclip.set_default_moderator(None)


@pytest.mark.parametrize("poison", [np.nan, np.inf, 1000.0])
def test_an_embedding_the_model_got_wrong_fails_closed_alone(tiny_model, cache_dir, photos, monkeypatch, poison):
    """Regression (issue 9.1): a NaN embedding row gave probability NaN and action allow."""
    from safeclip.errors import DataError

    m = Moderator(model=tiny_model, device="cpu", cache_dir=cache_dir, batch_size=8, on_error="flag")
    good = m.check_many(photos[:3])
    real = m.encoder.embed_pixels

    def broken(pixels):
        emb = real(pixels)
        emb[1] = emb[1] * poison if np.isfinite(poison) else poison
        return emb

    monkeypatch.setattr(m.encoder, "embed_pixels", broken)
    out = m.check_many(photos[:3])
    assert out[1].action == "flag" and out[1].error and not out[1].categories
    assert [d.to_dict() for i, d in enumerate(out) if i != 1] == [d.to_dict() for i, d in enumerate(good) if i != 1]
    m.on_error = "raise"
    with pytest.raises(DataError, match="not scored"):
        m.check_many(photos[:3])


def test_decide_refuses_embeddings_that_are_not_clip_embeddings(moderator):
    from safeclip.errors import DataError

    with pytest.raises(DataError):
        moderator.decide(np.full((1, moderator.encoder.dim), np.nan, np.float32))


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_batch_size_must_be_a_positive_integer(tiny_model, cache_dir, bad):
    """Regression (issue 10.11): check --batch-size 0 and Moderator(batch_size=0) were accepted."""
    from safeclip.errors import ConfigError

    with pytest.raises(ConfigError, match="batch_size"):
        Moderator(model=tiny_model, device="cpu", cache_dir=cache_dir, batch_size=bad)


class _KnownAnswerEncoder:
    """A stand-in encoder whose answer is known: a frame that shows something embeds as ``visible``, a featureless
    one as ``blank`` (both set by the test). Its prompt embeddings are orthonormal (conftest ``OrthoTexts``)."""

    encoder_id = "known-answer-space"
    batch_size = 8

    def __init__(self):
        from conftest import OrthoTexts
        from safeclip.embed import PixelSpec

        self.embed_texts = OrthoTexts(512)
        self.dim = 512
        self.pixel_spec = PixelSpec(size=32)
        self.visible = self.blank = None

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        return np.stack([self.visible if px.std() > 10 else self.blank for px in pixels]).astype(np.float32)


def _known_answer_moderator():
    """A Moderator on :class:`_KnownAnswerEncoder` whose ``visible`` frames embed as a blocking category's prompt."""
    enc = _KnownAnswerEncoder()
    m = Moderator(encoder=enc)
    comp = m.compiled()
    cat = next(c for c in m.policy.categories if c.block is not None)
    enc.visible = comp.scorer.prompt_matrix[:, comp.scorer.concept_texts.index(cat.prompts[0])]
    enc.blank = comp.scorer.prompt_matrix[:, comp.scorer.concept_texts.index(m.policy.neutral[0])]
    return m, enc, cat


def test_content_seen_only_on_a_dark_page_decides_and_names_it():
    """Issue 9 item 2: a white drawing on a transparent canvas was judged on white only, i.e. as a blank page."""
    import io

    m, enc, cat = _known_answer_moderator()

    def png(im: Image.Image) -> bytes:
        buf = io.BytesIO()
        im.save(buf, "PNG")
        return buf.getvalue()

    drawing = Image.new("RGBA", (64, 48), (255, 255, 255, 0))
    drawing.paste((255, 255, 255, 255), (16, 12, 48, 36))  # white on clear: blank on white, a shape on black
    blank = m.check(png(Image.new("RGB", (64, 48), (255, 255, 255))))
    d = m.check(png(drawing))
    assert blank.action == "allow" and d.action != "allow" and d.categories[cat.name].action != "allow"
    assert blank.background is None and blank.to_dict()["background"] is None
    assert d.background == (0, 0, 0) and d.to_dict()["background"] == [0, 0, 0]
    assert d.frame_index == 0 and d.n_frames == 1
    on_white = Moderator(encoder=enc, decode_limits=safeclip.DecodeLimits(backgrounds=((255, 255, 255),)))
    assert on_white.check(png(drawing)).action == "allow"  # what the single white background used to give


def test_a_row_the_model_got_wrong_in_a_shared_forward_fails_only_its_caller(tiny_model, cache_dir, photos,
                                                                              monkeypatch):
    """Concurrent checks share a forward (micro-batching); a bad embedding row still fails its own request alone."""
    from safeclip.errors import DataError

    m = Moderator(model=tiny_model, device="cpu", cache_dir=cache_dir, max_wait_ms=50)
    sample = photos[:6]
    poisoned = hashlib.sha256(sample[2].read_bytes()).hexdigest()
    expected = {str(p): m.check(p) for p in sample}
    bad_pixels = m._prepare(sample[2]).pixels[0]
    real = m.encoder.embed_pixels
    gate, sizes = threading.Event(), []

    def shared(pixels):
        sizes.append(len(pixels))
        gate.wait(10)
        emb = real(pixels)
        for i, px in enumerate(pixels):  # poison the row of sample[2], wherever the batch put it
            if np.array_equal(px, bad_pixels):
                emb[i] = np.nan
        return emb

    monkeypatch.setattr(m.encoder, "embed_pixels", shared)
    with ThreadPoolExecutor(len(sample)) as pool:
        futures = [pool.submit(m.check, p) for p in sample]
        for _ in range(1000):
            if m.batcher.in_flight == len(sample):
                break
            threading.Event().wait(0.01)
        gate.set()
        for p, f in zip(sample, futures):
            if hashlib.sha256(p.read_bytes()).hexdigest() == poisoned:
                with pytest.raises(DataError, match="not scored"):
                    f.result(10)
            else:
                got, want = f.result(10), expected[str(p)]
                assert got.sha256 == want.sha256 and got.action == want.action
                for name, c in got.categories.items():
                    assert abs(c.probability - want.categories[name].probability) < 1e-4
    assert max(sizes) > 1  # some requests did share a forward


def _drawing_png() -> bytes:
    import io

    drawing = Image.new("RGBA", (64, 48), (255, 255, 255, 0))
    drawing.paste((255, 255, 255, 255), (16, 12, 48, 36))  # white on clear: blank on white, a shape on black
    buf = io.BytesIO()
    drawing.save(buf, "PNG")
    return buf.getvalue()


def test_embed_returns_the_view_that_decides_not_the_first():
    """Issue 20: ``Moderator.embed()`` returned the first (white) view of an alpha image, the one that shows nothing,
    so re-deciding that embedding allowed what ``check`` blocks."""
    m, enc, cat = _known_answer_moderator()
    emb = m.embed([_drawing_png()])
    assert emb.shape == (1, 512)
    np.testing.assert_array_equal(emb[0], enc.visible.astype(np.float32))
    assert m.decide(emb)[0].action == m.check(_drawing_png()).action != "allow"


def test_check_many_keeps_a_bounded_number_of_decoded_images(tiny_encoder, photos, monkeypatch):
    """Issue 21: check_many submitted every decode at once, holding O(N) decoded images; now a few batches ahead."""
    import threading
    import time

    m = Moderator(encoder=tiny_encoder, decode_threads=2)
    lock = threading.Lock()
    state = {"prepared": 0, "embedded": 0, "ahead": 0}
    real_prepare, real_embed = m._try_prepare, tiny_encoder.embed_pixels

    def counting_prepare(image):
        out = real_prepare(image)
        with lock:
            state["prepared"] += 1
            state["ahead"] = max(state["ahead"], state["prepared"] - state["embedded"])
        return out

    def slow_embed(pixels):
        time.sleep(0.05)  # a slow model: decoding would run far ahead if nothing held it back
        with lock:
            state["embedded"] += len(pixels)
        return real_embed(pixels)

    monkeypatch.setattr(m, "_try_prepare", counting_prepare)
    monkeypatch.setattr(m.encoder, "embed_pixels", slow_embed)
    images = [np.full((8, 8, 3), i % 255, np.uint8) for i in range(300)]
    decisions = m.check_many(images)
    assert len(decisions) == 300 and state["embedded"] == 300
    bound = 2 * max(2 * m.decode_threads, 2 * tiny_encoder.batch_size) + m.decode_threads
    assert state["ahead"] <= bound, state


def test_check_without_weights_names_the_environment_not_arguments_check_lacks(monkeypatch, tmp_path):
    """Issue 21 (first hour): check()'s ModelLoadError suggested model=/pretrained= arguments check() does not take."""
    import safeclip
    from safeclip import moderator as mod
    from safeclip.errors import ModelLoadError

    def no_weights(*a, **k):
        raise ModelLoadError("cannot load the CLIP weights: pass pretrained='/path/to/weights'")

    monkeypatch.setattr(mod.EncoderSpec, "load", no_weights)
    safeclip.set_default_moderator(None)
    with pytest.raises(ModelLoadError, match=r"SAFECLIP_PRETRAINED.*set_default_moderator"):
        safeclip.check(np.zeros((8, 8, 3), np.uint8))
