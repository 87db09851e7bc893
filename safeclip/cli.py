"""The ``safeclip`` command line.

Exit codes: 0 success; 1 some input could not be read or decoded (``check``), or ``--fail-on`` fired (``audit``);
2 usage or configuration errors (bad arguments, invalid policy, weights that cannot be loaded).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from .errors import SafeclipError

__all__ = ["main"]


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="open_clip architecture (default: $SAFECLIP_MODEL or ViT-B-32), "
                                   "or local-dir:/path, or hf-hub:org/repo")
    p.add_argument("--pretrained", help="pretrained tag or local checkpoint path "
                                        "(default: $SAFECLIP_PRETRAINED or laion2b_s34b_b79k)")
    p.add_argument("--device", help="cuda, mps, cpu or auto (default)")
    p.add_argument("--batch-size", type=int, help="images per model forward")


def _add_policy_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", help="shipped policy name or YAML path (default: $SAFECLIP_POLICY or default)")


def _cmd_check(args: argparse.Namespace) -> int:
    from .moderator import Moderator

    moderator = Moderator(policy=args.policy, model=args.model, pretrained=args.pretrained, device=args.device,
                          batch_size=args.batch_size, on_error="flag")
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
    return 1 if failed else 0


def _cmd_policy_lint(args: argparse.Namespace) -> int:
    from .policy import load_policy

    for f in args.files:
        p = load_policy(f, allow_outside=args.allow_outside)
        print(f"{f}: ok ({p.id}, {len(p.categories)} categories)")
    return 0


def _cmd_policy_show(args: argparse.Namespace) -> int:
    from .policy import load_policy

    p = load_policy(args.name)
    out: dict[str, Any] = {
        "name": p.name, "version": p.version, "description": p.description, "source": p.source,
        "encoder": dict(p.encoder), "logit_scale": p.logit_scale, "neutral": list(p.neutral),
        "categories": {
            c.name: {
                "description": c.description, "prompts": list(c.prompts), "contrast": list(c.contrast),
                "templates": list(c.templates), "thresholds": {"flag": c.flag, "block": c.block},
                "probe": str(c.probe.path) if c.probe else None,
                "calibrator": str(c.calibrator.path) if c.calibrator else None,
            }
            for c in p.categories
        },
    }
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        import yaml

        print(yaml.safe_dump(out, sort_keys=False, width=110), end="")
    return 0


def _cmd_policy_list(args: argparse.Namespace) -> int:
    from .policy import list_policies, load_policy

    for name in list_policies():
        p = load_policy(name)
        print(f"{name}\t{p.id}\t{p.description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safeclip", description="Image content moderation on CLIP embeddings.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check", help="moderate image files, one result per input in input order")
    p.add_argument("files", nargs="+", help="image files")
    _add_policy_arg(p)
    _add_model_args(p)
    p.add_argument("--json", action="store_true", help="one JSON object per line: {path, decision|error}")
    p.set_defaults(func=_cmd_check)

    pol = sub.add_parser("policy", help="inspect and validate policies").add_subparsers(dest="policy_cmd",
                                                                                          required=True)
    p = pol.add_parser("lint", help="validate policy files, reporting every problem")
    p.add_argument("files", nargs="+")
    p.add_argument("--allow-outside", action="store_true", help="allow artifact paths outside the policy folder")
    p.set_defaults(func=_cmd_policy_lint)
    p = pol.add_parser("show", help="print a policy with its inheritance resolved")
    p.add_argument("name", help="shipped policy name or YAML path")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_policy_show)
    p = pol.add_parser("list", help="list the shipped policies")
    p.set_defaults(func=_cmd_policy_list)

    for register in _extensions():
        register(sub)
    return parser


def _extensions() -> list[Any]:
    """Subcommands that live beside the stage they drive (audit, calibration)."""
    from . import audit_cli, calibration_cli

    return [audit_cli.register, calibration_cli.register]


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), argv)


def run_standalone(register: Any, description: str, argv: Sequence[str] | None = None) -> int:
    """Run one module's subcommands on their own (``python -m safeclip.audit_cli ...``)."""
    parser = argparse.ArgumentParser(prog="safeclip", description=description)
    register(parser.add_subparsers(dest="command", required=True))
    return run(parser, argv)


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` with ``parser`` and run the chosen subcommand; errors become one line and exit code 2."""
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except SafeclipError as e:
        msg = str(e).replace("\n", "\n  ")
        print(f"safeclip: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("safeclip: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
