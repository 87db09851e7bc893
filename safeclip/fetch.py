"""Pinned artifacts fetched on first use: a file named by its public URL and its sha256, as pretrained weights are.

:func:`fetch_artifact` looks in this order, and the first file found that hashes to the pin wins:

1. the offline mirror ``$SAFECLIP_ARTIFACTS_DIR``: ``<mirror>/<filename>``, ``<mirror>/<sha256>`` or
   ``<mirror>/<sha256>/<filename>`` (copies put there by hand; a copy with other bytes is an error, never skipped);
2. the cache, ``<cache>/artifacts/<sha256>/<filename>`` (a corrupt entry is deleted and fetched again);
3. a download into the cache, streamed and hashed on the way, renamed into place only once it matches the pin.

The bytes are hashed on every call, wherever they come from. Offline (``$SAFECLIP_OFFLINE`` or ``HF_HUB_OFFLINE``
set, or a host that accepts no connection within :data:`PROBE_TIMEOUT_S`) a missing artifact is one
:class:`~safeclip.errors.ArtifactUnavailableError` within seconds, saying where to put a copy. Downloads use urllib.
"""

from __future__ import annotations

import hashlib
import http.client
import importlib.metadata
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO
from urllib.parse import SplitResult, unquote, urlsplit

from ._dirs import default_cache_dir
from .files import write_atomic
from ._net import can_connect, env_true
from .artifacts import sha256_file
from .errors import ArtifactIntegrityError, ArtifactUnavailableError, CacheError, ConfigError

__all__ = ["MAX_ARTIFACT_BYTES", "OFFLINE_ENV", "PROBE_TIMEOUT_S", "artifacts_cache_dir", "fetch_artifact",
           "mirror_dir"]

OFFLINE_ENV = "SAFECLIP_OFFLINE"
"""Set to 1 / true / yes / on: never download an artifact (``HF_HUB_OFFLINE`` counts too)."""

PROBE_TIMEOUT_S = 3.0
"""How long the reachability probe waits for a TCP connection to an artifact's host (name resolution included)."""

MAX_ARTIFACT_BYTES = 1 << 30
"""The largest artifact a download may bring (1 GiB); anything bigger is refused as it streams."""

_MIRROR_ENV = "SAFECLIP_ARTIFACTS_DIR"
_CHUNK = 1 << 20
_SCHEMES = ("https", "http")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_NOT_PLAIN = re.compile(r"[/\\\x00-\x1f\x7f]|\.\.")


class _NotDownloaded(Exception):
    """Why a download did not happen (the network's fault, not the file's); turned into the public error."""


def mirror_dir() -> Path | None:
    """``$SAFECLIP_ARTIFACTS_DIR``, a folder of artifact copies put there by hand (an offline mirror), or None."""
    env = os.environ.get(_MIRROR_ENV)
    return Path(env).expanduser() if env else None


def artifacts_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where downloaded artifacts are kept: ``<cache_dir>/artifacts``, by default under
    :func:`~safeclip.embed.default_cache_dir`."""
    if cache_dir is None:
        cache_dir = default_cache_dir()
    return Path(cache_dir) / "artifacts"


def fetch_artifact(url: str, sha256: str, *, filename: str | None = None,
                   cache_dir: str | os.PathLike[str] | None = None, timeout: float = 30.0) -> Path:
    """The local path of the file published at ``url`` whose bytes hash to ``sha256`` (verified on every call).

    ``filename`` defaults to the last component of the URL's path. ``timeout`` bounds each network wait of a
    download. Raises :class:`~safeclip.errors.ArtifactIntegrityError` for bytes that do not match the pin (or a
    download over :data:`MAX_ARTIFACT_BYTES`), :class:`~safeclip.errors.ArtifactUnavailableError` when the file is
    here nowhere and cannot be downloaded, :class:`~safeclip.errors.ConfigError` for a malformed pin.

    >>> path = fetch_artifact("https://example.org/heads/nsfw.json", "3a7b...")  # doctest: +SKIP

    A file already in the cache (where a first download puts it) is served from there, after hashing:

    >>> import hashlib, tempfile
    >>> cache = Path(tempfile.mkdtemp())
    >>> data = b'{"weights": [0.25, 0.75]}'
    >>> pin = hashlib.sha256(data).hexdigest()
    >>> copy = artifacts_cache_dir(cache) / pin / "head.json"
    >>> copy.parent.mkdir(parents=True)
    >>> _ = copy.write_bytes(data)
    >>> fetch_artifact("https://example.org/heads/head.json", pin, cache_dir=cache) == copy
    True
    """
    parts, pin, name = _check_pin(url, sha256, filename)
    if not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ConfigError(f"timeout={timeout!r}: give the seconds a download may wait, a number > 0")
    mirror = mirror_dir()
    if mirror is not None:
        found = _from_mirror(mirror, name, pin, url)
        if found is not None:
            return found
    target = artifacts_cache_dir(cache_dir) / pin / name
    if _cached(target, pin):
        return target
    reason = _offline_reason(parts)
    if reason is not None:
        raise _unavailable(name, pin, url, target, mirror, reason)
    try:
        write_atomic(target, lambda f: _download(url, parts, f, name, pin, timeout))
    except _NotDownloaded as e:
        raise _unavailable(name, pin, url, target, mirror, str(e)) from e.__cause__
    except OSError as e:
        raise CacheError(f"cannot write the artifact {name} into the cache at {target}: {e}") from e
    return target


def _check_pin(url: str, sha256: str, filename: str | None) -> tuple[SplitResult, str, str]:
    """The URL's parts, the pin in lower case and the file name, or a ConfigError naming what is wrong."""
    if not isinstance(url, str) or any(c.isspace() or not c.isprintable() for c in url):
        raise ConfigError(f"artifact URL {url!r} is not a URL: give the file's https:// address")
    parts = urlsplit(url)
    try:
        has_host = bool(parts.hostname) and (parts.port is None or parts.port > 0)
    except ValueError:  # a port that is not a number
        has_host = False
    if parts.scheme.lower() not in _SCHEMES or not has_host:
        raise ConfigError(f"artifact URL {url!r} is not an https:// or http:// URL with a host: "
                          "give the file's public https:// address")
    pin = sha256.strip().lower() if isinstance(sha256, str) else ""
    if not _SHA256.fullmatch(pin):
        raise ConfigError(f"artifact sha256 {sha256!r} is not 64 hex digits: give the sha256 of the file at {url}")
    name = unquote(parts.path.rsplit("/", 1)[-1]) if filename is None else filename
    if not isinstance(name, str) or name in ("", ".") or _NOT_PLAIN.search(name):
        raise ConfigError(f"artifact file name {name!r} (of {url}) is not a plain file name (no /, \\, .., NUL or "
                          "control characters): pass filename='name.ext'")
    return parts, pin, name


def _sha256_of(path: Path) -> str:
    try:
        return sha256_file(path)
    except OSError as e:
        raise ArtifactIntegrityError(f"cannot read the artifact copy {path}: {e}") from e


def _from_mirror(mirror: Path, name: str, pin: str, url: str) -> Path | None:
    """The mirror's copy that matches the pin; None when the mirror holds none; an error for a copy that differs."""
    if not mirror.is_dir():
        raise ConfigError(f"${_MIRROR_ENV}={mirror} is not a folder: set it to the folder holding your artifact "
                          "copies, or unset it")
    wrong = []
    for path in (mirror / name, mirror / pin, mirror / pin / name):
        if path.is_file():
            actual = _sha256_of(path)
            if actual == pin:
                return path
            wrong.append(f"{path} has sha256 {actual}")
    if wrong:
        raise ArtifactIntegrityError(f"{'; '.join(wrong)}, but the artifact {name} is pinned to sha256 {pin}: "
                                     f"replace the copy with the file published at {url}, or remove it")
    return None


def _cached(target: Path, pin: str) -> bool:
    """Whether the cache holds the artifact; a cached file with other bytes is ours, corrupt, and deleted."""
    try:
        if sha256_file(target) == pin:
            return True
        target.unlink(missing_ok=True)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise CacheError(f"cannot read the cached artifact {target}: {e}") from e
    return False


def _offline_reason(parts: SplitResult) -> str | None:
    """Why nothing can be downloaded from the URL's host now (an offline switch, no connection), else None."""
    for env in (OFFLINE_ENV, "HF_HUB_OFFLINE"):
        if env_true(env):
            return f"offline (${env} is set)"
    what, host, port = "host", parts.hostname or "", parts.port or (443 if parts.scheme.lower() == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme.lower())
    if proxy and not urllib.request.proxy_bypass(host):  # the connection goes to the proxy, not the host
        p = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        what, host, port = "proxy", p.hostname or "", p.port or (443 if p.scheme == "https" else 80)
    if can_connect(host, port, PROBE_TIMEOUT_S):
        return None
    return f"the {what} {host}:{port} accepts no connection within {PROBE_TIMEOUT_S:g} s"


def _user_agent() -> str:
    try:  # the installed version, as safeclip.__version__ is; not imported from the package, which imports us
        return f"safeclip/{importlib.metadata.version('safeclip')}"
    except importlib.metadata.PackageNotFoundError:  # a source tree on sys.path, not installed
        return "safeclip"


def _download(url: str, parts: SplitResult, f: IO[bytes], name: str, pin: str, timeout: float) -> None:
    """Stream ``url`` into ``f``, hashing; raise unless the bytes match the pin (``f`` is then thrown away)."""
    def fail(e: BaseException) -> _NotDownloaded:
        if isinstance(e, urllib.error.HTTPError):
            e.close()
            return _NotDownloaded(f"the server answered HTTP {e.code} {e.reason}")
        cause = e.reason if isinstance(e, urllib.error.URLError) else e
        if isinstance(cause, TimeoutError):
            return _NotDownloaded(f"{parts.hostname} sent nothing for {timeout:g} s")
        return _NotDownloaded(f"the download failed ({type(cause).__name__}: {cause})")

    def too_big() -> ArtifactIntegrityError:
        return ArtifactIntegrityError(f"{url} holds more than {MAX_ARTIFACT_BYTES} bytes, the most an artifact may "
                                      f"be: refusing {name}")

    request = urllib.request.Request(url, headers={"User-Agent": _user_agent()})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except (OSError, http.client.HTTPException, ValueError) as e:  # URLError and HTTPError are OSErrors
        raise fail(e) from e
    h, size = hashlib.sha256(), 0
    with response:
        length = response.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > MAX_ARTIFACT_BYTES:
            raise too_big()
        while True:
            try:
                chunk = response.read(_CHUNK)
            except (OSError, http.client.HTTPException) as e:
                raise fail(e) from e
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_ARTIFACT_BYTES:
                raise too_big()
            h.update(chunk)
            f.write(chunk)
    actual = h.hexdigest()
    if actual != pin:
        raise ArtifactIntegrityError(f"the file downloaded from {url} has sha256 {actual}, but the artifact {name} is "
                                     f"pinned to {pin}; nothing was kept: check the pin and the URL")


def _unavailable(name: str, pin: str, url: str, target: Path, mirror: Path | None,
                 reason: str) -> ArtifactUnavailableError:
    where = f"now {mirror}" if mirror is not None else "set it to a folder holding the file"
    return ArtifactUnavailableError(
        f"the artifact {name} (sha256 {pin}) is not here and cannot be downloaded: {' '.join(reason.split())}. "
        f"Download {url} on a connected machine and put it in ${_MIRROR_ENV} ({where}), or at {target}")
