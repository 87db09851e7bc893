"""safeclip.decode: every input kind, every mode, limits, bombs, the bad / tricky corpora."""

from __future__ import annotations

import csv
import doctest
import hashlib
import importlib
import io
import json
import multiprocessing
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import types
import warnings
import zlib
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import GifImagePlugin, Image, ImageFile, ImageOps, WebPImagePlugin

from safeclip.decode import ALLOWED_FORMATS, DecodeLimits, Decoded, decode, read_source
from safeclip.errors import (
    DecodeError,
    DecodeTimeoutError,
    ImageTooLargeError,
    TruncatedImageError,
    UnsupportedFormatError,
)

# safeclip/__init__ re-exports the function ``decode``, which shadows the submodule attribute ``safeclip.decode``
decode_module = importlib.import_module("safeclip.decode")
decode_common = importlib.import_module("safeclip.decode._common")  # the time budget's clocks

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"
if not CORPUS.is_dir():  # CI clones main into another folder with shared/ beside it
    CORPUS = Path(os.environ.get("SAFECLIP_CORPUS", "../shared/corpus")).resolve()
BAD = CORPUS / "bad"
TRICKY = CORPUS / "tricky"
PHOTOS = CORPUS / "photos"
DOCS = {"MANIFEST.csv", "README.md", "PILLOW-LICENSE"}  # the corpus' own documentation, not test inputs

needs_corpus = pytest.mark.skipif(not CORPUS.is_dir(), reason=f"corpus not found at {CORPUS}")


def _files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name not in DOCS)


def _manifest() -> dict[str, str]:
    path = BAD / "MANIFEST.csv"
    if not path.is_file():
        return {}
    with path.open(newline="") as f:
        return {row["file"]: row["pillow13_result"] for row in csv.DictReader(f)}


BAD_FILES = _files(BAD)
TRICKY_FILES = _files(TRICKY)
MANIFEST = _manifest()
ALLOWED_EXTS = {".jpg", ".jpeg", ".png", ".apng", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".mpo", ".avif"}
FOREIGN_EXTS = {  # formats safeclip never hands to Pillow
    ".eps", ".jp2", ".j2k", ".fli", ".flc", ".sgi", ".psd", ".pcx", ".ico", ".icns", ".cur", ".dds", ".blp",
    ".grb", ".h5", ".wmf", ".fpx", ".doc", ".gpl", ".lut", ".pil", ".wal", ".spider", ".ppm", ".pdf", ".txt",
    ".container", ".bufr_d",
}


def rgb_array(d: Decoded, i: int = 0) -> np.ndarray:
    return np.asarray(d.frames[i]).astype(np.int16)


def png_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", **kw)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A ~60-byte PNG whose IHDR claims width x height RGB pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def thin_png(width: int, height: int, *, period: int = 9973) -> bytes:
    """A few-hundred-byte RGB PNG of ``width`` x ``height`` (a 1x100000 one: about 500 bytes), in bands of ``period``
    pixels along its longer side whose colours change from band to band (so where a crop falls shows)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    def colour(i: int) -> bytes:
        band = i // period
        return bytes(((band * 71) % 256, (band * 29 + 100) % 256, (255 - band * 13) % 256))

    if width > height:
        row = b"\0" + b"".join(colour(x) for x in range(width))
        rows = row * height
    else:
        rows = b"".join(b"\0" + colour(y) * width for y in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(rows, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _riff_chunk(tag: bytes, payload: bytes) -> bytes:
    return tag + struct.pack("<I", len(payload)) + payload + (b"\0" if len(payload) % 2 else b"")


def webp_animation(canvas: tuple[int, int], frames: int, *, alpha: bool = False) -> bytes:
    """An animated WebP of ``frames`` 4x4 frames scattered on a ``canvas``-sized canvas: ~1 KB for 20 frames, however
    large the canvas (libwebp composes every frame on the whole canvas)."""
    w, h = canvas
    buf = io.BytesIO()
    Image.new("RGBA", (4, 4), (255, 255, 255, 255)).save(buf, "WEBP", lossless=True)
    vp8l = buf.getvalue()[12:]  # the VP8L chunk of a still image
    assert vp8l[:4] == b"VP8L"
    body = b""
    for k in range(frames):
        x, y = (k * 74) % max(2, w - 4), (k * 106) % max(2, h - 4)
        anmf = b"".join(v.to_bytes(3, "little") for v in (x // 2, y // 2, 3, 3, 50)) + b"\0"
        body += _riff_chunk(b"ANMF", anmf + vp8l)
    vp8x = bytes([0x02 | (0x10 if alpha else 0), 0, 0, 0]) + (w - 1).to_bytes(3, "little") + (h - 1).to_bytes(3, "little")
    payload = b"WEBP" + _riff_chunk(b"VP8X", vp8x) + _riff_chunk(b"ANIM", b"\0" * 6) + body
    return b"RIFF" + struct.pack("<I", len(payload)) + payload


def gif_animation(canvas: tuple[int, int], frames: int, *, transparent: bool = False) -> bytes:
    """A GIF of ``frames`` 1x1 white frames scattered on a black (or, ``transparent``, clear) ``canvas``: 23 bytes a
    frame, however large the canvas (Pillow composes every frame on the whole canvas)."""
    w, h = canvas
    out = bytearray(b"GIF89a" + struct.pack("<HH", w, h) + bytes([0x80, 0, 0]) + b"\0\0\0\xff\xff\xff")
    for k in range(frames):
        out += b"\x21\xf9\x04" + (b"\x01" if transparent else b"\x00") + b"\x05\x00\x00\x00"  # 50 ms, clear = 0
        out += b"\x2c" + struct.pack("<HHHH", (k * 37) % w, (k * 53) % h, 1, 1) + b"\x00"
        out += b"\x02\x02\x4c\x01\x00"  # LZW: clear, colour 1 (white), end
    return bytes(out + b"\x3b")


def white_drawing_on_clear(size: tuple[int, int] = (64, 48)) -> Image.Image:
    """White strokes on a fully transparent canvas: blank on a white page, plain to see on a dark one."""
    im = Image.new("RGBA", size, (255, 255, 255, 0))
    for x in range(8, size[0] - 8):
        im.putpixel((x, size[1] // 2), (255, 255, 255, 255))
        im.putpixel((x, x * (size[1] - 1) // size[0]), (255, 255, 255, 255))
    return im


def assert_valid(d: Decoded) -> None:
    """A well-formed Decoded: each sampled frame once if opaque (background None), else once per background."""
    backgrounds = DecodeLimits().backgrounds
    assert isinstance(d, Decoded)
    assert len(d.frames) == len(d.frame_indices) == len(d.backgrounds) >= 1
    assert list(d.frame_indices) == sorted(d.frame_indices)
    assert 0 <= d.frame_indices[0] and d.frame_indices[-1] < d.n_frames
    for i in set(d.frame_indices):
        bgs = tuple(b for j, b in zip(d.frame_indices, d.backgrounds) if j == i)
        assert bgs in ((None,), tuple(backgrounds)), bgs
    for fr in d.frames:
        assert fr.mode == "RGB"
        assert fr.size[0] > 0 and fr.size[1] > 0
    assert d.size == d.frames[0].size
    assert len(d.sha256) == 64


# ------------------------------------------------------------------------------------------------ docs and constants


def test_docstring_examples_run():
    results = [doctest.testmod(m, optionflags=doctest.ELLIPSIS) for m in (decode_module, decode_common)]
    assert sum(r.attempted for r in results) >= 5 and sum(r.failed for r in results) == 0


def test_allowed_formats():
    for fmt in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"):
        assert fmt in ALLOWED_FORMATS
    for fmt in ("EPS", "PS", "PDF", "JPEG2000", "PSD", "ICO", "FLI", "SGI", "WMF", "XBM", "XPM"):
        assert fmt not in ALLOWED_FORMATS


def test_limits_validated():
    assert DecodeLimits() == DecodeLimits(64 * 2**20, 64_000_000, 1000, 32, 10.0)
    for bad in ({"max_bytes": 0}, {"max_pixels": -1}, {"sample_frames": 0}, {"timeout_s": 0}, {"max_frames": 2.5}):
        with pytest.raises(ValueError):
            DecodeLimits(**bad)
    with pytest.raises(ValueError):
        decode(b"x", target_size=0)
    with pytest.raises(ValueError):
        decode(b"x", background=(0, 0))
    with pytest.raises(TypeError):
        decode(b"x", limits={"max_bytes": 3})


# ------------------------------------------------------------------------------------------------ the bad corpus


def expected_kind(path: Path) -> type[DecodeError]:
    """The subclass a bad file must raise, where the manifest and extension make it unambiguous."""
    ext = path.suffix.lower()
    pillow = MANIFEST.get(path.name, "")
    if ext in FOREIGN_EXTS:
        return UnsupportedFormatError
    if ext in ALLOWED_EXTS and "DecompressionBombError" in pillow:
        return ImageTooLargeError
    if ext in ALLOWED_EXTS and "truncated" in pillow:
        return TruncatedImageError
    return DecodeError


@needs_corpus
def test_bad_corpus_is_listed():
    assert len(BAD_FILES) >= 100
    missing = {name for name in MANIFEST if not (BAD / name).is_file()}
    assert not missing, f"listed in MANIFEST.csv but absent: {sorted(missing)}"


@pytest.mark.parametrize("path", BAD_FILES, ids=[p.name for p in BAD_FILES])
def test_bad_file_raises_decode_error(path: Path):
    t0 = time.thread_time()  # the budget is the decoding thread's CPU time: a busy machine may take longer
    with pytest.raises(DecodeError) as info:
        decode(path, limits=DecodeLimits(timeout_s=5.0))
    elapsed = time.thread_time() - t0
    err = info.value
    assert isinstance(err, expected_kind(path)), f"{type(err).__name__}: {err}"
    msg = str(err)
    assert "\n" not in msg and str(path) in msg and err.source == str(path)
    assert err.reason and len(msg) < 400
    assert elapsed < 5.0
    # the same bytes, in memory, fail the same way
    with pytest.raises(type(err)):
        decode(path.read_bytes())


@needs_corpus
def test_bad_corpus_writes_nothing_to_stderr(capfd):
    """Issue 21 item 3: libtiff printed "tempfile.tif: WEBP compression support is not configured." to stderr (from
    C, naming Pillow's in-memory file) for hostile TIFFs. A file's problem is its error, never a line on stderr."""
    capfd.readouterr()
    with warnings.catch_warnings():  # Pillow's Python warnings are the application's to filter (the audit does)
        warnings.simplefilter("ignore")
        for path in BAD_FILES:
            sources: list = [path, path.read_bytes()]
            if path.suffix.lower() in (".tif", ".tiff"):  # a PIL image not loaded yet: decode() loads it
                try:
                    sources.append(Image.open(path))
                except Exception:  # noqa: BLE001 - Pillow cannot even open it: nothing for decode() to load
                    pass
            for source in sources:
                with pytest.raises(DecodeError):
                    decode(source)
    out, err = capfd.readouterr()
    assert err == "" and out == ""


@needs_corpus
def test_libtiff_message_is_the_files_error_and_others_keep_theirs(capfd):
    path = BAD / "hopper_webp.tif"  # WebP-compressed: a compression this libtiff was built without
    if not path.is_file():
        pytest.skip("hopper_webp.tif not in the corpus")
    capfd.readouterr()
    with pytest.raises(DecodeError, match="WEBP compression support is not configured") as info:
        decode(path)
    assert isinstance(info.value, UnsupportedFormatError)
    assert info.value.reason.count("not configured") == 1  # once, however often libtiff said it
    assert capfd.readouterr().err == ""
    # Pillow used outside decode(): libtiff's messages go where they went before, also while other threads decode
    with Image.open(path) as im, pytest.raises(OSError):
        im.load()
    per_load = capfd.readouterr().err.count("WEBP compression support is not configured")
    assert per_load >= 1

    def direct_loads() -> None:
        for _ in range(10):
            with Image.open(path) as im, pytest.raises(OSError):
                im.load()

    with ThreadPoolExecutor(3) as pool:
        decodes = [pool.submit(decode, path) for _ in range(20)]
        direct_loads()
        assert all(isinstance(f.exception(), UnsupportedFormatError) for f in decodes)
    assert capfd.readouterr().err.count("WEBP compression support is not configured") == 10 * per_load


# ------------------------------------------------------------------------------------------------ the tricky corpus


@pytest.mark.parametrize("path", TRICKY_FILES, ids=[p.name for p in TRICKY_FILES])
def test_tricky_file_decodes(path: Path):
    if path.suffix == ".avif" and "AVIF" not in ALLOWED_FORMATS:
        pytest.skip("no AVIF support in this Pillow")
    d = decode(path)
    assert_valid(d)
    for fr in d.frames:
        assert fr.size == d.size
    assert d.nbytes == path.stat().st_size
    assert d.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert d.format in ALLOWED_FORMATS and d.source == str(path)


@needs_corpus
@pytest.mark.parametrize("ext", ["jpg", "webp"])
@pytest.mark.parametrize("n", range(2, 9))
def test_exif_orientation_applied(n: int, ext: str):
    ref = rgb_array(decode(TRICKY / "hopper.jpg"))
    path = TRICKY / f"hopper_orientation_{n}.{ext}"
    got = rgb_array(decode(path))
    raw = np.asarray(Image.open(path).convert("RGB")).astype(np.int16)  # as stored, not transposed
    oriented = np.abs(got - ref).mean()
    unoriented = np.abs(raw - ref).mean()
    assert oriented < 10, oriented  # lossy re-encodes of the same picture: ~4.5
    assert unoriented > 40, unoriented  # forgetting the orientation: ~60-80
    # the orientation metadata is gone from the frame: a second exif_transpose is a no-op
    again = np.asarray(ImageOps.exif_transpose(decode(path).frames[0])).astype(np.int16)
    assert np.array_equal(again, got)


@needs_corpus
def test_orientation_swaps_size():
    d = decode(TRICKY / "rot1mir0.avif") if "AVIF" in ALLOWED_FORMATS else None
    if d is not None:  # AVIF irot/imir arrive as EXIF orientation 5: 427x640 stored -> 640x427 shown
        assert d.size == (640, 427)
    # a JPEG with orientation 6 (rotate 90) made here: 40x20 stored -> 20x40
    im = Image.new("RGB", (40, 20), (200, 10, 10))
    im.paste((10, 10, 200), (0, 0, 10, 20))  # blue band on the left
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    d = decode(buf.getvalue())
    assert d.size == (20, 40)
    top = np.asarray(d.frames[0])[:5].mean((0, 1))
    assert top[2] > 150 and top[0] < 80  # the left band is now on top


def test_broken_exif_does_not_fail():
    im = Image.new("RGB", (32, 16), (30, 120, 200))
    plain = io.BytesIO()
    im.save(plain, "JPEG", quality=95)
    expected = rgb_array(decode(plain.getvalue()))
    for exif in (
        b"Exif\x00\x00II*\x00\xff\xff\xff\x7f",  # IFD offset past the end
        b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff" + b"\x01" * 40,  # absurd entry count
        b"Exif\x00\x00garbage-garbage-garbage",
        b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x01\x00\x12\x01\x03\x00\x01\x00\x00\x00\x63\x00\x00\x00",  # 99
    ):
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=95, exif=exif)
        d = decode(buf.getvalue())
        assert d.size == (32, 16)
        assert np.abs(rgb_array(d) - expected).max() <= 1


@needs_corpus
@pytest.mark.parametrize("name,n", [("iss634.gif", 42), ("iss634.webp", 42), ("iss634.apng", 41)])
def test_animation_sampled(name: str, n: int):
    """Sampled by time since DECODER_VERSION 4 (issue 24; was: ``sample_frames`` evenly by index): the frame showing
    at every second, and the last; the cap spreads that many instants evenly over the animation."""
    d = decode(TRICKY / name)
    assert d.n_frames == n
    assert d.frame_indices[0] == 0 and d.frame_indices[-1] == n - 1
    assert d.timestamps[0] == 0.0 and d.duration_s is not None and 2.5 < d.duration_s < 3.0  # ~70 ms a frame
    assert len(d.frames) == 4  # the frames showing at 0, 1 and 2 s, and the last
    assert all(t <= k < t + 0.2 for k, t in zip((0, 1, 2), d.timestamps))
    assert d.sampling == "1 fps, at most 32 frames, first and last included"
    arrays = [rgb_array(d, i) for i in range(4)]
    assert sum(np.abs(a - arrays[0]).mean() > 1 for a in arrays[1:]) >= 2  # the frames really differ

    fast = DecodeLimits(frames_per_second=100)  # every frame is shown at one of the instants, 10 ms apart
    for k, want_len in ((1, 1), (3, 3), (100, n)):
        d = decode(TRICKY / name, limits=DecodeLimits(sample_frames=k, frames_per_second=100))
        assert len(d.frame_indices) == want_len and d.frame_indices[0] == 0
        assert k == 1 or d.frame_indices[-1] == n - 1
    d = decode(TRICKY / name, limits=fast)  # 32 instants spread evenly (two may fall on one frame)
    assert 28 <= len(d.frame_indices) <= 32 and d.frame_indices[-1] == n - 1 and "spread evenly" in (d.sampling or "")
    assert max(np.diff(d.timestamps)) < 2 * d.timestamps[-1] / 31  # no gap much wider than the spread's step


@needs_corpus
def test_animated_frames_match_pillow():
    """Sampled frames are Pillow's composited frames, flattened on the background."""
    d = decode(TRICKY / "iss634.gif", limits=DecodeLimits(sample_frames=3), background=(0, 0, 0))
    with Image.open(TRICKY / "iss634.gif") as im:
        for idx, frame in zip(d.frame_indices, d.frames):
            im.seek(idx)
            ref = Image.new("RGB", im.size, (0, 0, 0))
            rgba = im.convert("RGBA")
            ref.paste(rgba, (0, 0), rgba)
            assert np.array_equal(np.asarray(frame), np.asarray(ref))


@needs_corpus
def test_mpo_frames():
    d = decode(TRICKY / "frozenpond.mpo")
    assert d.format == "MPO" and d.n_frames == 2 and d.frame_indices == (0, 1)


@needs_corpus
def test_cmyk_jpeg_is_sane_rgb():
    d = decode(TRICKY / "pil_sample_cmyk.jpg")
    a = np.asarray(d.frames[0])
    with Image.open(TRICKY / "pil_sample_cmyk.jpg") as im:
        assert im.mode == "CMYK"
        assert np.array_equal(a, np.asarray(im.convert("RGB")))
    # "RED" in red letters on black: a red-dominant picture, not inverted (that would be mostly white / cyan)
    assert a.mean() < 60 and a[..., 0].max() > 200 and a[..., 0].mean() > 3 * a[..., 1].mean()


@needs_corpus
@pytest.mark.parametrize("name", ["i_trns.png", "l_trns.png", "1_trns.png", "p_trns_single.png", "rgb_trns.png"])
def test_transparency_becomes_background(name: str):
    bg = (1, 2, 3)
    with Image.open(TRICKY / name) as im:
        im.load()
        trns = im.info["transparency"]
        raw = np.asarray(im)
        mask = (raw == np.array(trns)).all(-1) if raw.ndim == 3 else raw == (bool(trns) if im.mode == "1" else trns)
    assert mask.any() and not mask.all()
    a = np.asarray(decode(TRICKY / name, background=bg).frames[0])
    assert (a[mask] == bg).all()
    assert not (a[~mask] == bg).all(-1).any()
    a2 = np.asarray(decode(TRICKY / name, background=(250, 0, 250)).frames[0])
    assert (a2[mask] == (250, 0, 250)).all() and np.array_equal(a2[~mask], a[~mask])


def test_sixteen_bit_gray_scaled_not_clipped():
    ramp = (np.arange(64 * 16, dtype=np.uint16).reshape(16, 64) * 64).astype(np.uint16)  # 0..65472
    d = decode(png_bytes(Image.fromarray(ramp)))  # a 16-bit grayscale PNG
    with Image.open(io.BytesIO(png_bytes(Image.fromarray(ramp)))) as im:
        assert im.mode == "I;16"
    a = np.asarray(d.frames[0]).astype(np.int64)
    assert np.array_equal(a[..., 0], ramp >> 8) and a.max() == 255  # >> 8: not clipped at 255, not min-max
    assert np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 1], a[..., 2])


@needs_corpus
def test_sixteen_bit_png_with_transparency():
    with Image.open(TRICKY / "i_trns.png") as im:
        raw = np.asarray(im).astype(np.int64)
        assert im.mode == "I;16" and im.info["transparency"] == 255
    a = np.asarray(decode(TRICKY / "i_trns.png", background=(0, 200, 0)).frames[0]).astype(np.int64)
    keep = raw != 255
    assert np.array_equal(a[..., 0][keep], raw[keep] >> 8)  # values 0..255 of 65535: near black, as viewers show
    assert (a[~keep] == (0, 200, 0)).all()


@needs_corpus
def test_rgba_composited_not_dropped():
    path = TRICKY / "pil123rgba.png"
    with Image.open(path) as im:
        rgba = np.asarray(im.convert("RGBA")).astype(np.float64)
    alpha = rgba[..., 3:] / 255.0
    assert ((alpha > 0) & (alpha < 1)).any() and (alpha == 0).any()
    for bg in ((255, 255, 255), (0, 0, 0)):
        want = rgba[..., :3] * alpha + np.array(bg) * (1 - alpha)
        got = rgb_array(decode(path, background=bg))
        assert np.abs(got - want).max() <= 1.0


def test_alpha_is_judged_on_a_light_and_a_dark_background():
    """Issue 9 item 2: white content on a clear canvas must not reach the model as a blank white page."""
    drawing = white_drawing_on_clear()
    blank = np.full((48, 64, 3), 255, np.uint8)
    for source in (png_bytes(drawing), drawing, np.asarray(drawing)):
        d = decode(source)
        assert_valid(d)
        assert d.n_frames == 1 and d.frame_indices == (0, 0) and d.size == (64, 48)
        assert d.backgrounds == ((255, 255, 255), (0, 0, 0))
        on_white, on_black = (np.asarray(f) for f in d.frames)
        assert np.array_equal(on_white, blank)  # what a light page shows: nothing
        assert not np.array_equal(on_black, blank) and not (on_black == 0).all()  # the drawing, in white on black
        strokes = np.asarray(drawing)[..., 3] == 255
        assert (on_black[strokes] == 255).all() and (on_black[~strokes] == 0).all()


def test_backgrounds_are_an_option_and_opaque_images_keep_one_frame():
    drawing = png_bytes(white_drawing_on_clear())
    grey = decode(drawing, limits=DecodeLimits(backgrounds=((128, 128, 128),)))
    assert grey.backgrounds == ((128, 128, 128),) and len(grey.frames) == 1
    assert decode(drawing, background=(0, 0, 255)).backgrounds == ((0, 0, 255),)  # one colour, as asked
    three = decode(drawing, limits=DecodeLimits(backgrounds=[(255, 255, 255), (0, 0, 0), (255, 0, 255), (0, 0, 0)]))
    assert three.backgrounds == ((255, 255, 255), (0, 0, 0), (255, 0, 255))  # duplicates dropped, order kept
    # opaque inputs, even RGBA ones with alpha 255 everywhere, are one frame with no background: as before
    for source in (png_bytes(Image.new("RGBA", (8, 8), (10, 20, 30, 255))), Image.new("RGB", (8, 8)),
                   png_bytes(Image.new("L", (8, 8), 7))):
        d = decode(source)
        assert d.backgrounds == (None,) and len(d.frames) == 1 and d.frame_indices == (0,)
    # a partly transparent pixel is real alpha
    im = Image.new("RGBA", (8, 8), (10, 20, 30, 255))
    im.putpixel((3, 3), (10, 20, 30, 254))
    assert len(decode(im).frames) == 2
    for bad in ((), ((0, 0),), "white", ((0, 0, 256),), None):
        with pytest.raises(ValueError, match="background"):
            DecodeLimits(backgrounds=bad)


def test_animated_transparency_gives_views_per_frame():
    """A frame is judged on every background only where it has real alpha; the others stay one frame."""
    every = {"frames_per_second": 100}  # 50 ms frames: sampled at 100 fps, the cap of 3 spreads evenly over them
    d = decode(gif_animation((40, 30), 5, transparent=True), limits=DecodeLimits(sample_frames=3, **every))
    assert_valid(d)
    assert d.frame_indices == (0, 0, 2, 2, 4, 4) and d.backgrounds == ((255, 255, 255), (0, 0, 0)) * 3
    white, black = np.asarray(d.frames[4]), np.asarray(d.frames[5])
    assert (white == 255).all() and (black == 255).any() and (black == 0).any()  # white dots, seen on black only
    opaque = decode(gif_animation((40, 30), 5), limits=DecodeLimits(sample_frames=3, **every))
    assert opaque.frame_indices == (0, 2, 4) and opaque.backgrounds == (None,) * 3


# ------------------------------------------------------------------------------------------------ input kinds


@needs_corpus
def test_input_kinds_agree(tmp_path: Path):
    path = TRICKY / "hopper.jpg"
    data = path.read_bytes()
    ref = decode(path)
    assert ref.sha256 == hashlib.sha256(data).hexdigest() and ref.nbytes == len(data)
    with path.open("rb") as f:
        from_file = decode(f)
    assert from_file.source == str(path)
    bio = io.BytesIO(b"junk" + data)
    bio.seek(4)  # read from the current position
    for other in (decode(str(path)), decode(data), decode(bytearray(data)), decode(memoryview(data)),
                  decode(io.BytesIO(data)), decode(bio), from_file):
        assert other.sha256 == ref.sha256 and other.format == "JPEG" and other.nbytes == len(data)
        assert np.array_equal(np.asarray(other.frames[0]), np.asarray(ref.frames[0]))
    assert decode(data).source == "<bytes>" and decode(io.BytesIO(data)).source == "<file>"
    assert read_source(path) == (data, str(path))
    assert read_source(Image.new("L", (2, 2))) == (None, "<PIL>")
    assert read_source(np.zeros((2, 2), np.uint8)) == (None, "<ndarray>")


def test_pil_input():
    im = Image.new("RGB", (30, 20), (10, 20, 30))
    d = decode(im)
    assert_valid(d)
    assert d.format == "PIL" and d.nbytes == 0 and d.source == "<PIL>" and d.n_frames == 1
    assert d.frames[0] is not im and d.frames[0].getpixel((0, 0)) == (10, 20, 30)
    expected = hashlib.sha256(b"RGB 30x20\n" + im.tobytes()).hexdigest()
    assert d.sha256 == expected
    assert decode(im.copy()).sha256 == expected
    im2 = im.copy()
    im2.putpixel((3, 3), (0, 0, 0))
    assert decode(im2).sha256 != expected
    # the same pixels as an ndarray hash the same
    assert decode(np.asarray(im)).sha256 == expected


@needs_corpus
def test_pil_animated_input_restores_position():
    with Image.open(TRICKY / "iss634.gif") as im:
        im.seek(5)
        d = decode(im, limits=DecodeLimits(sample_frames=3))
        assert d.frame_indices == (0, 20, 41) and d.n_frames == 42
        assert im.tell() == 5


@needs_corpus
def test_pil_input_of_a_foreign_format_is_refused_unloaded():
    with Image.open(BAD / "pil_sample_cmyk.eps") as im:  # would run Ghostscript on load
        assert im.format == "EPS"
        with pytest.raises(UnsupportedFormatError, match="EPS"):
            decode(im)


def test_ndarray_inputs():
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (12, 10), dtype=np.uint8)
    d = decode(gray)
    assert d.format == "ndarray" and d.size == (10, 12) and d.nbytes == 0
    a = np.asarray(d.frames[0])
    assert np.array_equal(a[..., 0], gray) and np.array_equal(a[..., 2], gray)

    rgb = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(decode(rgb).frames[0]), rgb)
    assert np.array_equal(np.asarray(decode(rgb[:, ::-1]).frames[0]), rgb[:, ::-1])  # non-contiguous

    rgba = np.concatenate([rgb, np.zeros((12, 10, 1), np.uint8)], axis=2)
    rgba[:6, :, 3] = 255
    out = np.asarray(decode(rgba, background=(7, 8, 9)).frames[0])
    assert np.array_equal(out[:6], rgb[:6]) and (out[6:] == (7, 8, 9)).all()

    for dtype in (np.float32, np.float64, np.float16):
        f = (rgb / 255.0).astype(dtype)
        got = np.asarray(decode(f).frames[0]).astype(int)
        assert np.abs(got - rgb).max() <= 1
    assert decode(np.ones((4, 4))).frames[0].getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((4, 4, 2), np.uint8),
        np.zeros((4, 4, 5), np.uint8),
        np.zeros((4, 4, 1), np.uint8),
        np.zeros(16, np.uint8),
        np.zeros((2, 4, 4, 3), np.uint8),
        np.zeros((0, 4, 3), np.uint8),
        np.zeros((4, 4), np.int64),
        np.zeros((4, 4), np.uint16),
        np.zeros((4, 4), bool),
        np.zeros((4, 4), object),
        np.full((4, 4), 2.0),
        np.full((4, 4), -0.5),
        np.full((4, 4), np.nan),
        np.array(3),
    ],
    ids=lambda a: f"{a.dtype}{a.shape}",
)
def test_bad_ndarray_rejected(array: np.ndarray):
    with pytest.raises(DecodeError) as info:
        decode(array)
    assert "\n" not in str(info.value) and "<ndarray>" in str(info.value)


@pytest.mark.parametrize("source", [12, 3.5, None, ["a.jpg"], {"path": "x"}, object()])
def test_unsupported_input_types(source):
    with pytest.raises(DecodeError):
        decode(source)


def test_unreadable_paths(tmp_path: Path):
    with pytest.raises(DecodeError, match="not found"):
        decode(tmp_path / "missing.jpg")
    with pytest.raises(DecodeError, match="directory"):
        decode(tmp_path)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(TruncatedImageError, match="empty"):
        decode(empty)
    text = tmp_path / "t.txt"
    text.write_text("hello")
    with text.open("r") as f, pytest.raises(DecodeError, match="binary mode"):
        decode(f)

    class Exploding(io.RawIOBase):
        def readable(self):
            return True

        def readinto(self, b):
            raise OSError("device on fire")

    with pytest.raises(DecodeError, match="device on fire"):
        decode(Exploding())


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_fifo_refused_before_opening(tmp_path: Path):
    """Issue 9 item 11: open() on a FIFO blocks until a writer comes, whatever the time budget."""
    fifo = tmp_path / "upload.png"
    os.mkfifo(fifo)
    link = tmp_path / "link.png"
    link.symlink_to(fifo)
    outcome: dict[str, BaseException] = {}

    def run(source) -> None:
        try:
            decode(source, limits=DecodeLimits(timeout_s=1.0))
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            outcome[str(source)] = e

    try:
        for source in (fifo, link, str(fifo)):
            t = threading.Thread(target=run, args=(source,), daemon=True)
            t.start()
            t.join(10.0)
            assert not t.is_alive(), f"decode({source}) is blocked in open()"
            err = outcome[str(source)]
            assert isinstance(err, UnsupportedFormatError), repr(err)
            assert "FIFO" in str(err) and str(source) in str(err) and "\n" not in str(err)
    finally:  # unblock a reader stuck in open() (the code before the fix), so the thread can end
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
    with pytest.raises(UnsupportedFormatError, match="FIFO"):
        read_source(fifo)


def test_other_non_regular_files_refused(tmp_path: Path):
    with pytest.raises(UnsupportedFormatError, match="is a directory, not a regular file"):
        decode(tmp_path)
    if hasattr(socket, "AF_UNIX"):
        path = tmp_path / "s.jpg"
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(path))
            with pytest.raises(UnsupportedFormatError, match="is a socket"):
                decode(path)
    if os.path.exists("/dev/zero"):  # endless zeros: refused from its kind, not read up to the byte limit
        with pytest.raises(UnsupportedFormatError, match="character device"):
            decode("/dev/zero")


@pytest.mark.parametrize(
    "mode,value,expected",
    [
        ("1", 1, (255, 255, 255)),
        ("L", 77, (77, 77, 77)),
        ("I;16", 40000, (156, 156, 156)),  # >> 8
        ("I;16B", 40000, (156, 156, 156)),
        ("I", 40000, (156, 156, 156)),  # 16-bit range in a 32-bit image
        ("I", 200, (200, 200, 200)),  # already 8-bit range
        ("F", 0.5, (128, 128, 128)),  # [0, 1] range
        ("F", 100.0, (100, 100, 100)),
        ("I", -5, (0, 0, 0)),  # constant images outside every range must not divide by zero
        ("I", 2**20, (255, 255, 255)),
        ("F", 1e6, (255, 255, 255)),
        ("F", float("nan"), (0, 0, 0)),
        ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
        ("YCbCr", (255, 128, 128), (255, 255, 255)),
        ("HSV", (0, 255, 255), (255, 0, 0)),
        ("LAB", (255, 128, 128), None),
        ("RGBX", (1, 2, 3, 4), (1, 2, 3)),
        ("RGBA", (10, 20, 30, 0), (9, 9, 9)),  # fully transparent -> background
        ("RGBA", (10, 20, 30, 255), (10, 20, 30)),
        ("RGBa", (10, 20, 30, 0), (9, 9, 9)),
        ("LA", (100, 0), (9, 9, 9)),
        ("LA", (100, 255), (100, 100, 100)),
        ("La", (50, 128), None),
        ("PA", (0, 0), (9, 9, 9)),
    ],
)
def test_every_mode_to_rgb(mode: str, value, expected):
    im = Image.new(mode, (6, 4), value)
    d = decode(im, background=(9, 9, 9))
    fr = d.frames[0]
    assert fr.mode == "RGB" and fr.size == (6, 4)
    px = fr.getpixel((0, 0))
    if expected is not None:
        assert all(abs(a - b) <= 1 for a, b in zip(px, expected)), px
    elif mode == "LAB":
        assert min(px) > 240  # L=255 a=b=0 is white
    elif mode == "La":  # premultiplied 50 at alpha 128 -> 100 over bg 9 at ~half
        assert abs(px[0] - (100 * 128 + 9 * 127) / 255) <= 2


def test_wide_range_pixels_min_max_scaled():
    ramp = np.arange(-100, 100, dtype=np.int32).reshape(10, 20)
    a = np.asarray(decode(Image.fromarray(ramp)).frames[0])[..., 0]
    assert a[0, 0] == 0 and a[-1, -1] == 255 and (np.diff(a.ravel().astype(int)) >= 0).all()
    f = np.linspace(-2, 3, 200, dtype=np.float32).reshape(10, 20)
    b = np.asarray(decode(Image.fromarray(f)).frames[0])[..., 0]
    assert b[0, 0] == 0 and b[-1, -1] == 255


def test_palette_with_alpha_and_files_in_odd_modes():
    p = Image.new("P", (8, 8), 0)
    p.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    p.putpixel((1, 1), 1)
    d = decode(png_bytes(p, transparency=1), background=(0, 0, 255))
    assert d.frames[0].getpixel((1, 1)) == (0, 0, 255) and d.frames[0].getpixel((0, 0)) == (255, 0, 0)
    # 16-bit big-endian TIFF and float TIFF through the byte path
    for mode, value, expected in (("I;16B", 0x8000, 128), ("I;16", 0xFFFF, 255), ("F", 0.25, 64)):
        buf = io.BytesIO()
        Image.new(mode, (5, 3), value).save(buf, "TIFF")
        d = decode(buf.getvalue())
        assert d.format == "TIFF" and d.frames[0].getpixel((2, 1)) == (expected,) * 3
    # LA PNG fully transparent on the background
    la = Image.new("LA", (4, 4), (200, 0))
    assert decode(png_bytes(la), background=(5, 6, 7)).frames[0].getpixel((0, 0)) == (5, 6, 7)


# ------------------------------------------------------------------------------------------------ limits


def test_header_bomb_refused_before_decoding(monkeypatch):
    loads = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(1) or real_load(self))
    data = png_claiming(9000, 9000)  # 81 MP: over our 64 MP, under Pillow's own warning threshold
    assert len(data) < 100
    t0 = time.monotonic()
    with pytest.raises(ImageTooLargeError, match="81000000 pixels") as info:
        decode(data)
    assert time.monotonic() - t0 < 1.0 and not loads
    assert "\n" not in str(info.value)
    with pytest.raises(ImageTooLargeError):
        decode(png_claiming(100, 100), limits=DecodeLimits(max_pixels=9_999))
    assert not loads


def two_frame_gif() -> tuple[bytes, int]:
    """A 10x10 two-frame GIF and the offset of its second image descriptor (extent 2,3 5x6)."""
    a = Image.new("P", (10, 10), 0)
    a.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    b = a.copy()
    b.paste(1, (2, 3, 7, 9))
    buf = io.BytesIO()
    a.save(buf, "GIF", save_all=True, append_images=[b])
    data = buf.getvalue()
    at = data.find(b"\x2c" + struct.pack("<HHHH", 2, 3, 5, 6))
    assert at > 0
    return data, at


def test_gif_frame_bomb_refused_before_pillow_allocates(monkeypatch):
    """Pillow grows a GIF's canvas while seeking to a frame, before its size could be checked: prescan."""
    data, at = two_frame_gif()
    assert decode(data).n_frames == 2
    bomb = bytearray(data)
    bomb[at + 5 : at + 9] = struct.pack("<HH", 9000, 9000)
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(1) or real_open(*a, **k))
    with pytest.raises(ImageTooLargeError, match="frame 1 is 9002x9003"):
        decode(bytes(bomb))
    assert not opened  # refused from the descriptor, before Pillow touched it
    with pytest.raises(ImageTooLargeError, match="2 frames, over the 1-frame limit"):
        decode(data, limits=DecodeLimits(max_frames=1))


_GIF_FRAME = b"\x2c%s\x00\x02\x02\x4c\x01\x00"  # descriptor (x0, y0, w, h; no local palette), LZW: clear, 1, end
_NETSCAPE = b"\x21\xff\x0bNETSCAPE2.0"


def gif_with_blocks(before_frame0: bytes, before_frame1: bytes, extent: tuple[int, int, int, int]) -> bytes:
    """A 40x30 two-frame GIF with raw blocks spliced in before each frame; frame 1 has ``extent``."""
    out = b"GIF89a" + struct.pack("<HH", 40, 30) + bytes([0x80, 0, 0]) + b"\0\0\0\xff\xff\xff" + before_frame0
    out += _GIF_FRAME % struct.pack("<HHHH", 0, 0, 1, 1) + before_frame1
    return out + _GIF_FRAME % struct.pack("<HHHH", *extent) + b"\x3b"


def pillow_gif_canvases(data: bytes) -> list[tuple[int, int]]:
    """The canvas Pillow reaches at each frame, decoding every frame (only for small test files)."""
    with Image.open(io.BytesIO(data)) as im:
        sizes = []
        for k in range(im.n_frames):
            im.seek(k)
            im.load()
            sizes.append(im.size)
        return sizes


# Block sequences Pillow reads in its own way. Pillow reads an extension's first sub-block and then skips sub-blocks
# up to a terminator, so after an empty first sub-block "01 21 00" is one more sub-block to it, while a parser that
# stops at the first terminator reads "21 00" as an extension whose sub-blocks start at the descriptor (0x2c = 44
# bytes) and never sees frame 1. A comment stops at its first terminator; a NETSCAPE2.0 block before frame 0 reads
# one extra sub-block.
GIF_BLOCK_QUIRKS = {
    "graphic control with an empty first sub-block": (b"", b"\x21\xf9\x00" + b"\x01\x21\x00"),
    "application block with an empty sub-block": (b"\x21\xfe\x00" + b"\x21\x01\x00\x01\x21\x00", b""),
    "comment with an empty first sub-block": (b"", b"\x21\xfe\x00"),
    "NETSCAPE2.0 with an empty loop block": (_NETSCAPE + b"\x00" + b"\x01\x21\x00", b""),
}


@pytest.mark.parametrize("case", sorted(GIF_BLOCK_QUIRKS))
def test_gif_prescan_reads_blocks_as_pillow_does(case, monkeypatch):
    """The prescan finds every frame extent Pillow will grow the canvas to, however the blocks are broken: a mutated
    GIF whose third frame Pillow grew to 33065x480 got past it (fuzzing) and was decoded at that size."""
    before0, before1 = GIF_BLOCK_QUIRKS[case]
    data = gif_with_blocks(before0, before1, (3001, 5, 1, 1))
    assert pillow_gif_canvases(data) == [(40, 30), (3002, 30)]  # Pillow sees frame 1 and grows the canvas
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(1) or real_open(*a, **k))
    with pytest.raises(ImageTooLargeError, match="GIF image frame 1 is 3002x30 "):
        decode(data, limits=DecodeLimits(max_pixels=3002 * 30 - 1))
    assert not opened
    d = decode(data, limits=DecodeLimits(max_pixels=3002 * 30))  # no phantom frame either
    assert d.n_frames == 2 and opened


def test_gif_canvas_checked_at_every_seek_of_a_pil_input(monkeypatch):
    """A PIL image handed in was never prescanned: a frame stepped over on the way to a sampled one is refused once
    Pillow has grown the canvas for it, before anything decodes it at that size."""
    small = b"\x21\xf9\x04\x00\x64\x00\x00\x00"  # 1 s a frame
    data = gif_with_blocks(small, small, (1999, 1999, 1, 1))
    data = data[:-1] + small + _GIF_FRAME % struct.pack("<HHHH", 3, 3, 1, 1) + b"\x3b"  # a third frame
    loaded = []
    real_load = GifImagePlugin.GifImageFile.load
    monkeypatch.setattr(GifImagePlugin.GifImageFile, "load", lambda im: loaded.append(im.size) or real_load(im))
    im = Image.open(io.BytesIO(data))
    assert im.n_frames == 3
    with pytest.raises(ImageTooLargeError, match="PIL image frame 1 is 2000x2000 "):
        decode(im, limits=DecodeLimits(max_pixels=1_000_000, frames_per_second=0.1))
    assert loaded and max(w * h for w, h in loaded) <= 1_000_000, loaded


def test_webp_canvas_checked_before_open():
    buf = io.BytesIO()
    frames = [Image.new("RGB", (8, 8), (i * 50, 0, 0)) for i in range(2)]
    frames[0].save(buf, "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"VP8X"
    data[24:30] = (12000 - 1).to_bytes(3, "little") * 2  # 144 MP canvas
    with pytest.raises(ImageTooLargeError, match="canvas is 12000x12000"):
        decode(bytes(data))


_PEAK_RSS = r"""
import json, resource, sys, time, warnings
warnings.simplefilter("ignore")
from safeclip.decode import DecodeLimits, decode
from safeclip.errors import DecodeError
data = open(sys.argv[1], "rb").read()
args = json.loads(sys.argv[2])
limits = DecodeLimits(**args.pop("limits", {}))
decode(b"GIF89a\x01\x00\x01\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;")
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
try:
    d = decode(data, limits=limits, **args)
    out = {"views": len(d.frames), "size": d.size, "frame_size": d.frames[0].size}
except DecodeError as e:
    out = {"error": type(e).__name__, "message": str(e)}
out["seconds"] = time.perf_counter() - t0
out["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
out["rise_mib"] = out["peak_mib"] - base / 1024
print(json.dumps(out))
"""


def peak_rss_of_decode(tmp_path: Path, data: bytes, root: Path | None = None, **args) -> dict:
    """Decode ``data`` in a fresh interpreter (importing safeclip from ``root``, default this checkout): its outcome,
    seconds, peak RSS and how far the decode raised it (MiB)."""
    path = tmp_path / "input.bin"
    path.write_bytes(data)
    root = Path(__file__).resolve().parents[1] if root is None else root
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(path), json.dumps(args)], capture_output=True,
                          text=True, timeout=120, env=env, cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


CANVAS = (2000, 2000)
CANVAS_MIB = CANVAS[0] * CANVAS[1] * 4 / 2**20  # one RGBA (or Pillow RGB) canvas: 15.3 MiB


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux only")
@pytest.mark.parametrize(
    "case",
    ["webp", "webp_alpha", "gif", "gif_alpha"],
)
def test_tiny_animation_on_a_large_canvas_has_a_memory_ceiling(tmp_path: Path, case: str):
    """Issue 9 item 6: sampled frames were held at full canvas size (8 of them: 8 canvases, 2.7 GB for the 1 KB
    8000x8000 WebP). Now each frame is reduced as it is produced: a few canvases, however many frames are sampled."""
    alpha = case.endswith("alpha")
    data = webp_animation(CANVAS, 20, alpha=alpha) if case.startswith("webp") else gif_animation(
        CANVAS, 20, transparent=alpha)
    assert len(data) < 2000
    # 20 frames of 50 ms: sampled at 100 fps so that the cap of 16 decides (at 1 fps only 2 frames would be)
    out = peak_rss_of_decode(tmp_path, data, target_size=224, limits={"sample_frames": 16, "frames_per_second": 100})
    assert "error" not in out, out
    # libwebp keeps two canvases of its own, Pillow the current frame, its bytes and (alpha) a premultiplied copy to
    # reduce: at most 5-6 canvases, where holding the 16 sampled frames took 16 more
    ceiling = 8 * CANVAS_MIB
    assert out["rise_mib"] < ceiling, f"{case}: peak RSS rose {out['rise_mib']:.0f} MiB, over {ceiling:.0f} MiB"
    assert out["size"] == list(CANVAS) and out["frame_size"] == [500, 500]  # 2000 // (2 * 224) = 4
    assert out["views"] == (32 if alpha else 16)


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux only")
def test_frames_held_at_full_size_are_bounded(tmp_path: Path, monkeypatch):
    """Without a target_size nothing is reduced: canvas area x frames held is refused from the header."""
    data = webp_animation(CANVAS, 20)
    limit = 7 * CANVAS[0] * CANVAS[1]  # 7 full frames
    every = {"frames_per_second": 100, "sample_frames": 8}  # 20 frames of 50 ms: 8 of them, spread (not 2 at 1 fps)
    out = peak_rss_of_decode(tmp_path, data, limits={"max_total_pixels": limit, **every})
    assert out["error"] == "ImageTooLargeError", out
    assert "8 sampled frames of 2000x2000" in out["message"] and f"{limit}-pixel" in out["message"]
    assert "max_total_pixels" in out["message"]
    assert out["rise_mib"] < 3 * CANVAS_MIB  # refused before a single frame was decoded
    # 7 frames fit; an alpha frame counts once per background
    fps = every["frames_per_second"]
    assert len(decode(data, limits=DecodeLimits(max_total_pixels=limit, sample_frames=7, frames_per_second=fps)).frames) == 7
    alpha = webp_animation(CANVAS, 20, alpha=True)
    with pytest.raises(ImageTooLargeError, match=r"frame 9 \(2 views of 2000x2000\)"):
        decode(alpha, limits=DecodeLimits(max_total_pixels=limit, sample_frames=7, frames_per_second=fps))
    reduced = decode(alpha, limits=DecodeLimits(max_total_pixels=limit, **every), target_size=224)
    assert len(reduced.frames) == 16


def test_reduced_frames_give_the_model_the_same_pixels():
    """Reducing on the fast path is what the fast pixel path does anyway (reducing_gap=2): the same model input."""
    from safeclip.embed import PixelSpec, prepare_pixels

    rng = np.random.default_rng(0)
    smooth = Image.fromarray(rng.integers(0, 256, (9, 12, 3), dtype=np.uint8)).resize((1200, 900),
                                                                                     Image.Resampling.BICUBIC)
    spec = PixelSpec(size=224)
    full, fast = decode(png_bytes(smooth)), decode(png_bytes(smooth), target_size=224)
    assert fast.size == full.size == (1200, 900) and fast.frames[0].size == (600, 450)
    a = prepare_pixels(full.frames[0], spec, fast=True).astype(np.int16)
    b = prepare_pixels(fast.frames[0], spec, fast=True).astype(np.int16)
    assert np.abs(a - b).max() <= 2 and np.abs(a - b).mean() < 0.3
    assert decode(Image.new("RGB", (300, 300)), target_size=224).frames[0].size == (300, 300)  # never below 2x


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_time_budget_is_checked_inside_frame_seeking(monkeypatch, fmt: str):
    """Issue 9 item 6: one seek to a sampled frame decoded every frame on the way (a 999-frame GIF on a large canvas:
    20 s against a 10 s budget). A clock that advances one second per frame decoded shows where the budget is
    checked: every frame, not every sampled frame."""
    data = gif_animation((40, 30), 60) if fmt == "GIF" else webp_animation((40, 30), 60)
    clock = types.SimpleNamespace(t=0.0)  # one second of CPU (and of wall-clock) time per frame decoded
    monkeypatch.setattr(decode_common, "time", types.SimpleNamespace(monotonic=lambda: clock.t,
                                                                     thread_time=lambda: clock.t))
    plugin = GifImagePlugin.GifImageFile if fmt == "GIF" else WebPImagePlugin.WebPImageFile
    real_load = plugin.load

    def load(self):
        if self.tile or fmt == "WEBP":  # a frame really decoded
            clock.t += 1.0
        return real_load(self)

    monkeypatch.setattr(plugin, "load", load)
    with pytest.raises(DecodeTimeoutError, match="on the way to frame 59"):
        decode(data, limits=DecodeLimits(sample_frames=2, timeout_s=5.0))
    assert clock.t <= 7, f"{clock.t:.0f} frames decoded against a 5-frame budget"
    clock.t = 0.0
    assert decode(data, limits=DecodeLimits(sample_frames=2, timeout_s=100.0)).frame_indices == (0, 59)


def _clocks_per_frame(monkeypatch, cpu_s: float, wall_s: float) -> types.SimpleNamespace:
    """Clocks for the decode budget in which every GIF frame decoded costs ``cpu_s`` of the decoding thread's CPU time
    and ``wall_s`` of wall-clock time (wall > cpu: the thread waited for a CPU, as on a busy machine)."""
    clocks = types.SimpleNamespace(cpu=0.0, wall=0.0)
    monkeypatch.setattr(decode_common, "time", types.SimpleNamespace(monotonic=lambda: clocks.wall,
                                                                     thread_time=lambda: clocks.cpu))
    real_load = GifImagePlugin.GifImageFile.load

    def load(self):
        if self.tile:
            clocks.cpu += cpu_s
            clocks.wall += wall_s
        return real_load(self)

    monkeypatch.setattr(GifImagePlugin.GifImageFile, "load", load)
    return clocks


def test_a_busy_machine_does_not_time_decodes_out(monkeypatch):
    """Issue 21 item 2: the budget was wall-clock time, so under load benign 4096x4096 WebPs (0.5 s alone) became
    DecodeTimeoutError rows. 60 frames of 0.05 s CPU each, each taking 0.3 s of wall-clock time: 3 s of the thread's
    CPU within a 5 s budget, 18 s of wall-clock time within the backstop (10 x 5 s)."""
    data = gif_animation((40, 30), 60)
    clocks = _clocks_per_frame(monkeypatch, cpu_s=0.05, wall_s=0.3)
    d = decode(data, limits=DecodeLimits(sample_frames=2, timeout_s=5.0))
    assert d.frame_indices == (0, 59)
    assert clocks.wall > 5.0 and clocks.cpu < 5.0  # over the budget by the wall clock, within it by CPU time


def test_cpu_budget_and_wall_backstop_name_themselves(monkeypatch):
    data = gif_animation((40, 30), 60)
    _clocks_per_frame(monkeypatch, cpu_s=1.0, wall_s=1.0)  # a costly decode: its own CPU time is the budget
    with pytest.raises(DecodeTimeoutError, match=r"of CPU time, over the 5s CPU budget \(DecodeLimits.timeout_s\)"):
        decode(data, limits=DecodeLimits(sample_frames=2, timeout_s=5.0))
    clocks = _clocks_per_frame(monkeypatch, cpu_s=0.0, wall_s=1.0)  # a stalled decoder: no CPU, the clock runs
    with pytest.raises(DecodeTimeoutError, match=r"over the 50s wall-clock backstop \(DecodeLimits.wall_timeout_s\)"):
        decode(data, limits=DecodeLimits(sample_frames=2, timeout_s=5.0))
    assert 50 <= clocks.wall <= 52
    clocks = _clocks_per_frame(monkeypatch, cpu_s=0.0, wall_s=1.0)
    with pytest.raises(DecodeTimeoutError, match="over the 8s wall-clock backstop"):
        decode(data, limits=DecodeLimits(sample_frames=2, timeout_s=5.0, wall_timeout_s=8.0))
    assert 8 <= clocks.wall <= 10
    for bad in (4.0, 0, -1.0, True, "60"):  # never under the CPU budget it backs up
        with pytest.raises(ValueError, match="wall_timeout_s"):
            DecodeLimits(timeout_s=5.0, wall_timeout_s=bad)


def test_time_waiting_for_a_cpu_is_not_decode_time(monkeypatch):
    """The real clocks: a decoding thread that is off the CPU for 1.5 s (sleeping here, as it would wait for a core
    on a loaded machine) is not timed out by a 1 s budget: that budget is its own CPU time."""
    real_load = GifImagePlugin.GifImageFile.load
    slept = []

    def load(self):
        if self.tile and not slept:
            time.sleep(1.5)
            slept.append(True)
        return real_load(self)

    monkeypatch.setattr(GifImagePlugin.GifImageFile, "load", load)
    t0, cpu0 = time.monotonic(), time.thread_time()
    d = decode(gif_animation((40, 30), 10), limits=DecodeLimits(sample_frames=2, timeout_s=1.0))
    assert d.frame_indices == (0, 9) and slept
    assert time.monotonic() - t0 >= 1.5 and time.thread_time() - cpu0 < 1.0


@needs_corpus
def test_pillow_bomb_error_becomes_image_too_large():
    if Image.MAX_IMAGE_PIXELS is None:
        pytest.skip("Pillow's own bomb check is disabled in this process")
    gif = bytearray((TRICKY / "hopper.gif").read_bytes())
    gif[6:10] = struct.pack("<HH", 40000, 40000)  # 1.6 GP logical screen
    with pytest.raises(ImageTooLargeError) as info:
        decode(bytes(gif), limits=DecodeLimits(max_pixels=10**12))  # our own check would let it through
    assert isinstance(info.value.__cause__, Image.DecompressionBombError)


@needs_corpus
def test_max_pixels_below_a_real_photo(monkeypatch):
    photo = PHOTOS / "scikit-learn-e03321afa6.jpg"
    with Image.open(photo) as im:
        w, h = im.size
    loads = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(1) or real_load(self))
    with pytest.raises(ImageTooLargeError, match=f"{w}x{h}"):
        decode(photo, limits=DecodeLimits(max_pixels=w * h - 1))
    assert not loads
    assert decode(photo, limits=DecodeLimits(max_pixels=w * h)).size == (w, h)


def test_max_bytes(tmp_path: Path):
    data = png_bytes(Image.new("RGB", (16, 16)))
    limits = DecodeLimits(max_bytes=len(data) - 1)
    path = tmp_path / "a.png"
    path.write_bytes(data)
    for source in (data, bytearray(data), memoryview(data), path, io.BytesIO(data)):
        with pytest.raises(ImageTooLargeError, match="byte"):
            decode(source, limits=limits)
    assert decode(data, limits=DecodeLimits(max_bytes=len(data))).size == (16, 16)

    class Endless(io.RawIOBase):
        served = 0

        def readable(self):
            return True

        def readinto(self, b):
            b[:] = b"\0" * len(b)
            self.served += len(b)
            return len(b)

    stream = Endless()
    with pytest.raises(ImageTooLargeError):
        decode(stream, limits=DecodeLimits(max_bytes=3 * 2**20))
    assert stream.served <= 3 * 2**20 + 2**20  # stops right after the limit


@needs_corpus
def test_max_frames():
    with pytest.raises(ImageTooLargeError, match="42 frames"):
        decode(TRICKY / "iss634.gif", limits=DecodeLimits(max_frames=41))
    assert decode(TRICKY / "iss634.gif", limits=DecodeLimits(max_frames=42)).n_frames == 42


@needs_corpus
def test_timeout():
    with pytest.raises(DecodeTimeoutError, match="budget"):
        decode(TRICKY / "iss634.webp", limits=DecodeLimits(timeout_s=1e-9))


@pytest.mark.parametrize(
    "data,named",
    [
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "EPS"),
        (b"\xc5\xd0\xd3\xc6" + b"\0" * 28, "EPS"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", "PDF"),
        (b"\x00\x00\x00\x0cjP  \r\n\x87\n" + b"\0" * 20, "JPEG2000"),
        (b"8BPS\x00\x01" + b"\0" * 30, "PSD"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "HEIF"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "SVG"),
        (b"hello, world", "not a recognised image format"),
    ],
)
def test_foreign_formats_unsupported(data: bytes, named: str):
    if named == "HEIF" and "HEIF" in ALLOWED_FORMATS:
        pytest.skip("a HEIF plugin is registered")
    with pytest.raises(UnsupportedFormatError, match=named):
        decode(data)


@needs_corpus
def test_eps_file_refused_without_ghostscript():
    eps = BAD / "pil_sample_cmyk.eps"
    with pytest.raises(UnsupportedFormatError, match="EPS"):
        decode(eps)


@needs_corpus
@pytest.mark.parametrize("name", ["hopper.jpg", "hopper.gif", "iss634.apng", "hopper_orientation_3.webp"])
def test_truncated_files(name: str):
    data = (TRICKY / name).read_bytes()
    for cut in (len(data) // 2, len(data) - 30):
        with pytest.raises(DecodeError) as info:
            decode(data[:cut])
        if name.endswith((".jpg", ".png", ".apng")):
            assert isinstance(info.value, TruncatedImageError), info.value


@needs_corpus
def test_draft_decodes_large_jpeg_at_reduced_scale():
    photo = PHOTOS / "plasma-workspace-wallpapers-8b814d93fc.jpg"  # 5120x2880
    full = decode(photo)
    small = decode(photo, target_size=224)
    assert full.size == small.size == (5120, 2880)  # the image's size, not the reduced frame's
    got = small.frames[0].size
    assert min(got) >= 224
    assert got[0] * got[1] * 16 <= full.size[0] * full.size[1]  # at least 1/4 per side
    assert small.sha256 == full.sha256 and small.n_frames == 1
    ref = np.asarray(full.frames[0].resize(got, Image.Resampling.BOX)).astype(np.int16)
    diff = np.abs(np.asarray(small.frames[0]).astype(np.int16) - ref)
    assert diff.mean() < 3.0, diff.mean()
    # never below the target: a 300 px image stays whole at target 224
    tiny = io.BytesIO()
    Image.new("RGB", (300, 500)).save(tiny, "JPEG")
    assert decode(tiny.getvalue(), target_size=224).frames[0].size == (300, 500)
    # orientation is applied after the draft: hopper (128 px) at target 32 -> 1/4 scale, same picture
    ref = decode(TRICKY / "hopper.jpg").frames[0].resize((32, 32), Image.Resampling.BOX)
    got = decode(TRICKY / "hopper_orientation_6.jpg", target_size=32)
    assert got.frames[0].size == (32, 32)
    assert np.abs(rgb_array(got) - np.asarray(ref).astype(np.int16)).mean() < 12


# ------------------------------------------------------------------------------------------------ thin images


def _resize_then_crop(frame: Image.Image, s: int, fast: bool) -> np.ndarray:
    """open_clip's "shortest" transform done literally: resize the whole frame (short side to s), then center-crop."""
    w, h = frame.size
    nw, nh = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
    big = frame.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=2.0 if fast else None)
    top, left = int(round((nh - s) / 2.0)), int(round((nw - s) / 2.0))
    return np.asarray(big.crop((left, top, left + s, top + s)))


@pytest.fixture
def resize_ceiling(monkeypatch):
    """Make any PIL resize to more than ``ceiling["pixels"]`` output pixels fail before it allocates them."""
    ceiling = {"pixels": None, "largest": 0}
    real = Image.Image.resize

    def resize(self, size, *args, **kwargs):
        n = int(size[0]) * int(size[1])
        ceiling["largest"] = max(ceiling["largest"], n)
        if ceiling["pixels"] is not None and n > ceiling["pixels"]:
            raise AssertionError(f"resize of {self.size} to {tuple(size)}: {n} pixels, over {ceiling['pixels']}")
        return real(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", resize)
    return ceiling


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("shape", [(1, 100_000), (100_000, 1), (3, 40_000)])
def test_thin_image_is_cropped_before_it_is_resized(resize_ceiling, shape: tuple[int, int], fast: bool):
    """Issue 21 item 1: the short side was resized first, so a 500-byte 1x100000 PNG built a 224 x 22,400,000 image
    (20 GB) before the center crop threw nearly all of it away. Now no resize output exceeds the exact path's
    ceiling, whatever the aspect ratio."""
    from safeclip.embed import PixelSpec, prepare_pixels
    from safeclip.embed._pixels import EXACT_MAX_ASPECT

    data = thin_png(*shape)
    assert len(data) < 1000
    d = decode(data, target_size=224 if fast else None)
    assert d.size == shape
    resize_ceiling["pixels"] = EXACT_MAX_ASPECT * 224 * 224
    out = prepare_pixels(d.frames[0], PixelSpec(size=224), fast=fast)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    assert resize_ceiling["largest"] <= 224 * 224  # cropped first: only the kept window is resampled
    # the kept window is the centre of the strip: its band colour (bands of 9973 rows/columns)
    band = (max(shape) // 2) // 9973
    want = ((band * 71) % 256, (band * 29 + 100) % 256, (255 - band * 13) % 256)
    assert (np.abs(out[112, 112].astype(int) - want) <= 1).all(), (out[112, 112], want)


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("shape", [(5, 3000), (3000, 5), (7, 20_000), (40, 9000)])
def test_thin_image_pixels_match_the_whole_frame_resize(shape: tuple[int, int], fast: bool):
    """Cropping first is the same transform: the pixels of the literal resize-then-crop within float rounding."""
    from safeclip.embed import PixelSpec, prepare_pixels
    from safeclip.embed._pixels import EXACT_MAX_ASPECT

    rng = np.random.default_rng(sum(shape))
    w, h = shape
    small = rng.integers(0, 256, (max(2, h // 40), max(2, w // 40), 3), dtype=np.uint8)
    frame = Image.fromarray(small).resize(shape, Image.Resampling.BICUBIC)  # smooth, with detail at every scale
    s = 32
    assert max(shape) / min(shape) * s > EXACT_MAX_ASPECT * s  # the crop-first path
    got = prepare_pixels(frame, PixelSpec(size=s), fast=fast).astype(np.int16)
    ref = _resize_then_crop(frame, s, fast).astype(np.int16)
    assert got.shape == ref.shape == (s, s, 3)
    diff = np.abs(got - ref)
    assert diff.max() <= 2 and diff.mean() < 0.2, (diff.max(), diff.mean())


@pytest.mark.parametrize("fast", [False, True])
def test_images_up_to_the_exact_aspect_are_open_clips_pixels_bit_for_bit(fast: bool):
    """Photos, panoramas and long screenshots up to 1:EXACT_MAX_ASPECT keep the literal transform: identical bytes."""
    from safeclip.embed import PixelSpec, prepare_pixels
    from safeclip.embed._pixels import EXACT_MAX_ASPECT

    rng = np.random.default_rng(1)
    s = 32
    for shape in [(640, 480), (480, 640), (1000, 333), (97, 4000), (s * 2, s * 2 * EXACT_MAX_ASPECT),
                  (s * EXACT_MAX_ASPECT + 31, s), (33, 31)]:
        frame = Image.fromarray(rng.integers(0, 256, (shape[1], shape[0], 3), dtype=np.uint8))
        got = prepare_pixels(frame, PixelSpec(size=s), fast=fast)
        assert np.array_equal(got, _resize_then_crop(frame, s, fast)), shape


@pytest.mark.slow
def test_thin_png_through_moderator_check(tiny_model, cache_dir, resize_ceiling):
    """The reported path: ``Moderator.check`` of a 1x100000 PNG (1.2 GB and 11 s with the tiny model's 64-pixel
    input; 20 GB at 224) now resamples only the centre window."""
    from safeclip import ACTIONS, Moderator

    m = Moderator(model=tiny_model, device="cpu", cache_dir=cache_dir)
    s = m.encoder.pixel_spec.size
    resize_ceiling["pixels"] = 4 * s * s  # the 1x100000 strip would need an s x (100000 * s) image
    for shape in [(1, 100_000), (100_000, 1)]:
        d = m.check(thin_png(*shape))
        assert d.error is None and d.action in ACTIONS
    assert resize_ceiling["largest"] <= s * s


# ------------------------------------------------------------------------------------------------ concurrency


def _decode_summary(path: str) -> tuple[str, tuple[int, int], tuple[int, ...], bytes]:
    d = decode(path, limits=DecodeLimits(sample_frames=3))
    return d.sha256, d.size, d.frame_indices, d.frames[-1].tobytes()


@needs_corpus
def test_threads_agree_with_sequential():
    paths = [str(TRICKY / n) for n in ("iss634.gif", "iss634.webp", "pil123rgba.png", "frozenpond.mpo",
                                       "hopper_orientation_5.jpg", "i_trns.png", "tiff_16bit_RGBa.tiff")] * 3
    sequential = [_decode_summary(p) for p in paths]
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(_decode_summary, paths)) == sequential


@needs_corpus
def test_works_in_worker_processes():
    paths = [str(TRICKY / "iss634.apng"), str(TRICKY / "hopper.jpg")]
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context(method)) as pool:
        assert list(pool.map(_decode_summary, paths)) == [_decode_summary(p) for p in paths]
        with pytest.raises(UnsupportedFormatError):  # errors pickle across processes
            pool.submit(decode, b"%PDF-1.4").result()
