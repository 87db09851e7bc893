"""Where exported image towers live: ``<cache>/onnx/<arch>-<precision>-<key>/``, one folder per export.

A folder holds the ONNX graph, its weights beside it (``<graph>.data``, mapped by ONNX Runtime instead of parsed),
``manifest.json`` (each file's size and sha256, and everything a warm start needs without torch: ``encoder_id``,
pixel spec, dimension, logit scale, opset, versions) and, when an export could not be made or failed its
verification, ``failed.json`` instead, so that later starts fall back at once instead of trying again. The key
hashes (architecture, weights identity, opset, precision, open_clip's version): open_clip's version stands for the
preprocessing, which it derives from the architecture and weights; the manifest records the pixel spec itself.

Writers hold the folder's lock (``fcntl.flock``; the kernel drops it if the process dies) and write the weights, the
graph, then the manifest, each atomically; readers take no lock and check sizes and sha256s, so a reader never runs
a file the manifest does not vouch for.

The manifest does not vouch for itself: whoever could replace the graph could rewrite its pins too. So the manifest
(and ``failed.json``) carries an HMAC-SHA256 under the user's cache key, kept outside the cache folder
(:mod:`safeclip._trust`), over the folder's name and the manifest: one without a valid MAC is as good as none (the
export is made again), and the key's public id is part of the folder's key, so exports pinned under different keys
(the nodes of a cluster that share a cache but not a key) live side by side. :meth:`ExportStore.untrusted` names a
folder or file of the export that someone else could write (owner, mode): such an export is never read, because a
file could be swapped between its check and its load.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .. import _trust
from ..files import write_json_atomic
from ..artifacts import sha256_file
from ..errors import ArtifactIntegrityError
from ._identity import model_arch

__all__ = ["EXPORT_FORMAT", "OPSET", "ExportStore", "package_versions"]

EXPORT_FORMAT = 2
"""Bump when the exported graph's contract changes (inputs, outputs, what the manifest records) or what it computes
(2: tags trained with QuickGELU, such as ``openai``, are exported with it; format 1 exported them with GELU)."""

OPSET = 17
"""ONNX opset of the exports: the first with LayerNormalization, which ONNX Runtime runs as one fused kernel."""

_MANIFEST_MAC = "onnx-export"  # the purposes of the MACs (see safeclip._trust)
_FAILURE_MAC = "onnx-export-failure"
_MANIFEST_KEYS = {"format": int, "encoder_id": str, "pixel_spec": dict, "dim": int, "logit_scale": float,
                  "opset": int, "precision": str, "file": str, "files": dict}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def package_versions() -> dict[str, str | None]:
    """The versions an export depends on (read from package metadata: nothing is imported)."""
    return {name: _version(dist) for name, dist in (("safeclip", "safeclip"), ("torch", "torch"),
                                                     ("open_clip", "open_clip_torch"), ("onnx", "onnx"),
                                                     ("onnxruntime", "onnxruntime"))}


class ExportStore:
    """The folder of one export: (architecture, weights identity, opset, precision)."""

    def __init__(self, cache_dir: str | os.PathLike[str], model: str, weights_id: str, precision: str,
                 opset: int = OPSET) -> None:
        self.cache_dir = Path(cache_dir)
        self.model = model
        self.weights_id = weights_id
        self.precision = precision
        self.opset = int(opset)
        blob = json.dumps([EXPORT_FORMAT, model_arch(model), weights_id, self.opset, precision,
                           _version("open_clip_torch"), _trust.key_id()])
        key = hashlib.sha256(blob.encode()).hexdigest()[:16]
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model_arch(model))[:40]
        self.dir = self.cache_dir / "onnx" / f"{slug}-{precision}-{key}"
        self.manifest_path = self.dir / "manifest.json"
        self.failure_path = self.dir / "failed.json"
        self.model_path = self.dir / f"image-{precision}.onnx"

    def sibling(self, precision: str) -> ExportStore:
        return ExportStore(self.cache_dir, self.model, self.weights_id, precision, self.opset)

    # ------------------------------------------------------------------------------------------- manifest
    def untrusted(self, manifest: dict[str, Any] | None = None) -> tuple[Path, str] | None:
        """What someone else could have written of this export (the cache folder, ``onnx/``, this folder, the
        manifest, and the files ``manifest`` names), and why; None when nothing."""
        inside = [Path("onnx") / self.dir.name / n
                  for n in ("manifest.json", "failed.json", *((manifest or {}).get("files") or {}))]
        return _trust.first_untrusted(self.cache_dir, *inside)

    def write_problem(self) -> str | None:
        """Why the export cannot be written into this folder, or None."""
        return _trust.write_problem(self.dir)

    def read_manifest(self) -> dict[str, Any] | None:
        """The manifest if it is present, signed with this user's key, well formed and of this format; None
        otherwise (a corrupt or unsigned one is as good as none: the export is made again)."""
        try:
            m = json.loads(self.manifest_path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(m, dict):
            return None
        tag = m.pop("mac", None)
        if not _trust.verify(_MANIFEST_MAC, [self.dir.name, m], tag):
            return None
        for key, kind in _MANIFEST_KEYS.items():
            value = m.get(key)
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                m[key] = value = float(value)
            if not isinstance(value, kind) or isinstance(value, bool):
                return None
        if m["format"] != EXPORT_FORMAT or m["precision"] != self.precision or m["opset"] != self.opset:
            return None
        files = m["files"]
        if m["file"] not in files or not all(
                isinstance(name, str) and Path(name).name == name and not name.startswith(".")
                and isinstance(f, dict) and isinstance(f.get("sha256"), str) and isinstance(f.get("bytes"), int)
                for name, f in files.items()):
            return None  # every file of the export lives in this folder, nowhere else
        return m

    def check_sizes(self, manifest: dict[str, Any]) -> Path:
        """The graph file the manifest names, after every file's size matches (a truncated file is caught at once)
        and nobody else could write any of them; :class:`ArtifactIntegrityError` otherwise."""
        found = self.untrusted(manifest)
        if found is not None:
            raise ArtifactIntegrityError(f"{found[0]} {found[1]}: the exported model is not run from there")
        for name, f in manifest["files"].items():
            path = self.dir / name
            try:
                size = path.stat().st_size
            except OSError as e:
                raise ArtifactIntegrityError(f"{path}: the exported model is missing ({e.strerror})") from e
            if size != f["bytes"]:
                raise ArtifactIntegrityError(f"{path}: {size} bytes, the manifest says {f['bytes']} (truncated or "
                                             "replaced)")
        return self.dir / manifest["file"]

    def check_hashes(self, manifest: dict[str, Any]) -> None:
        """:class:`ArtifactIntegrityError` unless every file's sha256 matches the manifest's pin."""
        for name, f in manifest["files"].items():
            digest = sha256_file(self.dir / name)
            if digest != f["sha256"]:
                raise ArtifactIntegrityError(f"{self.dir / name}: sha256 {digest[:12]}..., the manifest pins "
                                             f"{f['sha256'][:12]}... (modified)")

    def checked_model(self, manifest: dict[str, Any]) -> Path:
        """The graph file, after every file of the export matches its size and sha256 (a tampered or truncated file
        is never run)."""
        path = self.check_sizes(manifest)
        self.check_hashes(manifest)
        return path

    def valid_manifest(self) -> dict[str, Any] | None:
        """The manifest, if its model file checks out too."""
        m = self.read_manifest()
        if m is None:
            return None
        try:
            self.checked_model(m)
        except ArtifactIntegrityError:
            return None
        return m

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.failure_path.unlink()
        signed = {**manifest, "mac": _trust.mac(_MANIFEST_MAC, [self.dir.name, manifest])}
        write_json_atomic(self.manifest_path, signed, durable=True)

    # ------------------------------------------------------------------------------------------- failures
    def read_failure(self) -> dict[str, Any] | None:
        """A recorded failure that still applies (made with the installed versions), else None."""
        try:
            f = json.loads(self.failure_path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(f, dict):
            return None
        tag = f.pop("mac", None)
        if not _trust.verify(_FAILURE_MAC, [self.dir.name, f], tag):
            return None  # not recorded by this user: the export is tried (a forged record cannot force torch)
        if f.get("versions") != package_versions() or f.get("format") != EXPORT_FORMAT:
            return None
        return f

    def write_failure(self, kind: str, reason: str, **extra: Any) -> None:
        record = {"format": EXPORT_FORMAT, "kind": kind, "reason": reason, "versions": package_versions(), **extra}
        with contextlib.suppress(OSError):
            write_json_atomic(self.failure_path, {**record, "mac": _trust.mac(_FAILURE_MAC, [self.dir.name, record])})

    # ------------------------------------------------------------------------------------------- lock
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive among the processes exporting into this folder (a no-op where ``fcntl`` is missing: the
        atomic writes and the sha256 check keep the folder consistent, only work may be done twice)."""
        _trust.make_dirs(self.dir)
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            yield
            return
        with open(self.dir / ".lock", "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
