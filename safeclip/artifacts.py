"""Pinned, non-executable artifacts (probes, calibrators).

Artifacts are JSON files. A policy references each by a path relative to the policy file and its sha256; the bytes
are read once, hashed, compared with the pin and only then parsed. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np

from .files import write_bytes_atomic, write_json_atomic
from .errors import ArtifactIntegrityError, EncoderMismatchError

__all__ = ["ARTIFACT_FORMAT", "copy_pinned", "JSON_BYTES_PER_NUMBER", "MAX_ARTIFACT_JSON_BYTES", "MAX_ARTIFACT_NUMBERS",
           "MAX_LOGIT_BOUND", "check_artifact", "check_encoder", "finite_number", "float_list", "jsonable",
           "load_pinned", "read_pinned_json", "resolve_artifact_path", "sha256_bytes", "sha256_file",
           "write_bytes_atomic", "write_json_atomic"]

ARTIFACT_FORMAT = 1
"""The format version every JSON artifact records; a reader refuses any other."""
MAX_ARTIFACT_NUMBERS = 2_000_000
"""The most numbers (an MLP head's parameters, a probe's coefficients, a calibrator's knots) a JSON artifact may
hold: ten times LAION's largest head (ViT-L/14, 214k parameters); a 1024-1024-512-1 MLP has 1.6M."""
JSON_BYTES_PER_NUMBER = 32
"""The most bytes safeclip's canonical JSON takes per number: a float32 value's repr (up to 23 characters), its
indentation and ``,\n``."""
MAX_LOGIT_BOUND = 1e30
"""The largest worst-case ``|logit|`` a probe or head may have over embeddings of norm ``1 + NORM_TOLERANCE``.

The bound is computed at load from the weights as applied (a head's standardisation folded in): ``||W||_F * bound +
||b||`` layer by layer (ReLU never increases a norm). Under it every logit is finite in the float32 signal columns
with a factor of 1e8 to spare; LAION's heads bound at 3e3 (B/32) and 1e5 (L/14). Anything above it is not a
trained head (a zero variance over a subnormal epsilon, weights near float32's limit) and would score inf or NaN.
A calibrator's linear score must stay finite in float32 for signals up to this bound (its coefficients are refused
above about 3e7)."""
MAX_ARTIFACT_JSON_BYTES = MAX_ARTIFACT_NUMBERS * JSON_BYTES_PER_NUMBER + (1 << 20)
"""A JSON artifact larger than this (62 MiB: the largest artifact safeclip writes, plus 1 MiB of metadata) is
refused before it is read, hashed or parsed: parsing takes several times the file's size in memory."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def copy_pinned(src: str | os.PathLike[str], sha256: str, dst: str | os.PathLike[str]) -> None:
    """Copy the artifact ``src`` to ``dst`` (atomically) after checking it still matches its pin ``sha256``; nothing
    is written when it does not (:class:`~safeclip.errors.ArtifactIntegrityError`). Copying a file onto itself does
    nothing."""
    if Path(src).resolve() == Path(dst).resolve():
        return
    try:
        data = Path(src).read_bytes()
    except OSError as e:
        raise ArtifactIntegrityError(f"cannot read artifact {str(src)!r}: {e}") from e
    if sha256_bytes(data) != sha256:
        raise ArtifactIntegrityError(f"artifact {str(src)!r} no longer matches its pin {sha256}")
    write_bytes_atomic(dst, data)


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
    """Read a JSON artifact only if it is at most :data:`MAX_ARTIFACT_JSON_BYTES` and its bytes hash to ``sha256``."""
    limit = MAX_ARTIFACT_JSON_BYTES

    def too_big() -> ArtifactIntegrityError:
        return ArtifactIntegrityError(f"artifact {str(path)!r} is larger than {limit >> 20} MiB, more than a safeclip "
                                      f"artifact holds ({MAX_ARTIFACT_NUMBERS} numbers at most); refusing to read it")

    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size > limit:
                raise too_big()
            data = f.read(limit + 1)  # bounded even if the file grows while it is read
    except OSError as e:
        raise ArtifactIntegrityError(f"cannot read artifact {str(path)!r}: {e}") from e
    if len(data) > limit:
        raise too_big()
    actual = sha256_bytes(data)
    if actual != sha256.lower():
        raise ArtifactIntegrityError(
            f"artifact {str(path)!r} has sha256 {actual}, but the policy pins {sha256}; refusing to load it"
        )
    try:
        obj = json.loads(data)
    except ValueError as e:
        raise ArtifactIntegrityError(f"artifact {str(path)!r} is not valid JSON: {e}") from e
    except RecursionError:
        raise ArtifactIntegrityError(f"artifact {str(path)!r} is nested too deeply to be a safeclip artifact") from None
    if not isinstance(obj, dict):
        raise ArtifactIntegrityError(f"artifact {str(path)!r} must hold a JSON object")
    return obj


_T = TypeVar("_T")


def load_pinned(path: str | os.PathLike[str], sha256: str, build: Callable[[dict[str, Any]], _T]) -> _T:
    """``build(read_pinned_json(path, sha256))``; an :class:`ArtifactIntegrityError` from ``build`` names the file."""
    d = read_pinned_json(path, sha256)
    try:
        return build(d)
    except ArtifactIntegrityError as e:
        raise ArtifactIntegrityError(f"artifact {str(path)!r}: {e}") from e


def jsonable(obj: Any) -> Any:
    """Plain-JSON copy of metadata: numpy scalars/arrays to Python, tuples to lists, NaN/inf to None."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"metadata value {obj!r} of type {type(obj).__name__} is not JSON-serialisable")


def check_artifact(d: Any, kind: str) -> None:
    if not isinstance(d, Mapping):
        raise ArtifactIntegrityError(f"a {kind} artifact must be a JSON object")
    if d.get("kind") != kind:
        raise ArtifactIntegrityError(f"expected an artifact of kind {kind!r}, got {d.get('kind')!r}")
    fmt = d.get("format")
    if fmt != ARTIFACT_FORMAT:
        raise ArtifactIntegrityError(
            f"{kind} artifact has format {fmt!r}; this safeclip reads format {ARTIFACT_FORMAT} (upgrade safeclip?)"
        )


def float_list(d: Mapping[str, Any], key: str, kind: str) -> np.ndarray:
    v = d.get(key)
    if not isinstance(v, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        raise ArtifactIntegrityError(f"{kind} artifact: {key!r} must be a list of numbers")
    try:
        arr = np.asarray(v, dtype=np.float64)
    except OverflowError:
        raise ArtifactIntegrityError(f"{kind} artifact: {key!r} holds numbers beyond float range") from None
    with np.errstate(over="ignore"):
        fits32 = np.isfinite(arr.astype(np.float32)).all()  # applied in float32: 1e308 would become inf there
    if not fits32:
        raise ArtifactIntegrityError(f"{kind} artifact: {key!r} holds non-finite numbers or numbers beyond float32")
    return arr


def finite_number(d: Mapping[str, Any], key: str, kind: str) -> float:
    v = d.get(key)
    try:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and abs(float(v)) < float(np.finfo(np.float32).max)
    except OverflowError:  # an int beyond float range
        ok = False
    if not ok:
        raise ArtifactIntegrityError(f"{kind} artifact: {key!r} must be a finite number within float32 range")
    return float(v)


def check_encoder(recorded: str | None, expected: str | None, what: str, fix: str = "refit it for this encoder",
                  ) -> None:
    if expected is not None and recorded is not None and recorded != expected:
        raise EncoderMismatchError(
            f"{what} was fitted in embedding space {recorded!r}, but this policy runs in {expected!r}; {fix}"
        )
