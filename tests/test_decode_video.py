"""safeclip.decode on videos (MP4/MOV, WebM/MKV through PyAV) and time-based sampling of animated images.

Every clip is made here with PyAV: tiny frames of one solid colour that changes every second, so that which frame was
sampled can be read off its pixels.
"""

from __future__ import annotations

import importlib
import io
import struct
import sys
import time
from fractions import Fraction

import numpy as np
import pytest
from conftest import encode_clip
from PIL import Image

from safeclip.decode import Decoded, DecodeLimits, decode, decode_chunks
from safeclip.errors import (
    DecodeTimeoutError,
    ImageTooLargeError,
    TruncatedImageError,
    UnsupportedFormatError,
)

av = pytest.importorskip("av")
video = importlib.import_module("safeclip.decode._video")

H264 = "libx264" if "libx264" in av.codecs_available else "mpeg4"
COLOURS = [(230, 30, 30), (30, 230, 30), (30, 30, 230), (230, 230, 30), (30, 230, 230), (230, 30, 230),
           (240, 240, 240), (20, 20, 20), (128, 64, 0), (0, 128, 64)]
"""The colour of second k of every clip is ``COLOURS[k % 10]``."""


def make_clip(*, fmt: str = "mp4", codec: str = H264, seconds: float = 5, fps: int = 10, size: tuple[int, int] = (64, 48),
              gop: int | None = None, rotation: int | None = None, marker: bool = False) -> bytes:
    """A clip whose frames are solid ``COLOURS[second]`` (``marker``: with a white left half in the top row band)."""
    w, h = size

    def configure(s) -> None:
        if gop:
            s.codec_context.gop_size = gop
        if rotation is not None:
            s.set_display_rotation(rotation)

    def frames():
        for i in range(int(seconds * fps)):
            a = np.empty((h, w, 3), np.uint8)
            a[:] = COLOURS[(i // fps) % len(COLOURS)]
            if marker:
                a[: h // 4, : w // 2] = 255
            yield i, a

    return encode_clip(frames(), codec=codec, rate=fps, size=size, fmt=fmt, configure=configure)


def colour_of(im: Image.Image) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.asarray(im.convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(0).round())


def second_of(im: Image.Image) -> int:
    """Which colour of :data:`COLOURS` a frame shows (its second, mod 10)."""
    c = np.array(colour_of(im))
    return int(np.argmin([np.abs(c - np.array(k)).sum() for k in COLOURS]))


@pytest.fixture(scope="module")
def mp4() -> bytes:
    return make_clip(seconds=5)


@pytest.mark.parametrize("fmt,codec,kind", [("mp4", H264, "MP4"), ("webm", "libvpx-vp9", "WEBM"),
                                            ("matroska", "mpeg4", "MKV"), ("mov", H264, "MOV")])
def test_one_frame_a_second_first_and_last_included(fmt: str, codec: str, kind: str):
    d = decode(make_clip(fmt=fmt, codec=codec, seconds=5))
    assert isinstance(d, Decoded) and d.format == kind and d.size == (64, 48) and d.n_frames == 50
    assert d.frame_indices == (0, 10, 20, 30, 40, 49)  # 0..4 s, then the last frame (4.9 s)
    assert d.timestamps == pytest.approx((0.0, 1.0, 2.0, 3.0, 4.0, 4.9))
    assert d.duration_s == pytest.approx(5.0)
    assert d.sampling == "1 fps, at most 32 frames, first and last included"
    assert [second_of(f) for f in d.frames] == [0, 1, 2, 3, 4, 4]
    assert all(f.mode == "RGB" for f in d.frames) and d.backgrounds == (None,) * 6
    assert len(d.sha256) == 64 and d.nbytes > 0


def test_rate_is_a_setting():
    d = decode(make_clip(seconds=3), limits=DecodeLimits(frames_per_second=2))
    assert d.frame_indices == (0, 5, 10, 15, 20, 25, 29)
    assert [second_of(f) for f in d.frames] == [0, 0, 1, 1, 2, 2, 2]
    assert d.sampling.startswith("2 fps")


def test_cap_spreads_frames_over_the_whole_clip():
    data = make_clip(seconds=40, gop=10)
    d = decode(data, limits=DecodeLimits(sample_frames=8))
    assert len(d.frames) == 8 and d.frame_indices[0] == 0 and d.frame_indices[-1] == 399
    assert d.timestamps == pytest.approx(np.linspace(0, 39.9, 8), abs=0.1)
    assert [second_of(f) for f in d.frames] == [int(t) % 10 for t in d.timestamps]
    assert "spread evenly over 40 s" in d.sampling


def test_sampled_frames_are_reached_by_seeking_not_by_decoding_every_frame(monkeypatch):
    data = make_clip(seconds=60, gop=10)  # a keyframe every second
    decoded = []
    real = video._Clip._decoded

    def counting(self):
        for frame in real(self):
            decoded.append(frame.pts)
            yield frame

    monkeypatch.setattr(video._Clip, "_decoded", counting)
    d = decode(data, limits=DecodeLimits(sample_frames=4))
    assert len(d.frames) == 4 and [second_of(f) for f in d.frames] == [int(t) % 10 for t in d.timestamps]
    assert len(decoded) < 60  # of 600: each sampled frame from the keyframe before it


def test_rotation_metadata_is_applied():
    d = decode(make_clip(seconds=1, rotation=90, marker=True))
    assert d.size == (48, 64) and d.frames[0].size == (48, 64)
    # the marker (top-left band of the stored frame) ends up on the left, at the bottom, turned 90 degrees
    a = np.asarray(d.frames[0])
    assert a[-4:, :4].min() > 200 and a[:4, :4].max(axis=2).min() < 250 and a[-4:, -4:].min() < 200


def test_frames_are_reduced_as_they_are_decoded():
    d = decode(make_clip(seconds=1, size=(640, 480)), target_size=100)
    assert d.size == (640, 480) and d.frames[0].size == (133, 100)  # the shorter side to target_size
    assert second_of(d.frames[0]) == 0
    assert decode(make_clip(seconds=1), target_size=100).frames[0].size == (64, 48)  # never enlarged


def test_decode_chunks_yields_the_same_frames_in_order():
    data = make_clip(seconds=12, gop=5)
    whole = decode(data)
    chunks = list(decode_chunks(data, chunk_frames=5))
    # The first chunk is two frames (an early stop on the first seconds costs little), the others chunk_frames.
    assert [len(c.frames) for c in chunks] == [2, 5, 5, 1]
    assert sum((c.frame_indices for c in chunks), ()) == whole.frame_indices
    assert sum((c.timestamps for c in chunks), ()) == whole.timestamps
    for c in chunks:
        assert (c.sha256, c.format, c.size, c.n_frames, c.duration_s, c.sampling) == (
            whole.sha256, whole.format, whole.size, whole.n_frames, whole.duration_s, whole.sampling)
    frames = [f for c in chunks for f in c.frames]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(frames, whole.frames))


def test_decode_chunks_on_a_still_yields_decode():
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (1, 2, 3)).save(buf, "PNG")
    (one,) = decode_chunks(buf.getvalue())
    assert one.frame_indices == (0,) and one.timestamps == () and one.duration_s is None and one.sampling is None
    with pytest.raises(ValueError, match="chunk_frames"):
        next(decode_chunks(buf.getvalue(), chunk_frames=0))


def test_prepare_chunks_carries_the_times():
    from safeclip.embed import PixelSpec, prepare, prepare_chunks

    data = make_clip(seconds=3)
    chunks = list(prepare_chunks(data, PixelSpec(size=32), chunk_frames=2))
    assert [p.frame_indices for p in chunks] == [(0, 10), (20, 29)]
    assert chunks[0].pixels.shape == (2, 32, 32, 3) and chunks[0].pdq.shape == (2, 32)
    assert chunks[1].timestamps == pytest.approx((2.0, 2.9)) and chunks[0].duration_s == pytest.approx(3.0)
    whole = prepare(data, PixelSpec(size=32))
    assert whole.frame_indices == (0, 10, 20, 29) and whole.sampling == chunks[0].sampling


# ----------------------------------------------------------------------------------------------------------------
# Animated images: the same sampling, by their frame durations


def _animation(fmt: str, durations: list[int]) -> bytes:
    frames = [Image.new("RGB", (32, 24), COLOURS[k % len(COLOURS)]) for k in range(len(durations))]
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=durations, loop=0,
                   **({"lossless": True} if fmt == "WEBP" else {}))
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animated_images_are_sampled_by_their_frame_durations(fmt: str):
    durations = [400, 1500, 200, 900, 300]  # frames start at 0, 0.4, 1.9, 2.1, 3.0 s; 3.3 s in all
    d = decode(_animation(fmt, durations))
    assert d.n_frames == 5 and d.duration_s == pytest.approx(3.3)
    # the frames showing at 0, 1, 2 and 3 s (0, 1, 2, 4: frame 3 starts at 2.1 s), and the last
    assert d.frame_indices == (0, 1, 2, 4)
    assert d.timestamps == pytest.approx((0.0, 0.4, 1.9, 3.0))
    assert [second_of(f) for f in d.frames] == [0, 1, 2, 4]
    capped = decode(_animation(fmt, durations), limits=DecodeLimits(sample_frames=2))
    assert capped.frame_indices == (0, 4) and "spread evenly" in capped.sampling


def test_frames_without_a_duration_count_as_browsers_show_them():
    d = decode(_animation("GIF", [0] * 25))  # 25 frames of 100 ms
    assert d.duration_s == pytest.approx(2.5) and d.frame_indices == (0, 10, 20, 24)


def test_animation_longer_than_the_limit_is_refused():
    with pytest.raises(ImageTooLargeError, match="max_duration_s"):
        decode(_animation("GIF", [60_000, 60_000]), limits=DecodeLimits(max_duration_s=100))


# ----------------------------------------------------------------------------------------------------------------
# Hostile clips: one typed error each, quickly


def test_zero_length_file(tmp_path):
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    with pytest.raises(TruncatedImageError, match="empty"):
        decode(path)


def _noise_clip(fmt: str, codec: str) -> bytes:
    """Frames of noise, so that the clip's bytes are mostly picture data (a cut or a flipped byte lands in it)."""
    rng = np.random.default_rng(0)
    frames = ((i, rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)) for i in range(40))
    return encode_clip(frames, codec=codec, rate=10, size=(64, 48), fmt=fmt)


@pytest.mark.parametrize("fmt,codec", [("mp4", H264), ("webm", "libvpx-vp9"), ("matroska", H264)])
@pytest.mark.parametrize("keep", [0.5, 0.75])
def test_truncated_clip(fmt: str, codec: str, keep: float):
    data = _noise_clip(fmt, codec)
    assert decode(data).n_frames == 40
    with pytest.raises(TruncatedImageError, match="truncated"):
        decode(data[: int(len(data) * keep)])


def test_corrupt_bytes_in_the_middle():
    """Damage the codec notices fails the clip. (Not all damage is noticed: a codec without checksums may decode
    flipped bits into other pixels, as any image decoder would.)"""
    data = bytearray(_noise_clip("mp4", H264))
    for at in (len(data) * 3 // 10, len(data) * 4 // 10):
        data[at : at + 300] = bytes(b ^ 0x5A for b in data[at : at + 300])
    with pytest.raises(TruncatedImageError, match="corrupt"):
        decode(bytes(data))


def test_frames_over_the_pixel_limit_are_refused_from_the_header(monkeypatch):
    data = make_clip(seconds=1, size=(640, 480))
    monkeypatch.setattr(video._Clip, "frames", lambda *a: pytest.fail("decoded a frame"))
    with pytest.raises(ImageTooLargeError, match=r"640x480 = 307200 pixels, over the 100000-pixel limit"):
        decode(data, limits=DecodeLimits(max_pixels=100_000))


def test_held_pixels_are_bounded():
    data = make_clip(seconds=5)
    with pytest.raises(ImageTooLargeError, match="max_total_pixels"):
        decode(data, limits=DecodeLimits(max_total_pixels=64 * 48 * 5))  # 6 frames sampled
    assert len(list(decode_chunks(data, limits=DecodeLimits(max_total_pixels=64 * 48 * 2), chunk_frames=2))) == 3


def _box_offsets(data: bytes, kind: bytes) -> list[int]:
    out, p = [], data.find(kind)
    while p >= 0:
        out.append(p)
        p = data.find(kind, p + 1)
    return out


def _set_header_duration(data: bytes, ticks: int) -> bytes:
    """An MP4 whose movie, track and media headers (version 0) all claim ``ticks`` of their time scales."""
    b = bytearray(data)
    for kind, at in ((b"mvhd", 20), (b"mdhd", 20), (b"tkhd", 24)):
        for p in _box_offsets(data, kind):
            assert b[p + 4] == 0  # version 0: 32-bit fields
            b[p + at : p + at + 4] = struct.pack(">I", ticks)
    return bytes(b)


def test_a_header_that_lies_about_the_length():
    data = make_clip(seconds=5)
    with pytest.raises(TruncatedImageError, match=r"header says it lasts .* but its frames run 5 s"):
        decode(_set_header_duration(data, 1))  # claims a tick
    # (a header claiming more than its frames: FFmpeg's MP4 reader believes the sample table instead; a Matroska
    # header's length is checked in test_truncated_clip, a header's frame count in test_frame_count_limit)


def _sparse_clip(times_s: list[int], codec: str = H264) -> bytes:
    """2x2 frames at the given whole seconds (a clip of any length in a few frames)."""
    def configure(s) -> None:
        s.codec_context.time_base = Fraction(1, 1)
        s.codec_context.max_b_frames = 0

    frames = ((t, np.zeros((2, 2, 3), np.uint8)) for t in times_s)
    return encode_clip(frames, codec=codec, rate=1, size=(2, 2), fmt="mp4", configure=configure)


def test_ten_hour_clip_of_tiny_frames():
    data = _sparse_clip([0, 3600, 7200, 36_000])
    start = time.monotonic()
    with pytest.raises(ImageTooLargeError, match="3600-second limit"):
        decode(data)
    # a header claiming a second does not get it past: the frames' own timestamps are checked as they are read
    with pytest.raises(ImageTooLargeError, match=r"frames \d+ s apart, over the 1800-second limit"):
        decode(_set_header_duration(data, 1), limits=DecodeLimits(max_duration_s=1800))
    assert time.monotonic() - start < 10  # bounded: nothing is decoded, nothing waits
    # allowed that long, it is sampled by seeking: 4 frames decoded, not 36 000
    d = decode(data, limits=DecodeLimits(max_duration_s=40_000))
    assert d.frame_indices == (0, 1, 2, 3) and d.timestamps == (0.0, 3600.0, 7200.0, 36_000.0)


@pytest.mark.parametrize("fmt,said", [("mp4", "header says it has 20 frames"), ("matroska", "has more than 10")])
def test_frame_count_limit(fmt: str, said: str):
    """From the header where it counts them (MP4), else from the packets as they are read (Matroska)."""
    with pytest.raises(ImageTooLargeError, match=f"{said}.*max_video_frames"):
        decode(make_clip(fmt=fmt, seconds=2), limits=DecodeLimits(max_video_frames=10))


def test_time_budget():
    with pytest.raises(DecodeTimeoutError):
        decode(make_clip(seconds=20, gop=250), limits=DecodeLimits(timeout_s=1e-4))


def _other_codec_clip(codec: str, pix_fmt: str) -> bytes:
    frames = ((i, np.zeros((16, 16, 3), np.uint8)) for i in range(3))
    return encode_clip(frames, codec=codec, rate=5, size=(16, 16), fmt="matroska", pix_fmt=pix_fmt, reformat=True)


@pytest.mark.parametrize("codec,pix_fmt", [("mjpeg", "yuvj420p"), ("rawvideo", "yuv420p")])
def test_unsupported_codec_in_an_allowed_container(codec: str, pix_fmt: str):
    with pytest.raises(UnsupportedFormatError, match=rf"MKV video uses the '{codec}' codec, which is not allowed"):
        decode(_other_codec_clip(codec, pix_fmt))


def test_without_pyav_the_error_names_the_extra(monkeypatch, mp4: bytes):
    monkeypatch.setitem(sys.modules, "av", None)  # import av -> ImportError
    with pytest.raises(UnsupportedFormatError) as e:
        decode(mp4)
    assert str(e.value) == '<bytes>: video support needs PyAV: pip install "safeclip[video]"'


@pytest.mark.parametrize("head,kind", [
    (b"\0\0\0\x20ftypisom", "MP4"), (b"\0\0\0\x14ftypqt  ", "MOV"), (b"\0\0\0\x1cftypavif", None),
    (b"\0\0\0\x18ftypheic", None), (b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\x82\x84webm", "WEBM"),
    (b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\x82\x88matroska", "MKV"), (b"GIF89a", None),
])
def test_sniffed_before_anything_is_opened(head: bytes, kind: str | None):
    assert video.sniff_video(head + b"\0" * 16) == kind


def test_limits_validated():
    for bad in ({"frames_per_second": 0}, {"frames_per_second": float("inf")}, {"max_duration_s": -1},
                {"max_video_frames": 0}, {"frames_per_second": True}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            DecodeLimits(**bad)


def test_time_the_caller_spends_between_chunks_is_not_decoding_time():
    data = make_clip(seconds=4)
    limits = DecodeLimits(timeout_s=0.5, wall_timeout_s=0.5)
    chunks = 0
    for _ in decode_chunks(data, limits=limits, chunk_frames=1):
        chunks += 1
        end = time.thread_time() + 0.3
        while time.thread_time() < end:  # the caller's own CPU work on the chunk (embedding it)
            pass
    assert chunks == 5  # 1.5 s of the caller's CPU time, on a 0.5 s budget
