"""Decode backends on corpus/photos: CPU ms per image per format, and embedding parity of the libvips path with PIL's.

Usage: ``nice python benchmarks/decode_backends.py [--per-format N] [--large N] [--skip-parity]``

1. Decode cost, one process, files decoded one after another (a warm-up pass first), each timed with
   ``time.process_time`` (all threads of the process: libvips decodes in threads of its own). Each backend decodes
   to what the pipeline needs for a model of side 224 (``target_size = max(224, pdq.DECODE_SIDE)``):
   - libvips: ``safeclip.decode.decode(backend="vips")`` (signature check, header check, ``thumbnail_buffer``
     shrinking on load: JPEG DCT scaling, WebP scaled decode; PNG has no reduced decode);
   - PIL: ``decode(backend="pil")`` (JPEG draft mode, box reduction after decoding);
   - OpenCV: ``cv2.imdecode`` with ``IMREAD_REDUCED_COLOR_2/4/8`` at the largest factor keeping the short side >=
     the target (skipped when opencv-python-headless is not installed; it is not a dependency). Its reduced modes
     are DCT scaling for JPEG only: WebP and PNG are decoded in full and then resized. It has no header-only size
     check before decoding, no format allowlist of its own, no EXIF orientation for WebP/PNG, and no alpha views.
   The whole ``prepare`` (decode + the model's pixels + PDQ) is timed too, for vips and PIL.
2. Parity: ViT-B-32 (random weights, via the project's EncoderSpec; timing-grade, not a moderation result)
   embeddings of every view of every photo from ``prepare(backend="vips")`` vs ``prepare(backend="pil")``, min and
   median cosine per format (target >= 0.999 for every photo), and the PDQ Hamming distance between the two.

Why libvips over the alternatives measured: it has shrink-on-load for JPEG *and* WebP, reads the header before any
pixel (the pixel limit is checked first), and can be locked to the JPEG/PNG/WebP loaders in-process
(``block_untrusted_set``, ``operation_block_set``), with EXIF orientation, CMYK and 16-bit conversion built in;
pyvips-binary is a self-contained wheel. OpenCV only reduces JPEG at decode time and applies none of those
protections. Pillow-SIMD is not installable as a wheel (``pip download pillow-simd`` finds only an sdist that
must be compiled, and replaces Pillow itself).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import photos, vit_b32_checkpoint

from safeclip.decode import decode, decoder_id
from safeclip.embed import DecodeOptions, EncoderSpec, PixelSpec, prepare
from safeclip.pdq import DECODE_SIDE

MODEL_SIDE = 224
FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP"}


def by_format(per_format: int | None) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for p in photos():
        out.setdefault(FORMATS[p.suffix.lower()], []).append(p)
    if per_format:
        out = {k: v[:: max(1, len(v) // per_format)][:per_format] for k, v in out.items()}
    return out


def cv2_decoder():
    try:
        import cv2
    except ImportError:
        return None
    cv2.setNumThreads(1)
    reduced = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
               8: cv2.IMREAD_REDUCED_COLOR_8}

    def run(data: bytes, target: int) -> np.ndarray:
        buf = np.frombuffer(data, np.uint8)
        # the reduction factor needs the size: from a full header parse OpenCV does not offer, so take it from PIL
        import io

        from PIL import Image

        w, h = Image.open(io.BytesIO(data)).size
        f = max((k for k in reduced if min(w, h) // k >= target), default=1)
        im = cv2.imdecode(buf, reduced[f])
        short = min(im.shape[:2])
        if short > target:  # the same short side as the others hand on
            s = target / short
            im = cv2.resize(im, (max(1, round(im.shape[1] * s)), max(1, round(im.shape[0] * s))),
                            interpolation=cv2.INTER_AREA)
        return cv2.cvtColor(im, cv2.COLOR_BGR2RGB)

    return run


def vips_jpeg(data: bytes) -> object:
    """libvips' own JPEG shrink-on-load at the scale Pillow's draft mode takes: what a libvips JPEG path would cost
    (safeclip blocks libvips' JPEG loader; this benchmark process unblocks it to measure it)."""
    import pyvips

    pyvips.operation_block_set("VipsForeignLoadJpegBuffer", False)
    target = max(MODEL_SIDE, DECODE_SIDE)
    header = pyvips.Image.jpegload_buffer(data)
    scale = max(s for s in (1, 2, 4, 8) if s <= max(min(header.width, header.height) // target, 1))
    return pyvips.Image.jpegload_buffer(data, shrink=scale).autorot().write_to_memory()


def interleaved_cpu_ms(fns: dict[str, object], items: list[bytes]) -> dict[str, float]:
    """Mean CPU ms per item of each function, run one after another on each item (so that load from other processes
    falls on all of them alike), after a warm-up pass on the first items."""
    for it in items[: min(3, len(items))]:
        for fn in fns.values():
            fn(it)
    total = dict.fromkeys(fns, 0.0)
    for it in items:
        for name, fn in fns.items():
            t = time.process_time()
            fn(it)
            total[name] += time.process_time() - t
    return {k: v * 1e3 / len(items) for k, v in total.items()}


def large_blobs(n: int) -> dict[str, list[bytes]]:
    """``n`` photos per format upscaled to 3840x2160 (8.3 MP, the size of the issue's slow WebPs and PNGs) with a
    little noise (upscaled photos compress too well), encoded as JPEG (q 90), WebP (q 85) and PNG."""
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    out: dict[str, list[bytes]] = {"JPEG": [], "WEBP": [], "PNG": []}
    for p in photos({".jpg"})[:: max(1, len(photos({".jpg"})) // n)][:n]:
        im = Image.open(p).convert("RGB").resize((3840, 2160), Image.Resampling.BICUBIC)
        px = np.asarray(im).astype(np.int16) + rng.integers(-4, 5, (2160, 3840, 3), dtype=np.int16)
        im = Image.fromarray(np.clip(px, 0, 255).astype(np.uint8))
        for fmt, kw in (("JPEG", {"quality": 90}), ("WEBP", {"quality": 85}), ("PNG", {"compress_level": 6})):
            buf = io.BytesIO()
            im.save(buf, fmt, **kw)
            out[fmt].append(buf.getvalue())
    return out


def timing_section(groups: dict[str, list[Path]], large: int) -> None:
    target = max(MODEL_SIDE, DECODE_SIDE)
    spec = PixelSpec(size=MODEL_SIDE)
    cv2_run = cv2_decoder()
    fns = {"vips": lambda d: decode(d, target_size=target, backend="vips"),
           "pil": lambda d: decode(d, target_size=target, backend="pil")}
    if cv2_run is not None:
        fns["cv2"] = lambda d: cv2_run(d, target)
    fns["prep vips"] = lambda d: prepare(d, spec, DecodeOptions(backend="vips"))
    fns["prep pil"] = lambda d: prepare(d, spec, DecodeOptions(backend="pil"))
    sets = {fmt: [p.read_bytes() for p in paths] for fmt, paths in groups.items()}
    if large:
        sets.update({f"{fmt} 8MP": blobs for fmt, blobs in large_blobs(large).items()})
    rows: dict[str, dict[str, float]] = {}
    for fmt, blobs in sets.items():
        extra = {"vips jpeg": vips_jpeg} if fmt.startswith("JPEG") else {}
        rows[fmt] = interleaved_cpu_ms({**fns, **extra}, blobs)
        sizes = [decode(d, backend="pil", target_size=target).size for d in blobs]
        rows[fmt]["mp"] = statistics.fmean(w * h for w, h in sizes) / 1e6
        rows[fmt]["n"] = len(blobs)
    print(f"1. CPU ms per image (process_time, one process, target_size={target}, model side {MODEL_SIDE}; "
          f"{decoder_id('vips')}); 'prep' = decode + model pixels + PDQ")
    cols = list(fns)
    print(f"   {'format':9} {'N':>4} {'MP':>5} " + " ".join(f"{c:>10}" for c in cols) + "  pil/vips  prep pil/vips")
    for fmt, r in rows.items():
        print(f"   {fmt:9} {int(r['n']):4d} {r['mp']:5.1f} " + " ".join(f"{r[c]:10.1f}" for c in cols)
              + f"  {r['pil'] / r['vips']:7.2f}x  {r['prep pil'] / r['prep vips']:11.2f}x")
    for fmt, r in rows.items():
        if "vips jpeg" in r:
            print(f"   {fmt} through libvips' own loader (jpegload_buffer at Pillow's draft scale + autorot; not used): "
                  f"{r['vips jpeg']:.1f} ms vs Pillow's draft {r['pil']:.1f} ms, so the backend leaves JPEG to Pillow")
    if cv2_run is None:
        print("   (OpenCV skipped: pip install opencv-python-headless to compare it)")
    else:
        print("   (cv2: imdecode with IMREAD_REDUCED_COLOR_* where JPEG allows, INTER_AREA to the same short side; "
              "no limits, allowlist, orientation or alpha views)")


def parity_section(groups: dict[str, list[Path]]) -> None:
    spec_enc = EncoderSpec(model="ViT-B-32", pretrained=str(vit_b32_checkpoint()), runtime="torch", batch_size=16)
    enc = spec_enc.load()
    spec = enc.pixel_spec
    print("\n2. parity: ViT-B-32 (random weights) embeddings, prepare(backend='vips') vs 'pil', every view "
          "(target >= 0.999)")
    print(f"   {'format':6} {'N':>4} {'identical':>9} {'min cos':>10} {'median cos':>11} {'PDQ max':>8} {'PDQ median':>11}  worst")
    for fmt, paths in groups.items():
        cos, ham, names, same = [], [], [], 0
        for p in paths:
            a = prepare(p, spec, DecodeOptions(backend="vips"))
            b = prepare(p, spec, DecodeOptions(backend="pil"))
            if np.array_equal(a.pixels, b.pixels):  # the same pixels (a file the vips backend hands to Pillow)
                same += 1
                c = 1.0
            else:
                ea, eb = enc.embed_pixels(a.pixels), enc.embed_pixels(b.pixels)
                c = float(np.min(np.sum(ea * eb, axis=1)))
            cos.append(c)
            names.append(p.name)
            ham.append(int(np.unpackbits(a.pdq ^ b.pdq, axis=1).sum(axis=1).max()))
        worst = int(np.argmin(cos))
        print(f"   {fmt:6} {len(paths):4d} {same:9d} {min(cos):10.5f} {statistics.median(cos):11.5f} {max(ham):8d} "
              f"{statistics.median(ham):11.1f}  {names[worst]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-format", type=int, default=30, help="photos per format timed (default 30; 0: all)")
    ap.add_argument("--large", type=int, default=4, help="8 MP images per format made from photos (default 4)")
    ap.add_argument("--parity-per-format", type=int, default=0, help="photos per format in the parity check "
                    "(default 0: all)")
    ap.add_argument("--skip-parity", action="store_true")
    args = ap.parse_args()
    logging.getLogger("pyvips").setLevel(logging.ERROR)
    timing_section(by_format(args.per_format or None), args.large)
    if not args.skip_parity:
        parity_section(by_format(args.parity_per_format or None))


if __name__ == "__main__":
    main()
