"""What a review store holds: items (a decision sent to review) and verdicts (what a person decided), and the
sampling rule that chooses which decisions go to review."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["ACTIONS", "THUMBNAIL_SIDE", "NewItem", "ReviewItem", "StratumCount", "Verdict", "in_sample", "thumbnail_jpeg"]

ACTIONS = ("allow", "flag", "block")
THUMBNAIL_SIDE = 256


@dataclass(frozen=True)
class NewItem:
    """A decision to put in a review store (see :meth:`ReviewStore.add`).

    ``decision``: the Decision as :meth:`~safeclip.Decision.to_dict` gives it; ``policy``: the deciding policy's id
    (``name@version``, also ``decision["policy"]``); ``probability``: the chance this decision had of being sent to
    review (1.0 for every flag; the policy's rate for a sampled allow), in (0, 1]; ``origin``: where it came from
    (``"check"``, ``"serve"``, ``"audit"``); ``embedding``: the deciding view's L2-normalised float32 embedding,
    ``(D,)``, when there is one; ``thumbnail``: JPEG bytes (:func:`thumbnail_jpeg`). The store keeps one item per
    ``(sha256, policy)``: adding the same again is a no-op.
    """

    sha256: str
    policy: str
    encoder_id: str
    action: str
    decision: Mapping[str, Any]
    probability: float
    origin: str
    source: str | None = None
    embedding: np.ndarray | None = None
    thumbnail: bytes | None = None


@dataclass(frozen=True)
class Verdict:
    """A reviewer's verdict on an item: ``action`` (allow / flag / block), optionally the ``category`` it is about
    and a ``note``; ``reviewer`` and ``created_at`` (Unix seconds, the store's clock) record who and when. A second
    verdict on an item is kept beside the first, never over it."""

    id: int
    item_id: int
    reviewer: str
    action: str
    category: str | None
    note: str | None
    created_at: float

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "item_id": self.item_id, "reviewer": self.reviewer, "action": self.action,
                "category": self.category, "note": self.note, "created_at": self.created_at}


@dataclass(frozen=True)
class ReviewItem:
    """An item of a review store (what :meth:`ReviewStore.get`, ``items`` and ``next`` return): the fields of
    :class:`NewItem` (``embedding`` and ``thumbnail`` are read only on request: ``has_embedding`` /
    ``has_thumbnail`` say whether there is one) with its ``id``, ``created_at`` and ``verdicts`` (oldest first)."""

    id: int
    sha256: str
    policy: str
    encoder_id: str
    action: str
    decision: Mapping[str, Any]
    probability: float
    origin: str
    source: str | None
    created_at: float
    has_embedding: bool
    has_thumbnail: bool
    verdicts: tuple[Verdict, ...] = ()
    claimed_by: str | None = None
    claimed_until: float | None = None

    @property
    def policy_name(self) -> str:
        return self.policy.rpartition("@")[0]

    @property
    def policy_version(self) -> str:
        return self.policy.rpartition("@")[2]

    def to_dict(self) -> dict[str, Any]:
        """One JSON object (what ``safeclip review list --json`` prints per line)."""
        return {"id": self.id, "sha256": self.sha256, "policy": self.policy, "encoder_id": self.encoder_id,
                "action": self.action, "probability": self.probability, "origin": self.origin,
                "source": self.source, "created_at": self.created_at, "has_embedding": self.has_embedding,
                "has_thumbnail": self.has_thumbnail, "claimed_by": self.claimed_by,
                "claimed_until": self.claimed_until, "verdicts": [v.to_dict() for v in self.verdicts],
                "decision": dict(self.decision)}


@dataclass(frozen=True)
class StratumCount:
    """How many items a store holds for one ``(policy, action)`` stratum and how many of them have a verdict:
    recalibration weights a reviewed item by ``1 / (probability * reviewed / items)``."""

    policy: str
    action: str
    items: int
    reviewed: int


def in_sample(sha256: str, policy: str, rate: float) -> bool:
    """Whether the decision on content ``sha256`` under ``policy`` falls in a sample taken at ``rate``.

    Deterministic (a hash of both, uniform in [0, 1)): every server and every retry agrees, so the store's
    ``(sha256, policy)`` key stays idempotent, and the sample is independent of what the content shows.

    >>> in_sample("ab" * 32, "default@1.0", 1.0), in_sample("ab" * 32, "default@1.0", 0.0)
    (True, False)
    >>> sum(in_sample(f"{i:064x}", "default@1.0", 0.1) for i in range(10_000))
    1022
    """
    if rate >= 1.0:
        return True
    if rate <= 0.0:
        return False
    digest = hashlib.sha256(b"safeclip.review\0" + policy.encode() + b"\0" + sha256.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < rate


def thumbnail_jpeg(pixels: np.ndarray, side: int = THUMBNAIL_SIDE) -> bytes:
    """A JPEG of an ``(H, W, 3)`` uint8 frame, its longer side at most ``side`` pixels (what a reviewer sees)."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8), "RGB")
    img.thumbnail((side, side))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return buf.getvalue()
