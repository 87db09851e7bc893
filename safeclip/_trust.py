"""What safeclip believes of a cache folder: only what nobody else could have written there (stdlib only).

A cache folder is not its own witness: a manifest that pins a graph by sha256, or a memo that names a checkpoint's
hash, proves nothing to a reader when whoever replaced the graph or the checkpoint could rewrite the manifest or the
memo too. Two rules, each covering what the other cannot:

- **Permissions** (:func:`untrusted`). A cache folder, and every folder and file safeclip reads in it, must belong
  to you (or root) and be writable by nobody else: not by every user, not by a group other than your own private
  one. The embedding database refuses a folder that fails this; an :class:`~safeclip.embed.Encoder` moves its ONNX
  export and prompt embeddings to a folder of its own (:func:`fallback_dir`), with one log line. This is what stops
  another user of the machine, including between a check and a read.
- **A keyed MAC** (:func:`mac`, :func:`verify`). What safeclip derives once and then believes without deriving it
  again (the ONNX export's manifest, which pins its files by sha256; the checkpoint-hash memo; the encoder-identity
  memo) carries an HMAC-SHA256 under a per-user secret kept outside every cache folder (:func:`key_path`: 32 random
  bytes, created 0600 on first use). A file without a valid MAC is ignored and made again. On shared or network
  storage, where owners and modes say little, a writer without the key cannot make safeclip run its graph or
  believe its hashes.

Both rules are about other writers: anyone who runs code as you can read your key and write your cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
import tempfile
import threading
from pathlib import Path
from typing import Any

from ._dirs import default_cache_dir
from .errors import CacheError

__all__ = ["KEY_FILE_ENV", "current_key", "fallback_dir", "first_untrusted", "fix_for", "key_id", "key_path", "mac", "make_dirs",
           "say_once", "untrusted", "use_key", "verify", "write_problem"]

KEY_FILE_ENV = "SAFECLIP_CACHE_KEY_FILE"
"""Where the key is, instead of ``$XDG_CONFIG_HOME/safeclip/cache.key`` (e.g. one key mounted on every node of a
cluster that shares a cache)."""

_KEY_BYTES = 32
_log = logging.getLogger("safeclip")
_lock = threading.Lock()
_keys: dict[str, bytes] = {}  # key file -> key, read once per process
_fixed: list[bytes] = []  # a key handed over by the parent process (the export child)
_said: set[str] = set()


def say_once(message: str) -> None:
    """Log ``message`` as a warning, once per process."""
    with _lock:
        if message in _said:
            return
        _said.add(message)
    _log.warning("%s", message)


# ------------------------------------------------------------------------------------------------ permissions
def _name(uid: int | None = None, gid: int | None = None) -> str:
    try:
        if uid is not None:
            import pwd

            return pwd.getpwuid(uid).pw_name
        import grp

        return grp.getgrgid(gid).gr_name  # type: ignore[arg-type]
    except (ImportError, KeyError):
        return str(uid if uid is not None else gid)


def _private_group(gid: int) -> bool:
    """Whether ``gid`` is the user's own private group (named after the user, no other member): ``umask 002``
    systems make folders group-writable for it, which lets nobody else in."""
    try:
        import grp
        import pwd

        me = pwd.getpwuid(os.getuid()).pw_name
        group = grp.getgrgid(gid)
    except (ImportError, KeyError):
        return False
    return gid == os.getgid() and group.gr_name == me and set(group.gr_mem) <= {me}


def untrusted(path: str | os.PathLike[str]) -> str | None:
    """Why someone else could have written ``path`` (``"is owned by bob"``, ``"can be written by every user"``), or
    None: it is yours (or root's) and only you can write it, or it does not exist. Windows: None (ACLs, not
    modes)."""
    if not hasattr(os, "getuid"):  # pragma: no cover - Windows
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None  # missing (nothing to believe yet) or unreadable (reading it fails on its own)
    if st.st_uid not in (os.getuid(), 0):
        return f"is owned by {_name(uid=st.st_uid)}, not by you"
    if st.st_mode & stat.S_IWOTH:
        return "can be written by every user"
    if st.st_mode & stat.S_IWGRP and not _private_group(st.st_gid):
        return f"can be written by group {_name(gid=st.st_gid)}"
    return None


def first_untrusted(root: Path, *inside: str | os.PathLike[str]) -> tuple[Path, str] | None:
    """The first of ``root`` and of the folders and files from it down to each of ``inside`` (relative to
    ``root``) that :func:`untrusted` names, with why; None when all are trusted (or missing)."""
    paths = [root]
    for rel in inside:
        path = root
        for part in Path(rel).parts:
            path = path / part
            if path not in paths:
                paths.append(path)
    for path in paths:
        why = untrusted(path)
        if why is not None:
            return path, why
    return None


def fix_for(path: Path, why: str) -> str:
    """What to do about ``path`` that :func:`untrusted` refused for ``why``."""
    own = "give a cache folder of your own (cache_dir=, --cache, $SAFECLIP_CACHE_DIR)"
    if why.startswith("is owned by"):
        return own
    return f"run `chmod go-w {path}` (and check what is in it), or {own}"


def make_dirs(path: Path) -> None:
    """Create ``path`` and its missing parents readable and writable by you only (0700, whatever the umask)."""
    missing: list[Path] = []
    p = path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    for p in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(p, 0o700)


def write_problem(folder: Path) -> str | None:
    """Why nothing can be written in ``folder`` (created if missing), or None."""
    try:
        make_dirs(folder)
        with tempfile.TemporaryFile(dir=folder, prefix=".safeclip-probe-"):
            pass
    except OSError as e:
        return f"{e.strerror or type(e).__name__} ({e.filename or folder})"
    return None


def fallback_dir(given: Path) -> Path | None:
    """A cache folder of the user's own for what ``given`` cannot hold: the default cache folder
    (``~/.cache/safeclip``), else ``<tmp>/safeclip-<uid>``; the first that is trusted and writable, or None."""
    tag = os.getuid() if hasattr(os, "getuid") else os.getpid()
    candidates = [default_cache_dir(), Path(tempfile.gettempdir()) / f"safeclip-{tag}"]
    for c in candidates:
        with contextlib.suppress(OSError):
            if c.resolve() == given.resolve():
                continue
        if write_problem(c) is None and first_untrusted(c) is None:
            return c
    return None


# ------------------------------------------------------------------------------------------------ the key
def key_path() -> Path:
    """``$SAFECLIP_CACHE_KEY_FILE``, else ``$XDG_CONFIG_HOME/safeclip/cache.key``, else
    ``~/.config/safeclip/cache.key``: never inside a cache folder."""
    env = os.environ.get(KEY_FILE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CONFIG_HOME")
    return (Path(xdg) if xdg else Path.home() / ".config") / "safeclip" / "cache.key"


def _read_key(path: Path) -> bytes:
    """The key in ``path``; :class:`FileNotFoundError` when there is none, :class:`CacheError` (naming the fix)
    when it is not one or others could read or replace it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        text = os.read(fd, 4 * _KEY_BYTES).decode("ascii", "replace").strip()
    finally:
        os.close(fd)
    if hasattr(os, "getuid"):
        if st.st_uid not in (os.getuid(), 0):
            problem = f"is owned by {_name(uid=st.st_uid)}"
        elif st.st_mode & 0o077:
            problem = f"is open to others (mode {stat.S_IMODE(st.st_mode):o})"
        else:
            problem = ""
        if problem:
            raise CacheError(f"the cache key {path} {problem}: whoever can read or write it can make safeclip trust "
                             f"files they put in its cache. Run `chmod 600 {path}` if it is yours, else delete it (a "
                             "new one is made; exports and memos are then made again once)")
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != _KEY_BYTES:
        raise CacheError(f"{path} is not a safeclip cache key ({2 * _KEY_BYTES} hex digits): delete it (a new one is "
                         "made; exports and memos are then made again once)")
    return key


def _create_key(path: Path) -> bytes:
    """Make a new key at ``path`` (0600), unless another process made one meanwhile; return the one there."""
    make_dirs(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, (secrets.token_bytes(_KEY_BYTES).hex() + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # never replaces a key: a reader sees none, or a whole one
    except FileExistsError:
        pass
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return _read_key(path)


def _load_key() -> bytes:
    """This user's key: read (or made) once per process per key location."""
    with _lock:
        if _fixed:
            return _fixed[-1]
    try:
        first: Path | None = key_path()
    except RuntimeError:  # no home folder
        first = None
    with _lock:
        if str(first) in _keys:
            return _keys[str(first)]
    tag = os.getuid() if hasattr(os, "getuid") else os.getpid()
    spare = Path(tempfile.gettempdir()) / f"safeclip-{tag}" / "cache.key"
    problem, key = "no home folder", None
    for path in (first, spare):
        if path is None or (path == spare and (write_problem(spare.parent) or first_untrusted(spare.parent))):
            continue
        try:
            try:
                key = _read_key(path)
            except FileNotFoundError:
                key = _create_key(path)
        except OSError as e:
            problem = f"{e.strerror or type(e).__name__} ({e.filename or path})"
            continue
        if path != first:
            say_once(f"cannot make the cache key {first} ({problem}); using {path}, which is lost at "
                     f"reboot (exports and memos are then made again): set XDG_CONFIG_HOME or {KEY_FILE_ENV} to a "
                     "writable place of your own")
        break
    if key is None:
        key = secrets.token_bytes(_KEY_BYTES)
        say_once(f"cannot make a cache key ({problem}): nothing cached is trusted across runs, so the "
                 f"ONNX export is made again at every start; set XDG_CONFIG_HOME or {KEY_FILE_ENV} to a writable "
                 "place of your own")
    with _lock:
        return _keys.setdefault(str(first), key)


def _key() -> bytes:
    return _load_key()


def use_key(key: bytes) -> None:
    """Sign and check with ``key`` in this process (the export child gets its parent's key this way, on stdin)."""
    if len(key) != _KEY_BYTES:
        raise CacheError(f"a safeclip cache key is {_KEY_BYTES} bytes")
    with _lock:
        _fixed.append(key)


def current_key() -> bytes:
    """The key this process signs and checks with (to hand to a child process)."""
    return _key()


def key_id() -> str:
    """A short public name of the key (it reveals nothing of it): what was pinned under another key is apart."""
    return hmac.new(_key(), b"safeclip key id", hashlib.sha256).hexdigest()[:8]


def mac(purpose: str, obj: Any) -> str:
    """HMAC-SHA256 of ``obj`` (as canonical JSON) for ``purpose`` (a MAC made for one purpose never passes for
    another)."""
    body = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True).encode()
    return hmac.new(_key(), purpose.encode() + b"\n" + body, hashlib.sha256).hexdigest()


def verify(purpose: str, obj: Any, tag: object) -> bool:
    """Whether ``tag`` is :func:`mac` of ``obj`` for ``purpose`` under this user's key."""
    if not isinstance(tag, str):
        return False
    try:
        return hmac.compare_digest(mac(purpose, obj), tag)
    except (TypeError, ValueError):  # not JSON-serialisable: not what safeclip wrote
        return False
