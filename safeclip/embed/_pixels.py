"""Frames -> model input pixels, in PIL + numpy only: decode workers run this without importing torch."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

__all__ = ["PixelSpec", "prepare_pixels"]

EXACT_MAX_ASPECT = 64
"""Up to this long/short side ratio, the "shortest" resize mode resizes the whole frame, then center-crops:
open_clip's transform, bit for bit (a 1:64 long screenshot: an s x 64s intermediate). Beyond it, the window the
crop keeps is resampled straight from the frame (PIL's ``box``), so no intermediate grows with the aspect ratio;
those pixels differ from the whole-frame resize by float rounding only (a level or two)."""

_INTERPOLATIONS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
                   "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}


@dataclass(frozen=True)
class PixelSpec:
    """How frames become model input, mirroring open_clip's inference transform exactly.

    open_clip resizes with torchvision on PIL images, which calls PIL's own resampler, so doing the same resize and
    crop here in PIL gives bit-identical uint8 pixels without importing torch.
    """

    size: int
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    fill_color: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> PixelSpec:
        """The inverse of ``dataclasses.asdict`` (JSON turns the tuples into lists)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    @classmethod
    def from_preprocess_cfg(cls, cfg: dict, size: int | tuple[int, ...] | list[int]) -> PixelSpec:
        """From open_clip's ``preprocess_cfg`` (a loaded model's, or a pretrained tag's); ``size`` where it has none."""
        size = cfg.get("size", size)
        size = size[0] if isinstance(size, (tuple, list)) else size
        return cls(
            size=int(size),
            interpolation=str(cfg.get("interpolation", "bicubic")),
            resize_mode=str(cfg.get("resize_mode", "shortest")),
            mean=tuple(float(v) for v in cfg.get("mean", cls.mean)),  # type: ignore[arg-type]
            std=tuple(float(v) for v in cfg.get("std", cls.std)),  # type: ignore[arg-type]
            fill_color=int(cfg.get("fill_color", 0)),
        )

    @property
    def digest(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def prepare_pixels(frame: Image.Image, spec: PixelSpec, *, fast: bool = False) -> np.ndarray:
    """Resize and crop one RGB frame to the model's input: ``(size, size, 3)`` uint8.

    ``fast`` lets Pillow shrink large images by an integer box reduction before the final resample
    (``reducing_gap=2``): about 2x faster on megapixel inputs, within 0.1% cosine of the exact embedding.

    Time and memory are bounded by the frame's size plus ``EXACT_MAX_ASPECT`` images of ``size x size``, whatever
    the aspect ratio: a frame thinner than 1:``EXACT_MAX_ASPECT`` is cropped before it is resized.

    >>> from PIL import Image
    >>> prepare_pixels(Image.new("RGB", (640, 480)), PixelSpec(size=224)).shape
    (224, 224, 3)
    """
    if frame.mode != "RGB":
        frame = frame.convert("RGB")
    s = spec.size
    resample = _INTERPOLATIONS.get(spec.interpolation, Image.Resampling.BICUBIC)
    gap = 2.0 if fast else None
    w, h = frame.size
    if spec.resize_mode == "squash":
        return np.asarray(frame.resize((s, s), resample, reducing_gap=gap))
    if spec.resize_mode == "longest":
        scale = s / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        canvas = Image.new("RGB", (s, s), (spec.fill_color,) * 3)
        canvas.paste(frame.resize((nw, nh), resample, reducing_gap=gap), ((s - nw) // 2, (s - nh) // 2))
        return np.asarray(canvas)
    # "shortest": torchvision Resize(int) semantics, then CenterCrop.
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = s, int(s * long / short)
    nw, nh = (new_short, new_long) if w <= h else (new_long, new_short)
    top = int(round((nh - s) / 2.0))
    left = int(round((nw - s) / 2.0))
    if new_long > EXACT_MAX_ASPECT * s:
        # Crop first: resample only the source window that the center crop keeps, at the same scale. Resizing the
        # whole frame would build an s x (s * aspect) image: 1.6 GB for a 500-byte 1x100000 PNG at s=64.
        sx, sy = w / nw, h / nh
        box = (left * sx, top * sy, (left + s) * sx, (top + s) * sy)
        return np.asarray(frame.resize((s, s), resample, box=box, reducing_gap=gap))
    if (nw, nh) != (w, h):
        frame = frame.resize((nw, nh), resample, reducing_gap=gap)
    return np.asarray(frame.crop((left, top, left + s, top + s)))
