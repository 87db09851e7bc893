"""``safeclip calibrate`` and ``safeclip eval``: fit a policy's calibration on labelled data, and measure a policy.

Each handler parses, calls :func:`safeclip.calibration.load_labeled` and then
:func:`~safeclip.calibration.calibrate_policy` / :func:`~safeclip.calibration.evaluate_policy`, and prints. The data
format is documented in :mod:`safeclip.calibration.data`, the split and the output files in
:mod:`safeclip.calibration.workflow`.

:func:`register` adds both to the ``safeclip`` parser (``safeclip.cli``); ``python -m safeclip.cli.calibration``
runs them on their own. Handlers return the exit code (0); configuration and data errors raise
:class:`~safeclip.errors.SafeclipError`, which the runner reports on one line with exit code 2, and usage errors
exit 2 through argparse. The library's warnings (rows left out, unsupported targets) and its progress notes become
one ``safeclip <command>: ...`` line each on stderr, as they happen.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from ..calibration import (
    CalibrationWarning,
    LabeledData,
    calibrate_policy,
    check_calibration_request,
    evaluate_policy,
    load_labeled,
)
from ..policy import Policy, load_policy
from ._options import add_model_args, add_policy_arg, run_standalone

__all__ = ["main", "register"]


# ============================================================================================ argument types
def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0.0 < v < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}")
    return v


def _target(text: str) -> float | None:
    if text.strip().lower() in {"none", "off"}:
        return None
    return _fraction(text)


def _add_data_args(p: argparse.ArgumentParser) -> None:
    add_policy_arg(p)
    p.add_argument("--data", required=True, metavar="LABELED",
                   help="Parquet or CSV file: an 'embedding' or a 'path' column, and labels (see --label-column); "
                        "a 'path' column is embedded with --model through the cache, for an 'embedding' column the "
                        "model is loaded only if a prompt has no cached embedding")
    p.add_argument("--category", action="append", metavar="C",
                   help="a policy category to work on (repeatable)")
    p.add_argument("--label-column", default="label", metavar="NAME",
                   help="column with 0/1 labels (one category) or category names / 'none' (default: label); a "
                        "column named after a category takes precedence for that category")
    p.add_argument("--encoder-id", help="the embedding space of an 'embedding' column (default: its encoder_id "
                                        "column, else the encoder of --model/--pretrained)")
    p.add_argument("--cache", metavar="DIR", help="cache folder for embeddings and prompt embeddings "
                                                  "(default: $SAFECLIP_CACHE_DIR or ~/.cache/safeclip)")
    add_model_args(p, batch_size=False)
    p.add_argument("--confidence", type=_fraction, default=0.95,
                   help="confidence of the precision/recall lower bounds (default 0.95)")


def register(subparsers: Any) -> None:
    """Add ``calibrate`` and ``eval`` to an argparse ``add_subparsers()`` object."""
    p = subparsers.add_parser(
        "calibrate", help="fit probes, calibrators and thresholds on labelled data; write a calibrated policy",
        description="For each --category: score the labelled images under --policy, optionally train a linear "
                    "probe, fit a calibrator, choose flag/block thresholds for the targets on held-out rows, and "
                    "write the artifacts, reports and DIR/policy.yaml (which extends --policy). See `pydoc "
                    "safeclip.calibration.data` for the data format and `pydoc safeclip.calibration.workflow` for "
                    "the split and the files.")
    _add_data_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (policy.yaml, artifacts, reports)")
    p.add_argument("--block-precision", type=_target, default=0.95, metavar="P",
                   help="block threshold: precision >= P on new data at --confidence (default 0.95; 'none': "
                        "never block)")
    p.add_argument("--flag-recall", type=_target, default=0.9, metavar="R",
                   help="flag threshold: recall >= R on new data at --confidence (default 0.9; 'none': never flag)")
    p.add_argument("--method", choices=("auto", "sigmoid", "isotonic"), default="auto",
                   help="calibrator: Platt scaling, isotonic, or auto (isotonic from 1000 rows with 100 of each "
                        "class; default)")
    p.add_argument("--probe", action=argparse.BooleanOptionalAction, default=True,
                   help="train a linear probe and calibrate the prompt and probe signals together (default: on)")
    p.add_argument("--holdout", type=_fraction, default=0.3,
                   help="share of each category's rows held out for thresholds and the report (default 0.3)")
    p.add_argument("--head", action=argparse.BooleanOptionalAction, default=True,
                   help="stack a category's head (e.g. LAION's NSFW head) with its other signals in the calibrator "
                        "(default: on, for categories that have one)")
    p.add_argument("--probe-fraction", type=_fraction, default=0.5,
                   help="with --probe, share of the other rows that trains the probe; the rest fits the "
                        "calibrator (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and the probe's CV folds (default 0)")
    p.add_argument("--name", help="name of the written policy (default: the input policy's)")
    p.add_argument("--allow-disabled", action="store_true",
                   help="write the policy even when a category ends with no threshold (it would never fire)")
    p.set_defaults(func=_cmd_calibrate)

    p = subparsers.add_parser(
        "eval", help="measure a policy's probabilities and thresholds on labelled data",
        description="Per category: ROC AUC, PR AUC, ECE, Brier, and precision/recall/rates at the policy's flag "
                    "and block thresholds, on the policy's probabilities (calibrated where it has a calibrator, "
                    "the uncalibrated fallback otherwise). Use data the calibration never saw.")
    _add_data_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--reports", metavar="DIR", help="also write DIR/<category>/report.json and its plots")
    p.set_defaults(func=_cmd_eval)


# ================================================================================================ handlers
@contextlib.contextmanager
def _messages_to_stderr(prog: str) -> Iterator[None]:
    """The library's calibration warnings as ``prog: warning: ...`` and its notes as ``prog: ...`` on stderr."""
    show = warnings.showwarning

    def show_line(message: Any, category: type[Warning], *rest: Any, **kw: Any) -> None:
        if issubclass(category, CalibrationWarning):
            print(f"{prog}: warning: {message}", file=sys.stderr)
        else:
            show(message, category, *rest, **kw)

    log = logging.getLogger("safeclip.calibration")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{prog.replace('%', '%%')}: %(message)s"))
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", CalibrationWarning)
            warnings.showwarning = show_line
            yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def _load(args: argparse.Namespace, policy: Policy, categories: Sequence[str] | None) -> LabeledData:
    return load_labeled(args.data, policy, categories, label_column=args.label_column, encoder_id=args.encoder_id,
                        model=args.model, pretrained=args.pretrained, device=args.device, cache=args.cache)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    with _messages_to_stderr("safeclip calibrate"):
        parent, cats, out = check_calibration_request(args.policy, args.category, args.out, args.block_precision,
                                                      args.flag_recall)
        result = calibrate_policy(
            parent, _load(args, parent, cats), cats, out=out, block_precision=args.block_precision,
            flag_recall=args.flag_recall, confidence=args.confidence, probe=args.probe, head=args.head,
            method=args.method,
            holdout=args.holdout, probe_fraction=args.probe_fraction, seed=args.seed, name=args.name,
            allow_disabled=args.allow_disabled)
    print(result.format())
    print(f"wrote {result.policy_path} ({result.policy_id}); use it with --policy {result.policy_path}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    with _messages_to_stderr("safeclip eval"):
        policy = load_policy(args.policy)
        result = evaluate_policy(policy, _load(args, policy, args.category), confidence=args.confidence,
                                 reports=args.reports)
    print(json.dumps(result.to_dict()) if args.json else result.format())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``calibrate``/``eval`` on their own (as ``safeclip.cli.main`` does once it registers them)."""
    return run_standalone(register, "Calibrate and evaluate moderation policies.", argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
