"""safeclip.server and ``safeclip serve`` on the tiny random-weight checkpoint, on loopback only.

In-process tests drive the ASGI app through Starlette's TestClient or httpx's ASGI transport; one test starts
``safeclip serve`` as a subprocess on a free 127.0.0.1 port and stops it with SIGTERM. Nothing here is a moderation
result: the weights are random. Every server started here stops by itself (bounded waits, killed on failure).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402
from prometheus_client import generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from safeclip import Moderator  # noqa: E402
from safeclip.server import create_app  # noqa: E402
from test_batcher import Forwards, png_bytes  # noqa: E402

TOKEN = "test-token-7f3a"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
WAIT = 10.0


@pytest.fixture(scope="module")
def moderator(tiny_model, cache_dir) -> Moderator:
    return Moderator(model=tiny_model, device="cpu", cache_dir=cache_dir, max_wait_ms=20)


def wait_ready(client) -> None:
    deadline = time.monotonic() + 60
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "the server never became ready"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def client(moderator):
    with TestClient(create_app(moderator, policies=["default", "strict"], token=TOKEN)) as c:
        wait_ready(c)
        yield c


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def metrics(client) -> dict[str, float]:
    r = client.get("/metrics", headers=AUTH)
    assert r.status_code == 200
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            key = s.name + (json.dumps(s.labels, sort_keys=True) if s.labels else "")
            out[key] = s.value
    return out


def asgi_client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1")


# ---------------------------------------------------------------------------------------------- requests
def test_raw_and_multipart_bodies_get_the_decision_of_their_image(client, moderator):
    img = png_bytes(1)
    raw = client.post("/v1/check", content=img, headers={**AUTH, "Content-Type": "image/png"})
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("application/json")
    body = raw.json()
    assert body["sha256"] == sha(img) and body["policy"] == "default@1.0" and body["encoder_id"] == moderator.encoder_id
    assert body == moderator.check(img).to_dict()
    multi = client.post("/v1/check?policy=strict", files={"image": ("x.png", img, "image/png")}, headers=AUTH)
    assert multi.status_code == 200 and multi.json()["sha256"] == sha(img) and multi.json()["policy"] == "strict@1.0"


def test_probes(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200  # open, no token
    assert client.post("/healthz").status_code == 405 and client.get("/nowhere").status_code == 404


def test_token(client):
    img = png_bytes(2)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": TOKEN}):
        r = client.post("/v1/check", content=img, headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        assert client.get("/metrics", headers=headers).status_code == 401
    assert client.post("/v1/check", content=img, headers=AUTH).status_code == 200


def test_unknown_policy_and_missing_field_are_400(client):
    r = client.post("/v1/check?policy=lenient", content=png_bytes(3), headers=AUTH)
    assert r.status_code == 400 and "default, strict" in r.json()["error"]["message"]
    r = client.post("/v1/check", files={"other": ("x.png", png_bytes(3), "image/png")}, headers=AUTH)
    assert r.status_code == 400 and "image" in r.json()["error"]["message"]
    r = client.post("/v1/check", data={"image": "text"}, files={"x": ("x.png", b"1")}, headers=AUTH)
    assert r.status_code == 400  # a plain multipart field holds text: an image sent so would arrive mangled


def test_two_image_parts_are_refused_not_the_last_one_moderated(client):
    first, last = png_bytes(31), png_bytes(32)
    r = client.post("/v1/check", files=[("image", ("a.png", first, "image/png")),
                                        ("image", ("b.png", last, "image/png"))], headers=AUTH)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "DuplicateImage" and "2 parts named image" in r.json()["error"]["message"]


def test_a_non_ascii_token_matches_its_utf8_bytes(moderator):
    token = "clé-sécrète-✓"
    utf8 = b"Bearer " + token.encode("utf-8")
    with TestClient(create_app(moderator, token=token, warm_up=False)) as c:
        assert c.post("/v1/check", content=png_bytes(33), headers={"Authorization": utf8}).status_code == 200
        assert c.get("/metrics", headers={"Authorization": utf8}).status_code == 200
        mangled = b"Bearer " + token.encode("utf-8").decode("latin-1").encode("utf-8")  # UTF-8 read as latin-1
        assert c.post("/v1/check", content=png_bytes(33), headers={"Authorization": mangled}).status_code == 401
        latin1 = b"Bearer " + token.encode("latin-1", "replace")
        assert c.post("/v1/check", content=png_bytes(33), headers={"Authorization": latin1}).status_code == 401


def test_undecodable_is_422_with_the_typed_error(client):
    for bad in (b"this is not an image", png_bytes(4)[:60], b""):
        r = client.post("/v1/check", content=bad, headers=AUTH)
        assert r.status_code == 422, r.text
        assert r.json()["error"]["type"] in {"UnsupportedFormatError", "TruncatedImageError", "EmptyBody"}


@pytest.mark.parametrize("on_error", ["raise", "block", "flag"])
def test_what_each_unusable_upload_is_answered(on_error, tiny_encoder, monkeypatch):
    """The answers README's table states, under each on_error: a fail-closed Moderator answers 200 with its Decision
    for what it could not decode or score; what never reached the Moderator is answered 4xx whatever on_error."""
    from safeclip.decode import DecodeLimits

    m = Moderator(encoder=tiny_encoder, on_error=on_error, decode_limits=DecodeLimits(max_pixels=1000))
    decided = None if on_error == "raise" else (200, on_error)

    with TestClient(create_app(m, warm_up=False, max_body_bytes=4000)) as c:
        def answer(**request) -> tuple[int, str | None]:
            r = c.post("/v1/check", **request)
            if r.status_code == 200:
                d = r.json()
                assert d["error"] and d["categories"] == {}  # fail-closed: never scored, never allow
                return 200, d["action"]
            return r.status_code, r.json()["error"]["type"]

        assert answer(content=b"this is not an image") == (decided or (422, "UnsupportedFormatError"))
        assert answer(content=png_bytes(4, size=16)[:60]) == (decided or (422, "TruncatedImageError"))
        flat = io.BytesIO()
        Image.new("RGB", (40, 40)).save(flat, "PNG")  # 1600 pixels: over the limit, in a small file
        assert answer(content=flat.getvalue()) == (decided or (422, "ImageTooLargeError"))
        assert answer(files={"image": ("x.txt", b"not an image")}) == (decided or (422, "UnsupportedFormatError"))
        assert answer(content=b"") == (422, "EmptyBody")
        assert answer(content=b"x" * 4001) == (413, "PayloadTooLarge")
        assert answer(files={"other": ("x.png", png_bytes(6, size=8))}) == (400, "MissingImage")
        two = [("image", ("a.png", png_bytes(6, size=8))), ("image", ("b.png", png_bytes(7, size=8)))]
        assert answer(files=two) == (400, "DuplicateImage")
        embed = tiny_encoder.embed_pixels
        monkeypatch.setattr(tiny_encoder, "embed_pixels", lambda pixels: embed(pixels) * np.nan)
        assert answer(content=png_bytes(8, size=16)) == (decided or (500, "DataError"))  # a NaN embedding


def test_a_fail_closed_server_answers_the_fail_closed_decision(tiny_model, cache_dir):
    m = Moderator(model=tiny_model, device="cpu", cache_dir=cache_dir, on_error="block")
    with TestClient(create_app(m, warm_up=False)) as c:
        r = c.post("/v1/check", content=b"this is not an image")
        assert r.status_code == 200
        d = r.json()
        assert d["action"] == "block" and d["error"] and d["categories"] == {}


def test_a_body_over_the_limit_is_413_read_or_not(moderator):
    with TestClient(create_app(moderator, max_body_bytes=1000, warm_up=False)) as c:
        small = png_bytes(5, size=8)
        assert len(small) < 1000 and c.post("/v1/check", content=small).status_code == 200
        big = png_bytes(5, size=64)
        assert len(big) > 1000
        assert c.post("/v1/check", content=big).status_code == 413  # Content-Length says so
        chunks = (big[i:i + 100] for i in range(0, len(big), 100))  # chunked: no Content-Length
        assert c.post("/v1/check", content=chunks).status_code == 413
        assert c.post("/v1/check", files={"image": ("x.png", big, "image/png")}).status_code == 413


def test_request_id_on_every_response_and_one_json_access_line(client, caplog):
    caplog.set_level(logging.INFO, logger="safeclip.server.access")
    img = png_bytes(6)
    r = client.post("/v1/check", content=img, headers={**AUTH, "X-Request-ID": "req-42.a"})
    assert r.headers["x-request-id"] == "req-42.a"
    for insane in ("has spaces", "x" * 200, "semi;colon"):
        r = client.get("/healthz", headers={"X-Request-ID": insane})
        assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])
    assert re.fullmatch(r"[0-9a-f]{32}", client.post("/v1/check", content=img).headers["x-request-id"])  # a 401
    assert client.get("/nowhere").headers["x-request-id"]
    lines = [json.loads(rec.getMessage()) for rec in caplog.records if rec.name == "safeclip.server.access"]
    first = next(x for x in lines if x["id"] == "req-42.a")
    assert first["status"] == 200 and first["path"] == "/v1/check" and first["action"] in {"allow", "flag", "block"}
    assert first["batch_size"] >= 1 and first["latency_ms"] >= 0 and first["outcome"] == first["action"]
    assert set(first) == {"id", "method", "path", "status", "outcome", "latency_ms", "batch_size", "action"}
    assert any(x["status"] == 401 and x["outcome"] == "unauthorized" for x in lines)
    text = "\n".join(rec.getMessage() for rec in caplog.records)
    assert len(text) < 2000 and "PNG" not in text  # never the image


def test_metrics_parse_and_count_outcomes(client, moderator):
    before = metrics(client)
    client.post("/v1/check", content=png_bytes(7), headers=AUTH)
    client.post("/v1/check", content=b"garbage", headers=AUTH)
    client.post("/v1/check", content=b"garbage")
    after = metrics(client)

    def delta(outcome):
        key = 'safeclip_requests_total{"outcome": "%s"}' % outcome
        return after[key] - before.get(key, 0)

    assert sum(delta(a) for a in ("allow", "flag", "block")) == 1
    assert delta("invalid_image") == 1 and delta("unauthorized") == 1
    assert after["safeclip_request_duration_seconds_count"] - before["safeclip_request_duration_seconds_count"] == 3
    assert after["safeclip_batch_size_count"] > before["safeclip_batch_size_count"]
    assert after["safeclip_queue_depth"] == 0 and after["safeclip_requests_in_flight"] == 0
    assert after["safeclip_queue_capacity"] == moderator.batcher.max_queue


def test_errors_are_answered_from_one_table():
    from safeclip.errors import ConfigError, OverloadedError, TruncatedImageError
    from safeclip.server import _error_response

    cases = {OverloadedError("full"): (503, "overloaded", "OverloadedError"),
             TruncatedImageError("cut short"): (422, "invalid_image", "TruncatedImageError"),  # the most specific
             ConfigError("bad"): (500, "error", "ConfigError"),
             KeyError("secret detail"): (500, "error", "InternalError")}
    for error, (status, outcome, kind) in cases.items():
        answer, response = _error_response(error, 7)
        assert (response.status_code, answer.outcome, json.loads(response.body)["error"]["type"]) == \
            (status, outcome, kind)
        assert ("retry-after" in response.headers) == (status == 503)
        assert "secret" not in response.body.decode()  # an unexpected error's message is never sent
    assert _error_response(OverloadedError("full"), 7)[1].headers["retry-after"] == "7"


# ---------------------------------------------------------------------------------------------- concurrency
def test_concurrent_requests_each_get_their_own_image_and_share_forwards(tiny_model, cache_dir, monkeypatch):
    m = Moderator(model=tiny_model, device="cpu", cache_dir=cache_dir, max_wait_ms=20)
    fw = Forwards(m, monkeypatch)
    app = create_app(m, warm_up=False)
    images = [png_bytes(100 + i, size=32 + i) for i in range(24)]

    async def main():
        async with asgi_client(app) as c:
            fw.hold.clear()
            first = asyncio.create_task(c.post("/v1/check", content=images[0]))
            while not fw.entered.is_set():
                await asyncio.sleep(0.01)
            rest = [asyncio.create_task(c.post("/v1/check", content=im)) for im in images[1:]]
            while m.batcher.in_flight < len(images):
                await asyncio.sleep(0.01)
            fw.hold.set()
            return await asyncio.wait_for(asyncio.gather(first, *rest), WAIT)

    responses = asyncio.run(main())
    assert [r.status_code for r in responses] == [200] * len(images)
    assert [r.json()["sha256"] for r in responses] == [sha(im) for im in images]
    assert len(fw.sizes) < len(images) and max(fw.sizes) > 1


def test_full_queue_is_503_with_retry_after_and_a_timeout_is_504(tiny_model, cache_dir, monkeypatch):
    m = Moderator(model=tiny_model, device="cpu", cache_dir=cache_dir, max_queue=1)
    fw = Forwards(m, monkeypatch)
    app = create_app(m, warm_up=False, timeout_s=0.5)

    async def main():
        async with asgi_client(app) as c:
            fw.hold.clear()
            held = asyncio.create_task(c.post("/v1/check", content=png_bytes(1)))
            while not fw.entered.is_set():
                await asyncio.sleep(0.01)
            full = await c.post("/v1/check", content=png_bytes(2))
            timed_out = await asyncio.wait_for(held, WAIT)
            fw.hold.set()
            return full, timed_out

    full, timed_out = asyncio.run(main())
    assert full.status_code == 503 and full.headers["retry-after"].isdigit()
    assert full.json()["error"]["type"] == "OverloadedError"
    assert timed_out.status_code == 504
    deadline = time.monotonic() + WAIT
    while m.batcher.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert m.batcher.in_flight == 0  # the timed-out request let go of its place


def test_a_timed_out_request_still_queued_never_reaches_a_forward(tiny_model, cache_dir, monkeypatch):
    m = Moderator(model=tiny_model, device="cpu", cache_dir=cache_dir)
    fw = Forwards(m, monkeypatch)
    app = create_app(m, warm_up=False, timeout_s=0.5)
    first = png_bytes(1)

    async def main():
        async with asgi_client(app) as c:
            fw.hold.clear()
            held = asyncio.create_task(c.post("/v1/check", content=first))
            while not fw.entered.is_set():
                await asyncio.sleep(0.01)
            queued = await c.post("/v1/check", content=png_bytes(2))  # waits behind the held forward: 504
            fw.hold.set()
            return await asyncio.wait_for(held, WAIT), queued

    held, queued = asyncio.run(main())
    assert queued.status_code == 504 and held.status_code == 504
    assert fw.sizes == [1]  # the queued one was dropped, not embedded


def test_a_client_that_goes_away_has_its_queued_request_dropped(tiny_model, cache_dir, monkeypatch):
    m = Moderator(model=tiny_model, device="cpu", cache_dir=cache_dir)
    fw = Forwards(m, monkeypatch)
    app = create_app(m, warm_up=False)
    img = png_bytes(9)

    async def call(disconnect: asyncio.Event) -> list:
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/check", "raw_path": b"/v1/check", "query_string": b"",
                 "headers": [(b"content-length", str(len(img)).encode())], "client": ("127.0.0.1", 5),
                 "server": ("127.0.0.1", 80), "state": {}}
        pending = [{"type": "http.request", "body": img, "more_body": False}]
        sent: list = []

        async def receive():
            if pending:
                return pending.pop()
            await disconnect.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        await app(scope, receive, send)
        return sent

    async def main():
        fw.hold.clear()
        stays, leaves = asyncio.Event(), asyncio.Event()
        held = asyncio.create_task(call(stays))
        while not fw.entered.is_set():
            await asyncio.sleep(0.01)
        gone = asyncio.create_task(call(leaves))
        while m.batcher.in_flight < 2:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        leaves.set()  # the second client hangs up while its request waits for a forward
        await asyncio.wait_for(gone, WAIT)
        fw.hold.set()
        first = await asyncio.wait_for(held, WAIT)
        stays.set()
        return first

    first = asyncio.run(main())
    assert first[0]["status"] == 200 and json.loads(first[1]["body"])["sha256"] == sha(img)
    assert fw.sizes == [1]  # the request of the client that left never reached a forward
    assert m.batcher.in_flight == 0
    text = generate_latest(app.state.metrics_registry).decode()
    assert 'safeclip_requests_total{outcome="client_gone"} 1.0' in text


class SlowUpload:
    """One POST /v1/check driven at the ASGI level whose body arrives in two halves, the second once ``rest`` is set;
    ``reads`` counts the body messages the app asked for."""

    def __init__(self, app, body: bytes, *, declared: bool = True) -> None:
        self.app, self.body = app, body
        headers = [(b"content-length", str(len(body)).encode())] if declared else []
        self.scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                      "scheme": "http", "path": "/v1/check", "raw_path": b"/v1/check", "query_string": b"",
                      "headers": headers, "client": ("127.0.0.1", 5), "server": ("127.0.0.1", 80), "state": {}}
        self.rest, self.answered = asyncio.Event(), asyncio.Event()
        self.reads = 0
        self.sent: list = []

    async def receive(self):
        half = len(self.body) // 2
        if self.reads == 0:
            self.reads = 1
            return {"type": "http.request", "body": self.body[:half], "more_body": True}
        if self.reads == 1:
            await self.rest.wait()
            self.reads = 2
            return {"type": "http.request", "body": self.body[half:], "more_body": False}
        await self.answered.wait()
        return {"type": "http.disconnect"}

    async def send(self, message) -> None:
        self.sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            self.answered.set()

    def start(self) -> asyncio.Task:
        return asyncio.create_task(self.app(self.scope, self.receive, self.send))

    @property
    def status(self) -> int | None:
        return self.sent[0]["status"] if self.sent else None

    @property
    def headers(self) -> dict[bytes, bytes]:
        return dict(self.sent[0]["headers"]) if self.sent else {}


def test_a_body_is_read_only_after_its_request_got_a_place_in_the_queue(tiny_model, cache_dir):
    m = Moderator(model=tiny_model, device="cpu", cache_dir=cache_dir, max_queue=2)
    app = create_app(m, warm_up=False)
    uploads = [SlowUpload(app, png_bytes(40 + i)) for i in range(4)]

    async def main():
        tasks = [u.start() for u in uploads]
        await asyncio.sleep(0.3)
        started = [(u.reads, u.status) for u in uploads]
        for u in uploads:
            u.rest.set()
        await asyncio.wait_for(asyncio.gather(*tasks), WAIT)
        return started

    started = asyncio.run(main())
    # Two hold the queue's places and are receiving their bodies; the other two were answered 503 unread.
    assert sorted(started, key=str) == [(0, 503), (0, 503), (1, None), (1, None)]
    assert sorted(u.status for u in uploads) == [200, 200, 503, 503]
    assert all(u.headers[b"retry-after"].isdigit() for u in uploads if u.status == 503)
    assert m.batcher.in_flight == 0


def test_bodies_held_at_once_stay_within_the_body_budget(tiny_model, cache_dir):
    m = Moderator(model=tiny_model, device="cpu", cache_dir=cache_dir, max_queue=8)
    big, small = png_bytes(50, size=48), png_bytes(51, size=8)
    app = create_app(m, warm_up=False, max_body_bytes=len(big), max_body_budget_bytes=len(big) + len(small) - 1)
    gauge = 'safeclip_body_bytes_held'

    def held() -> float:
        text = generate_latest(app.state.metrics_registry).decode()
        return float(re.search(rf"^{gauge} (\S+)$", text, re.MULTILINE).group(1))

    async def main():
        first = SlowUpload(app, big)
        task = first.start()
        await asyncio.sleep(0.2)
        during = held()
        refused = SlowUpload(app, small)  # its Content-Length does not fit beside the first body
        await asyncio.wait_for(refused.start(), WAIT)
        first.rest.set()
        await asyncio.wait_for(task, WAIT)
        after = held()
        later = SlowUpload(app, small)  # the first body's bytes were given back
        later.rest.set()
        await asyncio.wait_for(later.start(), WAIT)
        chunked = SlowUpload(app, small, declared=False)  # no Content-Length: counts as max_body_bytes
        chunked_task = chunked.start()
        await asyncio.sleep(0.2)
        beside_chunked = SlowUpload(app, small)
        await asyncio.wait_for(beside_chunked.start(), WAIT)
        chunked.rest.set()
        await asyncio.wait_for(chunked_task, WAIT)
        return first, refused, later, chunked, beside_chunked, during, after

    first, refused, later, chunked, beside_chunked, during, after = asyncio.run(main())
    assert during == len(big) and after == 0 and held() == 0
    assert (refused.status, refused.reads) == (503, 0) and refused.headers[b"retry-after"].isdigit()
    assert b"budget" in refused.sent[1]["body"]
    assert first.status == 200 and later.status == 200 and chunked.status == 200
    assert (beside_chunked.status, beside_chunked.reads) == (503, 0)
    text = generate_latest(app.state.metrics_registry).decode()
    assert 'safeclip_requests_total{outcome="overloaded"} 2.0' in text


def test_the_body_budget_must_hold_one_body_of_the_largest_size(moderator):
    from safeclip.errors import ConfigError

    with pytest.raises(ConfigError, match="at least max_body_bytes"):
        create_app(moderator, max_body_bytes=1000, max_body_budget_bytes=999, warm_up=False)


# ---------------------------------------------------------------------------------------------- safeclip serve
def _start_serve(args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-m", "safeclip", "serve", "--host", "127.0.0.1", "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    port: list[int] = []
    stderr_lines: list[str] = []

    def read_stderr():
        for line in proc.stderr:
            stderr_lines.append(line)
            m = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line)
            if m:
                port.append(int(m.group(1)))

    threading.Thread(target=read_stderr, daemon=True).start()
    deadline = time.monotonic() + 120
    while not port:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("safeclip serve did not start:\n" + "".join(stderr_lines[-30:]))
        time.sleep(0.1)
    proc.stderr_lines = stderr_lines  # type: ignore[attr-defined]
    return proc, port[0]


def _stop_serve(proc: subprocess.Popen, wait_s: float = 30) -> None:
    """Stop a ``safeclip serve`` the way a supervisor does: SIGTERM, then SIGKILL if it has not exited in ``wait_s``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_safeclip_serve_answers_then_drains_on_sigterm_and_exits_0(tiny_model, cache_dir, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    env = {**os.environ, "SAFECLIP_CACHE_DIR": str(cache_dir), "SAFECLIP_DEVICE": "cpu"}
    env.pop("SAFECLIP_SERVE_TOKEN", None)
    proc, port = _start_serve(["--model", tiny_model, "--token-file", str(token_file), "--policy", "default",
                               "--policy", "strict", "--max-wait-ms", "10"], env)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while httpx.get(f"{base}/readyz", timeout=5).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        images = [png_bytes(200 + i) for i in range(8)]
        with httpx.Client(base_url=base, headers=AUTH, timeout=30) as c:
            assert c.post("/v1/check", content=images[0]).json()["sha256"] == sha(images[0])
            assert c.post("/v1/check?policy=strict", files={"image": ("a.png", images[1])}).json()["policy"] \
                == "strict@1.0"
            assert httpx.post(f"{base}/v1/check", content=images[0], timeout=5).status_code == 401

        # In flight at SIGTERM: requests whose headers and half of whose bodies have arrived.
        socks = []
        for im in images:
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            s.sendall((f"POST /v1/check HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                       f"Content-Type: image/png\r\nContent-Length: {len(im)}\r\n\r\n").encode() + im[:len(im) // 2])
            socks.append(s)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):  # no new connections once draining
            httpx.get(f"{base}/healthz", timeout=2)
        answers = []
        for s, im in zip(socks, images):
            s.sendall(im[len(im) // 2:])
            data = b""
            while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _content_length(data):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            s.close()
            head, _, body = data.partition(b"\r\n\r\n")
            answers.append((head.split(b"\r\n")[0], json.loads(body)["sha256"]))
        assert answers == [(b"HTTP/1.1 200 OK", sha(im)) for im in images]
        assert proc.wait(60) == 0
        access = [json.loads(line) for line in proc.stdout.read().splitlines() if line.startswith("{")]
        assert sum(1 for a in access if a["path"] == "/v1/check" and a["status"] == 200) == 2 + len(images)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _content_length(data: bytes) -> int:
    m = re.search(rb"content-length: (\d+)", data, re.IGNORECASE)
    return int(m.group(1)) if m else 1 << 30


def _raw_request(port: int, head: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """One request on a new connection, read until the server closes it (Connection: close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head.encode("utf-8") + b"Connection: close\r\n\r\n" + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    top, _, payload = data.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, payload


def _closed_by_server(s: socket.socket) -> bool:
    try:
        return s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:  # reset
        return True


def _serve_env(cache_dir, token: str | None = None) -> dict[str, str]:
    env = {**os.environ, "SAFECLIP_CACHE_DIR": str(cache_dir), "SAFECLIP_DEVICE": "cpu"}
    env.pop("SAFECLIP_SERVE_TOKEN", None)
    if token is not None:
        env["SAFECLIP_SERVE_TOKEN"] = token
    return env


def _wait_ready(port: int) -> None:
    deadline = time.monotonic() + 60
    while httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code != 200:
        assert time.monotonic() < deadline, "the server never became ready"
        time.sleep(0.1)


def test_idle_connections_never_make_safeclip_serve_refuse_requests(tiny_model, cache_dir):
    token = "jeton-été-✓"  # a non-ASCII token from the environment, sent by the client as UTF-8
    proc, port = _start_serve(["--model", tiny_model, "--max-wait-ms", "10"], _serve_env(cache_dir, token))
    idle: list[socket.socket] = []
    try:
        _wait_ready(port)
        # More idle connections than uvicorn's own limit (2 x --max-queue) would allow: none of them sends a byte.
        idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(200)]
        time.sleep(0.3)
        status, headers, body = _raw_request(port, "GET /healthz HTTP/1.1\r\nHost: x\r\n")
        assert status == 200 and json.loads(body) == {"status": "ok"} and headers["x-request-id"]
        img = png_bytes(60)
        status, _, body = _raw_request(port, f"POST /v1/check HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                                             f"Content-Length: {len(img)}\r\n", img)
        assert status == 200 and json.loads(body)["sha256"] == sha(img)
        assert _raw_request(port, "GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer jeton\r\n")[0] == 401
    finally:
        for s in idle:
            s.close()
        proc.kill()
        proc.wait(10)


def test_safeclip_serve_closes_silent_connections_and_answers_its_own_503_over_the_connection_limit(tiny_model,
                                                                                                     cache_dir):
    proc, port = _start_serve(["--model", tiny_model, "--max-connections", "8", "--header-timeout-s", "1.5"],
                              _serve_env(cache_dir))
    busy: list[socket.socket] = []
    idle: list[socket.socket] = []
    try:
        _wait_ready(port)
        images = [png_bytes(70 + i) for i in range(8)]
        for im in images:  # 8 requests in progress: their heads and half of their bodies have arrived
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            s.sendall((f"POST /v1/check HTTP/1.1\r\nHost: x\r\nContent-Length: {len(im)}\r\nConnection: close\r\n"
                       "\r\n").encode() + im[:len(im) // 2])
            busy.append(s)
        time.sleep(0.5)
        img = png_bytes(80)
        status, headers, body = _raw_request(port, f"POST /v1/check HTTP/1.1\r\nHost: x\r\nX-Request-ID: over-1\r\n"
                                                   f"Content-Length: {len(img)}\r\n", img)
        assert status == 503 and headers["retry-after"].isdigit() and headers["x-request-id"] == "over-1"
        assert json.loads(body)["error"]["type"] == "OverloadedError" and "connections" in body.decode()
        assert _raw_request(port, "GET /healthz HTTP/1.1\r\nHost: x\r\n")[0] == 200  # probes are always answered
        for s, im in zip(busy, images):
            s.sendall(im[len(im) // 2:])
        for s, im in zip(busy, images):
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            assert data.startswith(b"HTTP/1.1 200") and sha(im).encode() in data

        # Silent connections: more than the limit, one of them dribbling its request head a byte at a time.
        idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(12)]
        t0 = time.monotonic()
        assert _raw_request(port, f"POST /v1/check HTTP/1.1\r\nHost: x\r\nContent-Length: {len(img)}\r\n",
                            img)[0] == 200  # the oldest silent connection made room
        for s in idle:
            s.setblocking(False)
        head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
        i = 0
        while not all(_closed_by_server(s) for s in idle) and time.monotonic() - t0 < 10:
            try:
                idle[-1].send(head[i:i + 1])  # slowloris: every byte resets no deadline
            except OSError:
                pass
            i += 1
            time.sleep(0.1)
        closed_after = time.monotonic() - t0
        assert all(_closed_by_server(s) for s in idle) and closed_after < 5, closed_after
        text = _raw_request(port, "GET /metrics HTTP/1.1\r\nHost: x\r\n")[2].decode()
        assert 'safeclip_requests_total{outcome="overloaded"} 1.0' in text
        assert re.search(r'safeclip_connections_closed_total\{reason="header_timeout"\} [1-9]', text)
        assert re.search(r'safeclip_connections_closed_total\{reason="evicted"\} [1-9]', text)
    finally:
        for s in busy + idle:
            s.close()
        proc.kill()
        proc.wait(10)


def test_safeclip_serve_refuses_an_empty_token_file(tiny_model, tmp_path):
    empty = tmp_path / "token"
    empty.write_text("\n")
    r = subprocess.run([sys.executable, "-m", "safeclip", "serve", "--model", tiny_model, "--token-file", str(empty)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "empty" in r.stderr and "Traceback" not in r.stderr


def test_the_token_comes_from_the_file_else_the_environment(tmp_path, monkeypatch):
    from safeclip.cli.serve import read_token
    from safeclip.errors import ConfigError

    monkeypatch.delenv("SAFECLIP_SERVE_TOKEN", raising=False)
    assert read_token(None) is None
    monkeypatch.setenv("SAFECLIP_SERVE_TOKEN", " from-env ")
    assert read_token(None) == "from-env"
    f = tmp_path / "t"
    f.write_text("from-file\n")
    assert read_token(f) == "from-file"
    f.write_text("clé-✓\n", encoding="utf-8")
    assert read_token(f) == "clé-✓"
    monkeypatch.setenv("SAFECLIP_SERVE_TOKEN", "  ")
    with pytest.raises(ConfigError, match="empty"):
        read_token(None)
    with pytest.raises(ConfigError, match="cannot be read"):
        read_token(tmp_path / "missing")
