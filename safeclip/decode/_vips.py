"""The libvips backend (pyvips): PNG files, and WebP files reduced by at least 2 on the way to the model, decoded
by libvips and reduced as they are decoded; everything else is handed to the Pillow backend.

Which bytes reach libvips is decided here, from the file's signature and header, before any libvips loader runs:
only a PNG or WebP signature reaches that format's own loader, the only loaders left unblocked
(``operation_block_set``), with libvips' untrusted-loader block on. Handed to Pillow
(:func:`safeclip.decode._pil.decode_file`), with Pillow's limits, frame sampling and errors:

- JPEG: Pillow's draft mode already decodes it at a reduced DCT scale, the same libjpeg-turbo scaling libvips'
  shrink-on-load uses (the same pixels), with less overhead;
- a WebP that is not reduced by 2 or more (or decoded at full size): libvips' only gain on WebP is libwebp's scaled
  decode; at full size Pillow's libwebp path is the cheaper one;
- every other format (GIF, BMP, TIFF, AVIF, HEIF, and anything not allowed, which Pillow refuses by name);
- animations (APNG, animated WebP), so that their frames are sampled by the one sampler;
- PNGs with chunks that Pillow checks and libvips skips (compressed text, which Pillow bounds as a decompression
  bomb; an ICC profile with an unknown compression method), so that such a file fails as it does with Pillow.

The reduction is the one Pillow's path makes (the integer factor that keeps the short side >= 2 x target_size), so
the model's resize and PDQ see nearly the same pixels from either backend; what libvips saves is decoding time
(libwebp's scaled decode; PNG rows reduced as they stream in, by a faster PNG decoder).

libvips decodes in its own worker threads, which the CPU budget of the calling thread (:class:`Deadline`) does not
see: the wall-clock backstop (``DecodeLimits.wall_timeout_s``) is what bounds a libvips decode. libvips' operation
cache is turned off (inputs are never decoded twice) and its thread pool set to one thread per decode unless
``VIPS_CONCURRENCY`` says otherwise: decodes run in parallel across files (``DecodeOptions.workers``). libvips'
warnings go to the ``pyvips`` logger, which gets a NullHandler so that they never reach stderr by default.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import struct
import threading
from typing import Any

import numpy as np
from PIL import Image

from ..errors import (
    DecodeError,
    ImageTooLargeError,
    TruncatedImageError,
    UnsupportedFormatError,
)
from ._common import RGB, Deadline, Decoded, DecodeLimits, one_line
from ._pil import decode_file as pil_decode_file

__all__ = ["VIPS_FORMATS", "decode_file", "load_pyvips", "vips_format", "vips_version"]

VIPS_FORMATS = ("PNG", "WEBP")
"""The formats libvips decodes here (Pillow's names, as ``Decoded.format`` reports them)."""

_LOADERS = {"PNG": "pngload_buffer", "WEBP": "webpload_buffer"}
_SWAPS_AXES = frozenset({5, 6, 7, 8})  # EXIF orientations that turn the image by 90 degrees

_lock = threading.Lock()
_pyvips: Any = None
_failure: str | None = None  # why pyvips could not be loaded


def load_pyvips() -> Any:
    """Import pyvips and configure libvips once (untrusted loaders blocked, every loader but PNG/WebP blocked, no
    operation cache). Raises ImportError where pyvips or libvips is missing or broken (remembered: "auto" does not
    search for it again at every decode)."""
    global _pyvips, _failure
    if _pyvips is not None:
        return _pyvips
    with _lock:
        if _failure is not None:
            raise ImportError(_failure)
        if _pyvips is None:
            try:
                import pyvips
            except Exception as e:  # ImportError, or OSError/cffi errors from a broken libvips
                _failure = f"{type(e).__name__}: {one_line(e)}"
                raise ImportError(_failure) from e

            logging.getLogger("pyvips").addHandler(logging.NullHandler())
            pyvips.block_untrusted_set(True)
            pyvips.operation_block_set("VipsForeignLoad", True)
            for op in _LOADERS.values():
                pyvips.operation_block_set(pyvips.type_name(pyvips.type_find("VipsOperation", op)), False)
            pyvips.cache_set_max(0)
            if not os.environ.get("VIPS_CONCURRENCY"):
                pyvips.concurrency_set(1)
            _pyvips = pyvips
    return _pyvips


def vips_version() -> str:
    """The libvips version in use, e.g. ``"8.18.0"`` (pyvips must be loadable)."""
    v = load_pyvips()
    return f"{v.version(0)}.{v.version(1)}.{v.version(2)}"


# ----------------------------------------------------------------------------------------------------------------
# Which bytes go to libvips


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """The PNG chunks before the first IDAT, as (type, body); no CRC check (the loader does it)."""
    out: list[tuple[bytes, bytes]] = []
    p, n = 8, len(data)
    while p + 8 <= n and len(out) < 10_000:
        length, kind = struct.unpack(">I4s", data[p : p + 8])
        if kind == b"IDAT":
            break
        out.append((kind, data[p + 8 : p + 8 + length]))
        p += 12 + length
    return out


def _png_for_pil(data: bytes) -> bool:
    for kind, body in _png_chunks(data):
        if kind in (b"acTL", b"zTXt"):  # animated; compressed text (Pillow bounds its decompressed size)
            return True
        if kind == b"iTXt":
            keyword_end = body.find(b"\0")
            if keyword_end < 0 or body[keyword_end + 1 : keyword_end + 2] != b"\0":  # compressed (or malformed)
                return True
        if kind == b"iCCP":
            name_end = body.find(b"\0")
            if name_end < 0 or body[name_end + 1 : name_end + 2] != b"\0":  # not zlib: Pillow refuses it
                return True
    return False


def _webp_size(data: bytes) -> tuple[int, int] | None:
    """A still WebP's (width, height) from its first chunk's header, or None."""
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":  # after the key frame's start code
        return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def vips_format(data: bytes, target_size: int | None) -> str | None:
    """The format libvips decodes ``data`` as, from its signature and headers, or ``None``: Pillow decodes it
    (another format, an animation, a PNG with chunks only Pillow checks, or a WebP that is not reduced by at least
    2 for ``target_size``: libwebp's scaled decode is what makes libvips faster than Pillow on WebP)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return None if _png_for_pil(data) else "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        if data[12:16] == b"VP8X" and len(data) > 20 and data[20] & 0x02:  # the VP8X animation flag
            return None
        size = _webp_size(data)
        if size is None or target_size is None or _factor(size, target_size) < 2:
            return None
        return "WEBP"
    return None


def _factor(size: tuple[int, int], target_size: int | None) -> int:
    """The reduction factor of Pillow's path: the integer that keeps the short side >= 2 x ``target_size``."""
    return 1 if target_size is None else max(1, min(size) // (2 * target_size))


# ----------------------------------------------------------------------------------------------------------------
# Decoding


def _classify(e: BaseException, what: str, name: str) -> DecodeError:
    # pyvips' messages start with what failed ("unable to call pngload_buffer"), then libvips' reasons
    reason = re.sub(r"^unable to (call \w+|write to memory)\s*", "", one_line(e)) or "no reason given"
    low = reason.lower()
    if isinstance(e, MemoryError) or "out of memory" in low:
        return ImageTooLargeError(f"ran out of memory decoding {what}", name)
    if "too large" in low or "exceeds" in low or "too many" in low:
        return ImageTooLargeError(f"{what} is too large: {reason}", name)
    if "not in a known format" in low or "unsupported" in low or "not supported" in low or "is blocked" in low:
        return UnsupportedFormatError(f"{what} uses a feature libvips cannot decode: {reason}", name)
    if "premature" in low or "truncated" in low or "end of" in low or "out of order" in low:
        return TruncatedImageError(f"{what} is truncated: {reason}", name)
    return TruncatedImageError(f"{what} is corrupt (libvips: {reason})", name)


def _orientation(image: Any) -> int:
    try:
        value = int(image.get("orientation")) if image.get_typeof("orientation") else 1
    except Exception:  # noqa: BLE001 - a broken EXIF never fails
        value = 1
    return value if 1 <= value <= 8 else 1


def _srgb8(image: Any) -> Any:
    """Any band layout and format -> 8-bit sRGB, or sRGB + alpha."""
    if image.interpretation not in ("srgb",) or image.format != "uchar" or image.bands not in (3, 4):
        image = image.colourspace("srgb")
        if image.format != "uchar":
            image = image.cast("uchar")
    if image.bands > 4:  # extra bands: keep colour and alpha
        image = image.extract_band(0, n=4)
    return image


def _composite(rgba: Image.Image, background: RGB) -> Image.Image:
    out = Image.new("RGB", rgba.size, background)
    out.paste(rgba, (0, 0), rgba)  # as the Pillow backend composites: the alpha band as the mask
    return out


def _reduced(pyvips: Any, header: Any, data: bytes, fmt: str, size: tuple[int, int], target_size: int | None) -> Any:
    """The lazily decoded, EXIF-oriented image, reduced as it is decoded by the integer factor Pillow's path takes
    (the short side stays >= 2 x ``target_size``): WebP by libwebp's scaled decode, PNG by a streaming box filter
    as rows arrive. The same geometry as Pillow's path, so the model's resize and PDQ see nearly the same pixels."""
    factor = _factor(size, target_size)
    if factor == 1:
        return header.autorot()
    if fmt == "WEBP":
        image = pyvips.Image.webpload_buffer(data, scale=1.0 / factor, fail_on="truncated")
    else:
        image = pyvips.Image.pngload_buffer(data, access="sequential", fail_on="truncated")
        if image.hasalpha():  # as Pillow resamples RGBA: premultiplied, so clear pixels do not bleed their colour
            image = image.premultiply().shrink(factor, factor).unpremultiply().cast(image.format)
        else:
            image = image.shrink(factor, factor)
    return image.autorot()


def decode_file(
    data: bytes,
    name: str,
    limits: DecodeLimits,
    target_size: int | None,
    backgrounds: tuple[RGB, ...],
    deadline: Deadline,
) -> Decoded:
    """Decode ``data`` with libvips where :func:`vips_format` names a format, else with the Pillow backend."""
    fmt = vips_format(data, target_size)
    if fmt is None:
        return pil_decode_file(data, name, limits, target_size, backgrounds, deadline)
    pyvips = load_pyvips()
    sha = hashlib.sha256(data).hexdigest()
    what = f"{fmt} image"
    try:
        # The format's own loader reads the header only (libvips is lazy): sizes are checked before any pixel.
        header = getattr(pyvips.Image, _LOADERS[fmt])(data, fail_on="truncated")
        w, h = header.width, header.height
        if w <= 0 or h <= 0:
            raise TruncatedImageError(f"{what} has an invalid size {w}x{h}", name)
        if w * h > limits.max_pixels:
            raise ImageTooLargeError(f"{what} is {w}x{h} = {w * h} pixels, over the {limits.max_pixels}-pixel limit",
                                     name)
        size = (h, w) if _orientation(header) in _SWAPS_AXES else (w, h)
        deadline.check("after reading the header")
        image = _reduced(pyvips, header, data, fmt, size, target_size)
        image = _srgb8(image)
        held = image.width * image.height
        if held > limits.max_total_pixels:
            raise ImageTooLargeError(
                f"{what}: holding 1 frame of {image.width}x{image.height} takes {held} pixels, over the "
                f"{limits.max_total_pixels}-pixel limit on decoded frames (DecodeLimits.max_total_pixels); decode "
                "with a target_size", name)
        deadline.check("before decoding")
        pixels = np.ndarray(buffer=image.write_to_memory(), dtype=np.uint8,
                            shape=(image.height, image.width, image.bands))
        deadline.check("after decoding")
    except DecodeError:
        raise
    except Exception as e:  # pyvips.Error, and anything else from the binding
        raise _classify(e, what, name) from e
    if pixels.shape[2] == 4 and int(pixels[..., 3].min()) < 255:
        total = len(backgrounds) * held
        if total > limits.max_total_pixels:
            raise ImageTooLargeError(
                f"{what}: holding frame 0 ({len(backgrounds)} views of {image.width}x{image.height}) takes {total} "
                f"pixels, over the {limits.max_total_pixels}-pixel limit on decoded frames "
                "(DecodeLimits.max_total_pixels); decode with a target_size", name)
        rgba = Image.fromarray(pixels, "RGBA")
        frames = tuple(_composite(rgba, bg) for bg in backgrounds)
        colours: tuple[RGB | None, ...] = tuple(backgrounds)
    else:
        frames = (Image.fromarray(np.ascontiguousarray(pixels[..., :3]), "RGB"),)
        colours = (None,)
    deadline.check("after the last frame")
    return Decoded(frames=frames, frame_indices=(0,) * len(frames), sha256=sha, format=fmt, size=size, n_frames=1,
                   nbytes=len(data), source=name, backgrounds=colours)
