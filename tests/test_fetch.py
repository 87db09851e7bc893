"""Pinned artifacts fetched on first use (safeclip.fetch): mirror, cache, download, and one clear line offline.

No real internet: files are served by a local ``ThreadingHTTPServer`` on 127.0.0.1. "No network touched" is checked
by replacing ``socket.create_connection`` (what both the reachability probe and urllib connect through) with one that
records the attempt and refuses it.
"""

from __future__ import annotations

import hashlib
import http.server
import socket
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


class _Server:
    def __init__(self) -> None:
        self.files = {f"/{kind}/head.json": DATA for kind in ("heads", "nolength", "huge")}
        self.requests: list[tuple[str, str]] = []  # (path, User-Agent)
        self.slow = threading.Event()  # release for the handler of /slow/
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append((self.path, self.headers.get("User-Agent", "")))
                if self.path.startswith("/slow/"):
                    server.slow.wait(10)
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
                 "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SAFECLIP_CACHE_DIR", str(tmp_path / "cache"))


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
    assert SHA in str(ei.value) and wrong in str(ei.value) and server.url() in str(ei.value)
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
