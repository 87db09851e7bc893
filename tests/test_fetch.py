"""Pinned artifacts fetched on first use (safeclip.fetch): mirror, cache, download, and one clear line offline.

No real internet: files are served by a local ``ThreadingHTTPServer`` on 127.0.0.1, which downloads reach only with
``$SAFECLIP_ALLOW_PRIVATE_URLS`` set (every test sets it unless it tests the refusal). "No network touched" is checked
by replacing ``socket.create_connection`` (what both the reachability probe and urllib connect through) with one that
records the attempt and refuses it.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import safeclip
from safeclip import fetch
from safeclip.errors import ArtifactIntegrityError, ArtifactUnavailableError, ConfigError
from safeclip.fetch import artifacts_cache_dir, fetch_artifact, mirror_dir

DATA = b'{"format": 1, "weights": [0.25, -0.5, 0.75]}\n'
SHA = hashlib.sha256(DATA).hexdigest()
OTHER = b"not the pinned bytes\n"
SECRET = b"internal admin page\n"


class _Server:
    def __init__(self) -> None:
        self.files = {f"/{kind}/head.json": DATA for kind in ("heads", "nolength", "huge")}
        self.requests: list[tuple[str, str]] = []  # (path, User-Agent)
        self.slow = threading.Event()  # release for the handler of /slow/
        self.cut: list[str] = []  # trickles the client hung up on
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append((self.path, self.headers.get("User-Agent", "")))
                if self.path.startswith("/slow/"):
                    server.slow.wait(10)
                if self._special():
                    return
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                if self.path.startswith("/huge/"):  # announces 2 GiB; a client that believes it reads no body
                    self.send_header("Content-Length", str(2 << 30))
                elif not self.path.startswith("/nolength/"):  # HTTP/1.0: the body ends when the connection closes
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _special(self) -> bool:
                """The hostile endpoints: redirects, trickles, a talkative internal service."""
                kind = self.path.split("/")[1]
                if kind == "redirect":  # /redirect/<scheme>/<host:port>/<path>
                    scheme, host, rest = self.path.split("/", 4)[2:5]
                    self.send_response(302)
                    self.send_header("Location", f"{scheme}://{host}/{rest}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif kind == "secret":  # an internal service: its status text and body must not be echoed
                    self.send_response(200, "Internal-Token-s3cr3t")
                    self.send_header("Content-Length", str(len(SECRET)))
                    self.end_headers()
                    self.wfile.write(SECRET)
                elif kind == "forbidden":
                    self.send_response(403, "Internal-Token-s3cr3t")
                    self.send_header("Content-Length", str(len(SECRET)))
                    self.end_headers()
                    self.wfile.write(SECRET)
                elif kind == "trickle":  # the whole body announced, then a byte every 0.25 s (bounded: ~12 s)
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(DATA)))
                    self.end_headers()
                    self._trickle(DATA)
                elif kind == "trickle-headers":  # headers a byte at a time: the body is never reached in time
                    self.wfile.write(b"HTTP/1.0 200 OK\r\n")
                    self._trickle(b"X-Padding: " + b"a" * 40 + b"\r\n\r\n")
                else:
                    return False
                return True

            def _trickle(self, data: bytes) -> None:
                try:
                    for i in range(len(data)):
                        self.wfile.write(data[i:i + 1])
                        self.wfile.flush()
                        time.sleep(0.25)
                except OSError:  # the client went away: what a deadline does
                    server.cut.append(self.path)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, path: str = "/heads/head.json") -> str:
        return self.base + path


@pytest.fixture(scope="module")
def server() -> Iterator[_Server]:
    s = _Server()
    t = threading.Thread(target=s.httpd.serve_forever, daemon=True)
    t.start()
    yield s
    s.slow.set()
    s.httpd.shutdown()
    s.httpd.server_close()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("SAFECLIP_ARTIFACTS_DIR", "SAFECLIP_OFFLINE", "HF_HUB_OFFLINE", "http_proxy", "https_proxy",
                 "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY",
                 "SAFECLIP_FETCH_DEADLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SAFECLIP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SAFECLIP_ALLOW_PRIVATE_URLS", "1")  # the test server is on 127.0.0.1


def _refuse_connections(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """From now on every connection attempt is recorded and refused; a test asserts the list stays empty."""
    attempts: list[tuple] = []

    def refuse(address, *args, **kwargs):
        attempts.append(address)
        raise OSError("this test allows no network")

    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    return _refuse_connections(monkeypatch)


@pytest.fixture
def mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "mirror"
    folder.mkdir()
    monkeypatch.setenv("SAFECLIP_ARTIFACTS_DIR", str(folder))
    return folder


def _cache_files(cache: Path) -> list[Path]:
    return sorted(p for p in cache.rglob("*") if p.is_file()) if cache.exists() else []


def test_defaults(tmp_path):
    assert artifacts_cache_dir() == tmp_path / "cache" / "artifacts"  # $SAFECLIP_CACHE_DIR, as the embed cache
    assert artifacts_cache_dir(tmp_path / "c") == tmp_path / "c" / "artifacts"
    assert mirror_dir() is None
    assert fetch.OFFLINE_ENV == "SAFECLIP_OFFLINE"


@pytest.mark.parametrize("layout", ["<filename>", "<sha256>", "<sha256>/<filename>"])
def test_mirror_hit_under_each_name(mirror, no_network, server, tmp_path, layout):
    rel = layout.replace("<filename>", "head.json").replace("<sha256>", SHA)
    copy = mirror / rel
    copy.parent.mkdir(parents=True, exist_ok=True)
    copy.write_bytes(DATA)
    assert mirror_dir() == mirror
    assert fetch_artifact(server.url(), SHA, cache_dir=tmp_path / "c") == copy
    assert no_network == [] and _cache_files(tmp_path / "c") == []


def test_a_wrong_mirror_copy_is_refused_not_bypassed(mirror, no_network, server, tmp_path):
    (mirror / "head.json").write_bytes(OTHER)
    with pytest.raises(ArtifactIntegrityError) as ei:
        fetch_artifact(server.url(), SHA.upper(), cache_dir=tmp_path / "c")  # the pin's case does not matter
    msg = str(ei.value)
    assert str(mirror / "head.json") in msg and hashlib.sha256(OTHER).hexdigest() in msg and SHA in msg
    assert no_network == [] and _cache_files(tmp_path / "c") == []


def test_a_right_copy_wins_over_a_wrong_one_under_another_name(mirror, no_network, server, tmp_path):
    (mirror / "head.json").write_bytes(OTHER)  # an older version under the plain name
    (mirror / SHA).write_bytes(DATA)
    assert fetch_artifact(server.url(), SHA, cache_dir=tmp_path / "c") == mirror / SHA
    assert no_network == []


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_a_mirror_that_is_not_a_folder(tmp_path, monkeypatch, server, kind):
    path = tmp_path / "nope"
    if kind == "file":
        path.write_bytes(b"")
    monkeypatch.setenv("SAFECLIP_ARTIFACTS_DIR", str(path))
    with pytest.raises(ConfigError, match=rf"^\$SAFECLIP_ARTIFACTS_DIR={path} is not a folder"):
        fetch_artifact(server.url(), SHA, cache_dir=tmp_path / "c")


def test_a_mirror_without_the_file_falls_through_to_the_download(mirror, server, tmp_path):
    path = fetch_artifact(server.url(), SHA, cache_dir=tmp_path / "c")
    assert path == artifacts_cache_dir(tmp_path / "c") / SHA / "head.json" and path.read_bytes() == DATA


def test_a_download_fills_the_cache_and_the_second_call_needs_no_server(server, tmp_path, monkeypatch):
    before = len(server.requests)
    path = fetch_artifact(server.url(), SHA)  # the default cache: $SAFECLIP_CACHE_DIR/artifacts
    assert path == tmp_path / "cache" / "artifacts" / SHA / "head.json" and path.read_bytes() == DATA
    assert _cache_files(tmp_path / "cache") == [path]  # no temporary file left beside it
    assert server.requests[before:] == [("/heads/head.json", f"safeclip/{safeclip.__version__}")]
    attempts = _refuse_connections(monkeypatch)
    assert fetch_artifact(server.url(), SHA) == path
    assert attempts == [] and len(server.requests) == before + 1


def test_the_name_can_be_given_and_is_unquoted_from_the_url(server, tmp_path):
    server.files["/heads/my%20head.json"] = DATA
    assert fetch_artifact(server.url("/heads/my%20head.json"), SHA, cache_dir=tmp_path).name == "my head.json"
    assert fetch_artifact(server.url(), SHA, filename="probe.json", cache_dir=tmp_path).name == "probe.json"


def test_the_cache_is_verified_on_every_call(server, tmp_path, monkeypatch):
    path = fetch_artifact(server.url(), SHA, cache_dir=tmp_path)
    path.write_bytes(OTHER)  # corrupt: fetched again
    before = len(server.requests)
    assert fetch_artifact(server.url(), SHA, cache_dir=tmp_path) == path and path.read_bytes() == DATA
    assert len(server.requests) == before + 1
    path.write_bytes(OTHER)
    monkeypatch.setenv("SAFECLIP_OFFLINE", "1")
    with pytest.raises(ArtifactUnavailableError):
        fetch_artifact(server.url(), SHA, cache_dir=tmp_path)
    assert not path.exists()  # the corrupt copy is not left to be served by anything else


def test_a_download_with_other_bytes_is_refused_and_not_kept(server, tmp_path):
    wrong = hashlib.sha256(OTHER).hexdigest()
    with pytest.raises(ArtifactIntegrityError) as ei:
        fetch_artifact(server.url(), wrong, cache_dir=tmp_path)
    assert wrong in str(ei.value) and server.url() in str(ei.value)
    assert SHA not in str(ei.value)  # the hash of what the server sent is not echoed (issue 21.2)
    assert _cache_files(tmp_path) == []


@pytest.mark.parametrize("path", ["/heads/head.json", "/nolength/head.json"])  # Content-Length, or streamed
def test_the_size_cap(server, tmp_path, monkeypatch, path):
    monkeypatch.setattr(fetch, "MAX_ARTIFACT_BYTES", len(DATA) - 1)
    with pytest.raises(ArtifactIntegrityError, match="more than"):
        fetch_artifact(server.url(path), SHA, cache_dir=tmp_path)
    assert _cache_files(tmp_path) == []
    monkeypatch.setattr(fetch, "MAX_ARTIFACT_BYTES", len(DATA))
    assert fetch_artifact(server.url(path), SHA, cache_dir=tmp_path).read_bytes() == DATA


def test_a_download_announced_over_1_gib_is_refused_before_its_body(server, tmp_path):
    with pytest.raises(ArtifactIntegrityError, match=f"more than {1 << 30} bytes"):
        fetch_artifact(server.url("/huge/head.json"), SHA, cache_dir=tmp_path)
    assert _cache_files(tmp_path) == []


def _assert_one_clear_line(e: ArtifactUnavailableError, url: str, name: str, tmp_path: Path) -> str:
    msg = str(e)
    assert "\n" not in msg
    assert name in msg and SHA in msg and url in msg and "$SAFECLIP_ARTIFACTS_DIR" in msg
    assert str(artifacts_cache_dir(tmp_path) / SHA / name) in msg
    return msg


def test_not_found(server, tmp_path):
    url = server.url("/heads/missing.json")
    with pytest.raises(ArtifactUnavailableError) as ei:
        fetch_artifact(url, SHA, cache_dir=tmp_path)
    assert "HTTP 404" in _assert_one_clear_line(ei.value, url, "missing.json", tmp_path)
    assert _cache_files(tmp_path) == []


def _closed_port() -> int:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens, the connection is refused
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(20)
def test_an_unreachable_host(tmp_path):
    port = _closed_port()
    url = f"http://127.0.0.1:{port}/heads/head.json"
    with pytest.raises(ArtifactUnavailableError) as ei:
        fetch_artifact(url, SHA, cache_dir=tmp_path)
    msg = _assert_one_clear_line(ei.value, url, "head.json", tmp_path)
    assert f"127.0.0.1:{port} accepts no connection" in msg


@pytest.mark.timeout(20)
def test_behind_a_proxy_the_proxy_is_probed(server, tmp_path, monkeypatch):
    port = _closed_port()
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{port}")
    with pytest.raises(ArtifactUnavailableError, match=f"the proxy 127.0.0.1:{port} accepts no connection"):
        fetch_artifact(server.url(), SHA, cache_dir=tmp_path)
    monkeypatch.setenv("no_proxy", "127.0.0.1")  # the server is not behind it
    assert fetch_artifact(server.url(), SHA, cache_dir=tmp_path).read_bytes() == DATA


@pytest.mark.parametrize("env", ["SAFECLIP_OFFLINE", "HF_HUB_OFFLINE"])
@pytest.mark.parametrize("value", ["1", "true", "YES", "on"])
def test_offline_attempts_no_connection(server, no_network, tmp_path, monkeypatch, env, value):
    monkeypatch.setenv(env, value)
    with pytest.raises(ArtifactUnavailableError) as ei:
        fetch_artifact(server.url(), SHA, cache_dir=tmp_path)
    assert f"offline (${env} is set)" in _assert_one_clear_line(ei.value, server.url(), "head.json", tmp_path)
    assert no_network == []


def test_offline_still_serves_the_cache(server, tmp_path, monkeypatch):
    path = fetch_artifact(server.url(), SHA, cache_dir=tmp_path)
    attempts = _refuse_connections(monkeypatch)
    monkeypatch.setenv("SAFECLIP_OFFLINE", "1")
    assert fetch_artifact(server.url(), SHA, cache_dir=tmp_path) == path and attempts == []


def test_a_silent_server_times_out(server, tmp_path):
    server.files["/slow/head.json"] = DATA
    t0 = time.monotonic()
    with pytest.raises(ArtifactUnavailableError, match="sent nothing for 0.5 s"):
        fetch_artifact(server.url("/slow/head.json"), SHA, cache_dir=tmp_path, timeout=0.5)
    assert time.monotonic() - t0 < 8  # a hang guard: the handler would answer after 10 s
    assert _cache_files(tmp_path) == []


@pytest.mark.parametrize("name", ["../head.json", "a/b.json", "a\\b.json", "..", ".", "", "a\x00b", "a\nb", "a\x7fb"])
def test_bad_file_names(server, tmp_path, name):
    with pytest.raises(ConfigError, match="not a plain file name"):
        fetch_artifact(server.url(), SHA, filename=name, cache_dir=tmp_path)


@pytest.mark.parametrize("path", ["/heads/%2E%2E", "/heads/a%2Fb.json", "/heads/a%5Cb", "/heads/"])
def test_bad_file_names_from_the_url(server, tmp_path, path):
    with pytest.raises(ConfigError, match="not a plain file name"):
        fetch_artifact(server.url(path), SHA, cache_dir=tmp_path)


@pytest.mark.parametrize("url", ["ftp://example.org/head.json", "file:///etc/passwd", "example.org/head.json",
                                 "https:///head.json", "http://example.org:x/head.json", "https://exa mple.org/h"])
def test_only_http_urls(tmp_path, url, no_network):
    with pytest.raises(ConfigError, match="URL"):
        fetch_artifact(url, SHA, cache_dir=tmp_path)
    assert no_network == []


@pytest.mark.parametrize("sha", ["", "abc", SHA[:-1] + "g", SHA + "0", None])
def test_bad_pins(server, tmp_path, sha):
    with pytest.raises(ConfigError, match="64 hex digits"):
        fetch_artifact(server.url(), sha, cache_dir=tmp_path)


def test_concurrent_fetches_of_one_artifact_all_get_a_verified_file(server, tmp_path):
    n = 6
    start = threading.Barrier(n)
    results: list[Path | BaseException] = []

    def one() -> None:
        start.wait()
        try:
            results.append(fetch_artifact(server.url(), SHA, cache_dir=tmp_path))
        except Exception as e:  # noqa: BLE001 (the assert below reports it)
            results.append(e)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    target = artifacts_cache_dir(tmp_path) / SHA / "head.json"
    assert results == [target] * n
    assert target.read_bytes() == DATA and _cache_files(tmp_path) == [target]


# ------------------------------------------------------------- issue 21.2: public addresses and http(s) only


def _policy_naming(tmp_path: Path, url: str, sha: str = SHA) -> Path:
    policy = tmp_path / "p.yaml"
    policy.write_text(f"name: p\nversion: '1'\nextends: default\ncategories:\n  sexual:\n"
                      f"    head: {{url: '{url}', sha256: {sha}}}\n")
    return policy


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]"])
def test_loopback_and_private_hosts_are_refused_unless_allowed(server, tmp_path, monkeypatch, host):
    """Regression (issue 21.2): a policy's url reached services on loopback and private addresses during
    `policy lint`. Refused before any request is sent, unless $SAFECLIP_ALLOW_PRIVATE_URLS is set."""
    monkeypatch.delenv("SAFECLIP_ALLOW_PRIVATE_URLS")
    url = server.url("/heads/head.json").replace("127.0.0.1", host)
    before = len(server.requests)
    with pytest.raises(ArtifactUnavailableError, match="resolves to a loopback address.*SAFECLIP_ALLOW_PRIVATE_URLS"):
        fetch_artifact(url, SHA, cache_dir=tmp_path)
    assert len(server.requests) == before and _cache_files(tmp_path) == []
    monkeypatch.setenv("SAFECLIP_ALLOW_PRIVATE_URLS", "1")
    if host != "[::ffff:127.0.0.1]":  # the test server listens on IPv4 only
        assert fetch_artifact(url, SHA, cache_dir=tmp_path).read_bytes() == DATA


@pytest.mark.parametrize("address, kind", [("10.1.2.3", "private"), ("169.254.169.254", "link-local"),
                                           ("224.0.0.1", "multicast"), ("0.0.0.0", "unspecified"),
                                           ("[fe80::1]", "link-local"), ("100.64.0.1", "non-global")])
def test_every_kind_of_non_public_address_is_refused_without_a_connection(tmp_path, monkeypatch, no_network,
                                                                           address, kind):
    monkeypatch.delenv("SAFECLIP_ALLOW_PRIVATE_URLS")
    with pytest.raises(ArtifactUnavailableError, match=f"resolves to a {kind} address"):
        fetch_artifact(f"http://{address}/heads/head.json", SHA, cache_dir=tmp_path)
    assert no_network == []


def test_lint_refuses_an_internal_url_and_echoes_nothing_of_the_service(server, tmp_path, monkeypatch):
    """Regression (issue 21.2): `policy lint` of a policy naming an internal service echoed the service's status line
    and the sha256 of its body. Refused without the opt-in; with it, only the status code is named."""
    from safeclip.compiled import lint_policy
    from safeclip.errors import PolicyError

    secret_sha = hashlib.sha256(SECRET).hexdigest()
    for path in ("/secret/head.json", "/forbidden/head.json"):
        monkeypatch.delenv("SAFECLIP_ALLOW_PRIVATE_URLS", raising=False)
        before = len(server.requests)
        with pytest.raises(PolicyError, match="loopback") as ei:
            lint_policy(_policy_naming(tmp_path, server.url(path)))
        assert len(server.requests) == before
        monkeypatch.setenv("SAFECLIP_ALLOW_PRIVATE_URLS", "1")
        with pytest.raises(PolicyError) as ei:
            lint_policy(_policy_naming(tmp_path, server.url(path)))
        msg = str(ei.value)
        assert "s3cr3t" not in msg and secret_sha not in msg and "admin" not in msg
        assert ("HTTP 403" in msg) == path.startswith("/forbidden/")


@pytest.mark.parametrize("target", ["ftp/127.0.0.1/head.json", "file/localhost/etc/passwd"])
def test_a_redirect_to_another_scheme_is_refused(server, tmp_path, target):
    """Regression (issue 21.2): a redirect to ftp:// was followed (an ftp:// URL given directly is refused)."""
    with pytest.raises(ArtifactUnavailableError, match=r"redirected to an (ftp|file):// URL"):
        fetch_artifact(server.url(f"/redirect/{target}"), SHA, cache_dir=tmp_path)
    assert _cache_files(tmp_path) == []


def test_a_redirect_is_followed_to_an_allowed_host_only(server, tmp_path, monkeypatch):
    host = server.base.split("://")[1]
    url = server.url(f"/redirect/http/{host}/heads/head.json")
    assert fetch_artifact(url, SHA, cache_dir=tmp_path).read_bytes() == DATA  # allowed here: followed
    # 127.0.0.1 passes for public from here on (the first hop); the redirect's target is private.
    monkeypatch.delenv("SAFECLIP_ALLOW_PRIVATE_URLS")
    monkeypatch.setattr(fetch, "non_public_kind", lambda a: None if a == "127.0.0.1" else "private")
    before = len(server.requests)
    with pytest.raises(ArtifactUnavailableError, match="redirected to a host it may not.*private"):
        fetch_artifact(server.url("/redirect/http/10.0.0.1/heads/head.json"), SHA, cache_dir=tmp_path / "2")
    assert [p for p, _ in server.requests[before:]] == ["/redirect/http/10.0.0.1/heads/head.json"]


def test_the_address_connected_to_is_checked_not_only_the_name(server, tmp_path, monkeypatch):
    """A name that resolved to a public address for the check and to another one for the connection (DNS rebinding)
    gains nothing: the peer of the connection itself is checked, and no request is sent to it."""
    monkeypatch.delenv("SAFECLIP_ALLOW_PRIVATE_URLS")
    monkeypatch.setattr(fetch, "resolve", lambda host, port, timeout: ["93.184.215.14"])  # "public" when checked
    before = len(server.requests)
    with pytest.raises(ArtifactUnavailableError, match="reached a loopback address"):
        fetch_artifact(server.url(), SHA, cache_dir=tmp_path)
    assert len(server.requests) == before and _cache_files(tmp_path) == []


# ------------------------------------------------------------------------------ issue 21.3: deadlines


@pytest.mark.timeout(30)
@pytest.mark.parametrize("path", ["/trickle/head.json", "/trickle-headers/head.json"])
def test_a_trickling_server_is_cut_off_at_the_deadline(server, tmp_path, path):
    """Regression (issue 21.3): a server sending a byte now and then (each read well within `timeout`) held a fetch
    for as long as it liked, in the body or in the headers."""
    t0 = time.monotonic()
    with pytest.raises(ArtifactUnavailableError, match="did not finish within its deadline of 1 s"):
        fetch_artifact(server.url(path), SHA, cache_dir=tmp_path, timeout=5, deadline=1.0)
    assert time.monotonic() - t0 < 4  # the trickle itself lasts over 10 s
    assert _cache_files(tmp_path) == []


@pytest.mark.timeout(30)
def test_the_default_deadline_and_its_setting(server, tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "DEADLINE_BASE_S", 1.0)  # the default rule, scaled down
    t0 = time.monotonic()
    with pytest.raises(ArtifactUnavailableError, match="deadline of 1 s"):
        fetch_artifact(server.url("/trickle/head.json"), SHA, cache_dir=tmp_path, timeout=5)
    assert time.monotonic() - t0 < 4
    monkeypatch.setattr(fetch, "DEADLINE_BASE_S", 600.0)
    monkeypatch.setenv("SAFECLIP_FETCH_DEADLINE", "1")
    with pytest.raises(ArtifactUnavailableError, match="deadline of 1 s"):
        fetch_artifact(server.url("/trickle/head.json"), SHA, cache_dir=tmp_path, timeout=5)
    for bad in ("soon", "0", "-1", "inf", "nan"):
        monkeypatch.setenv("SAFECLIP_FETCH_DEADLINE", bad)
        with pytest.raises(ConfigError, match="SAFECLIP_FETCH_DEADLINE"):
            fetch_artifact(server.url(), SHA, cache_dir=tmp_path)
    monkeypatch.delenv("SAFECLIP_FETCH_DEADLINE")
    for bad in (0, -1.0, float("inf"), True, "10"):
        with pytest.raises(ConfigError, match="deadline="):
            fetch_artifact(server.url(), SHA, cache_dir=tmp_path, deadline=bad)
    assert fetch_artifact(server.url(), SHA, cache_dir=tmp_path, deadline=30).read_bytes() == DATA


def test_the_default_deadline_grows_with_the_bytes_received():
    rule = fetch._deadline_rule(None)
    assert rule(0) == fetch.DEADLINE_BASE_S
    assert rule(fetch.DEADLINE_MIN_RATE * 100) == fetch.DEADLINE_BASE_S + 100
    assert rule(fetch.MAX_ARTIFACT_BYTES) == fetch.STALE_PARTIAL_S < 5 * 3600
    assert fetch._deadline_rule(12.5)(10**9) == 12.5


# ----------------------------------------------------------------- issue 21.5: partial files of killed downloads


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(proc.stdout)


def test_stale_partial_files_are_removed_by_the_next_fetch(server, tmp_path):
    """Regression (issue 21.5): partial downloads left by a killed process stayed in the cache for ever."""
    host = socket.gethostname()
    folder = artifacts_cache_dir(tmp_path)
    mine, other = folder / SHA, folder / ("ab" * 32)
    for d in (mine, other):
        d.mkdir(parents=True)
    old = time.time() - fetch.STALE_PARTIAL_S - 60
    files = {
        mine / f".{_dead_pid()}.0a1b2c3d.{host}.part": True,  # its process is gone
        other / f".{_dead_pid()}.0a1b2c3d.{host}.part": True,  # another artifact's, as well
        mine / f".{os.getpid()}.0a1b2c3d.{host}.part": False,  # a live download (this process)
        mine / f".{_dead_pid()}.0a1b2c3d.another-machine.part": False,  # another machine's: its pid means nothing here
        mine / f".{os.getpid()}.1a1b2c3d.another-machine.part": True,  # ... unless unwritten longer than any deadline
        mine / ".head.json.12345.67890.tmp": True,  # an earlier version's, old
        mine / ".head.json.12345.67891.tmp": False,  # an earlier version's, recent
        mine / "notes.txt": False,  # not a partial file
    }
    for path in files:
        path.write_bytes(b"partial")
    for path in (mine / f".{os.getpid()}.1a1b2c3d.another-machine.part", mine / ".head.json.12345.67890.tmp"):
        os.utime(path, (old, old))
    assert fetch_artifact(server.url(), SHA, cache_dir=tmp_path).read_bytes() == DATA
    assert {p.name for p, gone in files.items() if gone and p.exists()} == set()
    assert {p.name for p, gone in files.items() if not gone and not p.exists()} == set()


@pytest.mark.timeout(60)
def test_a_download_killed_mid_way_leaves_nothing_after_the_next_fetch(server, tmp_path):
    """kill -9 during a download (a trickling server keeps it in flight), then fetch again: only the artifact."""
    code = ("import sys; from safeclip.fetch import fetch_artifact; "
            "fetch_artifact(sys.argv[1], sys.argv[2], cache_dir=sys.argv[3])")
    proc = subprocess.Popen([sys.executable, "-c", code, server.url("/trickle/head.json"), SHA, str(tmp_path)],
                            env=dict(os.environ))
    try:
        deadline = time.monotonic() + 30
        while not _cache_files(tmp_path):
            assert time.monotonic() < deadline and proc.poll() is None, "no partial file appeared"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    assert len(_cache_files(tmp_path)) == 1  # the partial file, left behind
    path = fetch_artifact(server.url(), SHA, cache_dir=tmp_path)
    assert _cache_files(tmp_path) == [path] and path.read_bytes() == DATA


@pytest.fixture
def silent_listener() -> Iterator[str]:
    """A TCP port on 127.0.0.1 that accepts connections and never sends a byte (a TLS handshake that never ends)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    t.join(5)
    for s in accepted + [listener]:
        s.close()


def test_https_connections_are_checked_too(silent_listener, tmp_path, monkeypatch):
    monkeypatch.delenv("SAFECLIP_ALLOW_PRIVATE_URLS")
    monkeypatch.setattr(fetch, "resolve", lambda host, port, timeout: ["93.184.215.14"])
    with pytest.raises(ArtifactUnavailableError, match="reached a loopback address"):
        fetch_artifact(f"https://{silent_listener}/heads/head.json", SHA, cache_dir=tmp_path)


@pytest.mark.timeout(30)
def test_a_tls_handshake_that_never_ends_is_cut_off_at_the_deadline(silent_listener, tmp_path):
    t0 = time.monotonic()
    with pytest.raises(ArtifactUnavailableError, match="deadline of 1 s"):
        fetch_artifact(f"https://{silent_listener}/heads/head.json", SHA, cache_dir=tmp_path, timeout=10, deadline=1)
    assert time.monotonic() - t0 < 5  # each read may wait 10 s
