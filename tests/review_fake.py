"""An in-memory stand-in for a review store (the interface of safeclip.review.ReviewStore), for tests that need
verdicts without a database. Not a test module."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from safeclip.review import NewItem, ReviewItem, ReviewStore, StratumCount, Verdict


class MemoryStore(ReviewStore):
    def __init__(self, policy_name: str | None = None) -> None:
        self.location, self.backend, self.policy_name, self.schema_version = ":memory:", "memory", policy_name, 1
        self._items: dict[int, dict[str, Any]] = {}
        self._verdicts: dict[int, list[Verdict]] = {}
        self._ids = itertools.count(1)

    def add(self, items: Sequence[NewItem]) -> list[int | None]:
        out: list[int | None] = []
        for it in items:
            if any(v["sha256"] == it.sha256 and v["policy"] == it.policy for v in self._items.values()):
                out.append(None)
                continue
            self.policy_name = self.policy_name or it.policy.rpartition("@")[0]
            i = next(self._ids)
            self._items[i] = {**it.__dict__}
            self._verdicts[i] = []
            out.append(i)
        return out

    def verdict(self, item_id: int, action: str, *, reviewer: str, category: str | None = None,
                note: str | None = None) -> Verdict:
        v = Verdict(len(sum(self._verdicts.values(), [])) + 1, item_id, reviewer, action, category, note, 0.0)
        self._verdicts[item_id].append(v)
        return v

    def get(self, item_id: int) -> ReviewItem:
        d = self._items[item_id]
        return ReviewItem(item_id, d["sha256"], d["policy"], d["encoder_id"], d["action"], d["decision"],
                          d["probability"], d["origin"], d["source"], 0.0, d["embedding"] is not None, False,
                          tuple(self._verdicts[item_id]))

    def items(self, *, reviewed: bool | None = None, action: str | None = None, policy: str | None = None,
              after_id: int = 0, limit: int | None = None) -> Iterator[ReviewItem]:
        for i in sorted(self._items):
            it = self.get(i)
            if i <= after_id or (reviewed is not None and bool(it.verdicts) != reviewed) or (
                    action is not None and it.action != action) or (policy is not None and it.policy != policy):
                continue
            yield it

    def embeddings(self, item_ids: Sequence[int]) -> np.ndarray:
        dim = next(len(d["embedding"]) for d in self._items.values() if d["embedding"] is not None)
        return np.stack([np.full(dim, np.nan, np.float32) if self._items[i]["embedding"] is None
                         else np.asarray(self._items[i]["embedding"], np.float32) for i in item_ids])

    def strata(self) -> list[StratumCount]:
        keys = sorted({(d["policy"], d["action"]) for d in self._items.values()})
        return [StratumCount(p, a, sum(1 for d in self._items.values() if (d["policy"], d["action"]) == (p, a)),
                             sum(1 for i, d in self._items.items() if (d["policy"], d["action"]) == (p, a)
                                 and self._verdicts[i])) for p, a in keys]

    def close(self) -> None:
        pass
