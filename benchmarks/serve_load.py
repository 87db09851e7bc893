"""`safeclip serve` under load, on loopback: micro-batching against the same server with `--max-batch 1`.

Timing only: the model is ViT-B-32 with random weights (benchmarks/_common.py); nothing printed is a moderation
result. Two servers run side by side on 127.0.0.1 (free ports), each a `safeclip serve` subprocess, and are asked in
turn, so that drift on a shared machine hits both alike. The clients (asyncio + httpx, in this process) send corpus
photos as raw bodies.

1. Closed loop at concurrency 1, 4, 16, 64: throughput and p50/p99 latency, batched vs `--max-batch 1`.
   Target on a CPU at concurrency 16: >= 1.25x the throughput with p99 no worse (the same cores also decode).
2. Overload: an open loop at 4x the sustainable rate (the batched server's best throughput in 1.) for 10 s:
   every request answered 200 or 503 (none lost, none hung past the client timeout), server RSS flat.
3. SIGTERM under load (concurrency 16): every request in flight at the signal completes with 200; the server
   exits 0.

Bounded: at most `--requests` per level (and `--level-s` seconds), 10 s of overload, one global deadline; every
server started here is stopped (SIGTERM, then SIGKILL) before the script exits.

    python benchmarks/serve_load.py [--requests 160] [--level-s 40] [--overload-s 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ServeProcess, pct, photos, vit_b32_checkpoint  # noqa: E402

LEVELS = (1, 4, 16, 64)
CLIENT_TIMEOUT_S = 60.0


def Server(label: str, ckpt: Path, cache: Path, extra: list[str]) -> ServeProcess:
    return ServeProcess(label, ckpt, cache, ["--timeout-s", "30", *extra])


async def closed_loop(httpx, url: str, bodies: list[bytes], concurrency: int, n: int, max_s: float) -> dict:
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    sent = 0
    stop_at = time.monotonic() + max_s
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=CLIENT_TIMEOUT_S, limits=limits) as client:
        async def worker() -> None:
            nonlocal sent
            while sent < n and time.monotonic() < stop_at:
                body = bodies[sent % len(bodies)]
                sent += 1
                t = time.perf_counter()
                try:
                    r = await client.post("/v1/check", content=body)
                    key = str(r.status_code)
                except httpx.HTTPError as e:
                    key = type(e).__name__
                latencies.append(time.perf_counter() - t)
                statuses[key] = statuses.get(key, 0) + 1

        # warm-up: one round at this concurrency, not counted
        await asyncio.gather(*(client.post("/v1/check", content=bodies[i % len(bodies)]) for i in range(concurrency)))
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"n": len(latencies), "rps": len(latencies) / wall, "p50": pct(latencies, .5), "p99": pct(latencies, .99),
            "statuses": statuses}


async def open_loop(httpx, server: Server, bodies: list[bytes], rate: float, seconds: float) -> dict:
    statuses: dict[str, int] = {}
    rss: list[float] = [server.rss_mb()]
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256)
    async with httpx.AsyncClient(base_url=server.url, timeout=CLIENT_TIMEOUT_S, limits=limits) as client:
        async def one(i: int) -> None:
            t = time.perf_counter()
            try:
                r = await client.post("/v1/check", content=bodies[i % len(bodies)])
                key = str(r.status_code)
                if r.status_code == 503 and "retry-after" not in r.headers:
                    key = "503 without Retry-After"
            except httpx.TimeoutException:
                key = "hung (client timeout)"
            except httpx.HTTPError as e:
                key = type(e).__name__
            latencies.append(time.perf_counter() - t)
            statuses[key] = statuses.get(key, 0) + 1

        async def sample_rss(stop: asyncio.Event) -> None:
            while not stop.is_set():
                rss.append(server.rss_mb())
                await asyncio.sleep(0.5)

        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_rss(stop))
        tasks = []
        t0 = time.monotonic()
        i = 0
        while time.monotonic() - t0 < seconds:
            due = t0 + i / rate
            if due > time.monotonic():
                await asyncio.sleep(due - time.monotonic())
            tasks.append(asyncio.create_task(one(i)))
            i += 1
        await asyncio.gather(*tasks)
        stop.set()
        await sampler
        rss.append(server.rss_mb())
    return {"sent": i, "statuses": statuses, "rss": rss, "p99": pct(latencies, .99)}


async def sigterm_under_load(httpx, server: Server, bodies: list[bytes], concurrency: int, before_s: float) -> dict:
    """Closed loop; SIGTERM after ``before_s``; every request sent >= 50 ms before the signal and not yet answered
    then must complete with 200. Requests sent after the signal may be refused (the server stopped accepting)."""
    events: list[tuple[float, float | None, str]] = []  # (sent, answered, status)
    signalled: list[float] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=server.url, timeout=CLIENT_TIMEOUT_S, limits=limits) as client:
        async def worker(k: int) -> None:
            i = k
            while not signalled or time.monotonic() < signalled[0] + 1.0:
                t = time.monotonic()
                try:
                    r = await client.post("/v1/check", content=bodies[i % len(bodies)])
                    events.append((t, time.monotonic(), str(r.status_code)))
                except httpx.HTTPError as e:
                    events.append((t, None, type(e).__name__))
                    if signalled:
                        return
                i += concurrency

        async def killer() -> None:
            await asyncio.sleep(before_s)
            signalled.append(time.monotonic())
            server.proc.send_signal(signal.SIGTERM)

        await asyncio.gather(killer(), *(worker(k) for k in range(concurrency)))
    sig = signalled[0]
    in_flight = [e for e in events if e[0] <= sig - 0.05 and (e[1] is None or e[1] >= sig)]
    completed = [e for e in in_flight if e[2] == "200"]
    after = [e for e in events if e[0] > sig]
    code = await asyncio.to_thread(server.proc.wait, 60)
    return {"in_flight": len(in_flight), "completed": len(completed),
            "lost": sorted({e[2] for e in in_flight if e[2] != "200"}),
            "after_signal": {s: sum(1 for e in after if e[2] == s) for s in sorted({e[2] for e in after})},
            "exit_code": code}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=160, help="requests per concurrency level (at most)")
    ap.add_argument("--level-s", type=float, default=40.0, help="seconds per concurrency level (at most)")
    ap.add_argument("--overload-s", type=float, default=10.0)
    ap.add_argument("--photos", type=int, default=48)
    ap.add_argument("--deadline-s", type=float, default=1500.0, help="the whole run stops after this")
    args = ap.parse_args()

    import httpx

    watchdog = threading.Timer(args.deadline_s, lambda: os.kill(os.getpid(), signal.SIGINT))
    watchdog.daemon = True
    watchdog.start()
    ckpt = vit_b32_checkpoint()
    cache = Path(os.environ.get("SAFECLIP_BENCH_CACHE", Path(tempfile.gettempdir()) / "safeclip-bench" / "cache"))
    bodies = [p.read_bytes() for p in photos()[: args.photos]]
    print(f"ViT-B-32 with RANDOM weights (timing only, no moderation result); {len(bodies)} corpus photos "
          f"(mean {statistics.fmean(map(len, bodies)) / 1024:.0f} KiB) as raw bodies; {os.cpu_count()} CPUs, "
          "shared with other work: figures vary run to run", flush=True)

    # The same queue bound for both, so that only batching differs (--max-queue's default follows --max-batch).
    queue = ["--max-queue", str(max(LEVELS))]
    batched = Server("batched", ckpt, cache, queue)
    single = Server("max-batch 1", ckpt, cache, [*queue, "--max-batch", "1"])
    servers = (batched, single)
    try:
        deadline = time.monotonic() + 900  # the first start may export ONNX and embed the policy's prompts
        for s in servers:
            s.wait_ready(httpx, deadline)
        print(f"servers ready (both --max-queue {max(LEVELS)}; batched: default --max-batch and --max-wait-ms; "
              f"RSS {batched.rss_mb():.0f} MB / {single.rss_mb():.0f} MB)", flush=True)

        print(f"\n{'conc':>4}  {'server':<12} {'req':>4} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8}  statuses")
        results: dict[tuple[str, int], dict] = {}
        for c in LEVELS:
            n = min(args.requests, max(40, 8 * c))
            for s in servers:
                r = asyncio.run(closed_loop(httpx, s.url, bodies, c, n, args.level_s))
                results[(s.label, c)] = r
                print(f"{c:>4}  {s.label:<12} {r['n']:>4} {r['rps']:>7.1f} {r['p50'] * 1e3:>8.0f} "
                      f"{r['p99'] * 1e3:>8.0f}  {r['statuses']}", flush=True)
        print("\nbatched vs --max-batch 1:")
        for c in LEVELS:
            b, u = results[("batched", c)], results[("max-batch 1", c)]
            note = "   (target at 16: >= 1.25x throughput, p99 ratio <= 1.00)" if c == 16 else ""
            print(f"  concurrency {c:>2}: throughput {b['rps'] / u['rps']:.2f}x, p99 {b['p99'] / u['p99']:.2f}x of "
                  f"max-batch 1's{note}")
        single.stop()

        sustainable = max(results[("batched", c)]["rps"] for c in LEVELS)
        rate = 4 * sustainable
        print(f"\noverload: open loop at {rate:.0f} req/s (4 x {sustainable:.1f}) for {args.overload_s:.0f} s on the "
              "batched server", flush=True)
        o = asyncio.run(open_loop(httpx, batched, bodies, rate, args.overload_s))
        answered = o["statuses"].get("200", 0) + o["statuses"].get("503", 0)
        rss = o["rss"]
        print(f"  sent {o['sent']}, answered 200 or 503: {answered} ({o['statuses']}); "
              f"p99 {o['p99'] * 1e3:.0f} ms")
        print(f"  every request answered 200/503: {'yes' if answered == o['sent'] else 'NO'}; server RSS "
              f"{rss[0]:.0f} MB before, peak {max(rss):.0f} MB, {rss[-1]:.0f} MB after "
              f"(peak +{max(rss) - rss[0]:.0f} MB)", flush=True)

        print("\nSIGTERM under load (concurrency 16, batched server):", flush=True)
        t = asyncio.run(sigterm_under_load(httpx, batched, bodies, 16, before_s=3.0))
        print(f"  in flight at the signal: {t['in_flight']}, completed 200: {t['completed']}, lost: {t['lost'] or 0}; "
              f"sent after the signal: {t['after_signal']}; exit code {t['exit_code']}", flush=True)
    finally:
        for s in servers:
            s.stop()
        watchdog.cancel()


if __name__ == "__main__":
    main()
