"""What every ``safeclip`` subcommand shares: the model, policy and device options, argument types, and the runner
that turns a :class:`~safeclip.errors.SafeclipError` into one line on stderr and an exit code.

Exit codes: 0 success; 1 some input could not be read or decoded (``check``), or ``--fail-on`` fired (``audit``,
``rescore``); 2 usage or configuration errors (bad arguments, invalid policy, weights that cannot be loaded);
130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import SafeclipError

if TYPE_CHECKING:  # pragma: no cover
    from ..embed import EncoderSpec

__all__ = ["DECODERS", "EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "add_decoder_arg",
           "add_model_args", "add_policy_arg", "positive_int", "run", "run_standalone"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_policy_arg(p: argparse.ArgumentParser, *, required: bool = False, multiple: bool = False) -> None:
    """``--policy``; ``multiple``: repeatable, ``args.policy`` is then a list (or None)."""
    p.add_argument("--policy", required=required, action="append" if multiple else "store",
                   help="shipped policy name or YAML path" + ("; repeat it to load several, the first is the default"
                                                              if multiple else "")
                        + ("" if required else " (default: $SAFECLIP_POLICY or default)"))


DECODERS = ("auto", "pil", "vips")
"""``--decoder`` choices: :data:`safeclip.decode.BACKENDS`, spelled out so that building the parser imports no PIL."""


def add_decoder_arg(p: argparse.ArgumentParser) -> None:
    """``--decoder``: the decode backend (``DecodeOptions.backend``)."""
    p.add_argument("--decoder", choices=DECODERS, default="auto",
                   help="image decoder: auto (libvips where pyvips is installed, else Pillow; default), pil, or "
                        'vips (needs `pip install "safeclip[vips]"`)')


def add_model_args(p: argparse.ArgumentParser, *, fallback: bool = False, batch_size: bool = True) -> None:
    """``--model``, ``--pretrained``, ``--device`` (and ``--batch-size``, ``--runtime``, ``--precision``,
    ``--threads``).

    ``fallback``: the model only serves prompts missing from the cache (``rescore``, ``eval``), so the help says so.
    """
    if fallback:
        p.add_argument("--model", help="the encoder that made the embeddings (open_clip architecture, "
                                       "local-dir:/path or hf-hub:org/repo): loaded only if a prompt of the policy "
                                       "has no cached embedding")
        p.add_argument("--pretrained", help="its pretrained tag or local checkpoint path (see --model)")
    else:
        p.add_argument("--model", help="open_clip architecture, local-dir:/path or hf-hub:org/repo "
                                       "(default: the policy's encoder, else $SAFECLIP_MODEL or ViT-B-32)")
        p.add_argument("--pretrained", help="pretrained tag or local checkpoint path "
                                            "(default: the policy's encoder, else $SAFECLIP_PRETRAINED or "
                                            "laion2b_s34b_b79k)")
    p.add_argument("--device", help="cuda, mps, cpu or auto (default)")
    if batch_size and not fallback:
        p.add_argument("--batch-size", type=positive_int, help="images per model forward")
    if not fallback:
        p.add_argument("--runtime", choices=("auto", "torch", "onnx"),
                       help="what runs the image tower: auto (default, or $SAFECLIP_RUNTIME) is ONNX Runtime on a "
                            "CPU and torch on a GPU")
        p.add_argument("--precision", choices=("auto", "fp32", "fp16", "bf16", "int8"), default="auto",
                       help="auto (default): fp32 on a CPU, fp16 on a GPU; int8 is ONNX Runtime dynamic int8, an "
                            "embedding space of its own (see `safeclip runtime verify`)")
        p.add_argument("--threads", type=positive_int,
                       help="threads of one model forward (default: $SAFECLIP_THREADS, else every core)")


def encoder_spec(args: argparse.Namespace) -> EncoderSpec:
    """The :class:`~safeclip.embed.EncoderSpec` of :func:`add_model_args`' options (and ``--cache`` where the command
    has one): built once, here, for every command that loads a model."""
    from ..embed import EncoderSpec

    return EncoderSpec(model=args.model, pretrained=args.pretrained, device=args.device,
                       runtime=getattr(args, "runtime", None), precision=getattr(args, "precision", "auto"),
                       threads=getattr(args, "threads", None), batch_size=getattr(args, "batch_size", None),
                       cache_dir=getattr(args, "cache", None))


def number_arg(cast: Callable[[str], float], lo: float, hi: float, what: str, *, open_low: bool = False
               ) -> Callable[[str], Any]:
    """An argparse ``type`` for a number in ``[lo, hi]`` (``(lo, hi]`` with ``open_low``): ``what`` names it in the
    one-line error (``expected a port number in 0..65535, got 70000``)."""

    def parse(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (lo < value if open_low else lo <= value) or not value <= hi or not math.isfinite(value):
            where = "" if hi == math.inf else f" {'above' if open_low else 'from'} {lo:g} to {hi:g}"
            raise argparse.ArgumentTypeError(f"expected {what}{where}, got {text}")
        return value

    return parse


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` with ``parser`` and run the chosen subcommand; errors become one line and exit code 2."""
    args = parser.parse_args(argv)
    try:
        code = int(args.func(args))
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # The reader went away (`safeclip diff a b | head`): what it read was right; stop quietly. Point stdout at
        # devnull so that the interpreter's own flush at exit does not raise again.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except SafeclipError as e:
        msg = str(getattr(e, "cli_message", None) or e).replace("\n", "\n  ")
        print(f"safeclip: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("safeclip: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def run_standalone(register: Callable[[Any], None], description: str, argv: Sequence[str] | None = None) -> int:
    """Run one command family on its own (``python -m safeclip.cli.audit ...``)."""
    parser = argparse.ArgumentParser(prog="safeclip", description=description)
    register(parser.add_subparsers(dest="command", required=True))
    return run(parser, argv)
