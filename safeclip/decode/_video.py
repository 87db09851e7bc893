"""The video backend: MP4/MOV and WebM/MKV containers through PyAV (the optional ``safeclip[video]`` extra).

The container is recognised from its first bytes before anything is opened, and FFmpeg is told which demuxer to use
(it never probes). The codec is checked against :data:`VIDEO_CODECS` from the stream header, the frame size against
``max_pixels``, and the header's duration and frame count against their limits, before any frame is decoded. Then one
pass over the packets (demuxing only: no decoding) gives every frame's real timestamp, so that a header that lies
about the length changes nothing, and the packets' own timestamps are held to ``max_duration_s`` and
``max_video_frames`` as they are read. The sampled frames are chosen from those timestamps
(:func:`~safeclip.decode._common.sample_positions`: ``frames_per_second``, at most ``sample_frames``, first and last
included) and decoded by seeking to the keyframe before each one (or decoding on from the current frame, where no
keyframe lies in between), each reduced (shorter side to ``target_size``) and rotated upright as it is decoded, so that
memory is bounded by the frames sampled, never by the clip. Frames that are never sampled are not decoded.

Every failure is a :class:`~safeclip.errors.DecodeError`; a sampled frame that cannot be decoded fails the whole clip
(:class:`~safeclip.errors.TruncatedImageError`), never a shorter result.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import io
import math
import time
from collections.abc import Iterator
from typing import Any

from PIL import Image

from ..errors import (
    DecodeError,
    ImageTooLargeError,
    TruncatedImageError,
    UnsupportedFormatError,
)
from ._common import (
    Deadline,
    Decoded,
    DecodeLimits,
    one_line,
    sample_positions,
    sampling_text,
)

__all__ = ["VIDEO_CODECS", "VIDEO_EXTRA", "decode_video", "sniff_video", "video_chunks"]

VIDEO_CODECS: dict[str, str] = {
    "h264": "H.264/AVC",
    "hevc": "H.265/HEVC",
    "vp8": "VP8",
    "vp9": "VP9",
    "av1": "AV1",
    "mpeg4": "MPEG-4 Part 2",
}
"""The video codecs decoded (FFmpeg codec names): the ones phones, browsers and web platforms produce. Anything else
in an allowed container (MJPEG, raw video, ProRes, ...) is refused from the stream header."""

VIDEO_EXTRA = 'video support needs PyAV: pip install "safeclip[video]"'
"""The error's reason when PyAV is not installed."""

_DEMUXERS = {"MP4": "mov,mp4,m4a,3gp,3g2,mj2", "MOV": "mov,mp4,m4a,3gp,3g2,mj2",
             "WEBM": "matroska,webm", "MKV": "matroska,webm"}
_ISO_IMAGE_BRANDS = frozenset({b"avif", b"avis", b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm",
                               b"hevs", b"mif1", b"msf1"})
"""ISO media brands of still-image formats (HEIF, AVIF): those go to the image decoder."""
_EBML = b"\x1a\x45\xdf\xa3"
_PROBED_STREAMS = 64
"""Streams the frame-size cap is passed to while FFmpeg probes (a file with more gets no cap on the rest)."""
_CHECK_EVERY = 256
"""Packets demuxed between two checks of the time budget."""


def sniff_video(data: bytes) -> str | None:
    """The container of a video input from its first bytes: ``"MP4"``, ``"MOV"``, ``"WEBM"`` or ``"MKV"``; ``None``
    for anything else (HEIF and AVIF images carry an ISO media header too, and are not videos).

    >>> sniff_video(b"\\x00\\x00\\x00\\x20ftypisom\\x00\\x00\\x02\\x00"), sniff_video(b"\\x89PNG\\r\\n\\x1a\\n")
    ('MP4', None)
    """
    if len(data) >= 12 and data[4:8] == b"ftyp":
        brand = data[8:12]
        if brand in _ISO_IMAGE_BRANDS:
            return None
        return "MOV" if brand == b"qt  " else "MP4"
    if data[:4] == _EBML:
        return "WEBM" if b"webm" in data[:64] else "MKV"
    return None


def _import_av(name: str) -> Any:
    try:
        import av
    except ImportError as e:
        raise UnsupportedFormatError(VIDEO_EXTRA, name) from e
    return av


_TRANSPOSE = {1: Image.Transpose.ROTATE_90, 2: Image.Transpose.ROTATE_180, 3: Image.Transpose.ROTATE_270}
"""Quarter turns counterclockwise (the display matrix's rotation) -> PIL transposition."""


def _quarter_turns(frame: Any) -> int:
    try:
        rotation = float(frame.rotation or 0)
    except (TypeError, ValueError, OverflowError):  # a broken display matrix never fails a clip: shown as stored
        return 0
    if not math.isfinite(rotation):
        return 0
    return round(rotation / 90) % 4


class _Clip:
    """An open video: the header checked, every frame's timestamp read, the sampled frames chosen."""

    def __init__(self, data: bytes, kind: str, name: str, limits: DecodeLimits, deadline: Deadline):
        self.av = _import_av(name)
        self.name, self.kind, self.limits, self.deadline = name, kind, limits, deadline
        self.what = f"{kind} video"
        av = self.av
        try:
            # FFmpeg's own frame-size cap, for the frames it decodes to probe the streams before we see the header
            probe = {"max_pixels": str(limits.max_pixels)}
            self.container = av.open(io.BytesIO(data), mode="r", format=_DEMUXERS[kind], metadata_errors="ignore",
                                     stream_options=[probe] * _PROBED_STREAMS)
        except av.error.FFmpegError as e:
            raise self._error(e, "header") from e
        self.reformatter = av.video.reformatter.VideoReformatter()  # one scaler for the clip, not one per frame
        try:
            self._check_header()
            self._scan()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        with contextlib.suppress(Exception):  # closing after a failure must not hide the failure
            self.container.close()

    def _error(self, e: BaseException, where: str) -> DecodeError:
        if isinstance(e, MemoryError):
            return ImageTooLargeError(f"ran out of memory decoding the {self.what}", self.name)
        reason = getattr(e, "strerror", None) or one_line(e)  # FFmpeg's own words, without errno and file name
        return TruncatedImageError(f"{self.what} {where} is corrupt or truncated: {reason}", self.name)

    def _check_header(self) -> None:
        limits, name, what = self.limits, self.name, self.what
        streams = self.container.streams.video
        if not streams:
            raise UnsupportedFormatError(f"{what} file holds no video stream", name)
        stream = self.stream = streams[0]
        cc = stream.codec_context
        codec = cc.codec.name if cc.codec is not None else "unknown"
        codec_id = getattr(cc.codec, "id", None)
        self.codec = next((c for c in VIDEO_CODECS if c == codec or self._same_codec(c, codec_id)), None)
        if self.codec is None:
            raise UnsupportedFormatError(
                f"{what} uses the {codec!r} codec, which is not allowed (allowed: {', '.join(VIDEO_CODECS)})", name
            )
        w, h = cc.width, cc.height
        if w <= 0 or h <= 0:
            raise TruncatedImageError(f"{what} stream header has an invalid frame size {w}x{h}", name)
        if w * h > limits.max_pixels:
            raise ImageTooLargeError(f"{what} frames are {w}x{h} = {w * h} pixels, over the {limits.max_pixels}-pixel "
                                     "limit (DecodeLimits.max_pixels)", name)
        self.time_base = stream.time_base
        if self.time_base is None or self.time_base <= 0:
            raise TruncatedImageError(f"{what} stream has no valid time base", name)
        header_s, self.header_exact = _header_seconds(stream, self.container)
        self.header_s, self.header_frames = header_s, stream.frames
        if header_s is not None and header_s > limits.max_duration_s:
            raise ImageTooLargeError(f"{what} header says it lasts {header_s:g} s, over the {limits.max_duration_s:g}"
                                     "-second limit (DecodeLimits.max_duration_s)", name)
        if stream.frames > limits.max_video_frames:
            raise ImageTooLargeError(f"{what} header says it has {stream.frames} frames, over the "
                                     f"{limits.max_video_frames}-frame limit (DecodeLimits.max_video_frames)", name)
        cc.thread_count = 1  # decode in this thread: its CPU clock is the time budget
        # Report damaged data as errors instead of hiding it: a concealed frame is not the frame that was sent.
        cc.options = {"err_detect": "crccheck+bitstream+buffer+explode", "max_pixels": str(limits.max_pixels)}
        self.deadline.check("after reading the video header")

    def _same_codec(self, allowed: str, codec_id: Any) -> bool:
        try:
            return codec_id is not None and self.av.Codec(allowed, "r").id == codec_id
        except self.av.codec.codec.UnknownCodecError:  # a decoder this FFmpeg build lacks
            return False

    def _scan(self) -> None:
        """Every packet's timestamp, without decoding: the real length and frame count, and where the keyframes are."""
        limits, name, what, tb = self.limits, self.name, self.what, self.time_base
        pts: list[int] = []
        keys: list[int] = []
        first: int | None = None
        max_ticks: float | None = None
        last, last_ticks = None, 0  # the latest timestamp so far, and how long its packet says it shows
        try:
            for i, packet in enumerate(self.container.demux(self.stream)):
                if i % _CHECK_EVERY == 0:
                    self.deadline.check(f"reading packet {i}")
                t = packet.pts if packet.pts is not None else packet.dts
                if t is None:
                    if packet.size == 0:  # the demuxer's end-of-stream marker
                        continue
                    raise TruncatedImageError(f"{what} has a frame without a timestamp (packet {i})", name)
                if packet.is_discard:  # before an edit list's start: decoded for reference, never shown
                    if packet.is_keyframe:
                        keys.append(t)
                    continue
                if first is None:
                    first = t
                    max_ticks = limits.max_duration_s / float(tb)
                elif abs(t - first) > max_ticks:  # type: ignore[operator]
                    raise ImageTooLargeError(
                        f"{what} has frames {float((t - first) * tb):g} s apart, over the {limits.max_duration_s:g}"
                        "-second limit (DecodeLimits.max_duration_s)", name)
                pts.append(t)
                if last is None or t > last:
                    last, last_ticks = t, packet.duration or 0
                if packet.is_keyframe:
                    keys.append(t)
                if len(pts) > limits.max_video_frames:
                    raise ImageTooLargeError(f"{what} has more than {limits.max_video_frames} frames "
                                             "(DecodeLimits.max_video_frames)", name)
        except DecodeError:
            raise
        except self.av.error.FFmpegError as e:
            raise self._error(e, "data") from e
        if not pts:
            raise TruncatedImageError(f"{what} has no frames", name)
        pts.sort()
        keys.sort()
        self.pts, self.keys, self.start = pts, keys, pts[0]
        self.starts = [float((p - self.start) * tb) for p in pts]
        frame_s = float(last_ticks * tb)
        if frame_s <= 0:  # the packet does not say: one frame at the stream's rate, else the clip's median step
            rate = self.stream.average_rate or self.stream.guessed_rate
            steps = [b - a for a, b in zip(self.starts, self.starts[1:])]
            frame_s = 1 / float(rate) if rate else (float(sorted(steps)[len(steps) // 2]) if steps else 0.0)
        self.duration_s = self.starts[-1] + frame_s
        self._agree_with_header(frame_s)
        self.positions, spread = sample_positions(self.starts, limits)
        self.sampling = sampling_text(limits, spread, self.duration_s)
        self.deadline.check("after reading the packets")

    def _agree_with_header(self, frame_s: float) -> None:
        """A header and frames that disagree: a truncated file (frames end early) or a header that lies."""
        # The container's length may include other streams (audio running on past the picture): a second's slack.
        n, tol = len(self.pts), 2 * frame_s + (0.0 if self.header_exact else 1.0) + 1e-3
        if self.header_s is not None and abs(self.duration_s - self.header_s) > tol:
            cut = "the file is truncated or" if self.duration_s < self.header_s else "its header"
            raise TruncatedImageError(f"{self.what} header says it lasts {self.header_s:g} s but its frames run "
                                      f"{self.duration_s:.3g} s: {cut} lies about its length", self.name)
        frames = self.header_frames
        if frames > 0 and abs(frames - n) > max(2, frames // 100):
            raise TruncatedImageError(f"{self.what} header says it has {frames} frames but {n} were found: the file "
                                      "is truncated or its header lies", self.name)

    def _decoded(self) -> Iterator[Any]:
        for packet in self.container.demux(self.stream):
            yield from packet.decode()

    def frames(self, target_size: int | None) -> Iterator[tuple[int, float, Image.Image, tuple[int, int]]]:
        """Decode the sampled frames in order: (frame number, seconds from the first frame, the RGB view, its
        upright size before reduction)."""
        av, name, what, deadline = self.av, self.name, self.what, self.deadline
        current: int | None = None  # pts of the last frame decoded
        it: Iterator[Any] | None = None
        for pos in self.positions:
            want = self.pts[pos]
            k = bisect.bisect_right(self.keys, want) - 1
            key = self.keys[k] if k >= 0 else self.start
            try:
                if it is None or current is None or not key <= current < want:
                    self.container.seek(key, stream=self.stream, backward=True, any_frame=False)
                    it, current = self._decoded(), None
                frame = None
                for frame in it:
                    deadline.check(f"decoding on to frame {pos}")
                    if frame.pts is None:
                        raise TruncatedImageError(f"{what} decoded a frame without a timestamp", name)
                    current = frame.pts
                    if frame.pts >= want:
                        break
                else:
                    frame = None
            except DecodeError:
                raise
            except av.error.FFmpegError as e:
                raise self._error(e, f"frame {pos} (at {self.starts[pos]:.3f} s)") from e
            if frame is None or frame.pts != want:
                got = "the stream ended" if frame is None else f"the decoder gave the frame at pts {frame.pts}"
                raise TruncatedImageError(f"{what} frame {pos} (at {self.starts[pos]:.3f} s) could not be decoded: "
                                          f"{got}; a clip is never judged on part of its sampled frames", name)
            if getattr(frame, "is_corrupt", False):
                raise TruncatedImageError(f"{what} frame {pos} (at {self.starts[pos]:.3f} s) is corrupt", name)
            yield (pos, self.starts[pos], *self._view(frame, pos, target_size))

    def _view(self, frame: Any, pos: int, target_size: int | None) -> tuple[Image.Image, tuple[int, int]]:
        w, h = frame.width, frame.height
        if w * h > self.limits.max_pixels:  # a stream may change its frame size midway
            raise ImageTooLargeError(f"{self.what} frame {pos} is {w}x{h} = {w * h} pixels, over the "
                                     f"{self.limits.max_pixels}-pixel limit (DecodeLimits.max_pixels)", self.name)
        rw, rh = _reduced((w, h), target_size)
        try:
            rgb = self.reformatter.reformat(frame, rw, rh, "rgb24", interpolation="AREA")
            im = rgb.to_image()
        except self.av.error.FFmpegError as e:
            raise self._error(e, f"frame {pos}") from e
        turns = _quarter_turns(frame)
        if turns:
            im = im.transpose(_TRANSPOSE[turns])
        return im, ((h, w) if turns % 2 else (w, h))


def _header_seconds(stream: Any, container: Any) -> tuple[float | None, bool]:
    """The video stream's length from the header, and whether it is the stream's own: the stream's duration, else its
    ``DURATION`` tag (Matroska), else the container's (which may include other streams)."""
    if stream.duration is not None and stream.duration > 0:
        return float(stream.duration * stream.time_base), True
    tag = next((v for k, v in (stream.metadata or {}).items() if k.upper() == "DURATION"), None)
    if isinstance(tag, str):
        try:
            h, m, sec = tag.split(":")
            return int(h) * 3600 + int(m) * 60 + float(sec), True
        except ValueError:
            pass
    if container.duration is not None and container.duration > 0:
        return float(container.duration / 1_000_000), False  # AV_TIME_BASE
    return None, False


def _reduced(size: tuple[int, int], target_size: int | None) -> tuple[int, int]:
    """A frame's size once reduced for ``target_size``: the shorter side down to ``target_size`` (area-averaged, as
    the frame is converted to RGB). Stills keep twice that, so that their pixels match a full-resolution decode;
    a clip holds many frames, and the model and PDQ see no more than ``target_size`` of them anyway."""
    w, h = size
    if target_size is None or min(w, h) <= target_size:
        return w, h
    scale = target_size / min(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


FIRST_CHUNK_FRAMES = 2
"""Frames in a clip's first chunk (later ones hold ``chunk_frames``): an early stop on the first seconds costs two
frames' decode and forward, not a whole chunk's."""


def video_chunks(
    data: bytes,
    kind: str,
    name: str,
    limits: DecodeLimits,
    target_size: int | None,
    deadline: Deadline,
    chunk_frames: int,
) -> Iterator[Decoded]:
    """Decode a video's sampled frames, ``chunk_frames`` at a time (the first chunk at most
    :data:`FIRST_CHUNK_FRAMES`), each chunk a :class:`Decoded` (see :func:`~safeclip.decode.decode_chunks`). The
    pixels held at once, at most ``limits.max_total_pixels``, are a chunk's."""
    sha = hashlib.sha256(data).hexdigest()
    what = f"{kind} video"
    clip: _Clip | None = None
    try:
        clip = _Clip(data, kind, name, limits, deadline)
        cc = clip.stream.codec_context
        per_frame = _reduced_area((cc.width, cc.height), target_size)
        k = min(chunk_frames, len(clip.positions))
        if k * per_frame > limits.max_total_pixels:
            raise ImageTooLargeError(
                f"{clip.what}: holding {k} sampled frames of about {per_frame} pixels takes {k * per_frame} pixels, "
                f"over the {limits.max_total_pixels}-pixel limit on decoded frames (DecodeLimits.max_total_pixels); "
                "decode with a target_size or sample fewer frames", name)
        size: tuple[int, int] | None = None
        chunk: list[tuple[int, float, Image.Image]] = []
        held = 0
        want = min(FIRST_CHUNK_FRAMES, chunk_frames)  # a block in the first seconds is seen after little work
        for pos, t, im, upright in clip.frames(target_size):
            size = size or upright
            held += im.size[0] * im.size[1]
            if held > limits.max_total_pixels:
                raise ImageTooLargeError(
                    f"{clip.what}: holding frame {pos} takes {held} pixels, over the {limits.max_total_pixels}-pixel "
                    "limit on decoded frames (DecodeLimits.max_total_pixels)", name)
            chunk.append((pos, t, im))
            if len(chunk) == want:
                with _paused(deadline):
                    yield _result(chunk, sha, clip, size, len(data))
                chunk, held, want = [], 0, chunk_frames
        if chunk:
            assert size is not None
            with _paused(deadline):
                yield _result(chunk, sha, clip, size, len(data))
        deadline.check("after the last frame")
    except (DecodeError, GeneratorExit):
        raise
    except MemoryError as e:
        raise ImageTooLargeError(f"ran out of memory decoding the {what}", name) from e
    except Exception as e:  # PyAV/FFmpeg can raise more than FFmpegError on hostile input
        raise TruncatedImageError(f"{what} could not be decoded ({type(e).__name__}: {one_line(e)})", name) from e
    finally:
        if clip is not None:
            clip.close()


@contextlib.contextmanager
def _paused(deadline: Deadline) -> Iterator[None]:
    """Stop the clocks while the caller holds a chunk: its work between chunks (embedding them, in this thread) is not
    decoding time."""
    cpu, wall = time.thread_time(), time.monotonic()
    try:
        yield
    finally:
        deadline.cpu_start += time.thread_time() - cpu
        deadline.wall_start += time.monotonic() - wall


def _reduced_area(size: tuple[int, int], target_size: int | None) -> int:
    w, h = _reduced(size, target_size)
    return w * h


def _result(chunk: list[tuple[int, float, Image.Image]], sha: str, clip: _Clip, size: tuple[int, int],
            nbytes: int) -> Decoded:
    return Decoded(
        frames=tuple(im for _, _, im in chunk),
        frame_indices=tuple(p for p, _, _ in chunk),
        sha256=sha,
        format=clip.kind,
        size=size,
        n_frames=len(clip.pts),
        nbytes=nbytes,
        source=clip.name,
        backgrounds=(None,) * len(chunk),
        timestamps=tuple(t for _, t, _ in chunk),
        duration_s=clip.duration_s,
        sampling=clip.sampling,
    )


def decode_video(
    data: bytes, kind: str, name: str, limits: DecodeLimits, target_size: int | None, deadline: Deadline
) -> Decoded:
    """Every sampled frame of a video in one :class:`Decoded`."""
    parts = list(video_chunks(data, kind, name, limits, target_size, deadline, chunk_frames=limits.sample_frames))
    first = parts[0]
    if len(parts) == 1:
        return first
    return Decoded(
        frames=tuple(f for p in parts for f in p.frames),
        frame_indices=tuple(i for p in parts for i in p.frame_indices),
        sha256=first.sha256, format=first.format, size=first.size, n_frames=first.n_frames, nbytes=first.nbytes,
        source=first.source, backgrounds=tuple(b for p in parts for b in p.backgrounds),
        timestamps=tuple(t for p in parts for t in p.timestamps), duration_s=first.duration_s, sampling=first.sampling,
    )
