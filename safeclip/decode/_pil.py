"""The Pillow backend: allowed formats only, sizes checked from the header, frames sampled and reduced as they are
decoded, transparency composited per background, libtiff's messages kept off stderr."""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import io
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from ..errors import (
    DecodeError,
    ImageTooLargeError,
    TruncatedImageError,
    UnsupportedFormatError,
)
from ._common import (
    ALLOWED_FORMATS,
    OPENERS,
    RGB,
    Deadline,
    Decoded,
    DecodeLimits,
    one_line,
    sample_positions,
    sampling_text,
)

__all__ = ["array_to_image", "decode_file", "decode_image"]

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


_TIMED = frozenset({"GIF", "PNG", "WEBP"})
"""Formats whose frames have durations: sampled by time. Others (MPO, TIFF pages) are sampled evenly by index."""
_SHORTEST_MS = 10
_DEFAULT_MS = 100
"""A frame shown for ``_SHORTEST_MS`` or less (or with no duration) counts as ``_DEFAULT_MS``, as browsers show it."""


class _Plan:
    """Which frames of an image to decode, and each one's start time (``None``: pages, sampled by index)."""

    __slots__ = ("duration_s", "indices", "sampling", "starts")

    def __init__(self, n: int, durations_ms: list[int] | None, limits: DecodeLimits, what: str, name: str | None):
        self.starts: list[float] | None = None
        self.duration_s: float | None = None
        self.sampling: str | None = None
        if n == 1:
            self.indices = [0]
            return
        if durations_ms is None:
            self.indices = _sample_indices(n, limits.sample_frames)
            self.sampling = (f"{len(self.indices)} of {n} pages, evenly spaced, first and last included")
            return
        ms = np.array([_DEFAULT_MS if d <= _SHORTEST_MS else d for d in durations_ms], dtype=np.float64)
        starts = np.concatenate([[0.0], np.cumsum(ms[:-1])]) / 1000.0
        self.duration_s = float(ms.sum()) / 1000.0
        if self.duration_s > limits.max_duration_s:
            raise ImageTooLargeError(
                f"{what} lasts {self.duration_s:g} s, over the {limits.max_duration_s:g}-second limit "
                "(DecodeLimits.max_duration_s)", name
            )
        self.starts = [float(t) for t in starts]
        self.indices, spread = sample_positions(self.starts, limits)
        self.sampling = sampling_text(limits, spread, self.duration_s)


def _be(data: bytes, p: int, k: int) -> int:
    return int.from_bytes(data[p : p + k], "big")


def _le(data: bytes, p: int, k: int) -> int:
    return int.from_bytes(data[p : p + k], "little")


def _chunk_durations(data: bytes, fmt: str) -> list[int] | None:
    """Frame durations in ms of an APNG (``fcTL`` delays; a default image outside the animation first, at 0 ms) or
    an animated WebP (``ANMF`` durations), read from the chunks without decoding anything."""
    out: list[int] = []
    n = len(data)
    if fmt == "PNG":
        p, default_image = 8, False
        while p + 8 <= n:
            length, kind = _be(data, p, 4), data[p + 4 : p + 8]
            body = p + 8
            if kind == b"IDAT" and not out:
                default_image = True
            elif kind == b"fcTL" and body + 26 <= n:
                num, den = _be(data, body + 20, 2), _be(data, body + 22, 2) or 100
                out.append(round(1000 * num / den))
            elif kind == b"IEND":
                break
            p = body + length + 4
        if default_image and out:
            out.insert(0, 0)
        return out
    if fmt == "WEBP":
        p = 12
        while p + 8 <= n:
            kind, length = data[p : p + 4], _le(data, p + 4, 4)
            if kind == b"ANMF" and p + 8 + 15 <= n:
                out.append(_le(data, p + 8 + 12, 3))
            p += 8 + length + (length & 1)
        return out
    return None


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
        return ImageTooLargeError(f"{what} is a decompression bomb: {one_line(e)}", name)
    if isinstance(e, MemoryError):
        return ImageTooLargeError(f"ran out of memory decoding {what}", name)
    reason = one_line(e)
    if libtiff:
        reason = one_line(ValueError(f"{reason} (libtiff: {'; '.join(dict.fromkeys(libtiff))})"), 300)
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
    for fmt in OPENERS:
        if _accepts(Image.OPEN[fmt][1], data[:16]):
            return fmt
    return None


def _unidentified(data: bytes, name: str) -> DecodeError:
    """Explain why Pillow could not open ``data`` with the allowed openers."""
    allowed = ", ".join(ALLOWED_FORMATS)
    prefix = data[:16]
    # 1. Looks like an allowed format: the opener rejected its header. Re-run it once to learn why.
    for fmt in OPENERS:
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


class _GifBlocks:
    """A cursor over a GIF's bytes that reads sub-blocks exactly as Pillow's ``GifImageFile.data`` does, so that a
    walk with it sees the image descriptors Pillow will see, however the block structure is broken."""

    __slots__ = ("data", "p")

    def __init__(self, data: bytes, p: int):
        self.data, self.p = data, p

    def byte(self) -> int | None:
        if self.p >= len(self.data):
            return None
        self.p += 1
        return self.data[self.p - 1]

    def block(self) -> bytes | None:
        """One sub-block; ``None`` for a terminator or the end of the data (Pillow's ``data()``)."""
        size = self.byte()
        if not size:
            return None
        self.p += size
        return self.data[self.p - size : self.p] or None

    def skip_blocks(self) -> None:
        while self.block() is not None:
            pass


def _gif_frames(data: bytes) -> Iterator[tuple[int, int, int]]:
    """Each frame of a GIF as Pillow's parser reaches it, without decoding: the canvas size once the frame is drawn
    (Pillow grows the canvas to fit a frame that reaches past it) and the frame's delay in ms.

    Pillow's quirks are followed on purpose: after an extension's label it reads one sub-block and then skips
    sub-blocks up to a terminator, so an extension whose first sub-block is empty swallows the chain after it (only a
    comment stops at once), and a NETSCAPE2.0 application block before the first frame consumes one extra sub-block.
    """
    width, height = _le(data, 6, 2), _le(data, 8, 2)
    flags = data[10]
    cur = _GifBlocks(data, 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0))
    frame = 0
    while (first := cur.byte()) is not None and first != 0x3B:
        delay = 0
        b: int | None = first
        while b is not None and b != 0x3B:
            if b == 0x21:  # extension: label, one sub-block, then Pillow's skip
                label = cur.byte()
                block = cur.block()
                if label == 0xF9 and block is not None and len(block) >= 3:
                    delay = 10 * _le(block, 1, 2)
                if label == 0xFE:
                    while block is not None:
                        block = cur.block()
                    b = cur.byte()
                    continue
                if label == 0xFF and frame == 0 and block is not None and block.startswith(b"NETSCAPE2.0"):
                    cur.block()
                cur.skip_blocks()
            elif b == 0x2C:  # image descriptor, the local palette, the LZW code size, then the image's sub-blocks
                if cur.p + 9 > len(data):
                    return
                x0, y0, w, h = (_le(data, cur.p + i, 2) for i in (0, 2, 4, 6))
                local = data[cur.p + 8]
                cur.p += 9 + (3 << ((local & 7) + 1) if local & 0x80 else 0) + 1
                width, height = max(width, x0 + w), max(height, y0 + h)
                yield width, height, delay
                cur.skip_blocks()
                break
            b = cur.byte()  # anything else: Pillow skips stray bytes between blocks
        else:
            return
        frame += 1


def _precheck(data: bytes, limits: DecodeLimits, name: str) -> list[int] | None:
    """Size checks Pillow cannot give us in time; returns a GIF's frame delays in ms (``None`` for other formats).

    GIF: Pillow grows the canvas and allocates a frame's dispose buffer while *seeking* (even inside ``Image.open``
    for the first frame), before a frame's size can be checked, so every image descriptor is checked here first
    (one pass over the block structure as Pillow reads it, no decoding). Animated WebP: libwebp allocates the whole
    canvas when the file is opened, so the VP8X canvas size is checked first.
    """
    n = len(data)
    if data[:6] in (b"GIF87a", b"GIF89a") and n >= 13:
        delays: list[int] = []
        for width, height, delay in _gif_frames(data):
            _check_pixels((max(width, 1), max(height, 1)), limits, f"GIF image frame {len(delays)}", name)
            delays.append(delay)
        if len(delays) > limits.max_frames:
            raise ImageTooLargeError(
                f"GIF image has {len(delays)} frames, over the {limits.max_frames}-frame limit", name
            )
        return delays
    elif data[:4] == b"RIFF" and data[8:16] == b"WEBPVP8X" and n >= 30:
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        _check_pixels((width, height), limits, "WEBP image canvas", name)
    return None


def _check_frames(n: Any, limits: DecodeLimits, what: str, name: str | None) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise TruncatedImageError(f"{what} reports an invalid frame count {n!r}", name)
    if n > limits.max_frames:
        raise ImageTooLargeError(f"{what} has {n} frames, over the {limits.max_frames}-frame limit", name)
    return n


_SEQUENTIAL_SEEK = frozenset({"GIF", "PNG", "WEBP"})
"""Formats whose frames Pillow decodes one after another to reach a later one (it composes each on the last)."""


def _seek(im: Image.Image, i: int, deadline: Deadline, limits: DecodeLimits, what: str) -> None:
    """Seek to frame ``i``. Where Pillow would decode every frame on the way inside one ``seek`` (a 999-frame GIF on a
    large canvas: many seconds), step one frame at a time with the time budget checked between frames.

    The canvas is checked after every seek, before anything decodes the frame: Pillow grows a GIF's canvas to fit a
    frame that reaches past it, and decodes the frame it leaves at the start of the next seek. The byte prescan sees
    the same sizes for a file; a PIL image handed in was never prescanned."""

    def to(j: int) -> None:
        im.seek(j)
        _check_pixels(im.size, limits, f"{what} frame {j}", deadline.name)

    pos = im.tell()
    if i == pos:
        return
    if im.format in _SEQUENTIAL_SEEK:
        if i < pos:
            to(0)
            pos = 0
        for j in range(pos + 1, i):
            to(j)
            im.load()  # WebP decodes on load; GIF and APNG load each frame before the next anyway
            deadline.check(f"at frame {j} on the way to frame {i}")
    to(i)


def _pillow_durations(im: Image.Image, n: int, deadline: Deadline, limits: DecodeLimits, what: str) -> list[int]:
    """Each frame's duration in ms as Pillow reads it (``info["duration"]``), seeking frame by frame."""
    out = []
    for j in range(n):
        _seek(im, j, deadline, limits, what)
        d = im.info.get("duration", 0)
        out.append(int(d) if isinstance(d, (int, float)) and d >= 0 else 0)
        deadline.check(f"reading the duration of frame {j}")
    return out


class _Views:
    """The RGB views of the sampled frames, and the pixels they hold, bounded by ``limits.max_total_pixels``."""

    def __init__(self, limits: DecodeLimits, backgrounds: tuple[RGB, ...], what: str, name: str | None):
        self.limit, self.backgrounds, self.what, self.name = limits.max_total_pixels, backgrounds, what, name
        self.frames: list[Image.Image] = []
        self.indices: list[int] = []
        self.colours: list[RGB | None] = []
        self.times: list[float] = []
        self.held = 0

    def precheck(self, size: tuple[int, int], k: int, target_size: int | None) -> None:
        """Refuse from the header what ``k`` sampled frames of ``size`` would hold (at least one view each)."""
        w, h = _reduced_size(size, _reduction(size, target_size))
        self._check(k * w * h, f"{k} sampled frame{'s' if k > 1 else ''} of {w}x{h}")

    def add(self, base: Image.Image, index: int, alpha: bool, start: float | None = None) -> None:
        colours: tuple[RGB | None, ...] = self.backgrounds if alpha else (None,)
        w, h = base.size
        views = f"{len(colours)} view{'s' if len(colours) > 1 else ''}"
        self._check(self.held + len(colours) * w * h, f"frame {index} ({views} of {w}x{h})")
        for bg in colours:
            self.frames.append(base if bg is None else _composite(base, bg))
            self.indices.append(index)
            self.colours.append(bg)
            if start is not None:
                self.times.append(start)
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
    plan: _Plan,
    what: str,
    name: str | None,
    limits: DecodeLimits,
    target_size: int | None,
    backgrounds: tuple[RGB, ...],
    deadline: Deadline,
    *,
    draft: bool = False,
    digest: Any = None,
) -> tuple[_Views, tuple[int, int]]:
    """Decode the sampled frames of an open image into views, each reduced for ``target_size`` as it is produced, so
    that at most one frame is held at full size; return them and the first frame's (oriented, full) size."""
    indices = plan.indices
    views = _Views(limits, backgrounds, what, name)
    views.precheck(im.size, len(indices), target_size)
    size: tuple[int, int] | None = None
    for i in indices:
        deadline.check(f"before frame {i}")
        if n > 1:  # never seek a single-frame image: it may be a PIL input of a format we do not hand to Pillow
            _seek(im, i, deadline, limits, what)
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
        views.add(base, i, alpha, None if plan.starts is None else plan.starts[i])
        size = size or oriented
    assert size is not None  # indices is never empty
    return views, size


def decode_file(
    data: bytes,
    name: str,
    limits: DecodeLimits,
    target_size: int | None,
    backgrounds: tuple[RGB, ...],
    deadline: Deadline,
) -> Decoded:
    sha = hashlib.sha256(data).hexdigest()
    if not data:
        raise TruncatedImageError("input is empty", name)
    what = "image"
    with _LIBTIFF.capture() as libtiff:
        try:
            gif_delays = _precheck(data, limits, name)
            deadline.check("after checking the header")
            with Image.open(io.BytesIO(data), formats=OPENERS) as im:
                fmt = im.format or "unknown"
                what = f"{fmt} image"
                if fmt not in ALLOWED_FORMATS:  # cannot happen with formats=..., kept as a guard
                    raise UnsupportedFormatError(f"{fmt} files are not allowed", name)
                _check_pixels(im.size, limits, what, name)
                deadline.check("after reading the header")
                n = _check_frames(getattr(im, "n_frames", 1), limits, what, name)
                durations = None
                if n > 1 and fmt in _TIMED:
                    durations = gif_delays if fmt == "GIF" else _chunk_durations(data, fmt)
                    if durations is None or len(durations) != n:  # not what Pillow sees: ask Pillow, frame by frame
                        durations = _pillow_durations(im, n, deadline, limits, what)
                plan = _Plan(n, durations, limits, what, name)
                draft = target_size is not None and fmt == "JPEG" and n == 1
                views, size = _sample(im, n, plan, what, name, limits, target_size, backgrounds, deadline,
                                      draft=draft)
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
        timestamps=tuple(views.times),
        duration_s=plan.duration_s,
        sampling=plan.sampling,
    )


def _pixel_digest(h: Any, im: Image.Image) -> None:
    h.update(f"{im.mode} {im.size[0]}x{im.size[1]}\n".encode())
    h.update(im.tobytes())
    if im.mode in ("P", "PA") and im.palette is not None:
        h.update(bytes(im.getpalette() or ()))


def decode_image(
    im: Image.Image,
    fmt: str,
    name: str,
    limits: DecodeLimits,
    target_size: int | None,
    backgrounds: tuple[RGB, ...],
    deadline: Deadline,
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
                durations = _pillow_durations(im, n, deadline, limits, what) if n > 1 and im.format in _TIMED else None
                plan = _Plan(n, durations, limits, what, name)
                views, size = _sample(im, n, plan, what, name, limits, target_size, backgrounds, deadline, digest=h)
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
        timestamps=tuple(views.times),
        duration_s=plan.duration_s,
        sampling=plan.sampling,
    )


def array_to_image(a: np.ndarray, name: str, limits: DecodeLimits) -> Image.Image:
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
