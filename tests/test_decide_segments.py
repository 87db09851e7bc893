"""Video and animation in the decision object (issue 24): per-frame scores aggregated per category (the worst frame,
or ``k`` of ``n`` frames), runs of frames at or above ``flag`` reported as segments with their times, and stills
decided exactly as before."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import yaml

from safeclip.decide import (
    ACTIONS,
    Segment,
    decide_codes,
    frame_segments,
    min_frames_codes,
)
from safeclip.errors import PolicyError
from safeclip.policy import load_policy


# ------------------------------------------------------------------------------------------------ the rules alone
def _probs(policy, column: list[float], j: int = 0) -> np.ndarray:
    p = np.zeros((len(column), len(policy.categories)), np.float32)
    p[:, j] = column
    return p


def test_segments_merge_contiguous_frames_at_or_above_flag():
    pol = load_policy("default")
    cat = pol.categories[0]
    lo, fl, bl = 0.0, float(cat.flag), float(cat.block)
    # frames at 0..7 s: two runs (1-3 s, peak block at 2 s; 6 s alone), an allowed gap between them
    col = [lo, fl, bl, fl, lo, lo, fl + 0.01, lo]
    t = np.arange(8, dtype=np.float64)
    probs = _probs(pol, col)
    (segs,) = frame_segments(probs, decide_codes(probs, pol), np.array([0, 8]), t, pol)
    assert segs == (Segment(cat.name, 1.0, 3.0, round(bl, 6), 2.0, "block", 3),
                    Segment(cat.name, 6.0, 6.0, round(fl + 0.01, 6), 6.0, "flag", 1))
    assert segs[0].to_dict() == {"category": cat.name, "start_s": 1.0, "end_s": 3.0,
                                 "peak_probability": round(bl, 6), "peak_s": 2.0, "action": "block", "frames": 3}


def test_segments_of_several_categories_in_time_order_and_frames_seen_on_two_backgrounds():
    pol = load_policy("default")
    a, b = pol.categories[0], pol.categories[1]
    probs = np.zeros((6, len(pol.categories)), np.float32)
    # three frames (0, 0.5, 1.0 s), each on two backgrounds: category b fires on the dark view of frame 0,
    # category a on the light view of frames 1 and 2
    t = np.array([0.0, 0.0, 0.5, 0.5, 1.0, 1.0])
    probs[1, 1] = b.block
    probs[2, 0] = probs[4, 0] = a.flag
    (segs,) = frame_segments(probs, decide_codes(probs, pol), np.array([0, 6]), t, pol)
    assert [(s.category, s.start_s, s.end_s, s.frames) for s in segs] == [(b.name, 0.0, 0.0, 1), (a.name, 0.5, 1.0, 2)]


def test_untimed_inputs_have_no_segments_and_keep_their_codes():
    pol = load_policy("default")
    probs = _probs(pol, [0.99, 0.0])
    codes = decide_codes(probs, pol)
    nan = np.array([np.nan, np.nan])
    assert frame_segments(probs, codes, np.array([0, 2]), nan, pol) == [()]
    assert frame_segments(probs, codes, np.array([0, 1, 2]), None, pol) == [(), ()]
    k = [5] * len(pol.categories)
    assert (min_frames_codes(codes, np.array([0, 2]), nan, k) == codes).all()  # a still on two backgrounds


def test_k_of_n_caps_a_category_at_the_action_k_frames_reach():
    codes = np.array([[2], [1], [0], [1], [2], [0], [0]], np.int8)  # one clip of 5 frames, then a 2-frame clip
    offsets, t = np.array([0, 5, 7]), np.array([0, 1, 2, 3, 4, 0, 1], np.float64)
    assert min_frames_codes(codes, offsets, t, [1]).ravel().tolist() == codes.ravel().tolist()
    assert min_frames_codes(codes, offsets, t, [2]).ravel().tolist() == [2, 1, 0, 1, 2, 0, 0]  # 2 blocks
    assert min_frames_codes(codes, offsets, t, [3]).ravel().tolist() == [1, 1, 0, 1, 1, 0, 0]  # 4 >= flag, 2 block
    assert min_frames_codes(codes, offsets, t, [5]).ravel().tolist() == [0, 0, 0, 0, 0, 0, 0]
    # fewer frames than k: every sampled frame must reach it (a 1-frame clip acts on its frame)
    one = np.array([[2]], np.int8)
    assert min_frames_codes(one, np.array([0, 1]), np.array([0.0]), [4]).tolist() == [[2]]


# ------------------------------------------------------------------------------------------------ policy option
def _policy_file(tmp, cats: dict, **top):
    f = tmp / "p.yaml"
    f.write_text(yaml.safe_dump({"name": "p", "version": "1", "extends": "default", **top, "categories": cats}))
    return f


def test_policy_reads_min_frames_and_video_incomplete_and_round_trips(tmp_path):
    pol = load_policy(_policy_file(tmp_path, {"violence": {"frames": {"min_frames": 3}}}, video={"incomplete": "flag"}))
    assert pol.category("violence").min_frames == 3 and pol.video_incomplete == "flag"
    assert {c.min_frames for c in pol.categories if c.name != "violence"} == {1}
    doc = pol.to_dict(tmp_path)
    assert doc["categories"]["violence"]["frames"] == {"min_frames": 3} and doc["video"] == {"incomplete": "flag"}
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump({**doc, "name": "q"}, sort_keys=False))
    assert dataclasses.replace(load_policy(again), source=None, name="p") == dataclasses.replace(pol, source=None)
    assert "frames" not in load_policy("default").to_dict()["categories"]["violence"]


@pytest.mark.parametrize("frames, video, where", [
    ({"min_frames": 0}, None, "violence.frames.min_frames"),
    ({"min_frames": True}, None, "violence.frames.min_frames"),
    ({"k": 2}, None, "violence.frames.k"),
    (3, None, "violence.frames: must be a mapping"),
    (None, {"incomplete": "allow"}, "video.incomplete"),
    (None, {"other": 1}, "video.other"),
])
def test_invalid_video_options_are_located(tmp_path, frames, video, where):
    cat = {} if frames is None else {"frames": frames}
    top = {} if video is None else {"video": video}
    with pytest.raises(PolicyError, match=where.replace(".", r"\.")):
        load_policy(_policy_file(tmp_path, {"violence": cat}, **top))


# ------------------------------------------------------------------------------------------------ the decision object
def _known():
    from conftest import OrthoTexts

    from safeclip.compiled import CompiledPolicy

    pol = load_policy("default")
    comp = CompiledPolicy.build(pol, OrthoTexts(512), "known-space")
    cat = next(c for c in pol.categories if c.block is not None and c.flag is not None)
    j = pol.category_names.index(cat.name)
    hit = comp.scorer.prompt_matrix[:, comp.scorer.concept_texts.index(cat.prompts[0])].astype(np.float32)
    calm = comp.scorer.prompt_matrix[:, comp.scorer.concept_texts.index(pol.neutral[0])].astype(np.float32)
    # a blend between calm and hit whose probability lies in [flag, block): a "flag" frame
    mid = None
    for a in np.linspace(0, 1, 401):
        v = (1 - a) * calm + a * hit
        v = (v / np.linalg.norm(v)).astype(np.float32)
        p = comp.probabilities(comp.scorer.score(v[None]))[0][0]
        if cat.flag <= p[j] < cat.block and int(np.argmax(p)) == j and decide_codes(p[None], pol).max() == 1:
            mid = v
            break
    assert mid is not None
    return comp, cat, j, hit, mid, calm


def _clip(frames: list[np.ndarray], fps: float = 1.0):
    from safeclip.compiled import Views

    v = Views.of([np.stack(frames)], 512)
    return v.with_times([[k / fps for k in range(len(frames))]])


def test_a_clip_built_so_its_segments_are_known():
    comp, cat, j, hit, mid, calm = _known()
    # 0 calm, 1 mid, 2 hit, 3 mid, 4 calm, 5 calm, 6 mid, 7 calm at 2 fps
    frames = [calm, mid, hit, mid, calm, calm, mid, calm]
    v = comp.decide(_clip(frames, fps=2.0), evidence=True)
    assert v.action(0) == "block" and v.view.tolist() == [2]
    segs = v.segments_of(0)
    mine = [s for s in segs if s.category == cat.name]
    assert [(s.start_s, s.end_s, s.peak_s, s.action, s.frames) for s in mine] == [
        (0.5, 1.5, 1.0, "block", 3), (3.0, 3.0, 3.0, "flag", 1)]
    assert mine[0].peak_probability == pytest.approx(float(v.probabilities[0, j]), abs=1e-6)
    d = v.decision(0, frame_indices=tuple(range(0, 16, 2)), sampling="2 fps", duration_s=4.0)
    assert d.segments == segs and d.frames_scored == 8 and d.time_s == 1.0 and d.frame_index == 4
    assert d.sampling == "2 fps" and d.duration_s == 4.0 and not d.stopped_early
    assert any("at 1.00 s" in r for r in d.reasons)
    out = d.to_dict()
    assert out["segments"][0] == mine[0].to_dict() and out["frames_scored"] == 8 and out["time_s"] == 1.0
    # the worst action of the segments is the decision's action
    assert max(ACTIONS.index(s.action) for s in segs) == ACTIONS.index(d.action)


def test_k_of_n_in_the_decision_object(tmp_path):
    from conftest import OrthoTexts

    from safeclip.compiled import CompiledPolicy

    comp, cat, _j, hit, mid, calm = _known()
    frames = [calm, hit, calm, mid, mid, calm]
    assert comp.decide(_clip(frames)).action(0) == "block"  # the worst frame decides by default
    for k, want in ((2, "flag"), (3, "flag"), (4, "allow")):
        pol = dataclasses.replace(comp.policy, categories=tuple(
            dataclasses.replace(c, min_frames=k) for c in comp.policy.categories))
        other = CompiledPolicy.build(pol, OrthoTexts(512), "known-space")
        v = other.decide(_clip(frames))
        assert v.action(0) == want, k
        segs = [s for s in v.segments_of(0) if s.category == cat.name]
        if want == "allow":
            assert segs == []
        else:  # the block frame is capped at flag: it joins its neighbours only if they flag too
            assert [(s.start_s, s.end_s, s.action) for s in segs] == [(1.0, 1.0, "flag"), (3.0, 4.0, "flag")]
        # a still under the same policy is decided as before: k of n is for timed inputs
        assert other.decide(hit[None]).action(0) == "block"


def test_stills_are_decided_exactly_as_before():
    from safeclip.compiled import Views

    comp, _cat, _j, hit, mid, calm = _known()
    per_input = [np.stack([calm, hit]), mid[None], calm[None], np.stack([mid, calm, mid])]
    plain = comp.decide(Views.of(per_input, 512), evidence=True)
    untimed = comp.decide(Views.of(per_input, 512).with_times([(), (), (), ()]), evidence=True)
    assert untimed.times is None and plain.segments == untimed.segments == ()
    for a, b in ((plain, untimed),):
        assert (a.actions == b.actions).all() and (a.rows == b.rows).all()
        np.testing.assert_array_equal(a.probabilities, b.probabilities)
    for i in range(4):
        d = plain.decision(i)
        assert d.segments == () and d.frames_scored == 1 and d.time_s is None and d.sampling is None
    # a clip beside stills in one batch leaves the stills as they were
    mixed = Views.of(per_input + [np.stack([calm, hit, calm])], 512).with_times([(), (), (), (), (0.0, 1.0, 2.0)])
    v = comp.decide(mixed, evidence=True)
    assert (v.actions[:4] == plain.actions).all() and (v.rows[:4] == plain.rows).all()
    np.testing.assert_array_equal(v.probabilities[:4], plain.probabilities)
    assert v.segments_of(4) and all(v.segments_of(i) == () for i in range(4))
    assert v.decision(4).frames_scored == 3 and v.decision(4).time_s == 1.0


def test_a_clip_with_an_unusable_frame_never_decides():
    comp, _cat, _j, _hit, _mid, calm = _known()
    nan = np.full(512, np.nan, np.float32)
    v = comp.decide(_clip([calm, calm, nan, calm]))
    assert v.problems[0] is not None and v.actions.tolist() == [2] and v.segments_of(0) == ()


def test_times_of_the_wrong_length_are_refused():
    from safeclip.compiled import Views
    from safeclip.errors import DataError

    comp, _cat, _j, hit, _mid, calm = _known()
    v = dataclasses.replace(Views.of([np.stack([calm, hit])], 512), times=np.zeros(3))
    with pytest.raises(DataError, match="one time per view"):
        comp.decide(v)
