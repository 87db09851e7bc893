"""The calibrate / evaluate workflow as two functions, which ``safeclip calibrate`` / ``safeclip eval`` and the
notebook both call.

:func:`calibrate_policy`, per category, over its labelled rows
    Splits them (:func:`~safeclip.calibration.grouped_split`, stratified by label, seeded, identical embeddings
    kept together): ``holdout`` (default 0.3) of the rows are held out; the rest are the fit rows. With ``probe``,
    ``probe_fraction`` (default 0.5) of the fit rows train the linear probe and the other fit rows fit the
    calibrator, so the calibrator never sees the probe's logit on the probe's own training rows (where it is
    over-confident); without, every fit row fits the calibrator. The thresholds are chosen on the held-out rows,
    which neither the probe nor the calibrator saw, and the report (ROC/PR AUC, ECE, Brier, reliability) is
    computed there too.

    The precision/recall at each threshold are measured on the held-out rows it was chosen on; the promise is their
    lower confidence bound (``confidence``, one-sided Clopper-Pearson with fixed-sequence testing, see
    :func:`~safeclip.calibration.choose_thresholds`). A target the held-out rows cannot support gives no threshold
    (a :class:`~safeclip.calibration.ThresholdWarning`): ``block: null`` never blocks, ``flag: null`` never flags.

Outputs of :func:`calibrate_policy` in ``out``
    ``probes/<C>.json`` and ``calibrators/<C>.json`` (pinned JSON artifacts); ``reports/<C>/`` (``report.json``,
    ``reliability.png``, ``pr_curve.png``, and ``split.parquet``: the data file's row number, role and label of
    every labelled row); ``calibration.json`` (what was done, per category); and ``policy.yaml``, which, for each
    calibrated category, sets the new thresholds and the ``probe:``/``calibrator:`` references with their sha256
    pins (``probe: null`` without a probe, dropping an inherited probe its calibrator does not use). It ``extends``
    the input policy when that is a shipped one or a file inside ``out`` (a policy may extend nothing else);
    otherwise it holds a full copy of the input policy, whose other categories' artifacts are copied beside it, so
    that ``out`` is self-contained. Before it returns, the policy is reloaded and checked to reproduce the held-out
    probabilities and to mark the categories calibrated. Running again into the same folder replaces these files.
    Each ``policy.yaml`` written is recorded as a version in ``out/.safeclip-history/`` (:mod:`safeclip.versions`),
    and a ``policy.yaml`` found there first too, so ``safeclip policy rollback`` returns to any of them.

:func:`evaluate_policy`
    Per category: ROC AUC, PR AUC, ECE, Brier, log-loss, and precision/recall (with lower confidence bounds) at the
    policy's flag and block thresholds, on the policy's probabilities (calibrated where it has a calibrator, the
    uncalibrated fallback otherwise). Use data the calibration never saw.

From a file, as ``safeclip calibrate`` runs it::

    data = load_labeled("labels.parquet", "default", ["violence"])
    result = calibrate_policy("default", data, ["violence"], out="tuned/")
    print(result.format())

In memory, with a stand-in text tower (one fixed random direction per prompt; real prompts come from the model or
the prompt cache) and labels that follow one direction of a 16-d space, which the probe finds:

>>> import zlib
>>> import numpy as np
>>> def texts(batch):
...     v = np.stack([np.random.default_rng(zlib.crc32(t.encode())).normal(size=16) for t in batch])
...     return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
>>> rng = np.random.default_rng(0)
>>> y = (rng.random(800) < 0.3).astype(int)
>>> x = rng.normal(size=(800, 16)) + 3.0 * y[:, None] * np.eye(16)[0]
>>> data = LabeledData(x / np.linalg.norm(x, axis=1, keepdims=True), {"drugs": y}, "demo", embed_texts=texts)
>>> result = calibrate_policy("default", data, ["drugs"], out="tuned", block_precision=0.8)
>>> fit = result.fits["drugs"]
>>> result.policy_id.startswith("default@1.0+cal."), fit.report.roc_auc > 0.9, fit.thresholds.block_bound >= 0.8
(True, True, True)
>>> held_out = evaluate_policy(result.policy_path, data.take(fit.split["holdout"]))
>>> held_out.categories["drugs"].calibrated, held_out.categories["drugs"].report.n == fit.report.n
(True, True)
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from safeclip.compiled import CompiledPolicy
from safeclip.files import write_bytes_atomic, write_json_atomic, write_parquet_atomic
from safeclip.artifacts import copy_pinned, jsonable
from safeclip.calibrate import Calibrator
from safeclip.errors import (ArtifactIntegrityError, ConfigError, DataError, EncoderMismatchError, PolicyError,
                             SafeclipError)
from safeclip.heads import LinearProbe
from safeclip.policy import ArtifactRef, Policy, builtin_policy_dir, load_policy
from safeclip.versions import record

from ._validate import CalibrationWarning
from .calibrators import fit_calibrator
from .data import LabeledData, LabeledSource, check_categories, load_labeled, prompt_source
from .probes import train_probe
from .report import Report, evaluate
from .split import grouped_split
from .thresholds import ThresholdWarning, Thresholds, choose_thresholds, precision_lower_bound, recall_lower_bound

__all__ = [
    "CalibrationResult",
    "CategoryEvaluation",
    "CategoryFit",
    "EvaluationResult",
    "calibrate_policy",
    "check_calibration_request",
    "evaluate_policy",
]

# The reloaded policy must give the fitted probabilities back to within 1e-4 on all but 1% of the held-out rows
# (float32 rounding differs between batch shapes, and a steep isotonic step can magnify it on a rare row); a wiring
# fault (wrong artifact, signal order, missing probe) moves most rows far more.
_VERIFY_TOLERANCE = 1e-4
_VERIFY_MAX_OFF = 0.01
_MAX_PROBE_FOLDS = 5
_SPLIT_RULE = ("stratified by label, identical embeddings kept together; the probe and the calibrator are fitted on "
               "disjoint rows; thresholds and the report use the held-out rows")

PolicyLike = str | os.PathLike[str] | Policy


# ================================================================================================= results
@dataclass(frozen=True, eq=False)
class CategoryFit:
    """One category's calibration: the fitted objects, the rows each saw, and how it did on the held-out rows.

    ``rows``: per role (``probe``, ``calibrator``, ``holdout``) ``{"n", "n_pos"}``; ``split``: per role the indices
    into the data's rows. ``p_holdout``: the calibrated probabilities of the held-out rows; ``prompt_roc_auc``: the
    prompt signal's ROC AUC there (what the probe and calibrator add). ``*_sha256``: the pins of the saved artifacts.
    ``warnings``: what deserves a look (unsupported targets, prompts pointing away from the labels).
    """

    category: str
    thresholds: Thresholds
    report: Report
    calibrator: Calibrator
    probe: LinearProbe | None
    rows: Mapping[str, Mapping[str, int]]
    split: Mapping[str, np.ndarray]
    p_holdout: np.ndarray
    prompt_roc_auc: float
    warnings: tuple[str, ...] = ()
    probe_sha256: str | None = None
    calibrator_sha256: str | None = None

    def format(self) -> str:
        """The lines ``safeclip calibrate`` prints for this category."""
        r = self.rows
        parts = ", ".join(f"{role} {c['n']} ({c['n_pos']}+)" for role, c in r.items())
        total = sum(c["n"] for c in r.values())
        total_pos = sum(c["n_pos"] for c in r.values())
        probe = "" if self.probe is None else f"; probe CV AUC {self.probe.metadata.get('cv_auc', float('nan')):.3f}"
        rep = self.report
        return "\n".join([
            f"{self.category}: {total} labelled rows ({total_pos} positive): {parts}",
            (f"  {self.calibrator.method_} calibrator on {'+'.join(self.calibrator.inputs)}{probe}; held out: ROC AUC "
             f"{rep.roc_auc:.3f} (prompt alone {self.prompt_roc_auc:.3f}), PR AUC {rep.pr_auc:.3f}, "
             f"ECE {rep.ece:.3f}, Brier {rep.brier:.3f}"),
            _format_threshold("block", self.thresholds),
            _format_threshold("flag", self.thresholds),
        ])


def _format_threshold(kind: str, th: Thresholds) -> str:
    t = th.block if kind == "block" else th.flag
    target = th.target_block_precision if kind == "block" else th.target_flag_recall
    confidence = th.confidence
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


@dataclass(frozen=True, eq=False)
class CalibrationResult:
    """What :func:`calibrate_policy` wrote: ``policy_path`` (``out/policy.yaml``, id ``policy_id``, extending
    ``parent_id``), ``summary`` (the contents of ``out/calibration.json``), the per-category ``fits`` and every
    ``warnings`` line (``"<category>: ..."``)."""

    policy_path: Path
    policy_id: str
    parent_id: str
    encoder_id: str
    out: Path
    fits: Mapping[str, CategoryFit]
    summary: Mapping[str, Any]
    warnings: tuple[str, ...] = ()

    def load_policy(self) -> Policy:
        """The written policy, reloaded (its artifacts checked against their pins)."""
        return load_policy(self.policy_path)

    def format(self) -> str:
        """The per-category lines ``safeclip calibrate`` prints."""
        return "\n".join(f.format() for f in self.fits.values())


@dataclass(frozen=True)
class CategoryEvaluation:
    """One category under :func:`evaluate_policy`: its ``report`` on the labelled rows, whether the policy
    calibrates it, and at each of its thresholds (``flag``, ``block``; ``None`` when it has none) the confusion
    counts, precision, recall, positive rate and their lower confidence bounds."""

    category: str
    calibrated: bool
    report: Report
    flag: Mapping[str, Any] | None
    block: Mapping[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        r = self.report
        return jsonable({"n": r.n, "n_pos": r.n_pos, "calibrated": self.calibrated, "roc_auc": r.roc_auc,
                         "pr_auc": r.pr_auc, "ece": r.ece, "brier": r.brier, "log_loss": r.log_loss,
                         "flag": None if self.flag is None else dict(self.flag),
                         "block": None if self.block is None else dict(self.block)})


@dataclass(frozen=True)
class EvaluationResult:
    """What :func:`evaluate_policy` measured: per category a :class:`CategoryEvaluation`."""

    policy_id: str
    encoder_id: str
    source: Path | None
    rows: int
    confidence: float
    categories: Mapping[str, CategoryEvaluation]

    def to_dict(self) -> dict[str, Any]:
        """The JSON ``safeclip eval --json`` prints (NaN becomes null)."""
        return {"policy": self.policy_id, "encoder_id": self.encoder_id,
                "data": None if self.source is None else str(self.source), "rows": self.rows,
                "confidence": self.confidence, "categories": {c: e.to_dict() for c, e in self.categories.items()}}

    def format(self) -> str:
        """The text ``safeclip eval`` prints."""
        def num(v: Any) -> str:
            return "n/a" if v is None else f"{v:.3f}"

        where = "in-memory data" if self.source is None else self.source
        lines = [f"policy {self.policy_id}, encoder {self.encoder_id}, {self.rows} rows from {where}"]
        for cat, ev in self.categories.items():
            r = ev.to_dict()
            lines.append(f"{cat}: {r['n']} labelled rows ({r['n_pos']} positive), "
                         f"{'calibrated' if r['calibrated'] else 'uncalibrated (fallback: prompt softmax mass)'}")
            lines.append(f"  ROC AUC {num(r['roc_auc'])}, PR AUC {num(r['pr_auc'])}, ECE {num(r['ece'])}, "
                         f"Brier {num(r['brier'])}, log-loss {num(r['log_loss'])}")
            for kind in ("flag", "block"):
                d = r[kind]
                if d is None:
                    lines.append(f"  {kind:<5} none (never {'flags' if kind == 'flag' else 'blocks'})")
                    continue
                lines.append(
                    f"  {kind:<5} >= {d['threshold']:.4g}: precision {num(d['precision'])} (>= "
                    f"{num(d['precision_lower_bound'])}), recall {num(d['recall'])} (>= "
                    f"{num(d['recall_lower_bound'])}) at {self.confidence:.0%} confidence; acts on "
                    f"{d['positive_rate']:.1%} of rows (tp {d['tp']}, fp {d['fp']}, fn {d['fn']}, tn {d['tn']})")
        return "\n".join(lines)


# ================================================================================================ shared
def _as_data(data: LabeledData | LabeledSource, policy: Policy, categories: Sequence[str] | None) -> LabeledData:
    return data if isinstance(data, LabeledData) else load_labeled(data, policy, categories)


def _compile(policy: Policy, data: LabeledData, texts: Callable[[list[str]], np.ndarray]) -> CompiledPolicy:
    """``policy`` compiled for the data's embedding space, with prompt embeddings from ``texts``."""
    comp = CompiledPolicy.build(policy, texts, data.encoder_id)
    dim = data.embeddings.shape[1]
    if dim != comp.scorer.dim:
        raise EncoderMismatchError(f"{data.source or 'the data'}: {dim}-d embeddings, but encoder "
                                   f"{data.encoder_id!r} makes {comp.scorer.dim}-d ones")
    return comp


def _texts(policy: Policy, data: LabeledData, embed_texts: Callable[[list[str]], np.ndarray] | None,
           ) -> Callable[[list[str]], np.ndarray]:
    """Prompt embeddings from ``embed_texts``, else the data's own source, else the default prompt cache."""
    return embed_texts or data.embed_texts or prompt_source(data.encoder_id, policy=policy)


def _labelled_rows(data: LabeledData, category: str) -> tuple[np.ndarray, np.ndarray]:
    rows = data.labelled(category)
    if rows.size == 0:
        raise DataError(f"{category}: no labelled rows")
    return rows, data.labels[category][rows]


def _counts(y: np.ndarray) -> dict[str, int]:
    return {"n": int(y.size), "n_pos": int(y.sum())}


def _fraction(name: str, v: float) -> float:
    if not 0.0 < float(v) < 1.0:
        raise ConfigError(f"{name} must be in (0, 1), got {v!r}")
    return float(v)


# =============================================================================================== calibrate
def check_calibration_request(policy: PolicyLike, categories: Sequence[str] | None, out: str | os.PathLike[str],
                              block_precision: float | None, flag_recall: float | None,
                              ) -> tuple[Policy, list[str], Path]:
    """The checks :func:`calibrate_policy` makes before it reads any data: ``(policy, categories, out)``."""
    if not categories:
        raise ConfigError("calibrate: name the categories to calibrate with --category C (repeatable)")
    if block_precision is None and flag_recall is None:
        raise ConfigError("calibrate: --block-precision and --flag-recall are both 'none': nothing to choose")
    parent = load_policy(policy)
    cats = check_categories(parent, categories)
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file; give a folder")
    if parent.source and Path(parent.source).resolve() == (out_dir / "policy.yaml").resolve():
        raise ConfigError(f"--out {out_dir} would overwrite the input policy {parent.source}; choose another folder")
    return parent, cats, out_dir


def _fit_category(cat: str, data: LabeledData, comp: CompiledPolicy, prompt_all: np.ndarray, *,
                  block_precision: float | None, flag_recall: float | None, confidence: float, probe: bool,
                  head: bool, method: str, holdout: float, probe_fraction: float, seed: int) -> CategoryFit:
    from sklearn.metrics import roc_auc_score

    rows, y = _labelled_rows(data, cat)
    y_all = data.labels[cat]
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        raise DataError(f"{cat}: the labelled rows need both classes; got {n_pos} positive and "
                        f"{y.size - n_pos} negative")
    fit_share = 1.0 - holdout
    fractions = ([fit_share * probe_fraction, fit_share * (1 - probe_fraction), holdout]
                 if probe else [fit_share, holdout])
    parts = [rows[p] for p in grouped_split(y, data.groups[rows], fractions, np.random.default_rng(seed))]
    roles = ["probe", "calibrator", "holdout"] if probe else ["calibrator", "holdout"]
    counts = {r: _counts(y_all[p]) for r, p in zip(roles, parts)}
    for role, c in counts.items():
        need = 2 if role == "probe" else 1
        if min(c["n_pos"], c["n"] - c["n_pos"]) < need:
            raise DataError(
                f"{cat}: too few labelled rows for the split: the {role} rows have {c['n_pos']} positive and "
                f"{c['n'] - c['n_pos']} negative (need >= {need} of each; all labelled rows: {n_pos} positive, "
                f"{y.size - n_pos} negative). Label more images" + (", or use --no-probe" if probe else ""))

    x = data.embeddings
    prompt = prompt_all[:, comp.scorer.categories.index(cat)]
    trained = None
    if probe:
        tr = parts[0]
        c = counts["probe"]
        folds = min(_MAX_PROBE_FOLDS, c["n_pos"], c["n"] - c["n_pos"])
        try:
            trained = train_probe(x[tr], y_all[tr], encoder_id=data.encoder_id, cv=folds, random_state=seed)
        except ValueError as e:
            raise DataError(f"{cat}: cannot train the probe: {e}") from e
        trained.metadata.update(category=cat)
    # A head the policy already has (LAION's NSFW head) is stacked as it is: it is not refitted here.
    published = comp.scorer.heads.get(cat) if head else None

    def signals(idx: np.ndarray) -> np.ndarray:
        cols = [prompt[idx]]
        if trained is not None:
            cols.append(trained.decision_function(x[idx]))
        if published is not None:
            cols.append(published.decision_function(x[idx]))
        return np.column_stack(cols).astype(np.float32)  # float32, as the runtime scorer gives them

    inputs = ("prompt",) + (("probe",) if trained is not None else ()) + (("head",) if published is not None else ())
    cal_idx, hold_idx = parts[-2], parts[-1]
    try:
        cal = fit_calibrator(signals(cal_idx), y_all[cal_idx], method=method, inputs=inputs,
                             encoder_id=data.encoder_id)
    except ValueError as e:
        raise DataError(f"{cat}: cannot fit the calibrator: {e}") from e
    y_hold = y_all[hold_idx]
    p_hold = np.asarray(cal.predict_proba(signals(hold_idx)), np.float32)

    notes: list[str] = []
    if len(inputs) == 1 and cal.method_ == "sigmoid" and cal.coef_[0] < 0:
        notes.append("the calibrator's probability falls as the prompt signal rises: the category's prompts point "
                     "away from these labels; check the labels and the prompts")
        warnings.warn(f"{cat}: {notes[-1]}", CalibrationWarning, stacklevel=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ThresholdWarning)
        th = choose_thresholds(p_hold, y_hold, block_precision=block_precision, flag_recall=flag_recall,
                               confidence=confidence)
    for w in caught:  # re-issued outside the catch, naming the category
        if issubclass(w.category, ThresholdWarning):
            notes.append(str(w.message))
            warnings.warn(f"{cat}: {w.message}", ThresholdWarning, stacklevel=3)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return CategoryFit(cat, th, evaluate(p_hold, y_hold, th), cal, trained, counts, dict(zip(roles, parts)),
                       p_hold, float(roc_auc_score(y_hold, prompt[hold_idx])), tuple(notes))


def _write_split(path: Path, f: CategoryFit, data: LabeledData) -> None:
    """``row`` (0-based row of the data file), ``role`` (probe / calibrator / holdout) and ``label``: which labelled
    rows did what, so that a later evaluation can use (or avoid) exactly these rows."""
    import pyarrow as pa

    order = np.argsort(np.concatenate(list(f.split.values())), kind="stable")
    rows = np.concatenate([data.rows[p] for p in f.split.values()])[order]
    roles = np.concatenate([[r] * len(p) for r, p in f.split.items()])[order]
    labels = np.concatenate([data.labels[f.category][p] for p in f.split.values()])[order]
    table = pa.table({"row": pa.array(rows, pa.int64()), "role": pa.array(roles.tolist(), pa.string()),
                      "label": pa.array(labels, pa.int8())})
    write_parquet_atomic(table, path, durable=False)


def _extends_ref(parent: Policy, out_dir: Path) -> str | None:
    """How ``out_dir/policy.yaml`` can name its parent: a shipped name, or a path relative to ``out_dir`` for a file
    inside it (a policy may extend nothing else), when ``parent`` is what that file loads; else ``None``."""
    if not parent.source:
        return None
    src = Path(parent.source).resolve()
    if src.parent == builtin_policy_dir().resolve():
        ref = src.stem
    elif src.is_relative_to(out_dir.resolve()):
        ref = src.relative_to(out_dir.resolve()).as_posix()
    else:
        return None
    try:  # a Policy edited in memory (with_thresholds) is copied instead
        unchanged = dataclasses.replace(load_policy(src), source=parent.source) == parent
    except SafeclipError:
        unchanged = False
    return ref if unchanged else None


def _artifact_entry(ref: ArtifactRef, out_dir: Path, rel: str) -> dict[str, str]:
    """The policy entry for ``ref`` in ``out_dir/policy.yaml``: a ``url`` stays one; a file is copied to ``rel``."""
    if ref.path is None:
        return {"url": str(ref.url), "sha256": ref.sha256}
    copy_pinned(ref.path, ref.sha256, out_dir / rel)
    return {"path": rel, "sha256": ref.sha256}


def _copied_categories(parent: Policy, out_dir: Path, calibrated: set[str]) -> dict[str, Any]:
    """Every category of ``parent`` written out in full; the artifacts of those not being calibrated are copied
    into ``out_dir`` (under the same pins), since a policy may not name files outside its folder."""
    cats: dict[str, Any] = {}
    for c in parent.categories:
        d: dict[str, Any] = {"description": c.description, "prompts": list(c.prompts), "contrast": list(c.contrast),
                             "templates": list(c.templates), "thresholds": {"flag": c.flag, "block": c.block}}
        if c.head is not None:  # kept for calibrated categories too: their new calibrator may stack it
            d["head"] = _artifact_entry(c.head, out_dir, f"heads/{c.name}{c.head.path.suffix if c.head.path else ''}")
        if c.name not in calibrated:
            for kind, ref in (("probe", c.probe), ("calibrator", c.calibrator)):
                if ref is not None:
                    d[kind] = _artifact_entry(ref, out_dir, f"{kind}s/{c.name}.json")
        cats[c.name] = d
    return cats


def _encoder_entry(parent: Policy, encoder_id: str) -> dict[str, str] | None:
    """The ``encoder:`` that selects the encoder of ``encoder_id``: the parent's when it embeds there, else the
    pretrained tag or ``hf-hub:`` model the id names; each checked by the space it names without loading weights.
    None when no such mapping is known: the id names its weights by a hash (a local checkpoint, whose path it does
    not hold), or the parent's local checkpoint is not here."""
    from safeclip.embed import encoder_id_matches, known_encoder_id

    candidates = [dict(parent.encoder)] if parent.encoder.get("model") else []
    arch, _, rest = encoder_id.partition("|")
    weights = rest.partition("|")[0]
    if weights.startswith("hf-hub:"):
        candidates.append({"model": weights})
    elif weights and not weights.startswith("sha256:") and arch != "local-dir":
        # ViT-B-32 + openai runs as ViT-B-32-quickgelu (see safeclip.embed): a policy names it the first way.
        candidates += [{"model": m, "pretrained": weights} for m in dict.fromkeys((arch.removesuffix("-quickgelu"),
                                                                                  arch))]
    for cand in candidates:
        try:
            known = known_encoder_id(cand["model"], cand.get("pretrained"))
        except SafeclipError:  # weights no encoder could load: not a choice to write
            continue
        if known is not None and encoder_id_matches(encoder_id, known):
            return cand
    return None


def _write_policy(out_dir: Path, parent: Policy, fits: Sequence[CategoryFit], data: LabeledData,
                  name: str | None, targets: Mapping[str, Any]) -> Path:
    """``out_dir/policy.yaml``: extends ``parent`` (see :func:`_extends_ref`), else holds a full copy of it; the
    calibrated categories get their thresholds and pinned artifacts."""
    import yaml

    pins = hashlib.sha256(json.dumps(
        [[f.category, f.probe_sha256, f.calibrator_sha256, f.thresholds.flag, f.thresholds.block] for f in fits]
    ).encode()).hexdigest()[:8]
    ref = _extends_ref(parent, out_dir)
    cats = {} if ref else _copied_categories(parent, out_dir, {f.category for f in fits})
    for f in fits:
        cats.setdefault(f.category, {}).update({
            "thresholds": {"flag": f.thresholds.flag, "block": f.thresholds.block},
            "probe": None if f.probe_sha256 is None else {"path": f"probes/{f.category}.json",
                                                          "sha256": f.probe_sha256},
            "calibrator": {"path": f"calibrators/{f.category}.json", "sha256": f.calibrator_sha256},
        })
    doc: dict[str, Any] = {
        "name": name or parent.name,
        "version": f"{parent.version}+cal.{pins}",
        "description": f"{parent.name}@{parent.version} with {', '.join(f.category for f in fits)} calibrated by "
                       f"`safeclip calibrate` on {data.name}",
    }
    encoder = _encoder_entry(parent, data.encoder_id)
    if ref:
        doc["extends"] = ref
    if encoder is not None:  # the policy selects the encoder its probes and calibrators were fitted in
        doc["encoder"] = encoder
    if not ref:
        doc["scoring"] = {"logit_scale": parent.logit_scale, "templates": list(parent.categories[0].templates),
                          "neutral": list(parent.neutral), "top_prompts": parent.top_prompts}
    doc["categories"] = cats
    goal = (f"block precision >= {targets['block_precision']}, flag recall >= {targets['flag_recall']} at "
            f"{targets['confidence']:.0%} confidence")
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    copied = "" if ref else (
        f"# A full copy of {parent.id} ({parent.source or 'edited in memory'}): a policy extends only shipped\n"
        "# policies and files in its own folder, so the parent and its artifacts are copied here.\n")
    unnamed = "" if encoder is not None else (
        "# No encoder: is written: the model and weights of this encoder_id are not known here (a local\n"
        "# checkpoint is named by its hash, not its path); add encoder: {model: ..., pretrained: ...}\n"
        "# or pass --model/--pretrained.\n")
    header = (f"# Written by `safeclip calibrate` (safeclip.calibration.calibrate_policy) on {now}\n"
              f"# from {data.name} ({len(data)} rows), encoder {data.encoder_id}.\n"
              f"{unnamed}"
              f"# Thresholds target {goal},\n"
              "# chosen on held-out rows; a null threshold never fires (the data could not support its target).\n"
              f"{copied}"
              "# See calibration.json and reports/<category>/ in this folder.\n")
    path = out_dir / "policy.yaml"
    write_bytes_atomic(path, (header + yaml.safe_dump(doc, sort_keys=False, width=110)).encode())
    return path


def _verify(path: Path, data: LabeledData, texts: Callable[[list[str]], np.ndarray],
            fits: Sequence[CategoryFit]) -> str:
    """Reload the written policy and check it reproduces the held-out probabilities, calibrated."""
    pol = load_policy(path)
    comp = CompiledPolicy.build(pol, texts, data.encoder_id)
    for f in fits:
        j = comp.scorer.categories.index(f.category)
        held = comp.decide(data.embeddings[f.split["holdout"]])  # the decision object, as the runtime decides
        probs, calibrated = held.probabilities, held.calibrated
        if not calibrated[j]:
            raise SafeclipError(f"internal check failed: {path} leaves {f.category!r} uncalibrated")
        off = np.abs(probs[:, j].astype(np.float64) - f.p_holdout) > _VERIFY_TOLERANCE
        if off.mean() > _VERIFY_MAX_OFF:
            raise SafeclipError(f"internal check failed: {path} gives {f.category!r} probabilities that differ from "
                                f"the fitted calibrator's by more than {_VERIFY_TOLERANCE} on {off.mean():.1%} of "
                                "the held-out rows")
    return pol.id


def calibrate_policy(
    policy: PolicyLike,
    data: LabeledData | LabeledSource,
    categories: Sequence[str],
    *,
    out: str | os.PathLike[str],
    block_precision: float | None = 0.95,
    flag_recall: float | None = 0.9,
    confidence: float = 0.95,
    probe: bool = True,
    head: bool = True,
    method: str = "auto",
    holdout: float = 0.3,
    probe_fraction: float = 0.5,
    seed: int = 0,
    name: str | None = None,
    embed_texts: Callable[[list[str]], np.ndarray] | None = None,
    allow_disabled: bool = False,
) -> CalibrationResult:
    """Fit ``categories`` of ``policy`` on labelled ``data`` and write a calibrated policy into ``out`` (see the
    module doc for the split and the files).

    ``data``: a :class:`~safeclip.calibration.LabeledData`, or a file / table that :func:`load_labeled` reads with
    its defaults. ``block_precision`` / ``flag_recall``: the targets (``None``: no such threshold); ``probe``: also
    train a linear probe and calibrate the prompt and probe signals together; ``head``: stack the head a category
    already has (LAION's NSFW head in ``laion-nsfw-b32``) with its other signals, as it is; ``method``: ``"auto"``, ``"sigmoid"``
    or ``"isotonic"`` (see :class:`~safeclip.calibrate.Calibrator`); ``seed``: the split's and the probe's CV folds';
    ``name``: the written policy's name (default: the input policy's). ``embed_texts``: prompt embeddings for the
    data's space (default: the data's own source, else the prompt cache). Unsupported targets and doubtful fits emit
    a :class:`~safeclip.calibration.CalibrationWarning` naming the category, also kept in the result.

    A category for which neither threshold can meet its target would never flag or block again: that is refused
    with a :class:`~safeclip.errors.DataError` before anything is written, unless ``allow_disabled=True``.
    """
    parent, cats, out_dir = check_calibration_request(policy, categories, out, block_precision, flag_recall)
    for label, v in (("holdout", holdout), ("probe_fraction", probe_fraction), ("confidence", confidence)):
        _fraction(label, v)
    for label, v in (("block_precision", block_precision), ("flag_recall", flag_recall)):
        if v is not None:
            _fraction(label, v)
    data = _as_data(data, parent, cats)
    texts = _texts(parent, data, embed_texts)
    comp = _compile(parent, data, texts)
    prompt_all = comp.scorer.score(data.embeddings).prompt  # (n, C) float32: the prompt signal of every category
    settings = {"block_precision": block_precision, "flag_recall": flag_recall, "confidence": confidence,
                "probe": probe, "head": head, "method": method, "holdout": holdout, "probe_fraction": probe_fraction, "seed": seed}
    fits = [_fit_category(c, data, comp, prompt_all, **settings) for c in cats]
    disabled = [f.category for f in fits if f.thresholds.flag is None and f.thresholds.block is None]
    if disabled and not allow_disabled:
        raise DataError(
            f"calibrating would turn moderation off for {', '.join(disabled)}: no threshold meets the targets (block precision {block_precision}, flag recall {flag_recall} at "
            f"{confidence:.0%} confidence) on these labels, so the policy would never flag or block. Add labelled "
            "rows, lower the targets, or pass allow_disabled=True (--allow-disabled) to write it anyway; nothing "
            "was written")

    source = {"file": None if data.source is None else str(data.source), "sha256": data.sha256}
    split = {"seed": seed, "holdout": holdout, "probe_fraction": probe_fraction if probe else None,
             "rule": _SPLIT_RULE}
    targets = {"block_precision": block_precision, "flag_recall": flag_recall, "confidence": confidence}
    previous = out_dir / "policy.yaml"
    if previous.is_file():  # so that the first calibration into a folder can be rolled back
        try:
            record(previous, reason="before safeclip calibrate")
        except (PolicyError, ArtifactIntegrityError) as e:  # not a policy: no version to return to
            warnings.warn(f"{previous} is replaced without a version recorded: it does not load "
                          f"({str(e).splitlines()[-1].strip()})", CalibrationWarning, stacklevel=2)
    saved = []
    for f in fits:
        meta = {"category": f.category, "policy": parent.id, "data": source, "split": split, "rows": f.rows,
                "targets": targets}
        probe_sha = None
        if f.probe is not None:
            f.probe.metadata.update(jsonable({"policy": parent.id, "data": source, "split": split}))
            probe_sha = f.probe.save(out_dir / "probes" / f"{f.category}.json")
        f.calibrator.metadata.update(jsonable({
            **meta, "holdout": {"roc_auc": f.report.roc_auc, "pr_auc": f.report.pr_auc, "ece": f.report.ece,
                                "brier": f.report.brier}, "thresholds": f.thresholds.to_dict()}))
        cal_sha = f.calibrator.save(out_dir / "calibrators" / f"{f.category}.json")
        f.report.save(out_dir / "reports" / f.category)
        _write_split(out_dir / "reports" / f.category / "split.parquet", f, data)
        saved.append(dataclasses.replace(f, probe_sha256=probe_sha, calibrator_sha256=cal_sha))
    policy_path = _write_policy(out_dir, parent, saved, data, name, targets)
    policy_id = _verify(policy_path, data, texts, saved)
    shown = "".join(c if c.isprintable() else "?" for c in data.name)[:200]
    record(policy_path, reason=f"safeclip calibrate on {shown}")

    summary = jsonable({
        "kind": "safeclip.calibration_run", "policy": policy_id, "policy_file": "policy.yaml", "parent": parent.id,
        "encoder_id": data.encoder_id, "data": {**source, "rows": int(data.n_rows), "embedded_rows": len(data)},
        "targets": targets, "split": split, "method": method, "probe": bool(probe),
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
            "warnings": list(f.warnings),
        } for f in saved},
    })
    write_json_atomic(out_dir / "calibration.json", summary)
    return CalibrationResult(
        policy_path=policy_path, policy_id=policy_id, parent_id=parent.id, encoder_id=data.encoder_id, out=out_dir,
        fits=MappingProxyType({f.category: f for f in saved}), summary=MappingProxyType(summary),
        warnings=tuple(f"{f.category}: {w}" for f in saved for w in f.warnings))


# ================================================================================================ evaluate
def evaluate_policy(
    policy: PolicyLike,
    data: LabeledData | LabeledSource,
    categories: Sequence[str] | None = None,
    *,
    confidence: float = 0.95,
    reports: str | os.PathLike[str] | None = None,
    embed_texts: Callable[[list[str]], np.ndarray] | None = None,
) -> EvaluationResult:
    """Measure ``policy`` on labelled ``data``: per category (default: every category the data labels) its
    probabilities' ranking and calibration, and precision / recall at its thresholds with lower bounds at
    ``confidence``. ``reports``: also write ``reports/<category>/report.json`` and its plots.

    ``data``: a :class:`~safeclip.calibration.LabeledData`, or a file / table that :func:`load_labeled` reads with
    its defaults. Use rows the calibration never saw (e.g. ``data.take(fit.split["holdout"])``).
    """
    _fraction("confidence", confidence)
    pol = load_policy(policy)
    data = _as_data(data, pol, categories)
    cats = check_categories(pol, data.categories if categories is None else categories)
    comp = _compile(pol, data, _texts(pol, data, embed_texts))
    verdicts = comp.decide(data.embeddings)  # the decision object, as the runtime decides
    probs, calibrated = verdicts.probabilities, verdicts.calibrated
    out: dict[str, CategoryEvaluation] = {}
    for cat in cats:
        j = comp.scorer.categories.index(cat)
        c = pol.category(cat)
        rows, y = _labelled_rows(data, cat)
        p = np.asarray(probs[rows, j], np.float64)
        th = Thresholds(block=c.block, flag=c.flag, target_block_precision=None, target_flag_recall=None,
                        confidence=confidence, n=int(y.size), n_pos=int(y.sum()))
        rep = evaluate(p, y, th)
        if reports is not None:
            rep.save(Path(reports) / cat)
        at: dict[str, Mapping[str, Any] | None] = {}
        for kind in ("flag", "block"):
            conf = rep.confusion.get(kind)
            if conf is None:
                at[kind] = None
                continue
            d = dict(conf)
            d["precision_lower_bound"] = float(precision_lower_bound(d["tp"], d["fp"], confidence))
            d["recall_lower_bound"] = float(recall_lower_bound(d["tp"], rep.n_pos, confidence)) \
                if rep.n_pos else None
            at[kind] = MappingProxyType(d)
        out[cat] = CategoryEvaluation(cat, bool(calibrated[j]), rep, at["flag"], at["block"])
    return EvaluationResult(pol.id, data.encoder_id, data.source, len(data), float(confidence),
                            MappingProxyType(out))
