"""Decode untrusted image inputs into RGB frames, safely.

:func:`decode` accepts a path, bytes, a binary file object, a ``PIL.Image.Image`` or a numpy array and returns a
:class:`Decoded`: RGB, fully loaded PIL frames with EXIF orientation applied and transparency composited on a fixed
background. Only the formats in :data:`ALLOWED_FORMATS` are ever handed to Pillow (never EPS/PS/PDF or anything
that runs an external program). Byte, pixel (checked from the header, before any pixel is decoded), frame and time
limits come from :class:`DecodeLimits`. Every failure is a :class:`~safeclip.errors.DecodeError` subclass with a
one-line reason naming the input; nothing else escapes for any byte input. ``backend="vips"`` (or ``"auto"`` with
pyvips installed) decodes PNGs, and WebPs it reduces, with libvips instead, under the same limits and errors
(``_vips``).

The module keeps no shared mutable state and never changes Pillow's process-wide settings
(``Image.MAX_IMAGE_PIXELS``, ``ImageFile.LOAD_TRUNCATED_IMAGES``, warning filters), so it is safe to call from many
threads and from multiprocessing workers. The one process-wide change is libtiff's message handlers (see
:class:`_LibtiffMessages`): a message libtiff reports while :func:`decode` runs in a thread becomes part of that
file's error instead of a line on stderr; messages from anywhere else go to the handler that was there before.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from PIL import Image

from ..errors import ConfigError, UnsupportedFormatError
from ._common import (
    ALLOWED_FORMATS,
    DECODER_VERSION,
    Deadline,
    Decoded,
    DecodeLimits,
    Source,
    check_background,
    one_line,
    read_source,
)
from ._pil import array_to_image, decode_file, decode_image
from ._video import VIDEO_CODECS, decode_video, sniff_video, video_chunks
from ._vips import decode_file as vips_decode_file
from ._vips import load_pyvips, vips_version

__all__ = ["ALLOWED_FORMATS", "BACKENDS", "DECODER_VERSION", "VIDEO_CODECS", "DecodeLimits", "Decoded", "Source",
           "decode", "decode_chunks", "decoder_id", "read_source", "resolve_backend"]

BACKENDS = ("auto", "pil", "vips")
"""Decode backends: ``"vips"`` (libvips through pyvips: still JPEG/PNG/WebP shrunk on load, the rest by Pillow),
``"pil"`` (Pillow only), ``"auto"`` (``"vips"`` where pyvips and libvips load, else ``"pil"``)."""

_VIPS_EXTRA = 'pip install "safeclip[vips]"'


def resolve_backend(backend: str = "auto") -> str:
    """The backend ``backend`` names here: ``"pil"`` or ``"vips"``. ``"auto"`` is ``"vips"`` where pyvips and its
    libvips load, else ``"pil"``; ``"vips"`` where they do not -> :class:`~safeclip.errors.ConfigError` naming the
    extra to install.

    >>> resolve_backend("pil")
    'pil'
    """
    if backend not in BACKENDS:
        raise ConfigError(f"decode backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if backend == "pil":
        return "pil"
    try:
        load_pyvips()
    except Exception as e:  # ImportError, or OSError from a missing/broken libvips
        if backend == "vips":
            raise ConfigError(f"decode backend 'vips' needs pyvips and libvips ({one_line(e)}); install them with "
                              f"`{_VIPS_EXTRA}`, or use backend 'pil'") from e
        return "pil"
    return "vips"


def decoder_id(backend: str = "auto") -> str:
    """What decodes with ``backend`` here, for fingerprints: ``"pil"``, or ``"vips-<libvips version>"`` (a different
    backend or libvips can give other pixels and other errors for the same bytes).

    >>> decoder_id("pil")
    'pil'
    """
    resolved = resolve_backend(backend)
    return "pil" if resolved == "pil" else f"vips-{vips_version()}"

def decode(
    source: Source,
    *,
    limits: DecodeLimits | None = None,
    target_size: int | None = None,
    background: tuple[int, int, int] | None = None,
    backend: str = "pil",
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

    Animated images (GIF, APNG, WebP) are sampled by time: the frame showing every ``1 / limits.frames_per_second``
    seconds and the last, at most ``limits.sample_frames`` (spread evenly when there would be more); ``timestamps``
    and ``duration_s`` come from the frames' durations. MPO and multi-page TIFF pages are sampled evenly by index.
    ``frame_indices`` says which frames were taken, ``sampling`` how.

    Videos (MP4/MOV, WebM/MKV; the codecs of :data:`VIDEO_CODECS`) need PyAV (``pip install "safeclip[video]"``;
    without it: :class:`UnsupportedFormatError` saying so) and are sampled the same way, each sampled frame reached by
    seeking to the keyframe before it, reduced (its shorter side to ``target_size``) and rotated upright as it is decoded
    (``frame_indices``: frame numbers; ``n_frames``: frames in the stream). A sampled frame that cannot be decoded
    fails the whole clip. See :func:`decode_chunks` to judge a long clip chunk by chunk.

    Raises a :class:`~safeclip.errors.DecodeError` subclass, whose message is one line naming the input:
    :class:`UnsupportedFormatError` (not an allowed format, not an image input, or a path that is not a regular
    file), :class:`ImageTooLargeError` (byte / pixel / frame / held-pixel limits, decompression bombs),
    :class:`TruncatedImageError` (truncated or corrupt data), :class:`DecodeTimeoutError` (over
    ``limits.timeout_s`` of CPU time, or the ``limits.wall_timeout_s`` backstop; the message says which). Bad
    arguments (``limits``, ``target_size``, ``background``) raise
    ``ValueError``/``TypeError``.

    ``backend``: see :data:`BACKENDS`. Only path, bytes and file inputs go to libvips (PIL images and arrays are
    already decoded); an unknown backend, or ``"vips"`` without pyvips -> :class:`~safeclip.errors.ConfigError`.

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
    limits = _check_args(limits, target_size)
    bgs = limits.backgrounds if background is None else (check_background(background),)
    use_vips = resolve_backend(backend) == "vips"

    if isinstance(source, Image.Image):
        deadline = Deadline(limits, "<PIL>")
        return decode_image(source, "PIL", "<PIL>", limits, target_size, bgs, deadline)
    if isinstance(source, np.ndarray):
        name = "<ndarray>"
        deadline = Deadline(limits, name)
        image = array_to_image(source, name, limits)
        return decode_image(image, "ndarray", name, limits, target_size, bgs, deadline)
    deadline = Deadline(limits, None)
    data, name = read_source(source, max_bytes=limits.max_bytes)
    if data is None:  # read_source returns None only for PIL / ndarray inputs, handled above
        raise UnsupportedFormatError("no bytes to decode", name)
    deadline.name = name
    deadline.check("after reading the input")
    kind = sniff_video(data)
    if kind is not None:
        return decode_video(data, kind, name, limits, target_size, deadline)
    if use_vips:
        return vips_decode_file(data, name, limits, target_size, bgs, deadline)
    return decode_file(data, name, limits, target_size, bgs, deadline)


def _check_args(limits: DecodeLimits | None, target_size: int | None) -> DecodeLimits:
    if limits is None:
        limits = DecodeLimits()
    elif not isinstance(limits, DecodeLimits):
        raise TypeError(f"limits must be a DecodeLimits, got {type(limits).__name__}")
    if target_size is not None and (
        isinstance(target_size, bool) or not isinstance(target_size, int) or target_size < 1
    ):
        raise ValueError(f"target_size must be a positive int or None, got {target_size!r}")
    return limits


def decode_chunks(
    source: Source,
    *,
    limits: DecodeLimits | None = None,
    target_size: int | None = None,
    chunk_frames: int = 8,
    backend: str = "pil",
) -> Iterator[Decoded]:
    """Decode ``source`` like :func:`decode`, yielding the sampled frames of a video ``chunk_frames`` at a time (the
    first chunk only two: an early stop on the first seconds costs little), in time order, so that a caller can stop
    early (a clip already blocked on its first seconds) and hold one chunk at a time. Each chunk is a
    :class:`Decoded` with the clip's ``sha256``, ``format``, ``size``, ``n_frames``, ``duration_s`` and
    ``sampling``, and only that chunk's ``frames``, ``frame_indices``, ``timestamps`` and ``backgrounds``. Anything
    that is not a video (a still, an animated GIF) yields one :class:`Decoded`, the one :func:`decode` returns.
    ``limits.max_total_pixels`` bounds the pixels of one chunk; the time budget (``limits.timeout_s``,
    ``wall_timeout_s``) counts the decoding of the whole clip, not the caller's work between chunks. Sampling more
    frames (``sample_frames``) of long clips may need a larger ``timeout_s``.

    Errors are raised where they happen: an error after some chunks were yielded means the clip failed as a whole;
    never act on the chunks seen before it as if they were the clip (fail closed).

    >>> import io
    >>> from PIL import Image
    >>> buf = io.BytesIO()
    >>> Image.new("RGB", (40, 30)).save(buf, "PNG")
    >>> [(d.format, d.frame_indices) for d in decode_chunks(buf.getvalue())]
    [('PNG', (0,))]
    """
    limits = _check_args(limits, target_size)
    if isinstance(chunk_frames, bool) or not isinstance(chunk_frames, int) or chunk_frames < 1:
        raise ValueError(f"chunk_frames must be a positive int, got {chunk_frames!r}")
    use_vips = resolve_backend(backend) == "vips"
    if isinstance(source, (Image.Image, np.ndarray)):
        yield decode(source, limits=limits, target_size=target_size)
        return
    deadline = Deadline(limits, None)
    data, name = read_source(source, max_bytes=limits.max_bytes)
    if data is None:
        raise UnsupportedFormatError("no bytes to decode", name)
    deadline.name = name
    deadline.check("after reading the input")
    kind = sniff_video(data)
    if kind is None:
        still = vips_decode_file if use_vips else decode_file
        yield still(data, name, limits, target_size, limits.backgrounds, deadline)
        return
    yield from video_chunks(data, kind, name, limits, target_size, deadline, chunk_frames)

