"""Learning from reviewers' verdicts: refit calibrators and thresholds from a review store, report what would change,
then write a new policy version (what ``safeclip calibrate --from-review STORE`` runs).

Labels (:func:`review_data`), per reviewed item and category
    An ``allow`` verdict is negative for every category. A ``flag`` / ``block`` verdict naming a category is
    positive for it (and says nothing of the others); one naming none is positive for the categories that fired in
    the item's decision (its ``reasons``, or a category at or above its flag threshold) and says nothing of the
    others; when none fired it labels nothing (counted in ``left_out["verdict labels nothing"]``). Several verdicts
    on one item vote per category; a tie counts positive (fail closed).

Weights
    A reviewed item of stratum ``(policy, action)`` weighs ``1 / (probability * reviewed / items)``: ``1 /
    probability`` decisions of the stream stood behind each item sent to review (every flag, 2% of allows: 50),
    and ``items / reviewed`` is the non-response adjustment, which treats the reviewed items of a stratum as a
    random subsample of its items (reviewers take items in queue order, not by what they show). Weighted precision
    and recall then estimate those of the whole stream, not of the review queue. Their lower bounds are
    Clopper-Pearson on the weighted counts in units of the heaviest weight present (see
    :func:`~safeclip.calibration.choose_thresholds`): a verdict on a sampled allow is one observation, however many
    decisions it stands for. Rows of old labelled data (``data=``) weigh 1.

    What a sample cannot see stays out of the bounds: with flags only (allow rate 0) the missed positives are never
    reviewed and the recall estimate is ~1 whatever the truth; and a new threshold that acts on allows the sample
    happened to miss has their false positives out of its precision bound. benchmarks/review_loop.py measures both.

Refit (:func:`calibrate_from_review`), per category
    A sigmoid calibrator on the category's runtime signals (the prompt signal, and its probe and head when the
    policy has them, as they are: they are not retrained), fitted with the weights on every labelled row, and flag
    / block thresholds for the targets chosen on its probabilities with weighted precision / recall and their lower
    bounds (:func:`~safeclip.calibration.choose_thresholds` with ``sample_weight``). The rows are not split: the
    sigmoid has one parameter per signal plus an intercept, and with the prompt signal alone it is monotone, so a
    cutoff on its probability selects exactly the rows a cutoff on the raw signal would.

The report (:meth:`ReviewCalibration.format`) gives, per category, the old and new thresholds, the weighted
precision and recall (with lower bounds) at each, and how many of the store's decisions would change when re-decided
by the new policy (:class:`~safeclip.compiled.CompiledPolicy`, the runtime's decision object), raw and weighted to
the stream. Nothing is written until :meth:`ReviewCalibration.write`: the policy YAML with the new thresholds,
version ``<base>+rev<N>``, and the calibrators under content-addressed names (``calibrators/<C>.<sha8>.json``, so
that the files of earlier versions stay), recorded in the policy history (:mod:`safeclip.versions`; in place, the
version it replaces is recorded first, so ``safeclip policy rollback`` can return to it).

>>> with open_store("review.db") as store:                                      # doctest: +SKIP
...     result = calibrate_from_review("policy.yaml", store, flag_recall=0.9)
>>> print(result.format())                                                      # doctest: +SKIP
>>> result.write("policy.yaml")                                                 # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from safeclip.artifacts import copy_pinned, jsonable, sha256_bytes
from safeclip.calibrate import Calibrator, PolicyCalibrators, head_categories
from safeclip.compiled import CompiledPolicy
from safeclip.decide import ACTIONS
from safeclip.errors import ConfigError, DataError, EncoderMismatchError, ReviewError, SafeclipError
from safeclip.files import json_bytes, write_bytes_atomic
from safeclip.policy import Policy, load_policy
from safeclip.review import ReviewItem, ReviewStore, StratumCount, open_store
from safeclip.versions import history, record

from .calibrators import fit_calibrator
from .data import LabeledData, prompt_source
from .thresholds import ThresholdRates, ThresholdWarning, Thresholds, choose_thresholds, effective_n, rates_at

__all__ = ["CategoryReview", "ReviewCalibration", "ReviewData", "calibrate_from_review", "review_data"]

PolicyLike = str | os.PathLike[str] | Policy
_PAGE = 4096  # embeddings read from the store per call
_VERIFY_TOLERANCE = 1e-4
_REV = re.compile(r"(?P<base>.*)\+rev(?P<n>[0-9]+)")


# ================================================================================================= the data
@dataclass(frozen=True, eq=False)
class ReviewData:
    """A review store's items as labelled, weighted rows in one embedding space (see the module doc).

    Every item of ``encoder_id`` with an embedding is a row (reviewed or not: the unreviewed ones are re-decided for
    the report's flip counts): ``embeddings`` ``(n, D)`` float32, ``item_ids``, ``actions`` and ``policies`` (the
    stored decision's action and policy id), ``labels`` per category ``(n,)`` int8 (1 positive, 0 negative, -1 no
    label), ``weights`` (the calibration weight of a labelled row, 0 otherwise) and ``stream_weights`` (``1 /
    probability``: the decisions of the stream each item stands for). ``left_out``: reviewed items that give no row
    or no label, by reason; ``skipped``: items of any kind that cannot be re-decided (no embedding, another encoder).
    """

    source: str
    policy_name: str
    encoder_id: str
    embeddings: np.ndarray
    item_ids: np.ndarray
    actions: tuple[str, ...]
    policies: tuple[str, ...]
    labels: Mapping[str, np.ndarray]
    weights: np.ndarray
    stream_weights: np.ndarray
    strata: tuple[StratumCount, ...]
    n_items: int
    n_reviewed: int
    left_out: Mapping[str, int]
    skipped: int

    def __len__(self) -> int:
        return int(self.item_ids.size)

    @property
    def labelled(self) -> np.ndarray:
        """``(n,)`` bool: the rows labelled for at least one category."""
        out = np.zeros(len(self), bool)
        for y in self.labels.values():
            out |= y >= 0
        return out


def _fired(decision: Mapping[str, Any], categories: Sequence[str]) -> list[str]:
    """The categories that fired in a stored decision: its reasons, or at or above their flag threshold."""
    fired = {str(c) for c in decision.get("reasons") or ()}
    for name, r in (decision.get("categories") or {}).items():
        if not isinstance(r, Mapping):
            continue
        flag, p = r.get("flag_threshold"), r.get("probability")
        if r.get("action") in ("flag", "block") or (
                isinstance(flag, (int, float)) and isinstance(p, (int, float)) and p >= flag):
            fired.add(str(name))
    return [c for c in categories if c in fired]


def _item_labels(item: ReviewItem, categories: Sequence[str]) -> tuple[dict[str, int], int]:
    """Per category 1 / 0 / -1 from an item's verdicts (the module doc's rule), and how many of its verdicts
    labelled nothing (a flag or block naming no category, on a decision in which nothing fired)."""
    votes = {c: [0, 0] for c in categories}  # [negative, positive]
    silent = 0
    for v in item.verdicts:
        if v.action == "allow":
            for c in categories:
                votes[c][0] += 1
        elif v.category is not None:
            if v.category in votes:  # a category the policy no longer has says nothing here
                votes[v.category][1] += 1
        else:
            fired = _fired(item.decision, categories)
            silent += not fired
            for c in fired:
                votes[c][1] += 1
    return {c: (-1 if neg == pos == 0 else int(pos >= neg)) for c, (neg, pos) in votes.items()}, silent


def _check_store_policy(store: ReviewStore, policy: Policy) -> None:
    if store.policy_name is None:
        raise DataError(f"review store {store.location} holds no items yet: nothing to learn from")
    if store.policy_name != policy.name:
        raise ReviewError(f"review store {store.location} belongs to policy {store.policy_name!r}, not "
                          f"{policy.name!r}: pass --policy with that policy's file")


def review_data(store: ReviewStore, policy: PolicyLike, *, encoder_id: str | None = None) -> ReviewData:
    """The store's items as labelled, weighted rows (see the module doc for the labels and weights).

    ``encoder_id``: the embedding space to use (default: the one most reviewed items with an embedding are in);
    items without an embedding or of another space are left out and counted. Raises
    :class:`~safeclip.errors.EncoderMismatchError` when no reviewed item has an embedding of that space,
    :class:`~safeclip.errors.DataError` when the store has no verdicts, :class:`~safeclip.errors.ReviewError`
    when it belongs to another policy.
    """
    pol = load_policy(policy)
    _check_store_policy(store, pol)
    cats = pol.category_names
    strata = tuple(store.strata())
    adjust = {(s.policy, s.action): (s.items / s.reviewed if s.reviewed else 0.0) for s in strata}
    rows: list[tuple[int, str, str, float, str]] = []  # (id, action, policy, probability, encoder_id) with embedding
    labels: dict[int, dict[str, int]] = {}
    left: Counter[str] = Counter()
    spaces: Counter[str] = Counter()
    n_items = n_reviewed = skipped = 0
    for item in store.items():
        n_items += 1
        if item.verdicts:
            n_reviewed += 1
            if not item.has_embedding:
                left["no embedding"] += 1
            else:
                spaces[item.encoder_id] += 1
            lab, silent = _item_labels(item, cats)
            left["verdict labels nothing"] += silent
            if any(v >= 0 for v in lab.values()):
                labels[item.id] = lab
            elif not silent:
                left["no label"] += 1
        if not item.has_embedding:
            skipped += 1
            continue
        rows.append((item.id, item.action, item.policy, float(item.probability), item.encoder_id))
    if not n_reviewed:
        raise DataError(f"review store {store.location} has no verdicts yet: review some items first "
                        "(safeclip review next STORE)")
    space = encoder_id or (spaces.most_common(1)[0][0] if spaces else None)
    if space is None or not spaces.get(space):
        have = ", ".join(f"{s!r} ({k})" for s, k in spaces.most_common()) or "none"
        raise EncoderMismatchError(
            f"review store {store.location}: no reviewed item has an embedding of {space or 'any encoder'!r} "
            f"(reviewed items with embeddings, by encoder: {have}); pass --encoder-id with one of them")
    other = [r for r in rows if r[4] != space]
    left["other encoder"] = sum(1 for r in other if r[0] in labels)
    for r in other:
        labels.pop(r[0], None)
    skipped += len(other)
    rows = [r for r in rows if r[4] == space]
    ids = np.array([r[0] for r in rows], np.int64)
    emb = _read_embeddings(store, ids)
    bad = ~np.isfinite(emb).all(axis=1) if len(emb) else np.zeros(0, bool)
    if bad.any():  # has_embedding said yes, but the row is not usable: left out like one without
        left["no embedding"] += sum(1 for i in ids[bad] if int(i) in labels)
        skipped += int(bad.sum())
        keep = ~bad
        rows = [r for r, k in zip(rows, keep) if k]
        ids, emb = ids[keep], emb[keep]
    lab_arr = {c: np.full(len(rows), -1, np.int8) for c in cats}
    weights = np.zeros(len(rows))
    for i, (item_id, action, pid, prob, _) in enumerate(rows):
        got = labels.get(item_id)
        if got is None:
            continue
        for c, v in got.items():
            lab_arr[c][i] = v
        weights[i] = adjust.get((pid, action), 1.0) / prob
    return ReviewData(
        source=store.location, policy_name=pol.name, encoder_id=space, embeddings=emb, item_ids=ids,
        actions=tuple(r[1] for r in rows), policies=tuple(r[2] for r in rows),
        labels=MappingProxyType(lab_arr), weights=weights,
        stream_weights=np.array([1.0 / r[3] for r in rows]), strata=strata, n_items=n_items, n_reviewed=n_reviewed,
        left_out=MappingProxyType({k: v for k, v in left.items() if v}), skipped=skipped)


def _read_embeddings(store: ReviewStore, ids: np.ndarray) -> np.ndarray:
    parts = [np.asarray(store.embeddings([int(i) for i in ids[a:a + _PAGE]]), np.float32)
             for a in range(0, ids.size, _PAGE)]
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


# ================================================================================================= results
@dataclass(frozen=True, eq=False)
class CategoryReview:
    """One category's refit: ``old_flag`` / ``old_block`` and the chosen ``thresholds`` (``new_flag`` /
    ``new_block``); per kind (``flag``, ``block``) the weighted precision / recall with lower bounds at the old
    thresholds on the old probabilities (``old_rates``) and at the new ones on the refitted calibrator's
    (``new_rates``), ``None`` where there is no threshold; ``flips`` / ``flips_weighted``: the store's decisions
    whose action for this category would change (count, and the stream's decisions they stand for); ``n_reviewed``
    / ``n_positive``: labelled review rows and positives among them; ``n_data``: rows of old labelled data;
    ``n_eff``: Kish's effective number of all labelled rows."""

    category: str
    old_flag: float | None
    old_block: float | None
    thresholds: Thresholds
    calibrator: Calibrator
    old_rates: Mapping[str, ThresholdRates | None]
    new_rates: Mapping[str, ThresholdRates | None]
    flips: int
    flips_weighted: float
    n_reviewed: int
    n_positive: int
    n_data: int
    n_eff: float
    warnings: tuple[str, ...] = ()

    @property
    def new_flag(self) -> float | None:
        return self.thresholds.flag

    @property
    def new_block(self) -> float | None:
        return self.thresholds.block

    @property
    def disabled(self) -> bool:
        """True when the new thresholds would never fire."""
        return self.new_flag is None and self.new_block is None

    def to_dict(self) -> dict[str, Any]:
        def rates(m: Mapping[str, ThresholdRates | None]) -> dict[str, Any]:
            return {k: None if r is None else r.to_dict() for k, r in m.items()}

        return jsonable({
            "old": {"flag": self.old_flag, "block": self.old_block}, "new": {"flag": self.new_flag,
                                                                            "block": self.new_block},
            "thresholds": self.thresholds.to_dict(), "old_rates": rates(self.old_rates),
            "new_rates": rates(self.new_rates), "flips": self.flips, "flips_weighted": self.flips_weighted,
            "n_reviewed": self.n_reviewed, "n_positive": self.n_positive, "n_data": self.n_data,
            "n_eff": self.n_eff, "inputs": list(self.calibrator.inputs), "warnings": list(self.warnings)})

    def format(self) -> str:
        extra = f" + {self.n_data} old labelled rows" if self.n_data else ""
        lines = [f"{self.category}: {self.n_reviewed} reviewed ({self.n_positive} positive){extra}, Kish effective n "
                 f"{self.n_eff:.1f}; sigmoid calibrator on {'+'.join(self.calibrator.inputs)}",
                 f"  {'':<10}{'threshold':>10}  {'precision (>= bound)':<22}{'recall (>= bound)':<22}acts on"]
        for kind in ("flag", "block"):
            for when, t, r in (("old", self.old_flag if kind == "flag" else self.old_block, self.old_rates[kind]),
                               ("new", self.new_flag if kind == "flag" else self.new_block, self.new_rates[kind])):
                head = f"  {when + ' ' + kind:<10}"
                if t is None or r is None:
                    lines.append(f"{head}{'none':>10}  never fires")
                else:
                    lines.append(f"{head}{t:>10.4g}  {_rate(r.precision, r.precision_bound):<22}"
                                 f"{_rate(r.recall, r.recall_bound):<22}{r.positive_rate:.1%}")
        lines.append(f"  would change: {self.flips} stored decisions for {self.category} (about "
                     f"{self.flips_weighted:,.0f} decisions of the stream)")
        if self.disabled:
            lines.append("  REFUSED unless allowed: no threshold meets the targets; the category would never fire")
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _rate(v: float, bound: float) -> str:
    return "n/a" if not np.isfinite(v) else f"{v:.3f} (>= {bound:.3f})"


@dataclass(frozen=True, eq=False)
class ReviewCalibration:
    """What :func:`calibrate_from_review` found, before anything is written: per refitted category a
    :class:`CategoryReview`; ``skipped``: categories left as they are, with why; ``flips`` / ``flips_weighted``:
    the store's decisions whose overall action would change (``transitions``: per ``"old->new"`` the count and the
    weighted estimate); ``policy`` the input policy, ``new_policy`` the new version in memory (its new calibrators
    in ``calibrators``), ``version`` its version string. :meth:`format` is the report, :meth:`write` writes it."""

    policy: Policy
    new_policy: Policy
    version: str
    review: ReviewData
    categories: Mapping[str, CategoryReview]
    skipped: Mapping[str, str]
    flips: int
    flips_weighted: float
    transitions: Mapping[str, tuple[int, float]]
    targets: Mapping[str, Any]
    calibrators: Mapping[str, Calibrator]
    n_data: int = 0
    _texts: Callable[[list[str]], np.ndarray] | None = field(default=None, repr=False)
    _check: tuple[np.ndarray, Mapping[str, tuple[np.ndarray, np.ndarray]]] | None = field(default=None, repr=False)

    @property
    def policy_id(self) -> str:
        return f"{self.new_policy.name}@{self.version}"

    @property
    def disabled(self) -> tuple[str, ...]:
        return tuple(c for c, r in self.categories.items() if r.disabled)

    def to_dict(self) -> dict[str, Any]:
        rd = self.review
        return jsonable({
            "kind": "safeclip.review_calibration", "policy": self.policy.id, "new_policy": self.policy_id,
            "store": rd.source, "encoder_id": rd.encoder_id, "items": rd.n_items, "reviewed": rd.n_reviewed,
            "left_out": dict(rd.left_out), "skipped_items": rd.skipped, "targets": dict(self.targets),
            "categories": {c: r.to_dict() for c, r in self.categories.items()}, "skipped": dict(self.skipped),
            "flips": self.flips, "flips_weighted": self.flips_weighted,
            "transitions": {k: list(v) for k, v in self.transitions.items()}})

    def format(self) -> str:
        """The report ``safeclip calibrate --from-review`` prints before it writes anything."""
        rd, t = self.review, self.targets
        left = ", ".join(f"{k} {v}" for k, v in rd.left_out.items())
        goal = (f"block precision >= {t['block_precision']}, flag recall >= {t['flag_recall']} at "
                f"{t['confidence']:.0%} confidence")
        lines = [
            f"{self.policy.id} -> {self.policy_id}: store {rd.source}, encoder {rd.encoder_id}",
            f"{rd.n_reviewed} reviewed of {rd.n_items} items" + (f"; left out: {left}" if left else "")
            + (f"; {rd.skipped} items cannot be re-decided (no embedding / another encoder)" if rd.skipped else ""),
            f"targets: {goal}; estimates weighted by 1 / (sampling probability x reviewed share of the stratum)"
            + (f"; with {self.n_data} old labelled rows (weight 1)" if self.n_data else ""),
        ]
        lines += [r.format() for r in self.categories.values()]
        lines += [f"{c}: unchanged ({why})" for c, why in self.skipped.items()]
        est = float(rd.stream_weights.sum())
        moves = ", ".join(f"{k} {n} (~{w:,.0f})" for k, (n, w) in self.transitions.items()) or "none"
        lines.append(f"overall: {self.flips} of {len(rd)} stored decisions would change action (about "
                     f"{self.flips_weighted:,.0f} of the {est:,.0f} decisions of the stream): {moves}")
        return "\n".join(lines)

    def write(self, target: str | os.PathLike[str], *, allow_disabled: bool = False, author: str | None = None,
              reason: str | None = None) -> Path:
        """Write the new version: ``target`` is a folder (``target/policy.yaml``) or the policy file to replace (in
        place). The calibrators go to ``calibrators/<C>.<sha8>.json`` beside it; artifacts the policy names outside
        that folder are copied in under content-addressed names. The new policy is reloaded and checked to reproduce
        the refitted probabilities before it replaces anything, then recorded in the policy history. Returns the
        policy file's path.

        A category whose new thresholds would never fire is refused (:class:`~safeclip.errors.DataError`, nothing
        written) unless ``allow_disabled``."""
        if self.disabled and not allow_disabled:
            raise DataError(f"the new thresholds would turn moderation off for {', '.join(self.disabled)} (no "
                            "threshold meets the targets on these verdicts); review more items, lower the targets, or "
                            "pass --allow-disabled; nothing was written")
        target = Path(target)
        in_place = target.suffix in (".yaml", ".yml") and not target.is_dir()
        path = target if in_place else target / "policy.yaml"
        out_dir = path.parent
        if target.exists() and not in_place and not target.is_dir():
            raise ConfigError(f"--out {target} is a file; give a folder or a policy .yaml file")
        doc = _policy_doc(self, out_dir)
        doc["version"] = unused_version(self.version, path)  # the target's history may hold other versions
        import yaml

        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        rd, t = self.review, self.targets
        header = (f"# Written by `safeclip calibrate --from-review` (safeclip.calibration.calibrate_from_review) on "
                  f"{now}\n# from {rd.n_reviewed} reviewed items of {rd.source}, encoder {rd.encoder_id}; parent "
                  f"{self.policy.id}.\n# Thresholds target block precision >= {t['block_precision']}, flag recall >= "
                  f"{t['flag_recall']} at {t['confidence']:.0%} confidence,\n# estimated with verdicts weighted by "
                  "their inverse sampling probability; a null threshold never fires.\n")
        if in_place and path.exists():  # the version being replaced stays restorable (a no-op when recorded)
            record(path, reason=f"before {self.policy_id}", author=author)
        # Checked before it replaces anything: a new version that does not reproduce the refit is never in place.
        draft = out_dir / f".{path.stem}.{os.getpid()}.draft.yaml"
        write_bytes_atomic(draft, (header + yaml.safe_dump(doc, sort_keys=False, width=110)).encode())
        try:
            self._verify(draft)
            os.replace(draft, path)
        finally:
            draft.unlink(missing_ok=True)
        record(path, reason=reason or f"safeclip calibrate --from-review {rd.source}: " + ", ".join(self.categories),
               author=author)
        return path

    def _verify(self, path: Path) -> None:
        """The written policy, reloaded, gives the refitted probabilities back."""
        if self._texts is None or self._check is None:
            return
        x, probs = self._check
        comp = CompiledPolicy.build(load_policy(path), self._texts, self.review.encoder_id)
        got = comp.decide(x, record=False).probabilities
        for cat, (rows, p) in probs.items():
            j = comp.scorer.categories.index(cat)
            off = np.abs(got[rows, j].astype(np.float64) - p) > _VERIFY_TOLERANCE
            if off.mean() > 0.01:
                raise SafeclipError(f"internal check failed: {path} gives {cat!r} probabilities that differ from the "
                                    f"refitted calibrator's on {off.mean():.1%} of the reviewed rows")


def next_version(version: str) -> str:
    """``1.0`` -> ``1.0+rev1``, ``1.0+rev1`` -> ``1.0+rev2``.

    >>> next_version("1.0"), next_version("1.0+cal.ab12cd34+rev9")
    ('1.0+rev1', '1.0+cal.ab12cd34+rev10')
    """
    m = _REV.fullmatch(version)
    return f"{m['base']}+rev{int(m['n']) + 1}" if m else f"{version}+rev1"


def unused_version(version: str, policy_path: str | os.PathLike[str]) -> str:
    """``version``, or the first ``+rev<N>`` after it that the policy file's history has not recorded: after a
    rollback to ``1.0``, the next refit is not ``1.0+rev1`` again (a policy id names one set of decisions)."""
    try:
        taken = {v.version for v in history(policy_path)}
    except SafeclipError:
        taken = set()
    while version in taken:
        version = next_version(version)
    return version


def _content_name(folder: str, stem: str, data: bytes, suffix: str) -> tuple[str, str]:
    sha = sha256_bytes(data)
    return f"{folder}/{stem}.{sha[:8]}{suffix}", sha


def _policy_doc(result: ReviewCalibration, out_dir: Path) -> dict[str, Any]:
    """The new version as a policy document for ``out_dir``: the old policy written out in full (every artifact
    inside ``out_dir``, copied in under a content-addressed name when it lay elsewhere), with the refitted
    categories' thresholds and calibrators (written here)."""
    pol = result.policy
    doc = pol.to_dict(relative_to=out_dir)
    doc["version"] = result.version
    doc["description"] = (f"{pol.id} recalibrated from review verdicts ({result.review.source}): "
                          + ", ".join(result.categories))
    base = out_dir.resolve()
    for c in pol.categories:  # checked before anything is copied
        for b in c.banks:
            if not b.path.resolve().is_relative_to(base):
                raise ConfigError(f"{pol.id}: the bank {b.path} of {c.name!r} lies outside {out_dir}: write the "
                                  "new version beside the policy (in place), or copy the bank into the folder")
    for c in pol.categories:
        entry = doc["categories"][c.name]
        for key in ("probe", "head", "calibrator"):
            ref = getattr(c, key)
            if ref is None or ref.path is None or ref.path.resolve().is_relative_to(base):
                continue
            rel = f"{key}s/{c.name}.{ref.sha256[:8]}{ref.path.suffix}"  # content-addressed by its (checked) pin
            copy_pinned(ref.path, ref.sha256, out_dir / rel)
            entry[key] = {"path": rel, "sha256": ref.sha256}
    for cat, r in result.categories.items():
        data = json_bytes(result.calibrators[cat].to_dict())
        rel, sha = _content_name("calibrators", cat, data, ".json")
        write_bytes_atomic(out_dir / rel, data)
        entry = doc["categories"][cat]
        entry["thresholds"] = {"flag": r.new_flag, "block": r.new_block}
        entry["calibrator"] = {"path": rel, "sha256": sha}
    return doc


# ================================================================================================ the refit
def _open(store_or_data: ReviewStore | ReviewData | str | os.PathLike[str], policy: Policy,
          encoder_id: str | None) -> ReviewData:
    if isinstance(store_or_data, ReviewData):
        if store_or_data.policy_name != policy.name:
            raise ReviewError(f"the review data is of policy {store_or_data.policy_name!r}, not {policy.name!r}")
        return store_or_data
    if isinstance(store_or_data, ReviewStore):
        return review_data(store_or_data, policy, encoder_id=encoder_id)
    with open_store(store_or_data, create=False) as store:
        return review_data(store, policy, encoder_id=encoder_id)


def _signals(comp: CompiledPolicy, x: np.ndarray, cat: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """The category's runtime signals of ``x`` (prompt, and its probe and head when the policy has them)."""
    j = comp.scorer.categories.index(cat)
    s = comp.scorer.score(x, record=False)
    cols, inputs = [s.prompt[:, j]], ["prompt"]
    for name, arr, have in (("probe", s.probe, comp.scorer.probes), ("head", s.head, comp.scorer.heads)):
        if cat in have:
            cols.append(arr[:, j])
            inputs.append(name)
    return np.column_stack(cols).astype(np.float32), tuple(inputs)


def calibrate_from_review(
    policy: PolicyLike,
    store_or_data: ReviewStore | ReviewData | str | os.PathLike[str],
    *,
    data: LabeledData | None = None,
    block_precision: float | None = 0.95,
    flag_recall: float | None = 0.9,
    confidence: float = 0.95,
    categories: Sequence[str] | None = None,
    embed_texts: Callable[[list[str]], np.ndarray] | None = None,
    encoder_id: str | None = None,
) -> ReviewCalibration:
    """Refit ``policy``'s calibrators and thresholds from a review store's verdicts (see the module doc); nothing
    is written (:meth:`ReviewCalibration.write` does).

    ``store_or_data``: a :class:`~safeclip.review.ReviewStore`, its location, or :func:`review_data`'s result;
    ``data``: old labelled data in the same space, each row weighing 1; ``categories``: those to refit (default:
    every category the verdicts label with both classes); ``embed_texts``: prompt embeddings of the space (default:
    ``data``'s, else the prompt cache).

    >>> result = calibrate_from_review("policy.yaml", "review.db", flag_recall=0.9)   # doctest: +SKIP
    >>> print(result.format()); result.write("policy.yaml")                         # doctest: +SKIP
    """
    pol = load_policy(policy)
    for label, v in (("block_precision", block_precision), ("flag_recall", flag_recall)):
        if v is not None and not 0.0 < float(v) < 1.0:
            raise ConfigError(f"{label} must be in (0, 1) or None, got {v!r}")
    if not 0.0 < float(confidence) < 1.0:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence!r}")
    if block_precision is None and flag_recall is None:
        raise ConfigError("calibrate: --block-precision and --flag-recall are both 'none': nothing to choose")
    rd = _open(store_or_data, pol, encoder_id)
    if data is not None and data.encoder_id != rd.encoder_id:
        raise EncoderMismatchError(f"--data is in embedding space {data.encoder_id!r}, the review store's verdicts "
                                   f"in {rd.encoder_id!r}: give labelled data of the same encoder")
    texts = embed_texts or (data.embed_texts if data is not None else None) or prompt_source(rd.encoder_id,
                                                                                             policy=pol)
    comp = CompiledPolicy.build(pol, texts, rd.encoder_id)
    if len(rd) and rd.embeddings.shape[1] != comp.scorer.dim:
        raise EncoderMismatchError(f"the review store's embeddings are {rd.embeddings.shape[1]}-d, but encoder "
                                   f"{rd.encoder_id!r} makes {comp.scorer.dim}-d ones")

    # The labelled rows: the review's, then the old data's (weight 1).
    lab = np.flatnonzero(rd.labelled)
    x = rd.embeddings[lab]
    w = rd.weights[lab]
    ys = {c: rd.labels[c][lab] for c in pol.category_names}
    n_review = lab.size
    if data is not None:
        x = np.concatenate([x, np.asarray(data.embeddings, np.float32)])
        w = np.concatenate([w, np.ones(len(data))])
        for c in pol.category_names:
            extra = data.labels.get(c, np.full(len(data), -1, np.int8))
            ys[c] = np.concatenate([ys[c], extra])
    cats, skipped = _choose_categories(pol, ys, categories)
    old = comp.decide(x, record=False).probabilities if len(x) else np.zeros((0, len(pol.categories)), np.float32)

    fits: dict[str, CategoryReview] = {}
    cals: dict[str, Calibrator] = {}
    check: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    targets = {"block_precision": block_precision, "flag_recall": flag_recall, "confidence": float(confidence)}
    for cat in cats:
        j = pol.category_names.index(cat)
        rows = np.flatnonzero(ys[cat] >= 0)
        y, wc = ys[cat][rows].astype(np.int8), w[rows]
        sig, inputs = _signals(comp, x[rows], cat)
        meta = {"category": cat, "policy": pol.id, "review": {"store": rd.source, "rows": int((rows < n_review).sum())},
                "old_data_rows": int((rows >= n_review).sum()), "targets": targets}
        try:
            cal = fit_calibrator(sig, y, method="sigmoid", inputs=inputs, sample_weight=wc,
                                 encoder_id=rd.encoder_id, metadata=meta)
        except (ValueError, SafeclipError) as e:
            raise DataError(f"{cat}: cannot fit the calibrator on the verdicts: {e}") from e
        p_new = np.asarray(cal.predict_proba(sig), np.float32).astype(np.float64)
        notes: list[str] = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ThresholdWarning)
            th = choose_thresholds(p_new, y, block_precision=block_precision, flag_recall=flag_recall,
                                   confidence=confidence, sample_weight=wc)
        for wm in caught:
            if issubclass(wm.category, ThresholdWarning):
                notes.append(str(wm.message))
                warnings.warn(f"{cat}: {wm.message}", ThresholdWarning, stacklevel=2)
        category = pol.category(cat)
        p_old = np.asarray(old[rows, j], np.float64)

        def at(p: np.ndarray, t: float | None) -> ThresholdRates | None:
            return None if t is None else rates_at(p, y, t, sample_weight=wc, confidence=confidence)

        fits[cat] = CategoryReview(
            category=cat, old_flag=category.flag, old_block=category.block, thresholds=th, calibrator=cal,
            old_rates=MappingProxyType({"flag": at(p_old, category.flag), "block": at(p_old, category.block)}),
            new_rates=MappingProxyType({"flag": at(p_new, th.flag), "block": at(p_new, th.block)}),
            flips=0, flips_weighted=0.0, n_reviewed=int((rows < n_review).sum()),
            n_positive=int(y[rows < n_review].sum()), n_data=int((rows >= n_review).sum()), n_eff=effective_n(wc),
            warnings=tuple(notes))
        cals[cat] = cal
        check[cat] = (rows, p_new)

    new_pol = pol
    for cat, r in fits.items():
        new_pol = new_pol.with_thresholds(cat, flag=r.new_flag, block=r.new_block)
    version = next_version(pol.version)
    if pol.source is not None:
        version = unused_version(version, pol.source)
    new_pol = dataclasses.replace(new_pol, version=version)
    new_comp = dataclasses.replace(comp, policy=new_pol, calibrators=PolicyCalibrators(
        {**comp.calibrators, **cals}, heads=head_categories(pol)))
    fits, (n_flips, w_flips), transitions = _flips(comp, new_comp, rd, fits)
    return ReviewCalibration(
        policy=pol, new_policy=new_pol, version=new_pol.version, review=rd, categories=MappingProxyType(fits),
        skipped=MappingProxyType(skipped), flips=n_flips, flips_weighted=w_flips,
        transitions=MappingProxyType(transitions), targets=MappingProxyType(targets),
        calibrators=MappingProxyType(cals), n_data=0 if data is None else len(data), _texts=texts,
        _check=(x, MappingProxyType(check)))


def _choose_categories(pol: Policy, ys: Mapping[str, np.ndarray], asked: Sequence[str] | None,
                       ) -> tuple[list[str], dict[str, str]]:
    def why_not(c: str) -> str | None:
        y = ys[c]
        pos, neg = int((y == 1).sum()), int((y == 0).sum())
        return None if pos and neg else f"{pos} positive and {neg} negative labelled rows; need both"

    if asked:
        cats = [pol.category(c).name for c in dict.fromkeys(asked)]
        bad = [f"{c}: {why}" for c in cats if (why := why_not(c)) is not None]
        if bad:
            raise DataError("cannot refit from these verdicts: " + "; ".join(bad))
        return cats, {}
    cats = [c for c in pol.category_names if why_not(c) is None]
    skipped = {c: why for c in pol.category_names if (why := why_not(c)) is not None}
    if not cats:
        raise DataError("no category has both positive and negative verdicts yet: review more items")
    return cats, skipped


def _flips(old: CompiledPolicy, new: CompiledPolicy, rd: ReviewData, fits: dict[str, CategoryReview],
           ) -> tuple[dict[str, CategoryReview], tuple[int, float], dict[str, tuple[int, float]]]:
    """Re-decide every stored item under both policies: per category and overall, the decisions that change."""
    if not len(rd):
        return fits, (0, 0.0), {}
    sw = rd.stream_weights
    a, b = old.decide(rd.embeddings, record=False), new.decide(rd.embeddings, record=False)
    out = {}
    for cat, r in fits.items():
        j = old.scorer.categories.index(cat)
        moved = a.codes[:, j] != b.codes[:, j] if a.codes is not None and b.codes is not None else np.zeros(0, bool)
        out[cat] = dataclasses.replace(r, flips=int(moved.sum()), flips_weighted=float(sw[moved].sum()))
    changed = a.actions != b.actions
    transitions: dict[str, tuple[int, float]] = {}
    for i in np.flatnonzero(changed):
        key = f"{ACTIONS[int(a.actions[i])]}->{ACTIONS[int(b.actions[i])]}"
        n, wsum = transitions.get(key, (0, 0.0))
        transitions[key] = (n + 1, wsum + float(sw[i]))
    return out, (int(changed.sum()), float(sw[changed].sum())), dict(sorted(transitions.items()))
