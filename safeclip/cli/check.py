"""``safeclip check FILES...``: moderate image and video files, one result per input, in input order (a video's
segments, runs of frames at or above a category's ``flag``, printed under its line); ``safeclip explain IMAGE``: why
one image got its decision from the policy's banks (the nearest entries of each bank)."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ._options import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    add_decoder_arg,
    add_model_args,
    add_policy_arg,
    encoder_spec,
    positive_int,
    run_standalone,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..decide import Decision

__all__ = ["main", "register", "video_lines"]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("check", help="moderate image and video files, one result per input in input order")
    p.add_argument("files", nargs="+", help="image or video files (a video's segments are printed under its line)")
    add_policy_arg(p)
    add_model_args(p)
    add_decoder_arg(p)
    p.add_argument("--json", action="store_true", help="one JSON object per line: {path, decision|error}")
    p.set_defaults(func=_cmd_check)

    e = subparsers.add_parser("explain", help="why one image got its decision from the policy's banks: the matched "
                                              "entries, else the nearest ones")
    e.add_argument("image", help="an image file")
    add_policy_arg(e)
    e.add_argument("--category", help="explain this category only (default: every category that names banks)")
    e.add_argument("-k", type=positive_int, default=3, help="nearest entries shown per bank (default 3)")
    add_model_args(e)
    e.add_argument("--json", action="store_true", help="one JSON object: {decision, view, categories}")
    e.set_defaults(func=_cmd_explain)


def _cmd_check(args: argparse.Namespace) -> int:
    folder = next((f for f in args.files if os.path.isdir(f)), None)
    if folder is not None:  # before the model loads: a folder is an audit's input
        shown = shlex.quote(folder) if folder.isprintable() else repr(folder)
        print(f"safeclip: error: {shown} is a folder: `safeclip check` takes image files; to moderate a folder run "
              f"`safeclip audit {shown} --out results.parquet`", file=sys.stderr)
        return EXIT_USAGE
    from ..embed import DecodeOptions
    from ..moderator import Moderator

    moderator = Moderator(policy=args.policy, encoder=encoder_spec(args), on_error="flag",
                          decoding=DecodeOptions(backend=args.decoder))
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
            for line in video_lines(decision):
                print(f"  {line}", flush=True)
    return EXIT_FAILED if failed else EXIT_OK


def video_lines(decision: Decision) -> list[str]:
    """What ``safeclip check`` prints under a video's line: the frames scored, then one line per segment."""
    if decision.sampling is None and not decision.segments and decision.duration_s is None:
        return []
    length = "" if decision.duration_s is None else f" of {decision.duration_s:.2f} s"
    how = f" ({decision.sampling})" if decision.sampling else ""
    early = "; stopped at the first block" if decision.stopped_early else ""
    out = [f"frames: {decision.frames_scored} scored{length}{how}{early}"]
    for s in decision.segments:
        out.append(f"segment {s.start_s:.2f}-{s.end_s:.2f} s\t{s.category}\t{s.action}\tpeak p={s.peak_probability:.3f}"
                   f" at {s.peak_s:.2f} s ({s.frames} frame{'s' if s.frames != 1 else ''})")
    return out


def _cmd_explain(args: argparse.Namespace) -> int:
    if os.path.isdir(args.image):
        print(f"safeclip: error: {args.image!r} is a folder: `safeclip explain` takes one image file",
              file=sys.stderr)
        return EXIT_USAGE
    from ..errors import DecodeError
    from ..moderator import Moderator
    from ..policy import load_policy

    policy = load_policy(args.policy)
    if args.category is not None:
        policy.category(args.category)  # before the model loads: an unknown name is one line
    moderator = Moderator(policy=policy, encoder=encoder_spec(args))
    try:
        explanation = moderator.explain(args.image, category=args.category, k=args.k)
    except DecodeError as err:
        print(f"safeclip: error: {err}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(explanation.to_dict()) if args.json else explanation.text(), flush=True)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    return run_standalone(register, "Moderate image files.", argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
