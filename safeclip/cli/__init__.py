"""The ``safeclip`` command line: one module per command family, each a thin layer over the Python API.

A handler parses its arguments, calls the library and prints; everything a command does is reachable from Python.
``_options`` holds what the commands share (model/policy/device options, exit codes, the error-to-one-line
runner). Nothing in the library imports this package.

=============  ==========================================
module         commands
=============  ==========================================
check          ``safeclip check``, ``explain``
policy         ``safeclip policy lint | show | list``
audit          ``safeclip audit``, ``rescore``, ``diff``
calibration    ``safeclip calibrate``, ``eval``
runtime        ``safeclip runtime verify``
signals        ``safeclip import laion-nsfw | laion-violence``
serve          ``safeclip serve``
bank           ``safeclip bank create | add | remove | disable | enable | confirm | list | match | hash |
               import | export | index``
review         ``safeclip review add | list | next | verdict | stats``
=============  ==========================================
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

from ._options import run

__all__ = ["build_parser", "main"]

# Imported when the parser is built, not with the package: `python -m safeclip.cli.audit` then runs a module that
# is not already half-imported (runpy warns about that).
_FAMILIES = ("check", "policy", "audit", "calibration", "runtime", "serve", "signals", "bank", "review")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safeclip", description="Image content moderation on CLIP embeddings.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _FAMILIES:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``safeclip`` command; returns its exit code.

    >>> main(["policy", "list"])                # doctest: +ELLIPSIS
    default...
    0
    """
    return run(build_parser(), argv)
