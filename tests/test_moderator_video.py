"""``Moderator.check`` on a video (issue 24): chunks of sampled frames embedded one forward each, decided by the
decision object as they come, stopped at the first ``block`` (``early_stop``), and never allowed when a frame could
not be decoded. The decoder and the model are stubs here whose answers are known: each frame's first pixel names the
embedding it gets (calm, a frame between flag and block, a hit over block, or one that is not finite)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import pytest
from conftest import encode_clip

import safeclip.moderator as moderator_module
from safeclip.compiled import CompiledPolicy
from safeclip.decide import decide_codes
from safeclip.embed import PixelSpec, Prepared
from safeclip.errors import TruncatedImageError
from safeclip.moderator import Moderator
from safeclip.policy import load_policy

CALM, MID, HIT, NAN = 0, 1, 2, 3


class KnownEncoder:
    """An 'encoder' whose text side is orthonormal (OrthoTexts) and whose image side maps a frame's first pixel to
    a known embedding; it counts its forwards."""

    encoder_id = "known-space"
    batch_size = 8
    dim = 512
    pixel_spec = PixelSpec(size=4)

    def __init__(self) -> None:
        from conftest import OrthoTexts

        self.embed_texts = OrthoTexts(512)
        self.table: dict[int, np.ndarray] = {}
        self.forwards: list[int] = []

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        self.forwards.append(len(pixels))
        return np.stack([self.table[int(p[0, 0, 0])] for p in pixels]).astype(np.float32)


def _known_vectors(comp: CompiledPolicy) -> dict[int, np.ndarray]:
    pol = comp.policy
    cat = next(c for c in pol.categories if c.block is not None and c.flag is not None)
    j = pol.category_names.index(cat.name)
    hit = comp.scorer.prompt_matrix[:, comp.scorer.concept_texts.index(cat.prompts[0])].astype(np.float32)
    calm = comp.scorer.prompt_matrix[:, comp.scorer.concept_texts.index(pol.neutral[0])].astype(np.float32)
    for a in np.linspace(0, 1, 401):
        v = (1 - a) * calm + a * hit
        v = (v / np.linalg.norm(v)).astype(np.float32)
        p = comp.probabilities(comp.scorer.score(v[None]))[0][0]
        if cat.flag <= p[j] < cat.block and decide_codes(p[None], pol).max() == 1:
            return {CALM: calm, MID: v, HIT: hit, NAN: np.full(512, np.nan, np.float32)}
    raise AssertionError("no frame between flag and block")


@pytest.fixture
def known(monkeypatch):
    enc = KnownEncoder()
    m = Moderator("default", encoder=enc)  # type: ignore[arg-type]
    enc.table = _known_vectors(m.compiled())
    return m, enc


def _chunk(codes: list[int], start: int, fps: float = 1.0, sha: str = "ab" * 32) -> Prepared:
    pixels = np.zeros((len(codes), 4, 4, 3), np.uint8)
    pixels[:, 0, 0, 0] = codes
    idx = tuple(range(start, start + len(codes)))
    return Prepared(pixels, idx, (None,) * len(codes), sha, "clip.mp4", "MP4", (64, 48), 100, 1234,
                    timestamps=tuple(k / fps for k in idx), duration_s=10.0, sampling="1 fps, at most 64 frames")


class Chunks:
    """A stub ``prepare_chunks``: yields the given chunks (or raises a given error), counting what was pulled."""

    def __init__(self, *chunks: list[int] | Exception) -> None:
        self.chunks = chunks
        self.pulled = 0

    def __call__(self, source, spec, options=None) -> Iterator[Prepared]:
        start = 0
        for c in self.chunks:
            self.pulled += 1
            if isinstance(c, Exception):
                raise c
            yield _chunk(c, start)
            start += len(c)


def test_early_stop_stops_decoding_at_the_first_block_chunk(known, monkeypatch):
    m, enc = known
    chunks = Chunks([CALM, CALM], [MID, HIT], [CALM, CALM], [HIT, HIT])
    monkeypatch.setattr(moderator_module, "prepare_chunks", chunks)
    d = m.check("clip.mp4")
    assert d.action == "block" and d.stopped_early and d.frames_scored == 4
    assert chunks.pulled == 2 and enc.forwards == [2, 2]  # one forward per chunk; the third never decoded
    assert d.time_s == 3.0 and d.frame_index == 3 and d.sampling == "1 fps, at most 64 frames"
    assert [(s.start_s, s.end_s, s.peak_s, s.action) for s in d.segments if s.category in d.reasons[0]] == [
        (2.0, 3.0, 3.0, "block")]


def test_without_early_stop_every_frame_is_scored_as_if_decided_at_once(known, monkeypatch):
    m, enc = known
    frames = [[CALM, CALM], [MID, HIT], [CALM, CALM], [MID, CALM]]
    chunks = Chunks(*frames)
    monkeypatch.setattr(moderator_module, "prepare_chunks", chunks)
    d = m.check("clip.mp4", early_stop=False)
    assert chunks.pulled == 4 and enc.forwards == [2, 2, 2, 2] and not d.stopped_early
    assert d.action == "block" and d.frames_scored == 8
    # the same as the decision object on all eight frames at once
    from safeclip.compiled import Views

    flat = [f for c in frames for f in c]
    views = Views.of([np.stack([enc.table[f] for f in flat])], 512).with_times([[float(k) for k in range(8)]])
    once = m.compiled().decide(views, evidence=True)
    assert d.segments == once.segments_of(0) and d.time_s == once.time(0)
    assert [round(c.probability, 6) for c in d.categories.values()] == [
        round(float(p), 6) for p in once.probabilities[0]]
    assert [(s.start_s, s.end_s) for s in d.segments if s.action == "flag" and s.start_s == 6.0] == [(6.0, 6.0)]
    # the Moderator's default can be turned off too
    m2 = Moderator("default", encoder=enc, early_stop=False)  # type: ignore[arg-type]
    chunks2 = Chunks(*frames)
    monkeypatch.setattr(moderator_module, "prepare_chunks", chunks2)
    assert m2.check("clip.mp4").frames_scored == 8 and chunks2.pulled == 4


def test_a_clean_clip_is_allowed_only_after_every_frame(known, monkeypatch):
    m, _enc = known
    chunks = Chunks([CALM, CALM], [CALM], [CALM, CALM])
    monkeypatch.setattr(moderator_module, "prepare_chunks", chunks)
    d = m.check("clip.mp4")
    assert d.action == "allow" and d.frames_scored == 5 and chunks.pulled == 3 and d.segments == ()
    assert d.to_dict()["segments"] == [] and d.to_dict()["duration_s"] == 10.0


def test_a_clip_with_an_undecodable_frame_is_never_allowed(known, monkeypatch):
    m, enc = known
    bad = TruncatedImageError("frame 7 is truncated", "clip.mp4")
    monkeypatch.setattr(moderator_module, "prepare_chunks", Chunks([CALM, CALM], bad))
    with pytest.raises(TruncatedImageError, match="decoding stopped after 2 frames"):
        m.check("clip.mp4")
    for on_error in ("flag", "block"):
        fail = Moderator("default", encoder=enc, on_error=on_error)  # type: ignore[arg-type]
        monkeypatch.setattr(moderator_module, "prepare_chunks", Chunks([CALM, CALM], bad))
        d = fail.check("clip.mp4")
        assert d.action == on_error and d.error and "frame 7 is truncated" in d.error
    # frames that already block stay block, whatever on_error says
    fail = Moderator("default", encoder=enc, on_error="flag", early_stop=False)  # type: ignore[arg-type]
    monkeypatch.setattr(moderator_module, "prepare_chunks", Chunks([CALM, HIT], bad))
    assert fail.check("clip.mp4").action == "block"
    # an unusable frame (not a finite embedding) decides nothing either
    monkeypatch.setattr(moderator_module, "prepare_chunks", Chunks([CALM], [NAN], [CALM]))
    with pytest.raises(Exception, match="not scored|holds NaN"):
        m.check("clip.mp4")


def test_a_policy_may_flag_an_incomplete_clip(known, monkeypatch, tmp_path):
    m, _enc = known
    pol = dataclasses.replace(m.policy, video_incomplete="flag")
    bad = TruncatedImageError("frame 7 is truncated", "clip.mp4")
    monkeypatch.setattr(moderator_module, "prepare_chunks", Chunks([CALM, CALM], bad))
    d = m.check("clip.mp4", policy=pol)
    assert d.action == "flag" and d.reasons[0].startswith("incomplete: ") and d.frames_scored == 2
    monkeypatch.setattr(moderator_module, "prepare_chunks", Chunks([HIT], bad))
    assert m.check("clip.mp4", policy=pol).action == "block"


def test_early_stop_waits_for_min_frames(known, monkeypatch):
    m, _enc = known
    pol = dataclasses.replace(m.policy, categories=tuple(
        dataclasses.replace(c, min_frames=3) for c in m.policy.categories))
    chunks = Chunks([HIT], [CALM], [HIT, HIT], [CALM])
    monkeypatch.setattr(moderator_module, "prepare_chunks", chunks)
    d = m.check("clip.mp4", policy=pol)
    # one block frame is not three: decoding goes on until three frames block
    assert d.action == "block" and d.stopped_early and chunks.pulled == 3 and d.frames_scored == 4


def test_a_still_goes_through_the_batcher_unchanged(known, monkeypatch):
    m, _enc = known
    still = dataclasses.replace(_chunk([HIT], 0), timestamps=(), duration_s=None, sampling=None)
    monkeypatch.setattr(moderator_module, "prepare_chunks", lambda s, spec, o=None: iter([still]))
    d = m.check("x.png")
    assert d.action == "block" and d.segments == () and d.time_s is None and d.frames_scored == 1
    assert d.to_dict()["segments"] == [] and not d.stopped_early


def test_check_async_on_a_clip(known, monkeypatch):
    import asyncio

    m, _enc = known
    chunks = Chunks([CALM], [HIT], [CALM])
    monkeypatch.setattr(moderator_module, "prepare_chunks", chunks)
    d = asyncio.run(m.check_async("clip.mp4"))
    assert d.action == "block" and d.stopped_early and chunks.pulled == 2


# ------------------------------------------------------------------------------------------------ real clips
def _mp4(path, seconds: int = 3, fps: int = 4) -> None:
    pytest.importorskip("av")
    frames = ((None, np.full((48, 64, 3), (k * 20) % 255, np.uint8)) for k in range(seconds * fps))
    encode_clip(frames, codec="mpeg4", rate=fps, size=(64, 48), path=path)


def test_a_real_clip_reports_its_sampling(tiny_model, cache_dir, tmp_path):
    clip = tmp_path / "clip.mp4"
    _mp4(clip)
    m = Moderator(model=tiny_model, device="cpu", cache_dir=cache_dir)
    d = m.check(clip, early_stop=False)
    assert d.frames_scored >= 3 and d.sampling and d.duration_s == pytest.approx(3.0, abs=0.5)
    assert all(0.0 <= s.start_s <= s.peak_s <= s.end_s <= 3.0 for s in d.segments)
    assert load_policy("default").id == d.policy


# ------------------------------------------------------------------------------------------------ surfaces
def test_cli_check_prints_a_videos_segments(known, monkeypatch, capsys):
    import json

    from safeclip.cli import main

    _m, enc = known
    monkeypatch.setattr(moderator_module, "Moderator",
                        lambda policy=None, encoder=None, on_error="raise", **_: Moderator(
                            policy, encoder=enc, on_error=on_error))  # type: ignore[arg-type]
    monkeypatch.setattr(moderator_module, "prepare_chunks", Chunks([CALM, MID], [MID, CALM], [HIT, CALM]))
    assert main(["check", "clip.mp4"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("clip.mp4\tblock\t")
    assert out[1] == "  frames: 6 scored of 10.00 s (1 fps, at most 64 frames)"
    segs = [line for line in out if line.startswith("  segment ")]
    assert any(line.startswith("  segment 1.00-2.00 s\t") and "\tflag\t" in line and "(2 frames)" in line
               for line in segs), out
    assert any(line.startswith("  segment 4.00-4.00 s\t") and "\tblock\t" in line for line in segs), out
    monkeypatch.setattr(moderator_module, "prepare_chunks", Chunks([CALM, MID], [MID, CALM], [HIT, CALM]))
    assert main(["check", "--json", "clip.mp4"]) == 0
    d = json.loads(capsys.readouterr().out)["decision"]
    assert d["frames_scored"] == 6 and d["sampling"] == "1 fps, at most 64 frames" and d["time_s"] == 4.0
    assert {(s["start_s"], s["end_s"], s["action"]) for s in d["segments"]} >= {(1.0, 2.0, "flag"), (4.0, 4.0, "block")}


def test_stills_and_animations_decide_as_their_worst_view(tiny_encoder, photos, corpus):
    """GIF/WebP animations go through the clip path when the decoder gives their frames times, stills never: either
    way the decision is the worst view's, as it was (the default policy asks no category for k of n frames)."""
    from safeclip.compiled import Views

    m = Moderator("default", encoder=tiny_encoder)
    tricky = corpus / "tricky"
    inputs = [photos[0], photos[1], tricky / "iss634.gif", tricky / "dispose_bgnd.gif", tricky / "iss634.webp"]
    comp = m.compiled()
    for path in inputs:
        d = m.check(path, early_stop=False)
        prep = m._prepare(path)
        emb = m.encoder.embed_pixels(prep.pixels)
        plain = Views(emb, np.array([0, len(emb)]))
        if prep.pdq is not None and prep.pdq_quality is not None:
            plain = plain.with_pdq([(prep.pdq, prep.pdq_quality)])
        v = comp.decide(plain, evidence=True)  # untimed: the worst view, as before videos
        assert d.action == v.action(0), path
        np.testing.assert_allclose([c.probability for c in d.categories.values()], v.probabilities[0], atol=1e-5)
        assert d.frame_index == prep.frame_indices[int(v.view[0])]
        if not prep.timestamps:
            assert d.segments == () and d.time_s is None and d.sampling is None
