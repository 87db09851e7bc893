"""``safeclip policy lint | show | list``: validate and inspect policies."""

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


def _cmd_lint(args: argparse.Namespace) -> int:
    from ..compiled import lint_policy

    for f in args.files:
        p = lint_policy(f, allow_outside=args.allow_outside, encoder_id=args.encoder_id)
        n_art = sum((c.probe is not None) + (c.head is not None) + (c.calibrator is not None) for c in p.categories)
        print(f"{f}: ok ({p.id}, {len(p.categories)} categories, {n_art} artifacts checked)")
    return EXIT_OK


def _cmd_show(args: argparse.Namespace) -> int:
    from ..policy import load_policy

    p = load_policy(args.name)
    out: dict[str, Any] = {
        "name": p.name, "version": p.version, "description": p.description, "source": p.source,
        "encoder": dict(p.encoder), "logit_scale": p.logit_scale, "neutral": list(p.neutral),
        "categories": {
            c.name: {
                "description": c.description, "prompts": list(c.prompts), "contrast": list(c.contrast),
                "templates": list(c.templates), "thresholds": {"flag": c.flag, "block": c.block},
                "probe": str(c.probe) if c.probe else None,
                "head": str(c.head) if c.head else None,
                "calibrator": str(c.calibrator) if c.calibrator else None,
            }
            for c in p.categories
        },
    }
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        import yaml

        print(yaml.safe_dump(out, sort_keys=False, width=110), end="")
    return EXIT_OK


def _cmd_list(args: argparse.Namespace) -> int:
    from ..policy import list_policies, load_policy

    for name in list_policies():
        p = load_policy(name)
        print(f"{name}\t{p.id}\t{p.description}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    return run_standalone(register, "Validate and inspect policies.", argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
