"""safeclip.decode's libvips backend (decode/_vips.py): what reaches libvips, limits, views, errors, parity with Pillow."""

from __future__ import annotations

import importlib
import io
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from audit_helpers import sample  # noqa: F401  (a fixture)
from PIL import Image

from safeclip.decode import BACKENDS, DecodeLimits, decode, decoder_id, resolve_backend
from safeclip.embed import DecodeOptions, PixelSpec, prepare
from safeclip.errors import (
    ConfigError,
    DecodeError,
    ImageTooLargeError,
    TruncatedImageError,
    UnsupportedFormatError,
)
from safeclip.pdq import DECODE_SIDE

pyvips = pytest.importorskip("pyvips")
vips_module = importlib.import_module("safeclip.decode._vips")

DOCS = {"MANIFEST.csv", "README.md", "PILLOW-LICENSE"}


@pytest.fixture(autouse=True)
def _vips_loads():
    try:
        vips_module.load_pyvips()
    except Exception as e:  # noqa: BLE001 - pyvips imports but its libvips does not load
        pytest.skip(f"libvips does not load: {e}")


@pytest.fixture
def vips_calls(monkeypatch):
    """Every libvips operation run (loaders, thumbnail, conversions), by name: they all go through Operation.call."""
    calls: list[str] = []
    real = pyvips.Operation.call

    def counting(operation_name, *args, **kwargs):
        calls.append(operation_name)
        return real(operation_name, *args, **kwargs)

    monkeypatch.setattr(pyvips.Operation, "call", staticmethod(counting))
    return calls


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def noise(size: tuple[int, int], seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    bands = len(mode)
    small = rng.integers(0, 256, (size[1] // 8 + 1, size[0] // 8 + 1, bands), np.uint8)  # smooth-ish: compressible
    im = Image.fromarray(small.squeeze(-1) if bands == 1 else small, mode)
    return im.resize(size, Image.Resampling.BILINEAR)


def mean_abs(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean())


# ------------------------------------------------------------------------------------------------ backend choice


def test_backend_names_and_fingerprint():
    assert BACKENDS == ("auto", "pil", "vips")
    assert resolve_backend("auto") == "vips" and resolve_backend("pil") == "pil"
    assert decoder_id("pil") == "pil"
    assert decoder_id("vips").startswith("vips-8.") and decoder_id("auto") == decoder_id("vips")
    with pytest.raises(ConfigError, match="one of auto, pil, vips"):
        resolve_backend("opencv")
    with pytest.raises(ConfigError, match="backend"):
        DecodeOptions(backend="opencv")
    from safeclip.cli._options import DECODERS

    assert DECODERS == BACKENDS


def test_audit_decoder_fingerprint_names_the_backend():
    from safeclip.audit.worker import decoder_fingerprint

    limits = DecodeLimits()
    pil, vips = decoder_fingerprint(limits, 224, "pil"), decoder_fingerprint(limits, 224, "vips")
    assert pil != vips and decoder_fingerprint(limits, 224, "auto") == vips
    assert decoder_fingerprint(limits, 224) == vips  # the default is auto


def test_vips_backend_without_pyvips_names_the_extra(monkeypatch):
    monkeypatch.setattr(vips_module, "_pyvips", None)
    monkeypatch.setattr(vips_module, "_failure", None)
    monkeypatch.setitem(sys.modules, "pyvips", None)  # import pyvips -> ImportError
    with pytest.raises(ConfigError, match=r'pip install "safeclip\[vips\]"'):
        decode(encode(noise((32, 32)), "PNG"), backend="vips")
    with pytest.raises(ConfigError, match=r"safeclip\[vips\]"):
        prepare(encode(noise((32, 32)), "PNG"), PixelSpec(size=32), DecodeOptions(backend="vips"))
    assert resolve_backend("auto") == "pil"  # auto falls back to Pillow
    assert vips_module._failure is not None and "pyvips" in vips_module._failure  # and does not look again
    d = decode(encode(noise((32, 32)), "PNG"), backend="auto")
    assert d.format == "PNG" and d.frames[0].size == (32, 32)


def test_in_memory_inputs_stay_on_pillow(vips_calls):
    im = noise((300, 200))
    assert decode(im, backend="vips").frames[0].size == (300, 200)
    assert decode(np.asarray(im), backend="vips").frames[0].size == (300, 200)
    assert vips_calls == []


# ------------------------------------------------------------------------------------------------ what reaches libvips

FOREIGN = {
    "SVG": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>',
    "XML/SVG": b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
    "PDF": b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n",
    "EPS": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
    "MATLAB": b"MATLAB 5.0 MAT-file, Platform: GLNXA64" + b"\0" * 128,
    "FITS": b"SIMPLE  =                    T" + b" " * 50 + b"BITPIX  =                    8" + b" " * 2800,
    "PPM": b"P6\n2 2\n255\n" + b"\0" * 12,
    "ImageMagick MIFF": b"id=ImageMagick\n",
}


@pytest.mark.parametrize("kind", sorted(FOREIGN))
def test_foreign_formats_never_reach_libvips(kind, vips_calls):
    with pytest.raises(UnsupportedFormatError):
        decode(FOREIGN[kind], backend="vips")
    assert vips_calls == []


def test_other_loaders_are_blocked_inside_libvips():
    """Even a direct call: only the JPEG, PNG and WebP loaders run in this process once the backend loaded."""
    with pytest.raises(pyvips.Error):
        pyvips.Image.new_from_buffer(FOREIGN["SVG"], "").write_to_memory()
    with pytest.raises(pyvips.Error):
        pyvips.Image.new_from_buffer(FOREIGN["PPM"], "").write_to_memory()
    gif = encode(noise((16, 16)), "GIF")
    with pytest.raises(pyvips.Error):
        pyvips.Image.gifload_buffer(gif).write_to_memory()


@pytest.mark.parametrize("fmt,kw", [("GIF", {}), ("BMP", {}), ("TIFF", {})])
def test_formats_libvips_does_not_decode_go_to_pillow(fmt, kw, vips_calls):
    data = encode(noise((64, 48)), fmt, **kw)
    a, b = decode(data, backend="vips"), decode(data, backend="pil")
    assert (a.format, a.size, a.n_frames) == (b.format, b.size, b.n_frames)
    assert vips_calls == []


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "GIF"])
def test_animations_go_to_pillow(fmt, vips_calls):
    frames = [Image.new("RGB", (40, 30), (40 * i, 0, 0)) for i in range(5)]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50)
    a, b = decode(data, backend="vips"), decode(data, backend="pil")
    assert a.n_frames == b.n_frames == 5 and a.frame_indices == b.frame_indices
    assert [f.getpixel((0, 0)) for f in a.frames] == [f.getpixel((0, 0)) for f in b.frames]
    assert vips_calls == []


def test_png_with_chunks_only_pillow_checks_goes_to_pillow(vips_calls):
    """A compressed text chunk that inflates past Pillow's bound: libvips skips text, Pillow refuses the bomb."""
    png = encode(noise((8, 8)), "PNG")
    body = b"big\0\0" + zlib.compress(b"\0" * (16 << 20))
    chunk = len(body).to_bytes(4, "big") + b"zTXt" + body + zlib.crc32(b"zTXt" + body).to_bytes(4, "big")
    bomb = png[:33] + chunk + png[33:]  # after IHDR
    with pytest.raises(ImageTooLargeError):
        decode(bomb, backend="vips")
    assert vips_calls == []


def test_which_files_libvips_decodes(vips_calls):
    def loaders(data: bytes, target_size: int | None) -> list[str]:
        vips_calls.clear()
        decode(data, target_size=target_size, backend="vips")
        return [c for c in vips_calls if "load" in c]

    assert loaders(encode(noise((64, 48)), "PNG"), None) == ["pngload_buffer"]
    webp = encode(noise((400, 240)), "WEBP")
    assert loaders(webp, 60) == ["webpload_buffer", "webpload_buffer"]  # the header, then the scaled decode
    assert loaders(webp, 61) == []  # 240 // 122 = 1: not reduced, Pillow decodes it
    assert loaders(webp, None) == []
    assert loaders(encode(noise((400, 240)), "WEBP", lossless=True), 60)[0] == "webpload_buffer"  # VP8L header
    assert loaders(encode(noise((400, 240)), "JPEG"), 60) == []  # draft mode: the same DCT scaling, less overhead


# ------------------------------------------------------------------------------------------------ limits and errors


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_max_pixels_refused_from_the_header(fmt, monkeypatch):
    written: list[int] = []
    real = pyvips.Image.write_to_memory
    monkeypatch.setattr(pyvips.Image, "write_to_memory", lambda self: written.append(1) or real(self))
    data = encode(noise((400, 300)), fmt)
    with pytest.raises(ImageTooLargeError, match="120000 pixels, over the 100000-pixel limit"):
        decode(data, limits=DecodeLimits(max_pixels=100_000), target_size=50, backend="vips")
    assert written == []  # no pixel was decoded: only the header was read
    decode(data, limits=DecodeLimits(max_pixels=120_000), target_size=50, backend="vips")
    assert written == [1]


def test_max_total_pixels_counts_the_decoded_views():
    data = encode(noise((400, 300), mode="RGBA"), "PNG")
    with pytest.raises(ImageTooLargeError, match="max_total_pixels"):
        decode(data, limits=DecodeLimits(max_total_pixels=100_000), backend="vips")
    with pytest.raises(ImageTooLargeError, match="max_total_pixels"):  # as Pillow: 2 views of 400x300
        decode(data, limits=DecodeLimits(max_total_pixels=100_000), backend="pil")
    d = decode(data, limits=DecodeLimits(max_total_pixels=100_000), target_size=50, backend="vips")
    assert d.frames[0].size == (133, 100) and len(d.frames) == 2


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_truncated_files_are_typed_errors(fmt):
    data = encode(noise((256, 256)), fmt)
    cut = data[: len(data) // 2]
    with pytest.raises(TruncatedImageError) as info:
        decode(cut, backend="vips")
    assert "\n" not in str(info.value) and info.value.source == "<bytes>"
    with pytest.raises(TruncatedImageError):
        decode(cut, backend="pil")


def test_bad_corpus_gives_the_same_error_class_as_pillow(corpus: Path):
    files = sorted(p for p in (corpus / "bad").iterdir() if p.is_file() and p.name not in DOCS)
    assert len(files) >= 100
    differ = []
    for path in files:
        kinds = []
        for backend in ("pil", "vips"):
            with pytest.raises(DecodeError) as info:
                decode(path, limits=DecodeLimits(timeout_s=5.0), backend=backend)
            msg = str(info.value)
            assert "\n" not in msg and str(path) in msg and len(msg) < 400, msg
            kinds.append(type(info.value))
        if kinds[0] is not kinds[1]:
            differ.append((path.name, kinds[0].__name__, kinds[1].__name__))
    assert differ == []


# ------------------------------------------------------------------------------------------------ views


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_alpha_gives_one_view_per_background(fmt):
    im = Image.new("RGBA", (64, 48), (200, 30, 40, 255))
    im.paste((0, 0, 0, 0), (0, 0, 32, 48))  # the left half transparent
    im = im.resize((256, 192), Image.Resampling.NEAREST)
    data = encode(im, fmt, lossless=True) if fmt == "WEBP" else encode(im, fmt)
    d = decode(data, target_size=48, backend="vips")  # reduced by 2: libvips decodes the WebP too
    assert d.frames[0].size == (128, 96)
    assert d.backgrounds == ((255, 255, 255), (0, 0, 0)) and d.frame_indices == (0, 0)
    white, black = d.frames
    assert white.getpixel((5, 20)) == (255, 255, 255) and black.getpixel((5, 20)) == (0, 0, 0)
    assert white.getpixel((120, 20)) == black.getpixel((120, 20)) == (200, 30, 40)
    one = decode(data, target_size=48, backend="vips", background=(0, 128, 0))
    assert one.backgrounds == ((0, 128, 0),) and one.frames[0].getpixel((5, 20)) == (0, 128, 0)


def test_opaque_alpha_is_one_view():
    d = decode(encode(noise((64, 48), mode="RGBA").convert("RGB").convert("RGBA"), "PNG"), backend="vips")
    assert d.backgrounds == (None,) and len(d.frames) == 1 and d.frames[0].mode == "RGB"


@pytest.mark.parametrize("mode", ["L", "LA", "P", "I;16", "RGBA"])
def test_modes_become_rgb_like_pillow(mode):
    base = noise((64, 48))
    if mode == "I;16":
        im = Image.fromarray((np.asarray(base.convert("L"), np.uint16) * 257).astype(np.uint16))
    elif mode == "P":
        im = base.quantize(64)
    else:
        im = base.convert(mode)
    data = encode(im, "PNG")
    a, b = decode(data, backend="vips"), decode(data, backend="pil")
    assert a.size == b.size and a.backgrounds == b.backgrounds
    for fa, fb in zip(a.frames, b.frames):
        assert fa.mode == "RGB" and mean_abs(fa, fb) < 1.5, mode


@pytest.mark.parametrize("orientation", [3, 6, 8])
@pytest.mark.parametrize("fmt", ["WEBP", "PNG"])
@pytest.mark.parametrize("target_size", [None, 20])
def test_exif_orientation_like_pillow(fmt, orientation, target_size, vips_calls):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(noise((120, 80)), fmt, exif=exif.tobytes())
    a = decode(data, backend="vips", target_size=target_size)
    assert "autorot" in vips_calls or fmt == "WEBP" and target_size is None
    b = decode(data, backend="pil", target_size=target_size)
    assert a.size == b.size == ((80, 120) if orientation in (6, 8) else (120, 80))
    assert a.frames[0].size == b.frames[0].size and mean_abs(a.frames[0], b.frames[0]) < 3.0  # libwebp scales


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_reduced_on_load_as_pillow_reduces(fmt, vips_calls):
    data = encode(noise((2600, 1300)), fmt)
    d = decode(data, target_size=300, backend="vips")
    assert d.size == (2600, 1300) and d.frames[0].size == (1300, 650)  # by 2: the short side stays >= 2 x 300
    assert d.frames[0].size == decode(data, target_size=300, backend="pil").frames[0].size
    assert ("shrink" in vips_calls) == (fmt == "PNG")  # WebP: libwebp's scaled decode
    assert decode(data, target_size=700, backend="vips").frames[0].size == (2600, 1300)  # 1300 < 2 x 700
    assert decode(data, backend="vips").frames[0].size == (2600, 1300)


# ------------------------------------------------------------------------------------------------ parity on photos


def _sample(photos: list[Path], per_format: int = 4) -> list[Path]:
    by_ext: dict[str, list[Path]] = {}
    for p in photos:
        by_ext.setdefault(p.suffix.lower().replace("jpeg", "jpg"), []).append(p)
    return [p for ps in by_ext.values() for p in ps[:: max(1, len(ps) // per_format)][:per_format]]


def test_prepare_pixels_and_pdq_close_to_pillow(photos: list[Path]):
    spec = PixelSpec(size=224)
    for path in _sample(photos):
        a = prepare(path, spec, DecodeOptions(backend="vips"))
        b = prepare(path, spec, DecodeOptions(backend="pil"))
        assert a.format == b.format and a.size == b.size and a.backgrounds == b.backgrounds, path.name
        diff = np.abs(a.pixels.astype(np.float32) - b.pixels.astype(np.float32)).mean()
        assert diff < 3.0, (path.name, diff)
        assert a.pdq is not None and b.pdq is not None
        hamming = np.unpackbits(a.pdq ^ b.pdq, axis=1).sum(axis=1)
        assert (hamming <= 16).all(), (path.name, hamming)
        d = decode(path, target_size=max(spec.size, DECODE_SIDE), backend="vips")
        assert min(d.frames[0].size) >= min(DECODE_SIDE, *d.size), path.name


def test_auto_is_the_default_of_decode_options():
    assert DecodeOptions().backend == "auto"


def test_the_chosen_backend_reaches_the_audits_decoders_and_the_moderator(sample, tiny_encoder, tmp_path,
                                                                          monkeypatch):
    """``decoding=DecodeOptions(backend=...)`` is what every decode of a run uses: the audit's workers (not only its
    fingerprint) and a Moderator that picks its own decode workers."""
    from audit_helpers import run_audit

    from safeclip.audit import worker
    from safeclip.moderator import Moderator

    seen: list[str] = []
    real = worker.process_file

    def spy(tid, path, cfg, cache, hook):
        seen.append(cfg.backend)
        return real(tid, path, cfg, cache, hook)

    monkeypatch.setattr(worker, "process_file", spy)
    from safeclip.audit import distributor

    monkeypatch.setattr(distributor, "process_file", spy)  # the in-process decode threads of a small audit
    run_audit(sample[:2], tmp_path / "o.parquet", tmp_path / "cache", tiny_encoder,
              decoding=DecodeOptions(backend="pil"))
    assert seen and set(seen) == {"pil"}
    m = Moderator(encoder=tiny_encoder, decoding=DecodeOptions(backend="pil"))
    assert m.decoding.backend == "pil" and m.decoding.workers
