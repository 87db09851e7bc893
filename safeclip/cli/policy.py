"""``safeclip policy lint | show | list | history | record | rollback``: validate and inspect policies, and list and
restore their recorded versions (:mod:`safeclip.versions`)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from ._options import EXIT_OK, run_standalone

__all__ = ["register", "main"]


def register(subparsers: Any) -> None:
    pol = subparsers.add_parser("policy", help="inspect and validate policies").add_subparsers(
        dest="policy_cmd", required=True)
    p = pol.add_parser("lint", help="validate policy files, reporting every problem")
    p.add_argument("files", nargs="+")
    p.add_argument("--allow-outside", action="store_true",
                   help="allow artifact and extends paths outside the policy folder")
    p.add_argument("--encoder-id", help="also check that every artifact belongs to this embedding space")
    p.set_defaults(func=_cmd_lint)
    p = pol.add_parser("show", help="print a policy with its inheritance resolved")
    p.add_argument("name", help="shipped policy name or YAML path")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_show)
    p = pol.add_parser("list", help="list the shipped policies")
    p.set_defaults(func=_cmd_list)
    p = pol.add_parser("history", help="list the recorded versions of a policy file, oldest first")
    p.add_argument("policy", help="policy YAML path")
    p.add_argument("--json", action="store_true", help="one JSON object per version and line")
    p.set_defaults(func=_cmd_history)
    p = pol.add_parser("record", help="record the current state of a policy file (and its artifacts) as a version")
    p.add_argument("policy", help="policy YAML path")
    p.add_argument("--reason", required=True, help="why it changed (one line)")
    p.add_argument("--author", help="who changed it (default: $USER)")
    p.set_defaults(func=_cmd_record)
    p = pol.add_parser("rollback", help="restore a recorded version of a policy file byte for byte")
    p.add_argument("policy", help="policy YAML path")
    p.add_argument("version", help="a version string (1.0+rev2) or a number from `policy history` (#3)")
    p.add_argument("--author", help="who rolled back (default: $USER)")
    p.set_defaults(func=_cmd_rollback)


def _cmd_lint(args: argparse.Namespace) -> int:
    from ..compiled import lint_policy

    for f in args.files:
        p = lint_policy(f, allow_outside=args.allow_outside, encoder_id=args.encoder_id)
        n_art = sum((c.probe is not None) + (c.head is not None) + (c.calibrator is not None) for c in p.categories)
        n_banks = sum(len(c.banks) for c in p.categories)
        print(f"{f}: ok ({p.id}, {len(p.categories)} categories, {n_art} artifacts and {n_banks} banks checked)")
    return EXIT_OK


def _cmd_show(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..policy import load_policy

    p = load_policy(args.name)
    # A policy document load_policy reads back to the same policy; artifact paths relative to the policy's folder.
    folder = Path(p.source).parent if p.source else None
    doc = p.to_dict(relative_to=folder)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        import yaml

        # json.dumps quotes the path with every control character escaped: nothing raw reaches the terminal.
        print(f"# {json.dumps(p.source)} with extends resolved; artifact paths are relative to its folder")
        print(yaml.safe_dump(doc, sort_keys=False, width=110), end="")
    return EXIT_OK


def _cmd_list(args: argparse.Namespace) -> int:
    from ..policy import list_policies, load_policy

    for name in list_policies():
        p = load_policy(name)
        print(f"{name}\t{p.id}\t{p.description}")
    return EXIT_OK


def _cmd_history(args: argparse.Namespace) -> int:
    from ..versions import history

    versions = history(args.policy)
    if not versions:
        print(f"{args.policy}: no versions recorded; `safeclip policy record {args.policy} --reason TEXT` records "
              "one", file=sys.stderr)
    for v in versions:
        if args.json:
            print(json.dumps(v.to_dict(), sort_keys=True))
        else:
            when = v.created_at.replace("T", " ").removesuffix("Z") + " UTC"
            print(f"{v.label}\t{v.version}\t{when}\t{v.author}\t{v.reason}")
    return EXIT_OK


def _cmd_record(args: argparse.Namespace) -> int:
    from ..versions import history, record

    before = history(args.policy)
    v = record(args.policy, reason=args.reason, author=args.author)
    if before and before[-1] == v:
        print(f"{args.policy}: unchanged since {v.label} ({v.version}); nothing recorded")
    else:
        print(f"{args.policy}: recorded {v.label} ({v.policy_id}, {len(v.files)} file{'s' * (len(v.files) != 1)})")
    return EXIT_OK


def _cmd_rollback(args: argparse.Namespace) -> int:
    from ..versions import rollback

    print(rollback(args.policy, args.version, author=args.author).format())
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    return run_standalone(register, "Validate and inspect policies.", argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
