"""Shared benchmark helpers: a ViT-B-32 checkpoint with random weights (timing only), corpus paths, stats.

Random weights have exactly the cost of real ones; nothing a benchmark prints is a moderation result.
"""

from __future__ import annotations

import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

CORPUS = Path(os.environ.get("SAFECLIP_CORPUS", Path(__file__).resolve().parents[2] / "shared" / "corpus"))
PHOTOS = CORPUS / "photos"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


def photos(suffixes: set[str] | None = None) -> list[Path]:
    keep = suffixes or IMAGE_SUFFIXES
    return sorted(p for p in PHOTOS.iterdir() if p.suffix.lower() in keep)


def vit_b32_checkpoint() -> Path:
    """A ViT-B-32 state_dict with random weights, made once and kept in the temp folder."""
    path = Path(os.environ.get("SAFECLIP_BENCH_CKPT", Path(tempfile.gettempdir()) / "safeclip-bench" /
                                "vit-b-32-random.pt"))
    if not path.is_file():
        import open_clip
        import torch

        path.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        model = open_clip.create_model("ViT-B-32")
        tmp = path.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, path)
    return path


def timings(fn: Callable[[], object], repeat: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def summary(xs: list[float]) -> str:
    return f"p50 {pct(xs, .5) * 1e3:7.1f} ms  p95 {pct(xs, .95) * 1e3:7.1f} ms  mean {statistics.fmean(xs) * 1e3:7.1f} ms"


class ServeProcess:
    """One `safeclip serve` subprocess (ViT-B-32, random weights) on a free loopback port; ``token``: its bearer
    token (``None``: no token)."""

    def __init__(self, label: str, ckpt: Path, cache: Path, extra: list[str], token: str | None = None) -> None:
        self.label = label
        import safeclip

        # The server runs the safeclip this script imports (its checkout first on the path, and a neutral working
        # directory: `python -m` would put the current one first).
        code = str(Path(safeclip.__file__).resolve().parents[1])
        env = {**os.environ, "SAFECLIP_CACHE_DIR": str(cache),
               "PYTHONPATH": os.pathsep.join(filter(None, [code, os.environ.get("PYTHONPATH")]))}
        env.pop("SAFECLIP_SERVE_TOKEN", None)
        if token is not None:
            env["SAFECLIP_SERVE_TOKEN"] = token
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "safeclip", "serve", "--host", "127.0.0.1", "--port", "0", "--model", "ViT-B-32",
             "--pretrained", str(ckpt), *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True, cwd=tempfile.gettempdir())
        self.port: int | None = None
        self.stderr: list[str] = []
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)
            m = re.search(r"running on http://127\.0\.0\.1:(\d+)", line)
            if m:
                self.port = int(m.group(1))

    def wait_ready(self, httpx, deadline: float) -> None:
        while self.port is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{self.label}: the server did not start:\n" + "".join(self.stderr[-20:]))
            time.sleep(0.2)
        while True:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{self.label}: the server never became ready:\n" + "".join(self.stderr[-20:]))
            time.sleep(0.2)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rss_mb(self, field: str = "VmRSS") -> float:
        """The server's resident memory now (``VmHWM``: its peak since :meth:`reset_peak`), in MB."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return float("nan")

    def reset_peak(self) -> bool:
        try:
            Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")  # Linux: VmHWM starts again from VmRSS
            return True
        except OSError:
            return False

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode
