"""An audit's decisions into a review store (``safeclip review add STORE --from audit.parquet``).

Rows are chosen by action (``actions``: every row of those actions, each with sampling probability 1), or, without
``actions``, sampled at the policy's ``review: {sample: ...}`` rates with the same rule as the Moderator's hook
(:func:`~safeclip.review.in_sample`), so that an audit and a live stream are sampled alike. Each item holds the full
Decision rebuilt by the decision object from the row's embeddings (:func:`~safeclip.audit.rescore.audit_decisions`),
the deciding view's embedding, and a thumbnail decoded from the file when it is still readable. A row that could not
be re-decided (an error row, an embedding no longer cached) goes in with the audit's action and its error: it is
still a decision someone should see.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..decode import DecodeLimits, decode
from ..errors import ConfigError, DecodeError
from ..policy import Policy, load_policy
from ..review import (
    ACTIONS,
    THUMBNAIL_SIDE,
    NewItem,
    ReviewStore,
    in_sample,
    thumbnail_jpeg,
)
from .rescore import AuditDecision, audit_decisions

__all__ = ["ReviewImport", "add_audit_to_review"]

_BATCH = 64


@dataclass(frozen=True)
class ReviewImport:
    """What :func:`add_audit_to_review` did: ``selected`` rows (of their action, or in the sample), ``added`` new
    items, ``duplicates`` already in the store, ``without_embedding`` (rows that could not be re-decided) and
    ``without_thumbnail`` (files no longer readable)."""

    selected: int
    added: int
    duplicates: int
    without_embedding: int
    without_thumbnail: int

    def format(self) -> str:
        return (f"{self.selected} rows selected: {self.added} added, {self.duplicates} already in the store; "
                f"{self.without_embedding} without an embedding, {self.without_thumbnail} without a thumbnail")


def add_audit_to_review(
    store: ReviewStore,
    source: str | os.PathLike[str],
    policy: str | os.PathLike[str] | Policy,
    *,
    actions: Sequence[str] | None = None,
    cache: str | os.PathLike[str] | None = None,
    thumbnails: bool = True,
    model: str | None = None,
    pretrained: str | None = None,
) -> ReviewImport:
    """Add the rows of audit output ``source`` to ``store`` (see the module doc). Idempotent: running it again adds
    nothing new.

    >>> add_audit_to_review(open_store("review.db"), "audit.parquet", "default", actions=["flag"])  # doctest: +SKIP
    """
    pol = load_policy(policy)
    if actions is not None:
        bad = sorted(set(actions) - set(ACTIONS))
        if bad or not actions:
            raise ConfigError(f"actions must be some of {', '.join(ACTIONS)}, not {bad or 'none'}")
    counts = dict.fromkeys(("selected", "added", "duplicates", "without_embedding", "without_thumbnail"), 0)
    pending: list[NewItem] = []

    def flush() -> None:
        ids = store.add(pending)
        counts["added"] += sum(i is not None for i in ids)
        counts["duplicates"] += sum(i is None for i in ids)
        pending.clear()

    for row in audit_decisions(source, pol, actions=actions, cache=cache, model=model, pretrained=pretrained):
        if row.action not in ACTIONS:
            continue  # the audit's "error" rows name no action; fail-closed ones are flag/block rows
        rate = 1.0 if actions is not None else pol.review.rate(row.action)
        key = row.sha256 or f"unhashed:{source}:{row.row}"
        if not in_sample(key, pol.id, rate):
            continue
        counts["selected"] += 1
        thumb = _thumbnail(row.path) if thumbnails and row.path else None
        counts["without_thumbnail"] += thumb is None
        counts["without_embedding"] += row.embedding is None
        pending.append(NewItem(sha256=key, policy=pol.id, encoder_id=_encoder_id(row), action=row.action,
                               decision=_decision_dict(row, pol), probability=rate, origin="audit",
                               source=row.path, embedding=row.embedding, thumbnail=thumb))
        if len(pending) >= _BATCH:
            flush()
    if pending:
        flush()
    return ReviewImport(**counts)


def _encoder_id(row: AuditDecision) -> str:
    return row.decision.encoder_id if row.decision is not None else ""


def _decision_dict(row: AuditDecision, policy: Policy) -> dict[str, Any]:
    """The rebuilt Decision, with the audit's action (the decision that was made, should a bank have changed since);
    for a row that could not be re-decided, what the audit recorded."""
    if row.decision is not None:
        d = row.decision.to_dict()
        d["action"] = row.action
        return d
    return {"action": row.action, "reasons": [f"error: {row.error}"] if row.error else [], "policy": policy.id,
            "encoder_id": "", "sha256": row.sha256, "source": row.path, "error": row.error, "categories": {}}


def _thumbnail(path: str) -> bytes | None:
    """A thumbnail of the file's first frame, or None when it can no longer be read."""
    try:
        frames = decode(path, limits=DecodeLimits(sample_frames=1), target_size=2 * THUMBNAIL_SIDE).frames
        return thumbnail_jpeg(np.asarray(frames[0])) if frames else None
    except (DecodeError, OSError, ValueError):
        return None
