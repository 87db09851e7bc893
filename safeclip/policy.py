"""Policies: YAML files of categories, prompts, artifacts and thresholds, validated fully.

A policy file is data from a user. :func:`load_policy` reads it with ``yaml.safe_load``, resolves ``extends:``,
checks every field and raises one :class:`~safeclip.errors.PolicyError` listing every problem with its location
(``file: categories.sexual.thresholds.flag: ...``).

Format (see ``policies/default.yaml``)::

    name: default
    version: "1.0"
    extends: default            # optional: a shipped policy name or a path relative to this file
    encoder: {model: ViT-B-32, pretrained: laion2b_s34b_b79k}
    scoring:
      logit_scale: 100.0        # CLIP's temperature for the prompt softmax
      templates: ["a photo of {}."]
      neutral: ["an everyday scene"]   # benign baseline prompts shared by every category
      top_prompts: 3
    categories:
      violence:
        description: ...
        prompts: [a bloody wound]      # positive concepts
        contrast: [a boxing match]     # benign look-alikes
        thresholds: {flag: 0.5, block: 0.85}
        probe: {path: probes/violence.json, sha256: ...}          # optional
        head: {url: https://.../head.pth, sha256: ...}            # optional (see safeclip.heads.MLPHead)
        calibrator: {path: calibrators/violence.json, sha256: ...}  # optional
    review:
      sample: {block: 1.0, flag: 1.0, allow: 0.01}   # share of each action's decisions sent to review (defaults)

An artifact is a local ``path`` (relative to the policy file) or a public ``url``, always with its sha256 pin; a
``url`` is fetched on first use (:func:`safeclip.fetch.fetch_artifact`: an offline mirror in
``$SAFECLIP_ARTIFACTS_DIR``, then the cache, then the network) and checked on every load.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.resources
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .artifacts import resolve_artifact_path
from .bankmeta import bank_kind
from .errors import ArtifactIntegrityError, PolicyError, SafeclipError

__all__ = ["ArtifactRef", "Category", "ReviewRates", "MAX_EXTENDS_DEPTH", "MAX_POLICY_BYTES", "Policy", "UnknownCategoryError",
           "builtin_policy_dir", "list_policies", "load_policy"]

_TOP_KEYS = {"name", "version", "description", "extends", "encoder", "scoring", "categories", "video", "review"}
_VIDEO_KEYS = {"incomplete"}
_INCOMPLETE = ("error", "flag")
_SCORING_KEYS = {"logit_scale", "templates", "neutral", "top_prompts"}
_CATEGORY_KEYS = {"description", "prompts", "contrast", "templates", "thresholds", "probe", "head", "calibrator",
                  "enabled", "banks", "frames"}
_ARTIFACT_KEYS = ("probe", "head", "calibrator")
_BANK_KEYS = {"path", "effect", "action", "max_distance", "min_similarity", "quarantine", "_base", "_file"}
_QUARANTINE_KEYS = {"max_inputs", "window_hours"}
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_URL_RE = re.compile(r"^https?://[^\s/]+/\S+$")


def builtin_policy_dir() -> Path:
    """The folder of the policies shipped with the package."""
    return Path(str(importlib.resources.files("safeclip.policies")))


def list_policies() -> list[str]:
    """Names of the shipped policies."""
    return sorted(p.stem for p in builtin_policy_dir().glob("*.yaml"))


class UnknownCategoryError(PolicyError, KeyError):
    """A category name the policy does not have (also a ``KeyError``, as a mapping lookup would raise)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return Exception.__str__(self)


@dataclass(frozen=True)
class ArtifactRef:
    """A probe, head or calibrator a policy names, with its sha256 pin: a local ``path`` (resolved against the policy
    that named it) or a public ``url`` fetched on first use."""

    path: Path | None
    sha256: str
    url: str | None = None

    def local_path(self) -> Path:
        """The verified local file: ``path``, or the ``url``'s copy from the mirror, the cache or a download.

        Raises :class:`~safeclip.errors.ArtifactUnavailableError` when a ``url`` cannot be fetched (offline).
        """
        if self.path is not None:
            return self.path
        from .fetch import fetch_artifact

        assert self.url is not None
        return fetch_artifact(self.url, self.sha256)

    def __str__(self) -> str:
        return str(self.path) if self.path is not None else str(self.url)


@dataclass(frozen=True)
class Quarantine:
    """Flood quarantine of a bank's entries: an entry that matched more than ``max_inputs`` distinct inputs within
    ``window_hours`` stops deciding on its own (its matches flag) until a person confirms it."""

    max_inputs: int = 100
    window_hours: float = 24.0


@dataclass(frozen=True)
class BankRef:
    """A bank a category matches against: its folder, what a match does and the match threshold.

    ``effect`` ``"deny"``: a match forces the category's ``action`` (``"block"`` or ``"flag"``); ``"allow"``: a
    match to an allowed exemplar overrides the category's score (the fix for a known false positive). ``threshold``
    is the largest Hamming distance (PDQ banks, ``max_distance``) or the smallest cosine similarity (embedding banks,
    ``min_similarity``) that matches.
    """

    path: Path
    kind: str
    effect: str
    action: str
    threshold: float
    quarantine: Quarantine = field(default_factory=Quarantine)

    @property
    def threshold_key(self) -> str:
        return "max_distance" if self.kind == "pdq" else "min_similarity"


DEFAULT_MAX_DISTANCE = 31
"""PDQ's recommended match distance (of 256 bits)."""
DEFAULT_MIN_SIMILARITY = 0.94
"""CLIP cosine similarity from which two images are near-duplicates (clip-retrieval's dedup threshold)."""


@dataclass(frozen=True)
class Category:
    name: str
    description: str
    prompts: tuple[str, ...]
    contrast: tuple[str, ...]
    templates: tuple[str, ...]
    flag: float | None
    block: float | None
    probe: ArtifactRef | None = None
    calibrator: ArtifactRef | None = None
    head: ArtifactRef | None = None
    banks: tuple[BankRef, ...] = ()
    min_frames: int = 1  # ``frames: {min_frames: k}``: a video acts on this category when k sampled frames do


@dataclass(frozen=True)
class ReviewRates:
    """``review: {sample: {block: b, flag: f, allow: a}}``: the share of each action's decisions that go to the review
    queue (``safeclip.review``). Every flag and block and 1% of allows by default: verdicts on sampled allows are
    what let recalibration estimate recall (each sampled item stands for ``1 / rate`` decisions)."""

    block: float = 1.0
    flag: float = 1.0
    allow: float = 0.01

    def rate(self, action: str) -> float:
        """The sampling probability of a decision whose action is ``action``."""
        if action not in ("allow", "flag", "block"):
            raise ValueError(f"unknown action {action!r}")
        return float(getattr(self, action))

    def to_dict(self) -> dict[str, float]:
        return {"block": self.block, "flag": self.flag, "allow": self.allow}


@dataclass(frozen=True)
class Policy:
    """A validated policy. Build one with :func:`load_policy`."""

    name: str
    version: str
    description: str
    categories: tuple[Category, ...]
    logit_scale: float
    neutral: tuple[str, ...]
    top_prompts: int = 3
    encoder: Mapping[str, str] = field(default_factory=dict)
    source: str | None = None
    video_incomplete: str = "error"  # ``video: {incomplete: error | flag}``: a clip not fully decoded
    review: ReviewRates = field(default_factory=ReviewRates)  # ``review: {sample: {...}}``

    @property
    def id(self) -> str:
        """``name@version``, recorded in every Decision and audit row."""
        return f"{self.name}@{self.version}"

    @property
    def category_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.categories)

    def category(self, name: str) -> Category:
        for c in self.categories:
            if c.name == name:
                return c
        raise UnknownCategoryError(f"policy {self.id} has no category {name!r}; it has {list(self.category_names)}")

    def to_dict(self, relative_to: str | os.PathLike[str] | None = None) -> dict[str, Any]:
        """The policy as a document :func:`load_policy` reads back to an equal policy: ``extends`` resolved, every
        field written out (what ``safeclip policy show`` prints).

        Artifact paths are written relative to the folder ``relative_to`` when they lie inside it (save the document
        there), else absolute (loading it then needs ``allow_outside``). A category's templates are written only
        where they differ from ``scoring.templates``.
        """
        base = Path(relative_to).resolve() if relative_to is not None else None

        def artifact(ref: ArtifactRef | None) -> dict[str, str] | None:
            if ref is None:
                return None
            if ref.path is None:
                return {"url": str(ref.url), "sha256": ref.sha256}
            path = ref.path
            if base is not None and path.is_relative_to(base):
                return {"path": path.relative_to(base).as_posix(), "sha256": ref.sha256}
            return {"path": str(path), "sha256": ref.sha256}

        def bank(ref: BankRef) -> dict[str, Any]:
            path = ref.path
            shown = path.relative_to(base).as_posix() if base is not None and path.is_relative_to(base) else str(path)
            out: dict[str, Any] = {"path": shown, "effect": ref.effect}
            if ref.effect == "deny":
                out["action"] = ref.action
            out[ref.threshold_key] = int(ref.threshold) if ref.kind == "pdq" else ref.threshold
            out["quarantine"] = {"max_inputs": ref.quarantine.max_inputs,
                                 "window_hours": ref.quarantine.window_hours}
            return out

        # A loaded policy keeps only each category's templates: the most common set stands for scoring.templates.
        counts: dict[tuple[str, ...], int] = {}
        for c in self.categories:
            counts[c.templates] = counts.get(c.templates, 0) + 1
        templates = list(max(counts, key=counts.__getitem__)) if counts else []
        doc: dict[str, Any] = {"name": self.name, "version": self.version}
        if self.description:
            doc["description"] = self.description
        if self.encoder:
            doc["encoder"] = dict(self.encoder)
        doc["scoring"] = {"logit_scale": self.logit_scale, "templates": templates, "neutral": list(self.neutral),
                          "top_prompts": self.top_prompts}
        cats: dict[str, Any] = {}
        for c in self.categories:
            entry: dict[str, Any] = {}
            if c.description:
                entry["description"] = c.description
            if c.prompts or not c.banks:
                entry["prompts"] = list(c.prompts)
            entry["contrast"] = list(c.contrast)
            if list(c.templates) != templates:
                entry["templates"] = list(c.templates)
            if c.flag is not None or c.block is not None or not c.banks:
                entry["thresholds"] = {"flag": c.flag, "block": c.block}
            for key in _ARTIFACT_KEYS:
                ref = artifact(getattr(c, key))
                if ref is not None:
                    entry[key] = ref
            if c.banks:
                entry["banks"] = [bank(b) for b in c.banks]
            if c.min_frames != 1:
                entry["frames"] = {"min_frames": c.min_frames}
            cats[c.name] = entry
        doc["categories"] = cats
        if self.video_incomplete != "error":
            doc["video"] = {"incomplete": self.video_incomplete}
        if self.review != ReviewRates():
            doc["review"] = {"sample": self.review.to_dict()}
        return doc

    def with_thresholds(self, name: str, *, flag: float | None, block: float | None) -> Policy:
        """A copy with one category's thresholds changed (for notebooks): ``p.with_thresholds("drugs", flag=.4, block=.9)``."""
        _check_thresholds(flag, block, name)
        cats = tuple(dataclasses.replace(c, flag=flag, block=block) if c.name == name else c for c in self.categories)
        self.category(name)
        return dataclasses.replace(self, categories=cats)


def _check_thresholds(flag: float | None, block: float | None, where: str) -> None:
    for key, v in (("flag", flag), ("block", block)):
        if v is not None and not (isinstance(v, (int, float)) and 0.0 <= float(v) <= 1.0):
            raise PolicyError(f"{where}: thresholds.{key}: must be a number in [0, 1] or null, got {v!r}")
    if flag is not None and block is not None and float(flag) > float(block):
        raise PolicyError(f"{where}: thresholds: flag ({flag}) must not exceed block ({block})")


# ------------------------------------------------------------------------------------------------ loading
MAX_POLICY_BYTES = 1 << 20
"""A policy file larger than this is refused before it is parsed (real policies are a few KiB)."""
MAX_EXTENDS_DEPTH = 16
"""The longest ``extends`` chain accepted."""
_POLICY_SUFFIXES = (".yaml", ".yml")


class _PolicyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses aliases (no "billion laughs" expansion) and duplicate mapping keys."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.constructor.ConstructorError(
                None, None, "YAML aliases (*name) are not allowed in a policy file; write the value out",
                event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                continue  # SafeLoader reports unhashable keys itself
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark,
                    f"duplicate key {_printable(key)} (first given at line {seen[key].line + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def _printable(value: Any, limit: int = 80) -> str:
    """``repr`` with control characters escaped and a length bound: policy text never reaches a terminal raw."""
    text = repr(value)
    text = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode() for ch in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_bare_name(ref: str) -> bool:
    return "/" not in ref and os.sep not in ref and not ref.endswith(_POLICY_SUFFIXES)


def _close_names(ref: str) -> str:
    import difflib

    close = difflib.get_close_matches(ref, list_policies(), n=3, cutoff=0.6)
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def _resolve_top(ref: str, origin: str) -> Path:
    """The file a caller's policy reference names: a shipped name, or a path to a YAML file."""
    if _is_bare_name(ref):
        builtin = builtin_policy_dir() / f"{ref}.yaml"
        if builtin.is_file():
            return builtin
        hint = f" (a file named {ref!r} exists here: pass ./{ref} to load it)" if Path(ref).is_file() else ""
        raise PolicyError(f"{origin}: no such policy {_printable(ref)}: not a shipped name{_close_names(ref)} "
                          f"(shipped: {', '.join(list_policies())}; a policy file is a path ending in .yaml){hint}")
    p = Path(ref).expanduser()
    if not p.is_file():
        what = "is a folder, not a policy file" if p.is_dir() else "no such file"
        raise PolicyError(f"{origin}: {ref}: {what}")
    return p


def _resolve_extends(ref: Any, path: Path, allow_outside: bool) -> Path:
    """The parent an ``extends:`` names: a shipped name, or a ``.yaml`` file in the naming file's folder."""
    where = f"{path}: extends"
    if not isinstance(ref, str) or not ref.strip():
        raise PolicyError(f"{where}: must be a shipped policy name or a path to a .yaml file, got {_printable(ref)}")
    if _is_bare_name(ref):
        builtin = builtin_policy_dir() / f"{ref}.yaml"
        if builtin.is_file():
            return builtin
        raise PolicyError(f"{where}: no shipped policy named {_printable(ref)}{_close_names(ref)} (shipped: "
                          f"{', '.join(list_policies())}; to extend a file, give its path ending in .yaml)")
    if not ref.endswith(_POLICY_SUFFIXES):
        raise PolicyError(f"{where}: {_printable(ref)} is not a policy file (policy files end in .yaml or .yml)")
    base = path.parent.resolve()
    target = (base / Path(ref).expanduser()).resolve()
    if not allow_outside and not target.is_relative_to(base):
        raise PolicyError(f"{where}: {_printable(ref)} lies outside the policy's folder {base} (extend a shipped "
                          "policy or a file beside this one, or pass allow_outside=True / --allow-outside)")
    if not target.is_file():
        raise PolicyError(f"{where}: no such policy file {_printable(ref)} (looked in {base})")
    return target


def _read_yaml(path: Path, *, extended: bool = False) -> dict[str, Any]:
    """Parse one policy file. Nothing of a file reached through ``extends`` is echoed unless it is a policy."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_POLICY_BYTES + 1)
    except OSError as e:
        raise PolicyError(f"{path}: cannot read: {e.strerror or e}") from e
    if len(raw) > MAX_POLICY_BYTES:
        raise PolicyError(f"{path}: larger than {MAX_POLICY_BYTES // 1024} KiB; a policy file is a few KiB of YAML")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PolicyError(f"{path}: not UTF-8 text (byte {e.start}); save the policy as UTF-8") from e
    try:
        data = yaml.load(text, Loader=_PolicyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e)
        if extended:
            raise PolicyError(f"{path}: not a valid policy file (YAML error at line "
                              f"{mark.line + 1 if mark else '?'})") from None
        if mark is None:
            raise PolicyError(f"{path}: invalid YAML: {_printable(problem, 200)}") from None
        lines = text.splitlines()
        line = lines[mark.line] if mark.line < len(lines) else ""
        shown = _printable(line[:160], 170)[1:-1]
        raise PolicyError(f"{path}:{mark.line + 1}:{mark.column + 1}: invalid YAML: {problem}\n"
                          f"  {shown}\n  {' ' * min(mark.column, 160)}^") from None
    except RecursionError:
        raise PolicyError(f"{path}: nested too deeply to be a policy") from None
    if not isinstance(data, dict):
        if extended:
            raise PolicyError(f"{path}: not a policy file (a policy is a YAML mapping)")
        raise PolicyError(f"{path}: a policy must be a YAML mapping, got {type(data).__name__}")
    return data


def _merged(path: Path, allow_outside: bool, chain: tuple[Path, ...] = ()) -> tuple[dict[str, Any], list[str], bool]:
    """The raw mapping of ``path`` with its ``extends`` chain merged in; artifact paths made absolute.

    Returns ``(mapping, problems, complete)``: a parent that cannot be found is a problem, not an exception, and the
    mapping is then what the chain holds without it (``complete`` False), so the file's other problems are
    reported too."""
    path = path.resolve()
    if path in chain:
        raise PolicyError(f"{path}: extends: cycle through {' -> '.join(str(p) for p in chain + (path,))}")
    if len(chain) >= MAX_EXTENDS_DEPTH:
        raise PolicyError(f"{chain[0]}: extends: a chain of more than {MAX_EXTENDS_DEPTH} policies")
    data = copy.deepcopy(_read_yaml(path, extended=bool(chain)))
    problems: list[str] = []
    # Artifact paths are relative to the file that names them: record each file's own directory.
    cats = data.get("categories")
    if isinstance(cats, dict):
        for cat in cats.values():
            if isinstance(cat, dict):
                for key in _ARTIFACT_KEYS:
                    if isinstance(cat.get(key), dict):
                        cat[key] = dict(cat[key], _base=str(path.parent), _file=str(path))
                if isinstance(cat.get("banks"), list):
                    cat["banks"] = [dict(b, _base=str(path.parent)) if isinstance(b, dict) else b
                                    for b in cat["banks"]]
    parent_ref = data.pop("extends", None)
    if parent_ref is None:
        return data, problems, True
    try:
        parent_path = _resolve_extends(parent_ref, path, allow_outside)
    except PolicyError as e:
        return data, problems + e.problems, False
    parent, parent_problems, complete = _merged(parent_path, allow_outside, chain + (path,))
    problems += parent_problems
    merged = parent
    for key, value in data.items():
        if key == "scoring" and isinstance(value, dict) and isinstance(merged.get("scoring"), dict):
            merged["scoring"] = {**merged["scoring"], **value}
        elif key == "categories" and isinstance(value, dict) and isinstance(merged.get("categories"), dict):
            out = dict(merged["categories"])
            for cname, cat in value.items():
                if cat is None:  # `name: null` removes an inherited category
                    out.pop(cname, None)
                elif isinstance(cat, dict) and isinstance(out.get(cname), dict):
                    base = dict(out[cname])
                    if "thresholds" in cat and isinstance(cat["thresholds"], dict) and isinstance(
                            base.get("thresholds"), dict):
                        cat = {**cat, "thresholds": {**base["thresholds"], **cat["thresholds"]}}
                    out[cname] = {**base, **cat}
                else:
                    out[cname] = cat
            merged["categories"] = out
        else:
            merged[key] = value
    return merged, problems, complete


def _str_list(value: Any, where: str, problems: list[str], *, allow_empty: bool = False) -> tuple[str, ...]:
    if value is None and allow_empty:
        return ()
    if not isinstance(value, list) or (not value and not allow_empty):
        problems.append(f"{where}: must be a {'' if allow_empty else 'non-empty '}list of strings")
        return ()
    out = []
    for i, v in enumerate(value):
        if not isinstance(v, str) or not v.strip():
            problems.append(f"{where}[{i}]: must be a non-empty string, got {v!r}")
        else:
            out.append(v.strip())
    if len(set(out)) != len(out):
        dupes = sorted({v for v in out if out.count(v) > 1})
        problems.append(f"{where}: duplicate entries {dupes}")
    return tuple(out)


def _templates(value: Any, where: str, problems: list[str]) -> tuple[str, ...]:
    out = _str_list(value, where, problems)
    for i, t in enumerate(out):
        try:
            ok = t.count("{}") == 1 and t.format("x").count("x") >= 1
        except (IndexError, KeyError, ValueError):
            ok = False
        if not ok:
            problems.append(f"{where}[{i}]: a template must contain '{{}}' exactly once and no other braces "
                            f"(write {{{{ and }}}} for literal ones), got {_printable(t)}")
    return out


def _artifact(value: Any, where: str, problems: list[str], allow_outside: bool) -> ArtifactRef | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        problems.append(f"{where}: must be a mapping with 'path' (or 'url') and 'sha256'")
        return None
    unknown = set(value) - {"path", "url", "sha256", "_base", "_file"}
    if unknown:
        problems.append(f"{where}: unknown keys {sorted(unknown)} (expected path or url, and sha256)")
    path, url, sha = value.get("path"), value.get("url"), value.get("sha256")
    ok = True
    if (path is None) == (url is None):
        problems.append(f"{where}: give exactly one of 'path' (a file beside the policy) and 'url' (a public "
                        "location, fetched on first use)")
        ok = False
    elif path is not None and (not isinstance(path, str) or not path):
        problems.append(f"{where}.path: must be a non-empty string")
        ok = False
    elif url is not None and (not isinstance(url, str) or not _URL_RE.match(url)):
        problems.append(f"{where}.url: must be an https:// or http:// URL, got {_printable(url)}")
        ok = False
    if not isinstance(sha, str) or not _SHA_RE.match(sha.lower()):
        problems.append(f"{where}.sha256: must be 64 hex digits (the artifact's sha256 pin), got {sha!r}")
        ok = False
    if not ok:
        return None
    if url is not None:
        return ArtifactRef(path=None, sha256=sha.lower(), url=url)
    try:
        resolved = resolve_artifact_path(path, value.get("_base"), allow_outside=allow_outside)
    except ArtifactIntegrityError as e:
        problems.append(f"{where}.path: {e}")
        return None
    if not resolved.is_file():
        problems.append(f"{where}.path: no such file {str(resolved)!r}")
        return None
    return ArtifactRef(path=resolved, sha256=sha.lower())


def _banks(value: Any, where: str, problems: list[str], allow_outside: bool) -> tuple[BankRef, ...]:
    """A category's ``banks:`` list; every problem reported with its location. Each folder is opened to read its
    kind (the threshold key must fit it); what needs the encoder (another embedding space) is checked on compile."""
    if value is None:
        return ()
    if not isinstance(value, list):
        problems.append(f"{where}: must be a list of banks (each a mapping with path, effect and a threshold)")
        return ()
    out: list[BankRef] = []
    for i, b in enumerate(value):
        w = f"{where}[{i}]"
        if not isinstance(b, dict):
            problems.append(f"{w}: must be a mapping with path, effect (deny or allow) and a threshold")
            continue
        for key in sorted(set(b) - _BANK_KEYS):
            problems.append(f"{w}.{key}: unknown key (expected path, effect, action, max_distance or "
                            "min_similarity, quarantine)")
        path, effect, action = b.get("path"), b.get("effect"), b.get("action", "block")
        ok = True
        if not isinstance(path, str) or not path:
            problems.append(f"{w}.path: must be the bank's folder (relative to this policy file)")
            ok = False
        if effect not in ("deny", "allow"):
            problems.append(f"{w}.effect: must be deny (a match forces the action) or allow (a match overrides the "
                            f"category's score), got {_printable(effect)}")
            ok = False
        if action not in ("block", "flag"):
            problems.append(f"{w}.action: must be block or flag, got {_printable(action)}")
            ok = False
        elif effect == "allow" and "action" in b:
            problems.append(f"{w}.action: only a deny bank has an action (an allow match allows)")
        q = b.get("quarantine") or {}
        quarantine = Quarantine()
        if not isinstance(q, dict):
            problems.append(f"{w}.quarantine: must be a mapping with max_inputs and window_hours")
        else:
            for key in sorted(set(q) - _QUARANTINE_KEYS):
                problems.append(f"{w}.quarantine.{key}: unknown key (expected max_inputs, window_hours)")
            mi, wh = q.get("max_inputs", quarantine.max_inputs), q.get("window_hours", quarantine.window_hours)
            if isinstance(mi, bool) or not isinstance(mi, int) or mi < 1:
                problems.append(f"{w}.quarantine.max_inputs: must be a positive integer, got {_printable(mi)}")
            elif _number(wh, f"{w}.quarantine.window_hours", problems, 1 / 60, 24 * 365, nullable=False) is not None:
                quarantine = Quarantine(int(mi), float(wh))
        if not ok:
            continue
        try:
            folder = resolve_artifact_path(path, b.get("_base"), allow_outside=allow_outside)
        except ArtifactIntegrityError as e:
            problems.append(f"{w}.path: {e}")
            continue
        try:
            kind = bank_kind(folder)
        except SafeclipError as e:
            problems.append(f"{w}.path: {e}")
            continue
        key, other = ("max_distance", "min_similarity") if kind == "pdq" else ("min_similarity", "max_distance")
        if other in b:
            problems.append(f"{w}.{other}: {folder} is a {kind} bank, matched by {key}, not {other}")
            continue
        if kind == "pdq":
            t = b.get(key, DEFAULT_MAX_DISTANCE)
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= 128:
                problems.append(f"{w}.max_distance: must be an integer number of bits in [0, 128] (PDQ matches at "
                                f"<= 31), got {_printable(t)}")
                continue
            threshold = float(t)
        else:
            n = _number(b.get(key, DEFAULT_MIN_SIMILARITY), f"{w}.min_similarity", problems, 0.5, 1.0,
                        nullable=False)
            if n is None:
                continue
            threshold = n
        out.append(BankRef(folder, kind, effect, action if effect == "deny" else "allow", threshold, quarantine))
    return tuple(out)


def _min_frames(value: Any, where: str, problems: list[str]) -> int:
    """A category's ``frames: {min_frames: k}`` (default 1: the worst frame of a video decides)."""
    if value is None:
        return 1
    if not isinstance(value, dict):
        problems.append(f"{where}: must be a mapping with min_frames (how many sampled frames of a video must reach "
                        "a threshold for the category to act)")
        return 1
    for key in sorted(set(value) - {"min_frames"}):
        problems.append(f"{where}.{key}: unknown key (expected min_frames)")
    k = value.get("min_frames", 1)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 10_000:
        problems.append(f"{where}.min_frames: must be an integer in [1, 10000] (1: the worst frame decides), got "
                        f"{_printable(k)}")
        return 1
    return int(k)


def _review_rates(value: Any, at: Callable[[str], str], problems: list[str]) -> ReviewRates:
    """``review: {sample: {block, flag, allow}}``, each a probability in [0, 1]; a missing action keeps its default."""
    if value is None:
        return ReviewRates()
    if not isinstance(value, dict):
        problems.append(at("review: must be a mapping with sample: {block: B, flag: F, allow: A}"))
        return ReviewRates()
    for key in sorted(set(value) - {"sample"}):
        problems.append(at(f"review.{key}: unknown key (expected sample)"))
    sample = value.get("sample") or {}
    if not isinstance(sample, dict):
        problems.append(at("review.sample: must be a mapping of action (block, flag, allow) to the share of its "
                           "decisions sent to review, in [0, 1]"))
        return ReviewRates()
    rates = ReviewRates().to_dict()
    for key in sorted(set(sample) - set(rates), key=str):
        problems.append(at(f"review.sample.{_printable(key)}: unknown action (expected block, flag, allow)"))
    for action in rates:
        if action in sample:
            v = _number(sample[action], at(f"review.sample.{action}"), problems, 0, 1, nullable=False)
            if v is not None:
                rates[action] = v
    return ReviewRates(**rates)


def _number(value: Any, where: str, problems: list[str], lo: float, hi: float, *, nullable: bool) -> float | None:
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= float(value) <= hi:
        problems.append(f"{where}: must be a number in [{lo}, {hi}]{' or null' if nullable else ''}, got {value!r}")
        return None
    return float(value)


def load_policy(
    source: str | os.PathLike[str] | Policy | None = None, *, allow_outside: bool = False
) -> Policy:
    """Load and validate a policy: a shipped name (``"default"``, ``"strict"``, ``"lenient"``) or a YAML path.

    ``allow_outside`` lets artifact paths point outside the policy file's directory.

    >>> p = load_policy("default")
    >>> "violence" in p.category_names
    True
    """
    if isinstance(source, Policy):
        return source
    if source is None:
        env = os.environ.get("SAFECLIP_POLICY")
        source, origin = (env, "$SAFECLIP_POLICY") if env else ("default", "policy")
    else:
        origin = "policy"
    path = _resolve_top(os.fspath(source), origin)
    data, problems, complete = _merged(path, allow_outside)
    where0 = str(path)

    def at(field_path: str) -> str:
        return f"{where0}: {field_path}"

    def inherited(mapping: dict[str, Any], key: str) -> bool:
        # A parent that was not found may hold what this file leaves out: no problem is claimed about it.
        return not complete and mapping.get(key) is None

    for key in sorted(set(data) - _TOP_KEYS):
        problems.append(at(f"{key}: unknown key (expected one of {sorted(_TOP_KEYS)})"))
    name = data.get("name")
    if inherited(data, "name"):
        name = path.stem
    elif not isinstance(name, str) or not name:
        problems.append(at("name: must be a non-empty string"))
        name = path.stem
    elif not _ID_RE.match(name):
        problems.append(at(f"name: {_printable(name)} must be 1-64 letters, digits or ._+- (it names the policy in "
                           "every decision)"))
        name = path.stem
    version = data.get("version", "0")
    if not isinstance(version, (str, int, float)) or isinstance(version, bool) or not _ID_RE.match(str(version)):
        problems.append(at(f"version: must be a string of 1-64 letters, digits or ._+-, got {_printable(version)}"))
        version = "0"
    description = data.get("description", "")
    if not isinstance(description, str):
        problems.append(at("description: must be a string"))
        description = ""
    elif any(not ch.isprintable() and ch not in "\n\t" for ch in description):
        problems.append(at("description: holds control characters (escape codes reach terminals raw)"))
        description = ""
    encoder = data.get("encoder") or {}
    if not isinstance(encoder, dict) or not all(isinstance(v, str) for v in encoder.values()) or (
            set(encoder) - {"model", "pretrained"}):
        problems.append(at("encoder: must be a mapping with string 'model' and 'pretrained'"))
        encoder = {}

    scoring = data.get("scoring")
    if inherited(data, "scoring"):
        scoring = {}
    elif not isinstance(scoring, dict):
        problems.append(at("scoring: must be a mapping with logit_scale, templates, neutral"))
        scoring = {}
    for key in sorted(set(scoring) - _SCORING_KEYS):
        problems.append(at(f"scoring.{key}: unknown key (expected one of {sorted(_SCORING_KEYS)})"))
    logit_scale = 100.0 if inherited(scoring, "logit_scale") else _number(
        scoring.get("logit_scale"), at("scoring.logit_scale"), problems, 1e-3, 1e4, nullable=False) or 100.0
    templates = () if inherited(scoring, "templates") else _templates(
        scoring.get("templates"), at("scoring.templates"), problems)
    neutral = () if inherited(scoring, "neutral") else _str_list(scoring.get("neutral"), at("scoring.neutral"),
                                                                 problems)
    top = scoring.get("top_prompts", 3)
    if not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= 50:
        problems.append(at(f"scoring.top_prompts: must be an integer in [0, 50], got {top!r}"))
        top = 3

    cats_raw = data.get("categories")
    categories: list[Category] = []
    if inherited(data, "categories"):
        cats_raw = {}
    elif not isinstance(cats_raw, dict) or not cats_raw:
        problems.append(at("categories: must be a non-empty mapping of category name -> settings"))
        cats_raw = {}
    for cname, cat in cats_raw.items():
        w = f"categories.{cname}"
        if not isinstance(cname, str) or not _NAME_RE.match(cname):
            problems.append(at(f"{w}: category names are lower_snake_case identifiers"))
            continue
        if cat is None and not complete:  # removes a category the missing parent may have
            continue
        if not isinstance(cat, dict):
            problems.append(at(f"{w}: must be a mapping"))
            continue
        for key in sorted(set(cat) - _CATEGORY_KEYS):
            problems.append(at(f"{w}.{key}: unknown key (expected one of {sorted(_CATEGORY_KEYS)})"))
        enabled = cat.get("enabled", True)
        if not isinstance(enabled, bool):
            problems.append(at(f"{w}.enabled: must be true or false, got {_printable(enabled)}"))
        elif not enabled:
            continue
        desc = cat.get("description", "")
        if not isinstance(desc, str):
            problems.append(at(f"{w}.description: must be a string"))
            desc = ""
        banks = _banks(cat.get("banks"), at(f"{w}.banks"), problems, allow_outside)
        bank_only = bool(banks) and cat.get("prompts") is None
        prompts = () if (inherited(cat, "prompts") or bank_only) else _str_list(
            cat.get("prompts"), at(f"{w}.prompts"), problems)
        contrast = _str_list(cat.get("contrast"), at(f"{w}.contrast"), problems, allow_empty=True)
        overlap = sorted(set(prompts) & set(contrast))
        if overlap:
            problems.append(at(f"{w}: prompts and contrast share {overlap}"))
        ctemplates = _templates(cat["templates"], at(f"{w}.templates"), problems) if "templates" in cat else templates
        th = cat.get("thresholds")
        flag = block = None
        if inherited(cat, "thresholds") or (bank_only and th is None):
            pass
        elif not isinstance(th, dict) or not ({"flag", "block"} & set(th)):
            problems.append(at(f"{w}.thresholds: must be a mapping with flag and/or block"))
        else:
            for key in sorted(set(th) - {"flag", "block"}):
                problems.append(at(f"{w}.thresholds.{key}: unknown key (expected flag, block)"))
            flag = _number(th.get("flag"), at(f"{w}.thresholds.flag"), problems, 0, 1, nullable=True)
            block = _number(th.get("block"), at(f"{w}.thresholds.block"), problems, 0, 1, nullable=True)
            if flag is not None and block is not None and flag > block:
                problems.append(at(f"{w}.thresholds: flag ({flag}) must not exceed block ({block})"))
        min_frames = _min_frames(cat.get("frames"), at(f"{w}.frames"), problems)
        refs = {key: _artifact(cat.get(key), at(f"{w}.{key}"), problems, allow_outside) for key in _ARTIFACT_KEYS}
        if bank_only and any(refs.values()):
            problems.append(at(f"{w}: a category without prompts decides by its banks only; a probe, head or "
                               "calibrator needs prompts beside it"))
        categories.append(Category(cname, desc.strip(), prompts, contrast, ctemplates, flag, block, **refs,
                                   banks=banks, min_frames=min_frames))
    if not categories and isinstance(cats_raw, dict) and cats_raw and complete:
        problems.append(at("categories: every category is disabled"))
    video = data.get("video") or {}
    incomplete = "error"
    if not isinstance(video, dict):
        problems.append(at("video: must be a mapping with incomplete: error or flag"))
    else:
        for key in sorted(set(video) - _VIDEO_KEYS):
            problems.append(at(f"video.{key}: unknown key (expected incomplete)"))
        incomplete = video.get("incomplete", "error")
        if incomplete not in _INCOMPLETE:
            problems.append(at(f"video.incomplete: must be error (a clip not fully decoded is an error) or flag (it "
                               f"is flagged for review, never allowed), got {_printable(incomplete)}"))
            incomplete = "error"
    review = _review_rates(data.get("review"), at, problems)
    if problems:
        raise PolicyError(problems)
    policy = Policy(
        name=name, version=str(version), description=description.strip(), categories=tuple(categories),
        logit_scale=float(logit_scale), neutral=neutral, top_prompts=int(top), encoder=dict(encoder),
        source=str(path), video_incomplete=str(incomplete), review=review,
    )
    shipped = builtin_policy_dir() / f"{name}.yaml"
    if shipped.is_file() and shipped.resolve() != path.resolve():
        # A copy that decides exactly as the shipped policy (``policy show``'s output) may keep its id.
        if _read_yaml(shipped).get("version") == data.get("version") and dataclasses.replace(
                load_policy(shipped), source=None) != dataclasses.replace(policy, source=None):
            raise PolicyError(at(f"name/version: {name}@{version} is the id of a shipped policy; give this file its "
                                 "own name or version so that decisions say which policy decided"))
    return policy
