"""``safeclip check FILES...``: moderate image files, one result per input, in input order."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from ._options import EXIT_FAILED, EXIT_OK, EXIT_USAGE, add_model_args, add_policy_arg, encoder_spec, run_standalone

__all__ = ["register", "main"]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("check", help="moderate image files, one result per input in input order")
    p.add_argument("files", nargs="+", help="image files")
    add_policy_arg(p)
    add_model_args(p)
    p.add_argument("--json", action="store_true", help="one JSON object per line: {path, decision|error}")
    p.set_defaults(func=_cmd_check)


def _cmd_check(args: argparse.Namespace) -> int:
    folder = next((f for f in args.files if os.path.isdir(f)), None)
    if folder is not None:  # before the model loads: a folder is an audit's input
        shown = shlex.quote(folder) if folder.isprintable() else repr(folder)
        print(f"safeclip: error: {shown} is a folder: `safeclip check` takes image files; to moderate a folder run "
              f"`safeclip audit {shown} --out results.parquet`", file=sys.stderr)
        return EXIT_USAGE
    from ..moderator import Moderator

    moderator = Moderator(policy=args.policy, encoder=encoder_spec(args), on_error="flag")
    failed = 0
    for path, decision in zip(args.files, moderator.check_many(args.files)):
        if decision.error is not None:
            failed += 1
            if args.json:
                print(json.dumps({"path": path, "error": decision.error}), flush=True)
            else:
                print(f"error: {decision.error}", file=sys.stderr, flush=True)
            continue
        if args.json:
            print(json.dumps({"path": path, "decision": decision.to_dict()}), flush=True)
        else:
            why = "; ".join(decision.reasons)
            print(f"{path}\t{decision.action}" + (f"\t{why}" if why else ""), flush=True)
    return EXIT_FAILED if failed else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    return run_standalone(register, "Moderate image files.", argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
