"""The encoder's identity, and its memo (``encoders.json`` in the cache folder) that lets decoding start early.

Decode workers need the model's pixel spec and ``encoder_id`` (to prepare pixels and look the cache up), which the
model gives only once it has loaded: seconds on a CPU, longer on a cluster. An audit therefore remembers the
identity of every encoder it loaded, keyed by what determines it (the model arguments, the weight files' path, size
and mtime, open_clip's version and :data:`safeclip.embed.IDENTITY_VERSION`), and the next audit of the same weights
starts decoding on that guess while the model loads. The loaded model always has the last word: an engine compares
it with the guess before anything is committed, and starts over with the real identity if they differ. Each entry
carries a MAC under the user's cache key (:mod:`safeclip._trust`); one without it, written by anyone else, is no
guess at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import _trust
from ..files import write_json_atomic
from ..embed import IDENTITY_VERSION, PixelSpec

if TYPE_CHECKING:  # pragma: no cover
    from ..embed import Encoder

__all__ = ["MEMO_FILE", "EncoderIdentity", "encoder_memo_key"]

MEMO_FILE = "encoders.json"
_MEMO_MAC = "encoder-identity"  # the purpose of the memo's MACs (see safeclip._trust)


@dataclass(frozen=True)
class EncoderIdentity:
    """What the workers and the output depend on: the embedding space, its pixel spec and dimension."""

    encoder_id: str
    spec: PixelSpec
    dim: int

    @classmethod
    def of(cls, enc: Encoder) -> EncoderIdentity:
        return cls(enc.encoder_id, enc.pixel_spec, int(enc.dim))

    @classmethod
    def recall(cls, cache_dir: Path, key: str | None) -> EncoderIdentity | None:
        """The identity remembered under ``key``, or None (also when this user's key did not sign it)."""
        if key is None:
            return None
        try:
            entry = dict(json.loads((cache_dir / MEMO_FILE).read_text())[key])
            tag = entry.pop("mac", None)
            if not _trust.verify(_MEMO_MAC, [key, entry], tag):
                return None
            return cls(str(entry["encoder_id"]), PixelSpec(**{
                k: tuple(v) if isinstance(v, list) else v for k, v in entry["spec"].items()}), int(entry["dim"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def remember(self, cache_dir: Path, key: str | None) -> None:
        """Remember this identity under ``key`` (best effort: a read-only cache folder only costs the head start)."""
        if key is None:
            return
        path = cache_dir / MEMO_FILE
        try:
            memo = json.loads(path.read_text())
            memo = memo if isinstance(memo, dict) else {}
        except (OSError, ValueError):
            memo = {}
        entry = {"encoder_id": self.encoder_id, "spec": dataclasses.asdict(self.spec), "dim": self.dim}
        memo[key] = {**entry, "mac": _trust.mac(_MEMO_MAC, [key, entry])}
        with contextlib.suppress(OSError):
            write_json_atomic(path, memo)


def encoder_memo_key(model: str | None, pretrained: str | None) -> str | None:
    """A key for what ``Encoder(model, pretrained)`` will load (the resolved arguments: see
    :func:`safeclip.embed.resolve_encoder_args`), or None when open_clip's version is unknown."""
    files: list[Any] = []
    candidates: list[Path] = []
    if model and model.startswith("local-dir:"):
        folder = Path(model[len("local-dir:"):])
        candidates += sorted(folder.iterdir()) if folder.is_dir() else []
    if pretrained and Path(pretrained).expanduser().is_file():
        candidates.append(Path(pretrained).expanduser())
    for f in candidates:
        with contextlib.suppress(OSError):
            st = f.stat()
            files.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    try:
        code = [importlib.metadata.version("open_clip_torch"), IDENTITY_VERSION]
    except importlib.metadata.PackageNotFoundError:
        return None
    blob = json.dumps([model, pretrained, files, code])
    return hashlib.sha256(blob.encode()).hexdigest()[:32]
