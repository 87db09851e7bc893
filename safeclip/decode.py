"""Decode untrusted image inputs into RGB frames, safely.

:func:`decode` accepts a path, bytes, a binary file object, a ``PIL.Image.Image`` or a numpy array and returns a
:class:`Decoded`: RGB, fully loaded PIL frames with EXIF orientation applied and transparency composited on a fixed
background. Only the formats in :data:`ALLOWED_FORMATS` are ever handed to Pillow (never EPS/PS/PDF or anything
that runs an external program). Byte, pixel (checked from the header, before any pixel is decoded), frame and time
limits come from :class:`DecodeLimits`. Every failure is a :class:`~safeclip.errors.DecodeError` subclass with a
one-line reason naming the input; nothing else escapes for any byte input.

The module keeps no shared mutable state and never changes Pillow's process-wide settings
(``Image.MAX_IMAGE_PIXELS``, ``ImageFile.LOAD_TRUNCATED_IMAGES``, warning filters), so it is safe to call from many
threads and from multiprocessing workers. The one process-wide change is libtiff's message handlers (see
:class:`_LibtiffMessages`): a message libtiff reports while :func:`decode` runs in a thread becomes part of that
file's error instead of a line on stderr; messages from anywhere else go to the handler that was there before.
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import io
import os
import re
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError, features

from .errors import (
    ConfigError,
    DecodeError,
    DecodeTimeoutError,
    ImageTooLargeError,
    TruncatedImageError,
    UnsupportedFormatError,
)

__all__ = ["ALLOWED_FORMATS", "DECODER_VERSION", "DecodeLimits", "Decoded", "decode", "read_source"]

Source = Union[str, "os.PathLike[str]", "os.PathLike[bytes]", bytes, bytearray, memoryview, Any]
"""What :func:`decode` accepts: a path, bytes-like, a binary file object, a PIL image or a numpy array."""


DECODER_VERSION = 3
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

_OPENERS: tuple[str, ...] = tuple(f for f in ALLOWED_FORMATS if f in Image.OPEN)
"""The only openers Pillow may try (MPO files come from the JPEG opener)."""

_ORIENTATION_TAG = int(ExifTags.Base.Orientation)
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}  # the same table as PIL.ImageOps.exif_transpose
_SWAPS_AXES = frozenset({Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE, Image.Transpose.ROTATE_90,
                         Image.Transpose.ROTATE_270})
_STALE_INFO_KEYS = frozenset({"exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp", "transparency"})
_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})

# Formats Pillow has no opener for (or that are not registered here), for naming rejected inputs.
_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"%PDF", "PDF"),
    (0, b"%!PS", "PostScript"),
    (0, b"PK\x03\x04", "ZIP archive"),
    (0, b"\x1f\x8b", "gzip data"),
    (0, b"\x7fELF", "ELF executable"),
    (0, b"MZ", "Windows executable"),
    (0, b"\xff\x0a", "JPEG XL"),
    (0, b"\x00\x00\x00\x0cJXL ", "JPEG XL"),
    (0, b"v/1\x01", "OpenEXR"),
    (0, b"#?RADIANCE", "Radiance HDR"),
    (0, b"<svg", "SVG"),
    (0, b"<?xml", "XML/SVG"),
    (0, b"<!DOCTYPE", "HTML/XML text"),
    (0, b"<html", "HTML"),
    (0, b"\x89HDF", "HDF5"),
    (0, b"RIFF", "RIFF container (not WebP)"),
)
_HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1")


_RGB = tuple[int, int, int]


@dataclass(frozen=True)
class DecodeLimits:
    """Resource limits for one :func:`decode` call, and the backgrounds transparency is judged on.

    ``max_bytes``: input size; ``max_pixels``: width*height of any frame, checked from the header before pixels are
    decoded; ``max_frames``: frames in the file; ``sample_frames``: how many frames of an animation to return (evenly
    spaced, first and last included); ``timeout_s``: the time budget in CPU seconds of the decoding thread
    (``time.thread_time``), so that a busy machine, which only slows a decode down, does not fail it; checked between
    steps and frames, and between the frames decoded on the way to a sampled one; ``wall_timeout_s``: a wall-clock
    backstop, checked at the same points, against a decode whose time is not on its thread's CPU clock (a codec that
    waits, or works in threads of its own); ``None``: 10 x ``timeout_s``, far beyond what load alone does to a decode
    within its CPU budget; ``max_total_pixels``: width*height summed over the frames
    :func:`decode` returns (one per background for a frame with transparency), after the reduction ``target_size``
    allows, checked from the header before any frame is decoded and again as frames are added.

    ``backgrounds``: the colours a frame with real (not fully opaque) alpha is composited on, one returned frame
    each, so that content that vanishes on one background (white on a transparent canvas, shown on white) is seen on
    another. The default is a light and a dark page.
    """

    max_bytes: int = 64 * 2**20
    max_pixels: int = 64_000_000
    max_frames: int = 1000
    sample_frames: int = 8
    timeout_s: float = 10.0
    max_total_pixels: int = 128_000_000
    backgrounds: tuple[_RGB, ...] = ((255, 255, 255), (0, 0, 0))
    wall_timeout_s: float | None = None

    @property
    def wall_budget_s(self) -> float:
        """The wall-clock backstop in seconds: ``wall_timeout_s``, else ``10 x timeout_s``."""
        wall = self.wall_timeout_s
        return float(_WALL_BACKSTOP * self.timeout_s if wall is None else wall)

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels", "max_frames", "sample_frames", "max_total_pixels"):
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
        bgs = self.backgrounds
        if isinstance(bgs, (str, bytes)) or not isinstance(bgs, (tuple, list)) or not bgs:
            raise ConfigError(f"DecodeLimits.backgrounds must be a non-empty tuple of (r, g, b) colours, got {bgs!r}")
        object.__setattr__(self, "backgrounds", tuple(dict.fromkeys(_check_background(b) for b in bgs)))


@dataclass(frozen=True)
class Decoded:
    """The result of :func:`decode`.

    ``frames`` are RGB, loaded, EXIF-oriented views of the sampled frames; ``frame_indices`` gives each one's frame
    index in the file and ``backgrounds`` the colour it was composited on: ``None`` for an opaque frame (one view),
    else one view per colour of :attr:`DecodeLimits.backgrounds` (so an index repeats). With a ``target_size`` the
    views may be smaller than the image. ``size`` is the (width, height) of the first frame, oriented, before any
    reduction (the frames of an animation share it; the pages of an MPO/TIFF may not). ``sha256`` is of the input
    bytes, or for PIL/ndarray inputs of mode + size + raw pixels. ``nbytes`` is 0 for in-memory inputs.
    """

    frames: tuple[Image.Image, ...]
    frame_indices: tuple[int, ...]
    sha256: str
    format: str
    size: tuple[int, int]
    n_frames: int
    nbytes: int
    source: str | None
    backgrounds: tuple[_RGB | None, ...]


_WALL_BACKSTOP = 10
"""``DecodeLimits.wall_timeout_s`` when it is None, in multiples of ``timeout_s``."""


class _Deadline:
    """The CPU-time budget of the decoding thread, and the wall-clock backstop. A decode runs in one thread, and
    Pillow's codecs run in the calling thread, so ``time.thread_time`` counts the decode's own work and nothing that
    other threads or processes do while it waits for a CPU."""

    __slots__ = ("cpu_start", "wall_start", "budget", "wall_budget", "name")

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


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = re.sub(r"\s+", " ", str(e)).strip()
    text = re.sub(r"<_io\.\w+ object at 0x[0-9a-f]+>", "<data>", text)
    if not text:
        text = type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
            raise DecodeError(f"invalid path: {_one_line(e)}", repr(source)) from e
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
            raise DecodeError(f"cannot read file: {_one_line(e)}", name) from e
    if callable(getattr(source, "read", None)):
        fname = getattr(source, "name", None)
        name = fname if isinstance(fname, str) and fname else "<file>"
        try:
            return _read_limited(source, max_bytes, name), name
        except DecodeError:
            raise
        except Exception as e:  # a user's file-like object can raise anything
            raise DecodeError(f"cannot read file object: {type(e).__name__}: {_one_line(e)}", name) from e
    raise UnsupportedFormatError(
        f"cannot decode a {type(source).__name__}: expected a path, bytes, a binary file object, "
        "a PIL image or a numpy array",
        f"<{type(source).__name__}>",
    )


# ----------------------------------------------------------------------------------------------------------------
# Pixels to RGB


def _composite(rgba: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    out = Image.new("RGB", rgba.size, background)
    out.paste(rgba, (0, 0), rgba)  # blends with the alpha band of rgba as mask
    return out


def _gray8(gray: np.ndarray, alpha: np.ndarray | None) -> Image.Image:
    g = Image.fromarray(np.ascontiguousarray(gray, dtype=np.uint8))
    if alpha is None:
        return g.convert("RGB")
    a = Image.fromarray(np.ascontiguousarray(alpha, dtype=np.uint8))
    return Image.merge("RGBA", (g, g, g, a))


def _int_to_u8(arr: np.ndarray) -> np.ndarray:
    """32-bit integer pixels to 8 bits by their value range: 0..255 as is, 0..65535 as 16-bit (>> 8), else min-max."""
    lo, hi = int(arr.min()), int(arr.max())
    if lo >= 0 and hi <= 255:
        return arr.astype(np.uint8)
    if lo >= 0 and hi <= 65535:
        return (arr >> 8).astype(np.uint8)
    if hi == lo:  # a constant image outside 0..65535
        return np.full(arr.shape, 0 if lo < 0 else 255, np.uint8)
    scaled = (arr.astype(np.float32) - np.float32(lo)) * np.float32(255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _float_to_u8(arr: np.ndarray) -> np.ndarray:
    """Float pixels to 8 bits by their value range: [0, 1] and [0, 255] as such, else min-max. NaN/inf -> 0."""
    a = np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(a.min()), float(a.max())
    if lo >= 0.0 and hi <= 1.0:
        a *= 255.0
    elif lo >= 0.0 and hi <= 255.0:
        pass
    elif hi == lo:  # a constant image outside 0..255
        a = np.full(a.shape, 0.0 if lo < 0 else 255.0, np.float32)
    else:
        a = (a - lo) * np.float32(255.0 / (hi - lo))
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _transparency_mask(arr: np.ndarray, trns: Any) -> np.ndarray | None:
    if isinstance(trns, (int, np.integer)):
        return np.where(arr == int(trns), 0, 255).astype(np.uint8)
    return None


def _to_base(im: Image.Image) -> Image.Image:
    """A loaded frame in any Pillow mode -> an "RGB" image, or "RGBA" where it has transparency data; new, except
    an RGBA frame, returned as it is."""
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im.copy()
    if mode in _SIXTEEN_BIT:
        arr = np.asarray(im).astype(np.uint16, copy=False)
        return _gray8(arr >> 8, _transparency_mask(arr, im.info.get("transparency")))
    if mode == "I":
        arr = np.asarray(im)
        return _gray8(_int_to_u8(arr), _transparency_mask(arr, im.info.get("transparency")))
    if mode == "F":
        return _gray8(_float_to_u8(np.asarray(im)), None)
    if mode == "La":  # premultiplied LA: Pillow has no converter for it
        arr = np.asarray(im).astype(np.float32)
        a = arr[..., 1]
        g = np.where(a > 0, arr[..., 0] * 255.0 / np.maximum(a, 1), 0)
        return _gray8(np.clip(np.rint(g), 0, 255), a)
    if mode == "RGBA":  # no copy: every path from here makes new images (reduced, composited or converted)
        return im
    if im.has_transparency_data:
        return im.convert("RGBA")
    return im.convert("RGB")


def _orientation(im: Image.Image) -> int:
    """EXIF orientation (1..8) of the current frame; 1 if absent or unreadable (a broken EXIF never fails)."""
    try:
        value = im.getexif().get(_ORIENTATION_TAG, 1)
        return int(value) if value in _TRANSPOSE else 1
    except Exception:
        return 1


def _reduction(size: tuple[int, int], target_size: int | None) -> int:
    """The integer reduction factor that keeps the shorter side at least twice ``target_size`` (1: none).

    Twice the target is what the fast pixel path (``reducing_gap=2``) reduces to anyway, so the model sees nearly the
    same pixels; decode only does it earlier, frame by frame, so that no sampled frame is held at full canvas size.
    """
    if target_size is None:
        return 1
    return max(1, min(size) // (2 * target_size))


def _reduced_size(size: tuple[int, int], factor: int) -> tuple[int, int]:
    return (max(1, round(size[0] / factor)), max(1, round(size[1] / factor)))


def _shrink(im: Image.Image, factor: int) -> Image.Image:
    # A box filter over the exact source geometry: Image.reduce rounds the size up and averages a partial last block,
    # a sub-pixel shift that the later resize to the model's input turns into visible differences on sharp edges.
    return im.resize(_reduced_size(im.size, factor), Image.Resampling.BOX)


def _frame_base(
    im: Image.Image, size: tuple[int, int], target_size: int | None
) -> tuple[Image.Image, tuple[int, int], bool]:
    """A loaded frame -> (an RGB or RGBA image, reduced for ``target_size`` and EXIF-oriented; ``size`` (the
    frame's size before any reduction) oriented; whether its alpha is real, i.e. not fully opaque). The image is new
    unless it has real alpha (then only views composited from it are kept)."""
    method = _TRANSPOSE.get(_orientation(im))
    factor = _reduction(im.size, target_size)
    alpha = False
    if im.mode == "RGB" and "transparency" not in im.info:  # the common case: one new image, not a copy first
        out = _shrink(im, factor) if factor > 1 else (im.copy() if method is None else im)
    else:
        out = _to_base(im)
        if out.mode == "RGBA":
            alpha = out.getextrema()[3][0] < 255  # on the full frame: a reduction would blur a few clear pixels
            if not alpha:  # fully opaque: the same on every background
                out = out.convert("RGB")
        if factor > 1:
            out = _shrink(out, factor)
    if method is not None:
        out = out.transpose(method)
    if method in _SWAPS_AXES:
        size = (size[1], size[0])
    if out is not im:  # only an RGBA frame with alpha can still be ``im``: its views are new, composited images
        # Orientation and transparency are applied: drop their metadata (a later exif_transpose must not rotate twice).
        out.info = {k: v for k, v in out.info.items() if k not in _STALE_INFO_KEYS}
    return out, size, alpha


def _sample_indices(n_frames: int, k: int) -> list[int]:
    k = min(k, n_frames)
    if k <= 1:
        return [0]
    return [int(i) for i in np.unique(np.round(np.linspace(0, n_frames - 1, k)).astype(np.int64))]


# ----------------------------------------------------------------------------------------------------------------
# libtiff's messages

_TIFF_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p)
"""libtiff's ``TIFFErrorHandler`` / ``TIFFWarningHandler``: ``void (const char *module, const char *fmt, va_list)``;
a ``va_list`` argument is passed as a pointer on the ABIs Pillow's wheels are built for."""


def _loaded_libtiffs() -> list[str]:
    """The libtiff shared libraries Pillow uses: those mapped into this process (Linux), or bundled with the wheel
    (macOS). Empty where libtiff is linked into Pillow itself (Windows wheels): its messages then stay as they are."""
    paths: list[str] = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(None, 5)  # address, perms, offset, device, inode[, path]
                base = os.path.basename(fields[5].strip()) if len(fields) == 6 else ""
                if base.startswith(("libtiff.", "libtiff-")):
                    paths.append(fields[5].strip())
    except OSError:
        pass
    bundled = Path(Image.__file__).resolve().parent
    for folder in (bundled / ".dylibs", bundled.parent / "pillow.libs"):
        paths += sorted(str(p) for p in folder.glob("libtiff*"))
    return list(dict.fromkeys(os.path.realpath(p) for p in paths if os.path.isfile(p)))


class _LibtiffMessages:
    """Keep libtiff's messages off stderr. libtiff reports a file's problems by printing them from C (``tempfile.tif:
    WEBP compression support is not configured.``, naming the in-memory file Pillow hands it), where no Python
    setting reaches. Its error and warning handlers are replaced once, process-wide, by one that, in a thread inside
    :func:`decode` (:meth:`capture`), keeps the error messages for that file's DecodeError and drops the warnings,
    and elsewhere passes every message unchanged to the handler that was there before."""

    def __init__(self) -> None:
        self.local = threading.local()
        self._restore: list[tuple[Any, int | None]] = []
        self._keep: list[Any] = []  # the C callbacks must outlive every call libtiff makes to them
        try:
            self._install()
        except Exception:  # no libtiff or no C library found: libtiff keeps its own handlers
            pass

    def _install(self) -> None:
        libs = _loaded_libtiffs()
        if not libs:
            return
        vsnprintf = ctypes.CDLL(None).vsnprintf
        vsnprintf.argtypes = (ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p)
        vsnprintf.restype = ctypes.c_int
        atexit.register(self._uninstall)  # before module teardown frees the callbacks
        for path in libs:
            lib = ctypes.CDLL(path)
            for setter_name, keep in (("TIFFSetErrorHandler", True), ("TIFFSetWarningHandler", False)):
                setter = getattr(lib, setter_name)
                setter.argtypes, setter.restype = (ctypes.c_void_p,), ctypes.c_void_p
                forward: list[Any] = [None]
                callback = _TIFF_HANDLER(self._handler(keep, vsnprintf, forward))
                self._keep.append(callback)
                previous = setter(ctypes.cast(callback, ctypes.c_void_p))
                forward[0] = _TIFF_HANDLER(previous) if previous else None
                self._restore.append((setter, previous))

    def _handler(self, keep: bool, vsnprintf: Any, forward: list[Any]) -> Any:
        def handler(module: bytes | None, fmt: bytes | None, ap: int | None) -> None:
            try:
                messages = getattr(self.local, "messages", None)
                if messages is None:  # not inside decode() in this thread: as if we were not here
                    if forward[0] is not None:
                        forward[0](module, fmt, ap)
                elif keep and fmt is not None and len(messages) < 4:
                    buf = ctypes.create_string_buffer(300)
                    vsnprintf(buf, len(buf), fmt, ap)
                    messages.append(buf.value.decode("utf-8", "replace").strip().rstrip("."))
            except BaseException:  # noqa: BLE001 - nothing may propagate into C
                pass

        return handler

    def _uninstall(self) -> None:
        for setter, previous in reversed(self._restore):
            try:
                setter(previous)
            except Exception:
                pass
        self._restore.clear()

    @contextmanager
    def capture(self) -> Iterator[list[str]]:
        """Collect the error messages libtiff reports in this thread until the block ends."""
        outer = getattr(self.local, "messages", None)
        messages: list[str] = []
        self.local.messages = messages
        try:
            yield messages
        finally:
            self.local.messages = outer


_LIBTIFF = _LibtiffMessages()


# ----------------------------------------------------------------------------------------------------------------
# Errors


def _classify(e: BaseException, what: str, name: str | None, libtiff: list[str] | None = None) -> DecodeError:
    """Map an exception raised by Pillow / zlib / a codec to the right DecodeError; ``libtiff``: the messages libtiff
    reported meanwhile (Pillow's own exception then only says "decoder error -2")."""
    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return ImageTooLargeError(f"{what} is a decompression bomb: {_one_line(e)}", name)
    if isinstance(e, MemoryError):
        return ImageTooLargeError(f"ran out of memory decoding {what}", name)
    reason = _one_line(e)
    if libtiff:
        reason = _one_line(ValueError(f"{reason} (libtiff: {'; '.join(dict.fromkeys(libtiff))})"), 300)
    low = reason.lower()
    if "too large" in low or "exceeds limit" in low or "too many" in low:
        return ImageTooLargeError(f"{what} is too large: {reason}", name)
    if "unsupported" in low or "not supported" in low or "not available" in low or "not configured" in low:
        return UnsupportedFormatError(f"{what} uses a feature Pillow cannot decode: {reason}", name)
    if isinstance(e, EOFError) or "truncated" in low or "end of file" in low or "premature" in low:
        return TruncatedImageError(f"{what} is truncated: {reason}", name)
    return TruncatedImageError(f"{what} is corrupt ({type(e).__name__}: {reason})", name)


def _accepts(accept: Any, prefix: bytes) -> bool | str:
    if accept is None:
        return False
    try:
        result = accept(prefix)
    except Exception:
        return False
    return result if isinstance(result, str) else bool(result)


def _guess_allowed(data: bytes) -> str | None:
    """The allowed format whose signature ``data`` carries, if any (for error messages)."""
    for fmt in _OPENERS:
        if _accepts(Image.OPEN[fmt][1], data[:16]):
            return fmt
    return None


def _unidentified(data: bytes, name: str) -> DecodeError:
    """Explain why Pillow could not open ``data`` with the allowed openers."""
    allowed = ", ".join(ALLOWED_FORMATS)
    prefix = data[:16]
    # 1. Looks like an allowed format: the opener rejected its header. Re-run it once to learn why.
    for fmt in _OPENERS:
        factory, accept = Image.OPEN[fmt]
        ok = _accepts(accept, prefix)
        if isinstance(ok, str):
            return UnsupportedFormatError(f"{fmt} file, but {ok}", name)
        if ok and factory is not None:
            try:
                factory(io.BytesIO(data), "")
            except Exception as e:
                return _classify(e, f"{fmt} header", name)
            return TruncatedImageError(f"{fmt} file that Pillow could not identify", name)
    # 2. Something Pillow recognises but we do not allow (EPS, PSD, JPEG 2000, ICO, ...).
    for fmt, (_factory, accept) in Image.OPEN.items():
        if fmt not in ALLOWED_FORMATS and _accepts(accept, prefix):
            return UnsupportedFormatError(f"{fmt} files are not allowed (allowed: {allowed})", name)
    # 3. Other well-known signatures.
    if prefix[4:8] == b"ftyp":
        brand = prefix[8:12]
        kind = "HEIF (no HEIF plugin installed)" if brand in _HEIF_BRANDS else "ISO media (MP4/MOV/AVIF)"
        return UnsupportedFormatError(f"{kind} files are not allowed (allowed: {allowed})", name)
    for offset, magic, kind in _SIGNATURES:
        if data[offset : offset + len(magic)] == magic:
            return UnsupportedFormatError(f"{kind} files are not allowed (allowed: {allowed})", name)
    return UnsupportedFormatError(f"not a recognised image format (allowed: {allowed})", name)


# ----------------------------------------------------------------------------------------------------------------
# Decoding


def _check_pixels(size: tuple[int, int], limits: DecodeLimits, what: str, name: str | None) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise TruncatedImageError(f"{what} has an invalid size {w}x{h}", name)
    if w * h > limits.max_pixels:
        raise ImageTooLargeError(
            f"{what} is {w}x{h} = {w * h} pixels, over the {limits.max_pixels}-pixel limit", name
        )


def _skip_gif_subblocks(data: bytes, p: int) -> int:
    n = len(data)
    while p < n:
        size = data[p]
        p += 1
        if size == 0:
            break
        p += size
    return p


def _precheck(data: bytes, limits: DecodeLimits, name: str) -> None:
    """Size checks Pillow cannot give us in time.

    GIF: Pillow grows the canvas and allocates a frame's dispose buffer while *seeking* (even inside ``Image.open``
    for the first frame), before a frame's size can be checked, so every image descriptor is checked here first
    (one pass over the block structure, no decoding). Animated WebP: libwebp allocates the whole canvas when the
    file is opened, so the VP8X canvas size is checked first.
    """
    n = len(data)
    if data[:6] in (b"GIF87a", b"GIF89a") and n >= 13:
        width, height = int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little")
        flags = data[10]
        p = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
        frames = 0
        while p < n:
            block = data[p]
            if block == 0x3B:  # trailer
                break
            if block == 0x21:  # extension: label, then sub-blocks
                p = _skip_gif_subblocks(data, p + 2)
            elif block == 0x2C:  # image descriptor
                if p + 10 > n:
                    break
                x0, y0, w, h = (int.from_bytes(data[p + i : p + i + 2], "little") for i in (1, 3, 5, 7))
                local = data[p + 9]
                p += 10 + (3 << ((local & 7) + 1) if local & 0x80 else 0)
                p = _skip_gif_subblocks(data, p + 1)  # after the LZW minimum code size
                width, height = max(width, x0 + w), max(height, y0 + h)
                _check_pixels((max(width, 1), max(height, 1)), limits, f"GIF image frame {frames}", name)
                frames += 1
            else:  # Pillow skips stray bytes between blocks too
                p += 1
        if frames > limits.max_frames:
            raise ImageTooLargeError(f"GIF image has {frames} frames, over the {limits.max_frames}-frame limit", name)
    elif data[:4] == b"RIFF" and data[8:16] == b"WEBPVP8X" and n >= 30:
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        _check_pixels((width, height), limits, "WEBP image canvas", name)


def _check_frames(n: Any, limits: DecodeLimits, what: str, name: str | None) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise TruncatedImageError(f"{what} reports an invalid frame count {n!r}", name)
    if n > limits.max_frames:
        raise ImageTooLargeError(f"{what} has {n} frames, over the {limits.max_frames}-frame limit", name)
    return n


_SEQUENTIAL_SEEK = frozenset({"GIF", "PNG", "WEBP"})
"""Formats whose frames Pillow decodes one after another to reach a later one (it composes each on the last)."""


def _seek(im: Image.Image, i: int, deadline: _Deadline) -> None:
    """Seek to frame ``i``. Where Pillow would decode every frame on the way inside one ``seek`` (a 999-frame GIF on a
    large canvas: many seconds), step one frame at a time with the time budget checked between frames."""
    pos = im.tell()
    if i == pos:
        return
    if im.format in _SEQUENTIAL_SEEK:
        if i < pos:
            im.seek(0)
            pos = 0
        for j in range(pos + 1, i):
            im.seek(j)
            im.load()  # WebP decodes on load; GIF and APNG load each frame before the next anyway
            deadline.check(f"at frame {j} on the way to frame {i}")
    im.seek(i)


class _Views:
    """The RGB views of the sampled frames, and the pixels they hold, bounded by ``limits.max_total_pixels``."""

    def __init__(self, limits: DecodeLimits, backgrounds: tuple[_RGB, ...], what: str, name: str | None):
        self.limit, self.backgrounds, self.what, self.name = limits.max_total_pixels, backgrounds, what, name
        self.frames: list[Image.Image] = []
        self.indices: list[int] = []
        self.colours: list[_RGB | None] = []
        self.held = 0

    def precheck(self, size: tuple[int, int], k: int, target_size: int | None) -> None:
        """Refuse from the header what ``k`` sampled frames of ``size`` would hold (at least one view each)."""
        w, h = _reduced_size(size, _reduction(size, target_size))
        self._check(k * w * h, f"{k} sampled frame{'s' if k > 1 else ''} of {w}x{h}")

    def add(self, base: Image.Image, index: int, alpha: bool) -> None:
        colours: tuple[_RGB | None, ...] = self.backgrounds if alpha else (None,)
        w, h = base.size
        views = f"{len(colours)} view{'s' if len(colours) > 1 else ''}"
        self._check(self.held + len(colours) * w * h, f"frame {index} ({views} of {w}x{h})")
        for bg in colours:
            self.frames.append(base if bg is None else _composite(base, bg))
            self.indices.append(index)
            self.colours.append(bg)
        self.held += len(colours) * w * h

    def _check(self, total: int, what: str) -> None:
        if total > self.limit:
            raise ImageTooLargeError(
                f"{self.what}: holding {what} takes {total} pixels, over the {self.limit}-pixel limit on decoded "
                "frames (DecodeLimits.max_total_pixels); decode with a target_size or sample fewer frames",
                self.name,
            )


def _sample(
    im: Image.Image,
    n: int,
    what: str,
    name: str | None,
    limits: DecodeLimits,
    target_size: int | None,
    backgrounds: tuple[_RGB, ...],
    deadline: _Deadline,
    *,
    draft: bool = False,
    digest: Any = None,
) -> tuple[_Views, tuple[int, int]]:
    """Decode the sampled frames of an open image into views, each reduced for ``target_size`` as it is produced, so
    that at most one frame is held at full size; return them and the first frame's (oriented, full) size."""
    indices = _sample_indices(n, limits.sample_frames)
    views = _Views(limits, backgrounds, what, name)
    views.precheck(im.size, len(indices), target_size)
    size: tuple[int, int] | None = None
    for i in indices:
        deadline.check(f"before frame {i}")
        if n > 1:  # never seek a single-frame image: it may be a PIL input of a format we do not hand to Pillow
            _seek(im, i, deadline)
        _check_pixels(im.size, limits, f"{what} frame {i}", name)
        full = im.size
        if draft:
            im.draft("RGB", (target_size, target_size))
        im.load()
        if getattr(im, "tile", None):
            raise TruncatedImageError(f"{what} frame {i} did not load completely", name)
        if digest is not None:
            _pixel_digest(digest, im)
        base, oriented, alpha = _frame_base(im, full, target_size)
        views.add(base, i, alpha)
        size = size or oriented
    assert size is not None  # indices is never empty
    return views, size


def _decode_file(
    data: bytes,
    name: str,
    limits: DecodeLimits,
    target_size: int | None,
    backgrounds: tuple[_RGB, ...],
    deadline: _Deadline,
) -> Decoded:
    sha = hashlib.sha256(data).hexdigest()
    if not data:
        raise TruncatedImageError("input is empty", name)
    what = "image"
    with _LIBTIFF.capture() as libtiff:
        try:
            _precheck(data, limits, name)
            deadline.check("after checking the header")
            with Image.open(io.BytesIO(data), formats=_OPENERS) as im:
                fmt = im.format or "unknown"
                what = f"{fmt} image"
                if fmt not in ALLOWED_FORMATS:  # cannot happen with formats=..., kept as a guard
                    raise UnsupportedFormatError(f"{fmt} files are not allowed", name)
                _check_pixels(im.size, limits, what, name)
                deadline.check("after reading the header")
                n = _check_frames(getattr(im, "n_frames", 1), limits, what, name)
                draft = target_size is not None and fmt == "JPEG" and n == 1
                views, size = _sample(im, n, what, name, limits, target_size, backgrounds, deadline, draft=draft)
                deadline.check("after the last frame")
        except DecodeError:
            raise
        except UnidentifiedImageError as e:
            raise _unidentified(data, name) from e
        except Exception as e:
            if what == "image":  # failed inside Image.open: name the format from its signature
                what = f"{_guess_allowed(data) or 'unknown'} image"
            raise _classify(e, what, name, libtiff) from e
    return Decoded(
        frames=tuple(views.frames),
        frame_indices=tuple(views.indices),
        sha256=sha,
        format=fmt,
        size=size,
        n_frames=n,
        nbytes=len(data),
        source=name,
        backgrounds=tuple(views.colours),
    )


def _pixel_digest(h: Any, im: Image.Image) -> None:
    h.update(f"{im.mode} {im.size[0]}x{im.size[1]}\n".encode())
    h.update(im.tobytes())
    if im.mode in ("P", "PA") and im.palette is not None:
        h.update(bytes(im.getpalette() or ()))


def _decode_image(
    im: Image.Image,
    fmt: str,
    name: str,
    limits: DecodeLimits,
    target_size: int | None,
    backgrounds: tuple[_RGB, ...],
    deadline: _Deadline,
) -> Decoded:
    what = "image" if fmt == "ndarray" else "PIL image"
    with _LIBTIFF.capture() as libtiff:
        try:
            pending = bool(getattr(im, "tile", None))
            if pending and im.format and im.format not in ALLOWED_FORMATS:
                raise UnsupportedFormatError(
                    f"{what} of format {im.format} is not loaded; refusing to decode a non-allowed format", name
                )
            _check_pixels(im.size, limits, what, name)
            n = 1
            if im.format in ALLOWED_FORMATS:
                n = _check_frames(getattr(im, "n_frames", 1), limits, what, name)
            start = im.tell() if n > 1 else 0
            h = hashlib.sha256()
            try:
                views, size = _sample(im, n, what, name, limits, target_size, backgrounds, deadline, digest=h)
            finally:
                if n > 1 and im.tell() != start:
                    try:
                        im.seek(start)
                    except Exception:
                        pass
            deadline.check("after the last frame")
        except DecodeError:
            raise
        except Exception as e:
            raise _classify(e, what, name, libtiff) from e
    return Decoded(
        frames=tuple(views.frames),
        frame_indices=tuple(views.indices),
        sha256=h.hexdigest(),
        format=fmt,
        size=size,
        n_frames=n,
        nbytes=0,
        source=name,
        backgrounds=tuple(views.colours),
    )


def _array_to_image(a: np.ndarray, name: str, limits: DecodeLimits) -> Image.Image:
    if a.ndim == 2:
        pass
    elif a.ndim == 3 and a.shape[2] in (3, 4):
        pass
    else:
        raise UnsupportedFormatError(
            f"array of shape {a.shape} is not an image: expected HxW, HxWx3 or HxWx4", name
        )
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise UnsupportedFormatError(f"array of shape {a.shape} is empty", name)
    _check_pixels((a.shape[1], a.shape[0]), limits, "array", name)
    if a.dtype == np.uint8:
        u8 = a
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise UnsupportedFormatError("float array contains NaN or infinity", name)
        lo, hi = float(a.min()), float(a.max())
        if lo < 0.0 or hi > 1.0:
            raise UnsupportedFormatError(
                f"float array values must lie in [0, 1], got [{lo:g}, {hi:g}]", name
            )
        u8 = np.rint(a.astype(np.float32) * 255.0).astype(np.uint8)
    else:
        raise UnsupportedFormatError(
            f"array dtype {a.dtype} is not supported: expected uint8, or float in [0, 1]", name
        )
    return Image.fromarray(np.ascontiguousarray(u8))


def _check_background(background: Any) -> tuple[int, int, int]:
    try:
        bg = tuple(int(c) for c in background)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"background must be an (r, g, b) tuple of ints, got {background!r}") from e
    if len(bg) != 3 or not all(0 <= c <= 255 for c in bg):
        raise ConfigError(f"background must be an (r, g, b) tuple of ints in 0..255, got {background!r}")
    return bg  # type: ignore[return-value]


def decode(
    source: Source,
    *,
    limits: DecodeLimits | None = None,
    target_size: int | None = None,
    background: tuple[int, int, int] | None = None,
) -> Decoded:
    """Decode ``source`` into RGB frames, enforcing ``limits``.

    ``source``: a path (str / PathLike) to a regular file, bytes / bytearray / memoryview, a binary file object (read
    from its current position), a ``PIL.Image.Image``, or a numpy array (HxW gray, HxWx3 RGB, HxWx4 RGBA; uint8, or
    float in [0, 1]).

    ``target_size``: the model's input side. Large JPEGs are then decoded straight at a reduced DCT scale (1/2, 1/4,
    1/8) whose shorter side is still >= ``target_size``, and every frame is box-filtered down by the integer factor
    that keeps its shorter side >= 2 * ``target_size`` as soon as it is decoded. ``None``: full resolution.

    Transparency: a frame with real alpha is returned once per colour of ``limits.backgrounds`` (by default on white
    and on black), so a decision can take the worse; ``backgrounds`` says which view is which (``None``: opaque, one
    view). ``background``: one colour to composite on instead.

    Animated images (GIF, APNG, WebP, MPO, multi-page TIFF) return ``min(limits.sample_frames, n_frames)`` frames
    sampled evenly, first and last included; ``frame_indices`` says which.

    Raises a :class:`~safeclip.errors.DecodeError` subclass, whose message is one line naming the input:
    :class:`UnsupportedFormatError` (not an allowed format, not an image input, or a path that is not a regular
    file), :class:`ImageTooLargeError` (byte / pixel / frame / held-pixel limits, decompression bombs),
    :class:`TruncatedImageError` (truncated or corrupt data), :class:`DecodeTimeoutError` (over
    ``limits.timeout_s`` of CPU time, or the ``limits.wall_timeout_s`` backstop; the message says which). Bad
    arguments (``limits``, ``target_size``, ``background``) raise
    ``ValueError``/``TypeError``.

    The time budget is checked between steps and frames: a single pathological C-level decode step cannot be
    interrupted from Python. A hard kill needs process isolation, which the audit runner's worker processes provide.

    >>> import io
    >>> from PIL import Image
    >>> buf = io.BytesIO()
    >>> Image.new("RGBA", (40, 30), (255, 255, 255, 0)).save(buf, "PNG")
    >>> d = decode(buf.getvalue())
    >>> d.format, d.size, d.n_frames, d.frame_indices, d.backgrounds
    ('PNG', (40, 30), 1, (0, 0), ((255, 255, 255), (0, 0, 0)))
    >>> [f.getpixel((0, 0)) for f in d.frames]
    [(255, 255, 255), (0, 0, 0)]
    >>> decode(b"%!PS-Adobe-3.0 EPSF-3.0\\n")
    Traceback (most recent call last):
    ...
    safeclip.errors.UnsupportedFormatError: <bytes>: EPS files are not allowed (allowed: ...)
    """
    if limits is None:
        limits = DecodeLimits()
    elif not isinstance(limits, DecodeLimits):
        raise TypeError(f"limits must be a DecodeLimits, got {type(limits).__name__}")
    if target_size is not None and (
        isinstance(target_size, bool) or not isinstance(target_size, int) or target_size < 1
    ):
        raise ValueError(f"target_size must be a positive int or None, got {target_size!r}")
    bgs = limits.backgrounds if background is None else (_check_background(background),)

    if isinstance(source, Image.Image):
        deadline = _Deadline(limits, "<PIL>")
        return _decode_image(source, "PIL", "<PIL>", limits, target_size, bgs, deadline)
    if isinstance(source, np.ndarray):
        name = "<ndarray>"
        deadline = _Deadline(limits, name)
        image = _array_to_image(source, name, limits)
        return _decode_image(image, "ndarray", name, limits, target_size, bgs, deadline)
    deadline = _Deadline(limits, None)
    data, name = read_source(source, max_bytes=limits.max_bytes)
    if data is None:  # read_source returns None only for PIL / ndarray inputs, handled above
        raise UnsupportedFormatError("no bytes to decode", name)
    deadline.name = name
    deadline.check("after reading the input")
    return _decode_file(data, name, limits, target_size, bgs, deadline)
