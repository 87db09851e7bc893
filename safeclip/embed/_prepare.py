"""From an input to the model's pixels: :func:`prepare` (decode, then each view resized and cropped), and the option
groups that travel with it (:class:`DecodeOptions`) and with the model (:class:`EncoderSpec`).

The request path (``Moderator``) and the audit's decode workers both call :func:`prepare`, so an audit row and
``Moderator.check`` see the same pixels for the same file. Plain PIL + numpy: decode workers never import torch.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..decode import DecodeLimits, decode
from ..errors import ConfigError
from ..pdq import DECODE_SIDE, frame_hashes
from ._config import PRECISIONS, RUNTIMES, default_cache_dir, resolve_encoder_args
from ._pixels import PixelSpec, prepare_pixels

if TYPE_CHECKING:  # pragma: no cover
    from ._encoder import Encoder

__all__ = ["DecodeOptions", "EncoderSpec", "Prepared", "prepare"]

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class DecodeOptions:
    """How inputs are decoded: the resource ``limits``; ``fast`` (decode large images straight at near the model's
    size: JPEG draft mode, box reduction; within 0.1% cosine of the full-resolution path); ``workers``: how many
    decode in parallel (a Moderator's decode threads, an audit's decode processes; ``None``: chosen from the cores).
    """

    limits: DecodeLimits = dataclasses.field(default_factory=DecodeLimits)
    fast: bool = True
    workers: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.limits, DecodeLimits):
            raise ConfigError(f"DecodeOptions.limits must be a DecodeLimits, not {type(self.limits).__name__}")
        w = self.workers
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
            raise ConfigError(f"workers must be a positive integer, not {w!r}")


@dataclass(frozen=True)
class Prepared:
    """One input ready for the model: ``pixels`` ``(V, S, S, 3)`` uint8, one per view, and what decode said of it
    (``frame_indices`` and ``backgrounds`` per view, as in :class:`~safeclip.decode.Decoded`). ``pdq`` ``(V, 32)``
    uint8 and ``pdq_quality`` ``(V,)``: each view's PDQ hash, taken from the decoded frame before the model's resize
    (:func:`~safeclip.pdq.frame_hashes`: what PDQ banks match)."""

    pixels: np.ndarray
    frame_indices: tuple[int, ...]
    backgrounds: tuple[RGB | None, ...]
    sha256: str
    source: str | None
    format: str
    size: tuple[int, int]
    n_frames: int
    nbytes: int
    pdq: np.ndarray | None = None
    pdq_quality: np.ndarray | None = None
    timestamps: tuple[float, ...] = ()
    duration_s: float | None = None
    sampling: str | None = None


def prepare(source: Any, spec: PixelSpec, options: DecodeOptions | None = None) -> Prepared:
    """Decode ``source`` (anything :func:`~safeclip.decode.decode` takes) and prepare each view for a model whose
    input is ``spec``. Raises what :func:`~safeclip.decode.decode` raises.

    >>> from PIL import Image
    >>> prepare(Image.new("RGB", (640, 480)), PixelSpec(size=224)).pixels.shape
    (1, 224, 224, 3)
    """
    opts = options or DecodeOptions()
    # Decoded large enough for PDQ too (DECODE_SIDE), so that one decode serves the hash and the model's pixels.
    dec = decode(source, limits=opts.limits, target_size=max(spec.size, DECODE_SIDE) if opts.fast else None)
    pixels = np.stack([prepare_pixels(f, spec, fast=opts.fast) for f in dec.frames])
    pdq, quality = frame_hashes(dec.frames)
    name = dec.source or (os.fspath(source) if isinstance(source, (str, os.PathLike)) else None)
    return Prepared(pixels, tuple(dec.frame_indices), tuple(dec.backgrounds), dec.sha256, name, dec.format,
                    dec.size, dec.n_frames, dec.nbytes, pdq, quality)


@dataclass(frozen=True)
class EncoderSpec:
    """Which encoder to load and how: the options that travel from the caller to an
    :class:`~safeclip.embed.Encoder` (``Moderator``, ``audit``, the Ray engine's actors and the CLI build one).

    ``model``/``pretrained``: the weights (``None``: ``$SAFECLIP_MODEL``/``$SAFECLIP_PRETRAINED``, then the policy's
    ``encoder:``, then the default; see :meth:`resolve`); ``device``, ``runtime``, ``precision``, ``threads`` (the
    model's CPU threads), ``batch_size`` (images per forward) and ``cache_dir`` (exports, prompt and image
    embeddings) as for :class:`~safeclip.embed.Encoder`.

    >>> EncoderSpec(model="ViT-B-32", pretrained="/models/b32.bin").resolve({})[1]
    'caller'
    """

    model: str | None = None
    pretrained: str | None = None
    device: str | None = None
    runtime: str | None = None
    precision: str = "auto"
    threads: int | None = None
    batch_size: int | None = None
    cache_dir: str | os.PathLike[str] | None = None

    def __post_init__(self) -> None:
        if self.runtime is not None and self.runtime not in RUNTIMES:
            raise ConfigError(f"runtime must be one of {', '.join(RUNTIMES)}, not {self.runtime!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        for name in ("threads", "batch_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be a positive integer, not {value!r}")

    @property
    def cache_path(self) -> Path:
        """The cache folder: ``cache_dir``, else :func:`~safeclip.embed.default_cache_dir`."""
        return Path(self.cache_dir) if self.cache_dir is not None else default_cache_dir()

    def resolve(self, policy_encoder: Any) -> tuple[EncoderSpec, str]:
        """This spec with ``model``/``pretrained`` filled in (the caller's, else the environment's, else the
        policy's ``encoder:`` mapping, else the default) and which of them chose (``"caller"``, ``"policy"`` or
        ``"default"``)."""
        model, pretrained, chosen_by = resolve_encoder_args(self.model, self.pretrained, policy_encoder)
        return dataclasses.replace(self, model=model, pretrained=pretrained), chosen_by

    def load(self) -> Encoder:
        """The :class:`~safeclip.embed.Encoder` this spec names (resolve it first to apply a policy's choice)."""
        from ._encoder import Encoder

        return Encoder(self.model, self.pretrained, device=self.device, precision=self.precision, batch_size=self.batch_size,
                       cache_dir=self.cache_dir, runtime=self.runtime, threads=self.threads)
