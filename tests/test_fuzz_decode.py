"""Fuzz safeclip.decode with mutated real files and generated animations and alpha images: it returns a valid
Decoded or raises DecodeError, nothing else, and no input raises the process' peak RSS over a ceiling.

In the test run (a few seconds): bounded hypothesis searches over mutated seeds and over generated animated canvases
and alpha images (a tiny frame on a large canvas is how a 1 KB file asked for 3 GB), plus deterministic header /
truncation sweeps. Each case's peak RSS is measured (Linux: the high-water mark is reset before every decode) and
must stay under :data:`RSS_CEILING_MIB`. The ``slow`` test runs the standalone fuzzer for 60 s; standalone, for a
longer run in crash-isolated worker processes::

    python tests/test_fuzz_decode.py --seconds 120 [--seed 1] [--workers 1]

It prints the inputs tried, outcomes by kind, unexpected exceptions and crashes (each with the seed:index that
regenerates the input: ``python tests/test_fuzz_decode.py --replay SEED:INDEX``) and the largest per-case peak RSS.
"""

from __future__ import annotations

import io
import os
import random
import sys
import time
from pathlib import Path
from unittest import mock

if __name__ == "__main__":  # standalone: make the checkout importable without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from safeclip.decode import DecodeLimits, Decoded, decode
from safeclip.errors import DecodeError, ImageTooLargeError
from test_decode import gif_animation, webp_animation, white_drawing_on_clear

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"
if not CORPUS.is_dir():
    CORPUS = Path(os.environ.get("SAFECLIP_CORPUS", "../shared/corpus")).resolve()

# Small limits keep every input fast: a mutated header may claim up to 4 MP, and the decode gives up after 2 s.
LIMITS = DecodeLimits(max_bytes=2 * 2**20, max_pixels=4_000_000, max_frames=200, sample_frames=4, timeout_s=2.0,
                      max_total_pixels=8_000_000)
# What one decode may add to the peak RSS: a few full frames in flight (libwebp keeps two canvases, Pillow the frame,
# its bytes and a converted copy) plus the frames held. Holding every sampled view at full size would be
# 4 frames x 2 backgrounds x 16 MiB on top of that.
RSS_CEILING_MIB = 6 * LIMITS.max_pixels * 4 / 2**20 + LIMITS.max_total_pixels * 4 / 2**20
TARGET_SIZES = (None, 64, 224)

TRICKY_SEEDS = (
    "hopper.jpg", "hopper_16bit_qtables.jpg", "hopper_orientation_6.jpg", "pil_sample_cmyk.jpg", "hopper.gif",
    "dispose_prev.gif", "apng_blend_op_over.png", "p_trns_single.png", "i_trns.png", "1_trns.png",
    "exif_imagemagick_orientation.png", "hopper_orientation_6.webp", "tiff_16bit_RGBa.tiff", "hopper.avif",
)
INTERESTING_INTS = (0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF)


def _generated_seeds() -> dict[str, bytes]:
    """Formats the corpus lacks in small sizes: BMP, animated WebP, MPO, multi-page TIFF, gray JPEG, palette GIF."""
    rng = random.Random(0)
    frames = []
    for k in range(3):
        im = Image.new("RGB", (24, 16), (40 * k, 90, 200 - 40 * k))
        for _ in range(20):
            x, y = rng.randrange(24), rng.randrange(16)
            im.putpixel((x, y), (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
        frames.append(im)
    out: dict[str, bytes] = {}

    def save(name: str, im: Image.Image, fmt: str, **kw) -> None:
        buf = io.BytesIO()
        if "append_images" in kw:  # fresh copies: Pillow keeps per-image encoder state between saves
            kw["append_images"] = [f.copy() for f in kw["append_images"]]
        try:
            im.copy().save(buf, fmt, **kw)
        except Exception:  # a codec or writer missing in this Pillow: skip that seed
            return
        out[name] = buf.getvalue()

    save("gen.bmp", frames[0], "BMP")
    save("gen_rle.bmp", frames[0].convert("P"), "BMP")
    save("gen_anim.webp", frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=50, lossless=True)
    save("gen.mpo", frames[0], "MPO", save_all=True, append_images=frames[1:2])
    save("gen_pages.tiff", frames[0], "TIFF", save_all=True, append_images=frames[1:])
    save("gen_gray.jpg", frames[0].convert("L"), "JPEG", quality=80)
    save("gen_progressive.jpg", frames[1], "JPEG", progressive=True)
    save("gen_anim.gif", frames[0].convert("P"), "GIF", save_all=True, append_images=[f.convert("P") for f in frames[1:]])
    save("gen_rgba.png", frames[2].convert("RGBA"), "PNG")
    # alpha images and tiny frames on large canvases
    save("gen_white_on_clear.png", white_drawing_on_clear(), "PNG")
    save("gen_la.png", white_drawing_on_clear().convert("LA"), "PNG")
    save("gen_alpha.webp", white_drawing_on_clear(), "WEBP", lossless=True)
    clear = [white_drawing_on_clear((24, 16)).rotate(90 * k) for k in range(3)]
    save("gen_alpha.apng", clear[0], "PNG", save_all=True, append_images=clear[1:], disposal=1)
    out["gen_canvas.webp"] = webp_animation((640, 480), 8, alpha=True)
    out["gen_canvas.gif"] = gif_animation((640, 480), 12, transparent=True)
    return out


def load_seeds() -> list[tuple[str, bytes]]:
    seeds = []
    tricky = CORPUS / "tricky"
    for name in TRICKY_SEEDS:
        if (tricky / name).is_file():
            seeds.append((name, (tricky / name).read_bytes()))
    seeds.extend(sorted(_generated_seeds().items()))
    return seeds


SEEDS = load_seeds()


# ------------------------------------------------------------------------------------------------ mutations

# An operation is a tuple (kind, a, b, payload): positions a, b are taken modulo the current length.
OPS = ("flip", "set", "header", "int", "truncate", "delete", "insert", "dup", "splice", "chunk")


def apply_ops(data: bytes, ops: list[tuple[str, int, int, bytes]]) -> bytes:
    buf = bytearray(data)
    for kind, a, b, payload in ops:
        n = len(buf)
        if n == 0:
            buf += payload
            continue
        p = a % n
        if kind == "flip":
            buf[p] ^= 1 << (b % 8)
        elif kind == "set":
            buf[p] = b % 256
        elif kind == "header":  # the first 64 bytes hold sizes, counts and offsets
            buf[a % min(n, 64)] = b % 256
        elif kind == "int":
            value = INTERESTING_INTS[b % len(INTERESTING_INTS)]
            width = 2 if b % 3 == 0 else 4
            order = "big" if b % 2 else "little"
            chunk = (value % (1 << (8 * width))).to_bytes(width, order)
            buf[p : p + width] = chunk
        elif kind == "truncate":
            del buf[p:]
        elif kind == "delete":
            del buf[p : p + 1 + b % 256]
        elif kind == "insert":
            buf[p:p] = payload
        elif kind == "dup":
            buf[p:p] = buf[p : p + 1 + b % 512]
        elif kind == "splice":  # head of this file, tail of another seed
            other = SEEDS[b % len(SEEDS)][1]
            buf = buf[:p] + other[(a // 7) % len(other) :]
        elif kind == "chunk":  # insert a slice of another seed (a foreign chunk / marker / frame)
            other = SEEDS[b % len(SEEDS)][1]
            q = (a // 7) % len(other)
            buf[p:p] = other[q : q + 1 + (a // 3) % 300]
    return bytes(buf)


def random_case(rng: random.Random) -> tuple[int, list[tuple[str, int, int, bytes]]]:
    """The standalone fuzzer's generator: a seed index and 1-4 operations."""
    ops = []
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4))):
        payload = bytes(rng.randrange(256) for _ in range(rng.choice((0, 1, 4, 16, 64))))
        ops.append((rng.choice(OPS), rng.randrange(1 << 20), rng.randrange(1 << 16), payload))
    return rng.randrange(len(SEEDS)), ops


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise OSError(f"no {key} in /proc/self/status")


def _reset_peak_rss() -> int | None:
    """Reset this process' peak-RSS mark (Linux ``clear_refs``); return the current RSS in KiB, None if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status_kib("VmRSS")
    except OSError:
        return None


RSS_SEEN_MIB = [0.0, 0.0]  # the largest per-case rise of the peak RSS in this process, and the largest peak


def check_one(data: bytes, target_size: int | None = None) -> str:
    """Decode ``data``; return the outcome's name, or raise AssertionError / an unexpected exception."""
    base = _reset_peak_rss()
    try:
        d = decode(data, limits=LIMITS, target_size=target_size)
    except DecodeError as e:
        text = str(e)
        assert text and "\n" not in text, repr(text)
        assert text.startswith("<bytes>: "), text
        return type(e).__name__
    finally:
        if base is not None:
            peak = _proc_status_kib("VmHWM") / 1024
            rise = peak - base / 1024
            RSS_SEEN_MIB[:] = max(RSS_SEEN_MIB[0], rise), max(RSS_SEEN_MIB[1], peak)
            assert rise <= RSS_CEILING_MIB, f"peak RSS rose {rise:.0f} MiB, over the {RSS_CEILING_MIB:.0f} MiB ceiling"
    assert isinstance(d, Decoded)
    n_bg = len(LIMITS.backgrounds)
    assert d.frames and len(d.frames) == len(d.frame_indices) == len(d.backgrounds) <= LIMITS.sample_frames * n_bg
    assert d.n_frames >= 1 and all(0 <= i < d.n_frames for i in d.frame_indices)
    assert list(d.frame_indices) == sorted(d.frame_indices)
    for i in set(d.frame_indices):  # each sampled frame: once if opaque, once per background if it has alpha
        bgs = tuple(b for j, b in zip(d.frame_indices, d.backgrounds) if j == i)
        assert bgs in ((None,), LIMITS.backgrounds), bgs
    assert sum(fr.size[0] * fr.size[1] for fr in d.frames) <= LIMITS.max_total_pixels
    for fr in d.frames:
        assert fr.mode == "RGB" and fr.size[0] > 0 and fr.size[1] > 0
        assert fr.size[0] * fr.size[1] <= LIMITS.max_pixels
        if target_size is not None:
            assert min(fr.size) < 4 * target_size  # reduced as it was produced (or small to begin with)
        fr.getpixel((0, 0))  # really loaded
    assert d.size[0] * d.size[1] <= LIMITS.max_pixels and d.nbytes == len(data)
    if target_size is None:
        assert d.size == d.frames[0].size
    return "ok"


def canvas_case(kind: str, canvas: tuple[int, int], frames: int, alpha: bool) -> bytes:
    """A generated input: a tiny animation on a large canvas, or an alpha still of ``canvas`` size."""
    if kind == "webp":
        return webp_animation(canvas, frames, alpha=alpha)
    if kind == "gif":
        return gif_animation(canvas, frames, transparent=alpha)
    w, h = min(canvas[0], 600), min(canvas[1], 600)  # stills are drawn in full: keep them small
    im = white_drawing_on_clear((max(w, 17), max(h, 17)))
    if not alpha:
        im = im.convert("RGB")
    buf = io.BytesIO()
    if kind == "apng":
        im.save(buf, "PNG", save_all=True, append_images=[im.rotate(180)] * min(frames, 3), disposal=1)
    elif kind == "webp_still":
        im.save(buf, "WEBP", lossless=True)
    else:
        im.save(buf, {"png_still": "PNG", "tiff_still": "TIFF"}[kind])
    return buf.getvalue()


CANVAS_KINDS = ("webp", "gif", "apng", "png_still", "webp_still", "tiff_still")


def random_input(rng: random.Random) -> tuple[str, bytes]:
    """The standalone fuzzer's generator: a mutated seed (3 in 4) or a generated canvas / alpha case, mutated or not."""
    if rng.random() < 0.75:
        s, ops = random_case(rng)
        return SEEDS[s][0], apply_ops(SEEDS[s][1], ops)
    kind = rng.choice(CANVAS_KINDS)
    canvas = (rng.choice((1, 7, 300, 1999, 2000)), rng.choice((1, 9, 500, 2000, 2001)))
    data = canvas_case(kind, canvas, rng.randrange(1, 60), rng.random() < 0.5)
    if rng.random() < 0.5:
        _, ops = random_case(rng)
        data = apply_ops(data, ops)
    return f"canvas:{kind}{canvas}", data


# ------------------------------------------------------------------------------------------------ pytest


def test_seeds_decode():
    assert len(SEEDS) >= 8
    for name, data in SEEDS:
        for target_size in TARGET_SIZES:
            assert check_one(data, target_size) == "ok", (name, target_size)
    alpha = [name for name, data in SEEDS if None not in decode(data, limits=LIMITS).backgrounds]
    assert {"gen_white_on_clear.png", "gen_la.png", "gen_alpha.webp", "gen_canvas.webp", "gen_canvas.gif"} <= set(alpha)


op_strategy = st.tuples(
    st.sampled_from(OPS),
    st.integers(0, (1 << 20) - 1),
    st.integers(0, (1 << 16) - 1),
    st.binary(max_size=64),
)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning", "ignore::DeprecationWarning")
@settings(
    max_examples=1500,
    deadline=5000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(seed=st.integers(0, len(SEEDS) - 1), ops=st.lists(op_strategy, min_size=1, max_size=4),
       target_size=st.sampled_from(TARGET_SIZES))
def test_mutated_inputs_decode_or_raise_decode_error(seed: int, ops, target_size):
    check_one(apply_ops(SEEDS[seed][1], ops), target_size)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning", "ignore::DeprecationWarning")
@settings(max_examples=150, deadline=5000, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    kind=st.sampled_from(CANVAS_KINDS),
    canvas=st.tuples(st.integers(1, 2100), st.integers(1, 2100)),
    frames=st.integers(1, 60),
    alpha=st.booleans(),
    ops=st.lists(op_strategy, max_size=2),
    target_size=st.sampled_from(TARGET_SIZES),
)
def test_animated_canvases_and_alpha_images(kind, canvas, frames, alpha, ops, target_size):
    """Tiny frames on canvases up to the pixel limit, and alpha stills: valid views or a DecodeError, and no case
    raises the peak RSS over the ceiling."""
    check_one(apply_ops(canvas_case(kind, canvas, frames, alpha), ops), target_size)


GIF_SEEDS = [i for i, (_, data) in enumerate(SEEDS) if data[:3] == b"GIF"]
# Extension starts where readers of GIF's block structure part ways: an empty first sub-block (Pillow then skips the
# chain after it, except in a comment), and NETSCAPE2.0 (before frame 0 Pillow reads one sub-block more).
GIF_EXTENSION_STARTS = (b"\x21\xf9\x00", b"\x21\xfe\x00", b"\x21\x01\x00", b"\x21\xff\x0bNETSCAPE2.0",
                        b"\x21\xff\x0bNETSCAPE2.0\x00", b"\x21\xf9\x04\x00\x05\x00\x00\x00")


def pillow_canvases(data: bytes) -> list[tuple[int, int]] | None:
    """The canvas Pillow reaches at each frame of a GIF, seeking without decoding the frames sought to (each seek
    decodes the one before it, so growth is bounded by MAX_IMAGE_PIXELS); None when Pillow gives up part way."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = LIMITS.max_pixels // 2  # Pillow refuses a canvas over twice this
    try:
        with Image.open(io.BytesIO(data)) as im:
            sizes = [im.size]
            for j in range(1, im.n_frames):
                im.seek(j)
                sizes.append(im.size)
            return sizes
    except Exception:  # noqa: BLE001 - a walk Pillow cannot finish is not compared
        return None
    finally:
        Image.MAX_IMAGE_PIXELS = limit


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning", "ignore::DeprecationWarning")
@settings(max_examples=400, deadline=5000, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(seed=st.sampled_from(GIF_SEEDS or [0]), ops=st.lists(op_strategy, max_size=3),
       spliced=st.lists(st.tuples(st.integers(0, (1 << 16) - 1), st.sampled_from(GIF_EXTENSION_STARTS),
                                  st.binary(max_size=12)), max_size=2))
def test_the_gif_prescan_sees_every_canvas_pillow_reaches(seed: int, ops, spliced):
    """Differential: wherever Pillow's own walk of a mutated GIF reaches a canvas of M pixels, a limit of M - 1 is
    refused by the prescan, before Pillow opens the file; a limit of M is not (the prescan sees no phantom frame).
    Extension starts are spliced in where readers part ways; the prescan that stopped at an extension's empty first
    sub-block fails this."""
    data = apply_ops(SEEDS[seed][1], ops)
    for at, start, tail in spliced:  # an extension (often with an empty first sub-block) and bytes after it
        at %= len(data) or 1
        data = data[:at] + start + tail + data[at:]
    sizes = pillow_canvases(data) if data[:6] in (b"GIF87a", b"GIF89a") else None
    if not sizes:
        return
    most = max(w * h for w, h in sizes)
    with mock.patch.object(Image, "open", wraps=Image.open) as opened:
        with pytest.raises(ImageTooLargeError, match=r"GIF image frame \d+ is \d+x\d+ = "):
            decode(data, limits=DecodeLimits(max_pixels=most - 1, max_total_pixels=LIMITS.max_total_pixels))
        assert not opened.called
    try:
        decode(data, limits=DecodeLimits(max_pixels=most, max_total_pixels=LIMITS.max_total_pixels))
    except ImageTooLargeError as e:
        assert " over the %d-pixel limit" % most not in str(e), str(e)
    except DecodeError:
        pass


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")
def test_every_header_byte_and_truncation():
    """Deterministic sweeps: each of the first 48 bytes set to 0x00 / 0xFF, and truncation at 40 points."""
    outcomes: dict[str, int] = {}
    for _name, data in SEEDS:
        variants = []
        for p in range(min(48, len(data))):
            for v in (0x00, 0xFF):
                b = bytearray(data)
                b[p] = v
                variants.append(bytes(b))
        variants += [data[: len(data) * k // 40] for k in range(40)]
        for v in variants:
            kind = check_one(v)
            outcomes[kind] = outcomes.get(kind, 0) + 1
    assert outcomes.get("ok", 0) > 0 and outcomes.get("TruncatedImageError", 0) > 0


@pytest.mark.slow
def test_long_fuzz_run():
    """The standalone fuzzer for 60 s in a crash-isolated worker: no unexpected exception, no crash."""
    import subprocess

    proc = subprocess.run([sys.executable, __file__, "--seconds", "60", "--seed", "9"], capture_output=True,
                          text=True, timeout=300)
    print(proc.stdout)
    assert proc.returncode == 0 and "unexpected exceptions: 0" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


# ------------------------------------------------------------------------------------------------ standalone


def numbered_case(seed: int, i: int) -> tuple[str, bytes, int | None]:
    """Input number ``i`` of a run with ``seed``: a label, the bytes and the target_size to decode at."""
    rng = random.Random(f"{seed}:{i}")
    label, data = random_input(rng)
    return label, data, rng.choice(TARGET_SIZES)


def _worker(wid: int, seed: int, start: int, stop_at: float, current, queue) -> None:  # pragma: no cover - subprocess
    import warnings

    warnings.simplefilter("ignore")
    counts: dict[str, int] = {}
    unexpected: list[str] = []
    slowest = (0.0, "")
    i = start
    last_flush = time.monotonic()
    while time.monotonic() < stop_at:
        current.value = i
        label, data, target_size = numbered_case(seed, i)
        t0 = time.monotonic()
        try:
            kind = check_one(data, target_size)
        except Exception as e:  # noqa: BLE001 - that is what we are counting
            kind = "UNEXPECTED"
            if len(unexpected) < 20:
                unexpected.append(f"{seed}:{i} {label} {type(e).__name__}: {str(e)[:160]}")
        dt = time.monotonic() - t0
        if dt > slowest[0]:
            slowest = (dt, f"{seed}:{i} ({label}, {kind})")
        counts[kind] = counts.get(kind, 0) + 1
        i += 1
        if time.monotonic() - last_flush > 2.0:
            queue.put((wid, (counts, unexpected, slowest, tuple(RSS_SEEN_MIB))))
            counts, unexpected = {}, []
            last_flush = time.monotonic()
    queue.put((wid, (counts, unexpected, slowest, tuple(RSS_SEEN_MIB))))
    queue.put((wid, None))


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - exercised by hand
    import argparse
    import multiprocessing
    import queue as queue_mod
    import resource

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--replay", help="SEED:INDEX: regenerate one input and decode it in this process")
    args = parser.parse_args(argv)

    if args.replay:
        seed, index = args.replay.split(":")
        label, data, target_size = numbered_case(int(seed), int(index))
        print(f"{label}, {len(data)} bytes, target_size {target_size}")
        print(check_one(data, target_size), f"(peak RSS rose {RSS_SEEN_MIB[0]:.0f} MiB)")
        return 0

    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    stop_at = time.monotonic() + args.seconds
    totals: dict[str, int] = {}
    unexpected: list[str] = []
    crashes: list[str] = []
    slowest = (0.0, "")
    max_rss = (0.0, 0.0)
    q = ctx.Queue()
    workers = {}

    def launch(wid: int, start: int) -> None:
        current = ctx.Value("q", start)
        p = ctx.Process(target=_worker, args=(wid, args.seed + wid, start, stop_at, current, q), daemon=True)
        p.start()
        workers[wid] = (p, current)

    print(f"fuzzing safeclip.decode for {args.seconds:g}s, {args.workers} worker(s), seed {args.seed}, "
          f"{len(SEEDS)} seed files: {', '.join(n for n, _ in SEEDS)}", flush=True)
    for wid in range(args.workers):
        launch(wid, 0)
    active = set(workers)
    while active:
        try:
            wid, payload = q.get(timeout=1.0)
        except queue_mod.Empty:
            wid, payload = None, None
        if wid is not None and payload is None:
            active.discard(wid)
        elif payload is not None:
            counts, unexp, slow, rise = payload
            for k, v in counts.items():
                totals[k] = totals.get(k, 0) + v
            unexpected += unexp
            slowest = max(slowest, slow)
            max_rss = (max(max_rss[0], rise[0]), max(max_rss[1], rise[1]))
        for w in list(active):
            p, current = workers[w]
            if not p.is_alive() and p.exitcode not in (0, None):  # killed by a signal: a C-level crash
                crashes.append(f"{args.seed + w}:{current.value} exit code {p.exitcode}")
                totals["CRASH"] = totals.get("CRASH", 0) + 1
                if time.monotonic() < stop_at:
                    launch(w, current.value + 1)
                else:
                    active.discard(w)
            elif not p.is_alive() and time.monotonic() > stop_at + 30:  # exited, final message lost
                active.discard(w)
    for p, _current in workers.values():
        p.join(timeout=10)
    tried = sum(totals.values())
    print(f"inputs tried: {tried} ({tried / args.seconds:.0f}/s)")
    for k in sorted(totals, key=lambda k: -totals[k]):
        print(f"  {k:24s} {totals[k]}")
    print(f"unexpected exceptions: {totals.get('UNEXPECTED', 0)}")
    for line in unexpected:
        print("  ", line)
    print(f"crashes: {len(crashes)}")
    for line in crashes:
        print("  ", line)
    print(f"slowest input: {slowest[0]:.3f}s  {slowest[1]}")
    if max_rss[1]:  # the peak is reset before each case, so the children's ru_maxrss would only tell the last one
        print(f"peak RSS of a worker: {max_rss[1]:.0f} MiB; largest rise of the peak in one case: {max_rss[0]:.0f} MiB "
              f"(ceiling {RSS_CEILING_MIB:.0f} MiB)")
    else:
        print(f"peak RSS of a worker: {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.0f} MiB")
    return 1 if totals.get("UNEXPECTED") or crashes else 0


if __name__ == "__main__":
    sys.exit(main())
