"""``safeclip import laion-nsfw | laion-violence``: published signals as pinned safeclip heads."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from ._options import EXIT_OK, run_standalone

__all__ = ["register", "main"]


def register(subparsers: Any) -> None:
    imp = subparsers.add_parser("import", help="import a published signal (LAION's NSFW heads, violence vectors)")
    kinds = imp.add_subparsers(dest="signal", required=True)
    for signal, what in (("laion-nsfw", "LAION's NSFW head (its probability is punsafe)"),
                         ("laion-violence", "the violence vectors clip-retrieval uses")):
        p = kinds.add_parser(signal, help=what, description=f"Import {what} as a safeclip head artifact and write "
                             "a policy snippet that pins it and a complete policy around it (the default policy "
                             "with the head, LAION's thresholds, the OpenAI weights as its encoder).")
        p.add_argument("--model", required=True, choices=("ViT-B-32", "ViT-L-14"),
                       help="the OpenAI CLIP architecture the head was trained on")
        p.add_argument("--from", dest="source", metavar="FILE",
                       help="the published file (checked against its sha256); default: fetch it from its pinned "
                            "public location, or $SAFECLIP_ARTIFACTS_DIR offline")
        p.add_argument("--out", required=True, metavar="DIR", help="folder for the artifact, the snippet and the policy")
        p.add_argument("--retarget-encoder-id", metavar="ENCODER_ID",
                       help="record the head in this embedding space instead of OpenAI's: for testing mechanics "
                            "behind other weights only (the artifact says it is retargeted; its output there is "
                            "no moderation result)")
        p.set_defaults(func=_cmd_import)


def _cmd_import(args: argparse.Namespace) -> int:
    from ..importers import import_signal

    done = import_signal(args.signal, args.model, args.out, source=args.source,
                         encoder_id=args.retarget_encoder_id)
    print(f"wrote {done.path} (sha256 {done.sha256}), embedding space {done.encoder_id}")
    print(f"wrote {done.snippet}: paste it under `categories:` of a policy in {done.path.parent}")
    if done.policy is not None:
        print(f"wrote {done.policy}: a complete policy; run it with `safeclip check IMAGE --policy {done.policy}`")
    if done.retargeted:
        print("warning: retargeted head: its output in this space is no moderation result (no policy written: no "
              "encoder: names the weights of that space; paste the snippet)", file=sys.stderr)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    return run_standalone(register, "Import published signals as safeclip heads.", argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
