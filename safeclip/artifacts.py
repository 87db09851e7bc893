"""Pinned, non-executable artifacts (probes, calibrators).

Artifacts are JSON files. A policy references each by a path relative to the policy file and its sha256; the bytes
are read once, hashed, compared with the pin and only then parsed. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .errors import ArtifactIntegrityError

__all__ = ["sha256_bytes", "sha256_file", "resolve_artifact_path", "read_pinned_json", "write_bytes_atomic",
           "write_json_atomic"]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_artifact_path(
    path: str | os.PathLike[str], base_dir: str | os.PathLike[str] | None, *, allow_outside: bool = False
) -> Path:
    """Resolve ``path`` against ``base_dir``; refuse paths that escape it unless ``allow_outside``."""
    p = Path(path)
    if base_dir is None:
        return p.resolve()
    base = Path(base_dir).resolve()
    full = (base / p).resolve()
    if not allow_outside and not full.is_relative_to(base):
        raise ArtifactIntegrityError(
            f"artifact path {str(path)!r} escapes the policy directory {str(base)!r} "
            "(pass allow_outside=True to permit it)"
        )
    return full


def read_pinned_json(path: str | os.PathLike[str], sha256: str) -> dict[str, Any]:
    """Read a JSON artifact only if its bytes hash to ``sha256``."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ArtifactIntegrityError(f"cannot read artifact {str(path)!r}: {e}") from e
    actual = sha256_bytes(data)
    if actual != sha256.lower():
        raise ArtifactIntegrityError(
            f"artifact {str(path)!r} has sha256 {actual}, but the policy pins {sha256}; refusing to load it"
        )
    try:
        obj = json.loads(data)
    except ValueError as e:
        raise ArtifactIntegrityError(f"artifact {str(path)!r} is not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise ArtifactIntegrityError(f"artifact {str(path)!r} must hold a JSON object")
    return obj


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> str:
    """Write ``obj`` as JSON atomically (tmp file + rename); return the sha256 of the bytes written."""
    return write_bytes_atomic(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> str:
    """Write ``data`` atomically (tmp file + rename, so readers never see half a file); return its sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return sha256_bytes(data)
