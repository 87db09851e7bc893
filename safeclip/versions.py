"""Policy versions: every recorded state of a policy file, listed and restored byte for byte.

A policy's history lives beside it, in ``<folder>/.safeclip-history/``:

``objects/<sha256>``
    A content-addressed copy of every file of every version (written atomically and durably).
``log.jsonl``
    Append-only, one JSON object per version: ``seq`` (1, 2, ... per policy file), ``policy`` (``name@version``),
    ``version``, ``time`` (UTC), ``author``, ``reason``, ``file`` (the policy file, relative to the folder) and
    ``files`` (``{relative path: sha256}`` of every file of the version).

A version's files are the policy file, every local probe, head and calibrator its categories use, and every file of
its ``extends`` chain that lies in its folder. Banks are live data (entries are added and removed while servers run)
and are not versioned; a ``url`` artifact is pinned by its sha256 in the policy file itself.

Writers (:func:`record`, :func:`rollback`) hold an exclusive lock (``fcntl.flock`` on ``lock``), write the objects
before the log line that names them, and append one line in one write; a line cut short by a crash is ignored on
read and removed by the next append. :func:`rollback` restores the files of an earlier version (the policy file
last), checks that they load and hash to the recorded pins, and appends a new version, so the history stays linear.
``safeclip calibrate`` records a version of every policy it writes.

>>> import pathlib, tempfile
>>> from safeclip.policy import builtin_policy_dir
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> text = (builtin_policy_dir() / "default.yaml").read_text().replace('version: "1.0"', 'version: "1.0+mine"')
>>> _ = (d / "policy.yaml").write_text(text)
>>> record(d / "policy.yaml", reason="first", author="ada").label
'#1'
>>> _ = (d / "policy.yaml").write_text(text.replace('version: "1.0+mine"', 'version: "1.1"'))
>>> record(d / "policy.yaml", reason="bumped", author="ada").version
'1.1'
>>> rollback(d / "policy.yaml", "1.0+mine", author="ada").version.reason
'rollback to 1.0+mine (#1)'
>>> (d / "policy.yaml").read_text() == text, [v.label for v in history(d / "policy.yaml")]
(True, ['#1', '#2', '#3'])
"""

from __future__ import annotations

import contextlib
import datetime
import getpass
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Any

import yaml

from .artifacts import sha256_bytes as _sha
from .errors import ArtifactIntegrityError, ConfigError, PolicyError
from .files import fsync_dir, locked_file, write_bytes_atomic
from .policy import Policy, builtin_policy_dir, load_policy

__all__ = ["HISTORY_DIR", "PolicyVersion", "Rollback", "history", "record", "rollback"]

HISTORY_DIR = ".safeclip-history"
"""The folder beside a policy file that holds its history."""
_LOG = "log.jsonl"
_LOCK = "lock"
_OBJECTS = "objects"
_FORMAT = 1
_MAX_TEXT = 500
_SHA_CHARS = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class PolicyVersion:
    """One recorded version of a policy file: ``files`` maps each of its files (relative to the policy's folder) to
    its sha256; ``created_at`` is ISO-8601 UTC."""

    seq: int
    policy_id: str
    version: str
    created_at: str
    author: str
    reason: str
    file: str
    files: Mapping[str, str]

    @property
    def label(self) -> str:
        """``#seq``: names this version on the command line even where two share a version string."""
        return f"#{self.seq}"

    def to_dict(self) -> dict[str, Any]:
        """The log line's object (``safeclip policy history --json``)."""
        return {"format": _FORMAT, "seq": self.seq, "policy": self.policy_id, "version": self.version,
                "time": self.created_at, "author": self.author, "reason": self.reason, "file": self.file,
                "files": dict(self.files)}


@dataclass(frozen=True)
class Rollback:
    """What :func:`rollback` did. ``version``: the version now current (the new log entry); ``target``: the one
    restored; ``restored``: files rewritten; ``unchanged``: files that already held the target's bytes;
    ``left_alone``: files of the replaced version that the target does not have (not deleted); ``before``: the
    unrecorded state found on disk, recorded first (``None`` when it was already recorded); ``replaced``: the
    sha256 of each rewritten file's previous bytes, kept in the history's objects either way."""

    version: PolicyVersion
    target: PolicyVersion
    restored: tuple[str, ...]
    unchanged: tuple[str, ...]
    left_alone: tuple[str, ...]
    before: PolicyVersion | None
    replaced: Mapping[str, str]

    def format(self) -> str:
        lines = [f"rolled back {self.target.file} to {self.target.version} ({self.target.label}), now "
                 f"{self.version.label}"]
        if self.before is not None:
            lines.append(f"  the state on disk was recorded first as {self.before.label} ({self.before.version})")
        lines += [f"  restored  {rel}" for rel in self.restored]
        lines += [f"  unchanged {rel}" for rel in self.unchanged]
        lines += [f"  left alone (not in {self.target.label}) {rel}" for rel in self.left_alone]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ public API
def record(policy_path: str | os.PathLike[str], *, reason: str, author: str | None = None) -> PolicyVersion:
    """Snapshot the policy file and its files as a new version (returned); when they are identical to the latest
    recorded version, that one is returned and nothing is added.

    The policy must load, and each local artifact must hash to its pin (a broken state is not a version)."""
    folder, name, hist = _locate(policy_path)
    reason, author = _text(reason, "reason"), _author(author)
    with _locked(hist, create=True):
        return _record_locked(folder, name, hist, reason, author)[0]


def history(policy_path: str | os.PathLike[str]) -> list[PolicyVersion]:
    """The recorded versions of a policy file, oldest first (empty when none were recorded)."""
    folder, name, hist = _locate(policy_path)
    return [v for v in _read_log(hist) if v.file == name]


def rollback(policy_path: str | os.PathLike[str], version: str | int, *, author: str | None = None) -> Rollback:
    """Restore every file of an earlier ``version`` byte for byte and record that as a new version.

    ``version``: a policy version string (``"1.0+rev2"``) or a sequence number (``"#3"``, ``3``). Every object is
    checked before anything is written; the state on disk, when it loads and was not recorded, is recorded first
    (``before rollback to ...``); files the target version lacks are left alone. Raises
    :class:`~safeclip.errors.ConfigError` for a version that was not recorded (naming the ones that were) and
    :class:`~safeclip.errors.ArtifactIntegrityError` for a missing or altered history object.
    """
    folder, name, hist = _locate(policy_path)
    author = _author(author)
    with _locked(hist, create=False):
        mine = [v for v in _read_log(hist) if v.file == name]
        target = _find(mine, version, folder / name)
        blobs = {rel: _get_object(hist, sha, f"{rel} of {target.label}") for rel, sha in target.files.items()}
        paths = {rel: _inside(folder, rel) for rel in blobs}
        before: PolicyVersion | None = None
        try:
            latest, added = _record_locked(folder, name, hist, f"before rollback to {target.version} "
                                                               f"({target.label})", author)
            before = latest if added else None
        except (PolicyError, ArtifactIntegrityError):  # a broken state on disk: its bytes are kept below
            latest = mine[-1]
        restored, unchanged, replaced = [], [], {}
        # The policy file last: until it is replaced, it still names the files it was written with.
        for rel in sorted(blobs, key=lambda r: (r == name, r)):
            data, path = blobs[rel], paths[rel]
            old = path.read_bytes() if path.is_file() else None
            if old == data:
                unchanged.append(rel)
                continue
            if old is not None:
                replaced[rel] = _put_object(hist, old)
            write_bytes_atomic(path, data, durable=True)
            restored.append(rel)
        try:
            policy, now = _snapshot(folder, name)
        except (PolicyError, ArtifactIntegrityError) as e:
            raise PolicyError(f"{folder / name}: the files of {target.label} ({target.version}) are restored but do "
                              f"not load with this safeclip ({str(e).splitlines()[-1].strip()}); roll back to "
                              f"another version") from e
        pins = {rel: _sha(data) for rel, data in now.items()}
        if pins != dict(target.files):
            odd = sorted(set(pins) ^ set(target.files) | {r for r in pins if pins[r] != target.files.get(r)})
            raise ArtifactIntegrityError(f"{folder / name}: after restoring {target.label}, {', '.join(odd)} do not "
                                         "match the recorded pins (changed while it was restored?); run the "
                                         "rollback again")
        left_alone = tuple(sorted(rel for rel in set(latest.files) - set(target.files) if (folder / rel).exists()))
        if not restored and dict(latest.files) == pins:
            current = latest
        else:
            current = _append(hist, _entry(mine + ([before] if before else []), policy, name, pins,
                                           f"rollback to {target.version} ({target.label})", author))
        return Rollback(current, target, tuple(restored), tuple(unchanged), left_alone, before,
                        MappingProxyType(replaced))


# ------------------------------------------------------------------------------------------------ snapshots
def _locate(policy_path: str | os.PathLike[str]) -> tuple[Path, str, Path]:
    """(the policy's folder, resolved; the file's name; its history folder)."""
    p = Path(policy_path).expanduser()
    if p.suffix not in (".yaml", ".yml"):
        raise ConfigError(f"{os.fspath(policy_path)!r} is not a policy file (a path ending in .yaml); a shipped "
                          "policy has no history: copy it into a folder of yours, give it its own name, and record it "
                          "there")
    folder = p.parent.resolve()
    if folder == builtin_policy_dir().resolve():
        raise ConfigError(f"{p} is a shipped policy, which has no history: copy it into a folder of yours, give it "
                          "its own name, and record it there")
    return folder, p.name, folder / HISTORY_DIR


def _snapshot(folder: Path, name: str) -> tuple[Policy, dict[str, bytes]]:
    """The policy file and the files it uses (relative path -> bytes); local artifacts checked against their pins."""
    path = folder / name
    policy = load_policy(path)
    files = {name: path.read_bytes()}
    for parent in _extends_chain(folder, path):
        files[parent.relative_to(folder).as_posix()] = parent.read_bytes()
    for cat in policy.categories:
        for key in ("probe", "head", "calibrator"):
            ref = getattr(cat, key)
            if ref is None or ref.path is None or not ref.path.is_relative_to(folder):
                continue
            try:
                data = ref.path.read_bytes()
            except OSError as e:
                raise ArtifactIntegrityError(f"{path}: categories.{cat.name}.{key}: cannot read {ref.path}: "
                                             f"{e.strerror or e}") from e
            if _sha(data) != ref.sha256:
                raise ArtifactIntegrityError(f"{path}: categories.{cat.name}.{key}: {ref.path} has sha256 "
                                             f"{_sha(data)}, but the policy pins {ref.sha256}; fix the file or its "
                                             "pin first")
            files[ref.path.relative_to(folder).as_posix()] = data
    for rel in files:
        if PurePosixPath(rel).parts[0] == HISTORY_DIR:
            raise ConfigError(f"{path}: {rel} lies inside the history folder {HISTORY_DIR}; a policy's files may not")
    return policy, files


def _extends_chain(folder: Path, path: Path) -> list[Path]:
    """The files of ``path``'s ``extends`` chain inside ``folder`` (the policy has loaded, so the chain is valid);
    a shipped name (no ``/``, no ``.yaml``) ends it, as in :func:`safeclip.policy.load_policy`."""
    out: list[Path] = []
    cur = path
    while True:
        data = yaml.safe_load(cur.read_bytes())
        ref = data.get("extends") if isinstance(data, dict) else None
        if not isinstance(ref, str) or ("/" not in ref and os.sep not in ref and
                                        not ref.endswith((".yaml", ".yml"))):
            return out
        nxt = (cur.parent / Path(ref).expanduser()).resolve()
        if not nxt.is_relative_to(folder) or nxt in out or not nxt.is_file():
            return out
        out.append(nxt)
        cur = nxt


def _record_locked(folder: Path, name: str, hist: Path, reason: str, author: str) -> tuple[PolicyVersion, bool]:
    """(the version the files on disk are, whether it was added now); the caller holds the lock."""
    policy, files = _snapshot(folder, name)
    pins = {rel: _sha(data) for rel, data in files.items()}
    mine = [v for v in _read_log(hist) if v.file == name]
    if mine and dict(mine[-1].files) == pins and mine[-1].policy_id == policy.id:
        return mine[-1], False
    for data in files.values():
        _put_object(hist, data)
    return _append(hist, _entry(mine, policy, name, pins, reason, author)), True


def _entry(mine: list[PolicyVersion], policy: Policy, name: str, pins: Mapping[str, str], reason: str,
           author: str) -> PolicyVersion:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    seq = max((v.seq for v in mine), default=0) + 1
    return PolicyVersion(seq, policy.id, policy.version, now, author, reason, name,
                         MappingProxyType(dict(sorted(pins.items()))))


def _find(mine: list[PolicyVersion], spec: str | int, path: Path) -> PolicyVersion:
    if not mine:
        raise ConfigError(f"{path}: no versions recorded (record one with `safeclip policy record {path} --reason "
                          "TEXT`)")
    s = str(spec).strip()
    by_seq = [v for v in mine if s.lstrip("#").isdigit() and v.seq == int(s.lstrip("#"))]
    by_version = [] if s.startswith("#") else [v for v in mine if v.version == s]
    if by_version and by_seq and by_seq[0] not in by_version:
        raise ConfigError(f"{path}: {s!r} is both version {s} ({', '.join(v.label for v in by_version)}) and "
                          f"{by_seq[0].label} ({by_seq[0].version}); pick one by its number, e.g. "
                          f"{by_version[-1].label}")
    if by_version:
        if len({tuple(sorted(v.files.items())) for v in by_version}) > 1:
            raise ConfigError(f"{path}: version {s} was recorded with different files "
                              f"({', '.join(v.label for v in by_version)}: edited without a new version string); "
                              f"pick one by its number, e.g. {by_version[-1].label}")
        return by_version[-1]
    if by_seq:
        return by_seq[0]
    shown = ", ".join(f"{v.label} {v.version}" for v in mine[-10:])
    more = f" and {len(mine) - 10} earlier" if len(mine) > 10 else ""
    raise ConfigError(f"{path}: no recorded version {s!r}; recorded: {shown}{more} (see `safeclip policy history "
                      f"{path}`)")


# ------------------------------------------------------------------------------------------------ the log
@contextlib.contextmanager
def _locked(hist: Path, *, create: bool) -> Iterator[None]:
    if not hist.is_dir():
        if not create:
            raise ConfigError(f"{hist.parent}: no versions recorded (no {HISTORY_DIR} folder); record one with "
                              "`safeclip policy record POLICY --reason TEXT`")
        (hist / _OBJECTS).mkdir(parents=True, exist_ok=True)
        fsync_dir(hist.parent)
    with locked_file(hist / _LOCK):
        yield


def _read_log(hist: Path) -> list[PolicyVersion]:
    """Every complete line of the log; a last line without its newline (a write cut short) is not a version."""
    log = hist / _LOG
    try:
        data = log.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise ConfigError(f"{log}: cannot read the policy history: {e.strerror or e}") from e
    lines = data.split(b"\n")[:-1]  # the part after the last newline is empty or torn
    return [_parse(log, i + 1, line) for i, line in enumerate(lines)]


def _parse(log: Path, lineno: int, line: bytes) -> PolicyVersion:
    def bad(why: str) -> ArtifactIntegrityError:
        return ArtifactIntegrityError(f"{log}:{lineno}: not a policy version record ({why}); the history was edited "
                                      "or damaged: restore it from a backup")

    try:
        d = json.loads(line)
    except ValueError as e:
        raise bad(f"invalid JSON: {e}") from None
    if not isinstance(d, dict) or d.get("format") != _FORMAT:
        raise bad(f"format {d.get('format') if isinstance(d, dict) else None!r}, expected {_FORMAT}")
    seq = d.get("seq")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        raise bad("seq must be a positive integer")
    texts: dict[str, str] = {}
    for k in ("policy", "version", "time", "author", "reason", "file"):
        v = d.get(k)
        if not isinstance(v, str) or not v or not v.isprintable():
            raise bad(f"{k} must be a non-empty printable string")
        texts[k] = v
    files = d.get("files")
    if not isinstance(files, dict) or texts["file"] not in files:
        raise bad("files must map each file of the version, the policy file among them, to its sha256")
    for rel, sha in files.items():
        parts = PurePosixPath(rel).parts
        if (not isinstance(sha, str) or len(sha) != 64 or not set(sha) <= _SHA_CHARS or not parts
                or PurePosixPath(rel).is_absolute() or ".." in parts or parts[0] == HISTORY_DIR or "\\" in rel):
            raise bad(f"file {rel!r}: a path inside the policy's folder and a sha256 expected")
    return PolicyVersion(seq, texts["policy"], texts["version"], texts["time"], texts["author"], texts["reason"],
                         texts["file"], MappingProxyType(dict(files)))


def _append(hist: Path, version: PolicyVersion) -> PolicyVersion:
    """Append one line (the caller holds the lock), first cutting off a line a crash left without its newline."""
    line = json.dumps(version.to_dict(), sort_keys=True, separators=(",", ":")).encode() + b"\n"
    log = hist / _LOG
    created = not log.exists()
    fd = os.open(log, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        if size:
            tail = os.pread(fd, min(size, 1 << 20), max(0, size - (1 << 20)))
            if not tail.endswith(b"\n"):
                cut = tail.rfind(b"\n")
                if cut < 0 and len(tail) < size:  # a record is a few hundred bytes: this is not one cut short
                    raise ArtifactIntegrityError(f"{log}: ends in more than 1 MiB without a line break; the history "
                                                 "was damaged: restore it from a backup")
                size -= len(tail) - (cut + 1)
                os.ftruncate(fd, size)
        os.pwrite(fd, line, size)
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        fsync_dir(hist)
    return version


# ------------------------------------------------------------------------------------------------ objects
def _put_object(hist: Path, data: bytes) -> str:
    sha = _sha(data)
    path = hist / _OBJECTS / sha
    with contextlib.suppress(OSError):
        if _sha(path.read_bytes()) == sha:
            return sha
    write_bytes_atomic(path, data, durable=True)
    return sha


def _get_object(hist: Path, sha: str, what: str) -> bytes:
    path = hist / _OBJECTS / sha
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ArtifactIntegrityError(f"history object {path} ({what}) is missing; restore {HISTORY_DIR} from a "
                                     "backup or roll back to another version") from None
    if _sha(data) != sha:
        raise ArtifactIntegrityError(f"history object {path} ({what}) was altered: its sha256 is {_sha(data)}; "
                                     f"restore {HISTORY_DIR} from a backup or roll back to another version")
    return data


# ------------------------------------------------------------------------------------------------ helpers
def _inside(folder: Path, rel: str) -> Path:
    path = (folder / rel).resolve()
    if not path.is_relative_to(folder):
        raise ArtifactIntegrityError(f"{folder / rel}: the history names a file outside the policy's folder "
                                     f"{folder}; refusing to write it")
    return path


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip() or not value.isprintable() or len(value) > _MAX_TEXT:
        raise ConfigError(f"{what}: must be one line of printable text, at most {_MAX_TEXT} characters, got "
                          f"{str(value)[:60]!r}")
    return value.strip()


def _author(author: str | None) -> str:
    if author is None:
        author = os.environ.get("USER") or ""
        if not author:
            with contextlib.suppress(Exception):
                author = getpass.getuser()
        author = author or "unknown"
    return _text(author, "author")
