"""Reading published torch files as numpy, and the ``encoder_id`` a pretrained tag's weights embed into.

Both need torch/open_clip, which is why they live in the embed stage; both are imported only by offline tools
(:mod:`safeclip.importers`, ``policy lint``, ``safeclip calibrate``), never on a request path.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ArtifactIntegrityError, ModelLoadError
from ._config import DEFAULT_MODEL, DEFAULT_PRETRAINED
from ._identity import _checkpoint_file, encoder_id_for, space_arch, weights_identity
from ._pixels import PixelSpec

__all__ = ["encoder_id_matches", "known_encoder_id", "read_state_dict", "tag_encoder_id"]


def read_state_dict(path: str | os.PathLike[str], data: bytes | None = None) -> dict[str, np.ndarray]:
    """A torch ``state_dict`` file as ``{name: float32 array}``, read with ``torch.load(weights_only=True)`` only.

    ``weights_only`` unpickles tensors and plain containers and refuses anything that would run code; a file
    it refuses, or one holding something other than a mapping of tensors, is an :class:`ArtifactIntegrityError`.
    ``data``: the file's bytes, already read (and checked): read instead of ``path``, which then only names them.
    """
    import torch

    try:
        obj: Any = torch.load(io.BytesIO(data) if data is not None else os.fspath(path), map_location="cpu",
                              weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... for refused or corrupt files
        raise ArtifactIntegrityError(f"{os.fspath(path)!r} is not a torch state_dict that loads with "
                                     f"weights_only=True: {type(e).__name__}: {str(e)[:200]}") from e
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in obj.items()):
        raise ArtifactIntegrityError(f"{os.fspath(path)!r} holds no mapping of names to tensors")
    return {k: v.detach().to(torch.float32).numpy().copy() for k, v in obj.items()}


def tag_encoder_id(model: str, pretrained: str, precision: str = "fp32") -> str:
    """The ``encoder_id`` an :class:`~safeclip.embed.Encoder` loading ``(model, pretrained)`` has, from open_clip's
    configs alone (no weights are loaded or downloaded): how artifacts trained elsewhere name their space.

    >>> tag_encoder_id("ViT-B-32", "openai").startswith("ViT-B-32-quickgelu|openai|px:")  # doctest: +SKIP
    True
    """
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model, pretrained)
    model_cfg = open_clip.get_model_config(model)
    if not cfg or not model_cfg:
        raise ModelLoadError(f"open_clip knows no pretrained tag {pretrained!r} for {model!r}")
    # The same fields and defaults the torch runtime reads from a loaded model's preprocess_cfg.
    spec = PixelSpec.from_preprocess_cfg(cfg, model_cfg.get("vision_cfg", {}).get("image_size", 224))
    return encoder_id_for(model, pretrained, spec, precision)


def known_encoder_id(model: str, pretrained: str | None, cache_dir: Path | None = None) -> str | None:
    """What is known, without loading the model, of the ``encoder_id`` an Encoder loading ``(model, pretrained)``
    has (as a policy's ``encoder:`` names it): the whole fp32 id for a pretrained tag (:func:`tag_encoder_id`);
    its ``architecture|weights`` part for a local checkpoint file or ``local-dir:`` folder (hashed, as the Encoder
    names it) and a ``hf-hub:`` model; ``None`` when the weights are not known here (a file or folder that does not
    exist, no ``pretrained`` for a model without a default). Test an id with :func:`encoder_id_matches`.

    Raises :class:`~safeclip.errors.ModelLoadError` for weights no Encoder could load: a tag open_clip does not
    know for ``model``, a published checkpoint file under another architecture.
    """
    if pretrained is None and not model.startswith(("local-dir:", "hf-hub:")):
        if model != DEFAULT_MODEL:
            return None
        pretrained = DEFAULT_PRETRAINED
    if model.startswith("local-dir:"):
        if not Path(model[len("local-dir:"):]).expanduser().is_dir():
            return None
    elif not model.startswith("hf-hub:"):
        try:
            local = _checkpoint_file(model, pretrained)
        except ModelLoadError:  # the file does not exist here: nothing is known of its weights
            return None
        if local is None:
            return tag_encoder_id(model, str(pretrained))
    weights = weights_identity(model, pretrained, cache_dir)
    return f"{space_arch(model, weights)}|{weights}"


def encoder_id_matches(encoder_id: str, known: str) -> bool:
    """Whether ``encoder_id`` is the space :func:`known_encoder_id` described: that id (or its ``|int8`` variant,
    the same weights on the int8 runtime), or an id with that ``architecture|weights`` part."""
    return encoder_id in (known, f"{known}|int8") or ("|px:" not in known and encoder_id.startswith(known + "|"))
