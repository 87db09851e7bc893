"""The identity of an embedding space, derived without torch or open_clip.

``encoder_id`` = architecture | weights identity | ``px:`` pixel-spec digest [| ``int8``]. The weights identity is
the pretrained tag, the ``hf-hub:`` name, or a hash of the local checkpoint file. Hashing a 600 MB checkpoint takes
a good part of a second, so hashes are remembered on disk by (path, size, mtime, inode), as the in-process memo
always did, and a warm start only ``stat``s the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path

from .._files import write_json_atomic
from ..artifacts import sha256_file
from ..errors import ModelLoadError
from ._pixels import PixelSpec

__all__ = ["encoder_id_for", "find_checkpoint_in_dir", "model_arch", "weights_identity"]

_MEMO_FILE = "checkpoint-hashes.json"
_memo: dict[str, str] = {}
_memo_lock = threading.Lock()


def _stat_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"


def _file_sha256(path: Path, cache_dir: Path | None) -> str:
    key = _stat_key(path)
    memo_path = cache_dir / _MEMO_FILE if cache_dir is not None else None
    with _memo_lock:
        if key in _memo:
            return _memo[key]
        if memo_path is not None:
            with contextlib.suppress(OSError, ValueError, TypeError):
                found = json.loads(memo_path.read_text()).get(key)
                if isinstance(found, str) and len(found) == 64:
                    _memo[key] = found
                    return found
    digest = sha256_file(path)
    with _memo_lock:
        _memo[key] = digest
        if memo_path is not None:
            try:
                stored = json.loads(memo_path.read_text())
                stored = stored if isinstance(stored, dict) else {}
            except (OSError, ValueError):
                stored = {}
            stored[key] = digest
            with contextlib.suppress(OSError):  # a read-only cache: the in-process memo still holds
                write_json_atomic(memo_path, stored)
    return digest


def find_checkpoint_in_dir(folder: Path) -> Path | None:
    """The checkpoint open_clip loads from a ``local-dir:`` folder (the same preference order, without open_clip)."""
    found = [p for ext in ("*.safetensors", "*.bin", "*.pth") for p in folder.glob(ext)]
    if not found:
        return None
    found.sort()
    found.sort(key=lambda p: p.suffix == ".safetensors", reverse=True)
    preferred = ["open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                 "open_clip_pytorch_model.pth", "model.safetensors", "pytorch_model.bin", "pytorch_model.pth",
                 "model.pth"]
    named = sorted((p for p in found if p.name in preferred), key=lambda p: preferred.index(p.name))
    return named[0] if named else found[0]


def weights_identity(model: str, pretrained: str | None, cache_dir: Path | None = None) -> str:
    """A stable name for the weights: the pretrained tag, the hub name, or a hash of the local checkpoint file."""
    if model.startswith("local-dir:"):
        folder = Path(model[len("local-dir:"):])
        ckpt = find_checkpoint_in_dir(folder) if folder.is_dir() else None
        if ckpt is None:
            raise ModelLoadError(f"no checkpoint (*.safetensors, *.bin, *.pth) in {folder}")
        cfg = folder / "open_clip_config.json"
        if not cfg.is_file():
            raise ModelLoadError(f"{folder} has no open_clip_config.json: a local-dir: model is a folder in "
                                 "open_clip's layout (open_clip_config.json + weights)")
        return f"sha256:{_file_sha256(ckpt, cache_dir)[:16]}+cfg:{sha256_file(cfg)[:8]}"
    if model.startswith("hf-hub:"):
        return model
    if pretrained and (os.sep in pretrained or Path(pretrained).suffix in {".pt", ".pth", ".bin", ".safetensors"}):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise ModelLoadError(
                f"checkpoint file {pretrained!r} does not exist. Pass the path of an open_clip checkpoint "
                "(.pt/.bin/.safetensors) or a pretrained tag; see `open_clip.list_pretrained()`."
            )
        return "sha256:" + _file_sha256(path, cache_dir)[:16]
    return str(pretrained)


def model_arch(model: str) -> str:
    """The architecture part of an ``encoder_id`` (a local folder's path is not part of the space's name)."""
    return "local-dir" if model.startswith("local-dir:") else model


def encoder_id_for(model: str, weights_id: str, spec: PixelSpec, precision: str) -> str:
    """fp32, fp16 and bf16 embed into one space (torch and ONNX Runtime alike); int8 is a space of its own."""
    eid = f"{model_arch(model)}|{weights_id}|px:{spec.digest}"
    return f"{eid}|int8" if precision == "int8" else eid
