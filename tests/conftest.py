"""Shared fixtures: a tiny random-weight open_clip checkpoint, made here and loaded through the public path.

Nothing these fixtures produce is a moderation result: the weights are random. They exercise the real loading,
preprocessing and batching code; decision logic is tested with embeddings built so the right answer is known.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import settings

# CI draws the same examples on every run, so that a main which passed keeps passing and a failure is one to fix, not
# a draw; a local run explores new examples each time (HYPOTHESIS_PROFILE=ci replays CI's). What exploration finds
# becomes a deterministic regression test.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"
if not CORPUS.is_dir():  # CI clones main into another folder with shared/ beside it, as here
    CORPUS = Path(os.environ.get("SAFECLIP_CORPUS", "../shared/corpus")).resolve()

TINY_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def make_tiny_checkpoint(folder: Path, seed: int = 0, embed_dim: int | None = None) -> Path:
    """Write an open_clip ``local-dir`` model (config + random weights); return the folder. ``embed_dim``: another
    embedding width than TINY_CFG's (512 puts LAION's ViT-B-32 heads behind it, for mechanics)."""
    import open_clip
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = TINY_CFG if embed_dim is None else {**TINY_CFG, "embed_dim": embed_dim}
    model = open_clip.CLIP(**cfg)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder


@pytest.fixture(scope="session")
def corpus() -> Path:
    if not CORPUS.is_dir():
        pytest.skip(f"corpus not found at {CORPUS}")
    return CORPUS


@pytest.fixture(scope="session")
def photos(corpus: Path) -> list[Path]:
    return sorted(p for p in (corpus / "photos").iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".webp"})


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path) -> str:
    """The ``model=`` string a user passes for a local open_clip folder."""
    return f"local-dir:{tiny_model_dir}"


@pytest.fixture(scope="session")
def tiny512_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random model whose embeddings are 512-d, like ViT-B-32's (LAION's B/32 heads fit behind it)."""
    return f"local-dir:{make_tiny_checkpoint(tmp_path_factory.mktemp('tiny-clip-512'), seed=1, embed_dim=512)}"


LAION = CORPUS.parent / "peers" / "laion-nsfw"


@pytest.fixture(scope="session")
def laion_dir() -> Path:
    """LAION's published heads and violence vectors (read from ../shared, never copied into the repository)."""
    if not (LAION / "clip_ViT-B-32_openai_binary_nsfw_head.pth").is_file():
        pytest.skip(f"LAION's files not found at {LAION}")
    return LAION


@pytest.fixture
def offline(monkeypatch, tmp_path) -> Path:
    """An empty cache under ``tmp_path / "cache"``, no artifact mirror, offline; a connection attempt fails the test."""
    import socket

    monkeypatch.setenv("SAFECLIP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SAFECLIP_ARTIFACTS_DIR", raising=False)
    monkeypatch.setenv("SAFECLIP_OFFLINE", "1")
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("a connection was attempted"))
    return tmp_path


@pytest.fixture
def mirror(offline, monkeypatch, laion_dir) -> Path:
    """:func:`offline`, with LAION's published files in ``$SAFECLIP_ARTIFACTS_DIR`` (the offline mirror)."""
    monkeypatch.setenv("SAFECLIP_ARTIFACTS_DIR", str(laion_dir))
    return laion_dir


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("safeclip-cache")


@pytest.fixture(scope="session")
def tiny_encoder(tiny_model: str, cache_dir: Path):
    from safeclip.embed import Encoder

    return Encoder(tiny_model, cache_dir=cache_dir, device="cpu")


def unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


class OrthoTexts:
    """A text 'encoder' giving every distinct text its own orthonormal direction (known-answer tests)."""

    def __init__(self, dim: int = 512):
        self.dim = dim
        self.index: dict[str, int] = {}

    def __call__(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            k = self.index.setdefault(t, len(self.index))
            if k >= self.dim:
                raise ValueError("too many texts for the dimension")
            out[i, k] = 1.0
        return out


def assert_same_rows(a, b, *, ignore: tuple[str, ...] = (), atol: float = 0.0, metadata: bool = False) -> None:
    """Two audit outputs hold the same rows: equal columns (and schema metadata, if asked), probabilities equal
    (bit for bit by default: scores do not depend on the batch layout; ``atol`` only where another runtime or
    engine computed the embeddings)."""
    cols = [c for c in a.column_names if c not in ignore]
    assert cols == [c for c in b.column_names if c not in ignore]
    if metadata:
        assert a.schema.metadata == b.schema.metadata
    assert a.num_rows == b.num_rows
    for c in cols:
        if c.startswith("p_"):
            x = a.column(c).to_numpy(zero_copy_only=False).astype(np.float64)
            y = b.column(c).to_numpy(zero_copy_only=False).astype(np.float64)
            np.testing.assert_allclose(x, y, rtol=0, atol=atol, equal_nan=True, err_msg=c)
        else:
            assert a.column(c).to_pylist() == b.column(c).to_pylist(), c


def encode_clip(frames: Iterable[tuple[int | None, np.ndarray]], *, codec: str, rate: int, size: tuple[int, int],
                fmt: str | None = None, path: Path | None = None, pix_fmt: str = "yuv420p", reformat: bool = False,
                configure: Callable[[Any], None] | None = None) -> bytes:
    """A video made with PyAV from ``(pts or None, HxWx3 uint8 RGB)`` frames: written to ``path``, else returned as
    bytes in container ``fmt``. ``configure`` sets more of the stream (GOP, rotation, time base) before any frame;
    ``reformat``: convert each frame to ``pix_fmt`` first (codecs that take no RGB conversion)."""
    import av

    buf = io.BytesIO()
    with av.open(str(path) if path is not None else buf, "w", format=fmt) as c:
        s = c.add_stream(codec, rate=rate)
        s.width, s.height, s.pix_fmt = size[0], size[1], pix_fmt
        if configure is not None:
            configure(s)
        for pts, a in frames:
            frame = av.VideoFrame.from_ndarray(a, format="rgb24")
            if reformat:
                frame = frame.reformat(format=pix_fmt)
            if pts is not None:
                frame.pts = pts
            for packet in s.encode(frame):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return buf.getvalue()
