"""The review loop's runtime side: a store of decisions sent to review and reviewers' verdicts on them.

Which decisions go to review is policy data (``review: {sample: {block, flag, allow}}``, :class:`~safeclip.policy.
ReviewRates`); each item keeps the probability it had of being sampled, so that verdicts can be weighted back to
the whole stream (``safeclip calibrate --from-review``, in ``safeclip.calibration``). A verdict never changes a
decision by itself: only a new policy version does.
"""

from __future__ import annotations

from ._model import (
           ACTIONS,
           THUMBNAIL_SIDE,
           NewItem,
           ReviewItem,
           StratumCount,
           Verdict,
           in_sample,
           thumbnail_jpeg,
)
from ._queue import ReviewQueue, ReviewQueueStats, read_spool, replay_spool, write_spool
from ._store import SCHEMA_VERSION, ReviewStore, open_store

__all__ = [
           "ACTIONS",
           "SCHEMA_VERSION",
           "THUMBNAIL_SIDE",
           "NewItem",
           "ReviewItem",
           "ReviewQueue",
           "ReviewQueueStats",
           "ReviewStore",
           "StratumCount",
           "Verdict",
           "in_sample",
           "open_store",
           "read_spool",
           "replay_spool",
           "thumbnail_jpeg",
           "write_spool",
]
