"""``safeclip calibrate`` and ``safeclip eval``: fit a policy's calibration on labelled data, and measure a policy.

Each handler parses, calls :func:`safeclip.calibration.load_labeled` and then
:func:`~safeclip.calibration.calibrate_policy` / :func:`~safeclip.calibration.evaluate_policy`, and prints. The data
format is documented in :mod:`safeclip.calibration.data`, the split and the output files in
:mod:`safeclip.calibration.workflow`. ``safeclip calibrate --from-review STORE`` learns from a review store's verdicts
instead (:func:`~safeclip.calibration.calibrate_from_review`, :mod:`safeclip.calibration.review`): it prints the
report of what would change, then (without ``--dry-run``) writes the new policy version.

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
from pathlib import Path
from typing import Any

from ..calibration import (
    CalibrationWarning,
    LabeledData,
    calibrate_from_review,
    calibrate_policy,
    check_calibration_request,
    evaluate_policy,
    load_labeled,
    prompt_source,
    review_data,
)
from ..errors import ConfigError
from ..policy import Policy, builtin_policy_dir, load_policy
from ..review import open_store
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


def _add_data_args(p: argparse.ArgumentParser, *, data_required: bool = True) -> None:
    add_policy_arg(p)
    p.add_argument("--data", required=data_required, metavar="LABELED",
                   help="Parquet or CSV file: an 'embedding' or a 'path' column, and labels (see --label-column); "
                        "a 'path' column is embedded with --model through the cache, for an 'embedding' column the "
                        "model is loaded only if a prompt has no cached embedding"
                        + ("" if data_required else "; with --from-review: old labels added to the verdicts "
                                                    "(weight 1 each)"))
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
                    "the split and the files. With --from-review STORE: refit each category's calibrator (sigmoid, on "
                    "its signals as they are) and thresholds from the store's verdicts, weighted by their inverse "
                    "sampling probability; print what would change; then write the new version (`pydoc "
                    "safeclip.calibration.review`).")
    _add_data_args(p, data_required=False)
    p.add_argument("--from-review", metavar="STORE",
                   help="learn from the verdicts of this review store (SQLite path or postgresql:// URL) instead of "
                        "(or, with --data, besides) labelled data; --method, --probe, --holdout, --probe-fraction, "
                        "--seed and --name do not apply")
    p.add_argument("--dry-run", action="store_true",
                   help="with --from-review: print the report of what would change and write nothing")
    p.add_argument("--out", metavar="DIR",
                   help="output folder (policy.yaml, artifacts, reports); required with --data; with "
                        "--from-review the new version goes here, else replaces the --policy file (its previous "
                        "version stays in the policy history)")
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
    if args.from_review:
        return _cmd_from_review(args)
    if not args.data:
        raise ConfigError("calibrate: give --data LABELED (labelled data) or --from-review STORE (review verdicts)")
    if not args.out:
        raise ConfigError("calibrate --data: give --out DIR for the calibrated policy, artifacts and reports")
    if args.dry_run:
        raise ConfigError("calibrate: --dry-run applies to --from-review only")
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


def _review_target(args: argparse.Namespace, policy: Policy) -> str | None:
    """Where the new version goes: --out, else the --policy file itself (never a shipped policy)."""
    if args.out:
        return str(args.out)
    src = policy.source
    if not src or Path(src).resolve().parent == builtin_policy_dir().resolve():
        if args.dry_run:
            return None
        raise ConfigError(f"calibrate --from-review: --policy {args.policy} is a shipped policy; give --out DIR for "
                          "the new version")
    return src


def _cmd_from_review(args: argparse.Namespace) -> int:
    with _messages_to_stderr("safeclip calibrate"):
        policy = load_policy(args.policy)
        target = _review_target(args, policy)
        with open_store(args.from_review, create=False) as store:
            reviewed = review_data(store, policy, encoder_id=args.encoder_id)
        old = _load(args, policy, args.category) if args.data else None
        texts = (old.embed_texts if old is not None else None) or prompt_source(
            reviewed.encoder_id, cache=args.cache, model=args.model, pretrained=args.pretrained, device=args.device,
            policy=policy)
        result = calibrate_from_review(
            policy, reviewed, data=old, block_precision=args.block_precision, flag_recall=args.flag_recall,
            confidence=args.confidence, categories=args.category, embed_texts=texts)
    print(result.format(), flush=True)
    if args.dry_run or target is None:
        print("dry run: nothing written")
        return 0
    path = result.write(target, allow_disabled=args.allow_disabled)
    print(f"wrote {path} ({load_policy(path).id}), recorded in its history; use it with --policy {path}")
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
