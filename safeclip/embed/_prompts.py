"""Prompt-text embeddings cached per embedding space, in memory and on disk (no torch)."""

from __future__ import annotations

import hashlib
import os
import threading
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import MissingPromptError

from ..files import write_atomic
from ._config import default_cache_dir

__all__ = ["PromptCache"]


class PromptCache:
    """Prompt-text embeddings of one embedding space, in memory and in one ``.npz`` file on disk.

    Keyed by the sha256 of each text, so editing one prompt recomputes only that prompt. Re-scoring under an edited
    policy reads prompt embeddings from here without loading the model. Thread-safe; writes are atomic renames, and
    a corrupt or unwritable cache degrades to memory only.
    """

    def __init__(self, encoder_id: str, cache_dir: str | os.PathLike[str] | None = None) -> None:
        self.encoder_id = encoder_id
        key = hashlib.sha256(encoder_id.encode()).hexdigest()[:24]
        self.path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / "text" / f"{key}.npz"
        self._mem: dict[str, np.ndarray] = {}
        self._loaded = False
        self._lock = threading.Lock()

    @staticmethod
    def _key(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        try:
            with np.load(self.path, allow_pickle=False) as z:
                for k in z.files:
                    self._mem.setdefault(k, z[k])
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):
            pass  # missing or corrupt: it is only a cache

    def missing(self, texts: Sequence[str]) -> list[str]:
        """The distinct texts that have no cached embedding."""
        with self._lock:
            self._load()
            return [t for t in dict.fromkeys(texts) if self._key(t) not in self._mem]

    def get(self, texts: Sequence[str]) -> np.ndarray:
        """``(N, D)`` cached embeddings; ``KeyError`` names the first text that is not cached."""
        with self._lock:
            self._load()
            try:
                return np.stack([self._mem[self._key(t)] for t in texts])
            except KeyError:
                first = next(t for t in texts if self._key(t) not in self._mem)
                raise MissingPromptError(f"no cached embedding for prompt {first!r} under {self.encoder_id!r}") from None

    def put(self, texts: Sequence[str], vectors: np.ndarray) -> None:
        with self._lock:
            self._load()
            for t, v in zip(texts, vectors):
                self._mem[self._key(t)] = np.asarray(v, np.float32)
            try:
                write_atomic(self.path, lambda f: np.savez(f, **self._mem))
            except OSError:
                pass  # read-only cache dir: keep the in-memory cache only
