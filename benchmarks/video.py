"""Issue 24: decoding video, the sampled frames against every frame, and memory against clip length.

    python benchmarks/video.py            # --quick (default): 10 s and 60 s clips, 720p and 1080p, h264 and vp9
    python benchmarks/video.py --full     # and 10 min clips
    python benchmarks/video.py --codecs h264 --sizes 720 --lengths 10 60
    python benchmarks/video.py --decide   # only the end-to-end decision on a 60 s 1080p h264 clip

Clips are made with PyAV from ../shared/corpus/photos: a 10 s segment per codec and size (25 fps, a keyframe every
2 s, a new photo every second, panning), encoded once, and longer clips made by repeating its packets with shifted
timestamps (no re-encoding: a 10 min clip costs what its 10 s segment did). They are kept in the temp folder
(``$SAFECLIP_BENCH_VIDEO`` to choose another) for the next run.

For each clip, each measurement in a fresh interpreter (so that its peak RSS is its own; Linux: /proc/self/status):

* ``sampled``: ``decode(clip, target_size=512)`` with the default limits (1 fps, at most 32 frames: spread evenly
  over a clip longer than 31 s), as ``prepare`` calls it: seconds, frames returned, the rise of peak RSS.
* ``1 fps``: ``decode_chunks`` at 1 fps with no cap that binds (``sample_frames`` = the clip's seconds + 1), 8 frames a
  chunk, each chunk dropped once seen (what a caller stopping early holds), with a CPU budget raised to 600 s (a
  10 min clip at 1 fps takes more than the default 10 s): seconds, frames, RSS rise.
* ``every``: every frame decoded with PyAV in one thread (as the backend decodes), none converted to RGB: the cost
  of reading the whole clip, the floor for any approach that does not seek.

Then sampled frames per second of wall time, and the speed-up of sampling over decoding every frame, measured in the
same run. The peak RSS of ``sampled`` is bounded by ``sample_frames``, not by the clip's length: compare its rise
for 10 s and 60 s (and 10 min) clips of the same size. Times depend on the machine and its load: compare ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import PHOTOS  # noqa: E402

FPS = 25
GOP = 2 * FPS
SEGMENT_S = 10
SIZES = {720: (1280, 720), 1080: (1920, 1080)}
CODECS = {"h264": ("libx264", "mp4", {"preset": "veryfast"}),
          "vp9": ("libvpx-vp9", "webm", {"deadline": "realtime", "cpu-used": "8", "row-mt": "1"})}
MAX_BYTES = 512 * 2**20  # long clips are larger than the default 64 MiB limit (DecodeLimits.max_bytes)

_MEASURE = r"""
import io, json, sys, time
mode, path, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])


def peak_mib():
    # VmHWM: this process image's own peak (ru_maxrss would carry over the parent's peak across exec)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


import av
import importlib
decode_module = importlib.import_module("safeclip.decode")
DecodeLimits = decode_module.DecodeLimits
data = open(path, "rb").read()
base = peak_mib()
t0 = time.perf_counter()
out = {}
if mode == "sampled":
    d = decode_module.decode(data, limits=DecodeLimits(max_bytes=MAX_BYTES), target_size=512)
    out["frames"] = len(d.frames)
    out["sampling"] = d.sampling
elif mode == "fps1":
    # every second of a long clip is more decoding than the default 10 s CPU budget allows
    limits = DecodeLimits(max_bytes=MAX_BYTES, sample_frames=int(seconds) + 2, timeout_s=600.0)
    n = 0
    for chunk in decode_module.decode_chunks(data, limits=limits, target_size=512, chunk_frames=8):
        n += len(chunk.frames)
    out["frames"] = n
else:
    with av.open(io.BytesIO(data)) as c:
        s = c.streams.video[0]
        s.codec_context.thread_count = 1
        out["frames"] = sum(1 for _ in c.decode(s))
out["seconds"] = time.perf_counter() - t0
out["rise_mib"] = peak_mib() - base
print(json.dumps(out))
""".replace("MAX_BYTES", str(MAX_BYTES))


def _frames_of_photos(w: int, h: int, n_photos: int):
    import numpy as np
    from PIL import Image

    photos = sorted(p for p in PHOTOS.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".webp"})
    pad = FPS * 2  # pan two pixels a frame across a photo slightly larger than the frame
    for k in range(n_photos):
        with Image.open(photos[(k * 7) % len(photos)]) as im:
            big = np.asarray(im.convert("RGB").resize((w + pad, h + pad)))
        for i in range(FPS):
            yield np.ascontiguousarray(big[i * 2 : i * 2 + h, i * 2 : i * 2 + w])


def segment(folder: Path, codec: str, size: int) -> Path:
    """A 10 s clip (encoded once)."""
    import av

    encoder, fmt, options = CODECS[codec]
    path = folder / f"segment-{codec}-{size}p.{fmt}"
    if path.is_file():
        return path
    w, h = SIZES[size]
    tmp = path.with_suffix(".tmp")
    with av.open(str(tmp), "w", format=fmt) as c:
        s = c.add_stream(encoder, rate=FPS, options=options)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.codec_context.gop_size = GOP
        s.codec_context.thread_count = 2
        for i, a in enumerate(_frames_of_photos(w, h, SEGMENT_S)):
            frame = av.VideoFrame.from_ndarray(a, format="rgb24")
            frame.pts = i
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    os.replace(tmp, path)
    return path


def repeated(folder: Path, seg: Path, seconds: int) -> Path:
    """``seg`` repeated to last ``seconds``: its packets again and again, timestamps shifted (no re-encoding)."""
    import av

    if seconds == SEGMENT_S:
        return seg
    path = folder / f"{seg.stem}-{seconds}s{seg.suffix}"
    if path.is_file():
        return path
    tmp = path.with_name(path.name + ".tmp")
    fmt = "mp4" if seg.suffix == ".mp4" else "webm"
    with av.open(str(seg)) as src, av.open(str(tmp), "w", format=fmt) as dst:
        ins = src.streams.video[0]
        outs = dst.add_stream_from_template(ins)
        packets = [p for p in src.demux(ins) if p.size]
        tb = ins.time_base
        shift = int(Fraction(SEGMENT_S) / tb)
        for k in range(seconds // SEGMENT_S):
            for p in packets:
                q = av.Packet(bytes(p))
                q.pts = None if p.pts is None else p.pts + k * shift
                q.dts = None if p.dts is None else p.dts + k * shift
                q.duration, q.is_keyframe, q.time_base, q.stream = p.duration, p.is_keyframe, tb, outs
                dst.mux(q)
    os.replace(tmp, path)
    return path


def measure(mode: str, path: Path, seconds: int) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", _MEASURE, mode, str(path), str(seconds)], capture_output=True,
                          text=True, env=env, cwd=tempfile.gettempdir(), timeout=900, check=False)
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1][:160]}
    return json.loads(proc.stdout)


BLOCK_ALL = """
name: block-all
version: "1"
scoring:
  logit_scale: 100.0
  templates: ["a photo of {}."]
  neutral: ["a landscape"]
categories:
  everything:
    prompts: ["a photo"]
    contrast: ["a drawing"]
    thresholds: {flag: 0.0, block: 0.0}
"""


def decide_section(folder: Path, codec: str, size: int, seconds: int) -> None:
    """Seconds to a decision on a clip (ViT-B-32, random weights: timing only) at 1 frame per second, against
    checking the same sampled frames as stills already decoded, against a naive loop, and an early stop."""
    import av
    from _common import vit_b32_checkpoint

    from safeclip import Moderator
    from safeclip.decode import DecodeLimits, decode
    from safeclip.embed import DecodeOptions

    path = repeated(folder, segment(folder, codec, size), seconds)
    data = path.read_bytes()
    limits = DecodeLimits(max_bytes=MAX_BYTES, sample_frames=seconds + 1, timeout_s=120.0)  # 1 fps, no cap
    cache = Path(tempfile.gettempdir()) / "safeclip-bench" / "video-cache"
    ckpt = str(vit_b32_checkpoint())
    m = Moderator(model="ViT-B-32", pretrained=ckpt, cache_dir=cache, decoding=DecodeOptions(limits=limits))
    print(f"\ndeciding a {codec} {size}p {seconds} s clip at 1 fps (ViT-B-32, random weights: timing only)")
    m.check(data, early_stop=False)  # warm: the first forward allocates
    t = time.perf_counter()
    d = m.check(data, early_stop=False)
    clip_s = time.perf_counter() - t
    frames = list(decode(data, limits=limits, target_size=512).frames)  # decoded beforehand: not timed
    t = time.perf_counter()
    m.check_many(frames)
    stills_s = time.perf_counter() - t
    t = time.perf_counter()
    with av.open(str(path)) as c:  # the naive loop: every frame decoded, one check per second of video
        s = c.streams.video[0]
        step = max(1, round(float(s.average_rate or FPS)))
        for i, frame in enumerate(c.decode(s)):
            if i % step == 0:
                m.check(frame.to_image())
    naive_s = time.perf_counter() - t
    print(f"  check(clip): {clip_s:.2f} s, {d.frames_scored} frames ({d.frames_scored / clip_s:.1f} frames/s), "
          f"action {d.action}")
    print(f"  check_many(its {len(frames)} sampled frames, already decoded): {stills_s:.2f} s -> RATIO clip / stills "
          f"{clip_s / stills_s:.2f}x (goal <= 1.5)")
    print(f"  naive loop (PyAV every frame -> PIL, one check per second): {naive_s:.2f} s -> RATIO naive / clip "
          f"{naive_s / clip_s:.2f}x")
    policy = cache / "block-all.yaml"
    policy.write_text(BLOCK_ALL)
    mb = Moderator(model="ViT-B-32", pretrained=ckpt, cache_dir=cache, policy=str(policy),
                   decoding=DecodeOptions(limits=limits))
    mb.check(frames[0])
    t, c0 = time.perf_counter(), time.process_time()
    d = mb.check(data)
    print(f"  early stop (a policy that blocks the first frames): {time.perf_counter() - t:.2f} s wall, "
          f"{time.process_time() - c0:.2f} s CPU, {d.frames_scored} frames scored, stopped early: "
          f"{d.stopped_early} (goal < 1 s of work)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="10 s and 60 s clips (the default)")
    group.add_argument("--full", action="store_true", help="and 10 min clips")
    ap.add_argument("--codecs", nargs="+", choices=sorted(CODECS), default=["h264", "vp9"])
    ap.add_argument("--sizes", nargs="+", type=int, choices=sorted(SIZES), default=[720, 1080])
    ap.add_argument("--lengths", nargs="+", type=int, help="clip lengths in seconds, multiples of 10")
    ap.add_argument("--decide", action="store_true", help="only the end-to-end decision on a 60 s 1080p h264 clip")
    args = ap.parse_args()
    lengths = args.lengths or ([10, 60, 600] if args.full else [10, 60])
    if not PHOTOS.is_dir():
        sys.exit(f"no photos at {PHOTOS}: set SAFECLIP_CORPUS to the corpus folder (with photos/ in it)")
    folder = Path(os.environ.get("SAFECLIP_BENCH_VIDEO", Path(tempfile.gettempdir()) / "safeclip-bench" / "video"))
    folder.mkdir(parents=True, exist_ok=True)

    if args.decide:
        decide_section(folder, "h264", 1080, 60)
        return
    print(f"clips: {FPS} fps, keyframe every {GOP // FPS} s, from {PHOTOS}; kept in {folder}")
    print(f"{'clip':26} {'MiB':>6} | {'sampled: s':>10} {'frames':>6} {'RSS+':>6} | {'1 fps: s':>8} {'frames':>6} "
          f"{'fr/s':>6} {'RSS+':>6} | {'every: s':>8} {'frames':>6} {'fr/s':>6} | {'1 fps vs every':>14}")
    for codec in args.codecs:
        for size in args.sizes:
            t = time.perf_counter()
            seg = segment(folder, codec, size)
            made = time.perf_counter() - t
            if made > 1:
                print(f"  (encoded {seg.name} in {made:.0f} s)")
            for seconds in lengths:
                path = repeated(folder, seg, seconds)
                mib = path.stat().st_size / 2**20
                sampled, fps1, every = (measure(m, path, seconds) for m in ("sampled", "fps1", "every"))
                label = f"{codec} {size}p {seconds} s"
                if any("error" in r for r in (sampled, fps1, every)):
                    print(f"{label:26} {mib:6.1f} | errors: {sampled.get('error')} {fps1.get('error')} "
                          f"{every.get('error')}")
                    continue
                print(f"{label:26} {mib:6.1f} | {sampled['seconds']:10.2f} {sampled['frames']:6d} "
                      f"{sampled['rise_mib']:6.0f} | {fps1['seconds']:8.2f} {fps1['frames']:6d} "
                      f"{fps1['frames'] / fps1['seconds']:6.1f} {fps1['rise_mib']:6.0f} | {every['seconds']:8.2f} "
                      f"{every['frames']:6d} {every['frames'] / every['seconds']:6.0f} | "
                      f"{every['seconds'] / fps1['seconds']:13.1f}x")
    print("RSS+: rise of peak RSS (VmHWM) in MiB over the interpreter's before decoding (the clip's bytes already read).")
    decide_section(folder, "h264", 1080, 60)


if __name__ == "__main__":
    main()
