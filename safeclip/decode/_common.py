"""What every decode backend shares: the limits, the result, the time budget and reading the input's bytes."""

from __future__ import annotations

import math
import os
import re
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
from PIL import Image, features

from ..errors import (
    ConfigError,
    DecodeError,
    DecodeTimeoutError,
    ImageTooLargeError,
    UnsupportedFormatError,
)
from ..errors import one_line as errors_one_line

__all__ = ["ALLOWED_FORMATS", "DECODER_VERSION", "OPENERS", "RGB", "Deadline", "DecodeLimits", "Decoded", "Source",
           "check_background", "one_line", "read_source", "sample_positions", "sampling_text"]

Source = Union[str, "os.PathLike[str]", "os.PathLike[bytes]", bytes, bytearray, memoryview, Any]
"""What :func:`decode` accepts: a path, bytes-like, a binary file object, a PIL image or a numpy array."""


DECODER_VERSION = 4
"""Bump when decoding can give other pixels or other errors for the same bytes (limits, mode handling, sampling).
Cached decode failures record it with Pillow's version and the limits, so a bump re-decodes them."""


def _allowed_formats() -> tuple[str, ...]:
    Image.init()  # register every bundled plugin once, at import, so OPEN below is complete
    wanted = ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"]
    if features.check("avif"):
        wanted.append("AVIF")
    wanted.append("HEIF")  # only present when a plugin (pillow-heif) registered it before safeclip was imported
    # MPO has no opener of its own: the JPEG opener returns an MpoImageFile. Keep it for im.format checks.
    return tuple(f for f in wanted if f in Image.OPEN or f == "MPO")


ALLOWED_FORMATS: tuple[str, ...] = _allowed_formats()
"""Pillow format names :func:`decode` accepts (``im.format`` values)."""

OPENERS: tuple[str, ...] = tuple(f for f in ALLOWED_FORMATS if f in Image.OPEN)
"""The only openers Pillow may try (MPO files come from the JPEG opener)."""

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class DecodeLimits:
    """Resource limits for one :func:`decode` call, and the backgrounds transparency is judged on.

    ``max_bytes``: input size; ``max_pixels``: width*height of any frame, checked from the header before pixels are
    decoded; ``max_frames``: frames in an image file (an animation's frames, a TIFF's pages); ``sample_frames``: the
    cap on the frames returned from an animation or a video (see ``frames_per_second``); ``timeout_s``: the time budget in CPU seconds of the decoding thread
    (``time.thread_time``), so that a busy machine, which only slows a decode down, does not fail it; checked between
    steps and frames, and between the frames decoded on the way to a sampled one; ``wall_timeout_s``: a wall-clock
    backstop, checked at the same points, against a decode whose time is not on its thread's CPU clock (a codec that
    waits, or works in threads of its own); ``None``: 10 x ``timeout_s``, far beyond what load alone does to a decode
    within its CPU budget; ``max_total_pixels``: width*height summed over the frames
    :func:`decode` returns (one per background for a frame with transparency), after the reduction ``target_size``
    allows, checked from the header before any frame is decoded and again as frames are added.

    Time-based sampling (animated GIF/WebP/APNG and video): one frame per ``1 / frames_per_second`` seconds (the
    frame showing at each instant), the first and the last frame always included; when that makes more than
    ``sample_frames``, ``sample_frames`` instants spread evenly from the first frame to the last instead. Pages
    without a time (MPO, multi-page TIFF) are sampled evenly by index, at most ``sample_frames``.
    ``max_duration_s``: the longest animation or clip, from the header and again from the real timestamps (a header
    that understates the length does not get past); ``max_video_frames``: frames in a video stream (the header's
    count, then the packets themselves). Video inputs obey ``max_bytes`` too: raise it for long clips.

    ``backgrounds``: the colours a frame with real (not fully opaque) alpha is composited on, one returned frame
    each, so that content that vanishes on one background (white on a transparent canvas, shown on white) is seen on
    another. The default is a light and a dark page.
    """

    max_bytes: int = 64 * 2**20
    max_pixels: int = 64_000_000
    max_frames: int = 1000
    sample_frames: int = 32
    timeout_s: float = 10.0
    max_total_pixels: int = 128_000_000
    backgrounds: tuple[RGB, ...] = ((255, 255, 255), (0, 0, 0))
    wall_timeout_s: float | None = None
    frames_per_second: float = 1.0
    max_duration_s: float = 3600.0
    max_video_frames: int = 216_000

    @property
    def wall_budget_s(self) -> float:
        """The wall-clock backstop in seconds: ``wall_timeout_s``, else ``10 x timeout_s``."""
        wall = self.wall_timeout_s
        return float(_WALL_BACKSTOP * self.timeout_s if wall is None else wall)

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels", "max_frames", "sample_frames", "max_total_pixels", "max_video_frames"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"DecodeLimits.{name} must be a positive int, got {value!r}")
        t = self.timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            raise ConfigError(f"DecodeLimits.timeout_s must be a positive number, got {t!r}")
        wall = self.wall_timeout_s
        if wall is not None and (isinstance(wall, bool) or not isinstance(wall, (int, float)) or not wall >= t):
            raise ConfigError(
                f"DecodeLimits.wall_timeout_s must be None or a number of seconds >= timeout_s ({t!r}), got {wall!r}"
            )
        for name in ("frames_per_second", "max_duration_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ConfigError(f"DecodeLimits.{name} must be a positive finite number, got {value!r}")
        bgs = self.backgrounds
        if isinstance(bgs, (str, bytes)) or not isinstance(bgs, (tuple, list)) or not bgs:
            raise ConfigError(f"DecodeLimits.backgrounds must be a non-empty tuple of (r, g, b) colours, got {bgs!r}")
        object.__setattr__(self, "backgrounds", tuple(dict.fromkeys(check_background(b) for b in bgs)))


@dataclass(frozen=True)
class Decoded:
    """The result of :func:`decode`.

    ``frames`` are RGB, loaded, EXIF-oriented views of the sampled frames; ``frame_indices`` gives each one's frame
    index in the file and ``backgrounds`` the colour it was composited on: ``None`` for an opaque frame (one view),
    else one view per colour of :attr:`DecodeLimits.backgrounds` (so an index repeats). With a ``target_size`` the
    views may be smaller than the image. ``size`` is the (width, height) of the first frame, oriented, before any
    reduction (the frames of an animation share it; the pages of an MPO/TIFF may not). ``sha256`` is of the input
    bytes, or for PIL/ndarray inputs of mode + size + raw pixels. ``nbytes`` is 0 for in-memory inputs.

    Animations and videos: ``timestamps`` gives each view's time in seconds from the first frame (``()`` for stills
    and for pages without a time: MPO, TIFF), ``duration_s`` the length of the animation or clip (``None`` for
    stills), ``sampling`` how the frames were chosen, in words (e.g. ``"1 fps, at most 32 frames, first and last
    included"``). For a video, ``format`` is the container (``"MP4"``, ``"MOV"``, ``"WEBM"``, ``"MKV"``),
    ``frame_indices`` are frame numbers in presentation order and ``n_frames`` the frames in the stream.
    """

    frames: tuple[Image.Image, ...]
    frame_indices: tuple[int, ...]
    sha256: str
    format: str
    size: tuple[int, int]
    n_frames: int
    nbytes: int
    source: str | None
    backgrounds: tuple[RGB | None, ...]
    timestamps: tuple[float, ...] = ()
    duration_s: float | None = None
    sampling: str | None = None


_WALL_BACKSTOP = 10
"""``DecodeLimits.wall_timeout_s`` when it is None, in multiples of ``timeout_s``."""


class Deadline:
    """The CPU-time budget of the decoding thread, and the wall-clock backstop. A decode runs in one thread, and
    Pillow's codecs run in the calling thread, so ``time.thread_time`` counts the decode's own work and nothing that
    other threads or processes do while it waits for a CPU."""

    __slots__ = ("budget", "cpu_start", "name", "wall_budget", "wall_start")

    def __init__(self, limits: DecodeLimits, name: str | None):
        self.cpu_start = time.thread_time()
        self.wall_start = time.monotonic()
        self.budget = float(limits.timeout_s)
        self.wall_budget = limits.wall_budget_s
        self.name = name

    def check(self, step: str) -> None:
        cpu = time.thread_time() - self.cpu_start
        if cpu > self.budget:
            raise DecodeTimeoutError(
                f"decoding used {cpu:.2f}s of CPU time, over the {self.budget:g}s CPU budget "
                f"(DecodeLimits.timeout_s) ({step})", self.name
            )
        wall = time.monotonic() - self.wall_start
        if wall > self.wall_budget:
            raise DecodeTimeoutError(
                f"decoding took {wall:.2f}s of wall-clock time ({cpu:.2f}s of CPU), over the {self.wall_budget:g}s "
                f"wall-clock backstop (DecodeLimits.wall_timeout_s): the decoder is stalled ({step})", self.name
            )


def one_line(e: BaseException, limit: int = 200) -> str:
    """:func:`safeclip.errors.one_line`, with a file object's repr (``<_io.BytesIO object at 0x...>``) as ``<data>``."""
    return errors_one_line(re.sub(r"<_io\.\w+ object at 0x[0-9a-f]+>", "<data>", errors_one_line(e)), limit)


# ----------------------------------------------------------------------------------------------------------------
# Reading the input


def _read_limited(f: Any, max_bytes: int, name: str, size_hint: int | None = None) -> bytes:
    """Read ``f`` to EOF, but never more than ``max_bytes + 1`` bytes."""
    buf = bytearray()
    first = True
    while len(buf) <= max_bytes:
        want = max_bytes + 1 - len(buf)
        if first and size_hint is not None:
            want = min(want, size_hint + 1)
        else:
            want = min(want, 1 << 20)
        first = False
        chunk = f.read(want)
        if chunk is None:
            raise DecodeError("file object is non-blocking and returned no data", name)
        if isinstance(chunk, str):
            raise DecodeError("file object is in text mode; open it in binary mode ('rb')", name)
        if not chunk:
            break
        buf += chunk
    if len(buf) > max_bytes:
        raise ImageTooLargeError(f"input is larger than the {max_bytes}-byte limit", name)
    return bytes(buf)


_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_OPEN_FLAGS = _O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def _require_regular(mode: int, name: str) -> None:
    if not stat.S_ISREG(mode):
        kind = next((k for test, k in _FILE_KINDS if test(mode)), "an unknown kind of file")
        raise UnsupportedFormatError(f"is {kind}, not a regular file; only regular files are decoded", name)


def read_source(source: Source, *, max_bytes: int | None = None) -> tuple[bytes | None, str]:
    """Return ``(data, name)`` for an input: the bytes of a path, bytes-like or binary file object (read from its
    current position), or ``(None, "<PIL>")`` / ``(None, "<ndarray>")`` for in-memory images.

    At most ``max_bytes + 1`` bytes are read (a larger file is refused from its size alone); more ->
    :class:`ImageTooLargeError`. A missing or unreadable file -> :class:`DecodeError`; a path to anything but a
    regular file (a directory, FIFO, socket or device) -> :class:`UnsupportedFormatError`, before it is opened.

    >>> read_source(b"abc")
    (b'abc', '<bytes>')
    """
    if max_bytes is None:
        max_bytes = DecodeLimits.max_bytes
    if isinstance(source, Image.Image):
        return None, "<PIL>"
    if isinstance(source, np.ndarray):
        return None, "<ndarray>"
    if isinstance(source, (bytes, bytearray, memoryview)):
        name = "<bytes>"
        n = source.nbytes if isinstance(source, memoryview) else len(source)
        if n > max_bytes:
            raise ImageTooLargeError(f"input is {n} bytes, over the {max_bytes}-byte limit", name)
        if isinstance(source, bytes):
            return source, name
        return (source.tobytes() if isinstance(source, memoryview) else bytes(source)), name
    if isinstance(source, (str, os.PathLike)):
        try:
            name = os.fsdecode(os.fspath(source))
        except (TypeError, ValueError) as e:
            raise DecodeError(f"invalid path: {one_line(e)}", repr(source)) from e
        try:
            # Only regular files: opening a FIFO blocks until a writer comes (no time budget can interrupt it), and
            # opening a device can act on it. Check before opening, and again on the open descriptor (which O_NONBLOCK
            # keeps from blocking) in case the path was swapped in between.
            _require_regular(os.stat(source).st_mode, name)
            fd = os.open(source, os.O_RDONLY | _OPEN_FLAGS)
            with open(fd, "rb") as f:
                st = os.fstat(fd)
                _require_regular(st.st_mode, name)
                if _OPEN_FLAGS & _O_NONBLOCK:
                    os.set_blocking(fd, True)
                if st.st_size > max_bytes:
                    raise ImageTooLargeError(f"file is {st.st_size} bytes, over the {max_bytes}-byte limit", name)
                return _read_limited(f, max_bytes, name, st.st_size), name
        except DecodeError:
            raise
        except FileNotFoundError as e:
            raise DecodeError("file not found", name) from e
        except IsADirectoryError as e:
            raise UnsupportedFormatError("is a directory, not a regular file", name) from e
        except PermissionError as e:
            raise DecodeError("permission denied", name) from e
        except (OSError, ValueError) as e:
            raise DecodeError(f"cannot read file: {one_line(e)}", name) from e
    if callable(getattr(source, "read", None)):
        fname = getattr(source, "name", None)
        name = fname if isinstance(fname, str) and fname else "<file>"
        try:
            return _read_limited(source, max_bytes, name), name
        except DecodeError:
            raise
        except Exception as e:  # a user's file-like object can raise anything
            raise DecodeError(f"cannot read file object: {type(e).__name__}: {one_line(e)}", name) from e
    raise UnsupportedFormatError(
        f"cannot decode a {type(source).__name__}: expected a path, bytes, a binary file object, "
        "a PIL image or a numpy array",
        f"<{type(source).__name__}>",
    )



def check_background(background: Any) -> tuple[int, int, int]:
    try:
        bg = tuple(int(c) for c in background)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"background must be an (r, g, b) tuple of ints, got {background!r}") from e
    if len(bg) != 3 or not all(0 <= c <= 255 for c in bg):
        raise ConfigError(f"background must be an (r, g, b) tuple of ints in 0..255, got {background!r}")
    return bg  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------------------
# Time-based sampling (animations and video)

_EPS = 1e-6


def sample_positions(starts: Sequence[float], limits: DecodeLimits) -> tuple[list[int], bool]:
    """The frames to sample from frames starting at ``starts`` (seconds, non-decreasing, the first at 0): the frame showing at every ``1 / limits.frames_per_second`` seconds, and the last frame;
    when that is more than ``limits.sample_frames``, that many instants spread evenly from the first frame's start to
    the last's. Returns (sorted frame positions, whether the cap spread them).

    >>> sample_positions([0.0, 0.5, 1.0, 1.5, 2.0, 2.5], DecodeLimits())
    ([0, 2, 4, 5], False)
    >>> sample_positions([0.0, 0.5, 1.0, 1.5, 2.0, 2.5], DecodeLimits(sample_frames=2))
    ([0, 5], True)
    """
    n, cap = len(starts), limits.sample_frames
    last = float(starts[-1])
    if n == 1 or cap == 1:
        return [0], n > 1
    step = 1.0 / limits.frames_per_second
    k = math.floor(last / step + _EPS) + 1  # instants 0, step, 2 step, ... up to the last frame's start
    spread = k + (1 if last > (k - 1) * step + _EPS else 0) > cap
    instants = np.linspace(0.0, last, cap) if spread else np.arange(k) * step
    pos = np.searchsorted(np.asarray(starts, dtype=np.float64), instants + _EPS, side="right") - 1
    picked = {int(p) for p in np.clip(pos, 0, n - 1)} | {0, n - 1}
    return sorted(picked), spread


def sampling_text(limits: DecodeLimits, spread: bool, duration_s: float) -> str:
    """``Decoded.sampling`` for time-based sampling, e.g. ``"1 fps, at most 32 frames, first and last included"``."""
    text = f"{limits.frames_per_second:g} fps, at most {limits.sample_frames} frames, first and last included"
    if spread:
        text += f" (spread evenly over {duration_s:.3g} s)"
    return text
