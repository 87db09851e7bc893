"""``safeclip audit``, ``safeclip rescore`` and ``safeclip diff``: the batch subcommands.

:func:`register` adds them to the ``safeclip`` parser (:mod:`safeclip.cli`). Each handler returns the exit code:
0 done (per-file failures are rows, not failures), 1 when ``--fail-on`` fired; configuration errors (no inputs,
an unreadable manifest or policy, options that do not go together: the library checks them) raise
:class:`~safeclip.errors.SafeclipError`, which the CLI's ``main`` reports with exit code 2, and usage errors exit 2
through argparse. ``python -m safeclip.cli.audit ...`` runs them on their own.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from ..audit import FAIL_LEVELS
from ..audit.plan import ENGINES
from ._options import (
    EXIT_USAGE,
    add_decoder_arg,
    add_model_args,
    add_policy_arg,
    encoder_spec,
    positive_int,
    run_standalone,
)

__all__ = ["register", "main"]


def _add_overwrite(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace an existing safeclip output of other {what} at --out (never an input or a file "
                        "that is not a safeclip output)")


def register(subparsers: Any) -> None:
    """Add ``audit``, ``rescore`` and ``diff`` to an argparse ``add_subparsers()`` object."""
    p = subparsers.add_parser(
        "audit", help="moderate many files into a Parquet table (resumable, cached)",
        description="Moderate files, folders (walked recursively for image files) and manifests into one Parquet "
                    "row per input. Re-running the same command after an interruption resumes it; the embedding "
                    "cache makes re-runs skip the model for every file seen before.")
    p.add_argument("paths", nargs="*", help="image files and folders")
    p.add_argument("--manifest", action="append", default=[], metavar="FILE",
                   help="a text file with one path per line, or a CSV/Parquet file with a 'path' column "
                        "(repeatable)")
    p.add_argument("--out", required=True, metavar="OUT.parquet", help="output Parquet file")
    p.add_argument("--all-files", action="store_true",
                   help="make every regular file in the folders a row (default: image files, found by extension "
                        "or by content; the summary says how many files were skipped and why)")
    add_policy_arg(p)
    p.add_argument("--cache", metavar="DIR", help="cache folder for embeddings (default: $SAFECLIP_CACHE_DIR or "
                                                  "~/.cache/safeclip)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the embedding cache")
    p.add_argument("--workers", type=positive_int, help="decode processes (default: one per core)")
    add_decoder_arg(p)
    add_model_args(p)
    p.add_argument("--fail-on", choices=FAIL_LEVELS,
                   help="exit 1 if any row reaches this level (flag < block < error: a file that could not be "
                        "decided counts as worse than a block)")
    p.add_argument("--save-embeddings", action="store_true",
                   help="also write each row's embeddings (for `safeclip rescore --embeddings`)")
    p.add_argument("--part-rows", type=positive_int, default=2048,
                   help="rows per committed part file (default 2048); an interrupted run re-scores at most "
                        "this many rows again, their embeddings already cached")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--engine", choices=ENGINES, default="local",
                   help="local: decode processes and the model on this machine (default); ray: the same steps on "
                        "Ray Data, decode tasks on CPUs and the model in an actor pool on GPUs "
                        "(pip install 'safeclip[ray]'); --part-rows is then the shard size")
    _add_overwrite(p, "inputs")
    p.add_argument("--address", metavar="ADDR",
                   help="with --engine ray: the Ray cluster to run on ('auto', host:port or ray://host:10001; "
                        "default: $RAY_ADDRESS, else a local Ray runtime)")
    p.set_defaults(func=_cmd_audit)

    p = subparsers.add_parser(
        "rescore", help="re-decide cached embeddings under a policy, without the model",
        description="Score cached embeddings under a (new) policy: the rows of a previous audit (--from), the "
                    "embeddings saved in an audit output (--embeddings), or every image in the cache.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--from", dest="from_audit", metavar="AUDIT.parquet",
                     help="re-decide the rows of this audit output (embeddings from the cache)")
    src.add_argument("--embeddings", metavar="AUDIT.parquet",
                     help="re-decide an audit output written with --save-embeddings (no cache needed)")
    p.add_argument("--cache", metavar="DIR", help="cache folder (default: $SAFECLIP_CACHE_DIR or ~/.cache/safeclip)")
    p.add_argument("--encoder-id", help="which embedding space to re-score (default: the source's, or the only one "
                                        "in the cache)")
    add_policy_arg(p)
    p.add_argument("--out", required=True, metavar="OUT.parquet", help="output Parquet file")
    add_model_args(p, fallback=True)
    p.add_argument("--fail-on", choices=FAIL_LEVELS, help="exit 1 if any row reaches this level")
    _add_overwrite(p, "rows")
    p.set_defaults(func=_cmd_rescore)

    p = subparsers.add_parser(
        "diff", help="list the inputs whose action differs between two audit outputs",
        description="Compare two audit/rescore outputs: one line per input whose action changed, with the "
                    "category whose probability moved most. Always exits 0.")
    p.add_argument("a", metavar="A.parquet")
    p.add_argument("b", metavar="B.parquet")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=_cmd_diff)


def _cmd_audit(args: argparse.Namespace) -> int:
    import os

    for path in args.paths:  # a typo is a usage error, before the model loads (a manifest's entries are rows)
        if not os.path.lexists(path):
            print(f"safeclip audit: error: {path}: no such file or folder", file=sys.stderr)
            return EXIT_USAGE
    try:
        summary = _run_audit(args)
    except KeyboardInterrupt:
        print("safeclip audit: interrupted; the rows committed so far are kept: run the same command again to resume",
              file=sys.stderr)
        raise
    return 1 if summary.fails(args.fail_on) else 0


def _run_audit(args: argparse.Namespace) -> Any:
    from ..audit import EngineOptions, OutputOptions, audit
    from ..embed import DecodeOptions

    return audit(
        args.paths, manifests=args.manifest, policy=args.policy, encoder=encoder_spec(args),
        decoding=DecodeOptions(workers=args.workers, backend=args.decoder),
        output=OutputOptions(args.out, overwrite=args.overwrite, save_embeddings=args.save_embeddings,
                             part_rows=args.part_rows),
        engine=EngineOptions(name=args.engine, address=args.address), include_all=args.all_files,
        use_cache=not args.no_cache, progress=False if args.no_progress else None, verbose=True,
    )


def _cmd_rescore(args: argparse.Namespace) -> int:
    from ..audit import rescore

    summary = rescore(
        out=args.out, policy=args.policy, cache=args.cache, from_audit=args.from_audit, embeddings=args.embeddings,
        encoder_id=args.encoder_id, model=args.model, pretrained=args.pretrained, device=args.device, verbose=True,
        overwrite=args.overwrite,
    )
    return 1 if summary.fails(args.fail_on) else 0


def _cmd_diff(args: argparse.Namespace) -> int:
    import json

    from ..audit import diff

    table = diff(args.a, args.b)
    key = (table.schema.metadata or {}).get(b"safeclip.key", b"path").decode()
    rows = table.to_pylist()
    if not args.json:
        print(f"{key}\taction_a\taction_b\tbiggest_change")
    for r in rows:
        if args.json:
            print(json.dumps(r))
            continue
        print(f"{r['key']}\t{r['action_a']}\t{r['action_b']}\t{r['change'] or '-'}")
    meta = table.schema.metadata or {}
    shared = int(meta.get(b"safeclip.shared", b"-1"))
    if shared == 0:
        print(f"safeclip diff: {args.a} and {args.b} share no inputs (matched by path, resolved against the folder "
              "each audit ran in, and by sha256): every row reads as missing", file=sys.stderr)
    elif key == "sha256" and shared > 0:
        print(f"safeclip diff: {shared} input(s) matched by content (sha256)", file=sys.stderr)
    print(f"safeclip diff: {len(rows)} input(s) changed action", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``audit``/``rescore``/``diff`` on their own (as ``safeclip.cli.main`` does once it registers them)."""
    return run_standalone(register, "Batch audits of image collections.", argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
