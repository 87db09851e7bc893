"""`safeclip serve` against hostile clients, on 127.0.0.1 only: idle sockets, then large uploads.

Timing and memory only: the model is ViT-B-32 with random weights (benchmarks/_common.py); nothing printed is a
moderation result. Each part starts its own `safeclip serve` subprocess on a free loopback port (`python -m safeclip`
of whatever code this interpreter imports: run it with PYTHONPATH pointing at another checkout to measure that one;
`--serve-args` adds flags only newer code knows; the server is started outside the current folder, so that the
code measured is the one named on the first line).

1. Idle sockets: /healthz latency (each probe a new connection, as a kubelet's is) and the statuses of /healthz and of
   small POST /v1/check, first with no idle socket, then while `--idle` TCP connections that never send a request are
   open; then how many of those the server has closed within `--idle-wait-s`.
2. Large uploads: `--uploads` concurrent authorised uploads of one ~19 MiB noise PNG against `--max-queue 8`, each
   sending its head and first MiB, then (once all have, and `--pause-s` later) the rest: statuses, server RSS before,
   at its peak (VmHWM) and after (`--settle-s` after the last answer).

Bounded: a fixed number of sockets, probes and uploads, client timeouts on every request, one global deadline; the
servers are stopped (SIGTERM, then SIGKILL) before the script exits.

    python benchmarks/serve_hostile.py [--part idle|uploads|both] [--idle 500] [--uploads 60] [--serve-args "..."]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import shlex
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ServeProcess, pct, photos, vit_b32_checkpoint  # noqa: E402

TOKEN = "serve-hostile-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CLIENT_TIMEOUT_S = 120.0


def Server(label: str, ckpt: Path, cache: Path, extra: list[str]) -> ServeProcess:
    return ServeProcess(label, ckpt, cache, extra, token=TOKEN)


def _count(statuses: list[str]) -> dict[str, int]:
    return {s: statuses.count(s) for s in sorted(set(statuses))}


def http_get(port: int, path: str, timeout: float = 10.0) -> tuple[int, dict[str, str]]:
    """One GET on a new connection (raw socket: no client library's set-up cost in the latency)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    headers = dict((k.strip().lower(), v.strip()) for k, _, v in (line.partition(":") for line in head[1:]))
    return int(head[0].split()[1]), headers


def probe(httpx, server: Server, n: int, small: bytes) -> tuple[list[float], dict[str, int], dict[str, int]]:
    """``n`` /healthz probes on new connections (latencies, statuses), and ``n // 5`` small POST /v1/check."""
    latencies, health, checks = [], [], []
    for _ in range(n):
        t = time.perf_counter()
        try:
            status, headers = http_get(server.port, "/healthz")
            key = str(status) + ("" if "x-request-id" in headers else " (no X-Request-ID)")
        except OSError as e:
            key = type(e).__name__
        latencies.append(time.perf_counter() - t)
        health.append(key)
    for _ in range(max(1, n // 5)):
        try:
            r = httpx.post(f"{server.url}/v1/check", content=small, headers=AUTH, timeout=30)
            key = str(r.status_code)
            if r.status_code == 503:
                key += " with Retry-After" if "retry-after" in r.headers else " without Retry-After"
        except httpx.HTTPError as e:
            key = type(e).__name__
        checks.append(key)
    return latencies, _count(health), _count(checks)


def closed_by_server(socks: list[socket.socket]) -> int:
    closed = 0
    for s in socks:
        try:
            s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            closed += 1  # EOF, or an answer before closing
        except BlockingIOError:
            pass
        except OSError:  # reset
            closed += 1
    return closed


def part_idle(httpx, server: Server, n_idle: int, n_probes: int, wait_s: float, small: bytes) -> None:
    lat, health, checks = probe(httpx, server, n_probes, small)
    print(f"  no idle socket:    /healthz p50 {pct(lat, .5) * 1e3:6.1f} ms  p99 {pct(lat, .99) * 1e3:6.1f} ms  "
          f"{health}; POST /v1/check {checks}", flush=True)
    socks = []
    try:
        for _ in range(n_idle):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            s.setblocking(False)  # closed_by_server peeks without waiting
            socks.append(s)
        time.sleep(0.5)  # let the server accept them all
        lat, health, checks = probe(httpx, server, n_probes, small)
        print(f"  {n_idle} idle sockets: /healthz p50 {pct(lat, .5) * 1e3:6.1f} ms  p99 {pct(lat, .99) * 1e3:6.1f} ms "
              f" {health}; POST /v1/check {checks}", flush=True)
        t0 = time.monotonic()
        closed = closed_by_server(socks)
        while closed < len(socks) and time.monotonic() - t0 < wait_s:
            time.sleep(0.5)
            closed = closed_by_server(socks)
        print(f"  idle sockets closed by the server within {time.monotonic() - t0:.1f} s: {closed} of {len(socks)}",
              flush=True)
    finally:
        for s in socks:
            s.close()


def noise_png(mib: float) -> bytes:
    import numpy as np
    from PIL import Image

    side = int((mib * 2**20 / 3) ** 0.5)
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", compress_level=0)
    return out.getvalue()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(head[0].split()[1]), headers, body


async def uploads(server: Server, body: bytes, n: int, pause_s: float) -> tuple[dict[str, int], list[float]]:
    """``n`` uploads at once: every one sends its head and its body's first MiB; once all have, and ``pause_s``
    later (the server has seen every head), they send the rest: ``n`` bodies arriving together, whatever the timing
    of the connections (sent whole, the first bodies can be read before the server has even seen the last heads)."""
    rss: list[float] = []
    statuses: list[str] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            rss.append(server.rss_mb())
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    half = min(len(body) // 2, 2**20)
    head = (f"POST /v1/check HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: image/png\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    halfway, all_halfway = 0, asyncio.Event()

    async def one() -> None:
        nonlocal halfway
        writer, counted = None, False
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(head + body[:half])
            await writer.drain()  # the server has taken it (read it, or answered early and discards it)
            halfway, counted = halfway + 1, True
            if halfway == n:
                all_halfway.set()
            await asyncio.wait_for(all_halfway.wait(), CLIENT_TIMEOUT_S)
            await asyncio.sleep(pause_s)
            writer.write(body[half:])
            await writer.drain()
            status, headers, _ = await asyncio.wait_for(read_response(reader), CLIENT_TIMEOUT_S)
            key = str(status)
            if status == 503:
                key += " with Retry-After" if "retry-after" in headers else " without Retry-After"
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
            key = type(e).__name__
            if not counted:  # never leave the others waiting
                halfway += 1
                if halfway >= n:
                    all_halfway.set()
        finally:
            if writer is not None:
                writer.close()
        statuses.append(key)

    await asyncio.gather(*(one() for _ in range(n)))
    stop.set()
    sampler.join()
    return _count(statuses), rss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=("idle", "uploads", "both"), default="both")
    ap.add_argument("--idle", type=int, default=500, help="idle TCP connections to open (part 1)")
    ap.add_argument("--probes", type=int, default=50, help="/healthz probes per measurement (part 1)")
    ap.add_argument("--idle-wait-s", type=float, default=30.0, help="how long to wait for the server to close them")
    ap.add_argument("--uploads", type=int, default=60, help="concurrent uploads (part 2)")
    ap.add_argument("--upload-mib", type=float, default=19.0)
    ap.add_argument("--max-queue", type=int, default=8, help="the server's --max-queue in part 2")
    ap.add_argument("--pause-s", type=float, default=1.0,
                    help="part 2: the pause between every upload's first MiB and the rest of the bodies")
    ap.add_argument("--settle-s", type=float, default=5.0, help="RSS 'after' is read this long after the last answer")
    ap.add_argument("--serve-args", default="", help="more `safeclip serve` flags, one shell-quoted string")
    ap.add_argument("--deadline-s", type=float, default=900.0, help="the whole run stops after this")
    args = ap.parse_args()
    if not 0 < args.idle <= 2000 or not 0 < args.uploads <= 200 or not 0 < args.probes <= 1000:
        raise SystemExit("--idle at most 2000, --uploads at most 200, --probes at most 1000")

    import httpx
    import safeclip

    watchdog = threading.Timer(args.deadline_s, lambda: os.kill(os.getpid(), signal.SIGINT))
    watchdog.daemon = True
    watchdog.start()
    ckpt = vit_b32_checkpoint()
    cache = Path(os.environ.get("SAFECLIP_BENCH_CACHE", Path(tempfile.gettempdir()) / "safeclip-bench" / "cache"))
    extra = shlex.split(args.serve_args)
    small = photos()[0].read_bytes()
    print(f"safeclip from {Path(safeclip.__file__).parent}; ViT-B-32 with RANDOM weights (no moderation result); "
          f"{os.cpu_count()} CPUs shared with other work: figures vary run to run; extra flags: {extra or 'none'}",
          flush=True)
    servers: list[Server] = []
    try:
        if args.part in ("idle", "both"):
            print(f"\n1. {args.idle} idle sockets", flush=True)
            s = Server("idle", ckpt, cache, extra)
            servers.append(s)
            s.wait_ready(httpx, time.monotonic() + 900)
            part_idle(httpx, s, args.idle, args.probes, args.idle_wait_s, small)
            s.stop()
        if args.part in ("uploads", "both"):
            body = noise_png(args.upload_mib)
            print(f"\n2. {args.uploads} concurrent authorised uploads of {len(body) / 2**20:.1f} MiB (noise PNG), "
                  f"--max-queue {args.max_queue}", flush=True)
            s = Server("uploads", ckpt, cache, ["--max-queue", str(args.max_queue), *extra])
            servers.append(s)
            s.wait_ready(httpx, time.monotonic() + 900)
            before = s.rss_mb()
            exact_peak = s.reset_peak()
            t0 = time.perf_counter()
            statuses, rss = asyncio.run(uploads(s, body, args.uploads, args.pause_s))
            wall = time.perf_counter() - t0
            peak = s.rss_mb("VmHWM") if exact_peak else max(rss, default=float("nan"))
            time.sleep(args.settle_s)
            after = s.rss_mb()
            print(f"  answered in {wall:.1f} s: {statuses}", flush=True)
            print(f"  server RSS: {before:.0f} MB before, peak {peak:.0f} MB ({'VmHWM' if exact_peak else 'sampled'}; "
                  f"sampled every 0.1 s: max {max(rss, default=float('nan')):.0f}, mean {statistics.fmean(rss):.0f}), "
                  f"{after:.0f} MB {args.settle_s:.0f} s after the last answer", flush=True)
            s.stop()
    finally:
        for s in servers:
            s.stop()
        watchdog.cancel()


if __name__ == "__main__":
    main()
