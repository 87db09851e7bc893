"""Banks as a signal of the score stage: the banks a policy names, matched against N views at once.

:class:`PolicyBanks` opens every bank a policy's categories name (once per folder), and :meth:`PolicyBanks.match`
turns views (their embeddings and PDQ hashes) into a :class:`BankSignal`: per view and category, the action a match
forces (``-1`` none, ``0`` allow, ``1`` flag, ``2`` block) and the matches themselves. The decide stage applies it
(:func:`safeclip.decide.apply_banks`); nothing here decides.

What a match forces, per category: a ``deny`` match its bank's action; an ``allow`` match ``0`` (overrides the score)
unless a deny bank of the same category matched too (deny wins: known bad content is never allowed by a look-alike);
an entry in flood quarantine ``1`` (flag) for a deny bank and nothing for an allow bank. Banks are re-read when they
changed (at most every ``refresh_s`` seconds), so a long-lived process picks up new, disabled and removed entries.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import PolicyError, SafeclipError
from ..policy import BankRef, Policy
from ._hits import HitLog
from ._store import Bank, BankEntry

__all__ = ["BankMatch", "BankSignal", "PolicyBanks", "MIN_PDQ_QUALITY", "NO_HASH"]

MIN_PDQ_QUALITY = 50
"""PDQ hashes of quality below this are not matched (PDQ discards quality <= 49: flat or tiny images)."""
NO_HASH = -1
"""The quality of a view whose PDQ hash was not computed (it cannot be matched against a PDQ bank)."""

_CODES = {"block": 2, "flag": 1, "allow": 0}


@dataclass(frozen=True)
class BankMatch:
    """One bank entry an input's view matched (or, from ``explain``, came nearest to)."""

    category: str
    bank: str
    path: str
    kind: str
    entry: str
    label: str
    effect: str  # "deny" or "allow"
    action: str  # what the match forces: "block", "flag" (also a quarantined deny entry), "allow" or "none"
    distance: int | None = None  # PDQ: Hamming distance in bits
    similarity: float | None = None  # embedding: cosine similarity
    threshold: float = 0.0
    quarantined: bool = False
    flood_count: int = 0
    matched: bool = True  # False for a near entry that ``explain`` reports beyond the threshold
    time_s: float | None = None  # the matched view's time in a video or animation (seconds), None for a still

    @property
    def closeness(self) -> str:
        if self.distance is not None:
            return f"distance {self.distance} (match <= {int(self.threshold)})"
        return f"similarity {self.similarity:.3f} (match >= {self.threshold:g})"

    def describe(self) -> str:
        label = f" ({self.label!r})" if self.label else ""
        when = "" if self.time_s is None else f" (frame at {self.time_s:.2f} s)"
        return f"entry {self.entry!r}{label} of bank {self.bank!r} at {self.closeness}{when}"

    def to_dict(self) -> dict[str, Any]:
        return {"category": self.category, "bank": self.bank, "path": self.path, "kind": self.kind,
                "entry": self.entry, "label": self.label, "effect": self.effect, "action": self.action,
                "distance": self.distance, "similarity": None if self.similarity is None else round(self.similarity, 6),
                "threshold": self.threshold, "quarantined": self.quarantined, "flood_count": self.flood_count,
                "matched": self.matched, "time_s": self.time_s}


@dataclass(frozen=True)
class BankSignal:
    """Bank matches of R views: ``codes`` ``(R, C)`` int8 (what a match forces per category; -1: nothing),
    ``matches`` per view, ``missing`` per view: why it could not be matched against a bank it must be (else None)."""

    codes: np.ndarray
    matches: tuple[tuple[BankMatch, ...], ...]
    missing: tuple[str | None, ...]

    @classmethod
    def none(cls, rows: int, categories: int) -> BankSignal:
        return cls(np.full((rows, categories), -1, np.int8), ((),) * rows, (None,) * rows)


class _OpenBank:
    def __init__(self, store: Bank):
        self.store = store
        self.hits = HitLog(store.path)
        self.checked = time.monotonic()


class PolicyBanks:
    """Every bank a policy's categories name, opened once per folder, for embeddings of ``encoder_id``."""

    def __init__(self, policy: Policy, encoder_id: str, *, refresh_s: float = 1.0):
        self.policy = policy
        self.encoder_id = encoder_id
        self.refresh_s = refresh_s
        self._lock = threading.Lock()
        self._banks: dict[Path, _OpenBank] = {}
        self.refs: list[tuple[int, int, BankRef]] = []  # (category index, ref index, ref)
        problems: list[str] = []
        for j, cat in enumerate(policy.categories):
            for i, ref in enumerate(cat.banks):
                where = f"{policy.source}: categories.{cat.name}.banks[{i}].path"
                try:
                    if ref.path not in self._banks:
                        self._banks[ref.path] = _OpenBank(Bank.open(ref.path))
                    store = self._banks[ref.path].store
                except SafeclipError as e:
                    problems.append(f"{where}: {e}")
                    continue
                if store.kind != ref.kind:
                    problems.append(f"{where}: {ref.path} is now a {store.kind} bank, the policy read a {ref.kind} "
                                    "bank there")
                elif store.kind == "embedding" and store.encoder_id != encoder_id:
                    problems.append(f"{where}: {ref.path} holds embeddings of {store.encoder_id!r}, but this policy "
                                    f"runs in {encoder_id!r}: rebuild the bank with this encoder, or run the encoder "
                                    "it was built with")
                else:
                    self.refs.append((j, i, ref))
        if problems:
            raise PolicyError(problems)
        self.needs_pdq = any(ref.kind == "pdq" for _, _, ref in self.refs)

    def __bool__(self) -> bool:
        return bool(self.refs)

    def __reduce__(self) -> tuple[Any, ...]:
        # Open banks hold SQLite connections: another process (a Ray actor) opens the same folders again.
        return (PolicyBanks, (self.policy, self.encoder_id), {"refresh_s": self.refresh_s})

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.refresh_s = state["refresh_s"]

    def stores(self) -> list[Bank]:
        return [b.store for b in self._banks.values()]

    def close(self) -> None:
        for b in self._banks.values():
            b.hits.close()
            b.store.close()

    def _fresh(self, path: Path) -> _OpenBank:
        b = self._banks[path]
        now = time.monotonic()
        if now - b.checked >= self.refresh_s:
            b.checked = now
            b.store.refresh()
        return b

    def match(self, embeddings: np.ndarray, pdq: np.ndarray | None = None, pdq_quality: np.ndarray | None = None,
              *, record: bool = True) -> BankSignal:
        """Match R views: ``embeddings`` ``(R, D)``, ``pdq`` ``(R, 32)`` uint8 with ``pdq_quality`` ``(R,)``
        (:data:`NO_HASH` where not computed; ``pdq=None``: none was). ``record``: count the matches for flood
        quarantine (what deciding does; ``explain`` does not)."""
        n_rows, n_cat = len(embeddings), len(self.policy.categories)
        if not self.refs or n_rows == 0:
            return BankSignal.none(n_rows, n_cat)
        quality = (np.full(n_rows, NO_HASH, np.int64) if pdq is None or pdq_quality is None
                   else np.asarray(pdq_quality, np.int64))
        missing: list[str | None] = [None] * n_rows
        if self.needs_pdq:
            for r in np.flatnonzero(quality == NO_HASH):
                missing[int(r)] = ("no PDQ hash was computed for it, and the policy matches PDQ banks (decode it "
                                   "again: audits and checks compute it; embeddings alone cannot be matched)")
        found: list[tuple[int, int, BankRef, Bank, int, float]] = []  # (row, category, ref, store, data row, value)
        with self._lock:
            by_bank: dict[Path, list[tuple[int, BankRef]]] = {}
            for j, _, ref in self.refs:
                by_bank.setdefault(ref.path, []).append((j, ref))
            for path, refs in by_bank.items():
                bank = self._fresh(path)
                store = bank.store
                if not store.enabled or store.n_rows == 0:
                    continue
                if store.kind == "pdq":
                    usable = np.flatnonzero(quality >= MIN_PDQ_QUALITY)
                    if not len(usable) or pdq is None:
                        continue
                    radius = int(max(ref.threshold for _, ref in refs))
                    results = store.search_hamming(np.asarray(pdq)[usable], radius)
                    for r, (rows, dist) in zip(usable, results):
                        for row, d in zip(rows, dist):
                            for j, ref in refs:
                                if d <= ref.threshold:
                                    found.append((int(r), j, ref, store, int(row), float(d)))
                else:
                    floor = float(min(ref.threshold for _, ref in refs))
                    results = store.search_vectors(embeddings, floor)
                    for r, (rows, sims) in enumerate(results):
                        for row, s in zip(rows, sims):
                            for j, ref in refs:
                                if s >= ref.threshold:
                                    found.append((r, j, ref, store, int(row), float(s)))
            matches = self._describe(found, embeddings, pdq, record=record)
        codes = np.full((n_rows, n_cat), -1, np.int8)
        per_row: list[list[BankMatch]] = [[] for _ in range(n_rows)]
        for (r, j, *_), m in zip(found, matches):
            per_row[r].append(m)
            code = _CODES.get(m.action, -1)
            if m.effect == "deny":
                codes[r, j] = max(codes[r, j], code)
            elif code == 0 and codes[r, j] < 1:
                codes[r, j] = 0
        return BankSignal(codes, tuple(tuple(_dedupe(ms)) for ms in per_row), tuple(missing))

    def _describe(self, found: list[tuple[int, int, BankRef, Bank, int, float]], embeddings: np.ndarray,
                  pdq: np.ndarray | None, *, record: bool) -> list[BankMatch]:
        """One :class:`BankMatch` per found (row, category, ref, data row), with entry metadata and flood state."""
        entries: dict[tuple[Path, int], BankEntry] = {}
        numbers: dict[Path, set[int]] = {}
        entry_of = [int(store.entry_numbers(np.array([row]))[0]) for _, _, _, store, row, _ in found]
        for (_, _, ref, _, _, _), n in zip(found, entry_of):
            numbers.setdefault(ref.path, set()).add(n)
        for path, nums in numbers.items():
            for n, e in self._banks[path].store.entries_by_number(sorted(nums)).items():
                entries[(path, n)] = e
        # Flood counting: each distinct (entry, input) once; inputs known by their PDQ hash or embedding digest.
        hits: dict[Path, set[tuple[str, str]]] = {}
        keyed: list[tuple[BankEntry | None, str]] = []
        for (r, _, ref, _, _, _), n in zip(found, entry_of):
            e = entries.get((ref.path, n))
            key = (np.asarray(pdq)[r].tobytes().hex() if (ref.kind == "pdq" and pdq is not None)
                   else hashlib.sha256(np.asarray(embeddings[r], np.float32).tobytes()).hexdigest()[:32])
            keyed.append((e, key))
            if e is not None and record:
                hits.setdefault(ref.path, set()).add((e.id, key))
        for path, hs in hits.items():
            self._banks[path].hits.record(sorted(hs))
        counts: dict[tuple[Path, str, float], int] = {}
        out: list[BankMatch] = []
        for (r, j, ref, store, row, value), (e, key) in zip(found, keyed):
            if e is None:  # removed between the search and the read: it no longer matches
                out.append(_gone(self.policy.categories[j].name, ref, store))
                continue
            window = ref.quarantine.window_hours * 3600.0
            ck = (ref.path, e.id, window)
            if ck not in counts:
                counts[ck] = self._banks[ref.path].hits.counts([e.id], window)[e.id]
            count = counts[ck]
            quarantined = e.confirmed is None and count > ref.quarantine.max_inputs
            if ref.effect == "deny":
                action = "flag" if quarantined else ref.action
            else:
                action = "none" if quarantined else "allow"
            out.append(BankMatch(
                category=self.policy.categories[j].name, bank=store.name, path=str(store.path), kind=store.kind,
                entry=e.id, label=e.label, effect=ref.effect, action=action,
                distance=int(value) if store.kind == "pdq" else None,
                similarity=value if store.kind == "embedding" else None, threshold=ref.threshold,
                quarantined=quarantined, flood_count=count))
        return out

    def nearest(self, category: str, embedding: np.ndarray, pdq: np.ndarray | None, pdq_quality: int = NO_HASH,
                k: int = 3) -> list[BankMatch]:
        """The ``k`` entries nearest to one view in each bank ``category`` uses, matched or not (``explain``)."""
        j = self.policy.category_names.index(category)
        out: list[BankMatch] = []
        with self._lock:
            for cj, _, ref in self.refs:
                if cj != j:
                    continue
                store = self._fresh(ref.path).store
                if ref.kind == "pdq":
                    if pdq is None or pdq_quality < MIN_PDQ_QUALITY:
                        continue
                    rows, vals = store.nearest(pdq, k)
                else:
                    rows, vals = store.nearest(embedding, k)
                nums = store.entry_numbers(rows) if len(rows) else np.zeros(0, np.int64)
                ents = store.entries_by_number(nums.tolist())
                for n, v in zip(nums, vals):
                    e = ents.get(int(n))
                    if e is None:
                        continue
                    ok = (v <= ref.threshold) if ref.kind == "pdq" else (v >= ref.threshold)
                    out.append(BankMatch(
                        category=category, bank=store.name, path=str(store.path), kind=store.kind, entry=e.id,
                        label=e.label, effect=ref.effect, action=ref.action if ok else "none",
                        distance=int(v) if ref.kind == "pdq" else None,
                        similarity=float(v) if ref.kind == "embedding" else None, threshold=ref.threshold,
                        matched=bool(ok and store.enabled)))
        return out


def _gone(category: str, ref: BankRef, store: Bank) -> BankMatch:
    return BankMatch(category=category, bank=store.name, path=str(store.path), kind=store.kind, entry="?", label="",
                     effect=ref.effect, action="none", threshold=ref.threshold, matched=False)


def _dedupe(matches: Sequence[BankMatch]) -> list[BankMatch]:
    """One match per (category, bank, entry): the closest (a PDQ entry's dihedral variants can all match)."""
    best: dict[tuple[str, str, str], BankMatch] = {}
    for m in matches:
        if not m.matched:
            continue
        key = (m.category, m.path, m.entry)
        old = best.get(key)
        if old is None or (m.distance is not None and old.distance is not None and m.distance < old.distance) or (
                m.similarity is not None and old.similarity is not None and m.similarity > old.similarity):
            best[key] = m
    return sorted(best.values(), key=lambda m: (m.category, m.effect != "deny", m.distance or 0,
                                                -(m.similarity or 0.0)))
