"""The :class:`Encoder`: one open_clip model's image tower (ONNX Runtime or torch) and, when needed, its text tower."""

from __future__ import annotations

import functools
import gc
import logging
import os
import sys
import threading
import warnings
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .. import _trust
from ..errors import ArtifactIntegrityError, CacheError, ConfigError, EncoderMismatchError, ModelLoadError
from ._config import (DEFAULT_MODEL, DEFAULT_PRETRAINED, PRECISIONS, check_device_name, check_model_name,
                      default_cache_dir, resolve_device, resolve_runtime, resolve_threads)
from ._identity import encoder_id_for, weights_identity
from ._onnx import OnnxImageTower, exit_without_native_teardown, import_onnxruntime
from ._pixels import PixelSpec, prepare_pixels
from ._prompts import PromptCache
from ._store import ExportStore

__all__ = ["Encoder", "RuntimeFallbackWarning"]


_log = logging.getLogger("safeclip")


class RuntimeFallbackWarning(UserWarning):
    """The ONNX export did not reproduce the torch forward, so the image tower runs on torch."""


# Encoders alive in this process, so that a forked child can repair them (see _after_fork_in_child).
_live_encoders: weakref.WeakSet[Encoder] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """Make encoders built before ``fork()`` usable in the child (pre-forking servers: gunicorn ``--preload``).

    Neither torch's CPU thread pool (OpenMP) nor an ONNX Runtime session's survives ``fork()``: a child that runs
    the parent's pool hangs for ever. So the children of a process that built an :class:`Encoder` run torch on one
    thread and make their own one-thread ONNX Runtime session on first use (one model replica per worker process is
    the usual layout anyway), and get fresh locks in case another thread of the parent held one at the fork. A child
    of a process that imported onnxruntime also exits without onnxruntime's native teardown, which would hang.
    """
    if "onnxruntime" in sys.modules:
        exit_without_native_teardown()
    encoders = list(_live_encoders)
    if not encoders:
        return
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)
    for enc in encoders:
        enc._lock = threading.Lock()
        if enc._onnx is not None:
            enc._onnx.after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class Encoder:
    """A frozen open_clip model, loaded once, that embeds images and texts.

    ``model`` is an open_clip architecture name (``"ViT-B-32"``), ``"local-dir:/path"`` (a folder with
    ``open_clip_config.json`` and weights) or ``"hf-hub:org/repo"``; ``pretrained`` is an open_clip pretrained tag
    (downloaded from the hub on a connected machine) or the path of a local checkpoint file.

    ``runtime`` (default ``$SAFECLIP_RUNTIME``, else ``"auto"``) runs the image tower on ONNX Runtime on a CPU and
    on torch on CUDA/MPS. The first ONNX use exports the tower into ``<cache_dir>/onnx/`` (once per weights and
    cache folder, in a child process, verified against torch; one log line says so while it runs); later starts load
    the export without importing torch, and the text tower is loaded only for prompts missing from the prompt cache,
    then released. A cache folder that cannot be written, or that someone else could write (see
    :mod:`safeclip._trust`), is not used for the export and prompts: they go to a folder of the user's own, with one
    log line naming the folder and the fix. ``precision="int8"`` (ONNX
    Runtime dynamic int8) is an opt-in with its own ``encoder_id``. ``threads`` (default ``$SAFECLIP_THREADS``, else
    every available core) sets ONNX Runtime's intra-op threads, or torch's. ``spin_wait=False`` keeps ONNX Runtime's
    idle threads from spinning for work: what an audit wants, whose decode processes share the cores.

    >>> enc = Encoder("ViT-B-32", "/models/vit-b-32.pt")          # doctest: +SKIP
    >>> enc.embed_images([Image.open("photo.jpg")]).shape        # doctest: +SKIP
    (1, 512)
    """

    def __init__(
        self,
        model: str | None = None,
        pretrained: str | None = None,
        *,
        device: str | None = None,
        precision: str = "auto",
        batch_size: int | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        runtime: str | None = None,
        threads: int | None = None,
        spin_wait: bool = True,
    ) -> None:
        model = model or os.environ.get("SAFECLIP_MODEL") or DEFAULT_MODEL
        if pretrained is None and not model.startswith(("local-dir:", "hf-hub:")):
            pretrained = os.environ.get("SAFECLIP_PRETRAINED") or (
                DEFAULT_PRETRAINED if model == DEFAULT_MODEL else None
            )
        check_model_name(model)
        if pretrained is None and not model.startswith(("local-dir:", "hf-hub:")):
            raise ModelLoadError(
                f"model {model!r} needs weights: pass pretrained=<tag> (see open_clip.list_pretrained()) or "
                "pretrained=<path to a checkpoint>; safeclip never moderates with random weights"
            )
        if precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        self.model_name = model
        self.pretrained = pretrained
        self.cache_dir = self._trusted(Path(cache_dir) if cache_dir is not None else default_cache_dir())
        self.threads = resolve_threads(threads)
        self.spin_wait = bool(spin_wait)
        self._lock = threading.Lock()
        self._torch: Any = None  # a TorchModel: the torch runtime's, or none
        self._onnx: OnnxImageTower | None = None

        asked = runtime or os.environ.get("SAFECLIP_RUNTIME") or "auto"
        device = device or os.environ.get("SAFECLIP_DEVICE") or "auto"
        if device != "auto":  # a runtime that cannot run there is named before the device is probed
            check_device_name(device)
            resolve_runtime(asked, device, precision)
        self.device = "cpu" if asked == "onnx" and device == "auto" else resolve_device(device)
        self.runtime = resolve_runtime(asked, self.device, precision)
        on_accel = self.device.startswith(("cuda", "mps"))
        if precision == "auto":
            # fp16 autocast on GPUs; fp32 on CPU (bf16 autocast is several times slower on CPUs without AMX).
            precision = "fp16" if on_accel else "fp32"
        self.precision = precision
        self.batch_size = batch_size or (64 if on_accel else 16)
        self._weights_id = weights_identity(model, pretrained, self.cache_dir)

        if self.runtime == "onnx":
            self._onnx = self._open_onnx(explicit=asked == "onnx" or precision == "int8")
        if self._onnx is not None:
            m = self._onnx.manifest
            self.pixel_spec = PixelSpec.from_dict(m["pixel_spec"])
            self.encoder_id = str(m["encoder_id"])
            self.logit_scale = float(m["logit_scale"])
            self.dim = self._onnx.dim
        else:
            self.runtime = "torch"
            from ._torch import TorchModel

            self._torch = TorchModel(model, pretrained, device=self.device, precision=precision)
            if self.threads is not None:
                import torch

                torch.set_num_threads(self.threads)
            self.pixel_spec = self._torch.pixel_spec
            self.encoder_id = encoder_id_for(model, self._weights_id, self.pixel_spec, precision)
            self.logit_scale = self._torch.logit_scale
            self.dim = int(self._compute_texts(["a photo"]).shape[1])
        prompts = PromptCache(self.encoder_id, self.cache_dir)
        prompt_dir = self._trusted(self.cache_dir, prompts.path.relative_to(self.cache_dir))
        self.prompt_cache = prompts if prompt_dir == self.cache_dir else PromptCache(self.encoder_id, prompt_dir)
        _live_encoders.add(self)

    @staticmethod
    def _trusted(folder: Path, *inside: str | os.PathLike[str]) -> Path:
        """``folder``, unless someone else could write it or what this encoder reads in it (``inside``): then a
        folder of the user's own (:func:`safeclip._trust.fallback_dir`), with one log line saying why and the fix.
        A cache folder never vouches for itself."""
        found = _trust.first_untrusted(folder, *inside)
        if found is None:
            return folder
        path, why = found
        other = _trust.fallback_dir(folder)
        if other is None:
            raise CacheError(f"{path} {why}, and no cache folder of your own could be made instead: "
                             f"{_trust.fix_for(path, why)}")
        what = "prompt embeddings" if inside else "ONNX export and prompt embeddings"
        _trust.say_once(f"not using the cache folder {folder} for the {what}: {path} {why}; using {other} instead. "
                        f"To use it, {_trust.fix_for(path, why)}")
        return other

    # ----------------------------------------------------------------------------------------------- ONNX
    def _open_onnx(self, *, explicit: bool) -> OnnxImageTower | None:
        """The verified export's session, exporting it first if needed; None (after one log line or warning) when
        the image tower has to run on torch instead. ``explicit`` (the caller asked for onnx or int8): raise."""
        try:
            import_onnxruntime()
        except ModelLoadError:
            if explicit:
                raise
            _log.warning("onnxruntime is not installed: the image tower runs on torch (pip install onnxruntime "
                         "for the faster CPU runtime)")
            return None
        first = ExportStore(self.cache_dir, self.model_name, self._weights_id, self.precision)
        store: ExportStore | None = first
        verdict: dict[str, Any] = {}
        moved = False
        found = first.untrusted()
        if found is not None:  # never read: a file there could be swapped between its check and its load
            store, moved = self._fallback_store(first, f"{found[0]} {found[1]}", _trust.fix_for(*found)), True
        tries = 0
        while store is not None:
            manifest = store.read_manifest()
            if manifest is not None:
                try:
                    expected = encoder_id_for(self.model_name, self._weights_id,
                                              PixelSpec.from_dict(manifest["pixel_spec"]), self.precision)
                    if manifest["encoder_id"] != expected:
                        raise ArtifactIntegrityError(f"{store.manifest_path}: encoder_id {manifest['encoder_id']!r}"
                                                     f", expected {expected!r}")
                    return OnnxImageTower(store, manifest, self.threads, spin_wait=self.spin_wait,
                                          device=self.device)
                except (ArtifactIntegrityError, TypeError, ValueError) as e:
                    _log.warning("refusing the ONNX export: %s; exporting it again", e)
            else:
                recorded = store.read_failure()
                if recorded is not None:
                    verdict = {"ok": False, **recorded, "recorded": True}
                    break
            if tries == 2:  # a refused (tampered) file is exported again once
                verdict = {"ok": False, "kind": "verify", "reason": "the export kept failing its sha256 check"}
                break
            problem = store.write_problem()
            if problem is not None:
                if moved:
                    verdict = {"ok": False, "kind": "export", "reason": f"cannot write {store.dir}: {problem}"}
                    break
                # Say so once and export where it can be kept, instead of exporting in vain at every start.
                store, moved = self._fallback_store(
                    store, f"it cannot be written: {problem}",
                    "give a cache folder you can write to (cache_dir=, --cache, $SAFECLIP_CACHE_DIR)"), True
                continue
            tries += 1
            from ._export import export_in_child  # not at import: the child runs that module as __main__

            # Said once the child has loaded the weights and the export is really under way: weights that cannot
            # load end in their own one error line, with nothing before it.
            notice = functools.partial(
                _log.warning, "exporting the image tower of %s to ONNX, once for these weights (this can take a "
                "minute); later starts load it from %s", self.model_name, store.cache_dir)
            verdict = export_in_child(store, self.model_name, self.pretrained, self.threads, on_started=notice)
            if verdict.get("kind") == "load" and isinstance(verdict.get("error"), dict):
                # the weights themselves cannot be loaded: torch here would fail the same way, only later
                raise ModelLoadError(**verdict["error"])
            if not verdict["ok"]:
                break
        if store is None:
            verdict = {"ok": False, "kind": "export", "reason": "no cache folder of your own could hold it"}
        what = f"ONNX export of {self.model_name} ({self.precision})"
        reason = f"{what}: {verdict.get('kind', 'export')} failed: {verdict.get('reason')}"
        if verdict.get("recorded"):
            reason += f" (recorded in {store.failure_path}; delete that folder to try again)"
        if explicit:
            raise ModelLoadError(f"{reason}. Use runtime='torch' (--runtime torch)"
                                 + (" and precision fp32" if self.precision == "int8" else ""))
        if verdict.get("kind") == "verify":
            warnings.warn(f"{reason}; the image tower runs on torch instead", RuntimeFallbackWarning, stacklevel=3)
        else:
            _log.warning("%s; the image tower runs on torch instead", reason)
        return None

    def _fallback_store(self, store: ExportStore, why: str, fix: str) -> ExportStore | None:
        """The same export in a cache folder of the user's own, after one log line naming the folder it replaces,
        why, and the fix; None when there is none."""
        other = _trust.fallback_dir(store.cache_dir)
        if other is None:
            return None
        _trust.say_once(f"the ONNX export of {self.model_name} cannot be kept in {store.cache_dir} ({why}): it is "
                        f"exported to and loaded from {other} instead. To keep it there, {fix}")
        return ExportStore(other, self.model_name, self._weights_id, self.precision)

    # ----------------------------------------------------------------------------------------------- images
    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Embed prepared pixels ``(N, S, S, 3)`` uint8 (see :func:`prepare_pixels`) -> ``(N, D)`` float32."""
        if pixels.ndim != 4 or pixels.shape[-1] != 3 or pixels.dtype != np.uint8:
            raise ConfigError(f"pixels must be (N, S, S, 3) uint8, got {pixels.shape} {pixels.dtype}")
        out = np.empty((len(pixels), self.dim), dtype=np.float32)
        if not len(pixels):
            return out
        with self._lock:
            (self._onnx or self._torch).embed_pixels(pixels, self.batch_size, out)
        return out

    def embed_images(self, frames: Sequence[Image.Image]) -> np.ndarray:
        """Embed RGB PIL frames -> ``(N, D)`` L2-normalised float32."""
        if not frames:
            return np.empty((0, self.dim), dtype=np.float32)
        return self.embed_pixels(np.stack([prepare_pixels(f, self.pixel_spec) for f in frames]))

    # ----------------------------------------------------------------------------------------------- texts
    def _compute_texts(self, texts: list[str]) -> np.ndarray:
        """Run the text tower; on the ONNX runtime it is loaded for this call and released after it."""
        with self._lock:
            if self._torch is not None:
                return self._torch.embed_texts(texts)
            from ._torch import TorchModel

            tm = TorchModel(self.model_name, self.pretrained, device="cpu", precision="fp32")
            try:
                if self.threads is not None:
                    import torch

                    torch.set_num_threads(self.threads)
                space = encoder_id_for(self.model_name, self._weights_id, tm.pixel_spec, self.precision)
                if space != self.encoder_id:
                    raise EncoderMismatchError(f"the text tower loaded as {space!r}, the image export is "
                                               f"{self.encoder_id!r}: delete {self._onnx.store.dir} to export again")
                vecs = tm.embed_texts(texts)
            finally:
                del tm
                gc.collect()
        if vecs.shape[1] != self.dim:
            raise EncoderMismatchError(f"text embeddings have dimension {vecs.shape[1]}, images {self.dim}")
        return vecs

    def embed_texts(self, texts: Sequence[str], *, use_cache: bool = True) -> np.ndarray:
        """Embed prompt texts -> ``(N, D)`` float32, cached in memory and on disk by (encoder_id, text)."""
        texts = list(texts)
        if not use_cache:
            return self._compute_texts(texts)
        missing = self.prompt_cache.missing(texts)
        if missing:
            self.prompt_cache.put(missing, self._compute_texts(missing))
        return self.prompt_cache.get(texts)

    def __repr__(self) -> str:
        return (f"Encoder({self.encoder_id!r}, runtime={self.runtime!r}, device={self.device!r}, "
                f"precision={self.precision!r})")
