"""``safeclip calibrate`` and ``safeclip eval``: fit a policy's calibration on labelled data, and measure a policy.

:func:`register` adds both to the ``safeclip`` parser (``safeclip.cli``); ``python -m safeclip.cli.calibration``
runs them on their own. Handlers return the exit code (0); configuration and data errors raise
:class:`~safeclip.errors.SafeclipError`, which ``main`` reports on one line with exit code 2, and usage errors exit 2
through argparse.

Labelled data (``--data``)
    A Parquet (``.parquet``/``.pq``) or CSV (``.csv``) file, one row per image, with

    - an ``embedding`` column: L2-normalised CLIP image embeddings (Parquet ``list<float>``; CSV a JSON list or
      space-separated floats). A ``safeclip audit --save-embeddings`` output works as is (an animation's row holds
      all its sampled frames; the first is used, as :meth:`~safeclip.moderator.Moderator.embed` does). Their
      embedding space is the ``--encoder-id`` option, else an ``encoder_id`` column (audit outputs have one), else
      the encoder of ``--model``/``--pretrained``. Prompt embeddings come from the prompt cache; the model is
      loaded only when a prompt is missing there, and only if ``--model``/``--pretrained`` name it;
    - or a ``path`` column of image files (relative paths are relative to the data file's folder), embedded with
      ``--model``/``--pretrained`` through the embedding cache (``--cache``), by :func:`safeclip.audit.audit`, so a
      second run, or a run over images an audit has seen, reads the cache instead of running the model. Files that
      cannot be decoded are left out, with a warning. When both columns exist, ``embedding`` is used.

    Labels, for each category ``C``:

    1. a column named ``C`` holding 0/1 (also true/false, yes/no) labels it: one column per category, so a row can
       be positive for several categories; an empty cell means "not labelled for C" and the row is left out of
       C's data;
    2. else the ``--label-column`` (default ``label``): holding 0/1, it labels the one category asked for (asking
       for several is an error); holding names, each row is the name of one policy category or ``none``, and the
       row is positive for ``C`` exactly when it says ``C`` (a single-label scheme: use rule 1 for multi-label
       data). A name that is neither a policy category nor ``none`` is an error (typos would silently become
       negatives).

The split (``calibrate``), per category, over its labelled rows
    Stratified by label and seeded (``--seed``): ``--holdout`` (default 0.3) of the rows are held out; the rest
    are the fit rows. With ``--probe``, ``--probe-fraction`` (default 0.5) of the fit rows train the linear probe
    and the other fit rows fit the calibrator, so the calibrator never sees the probe's logit on the probe's own
    training rows (where it is over-confident); with ``--no-probe`` every fit row fits the calibrator. The
    thresholds are chosen on the held-out rows, which neither the probe nor the calibrator saw, and the report
    (ROC/PR AUC, ECE, Brier, reliability) is computed there too. Identical embeddings (the same image twice)
    always land in the same part.

    The precision/recall printed at each threshold are measured on the held-out rows the threshold was chosen on;
    the promise is their lower confidence bound (``--confidence``, one-sided Clopper-Pearson with fixed-sequence
    testing, see :func:`safeclip.calibration.choose_thresholds`). A target the held-out rows cannot support gives
    no threshold (a warning on stderr): ``block: null`` never blocks, ``flag: null`` never flags.

Row numbers, in messages and in ``split.parquet``, count the data file's rows from 0 (a CSV header is not a row).

Outputs of ``calibrate --out DIR``
    ``DIR/probes/<C>.json`` and ``DIR/calibrators/<C>.json`` (pinned JSON artifacts); ``DIR/reports/<C>/``
    (``report.json``, ``reliability.png``, ``pr_curve.png``, and ``split.parquet``: the data file's row number,
    role and label of every labelled row); ``DIR/calibration.json`` (what was done, per category); and
    ``DIR/policy.yaml``, which ``extends`` the input policy (a shipped name, or a path relative to DIR) and, for
    each calibrated category, sets the new thresholds and the ``probe:``/``calibrator:`` references with their
    sha256 pins (``probe: null`` with ``--no-probe``, dropping an inherited probe its calibrator does not use).
    Before it returns, ``calibrate`` reloads that policy and checks that it reproduces the held-out probabilities
    and marks the categories calibrated. Running again into the same DIR replaces these files.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import json
import math
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..artifacts import write_bytes_atomic
from ..errors import EncoderMismatchError, ModelLoadError, SafeclipError
from ._options import add_policy_arg, run_standalone

if TYPE_CHECKING:  # pragma: no cover
    from ..calibrate import Calibrator
    from ..heads import LinearProbe
    from ..calibration import Report, Thresholds
    from ..embed import Encoder
    from .._compiled import CompiledPolicy
    from ..policy import Policy

__all__ = ["main", "register"]

EMBEDDING_COLUMN = "embedding"
PATH_COLUMN = "path"
ENCODER_COLUMN = "encoder_id"
NONE_LABEL = "none"
_TRUE = {"1", "true", "yes"}
_FALSE = {"0", "false", "no"}
_NORM_TOLERANCE = 1e-2  # |norm - 1| above this: not an L2-normalised embedding
# The reloaded policy must give the fitted probabilities back to within 1e-4 on all but 1% of the held-out rows
# (float32 rounding differs between batch shapes, and a steep isotonic step can magnify it on a rare row); a wiring
# fault (wrong artifact, signal order, missing probe) moves most rows far more.
_VERIFY_TOLERANCE = 1e-4
_VERIFY_MAX_OFF = 0.01
_MAX_PROBE_FOLDS = 5


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
                   help="Parquet or CSV file: an 'embedding' or a 'path' column, and labels (see --label-column)")
    p.add_argument("--category", action="append", metavar="C",
                   help="a policy category to work on (repeatable)")
    p.add_argument("--label-column", default="label", metavar="NAME",
                   help="column with 0/1 labels (one category) or category names / 'none' (default: label); a "
                        "column named after a category takes precedence for that category")
    p.add_argument("--encoder-id", help="the embedding space of an 'embedding' column (default: its encoder_id "
                                        "column, else the encoder of --model/--pretrained)")
    p.add_argument("--cache", metavar="DIR", help="cache folder for embeddings and prompt embeddings "
                                                  "(default: $SAFECLIP_CACHE_DIR or ~/.cache/safeclip)")
    p.add_argument("--model", help="open_clip architecture, local-dir:/path or hf-hub:org/repo: embeds a 'path' "
                                   "column; for an 'embedding' column, loaded only if a prompt has no cached "
                                   "embedding (default for paths: $SAFECLIP_MODEL or ViT-B-32)")
    p.add_argument("--pretrained", help="pretrained tag or local checkpoint path (see --model)")
    p.add_argument("--device", help="cuda, mps, cpu or auto (default)")
    p.add_argument("--confidence", type=_fraction, default=0.95,
                   help="confidence of the precision/recall lower bounds (default 0.95)")


def register(subparsers: Any) -> None:
    """Add ``calibrate`` and ``eval`` to an argparse ``add_subparsers()`` object."""
    p = subparsers.add_parser(
        "calibrate", help="fit probes, calibrators and thresholds on labelled data; write a calibrated policy",
        description="For each --category: score the labelled images under --policy, optionally train a linear "
                    "probe, fit a calibrator, choose flag/block thresholds for the targets on held-out rows, and "
                    "write the artifacts, reports and DIR/policy.yaml (which extends --policy). See `pydoc "
                    "safeclip.cli.calibration` for the data format and the split.")
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
    p.add_argument("--probe-fraction", type=_fraction, default=0.5,
                   help="with --probe, share of the other rows that trains the probe; the rest fits the "
                        "calibrator (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and the probe's CV folds (default 0)")
    p.add_argument("--name", help="name of the written policy (default: the input policy's)")
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


# ================================================================================================ the data
@dataclass
class _Table:
    """A labelled file read into memory: its columns as Python lists (labels, paths) or Arrow (embeddings)."""

    source: Path
    n: int
    names: list[str]
    columns: dict[str, Any]  # Parquet: pyarrow ChunkedArray; CSV: list[str]
    meta_encoder_id: str | None = None
    csv: bool = False

    def values(self, name: str) -> list[Any]:
        col = self.columns[name]
        return list(col) if self.csv else col.to_pylist()


def _read_table(path: str) -> _Table:
    """Read ``--data`` (Parquet, or CSV with every cell a string); an audit output's encoder_id comes along."""
    src = Path(path)
    suffix = src.suffix.lower()
    if not src.is_file():
        raise SafeclipError(f"--data {path}: no such file")
    if suffix in {".parquet", ".pq"}:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(src)
        except (OSError, pa.ArrowException) as e:
            raise SafeclipError(f"cannot read {src} as Parquet: {e}") from e
        meta_id = None
        raw = (table.schema.metadata or {}).get(b"safeclip")
        if raw:
            try:
                meta_id = json.loads(raw).get("encoder_id")
            except (ValueError, AttributeError):
                meta_id = None
        return _Table(src, table.num_rows, list(table.column_names),
                      {n: table.column(n) for n in table.column_names}, meta_id if isinstance(meta_id, str) else None)
    if suffix == ".csv":
        try:
            with open(src, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                names = list(reader.fieldnames or [])
                cols: dict[str, list[str]] = {n: [] for n in names}
                for row in reader:
                    for n in names:
                        v = row.get(n)
                        cols[n].append("" if v is None else v)
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise SafeclipError(f"cannot read {src} as CSV: {e}") from e
        n_rows = len(cols[names[0]]) if names else 0
        return _Table(src, n_rows, names, cols, csv=True)
    raise SafeclipError(f"--data {path}: expected a .parquet or .csv file")


def _frames_to_rows(lengths: np.ndarray, flat: np.ndarray, valid: np.ndarray, where: str) -> np.ndarray:
    """First ``D``-vector of each valid row of a list column (``D`` = the shortest valid row), float64."""
    ok = np.flatnonzero(valid)
    if ok.size == 0:
        return np.empty((0, 0))
    dim = int(lengths[ok].min())
    bad = ok[lengths[ok] % dim != 0] if dim else ok[lengths[ok] == 0]
    if bad.size:
        raise SafeclipError(f"{where}: row {int(bad[0])}: embedding of length {int(lengths[bad[0]])}, other rows "
                            f"have {dim}; every row must hold whole {dim}-d embeddings")
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])[ok]
    return flat[starts[:, None] + np.arange(dim)[None, :]].astype(np.float64)


def _arrow_lists(col: Any, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(lengths, flat values, valid mask)`` of an Arrow list-of-floats column (nulls have length 0)."""
    import pyarrow as pa

    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    t = arr.type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) or not (
            pa.types.is_floating(t.value_type) or pa.types.is_integer(t.value_type)):
        raise SafeclipError(f"{where}: the {EMBEDDING_COLUMN!r} column must be a list of floats, not {t}")
    valid = arr.is_valid().to_numpy(zero_copy_only=False).astype(bool)
    if pa.types.is_fixed_size_list(t):
        lengths = np.where(valid, t.list_size, 0).astype(np.int64)
    else:
        lengths = arr.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = arr.flatten().to_numpy(zero_copy_only=False)  # the values of valid rows, in order
    return lengths, flat, valid


def _normalised(x: np.ndarray, where: str, rows: np.ndarray) -> np.ndarray:
    """``x`` as float32 unit rows; refuses rows that were not unit-norm already (``rows``: their row numbers)."""
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if bad.size:
        raise SafeclipError(f"{where}: row {int(rows[bad[0]])}: the embedding holds NaN or infinity")
    norms = np.linalg.norm(x, axis=1)
    off = np.flatnonzero(np.abs(norms - 1.0) > _NORM_TOLERANCE)
    if off.size:
        raise SafeclipError(
            f"{where}: row {int(rows[off[0]])}: embedding norm {norms[off[0]]:.4g}; {off.size} row(s) are not "
            "L2-normalised CLIP image embeddings (safeclip's embeddings and audit outputs are)")
    return (x / norms[:, None]).astype(np.float32)


def _embedding_matrix(t: _Table) -> tuple[np.ndarray, np.ndarray]:
    """``(k, D)`` float32 embeddings of the rows that have one, and the ``(n,)`` mask of those rows (an audit
    output's error rows, or an empty CSV cell, have none). Multi-frame rows (animations) keep their first frame."""
    where = str(t.source)
    if t.csv:
        rows: list[np.ndarray] = []
        for i, s in enumerate(t.columns[EMBEDDING_COLUMN]):
            text = s.strip()
            if not text:
                rows.append(np.empty(0))
                continue
            try:
                vals = json.loads(text) if text.startswith("[") else [float(v) for v in text.replace(",", " ").split()]
                arr = np.asarray(vals, dtype=np.float64)
            except (ValueError, TypeError) as e:
                raise SafeclipError(f"{where}: row {i}: cannot parse the embedding {text[:40]!r}: {e}") from e
            if arr.ndim != 1 or arr.size == 0:
                raise SafeclipError(f"{where}: row {i}: the embedding must be a non-empty list of numbers")
            rows.append(arr)
        lengths = np.array([r.size for r in rows], np.int64)
        flat = np.concatenate(rows)
        valid = lengths > 0
    else:
        lengths, flat, valid = _arrow_lists(t.columns[EMBEDDING_COLUMN], where)
    if not valid.any():
        raise SafeclipError(f"{where}: no row has an embedding")
    return _normalised(_frames_to_rows(lengths, flat, valid, where), where, np.flatnonzero(valid)), valid


def _data_encoder_id(t: _Table) -> str | None:
    ids: set[str] = set()
    if ENCODER_COLUMN in t.names:
        ids = {str(v) for v in t.values(ENCODER_COLUMN) if v not in (None, "")}
    if t.meta_encoder_id:
        ids.add(t.meta_encoder_id)
    if len(ids) > 1:
        raise EncoderMismatchError(f"{t.source} mixes embedding spaces: {sorted(ids)}")
    return next(iter(ids)) if ids else None


def _binary(v: Any) -> int | None:
    """0/1 for a binary-looking value, -1 for a missing one, None for anything else."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return -1
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, (int, float)):
        return int(v) if v in (0, 1) else None
    s = str(v).strip().lower()
    if s == "":
        return -1
    if s in _TRUE:
        return 1
    if s in _FALSE:
        return 0
    try:
        f = float(s)
    except ValueError:
        return None
    return int(f) if f in (0.0, 1.0) else None


def _labels(t: _Table, categories: Sequence[str], label_column: str, policy: Policy) -> dict[str, np.ndarray]:
    """Per category an ``(n,)`` int8 array: 1 positive, 0 negative, -1 not labelled (rules in the module doc)."""
    out: dict[str, np.ndarray] = {}
    from_label_column = [c for c in categories if c not in t.names]
    for c in categories:
        if c not in t.names:
            continue
        vals = t.values(c)
        lab = [_binary(v) for v in vals]
        bad = [i for i, v in enumerate(lab) if v is None]
        if bad:
            raise SafeclipError(f"{t.source}: column {c!r}, row {bad[0]}: {vals[bad[0]]!r} is not a 0/1 label "
                                f"({len(bad)} such row(s))")
        out[c] = np.asarray(lab, np.int8)
    if not from_label_column:
        return out
    if label_column not in t.names:
        raise SafeclipError(
            f"{t.source}: no labels for {from_label_column}: add a 0/1 column named after each category, or a "
            f"{label_column!r} column (--label-column) with category names or 'none' (columns: {t.names})")
    vals = t.values(label_column)
    binary = [_binary(v) for v in vals]
    if all(b is not None for b in binary):
        if len(from_label_column) != 1:
            raise SafeclipError(
                f"{t.source}: column {label_column!r} holds 0/1 labels, which label one category, but "
                f"{from_label_column} need labels from it: give one 0/1 column per category (named after it), or "
                "put category names / 'none' in the label column")
        out[from_label_column[0]] = np.asarray(binary, np.int8)
        return out
    names = [None if (v is None or str(v).strip() == "") else str(v).strip() for v in vals]
    known = set(policy.category_names)
    unknown = sorted({s for s in names if s is not None and s not in known and s.lower() != NONE_LABEL})
    if unknown:
        raise SafeclipError(
            f"{t.source}: column {label_column!r} holds {unknown[:5]}{' ...' if len(unknown) > 5 else ''}, which "
            f"are neither categories of policy {policy.id} ({sorted(known)}) nor {NONE_LABEL!r}")
    for c in from_label_column:
        out[c] = np.asarray([-1 if s is None else int(s == c) for s in names], np.int8)
    return out


def _groups(x: np.ndarray) -> np.ndarray:
    """Row -> group id; identical embeddings (the same image) share one."""
    x = np.ascontiguousarray(x)
    view = x.view(np.dtype((np.void, x.dtype.itemsize * x.shape[1]))).ravel()
    _, inv = np.unique(view, return_inverse=True)
    return inv.ravel()


@dataclass
class _Data:
    """Labelled embeddings in one embedding space, and the policy compiled for it."""

    table: _Table
    x: np.ndarray  # (n, D) float32, L2-normalised
    keep: np.ndarray  # (table.n,) bool: rows that have an embedding
    encoder_id: str
    embed_texts: Callable[[list[str]], np.ndarray]
    comp: CompiledPolicy
    labels: dict[str, np.ndarray]  # per category, over kept rows: 1, 0, or -1 (not labelled)
    groups: np.ndarray  # (n,) identical embeddings share a group


def _cache_dir(args: argparse.Namespace) -> Path:
    from ..embed import default_cache_dir

    return Path(args.cache) if args.cache else default_cache_dir()


def _load_encoder(args: argparse.Namespace) -> Encoder:
    from ..embed import Encoder

    return Encoder(args.model, args.pretrained, device=args.device, cache_dir=_cache_dir(args))


def _prompt_source(encoder_id: str, args: argparse.Namespace, encoder: Encoder | None,
                   ) -> Callable[[list[str]], np.ndarray]:
    """Prompt embeddings for ``encoder_id``: the encoder's, else the prompt cache, loading the model only for misses
    and only when ``--model``/``--pretrained`` name it."""
    if encoder is not None:
        return encoder.embed_texts
    from ..embed import PromptCache

    prompts = PromptCache(encoder_id, _cache_dir(args))
    holder: dict[str, Encoder] = {}

    def embed_texts(texts: list[str]) -> np.ndarray:
        missing = prompts.missing(texts)
        if not missing:
            return prompts.get(texts)
        if "encoder" not in holder:
            if args.model is None and args.pretrained is None:
                raise ModelLoadError(
                    f"{len(missing)} prompt(s) have no cached embedding for encoder {encoder_id!r} in "
                    f"{_cache_dir(args)} (first: {missing[0]!r}); pass --model/--pretrained (the encoder that made "
                    "the embeddings) to embed them once, or --cache with the folder that has them")
            enc = _load_encoder(args)
            if enc.encoder_id != encoder_id:
                raise EncoderMismatchError(
                    f"--model/--pretrained load encoder {enc.encoder_id!r}, but the embeddings are from {encoder_id!r}")
            holder["encoder"] = enc
        return holder["encoder"].embed_texts(texts)

    return embed_texts


def _embed_paths(t: _Table, policy: Policy, encoder: Encoder, cache_dir: Path, prog: str,
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Embed the ``path`` column through the embedding cache (by way of :func:`safeclip.audit.audit`).

    Returns the ``(k, D)`` embeddings of the rows that could be embedded (first sampled frame) and the ``(n,)``
    mask of those rows.
    """
    import pyarrow.parquet as pq

    from ..audit import audit

    base = t.source.resolve().parent
    raw = t.values(PATH_COLUMN)
    paths = [None if v in (None, "") else (str(v) if os.path.isabs(str(v)) else str(base / str(v))) for v in raw]
    unique = list(dict.fromkeys(p for p in paths if p is not None))
    if not unique:
        raise SafeclipError(f"{t.source}: the {PATH_COLUMN!r} column names no files")
    with tempfile.TemporaryDirectory(prefix="safeclip-calibrate-") as tmp:
        out = Path(tmp) / "embeddings.parquet"
        summary = audit(unique, out=out, policy=policy, encoder=encoder, cache=cache_dir, save_embeddings=True,
                        progress=sys.stderr.isatty(), verbose=False)
        table = pq.read_table(out, columns=["path", "embedding", "error"])
    lengths, flat, valid = _arrow_lists(table.column("embedding"), "audit output")
    x = _frames_to_rows(lengths, flat, valid, "audit output")
    ok = np.flatnonzero(valid)
    found = {p: x[k] for k, p in enumerate(np.asarray(table.column("path").to_pylist(), object)[ok])}
    errors = {p: e or "not embedded" for p, e, v in zip(table.column("path").to_pylist(),
                                                         table.column("error").to_pylist(), valid) if not v}
    print(f"{prog}: {len(unique)} image(s) through the embedding cache: {summary.cache_hits} cache hit(s), "
          f"{summary.embedded} embedded, {summary.errors} error(s)", file=sys.stderr)
    keep = np.array([p is not None and p in found for p in paths], bool)
    dropped = [i for i, k in enumerate(keep) if not k]
    if dropped:
        i = dropped[0]
        why = "no path" if paths[i] is None else errors.get(paths[i], "not embedded")
        print(f"{prog}: warning: {len(dropped)} of {t.n} row(s) have no embedding and are left out "
              f"(first: row {i}: {paths[i]}: {why})", file=sys.stderr)
    if not keep.any():
        raise SafeclipError(f"{t.source}: none of the images could be embedded")
    emb = np.stack([found[p] for p, k in zip(paths, keep) if k])
    return _normalised(emb, "audit output", np.flatnonzero(keep)), keep


def _load_data(args: argparse.Namespace, policy: Policy, t: _Table, categories: Sequence[str], prog: str) -> _Data:
    """Embed (when needed) and label the data; compile ``policy`` for its embedding space."""
    from .._compiled import CompiledPolicy

    if t.n == 0:
        raise SafeclipError(f"{t.source}: no rows")
    encoder = None
    if EMBEDDING_COLUMN in t.names:
        x, keep = _embedding_matrix(t)
        if not keep.all():
            print(f"{prog}: warning: {int((~keep).sum())} of {t.n} row(s) have no embedding and are left out "
                  f"(first: row {int(np.flatnonzero(~keep)[0])})", file=sys.stderr)
        recorded = _data_encoder_id(t)
        encoder_id = args.encoder_id or recorded
        if args.encoder_id and recorded not in (None, args.encoder_id):
            raise EncoderMismatchError(f"--encoder-id {args.encoder_id!r}, but {t.source} records {recorded!r}")
        if encoder_id is None:
            if args.model is None and args.pretrained is None:
                raise SafeclipError(
                    f"{t.source}: which embedding space are these embeddings in? Pass --encoder-id, add an "
                    f"{ENCODER_COLUMN!r} column, or name the encoder with --model/--pretrained")
            encoder = _load_encoder(args)
            encoder_id = encoder.encoder_id
    elif PATH_COLUMN in t.names:
        encoder = _load_encoder(args)
        encoder_id = encoder.encoder_id
        if args.encoder_id and args.encoder_id != encoder_id:
            raise EncoderMismatchError(f"--encoder-id {args.encoder_id!r}, but the model is {encoder_id!r}")
        x, keep = _embed_paths(t, policy, encoder, _cache_dir(args), prog)
    else:
        raise SafeclipError(f"{t.source}: needs an {EMBEDDING_COLUMN!r} or a {PATH_COLUMN!r} column "
                            f"(columns: {t.names})")
    embed_texts = _prompt_source(encoder_id, args, encoder)
    comp = CompiledPolicy.build(policy, embed_texts, encoder_id)
    if x.shape[1] != comp.scorer.dim:
        raise EncoderMismatchError(
            f"{t.source}: {x.shape[1]}-d embeddings, but encoder {encoder_id!r} makes {comp.scorer.dim}-d ones")
    labels = {c: v[keep] for c, v in _labels(t, categories, args.label_column, policy).items()}
    return _Data(t, x, keep, encoder_id, embed_texts, comp, labels, _groups(x))


def _categories(args: argparse.Namespace, policy: Policy) -> list[str]:
    cats = list(dict.fromkeys(args.category or []))
    unknown = [c for c in cats if c not in policy.category_names]
    if unknown:
        raise SafeclipError(f"policy {policy.id} has no category {unknown} (it has {list(policy.category_names)})")
    return cats


# =============================================================================================== calibrate
def _split(y: np.ndarray, groups: np.ndarray, fractions: Sequence[float], rng: np.random.Generator,
           ) -> list[np.ndarray]:
    """Stratified, grouped split of rows ``0..n-1`` into ``len(fractions)`` parts (row indices, sorted)."""
    uniq, inv = np.unique(groups, return_inverse=True)
    inv = inv.ravel()
    glabel = np.zeros(uniq.size, np.int8)
    np.maximum.at(glabel, inv, y)  # a group with any positive row counts as positive
    assign = np.empty(uniq.size, np.intp)
    cuts = np.cumsum(fractions)[:-1]
    for c in (0, 1):
        g = rng.permutation(np.flatnonzero(glabel == c))
        for k, part in enumerate(np.split(g, np.round(cuts * g.size).astype(np.intp))):
            assign[part] = k
    row_part = assign[inv]
    return [np.flatnonzero(row_part == k) for k in range(len(fractions))]


@dataclass
class _Fitted:
    """One category's calibration: the fitted objects, where they were saved, and how they did."""

    category: str
    thresholds: Thresholds
    report: Report
    calibrator: Calibrator
    probe: LinearProbe | None
    rows: dict[str, dict[str, int]]
    parts: dict[str, np.ndarray]  # role -> indices into the embedded rows
    holdout_rows: np.ndarray  # indices into the embedded rows
    p_holdout: np.ndarray
    prompt_roc_auc: float
    notes: list[str] = field(default_factory=list)
    probe_sha256: str | None = None
    calibrator_sha256: str | None = None


def _counts(y: np.ndarray) -> dict[str, int]:
    return {"n": int(y.size), "n_pos": int(y.sum())}


def _fit_category(cat: str, data: _Data, prompt_all: np.ndarray, args: argparse.Namespace, prog: str) -> _Fitted:
    from sklearn.metrics import roc_auc_score

    from ..calibration import (
        ThresholdWarning,
        choose_thresholds,
        evaluate,
        fit_calibrator,
        train_probe,
    )

    y_all = data.labels[cat]
    rows = np.flatnonzero(y_all >= 0)
    y = y_all[rows].astype(np.int8)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        raise SafeclipError(f"{cat}: the labelled rows need both classes; got {n_pos} positive and "
                            f"{y.size - n_pos} negative")
    fit_share = 1.0 - args.holdout
    fractions = ([fit_share * args.probe_fraction, fit_share * (1 - args.probe_fraction), args.holdout]
                 if args.probe else [fit_share, args.holdout])
    parts = [rows[p] for p in _split(y, data.groups[rows], fractions, np.random.default_rng(args.seed))]
    roles = ["probe", "calibrator", "holdout"] if args.probe else ["calibrator", "holdout"]
    counts = {r: _counts(y_all[p]) for r, p in zip(roles, parts)}
    for role, c in counts.items():
        need = 2 if role == "probe" else 1
        if min(c["n_pos"], c["n"] - c["n_pos"]) < need:
            raise SafeclipError(
                f"{cat}: too few labelled rows for the split: the {role} rows have {c['n_pos']} positive and "
                f"{c['n'] - c['n_pos']} negative (need >= {need} of each; all labelled rows: {n_pos} positive, "
                f"{y.size - n_pos} negative). Label more images" + (", or use --no-probe" if args.probe else ""))

    prompt = prompt_all[:, data.comp.scorer.categories.index(cat)]

    probe = None
    if args.probe:
        tr = parts[0]
        c = counts["probe"]
        folds = min(_MAX_PROBE_FOLDS, c["n_pos"], c["n"] - c["n_pos"])
        try:
            probe = train_probe(data.x[tr], y_all[tr], encoder_id=data.encoder_id, cv=folds,
                                random_state=args.seed)
        except ValueError as e:
            raise SafeclipError(f"{cat}: cannot train the probe: {e}") from e
        probe.metadata.update(category=cat)

    def signals(idx: np.ndarray) -> np.ndarray:
        cols = [prompt[idx]]
        if probe is not None:
            cols.append(probe.decision_function(data.x[idx]))
        return np.column_stack(cols).astype(np.float32)  # float32, as the runtime scorer gives them

    inputs = ("prompt", "probe") if probe is not None else ("prompt",)
    cal_idx, hold_idx = parts[-2], parts[-1]
    try:
        cal = fit_calibrator(signals(cal_idx), y_all[cal_idx], method=args.method, inputs=inputs,
                             encoder_id=data.encoder_id)
    except ValueError as e:
        raise SafeclipError(f"{cat}: cannot fit the calibrator: {e}") from e
    y_hold = y_all[hold_idx]
    p_hold = np.asarray(cal.predict_proba(signals(hold_idx)), np.float32)

    notes: list[str] = []
    if probe is None and cal.method_ == "sigmoid" and cal.coef_[0] < 0:
        notes.append("the calibrator's probability falls as the prompt signal rises: the category's prompts point "
                     "away from these labels; check the labels and the prompts")
        print(f"{prog}: warning: {cat}: {notes[-1]}", file=sys.stderr)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ThresholdWarning)
        th = choose_thresholds(p_hold, y_hold, block_precision=args.block_precision, flag_recall=args.flag_recall,
                               confidence=args.confidence)
    for w in caught:
        if issubclass(w.category, ThresholdWarning):
            notes.append(str(w.message))
            print(f"{prog}: warning: {cat}: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    report = evaluate(p_hold, y_hold, th)
    return _Fitted(cat, th, report, cal, probe, counts, dict(zip(roles, parts)), hold_idx, p_hold,
                   float(roc_auc_score(y_hold, prompt[hold_idx])), notes)


def _write_split(path: Path, f: _Fitted, data: _Data) -> None:
    """``row`` (0-based row of the data file), ``role`` (probe / calibrator / holdout) and ``label``: which labelled
    rows did what, so that a later evaluation can use (or avoid) exactly these rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    file_row = np.flatnonzero(data.keep)  # embedded row -> data file row
    order = np.argsort(np.concatenate(list(f.parts.values())), kind="stable")
    rows = np.concatenate([file_row[p] for p in f.parts.values()])[order]
    roles = np.concatenate([[r] * len(p) for r, p in f.parts.items()])[order]
    labels = np.concatenate([data.labels[f.category][p] for p in f.parts.values()])[order]
    table = pa.table({"row": pa.array(rows, pa.int64()), "role": pa.array(roles.tolist(), pa.string()),
                      "label": pa.array(labels, pa.int8())})
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _extends_ref(parent: Policy, out_dir: Path) -> str:
    """How ``out_dir/policy.yaml`` names its parent: a shipped name, else a path relative to ``out_dir``."""
    from ..policy import builtin_policy_dir

    src = Path(parent.source or "").resolve()
    if src.parent == builtin_policy_dir().resolve():
        return src.stem
    try:
        return Path(os.path.relpath(src, out_dir.resolve())).as_posix()
    except ValueError:  # another drive (Windows)
        return src.as_posix()


def _write_policy(out_dir: Path, parent: Policy, fits: Sequence[_Fitted], args: argparse.Namespace,
                  data: _Data) -> Path:
    import yaml

    pins = hashlib.sha256(json.dumps(
        [[f.category, f.probe_sha256, f.calibrator_sha256, f.thresholds.flag, f.thresholds.block] for f in fits]
    ).encode()).hexdigest()[:8]
    cats: dict[str, Any] = {}
    for f in fits:
        cats[f.category] = {
            "thresholds": {"flag": f.thresholds.flag, "block": f.thresholds.block},
            "probe": None if f.probe_sha256 is None else {"path": f"probes/{f.category}.json",
                                                          "sha256": f.probe_sha256},
            "calibrator": {"path": f"calibrators/{f.category}.json", "sha256": f.calibrator_sha256},
        }
    doc = {
        "name": args.name or parent.name,
        "version": f"{parent.version}+cal.{pins}",
        "description": f"{parent.name}@{parent.version} with {', '.join(f.category for f in fits)} calibrated by "
                       f"`safeclip calibrate` on {data.table.source.name}",
        "extends": _extends_ref(parent, out_dir),
        "categories": cats,
    }
    targets = (f"block precision >= {args.block_precision}, flag recall >= {args.flag_recall} at "
               f"{args.confidence:.0%} confidence")
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = (f"# Written by `safeclip calibrate` on {now}\n"
              f"# from {data.table.source.name} ({data.x.shape[0]} rows), encoder {data.encoder_id}.\n"
              f"# Thresholds target {targets},\n"
              "# chosen on held-out rows; a null threshold never fires (the data could not support its target).\n"
              "# See calibration.json and reports/<category>/ in this folder.\n")
    path = out_dir / "policy.yaml"
    write_bytes_atomic(path, (header + yaml.safe_dump(doc, sort_keys=False, width=110)).encode())
    return path


def _verify(path: Path, data: _Data, fits: Sequence[_Fitted]) -> str:
    """Reload the written policy and check it reproduces the held-out probabilities, calibrated."""
    from .._compiled import CompiledPolicy
    from ..policy import load_policy

    pol = load_policy(path)
    comp = CompiledPolicy.build(pol, data.embed_texts, data.encoder_id)
    for f in fits:
        j = comp.scorer.categories.index(f.category)
        probs, calibrated = comp.probabilities(comp.scorer.score(data.x[f.holdout_rows]))
        if not calibrated[j]:
            raise SafeclipError(f"internal check failed: {path} leaves {f.category!r} uncalibrated")
        off = np.abs(probs[:, j].astype(np.float64) - f.p_holdout) > _VERIFY_TOLERANCE
        if off.mean() > _VERIFY_MAX_OFF:
            raise SafeclipError(f"internal check failed: {path} gives {f.category!r} probabilities that differ from "
                                f"the fitted calibrator's by more than {_VERIFY_TOLERANCE} on {off.mean():.1%} of "
                                "the held-out rows")
    return pol.id


def _fmt_threshold(kind: str, f: _Fitted, confidence: float) -> str:
    th = f.thresholds
    t = th.block if kind == "block" else th.flag
    target = th.target_block_precision if kind == "block" else th.target_flag_recall
    if t is None:
        what = "never blocks" if kind == "block" else "never flags"
        why = "no target asked" if target is None else (
            f"the held-out rows cannot support {'precision' if kind == 'block' else 'recall'} >= {target} at "
            f"{confidence:.0%} confidence")
        return f"  {kind:<5} none ({what}): {why}"
    if kind == "block":
        return (f"  block >= {t:.4g}: precision {th.block_precision:.3f} (>= {th.block_bound:.3f} at "
                f"{confidence:.0%} confidence; target {target}), recall {th.block_recall:.3f}, acts on "
                f"{th.block_positive_rate:.1%} of held-out rows")
    clamp = " (lowered to the block threshold)" if th.flag_clamped else ""
    return (f"  flag  >= {t:.4g}{clamp}: recall {th.flag_recall:.3f} (>= {th.flag_bound:.3f} at {confidence:.0%} "
            f"confidence; target {target}), precision {th.flag_precision:.3f}, acts on "
            f"{th.flag_positive_rate:.1%} of held-out rows")


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from ..artifacts import sha256_file, write_json_atomic
    from ..policy import load_policy

    prog = "safeclip calibrate"
    if not args.category:
        raise SafeclipError("calibrate: name the categories to calibrate with --category C (repeatable)")
    if args.block_precision is None and args.flag_recall is None:
        raise SafeclipError("calibrate: --block-precision and --flag-recall are both 'none': nothing to choose")
    parent = load_policy(args.policy)
    cats = _categories(args, parent)
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise SafeclipError(f"--out {out_dir} is a file; give a folder")
    if parent.source and Path(parent.source).resolve() == (out_dir / "policy.yaml").resolve():
        raise SafeclipError(f"--out {out_dir} would overwrite the input policy {parent.source}; choose another folder")
    data = _load_data(args, parent, _read_table(args.data), cats, prog)
    prompt_all = data.comp.scorer.score(data.x).prompt  # (n, C) float32: the prompt signal of every category
    fits = [_fit_category(c, data, prompt_all, args, prog) for c in cats]
    out_dir.mkdir(parents=True, exist_ok=True)
    data_sha = sha256_file(data.table.source)
    split = {"seed": args.seed, "holdout": args.holdout, "probe_fraction": args.probe_fraction if args.probe else None,
             "rule": "stratified by label, identical embeddings kept together; the probe and the calibrator are fitted "
                     "on disjoint rows; thresholds and the report use the held-out rows"}
    targets = {"block_precision": args.block_precision, "flag_recall": args.flag_recall,
               "confidence": args.confidence}
    for f in fits:
        meta = {"category": f.category, "policy": parent.id, "data": {"file": str(data.table.source),
                                                                      "sha256": data_sha},
                "split": split, "rows": f.rows, "targets": targets}
        if f.probe is not None:
            f.probe.metadata.update(_plain({"policy": parent.id, "data": meta["data"], "split": split}))
            f.probe_sha256 = f.probe.save(out_dir / "probes" / f"{f.category}.json")
        f.calibrator.metadata.update(_plain({
            **meta, "holdout": {"roc_auc": f.report.roc_auc, "pr_auc": f.report.pr_auc, "ece": f.report.ece,
                                "brier": f.report.brier}, "thresholds": f.thresholds.to_dict()}))
        f.calibrator_sha256 = f.calibrator.save(out_dir / "calibrators" / f"{f.category}.json")
        f.report.save(out_dir / "reports" / f.category)
        _write_split(out_dir / "reports" / f.category / "split.parquet", f, data)
    policy_path = _write_policy(out_dir, parent, fits, args, data)
    policy_id = _verify(policy_path, data, fits)

    summary = {
        "kind": "safeclip.calibration_run", "policy": policy_id, "policy_file": "policy.yaml", "parent": parent.id,
        "encoder_id": data.encoder_id, "data": {"file": str(data.table.source), "sha256": data_sha,
                                                 "rows": int(data.table.n), "embedded_rows": int(data.x.shape[0])},
        "targets": targets, "split": split, "method": args.method, "probe": bool(args.probe),
        "categories": {f.category: {
            "rows": f.rows, "thresholds": f.thresholds.to_dict(), "calibrator_method": f.calibrator.method_,
            "inputs": list(f.calibrator.inputs),
            "holdout": {"roc_auc": f.report.roc_auc, "pr_auc": f.report.pr_auc, "ece": f.report.ece,
                        "brier": f.report.brier, "log_loss": f.report.log_loss,
                        "prompt_only_roc_auc": f.prompt_roc_auc},
            "probe": None if f.probe is None else {"path": f"probes/{f.category}.json", "sha256": f.probe_sha256,
                                                   "cv_auc": f.probe.metadata.get("cv_auc"),
                                                   "C": f.probe.metadata.get("C")},
            "calibrator": {"path": f"calibrators/{f.category}.json", "sha256": f.calibrator_sha256},
            "report": f"reports/{f.category}/report.json", "split": f"reports/{f.category}/split.parquet",
            "warnings": f.notes,
        } for f in fits},
    }
    write_json_atomic(out_dir / "calibration.json", _plain(summary))

    for f in fits:
        r = f.rows
        parts = ", ".join(f"{role} {c['n']} ({c['n_pos']}+)" for role, c in r.items())
        total = sum(c["n"] for c in r.values())
        total_pos = sum(c["n_pos"] for c in r.values())
        print(f"{f.category}: {total} labelled rows ({total_pos} positive): {parts}")
        probe = "" if f.probe is None else f"; probe CV AUC {f.probe.metadata.get('cv_auc', float('nan')):.3f}"
        print(f"  {f.calibrator.method_} calibrator on {'+'.join(f.calibrator.inputs)}{probe}; held out: ROC AUC "
              f"{f.report.roc_auc:.3f} (prompt alone {f.prompt_roc_auc:.3f}), PR AUC {f.report.pr_auc:.3f}, "
              f"ECE {f.report.ece:.3f}, Brier {f.report.brier:.3f}")
        print(_fmt_threshold("block", f, args.confidence))
        print(_fmt_threshold("flag", f, args.confidence))
    print(f"wrote {policy_path} ({policy_id}); use it with --policy {policy_path}")
    return 0


# ==================================================================================================== eval
def _eval_categories(args: argparse.Namespace, policy: Policy, t: _Table) -> list[str]:
    """``--category``, else every policy category the data labels: its own column, or named in the label column
    (a 0/1 label column labels the policy's only category, else ``--category`` must say which)."""
    cats = _categories(args, policy)
    if cats:
        return cats
    cats = [c for c in policy.category_names if c in t.names]
    if args.label_column in t.names:
        vals = t.values(args.label_column)
        if all(_binary(v) is not None for v in vals):
            if len(policy.category_names) == 1:
                cats = list(policy.category_names)
            elif not cats:
                raise SafeclipError(f"{t.source}: column {args.label_column!r} holds 0/1 labels for one category: "
                                    "say which with --category")
        else:
            named = {str(v).strip() for v in vals if v is not None}
            cats += [c for c in policy.category_names if c in named and c not in cats]
    if not cats:
        raise SafeclipError(f"{t.source}: no labels for any category of policy {policy.id}: add a 0/1 column named "
                            f"after a category, or a {args.label_column!r} column (columns: {t.names})")
    return cats


def _plain(v: Any) -> Any:
    """A JSON-able copy: mappings and sequences recursively, numpy scalars to Python, NaN/inf to None."""
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, np.ndarray)):
        return [_plain(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _cmd_eval(args: argparse.Namespace) -> int:
    from ..calibration import (
        Thresholds,
        evaluate,
        precision_lower_bound,
        recall_lower_bound,
    )
    from ..policy import load_policy

    prog = "safeclip eval"
    policy = load_policy(args.policy)
    table = _read_table(args.data)
    cats = _eval_categories(args, policy, table)
    data = _load_data(args, policy, table, cats, prog)
    probs, calibrated = data.comp.probabilities(data.comp.scorer.score(data.x))
    out: dict[str, Any] = {"policy": policy.id, "encoder_id": data.encoder_id, "data": str(data.table.source),
                           "rows": int(data.x.shape[0]), "confidence": args.confidence, "categories": {}}
    for cat in cats:
        j = data.comp.scorer.categories.index(cat)
        c = policy.category(cat)
        y_all = data.labels[cat]
        rows = np.flatnonzero(y_all >= 0)
        if rows.size == 0:
            raise SafeclipError(f"{cat}: no labelled rows")
        y = y_all[rows]
        p = np.asarray(probs[rows, j], np.float64)
        th = Thresholds(block=c.block, flag=c.flag, target_block_precision=None, target_flag_recall=None,
                        confidence=args.confidence, n=int(y.size), n_pos=int(y.sum()))
        rep = evaluate(p, y, th)
        if args.reports:
            rep.save(Path(args.reports) / cat)
        res: dict[str, Any] = {"n": rep.n, "n_pos": rep.n_pos, "calibrated": bool(calibrated[j]),
                               "roc_auc": rep.roc_auc, "pr_auc": rep.pr_auc, "ece": rep.ece, "brier": rep.brier,
                               "log_loss": rep.log_loss}
        for kind in ("flag", "block"):
            conf = rep.confusion.get(kind)
            if conf is None:
                res[kind] = None
                continue
            d = dict(conf)
            d["precision_lower_bound"] = float(precision_lower_bound(d["tp"], d["fp"], args.confidence))
            d["recall_lower_bound"] = float(recall_lower_bound(d["tp"], rep.n_pos, args.confidence)) \
                if rep.n_pos else None
            res[kind] = d
        out["categories"][cat] = _plain(res)
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"policy {policy.id}, encoder {data.encoder_id}, {out['rows']} rows from {data.table.source}")
    for cat, r in out["categories"].items():
        def num(v: Any) -> str:
            return "n/a" if v is None else f"{v:.3f}"

        print(f"{cat}: {r['n']} labelled rows ({r['n_pos']} positive), "
              f"{'calibrated' if r['calibrated'] else 'uncalibrated (fallback: prompt softmax mass)'}")
        print(f"  ROC AUC {num(r['roc_auc'])}, PR AUC {num(r['pr_auc'])}, ECE {num(r['ece'])}, "
              f"Brier {num(r['brier'])}, log-loss {num(r['log_loss'])}")
        for kind in ("flag", "block"):
            d = r[kind]
            if d is None:
                print(f"  {kind:<5} none (never {'flags' if kind == 'flag' else 'blocks'})")
                continue
            print(f"  {kind:<5} >= {d['threshold']:.4g}: precision {num(d['precision'])} (>= "
                  f"{num(d['precision_lower_bound'])}), recall {num(d['recall'])} (>= "
                  f"{num(d['recall_lower_bound'])}) at {args.confidence:.0%} confidence; acts on "
                  f"{d['positive_rate']:.1%} of rows (tp {d['tp']}, fp {d['fp']}, fn {d['fn']}, tn {d['tn']})")
    return 0


# ==================================================================================================== main
def main(argv: Sequence[str] | None = None) -> int:
    """Run ``calibrate``/``eval`` on their own (as ``safeclip.cli.main`` does once it registers them)."""
    return run_standalone(register, "Calibrate and evaluate moderation policies.", argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
