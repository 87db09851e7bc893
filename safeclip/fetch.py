"""Pinned artifacts fetched on first use: a file named by its public URL and its sha256, as pretrained weights are.

:func:`fetch_artifact` looks in this order, and the first file found that hashes to the pin wins:

1. the offline mirror ``$SAFECLIP_ARTIFACTS_DIR``: ``<mirror>/<filename>``, ``<mirror>/<sha256>`` or
   ``<mirror>/<sha256>/<filename>`` (copies put there by hand; a copy with other bytes is an error, never skipped);
2. the cache, ``<cache>/artifacts/<sha256>/<filename>`` (a corrupt entry is deleted and fetched again);
3. a download into the cache, streamed and hashed on the way into a partial file, renamed into place only once it
   matches the pin.

The bytes are hashed on every call, wherever they come from. Offline (``$SAFECLIP_OFFLINE`` or ``HF_HUB_OFFLINE``
set, or a host that accepts no connection within :data:`PROBE_TIMEOUT_S`) a missing artifact is one
:class:`~safeclip.errors.ArtifactUnavailableError` within seconds, saying where to put a copy. Downloads use urllib.

A policy is data from a user, so a download is fenced:

- only ``http``/``https``, on every hop (a redirect elsewhere is refused, and its body is never read);
- only public addresses: a host (or redirect target) that resolves to a loopback, private, link-local, multicast,
  reserved or otherwise non-global address is refused, and so is a connection that lands on one (the address
  actually connected to is checked, so a name that resolves again to another address gains nothing), unless
  ``$SAFECLIP_ALLOW_PRIVATE_URLS`` is set (a mirror on your own network; behind a proxy, the proxy's address is
  yours to choose);
- errors name the status code of a failed request, never the server's status text, body or its hash;
- each network wait (connect, each read) is bounded by ``timeout``, and the whole download by a deadline:
  ``deadline=`` seconds, else ``$SAFECLIP_FETCH_DEADLINE``, else :data:`DEADLINE_BASE_S` plus one second per
  :data:`DEADLINE_MIN_RATE` bytes received (a server trickling bytes is cut off; a slow honest one is not);
- partial files left by a killed download (its process gone, or unwritten for :data:`STALE_PARTIAL_S`) are removed
  by the next fetch.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import importlib.metadata
import os
import re
import secrets
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, unquote, urljoin, urlsplit

from ._dirs import default_cache_dir
from ._net import can_connect, env_true, non_public_kind, resolve
from .artifacts import sha256_file
from .errors import ArtifactIntegrityError, ArtifactUnavailableError, CacheError, ConfigError

__all__ = ["ALLOW_PRIVATE_ENV", "DEADLINE_BASE_S", "DEADLINE_ENV", "DEADLINE_MIN_RATE", "MAX_ARTIFACT_BYTES",
           "OFFLINE_ENV", "PROBE_TIMEOUT_S", "STALE_PARTIAL_S", "artifacts_cache_dir", "fetch_artifact", "mirror_dir"]

OFFLINE_ENV = "SAFECLIP_OFFLINE"
"""Set to 1 / true / yes / on: never download an artifact (``HF_HUB_OFFLINE`` counts too)."""

ALLOW_PRIVATE_ENV = "SAFECLIP_ALLOW_PRIVATE_URLS"
"""Set to 1 / true / yes / on: artifact URLs may reach loopback, private, link-local and other non-public addresses
(an artifact server on your own network, a test server on 127.0.0.1). Off by default: a policy file must not make
``policy lint`` or a Moderator probe the services of the network it runs in."""

PROBE_TIMEOUT_S = 3.0
"""How long the reachability probe waits for a TCP connection to an artifact's host (name resolution included)."""

MAX_ARTIFACT_BYTES = 1 << 30
"""The largest artifact a download may bring (1 GiB); anything bigger is refused as it streams."""

DEADLINE_BASE_S = 60.0
"""The default deadline of a download: this many seconds, plus one second per :data:`DEADLINE_MIN_RATE` bytes
received so far. An honest download at or above that average rate never reaches it; a server that trickles bytes
is cut off after about a minute; the longest default deadline (a 1 GiB artifact) is 4.6 hours."""

DEADLINE_MIN_RATE = 64 << 10
"""Bytes per second (64 KiB/s): the slowest average rate the default deadline waits for."""

DEADLINE_ENV = "SAFECLIP_FETCH_DEADLINE"
"""Seconds: the deadline of every download that is not given ``deadline=`` (instead of the default rule)."""

STALE_PARTIAL_S = DEADLINE_BASE_S + MAX_ARTIFACT_BYTES / DEADLINE_MIN_RATE
"""A partial download unwritten for longer than the longest default deadline is stale whoever owns it (a download
in progress writes at least every ``timeout`` seconds); one whose process on this machine is gone is stale at once."""

_MIRROR_ENV = "SAFECLIP_ARTIFACTS_DIR"
_CHUNK = 1 << 20
_SCHEMES = ("https", "http")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_NOT_PLAIN = re.compile(r"[/\\\x00-\x1f\x7f]|\.\.")
_PARTIAL_SUFFIX = ".part"
_LEGACY_PARTIAL = re.compile(r"\..+\.\d+\.\d+\.tmp")  # what earlier versions left: .<name>.<pid>.<thread>.tmp


class _NotDownloaded(Exception):
    """Why a download did not happen (the network's fault, not the file's); turned into the public error."""


class _NonPublicPeer(OSError):
    """A connection landed on a non-public address (raised from inside urllib, which wraps OSErrors)."""


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
                   cache_dir: str | os.PathLike[str] | None = None, timeout: float = 30.0,
                   deadline: float | None = None) -> Path:
    """The local path of the file published at ``url`` whose bytes hash to ``sha256`` (verified on every call).

    ``filename`` defaults to the last component of the URL's path. ``timeout`` bounds each network wait of a
    download (the connection, each read); ``deadline`` the whole download, in seconds (default:
    ``$SAFECLIP_FETCH_DEADLINE``, else :data:`DEADLINE_BASE_S` plus a second per :data:`DEADLINE_MIN_RATE` bytes
    received). Raises :class:`~safeclip.errors.ArtifactIntegrityError` for bytes that do not match the pin (or a
    download over :data:`MAX_ARTIFACT_BYTES`), :class:`~safeclip.errors.ArtifactUnavailableError` when the file is
    here nowhere and cannot be downloaded (offline, too slow, or at an address that is not public, see the module
    doc), :class:`~safeclip.errors.ConfigError` for a malformed pin or setting.

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
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ConfigError(f"timeout={timeout!r}: give the seconds a download may wait, a number > 0")
    limit = _deadline_rule(deadline)
    mirror = mirror_dir()
    if mirror is not None:
        found = _from_mirror(mirror, name, pin, url)
        if found is not None:
            return found
    folder = artifacts_cache_dir(cache_dir)
    _remove_stale_partials(folder)
    target = folder / pin / name
    if _cached(target, pin):
        return target
    reason = _offline_reason(parts)
    if reason is not None:
        raise _unavailable(name, pin, url, target, mirror, reason)
    try:
        _download(url, parts, target, name, pin, timeout, limit)
    except _NotDownloaded as e:
        raise _unavailable(name, pin, url, target, mirror, str(e)) from e.__cause__
    except OSError as e:
        raise CacheError(f"cannot write the artifact {name} into the cache at {target}: {e}") from e
    return target


def _deadline_rule(deadline: float | None) -> Callable[[int], float]:
    """Seconds a download may have taken once it has received ``n`` bytes: ``deadline``, ``$SAFECLIP_FETCH_DEADLINE``
    or the default rule."""
    where = "deadline"
    if deadline is None and os.environ.get(DEADLINE_ENV, "").strip():
        where, raw = f"${DEADLINE_ENV}", os.environ[DEADLINE_ENV].strip()
        try:
            deadline = float(raw)
        except ValueError:
            raise ConfigError(f"${DEADLINE_ENV}={raw!r}: give the seconds a download may take, a number > 0") from None
    if deadline is None:
        return lambda received: DEADLINE_BASE_S + received / DEADLINE_MIN_RATE
    if isinstance(deadline, bool) or not isinstance(deadline, (int, float)) or not 0 < deadline < float("inf"):
        raise ConfigError(f"{where}={deadline!r}: give the seconds a download may take, a number > 0")
    fixed = float(deadline)
    return lambda received: fixed


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


def _proxy_for(parts: SplitResult) -> SplitResult | None:
    """The proxy a request for ``parts`` goes through (from the environment, as urllib picks it), or None."""
    proxy = urllib.request.getproxies().get(parts.scheme.lower())
    if not proxy or urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return urlsplit(proxy if "://" in proxy else f"http://{proxy}")


def _default_port(scheme: str) -> int:
    return 443 if scheme.lower() == "https" else 80


def _refusal(parts: SplitResult, *, proxied: bool, what: str = "the URL's host") -> str | None:
    """Why a download may not go to ``parts``' host (its name resolves to a non-public address), else None.

    Behind a proxy the proxy resolves the name: a name that does not resolve here is the proxy's to judge.
    """
    if env_true(ALLOW_PRIVATE_ENV):
        return None
    addresses = resolve(parts.hostname or "", parts.port or _default_port(parts.scheme), PROBE_TIMEOUT_S)
    if addresses is None:
        return None if proxied else f"{what} does not resolve to an address within {PROBE_TIMEOUT_S:g} s"
    kinds = sorted({k for k in map(non_public_kind, addresses) if k is not None})
    if kinds:
        return (f"{what} resolves to a {'/'.join(kinds)} address, and artifacts are downloaded from public addresses "
                f"only (set ${ALLOW_PRIVATE_ENV}=1 to allow addresses on your own network)")
    return None


def _offline_reason(parts: SplitResult) -> str | None:
    """Why nothing can be downloaded from the URL's host now (an offline switch, a non-public address, no
    connection), else None."""
    for env in (OFFLINE_ENV, "HF_HUB_OFFLINE"):
        if env_true(env):
            return f"offline (${env} is set)"
    proxy = _proxy_for(parts)
    refused = _refusal(parts, proxied=proxy is not None)
    if refused is not None:
        return refused
    what, host, port = "host", parts.hostname or "", parts.port or _default_port(parts.scheme)
    if proxy is not None:  # the connection goes to the proxy, not the host
        what, host, port = "proxy", proxy.hostname or "", proxy.port or _default_port(proxy.scheme)
    if can_connect(host, port, PROBE_TIMEOUT_S):
        return None
    return f"the {what} {host}:{port} accepts no connection within {PROBE_TIMEOUT_S:g} s"


# ------------------------------------------------------------------------------------------------- partial files


def _partial_name() -> str:
    """``.<pid>.<random>.<host>.part``: whose it is, so that another process can tell when its owner is gone."""
    return f".{os.getpid()}.{secrets.token_hex(4)}.{socket.gethostname() or 'localhost'}{_PARTIAL_SUFFIX}"


def _owner_gone(name: str) -> bool:
    """Whether a partial file's name says it belongs to a process of this machine that no longer runs."""
    fields = name[1:-len(_PARTIAL_SUFFIX)].split(".", 2)
    if len(fields) != 3 or not fields[0].isdigit() or fields[2] != (socket.gethostname() or "localhost"):
        return False
    pid = fields[0]
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError, ValueError):  # PermissionError: another user's live process
        return False
    return False


def _remove_stale_partials(folder: Path) -> None:
    """Remove the partial downloads under ``<folder>/<sha256>/`` whose process is gone (``kill -9``) or that nobody
    has written for :data:`STALE_PARTIAL_S`. Best effort: a folder that cannot be listed is left alone."""
    now = time.time()
    with contextlib.suppress(OSError):
        for pin_dir in os.scandir(folder):
            if not (_SHA256.fullmatch(pin_dir.name) and pin_dir.is_dir(follow_symlinks=False)):
                continue
            with contextlib.suppress(OSError):
                for entry in os.scandir(pin_dir.path):
                    ours = entry.name.startswith(".") and entry.name.endswith(_PARTIAL_SUFFIX)
                    if not (ours or _LEGACY_PARTIAL.fullmatch(entry.name)) or not entry.is_file(follow_symlinks=False):
                        continue
                    with contextlib.suppress(OSError):
                        if (ours and _owner_gone(entry.name)) or now - entry.stat().st_mtime > STALE_PARTIAL_S:
                            os.unlink(entry.path)


# ------------------------------------------------------------------------------------------------------ download


class _Transfer:
    """One download's fences: the deadline (a watchdog shuts its sockets down when it passes) and the public-address
    check of every connection it opens."""

    def __init__(self, limit: Callable[[int], float]) -> None:
        self.limit = limit
        self.start = time.monotonic()
        self.received = 0
        self.expired = threading.Event()
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []  # duplicates of each connection's socket, to shut it down from here
        self._watchdog = threading.Thread(target=self._watch, name="safeclip-fetch-deadline", daemon=True)
        self._watchdog.start()

    def allowed(self) -> float:
        return self.limit(self.received)

    def _watch(self) -> None:
        # The allowance only grows with the bytes received: wait for the current one, then look again.
        while not self._done.wait(max(0.0, self.start + self.allowed() - time.monotonic())):
            if time.monotonic() >= self.start + self.allowed():
                self.expired.set()
                with self._lock:
                    for sock in self._sockets:
                        with contextlib.suppress(OSError):
                            sock.shutdown(socket.SHUT_RDWR)  # wakes a read blocked in another thread
                return

    def close(self) -> None:
        self._done.set()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()
            self._sockets.clear()

    def connection(self, cls: type[http.client.HTTPConnection], req: urllib.request.Request) -> Callable[..., Any]:
        """A factory of ``cls`` connections for ``req`` (what ``do_open`` calls) whose sockets this transfer checks
        (a non-public peer is refused unless a proxy is in the way) and can shut down."""
        netloc = unquote(urlsplit(req.full_url).netloc).lower()
        check_peer = req.host.lower() == netloc and not env_true(ALLOW_PRIVATE_ENV)  # else the peer is a proxy

        def make(host: str, **kwargs: Any) -> http.client.HTTPConnection:
            conn = cls(host, **kwargs)
            create = conn._create_connection  # type: ignore[attr-defined]

            def create_checked(address: Any, *args: Any, **kw: Any) -> socket.socket:
                if self.expired.is_set():
                    raise TimeoutError("the download's deadline has passed")
                sock = create(address, *args, **kw)
                try:
                    kind = non_public_kind(str(sock.getpeername()[0])) if check_peer else None
                    if kind is not None:
                        raise _NonPublicPeer(kind)
                    with self._lock:
                        self._sockets.append(sock.dup())
                except BaseException:
                    sock.close()
                    raise
                return sock

            conn._create_connection = create_checked  # type: ignore[attr-defined]
            return conn

        return make


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, transfer: _Transfer) -> None:
        super().__init__()
        self.transfer = transfer

    def http_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(self.transfer.connection(http.client.HTTPConnection, req), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, transfer: _Transfer) -> None:
        super().__init__()
        self.transfer = transfer

    def https_open(self, req: urllib.request.Request) -> Any:
        context = getattr(self, "_context", None)  # the handler's SSL context (None: the default one)
        return self.do_open(self.transfer.connection(http.client.HTTPSConnection, req), req, context=context)


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to an http(s) URL on a public host, and never reads the redirect's body."""

    def http_error_302(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any) -> Any:
        location = headers.get("location") or headers.get("uri")
        if location is not None:  # urllib refuses file:// itself, but with the server's words: refuse it first
            scheme = urlsplit(urljoin(req.full_url, location.strip())).scheme.lower()
            if scheme not in _SCHEMES:
                fp.close()
                raise _NotDownloaded(f"the server redirected to {_scheme_words(scheme)}; artifacts are downloaded "
                                     "over https:// or http:// only")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> urllib.request.Request | None:
        fp.close()  # urllib would read the whole body of the redirect into memory
        parts = urlsplit(newurl)
        if parts.scheme.lower() not in _SCHEMES or not parts.hostname:
            raise _NotDownloaded(f"the server redirected to {_scheme_words(parts.scheme.lower())} without a host; "
                                 "artifacts are downloaded from https:// or http:// URLs with a host only")
        refused = _refusal(parts, proxied=_proxy_for(parts) is not None, what="the redirect's host")
        if refused is not None:
            raise _NotDownloaded(f"the server redirected to a host it may not: {refused}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _scheme_words(scheme: str) -> str:
    """``an ftp:// URL``: a redirect's scheme in words (only a plain one: it is the server's text)."""
    return f"an {scheme}:// URL" if re.fullmatch(r"[a-z][a-z0-9+.-]{0,15}", scheme) else "a URL of another kind"


def _why(e: BaseException, parts: SplitResult, transfer: _Transfer, timeout: float) -> _NotDownloaded:
    """The reason a download failed, in words that repeat nothing the server sent but a status code."""
    if transfer.expired.is_set():
        return _NotDownloaded(f"the download did not finish within its deadline of {transfer.allowed():.0f} s "
                              f"({transfer.received} bytes received)")
    if isinstance(e, urllib.error.HTTPError):
        e.close()
        return _NotDownloaded(f"the server answered HTTP {e.code}")
    cause = e.reason if isinstance(e, urllib.error.URLError) else e
    if isinstance(cause, _NonPublicPeer):
        return _NotDownloaded(f"the connection to {parts.hostname} reached a {cause} address, and artifacts are "
                              f"downloaded from public addresses only (set ${ALLOW_PRIVATE_ENV}=1 to allow it)")
    if isinstance(cause, TimeoutError):
        return _NotDownloaded(f"{parts.hostname} sent nothing for {timeout:g} s")
    detail = cause.strerror if isinstance(cause, OSError) and cause.strerror else None
    return _NotDownloaded(f"the download failed ({type(cause).__name__}{': ' + detail if detail else ''})")


def _download(url: str, parts: SplitResult, target: Path, name: str, pin: str, timeout: float,
              limit: Callable[[int], float]) -> None:
    """Stream ``url`` into a partial file beside ``target``, hashing; rename it into place only if the bytes match the
    pin (else it is removed)."""
    def too_big() -> ArtifactIntegrityError:
        return ArtifactIntegrityError(f"{url} holds more than {MAX_ARTIFACT_BYTES} bytes, the most an artifact may "
                                      f"be: refusing {name}")

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(_partial_name())
    transfer = _Transfer(limit)
    opener = urllib.request.build_opener(_HTTPHandler(transfer), _HTTPSHandler(transfer), _RedirectHandler())
    request = urllib.request.Request(url, headers={"User-Agent": _user_agent()})
    try:
        try:
            response = opener.open(request, timeout=timeout)
        except (OSError, http.client.HTTPException, ValueError) as e:  # URLError and HTTPError are OSErrors
            raise _why(e, parts, transfer, timeout) from e
        h = hashlib.sha256()
        with response, open(partial, "xb") as f:
            length = response.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > MAX_ARTIFACT_BYTES:
                raise too_big()
            while True:
                try:
                    chunk = response.read1(_CHUNK)  # one read of the socket at most: each bounded by timeout
                except (OSError, http.client.HTTPException, ValueError) as e:
                    raise _why(e, parts, transfer, timeout) from e
                if not chunk:
                    break
                transfer.received += len(chunk)
                if transfer.received > MAX_ARTIFACT_BYTES:
                    raise too_big()
                h.update(chunk)
                f.write(chunk)
        if transfer.expired.is_set():  # the watchdog's shutdown reads as the end of the body
            raise _why(TimeoutError(), parts, transfer, timeout)
        if h.hexdigest() != pin:
            raise ArtifactIntegrityError(f"the file downloaded from {url} does not hash to the pin of the artifact "
                                         f"{name} ({pin}); nothing was kept: check the pin and the URL")
        os.replace(partial, target)
    finally:
        transfer.close()
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()


def _user_agent() -> str:
    try:  # the installed version, as safeclip.__version__ is; not imported from the package, which imports us
        return f"safeclip/{importlib.metadata.version('safeclip')}"
    except importlib.metadata.PackageNotFoundError:  # a source tree on sys.path, not installed
        return "safeclip"


def _unavailable(name: str, pin: str, url: str, target: Path, mirror: Path | None,
                 reason: str) -> ArtifactUnavailableError:
    where = f"now {mirror}" if mirror is not None else "set it to a folder holding the file"
    return ArtifactUnavailableError(
        f"the artifact {name} (sha256 {pin}) is not here and cannot be downloaded: {' '.join(reason.split())}. "
        f"Download {url} on a connected machine and put it in ${_MIRROR_ENV} ({where}), or at {target}")
