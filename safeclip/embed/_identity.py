"""The identity of an embedding space, derived without torch or open_clip.

``encoder_id`` = architecture | weights identity | ``px:`` pixel-spec digest [| ``int8``]. The weights identity is
the pretrained tag, the ``hf-hub:`` name, or a hash of the local checkpoint file. Hashing a 600 MB checkpoint takes
a good part of a second, so hashes are remembered on disk by (path, size, mtime, inode, device, change time), as the
in-process memo always did, and a warm start only ``stat``s the file. Each remembered hash carries a MAC under the
user's cache key (:mod:`safeclip._trust`): one the cache folder holds without it, written by anyone else, is
ignored and the file hashed again, so a forged memo cannot make other weights pass for a published checkpoint.

A local checkpoint file is named by its content, not by its path: when its full sha256 is that of a published file
listed in ``known_weights.json`` (OpenAI's CLIP checkpoints, whose download URLs carry their sha256), its identity is
that file's pretrained tag, so ``--model ViT-B-32 --pretrained /models/ViT-B-32.pt`` with OpenAI's own file embeds
into the same space as ``--pretrained openai``, and the torch loader (``TorchModel``) loads it as the tag loads.
The same file under another architecture is a :class:`~safeclip.errors.ModelLoadError`; any other file keeps
``sha256:<16 hex>`` and never passes as a tag. The table is read from the installed package only (no environment
variable or user file can add to it); tests replace :func:`known_weights` itself.

open_clip downloads the same tags from the Hugging Face hub (``timm/vit_base_patch32_clip_224.openai`` for
``ViT-B-32`` + ``openai``; the table names each repository), and no config safeclip can read gives those files'
sha256. A file in huggingface_hub's cache of such a repository is recognised by the cache's own record instead: a
``snapshots/<commit>/<file>`` link to the blob named by the sha256 the hub declared, which the bytes must have. That
trusts the local cache as far as the tag load itself does (it reads that same file, unchecked) and no further: the
bytes are checked, and such a file is never loaded as a TorchScript archive (only a published sha256 allows that).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.resources
import json
import os
import threading
import types
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from .. import _trust
from ..files import write_json_atomic
from ..artifacts import sha256_file
from ..errors import ModelLoadError
from ._pixels import PixelSpec

__all__ = ["KnownWeights", "encoder_id_for", "find_checkpoint_in_dir", "known_weights", "model_arch",
           "recognised_weights", "space_arch", "weights_identity"]

_MEMO_FILE = "checkpoint-hashes.json"
_MEMO_MAC = "checkpoint-hash"  # the purpose of the memo's MACs (see safeclip._trust)
_memo: dict[str, str] = {}
_memo_lock = threading.Lock()


def _stat_key(path: Path) -> str:
    # The change time too: content cannot be rewritten, nor the mtime set back, without moving it.
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{st.st_dev}|{st.st_ctime_ns}"


def _remembered(memo_path: Path, key: str) -> str | None:
    """The digest the on-disk memo holds for ``key``, if this user's key signed it: an entry anyone else wrote
    (a cache folder does not vouch for itself) is ignored, and the file is hashed again."""
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        entry = json.loads(memo_path.read_text()).get(key)
        digest = entry.get("sha256")
        if isinstance(digest, str) and len(digest) == 64 and _trust.verify(_MEMO_MAC, [key, digest], entry.get("mac")):
            return digest
    return None


def _file_sha256(path: Path, cache_dir: Path | None) -> str:
    key = _stat_key(path)
    memo_path = cache_dir / _MEMO_FILE if cache_dir is not None else None
    with _memo_lock:
        if key in _memo:
            return _memo[key]
        found = _remembered(memo_path, key) if memo_path is not None else None
        if found is not None:
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
            stored[key] = {"sha256": digest, "mac": _trust.mac(_MEMO_MAC, [key, digest])}
            with contextlib.suppress(OSError):  # a read-only cache: the in-process memo still holds
                write_json_atomic(memo_path, stored)
    return digest


@dataclass(frozen=True)
class KnownWeights:
    """A published checkpoint file, known by its full sha256: open_clip loads it as ``model`` + ``pretrained``."""

    sha256: str
    model: str
    pretrained: str
    source: str
    other_models: tuple[str, ...] = ()
    """Further architectures whose ``pretrained`` tag is this same file (``ViT-B-32-quickgelu`` for ``ViT-B-32``)."""
    hf_hub: str = ""
    """The Hugging Face hub repository open_clip downloads the same tag's weights from (``""``: none)."""
    hf_hub_files: tuple[str, ...] = ()
    """The file names open_clip reads in :attr:`hf_hub` (the safetensors one first)."""

    @property
    def models(self) -> tuple[str, ...]:
        return (self.model, *self.other_models)


@functools.cache
def _shipped_known_weights() -> Mapping[str, KnownWeights]:
    try:
        raw = json.loads((importlib.resources.files(__package__) / "known_weights.json").read_text())
        table = {sha: KnownWeights(sha256=sha, model=e["model"], pretrained=e["pretrained"], source=e["source"],
                                   other_models=tuple(e.get("other_models", ())), hf_hub=e.get("hf_hub", ""),
                                   hf_hub_files=tuple(e.get("hf_hub_files", ())))
                 for sha, e in raw.items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise ModelLoadError(f"safeclip's table of known weights (safeclip/embed/known_weights.json) cannot be "
                             f"read ({type(e).__name__}: {e}): reinstall safeclip") from e
    return types.MappingProxyType(table)


def known_weights() -> Mapping[str, KnownWeights]:
    """The published checkpoint files recognised by content, by full sha256 (``known_weights.json``).

    >>> known_weights()["40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af"].pretrained
    'openai'
    """
    return _shipped_known_weights()


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


def _checkpoint_file(model: str, pretrained: str | None) -> Path | None:
    """The local checkpoint file ``pretrained`` names (None for a tag, a ``local-dir:`` or ``hf-hub:`` model)."""
    if model.startswith(("local-dir:", "hf-hub:")) or not pretrained:
        return None
    if not (os.sep in pretrained or Path(pretrained).suffix in {".pt", ".pth", ".bin", ".safetensors"}):
        return None
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise ModelLoadError(
            f"checkpoint file {pretrained!r} does not exist. Pass the path of an open_clip checkpoint "
            "(.pt/.bin/.safetensors) or a pretrained tag; see `open_clip.list_pretrained()`."
        )
    return path


def _hub_cache_copy(path: Path, digest: str) -> KnownWeights | None:
    """The :func:`known_weights` entry whose hub repository served ``path``, by the hub cache's own record, or None.

    huggingface_hub caches a download as ``<cache>/models--ORG--NAME/blobs/<etag>``, the etag of a large file being
    the sha256 the hub declares for it, and links ``snapshots/<commit>/<file name>`` to that blob. ``path`` counts as
    the tag's file when it is such a snapshot link of the tag's repository and file name (the file open_clip's tag
    load reads) and its bytes (``digest``) have the sha256 its blob is named by: no other file, copy or link does.
    """
    snap = Path(os.path.abspath(path))  # the name given, not the blob it links to
    repo_dir = snap.parent.parent.parent
    if snap.parent.parent.name != "snapshots" or not repo_dir.name.startswith("models--"):
        return None
    blob = path.resolve()
    if blob.name != digest or blob.parent != (repo_dir / "blobs").resolve():
        return None
    for known in known_weights().values():
        if known.hf_hub and repo_dir.name == "models--" + known.hf_hub.replace("/", "--") and (
                snap.name in known.hf_hub_files):
            url = f"https://huggingface.co/{known.hf_hub}/blob/{snap.parent.name}/{snap.name}"
            return replace(known, sha256=digest, source=url)
    return None


def _recognise(model: str, path: Path, digest: str) -> KnownWeights | None:
    known = known_weights().get(digest) or _hub_cache_copy(path, digest)
    if known is None or model in known.models:
        return known
    problem = (f"{path} is the published {known.model} checkpoint ({known.pretrained}, sha256 {digest[:16]}...) but "
               f"the model is {model}")
    raise ModelLoadError(f"{problem}: pass model={known.model!r}",
                         cli_message=f"{problem}: pass --model {known.model}")


def recognised_weights(model: str, pretrained: str | None, cache_dir: Path | None = None) -> KnownWeights | None:
    """The :func:`known_weights` entry of the local checkpoint file ``pretrained``, or None (a tag, another file).

    A file in the hub cache of a tag's repository (see :func:`_hub_cache_copy`) gets its tag's entry with its own
    sha256 and hub URL. A published file under an architecture it is not for raises
    :class:`~safeclip.errors.ModelLoadError`.
    """
    path = _checkpoint_file(model, pretrained)
    return None if path is None else _recognise(model, path, _file_sha256(path, cache_dir))


def weights_identity(model: str, pretrained: str | None, cache_dir: Path | None = None) -> str:
    """A stable name for the weights: the pretrained tag, the hub name, or a hash of the local checkpoint file.

    A checkpoint file that is a published one (:func:`recognised_weights`) is named by its tag, as if loaded by it.
    """
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
    path = _checkpoint_file(model, pretrained)
    if path is not None:
        digest = _file_sha256(path, cache_dir)
        known = _recognise(model, path, digest)
        return known.pretrained if known is not None else "sha256:" + digest[:16]
    return str(pretrained)


def model_arch(model: str) -> str:
    """The architecture a model name loads (a local folder's path is not part of the space's name)."""
    return "local-dir" if model.startswith("local-dir:") else model


@functools.cache
def _quickgelu_tags() -> Mapping[str, frozenset[str]]:
    try:
        raw = json.loads((importlib.resources.files(__package__) / "quickgelu_tags.json").read_text())
        return types.MappingProxyType({m: frozenset(tags) for m, tags in raw.items()})
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise ModelLoadError(f"safeclip's table of QuickGELU tags (safeclip/embed/quickgelu_tags.json) cannot be "
                             f"read ({type(e).__name__}: {e}): reinstall safeclip") from e


def space_arch(model: str, weights_id: str) -> str:
    """The architecture part of an ``encoder_id``: the model the weights really run as.

    A tag trained with QuickGELU on an architecture open_clip defines with GELU (``ViT-B-32`` + ``openai``) loads
    with QuickGELU (see :class:`TorchModel`), which is open_clip's ``ViT-B-32-quickgelu``: so it is named, and the
    two spellings are one space (``quickgelu_tags.json``, generated from open_clip's configs).
    """
    arch = model_arch(model)
    return f"{arch}-quickgelu" if weights_id in _quickgelu_tags().get(arch, ()) else arch


def encoder_id_for(model: str, weights_id: str, spec: PixelSpec, precision: str) -> str:
    """fp32, fp16 and bf16 embed into one space (torch and ONNX Runtime alike); int8 is a space of its own.

    >>> encoder_id_for("ViT-B-32", "openai", PixelSpec(224), "fp32").split("|")[:2]
    ['ViT-B-32-quickgelu', 'openai']
    """
    eid = f"{space_arch(model, weights_id)}|{weights_id}|px:{spec.digest}"
    return f"{eid}|int8" if precision == "int8" else eid
