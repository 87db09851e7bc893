"""What int8 costs on the user's own images with their own weights: fp32 vs int8 embeddings and decisions.

Both embeddings of each image come from the same decoded pixels and are decided by one fp32 decider (a
:meth:`Moderator.decide <safeclip.moderator.Moderator.decide>`, passed in: the embed stage does not chain stages),
so a change of action is the change int8 alone makes. It measures agreement with fp32, never accuracy.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError, DecodeError
from ._encoder import Encoder
from ._pixels import prepare_pixels

__all__ = ["Int8Report", "verify_int8"]

_CHUNK = 64  # images decoded and embedded at a time: memory stays flat on large folders


@dataclass(frozen=True)
class Int8Report:
    """fp32 vs int8 on a set of images. ``cosines[i]``: cosine of image i's two embeddings; actions per image;
    ``max_probability_change``: the largest |p_int8 - p_fp32| over images and categories, at ``max_change_at``
    (source, category); ``failed``: (source, error) of the inputs that could not be decoded. The actions and the
    probability change are empty / None when no decider was given."""

    fp32_encoder_id: str
    int8_encoder_id: str
    policy: str | None
    sources: tuple[str, ...]
    cosines: tuple[float, ...]
    fp32_actions: tuple[str, ...]
    int8_actions: tuple[str, ...]
    max_probability_change: float | None
    max_change_at: tuple[str, str] | None
    failed: tuple[tuple[str, str], ...] = ()

    @property
    def n_images(self) -> int:
        return len(self.sources)

    @property
    def same_action(self) -> float | None:
        """Share of images whose action is the same under int8 (None without a decider)."""
        if not self.fp32_actions:
            return None
        return float(np.mean([a == b for a, b in zip(self.fp32_actions, self.int8_actions)]))

    @property
    def changed(self) -> list[tuple[str, str, str]]:
        """(source, fp32 action, int8 action) of each image whose action changed."""
        return [(s, a, b) for s, a, b in zip(self.sources, self.fp32_actions, self.int8_actions) if a != b]

    def cosine_quantiles(self) -> dict[str, float]:
        """min, 1st/5th percentile, median and mean of the per-image cosines."""
        c = np.asarray(self.cosines, np.float64)
        return {"min": float(c.min()), "p01": float(np.quantile(c, 0.01)), "p05": float(np.quantile(c, 0.05)),
                "median": float(np.median(c)), "mean": float(c.mean())}

    def to_dict(self) -> dict[str, Any]:
        return {"fp32_encoder_id": self.fp32_encoder_id, "int8_encoder_id": self.int8_encoder_id,
                "policy": self.policy, "n_images": self.n_images, "cosine": self.cosine_quantiles(),
                "same_action": self.same_action, "changed": [list(c) for c in self.changed],
                "max_probability_change": self.max_probability_change,
                "max_change_at": list(self.max_change_at) if self.max_change_at else None,
                "failed": [list(f) for f in self.failed]}


def verify_int8(
    images: Iterable[Any],
    fp32: Encoder,
    *,
    decide: Callable[[np.ndarray], Sequence[Any]] | None = None,
    int8: Encoder | None = None,
    decode_limits: Any = None,
    fast_decode: bool = True,
) -> Int8Report:
    """Embed ``images`` with ``fp32`` (an fp32 :class:`Encoder`) and its int8 twin (exported if needed), compare.

    ``decide`` turns ``(N, D)`` embeddings into decisions (objects with ``action``, ``policy`` and
    ``categories[name].probability``): pass a fp32 :meth:`Moderator.decide <safeclip.moderator.Moderator.decide>`
    to measure how many actions int8 changes; without it only the cosines are measured. Both embeddings of an
    image come from the same decoded pixels. :class:`~safeclip.errors.DataError` if no image can be decoded.

    >>> enc = Encoder("ViT-B-32", "/models/vit-b-32.bin", precision="fp32")                 # doctest: +SKIP
    >>> m = safeclip.Moderator("default", encoder=enc)                                      # doctest: +SKIP
    >>> r = verify_int8(["a.jpg", "b.png"], enc, decide=m.decide)                           # doctest: +SKIP
    >>> r.same_action, r.cosine_quantiles()["min"]                                          # doctest: +SKIP
    """
    from ..decode import DecodeLimits, decode

    if fp32.precision != "fp32":
        raise ConfigError(f"verify_int8 compares against an fp32 encoder, not {fp32.precision}")
    int8 = int8 or Encoder(fp32.model_name, fp32.pretrained, precision="int8", runtime="onnx", device="cpu",
                           cache_dir=fp32.cache_dir, threads=fp32.threads)
    spec = fp32.pixel_spec
    limits = decode_limits or DecodeLimits()
    target = spec.size if fast_decode else None

    sources: list[str] = []
    failed: list[tuple[str, str]] = []
    cosines: list[float] = []
    actions: tuple[list[str], list[str]] = ([], [])
    worst: tuple[float, tuple[str, str] | None] = (0.0, None)
    policy: list[str] = []
    pending: list[tuple[str, np.ndarray]] = []

    def flush() -> None:
        nonlocal worst
        if not pending:
            return
        x = np.stack([p for _, p in pending])
        e32, e8 = fp32.embed_pixels(x), int8.embed_pixels(x)
        cosines.extend(float(c) for c in (e32 * e8).sum(1))
        sources.extend(name for name, _ in pending)
        if decide is not None:
            for a, b in zip(decide(e32), decide(e8)):
                policy[:] = [str(getattr(a, "policy", ""))]
                actions[0].append(a.action)
                actions[1].append(b.action)
                for cat, res in a.categories.items():
                    delta = abs(b.categories[cat].probability - res.probability)
                    if worst[1] is None or delta > worst[0]:
                        worst = (delta, (sources[len(actions[0]) - 1], cat))
        pending.clear()

    for i, img in enumerate(images):
        name = os.fspath(img) if isinstance(img, (str, os.PathLike)) else f"<input {i}>"
        try:
            decoded = decode(img, limits=limits, target_size=target)
        except DecodeError as e:
            failed.append((name, str(e)))
            continue
        pending.append((name, prepare_pixels(decoded.frames[0], spec, fast=fast_decode)))
        if len(pending) >= _CHUNK:
            flush()
    flush()
    if not sources:
        raise DataError(f"none of the {len(failed)} inputs could be decoded: nothing to compare"
                        + (f" (first: {failed[0][1]})" if failed else ""))
    return Int8Report(fp32.encoder_id, int8.encoder_id, policy[0] if policy else None, tuple(sources),
                      tuple(cosines), tuple(actions[0]), tuple(actions[1]),
                      float(worst[0]) if decide is not None else None, worst[1], tuple(failed))
