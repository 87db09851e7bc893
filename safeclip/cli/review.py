"""``safeclip review add | list | next | skip | verdict | stats``: the review queue on the command line.

STORE is a SQLite file (created on first use) or a ``postgresql://`` URL (the ``review-pg`` extra). Items come from
a Moderator or ``safeclip serve --review`` (the policy's sample of live decisions), from an audit's output
(``review add STORE --from audit.parquet``) or from a spool file a server kept while its store was down
(``--from-spool``). ``review next`` claims the oldest item no one has judged (``review skip`` passes it on to the
back of the queue), ``review verdict`` records a judgement (a second reviewer's is kept beside the first);
``--to-bank BANK`` with ``allow`` also adds the item's embedding to an allow bank, so that the same false positive is
allowed from then on (the bank records who and which item).
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from ..errors import BankError, ConfigError, ReviewError
from ..review import ACTIONS, ReviewItem, ReviewStore, open_store
from ._options import EXIT_FAILED, EXIT_OK, add_policy_arg, positive_int, run_standalone

__all__ = ["main", "register"]


def _store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", metavar="STORE", help="review store: a SQLite file or a postgresql:// URL")


def _reviewer_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reviewer", metavar="NAME",
                   help="who is judging (default: $SAFECLIP_REVIEWER, else the login name)")


def register(subparsers: Any) -> None:
    rev = subparsers.add_parser("review", help="the review queue: add decisions, list them, record verdicts"
                                ).add_subparsers(dest="review_cmd", required=True)
    p = rev.add_parser("add", help="add an audit's decisions (or a spool file's items) to a review store")
    _store_arg(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from", dest="from_audit", metavar="AUDIT", help="an audit output (Parquet)")
    src.add_argument("--from-spool", metavar="FILE", help="a spool file a Moderator kept while the store was down")
    add_policy_arg(p)
    p.add_argument("--action", action="append", choices=ACTIONS,
                   help="take every row of this action (repeatable); default: sample every action at the policy's "
                        "review rates")
    p.add_argument("--cache", metavar="DIR", help="embedding cache of the audit (default: $SAFECLIP_CACHE_DIR or "
                                                   "~/.cache/safeclip)")
    p.add_argument("--no-thumbnails", action="store_true", help="do not decode the files for thumbnails")
    p.set_defaults(func=_cmd_add)

    p = rev.add_parser("list", help="list items, one per line (--json: one JSON object per line)")
    _store_arg(p)
    state = p.add_mutually_exclusive_group()
    state.add_argument("--pending", action="store_true", help="only items without a verdict")
    state.add_argument("--reviewed", action="store_true", help="only items with a verdict")
    p.add_argument("--action", choices=ACTIONS, help="only items the policy decided so")
    p.add_argument("--limit", type=positive_int, metavar="N")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_list)

    p = rev.add_parser("next", help="claim the next item to judge and print it")
    _store_arg(p)
    _reviewer_arg(p)
    p.add_argument("--thumbnail", metavar="FILE", help="also write its thumbnail (JPEG) here")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_next)

    p = rev.add_parser("skip", help="pass on an item you hold: it goes to the back of the queue")
    _store_arg(p)
    p.add_argument("id", type=positive_int, metavar="ID")
    _reviewer_arg(p)
    p.set_defaults(func=_cmd_skip)

    p = rev.add_parser("verdict", help="record a verdict on an item")
    _store_arg(p)
    p.add_argument("id", type=positive_int, metavar="ID")
    p.add_argument("verdict", choices=ACTIONS)
    p.add_argument("--category", metavar="C", help="the category the verdict is about")
    p.add_argument("--note", metavar="TEXT")
    _reviewer_arg(p)
    p.add_argument("--to-bank", metavar="BANK",
                   help="with allow: also add the item's embedding to this allow bank (an embedding bank of the "
                        "item's encoder)")
    p.set_defaults(func=_cmd_verdict)

    p = rev.add_parser("stats", help="items and verdicts per policy version and decided action")
    _store_arg(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_stats)


def _reviewer(args: argparse.Namespace) -> str:
    name = args.reviewer or os.environ.get("SAFECLIP_REVIEWER")
    if not name:
        try:
            name = getpass.getuser()
        except (KeyError, OSError) as e:
            raise ConfigError("name the reviewer with --reviewer NAME (or $SAFECLIP_REVIEWER)") from e
    return name


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))


def _line(item: ReviewItem) -> str:
    reasons = "; ".join(item.decision.get("reasons") or []) or "-"
    verdicts = ", ".join(f"{v.action}{'/' + v.category if v.category else ''} by {v.reviewer}"
                         for v in item.verdicts) or "pending"
    return (f"{item.id}\t{item.action}\tp={item.probability:g}\t{json.dumps(item.source)}\t{reasons}\t"
            f"[{verdicts}]")


def _describe(item: ReviewItem) -> str:
    lines = [(f"item {item.id}: {item.action} under {item.policy} ({item.origin}, sampled with probability "
             f"{item.probability:g}, {_when(item.created_at)} UTC)"),
             f"  source: {json.dumps(item.source)}  sha256: {item.sha256}"]
    for name, c in (item.decision.get("categories") or {}).items():
        lines.append(f"  {name}: {c.get('action')}, p={c.get('probability')} (flag at {c.get('flag_threshold')}, "
                     f"block at {c.get('block_threshold')})")
    for r in item.decision.get("reasons") or []:
        lines.append(f"  reason: {r}")
    for v in item.verdicts:
        lines.append(f"  verdict: {v.action}{' ' + v.category if v.category else ''} by {v.reviewer} at "
                     f"{_when(v.created_at)} UTC{': ' + v.note if v.note else ''}")
    return "\n".join(lines)


def _cmd_add(args: argparse.Namespace) -> int:
    from ..policy import load_policy

    if args.from_spool is not None:
        from ..review import replay_spool

        # The store binds itself to the first item's policy and refuses items of another (ReviewStore.add).
        with open_store(args.store) as store:
            n = replay_spool(store, args.from_spool)
        print(f"{n} spooled item(s) written to {store.location}; {args.from_spool} is now empty")
        return EXIT_OK
    from ..audit.to_review import add_audit_to_review

    policy = load_policy(args.policy)
    with open_store(args.store, policy=policy.name) as store:
        done = add_audit_to_review(store, args.from_audit, policy, actions=args.action, cache=args.cache,
                                   thumbnails=not args.no_thumbnails)
    print(f"{store.location}: {done.format()}")
    return EXIT_OK


def _cmd_list(args: argparse.Namespace) -> int:
    reviewed = True if args.reviewed else False if args.pending else None
    with open_store(args.store, create=False) as store:
        for item in store.items(reviewed=reviewed, action=args.action, limit=args.limit):
            print(json.dumps(item.to_dict()) if args.json else _line(item))
    return EXIT_OK


def _cmd_next(args: argparse.Namespace) -> int:
    with open_store(args.store, create=False) as store:
        item = store.next(_reviewer(args))
        if item is None:
            print("the queue is empty: every item has a verdict", file=sys.stderr)
            return EXIT_OK
        if args.thumbnail:
            thumb = store.thumbnail(item.id)
            if thumb is None:
                print(f"item {item.id} has no thumbnail", file=sys.stderr)
            else:
                with open(args.thumbnail, "wb") as f:
                    f.write(thumb)
    print(json.dumps(item.to_dict()) if args.json else _describe(item))
    return EXIT_OK


def _cmd_skip(args: argparse.Namespace) -> int:
    reviewer = _reviewer(args)
    with open_store(args.store, create=False) as store:
        if store.skip(args.id, reviewer):
            print(f"item {args.id} skipped: it is at the back of the queue")
            return EXIT_OK
    print(f"item {args.id} was not skipped: {reviewer} does not hold it (it has a verdict, or another reviewer "
          f"claimed it once {reviewer}'s lease ran out); `safeclip review next` claims one", file=sys.stderr)
    return EXIT_FAILED


def _cmd_verdict(args: argparse.Namespace) -> int:
    if args.to_bank and args.verdict != "allow":
        raise ConfigError("--to-bank adds a known false positive to an allow bank: use it with the verdict allow")
    with open_store(args.store, create=False) as store:
        if args.to_bank:
            _check_bank_target(store, args.id, args.to_bank)
        v = store.verdict(args.id, args.verdict, reviewer=_reviewer(args), category=args.category, note=args.note)
        print(f"item {v.item_id}: {v.action}{' ' + v.category if v.category else ''} by {v.reviewer} at "
              f"{_when(v.created_at)} UTC (verdict {v.id})")
        if args.to_bank:
            entry = _add_to_allow_bank(store, args.id, args.to_bank, v.reviewer, args.note)
            print(f"added entry {entry!r} to allow bank {args.to_bank}")
    return EXIT_OK


def _check_bank_target(store: ReviewStore, item_id: int, bank_path: str) -> None:
    """Refuse before the verdict is written when the bank cannot take the item's embedding."""
    from ..banks import Bank

    item = store.get(item_id)
    if not item.has_embedding:
        raise ReviewError(f"item {item_id} has no embedding (it was not scored): it cannot go into an allow bank")
    with Bank.open(bank_path) as bank:
        if bank.kind != "embedding":
            raise BankError(f"{bank_path} is a {bank.kind} bank: review items carry CLIP embeddings; give an "
                            "embedding bank")
        if bank.encoder_id != item.encoder_id:
            raise BankError(f"{bank_path} holds embeddings of {bank.encoder_id!r}, the item is of "
                            f"{item.encoder_id!r}")


def _add_to_allow_bank(store: ReviewStore, item_id: int, bank_path: str, reviewer: str, note: str | None) -> str:
    from ..banks import Bank, NewEntry

    item = store.get(item_id)
    emb = store.embeddings([item_id])
    entry = f"review-{item.sha256[:16]}"
    label = f"allowed by {reviewer} (review item {item_id})" + (f": {note}" if note else "")
    with Bank.open(bank_path, writable=True) as bank:
        if bank.entry(entry) is not None:
            return entry
        bank.add(emb, [NewEntry(id=entry, label=label, source=f"review:{store.location}#{item_id}",
                                sha256=item.sha256)])
    return entry


def _cmd_stats(args: argparse.Namespace) -> int:
    with open_store(args.store, create=False) as store:
        strata = store.strata()
    if args.json:
        print(json.dumps([{"policy": s.policy, "action": s.action, "items": s.items, "reviewed": s.reviewed}
                          for s in strata]))
        return EXIT_OK
    for s in strata:
        print(f"{s.policy}\t{s.action}\t{s.items} items\t{s.reviewed} reviewed")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    return run_standalone(register, "The review queue.", argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
