"""``safeclip runtime verify IMAGES...``: what the int8 runtime changes on your images, against fp32."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from ._options import EXIT_FAILED, EXIT_OK, add_policy_arg, positive_int, run_standalone

__all__ = ["register", "main"]


def register(subparsers: Any) -> None:
    rt = subparsers.add_parser("runtime", help="inspect the model runtimes").add_subparsers(
        dest="runtime_cmd", required=True)
    p = rt.add_parser("verify", help="compare int8 with fp32 on your images: embedding cosines and decisions")
    p.add_argument("images", nargs="+", help="image files (your own: the figures are only as good as they are)")
    add_policy_arg(p)
    p.add_argument("--model", help="open_clip architecture, local-dir:/path or hf-hub:org/repo "
                                   "(default: the policy's encoder, else $SAFECLIP_MODEL or ViT-B-32)")
    p.add_argument("--pretrained", help="pretrained tag or local checkpoint path")
    p.add_argument("--threads", type=positive_int, help="threads of one model forward (default: every core)")
    p.add_argument("--json", action="store_true", help="one JSON object with every figure")
    p.set_defaults(func=_cmd_verify)


def _cmd_verify(args: argparse.Namespace) -> int:
    from ..embed import Encoder, resolve_encoder_args, verify_int8
    from ..moderator import Moderator
    from ..policy import load_policy

    policy = load_policy(args.policy)
    model, pretrained, _ = resolve_encoder_args(args.model, args.pretrained, policy.encoder)
    fp32 = Encoder(model, pretrained, precision="fp32", runtime="onnx", device="cpu", threads=args.threads)
    judge = Moderator(policy, encoder=fp32)
    report = verify_int8(args.images, fp32, decide=judge.decide, decode_limits=judge.decode_limits,
                         fast_decode=judge.fast_decode)
    for source, error in report.failed:
        print(f"error: {error}", file=sys.stderr)
    if args.json:
        print(json.dumps(report.to_dict()))
        return EXIT_FAILED if report.failed else EXIT_OK
    q = report.cosine_quantiles()
    print(f"int8 ({report.int8_encoder_id}) against fp32 ({report.fp32_encoder_id})")
    print(f"on {report.n_images} of your images, policy {report.policy}:")
    print(f"  embedding cosine   min {q['min']:.5f}  p1 {q['p01']:.5f}  p5 {q['p05']:.5f}  "
          f"median {q['median']:.5f}  mean {q['mean']:.5f}")
    print(f"  same action        {report.same_action:.1%} of images ({len(report.changed)} changed)")
    where = f" ({report.max_change_at[1]} on {report.max_change_at[0]})" if report.max_change_at else ""
    print(f"  largest probability change  {report.max_probability_change:.4f}{where}")
    for source, a, b in report.changed[:20]:
        print(f"    {source}: {a} -> {b}")
    if len(report.changed) > 20:
        print(f"    ... and {len(report.changed) - 20} more (--json lists them all)")
    print("These figures compare int8 with fp32 on these images and weights; they say nothing of either's accuracy.")
    return EXIT_FAILED if report.failed else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    return run_standalone(register, "Inspect the model runtimes.", argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
