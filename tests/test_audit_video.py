"""Videos in an audit (issue 24): one row per file with its segments, the per-segment table, the Arrow form the Ray
engine ships, folders walked for video files, and stills decided as before beside them. The model is a stub whose
answers are known (see ``test_moderator_video``)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import OrthoTexts
from test_moderator_video import CALM, HIT, MID, _known_vectors, _mp4

from safeclip.audit import collect_inputs, segments_table
from safeclip.audit.mapper import BatchUnit, store
from safeclip.audit.summary import Tally
from safeclip.audit.worker import FileResult, results_from_arrow, results_to_arrow
from safeclip.audit.writer import Rows, output_schema
from safeclip.cache import EmbeddingCache
from safeclip.compiled import CompiledPolicy
from safeclip.policy import load_policy


def _setup():
    comp = CompiledPolicy.build(load_policy("default"), OrthoTexts(512), "known-space")
    table = _known_vectors(comp)
    forwards: list[int] = []

    def embed_pixels(pixels: np.ndarray) -> np.ndarray:
        forwards.append(len(pixels))
        return np.stack([table[int(p[0, 0, 0])] for p in pixels]).astype(np.float32)

    return comp, embed_pixels, forwards


def _result(tid: int, sha: str, codes: list[int], times: tuple[float, ...] = ()) -> FileResult:
    px = np.zeros((len(codes), 4, 4, 3), np.uint8)
    px[:, 0, 0, 0] = codes
    fmt = "MP4" if times else "PNG"
    return FileResult(tid, "pixels", sha256=sha * 64, nbytes=100, width=64, height=48, n_frames=len(codes),
                      frame_indices=tuple(range(len(codes))), backgrounds=(None,) * len(codes), format=fmt,
                      pixels=px, decoded=True, timestamps=times, duration_s=2.0 if times else None,
                      sampling="2 fps, at most 64 frames" if times else None)


def _batch() -> list[FileResult]:
    import dataclasses

    return [_result(0, "a", [HIT]),
            dataclasses.replace(_result(1, "b", [CALM, MID, HIT, CALM], (0.0, 0.5, 1.0, 1.5)), cache_sampling="s1"),
            _result(2, "c", [CALM, CALM, CALM], (0.0, 0.5, 1.0)),  # its sampling unknown: never cached
            _result(3, "d", [CALM])]


def test_the_batch_unit_reports_a_clips_segments_and_leaves_stills_alone(tmp_path):
    comp, embed_pixels, forwards = _setup()
    results = BatchUnit(embed_pixels, comp).map(_batch())
    assert forwards == [9]  # stills and every frame of both clips in one forward
    still, clip, calm, other = results
    assert (clip.code, clip.time_s, clip.frames_scored, clip.view) == (2, 1.0, 4, 2)
    segs = json.loads(clip.segments)
    name = comp.policy.categories[0].name  # OrthoTexts: the hit vector's category is among those in a segment
    assert any(s["start_s"] == 0.5 and s["end_s"] == 1.0 and s["action"] == "block" and s["peak_s"] == 1.0
               for s in segs), segs
    assert all(set(s) == {"category", "start_s", "end_s", "peak_probability", "peak_s", "action", "frames"}
               for s in segs) and name
    assert (calm.code, calm.segments, calm.frames_scored, calm.time_s) == (0, "[]", 3, 0.0)
    assert still.segments is None and still.time_s is None and still.frames_scored is None
    # stills decided alone give the same rows
    alone = BatchUnit(embed_pixels, comp).map([_result(0, "a", [HIT]), _result(3, "d", [CALM])])
    for a, b in zip(alone, (still, other)):
        assert a.code == b.code and a.view == b.view
        np.testing.assert_array_equal(a.probs, b.probs)


def test_rows_keep_the_segments_and_flatten_into_the_segment_table(tmp_path):
    import pyarrow.parquet as pq

    comp, embed_pixels, _ = _setup()
    results = BatchUnit(embed_pixels, comp).map(_batch())
    db = EmbeddingCache(tmp_path / "cache", "known-space")
    cats = comp.policy.category_names
    output = SimpleNamespace(db=db, rows=Rows(len(cats), False), fingerprint="fp",
                             inputs=["still.png", "clip.mp4", "calm.mp4", "other.png"])
    store(results, output, Tally())
    # a clip's entry keeps its frame times, keyed by its sampling too; stills are cached as before
    assert sorted(db.get_many([c * 64 for c in "abcd"], sampling="s1")) == ["a" * 64, "b" * 64, "d" * 64]
    clip = db.get_many(["b" * 64], sampling="s1")["b" * 64]
    assert clip.times == (0.0, 0.5, 1.0, 1.5) and clip.sampling == "s1" and len(clip.embeddings) == 4
    assert (clip.duration_s, clip.sampling_text) == (2.0, "2 fps, at most 64 frames")
    assert sorted(db.get_many([c * 64 for c in "abcd"], sampling="s2")) == ["a" * 64, "d" * 64]
    db.close()
    schema = output_schema(cats, {}, False)
    table = output.rows.table(schema, cats, "known-space", comp.policy.id)
    rows = table.to_pylist()
    assert [r["segments"] is None for r in rows] == [True, False, False, True]
    assert rows[2]["segments"] == [] and rows[1]["frames_scored"] == 4 and rows[1]["time_s"] == 1.0
    assert rows[1]["sampling"] == "2 fps, at most 64 frames" and rows[1]["duration_s"] == 2.0
    assert rows[0]["frames_scored"] is None and rows[0]["action"] == "block"
    out = tmp_path / "out.parquet"
    pq.write_table(table, out)
    segs = segments_table(out)
    assert segs.column_names == ["path", "sha256", "category", "start_s", "end_s", "peak_probability", "peak_s",
                                 "action", "frames"]
    assert set(segs.column("path").to_pylist()) == {"clip.mp4"}
    assert segs.num_rows == len(rows[1]["segments"])
    block = [r for r in segs.to_pylist() if r["action"] == "block"]
    assert block and all((r["start_s"], r["end_s"], r["peak_s"]) == (0.5, 1.0, 1.0) for r in block)
    # an output without videos (or from before them) gives an empty table
    plain = table.drop(["segments"])
    assert segments_table(plain).num_rows == 0


def test_the_arrow_form_carries_a_clips_times_and_segments():
    comp, embed_pixels, _ = _setup()
    results = BatchUnit(embed_pixels, comp).map(_batch())
    back = results_from_arrow(results_to_arrow(results), 4, 512)
    for a, b in zip(results, back):
        assert (a.timestamps, a.duration_s, a.sampling, a.time_s, a.frames_scored, a.segments, a.cache_sampling) == (
            b.timestamps, b.duration_s, b.sampling, b.time_s, b.frames_scored, b.segments, b.cache_sampling)


def test_folders_are_walked_for_video_files(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"x")
    (tmp_path / "b.WEBM").write_bytes(b"x")
    (tmp_path / "c").write_bytes(b"\0\0\0\x20ftypisom" + bytes(20))  # an extensionless MP4
    (tmp_path / "d").write_bytes(b"\x1a\x45\xdf\xa3" + bytes(20))  # an extensionless Matroska / WebM
    (tmp_path / "e.txt").write_bytes(b"not a video")
    assert [p.rsplit("/", 1)[1] for p in collect_inputs([tmp_path])] == ["a.mp4", "b.WEBM", "c", "d"]


def test_a_real_clip_audits_to_one_row_with_its_segments(tmp_path, tiny_encoder):
    from audit_helpers import read, run_audit

    folder = tmp_path / "in"
    folder.mkdir()
    _mp4(folder / "clip.mp4")
    s = run_audit([folder], tmp_path / "v.parquet", tmp_path / "cache", tiny_encoder)
    assert s.rows == 1 and s.errors == 0
    row = read(tmp_path / "v.parquet").to_pylist()[0]
    assert row["frames_scored"] >= 3 and row["sampling"] and isinstance(row["segments"], list)
    assert row["duration_s"] == pytest.approx(3.0, abs=0.5)
    # the same run again: the clip comes from the cache (keyed by sha256 + sampling), with its times
    again = run_audit([folder], tmp_path / "v2.parquet", tmp_path / "cache", tiny_encoder)
    assert again.cache_hits == 1 and again.decoded == 0
    hit = read(tmp_path / "v2.parquet").to_pylist()[0]
    assert [hit[k] for k in ("segments", "frames_scored", "time_s", "duration_s", "sampling")] == [
        row[k] for k in ("segments", "frames_scored", "time_s", "duration_s", "sampling")]


def test_a_worker_takes_a_clip_from_the_cache_only_under_its_sampling(tmp_path):
    import dataclasses

    from safeclip.audit.worker import WorkerConfig, process_file, sampling_key
    from safeclip.cache import CachedImage
    from safeclip.decode import DecodeLimits
    from safeclip.embed import PixelSpec

    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"not really a video")
    import hashlib

    sha = hashlib.sha256(clip.read_bytes()).hexdigest()
    limits = DecodeLimits()
    emb = np.eye(3, 8, dtype=np.float32)
    with EmbeddingCache(tmp_path / "cache", "enc") as db:
        db.put_many([CachedImage(sha, emb, (0, 1, 2), 64, 48, 90, 18, "MP4", times=(0.0, 1.0, 2.0),
                                 sampling=sampling_key(limits), duration_s=2.9, sampling_text="1 fps")])
    cfg = WorkerConfig(str(tmp_path / "cache"), "enc", PixelSpec(size=4), limits, "fp", 0, None)
    with EmbeddingCache(tmp_path / "cache", "enc", readonly=True) as ro:
        hit = process_file(0, str(clip), cfg, ro, {})
        assert hit.kind == "hit" and hit.timestamps == (0.0, 1.0, 2.0) and hit.cache_sampling == sampling_key(limits)
        assert (hit.duration_s, hit.sampling) == (2.9, "1 fps")
        other = dataclasses.replace(cfg, limits=DecodeLimits(sample_frames=4))
        assert sampling_key(other.limits) != sampling_key(limits)
        miss = process_file(0, str(clip), other, ro, {})
        assert miss.kind == "error"  # not taken from the cache: decoded (and these bytes are no video)


def test_rescore_decides_a_cached_clip_as_a_clip(tmp_path):
    import pyarrow.parquet as pq

    from safeclip.audit import rescore
    from safeclip.embed import PromptCache

    cache_dir = tmp_path / "cache"
    prompts, ortho = PromptCache("known-space", cache_dir), OrthoTexts(512)

    def texts(t: list[str]) -> np.ndarray:
        vecs = ortho(t)
        missing = prompts.missing(t)
        if missing:
            prompts.put(missing, vecs[[t.index(m) for m in missing]])
        return vecs

    comp = CompiledPolicy.build(load_policy("default"), texts, "known-space")
    table = _known_vectors(comp)
    results = BatchUnit(lambda px: np.stack([table[int(p[0, 0, 0])] for p in px]), comp).map(_batch())
    cats = comp.policy.category_names
    with EmbeddingCache(cache_dir, "known-space") as db:
        output = SimpleNamespace(db=db, rows=Rows(len(cats), False), fingerprint="fp",
                                 inputs=["still.png", "clip.mp4", "calm.mp4", "other.png"])
        store(results, output, Tally())
    src = tmp_path / "src.parquet"
    meta = {"format": 1, "kind": "audit", "encoder_id": "known-space", "policy": comp.policy.id}
    pq.write_table(output.rows.table(output_schema(cats, meta, False), cats, "known-space", comp.policy.id), src)
    s = rescore(out=tmp_path / "re.parquet", policy="default", cache=cache_dir, from_audit=src, verbose=False)
    assert s.rows == 4
    before = {r["path"]: r for r in pq.read_table(src).to_pylist()}
    after = {r["path"]: r for r in pq.read_table(tmp_path / "re.parquet").to_pylist()}
    clip = after["clip.mp4"]
    assert clip["action"] == "block" and clip["segments"] == before["clip.mp4"]["segments"]
    assert (clip["frames_scored"], clip["time_s"], clip["duration_s"], clip["sampling"]) == (
        4, 1.0, 2.0, "2 fps, at most 64 frames")
    assert after["calm.mp4"]["action"] == "error" and "EmbeddingNotCached" in after["calm.mp4"]["error"]
    assert after["still.png"]["segments"] is None and after["still.png"]["action"] == before["still.png"]["action"]
