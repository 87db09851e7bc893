"""safeclip.server's review routes (``create_app(review=store)``) on a real SQLite review store, in process through
httpx's ASGI transport: the bearer token, the queue (claim, 204 when empty), verdicts (who and when, a second
reviewer's disagreement kept), the error table (400 / 404 / 503, one line each) and the review page's headers.

The decisions in the store are built by hand (two categories, known probabilities and thresholds): nothing here is
a moderation result.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np
import pytest

pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")

from safeclip import Moderator  # noqa: E402
from safeclip.errors import ReviewStoreUnavailableError  # noqa: E402
from safeclip.review import NewItem, open_store, thumbnail_jpeg  # noqa: E402
from safeclip.server import create_app  # noqa: E402
from test_batcher import png_bytes  # noqa: E402

TOKEN = "review-token-51c2"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
POLICY = "default@1.0"
ENCODER = "open_clip:tiny@test"
FLAG_AT = {"nudity": 0.5, "violence": 0.6}
BLOCK_AT = {"nudity": 0.8, "violence": 0.9}


def decision(sha256: str, probabilities: dict[str, float]) -> dict[str, Any]:
    """A Decision dict (``Decision.to_dict()``'s shape) for two categories, its actions from the thresholds above."""
    def act(name: str, p: float) -> str:
        return "block" if p >= BLOCK_AT[name] else "flag" if p >= FLAG_AT[name] else "allow"

    rank = {"allow": 0, "flag": 1, "block": 2}
    actions = {name: act(name, p) for name, p in probabilities.items()}
    cats = {name: {"banks": [], "probability": p, "action": actions[name], "flag_threshold": FLAG_AT[name],
                   "block_threshold": BLOCK_AT[name], "calibrated": True, "basis": "calibrator", "signals": {},
                   "top_prompts": []} for name, p in probabilities.items()}
    fired = sorted((n for n in actions if actions[n] != "allow"), key=lambda n: -rank[actions[n]])
    action = max(actions.values(), key=rank.__getitem__)
    return {"action": action, "reasons": fired, "policy": POLICY, "encoder_id": ENCODER, "sha256": sha256,
            "source": None, "frame_index": 0, "n_frames": 1, "background": None, "calibrated": True, "error": None,
            "matches": [], "categories": cats, "frames_scored": 1, "sampling": None, "duration_s": None,
            "time_s": None, "stopped_early": False, "segments": []}


def new_item(seed: int, probabilities: dict[str, float], *, thumbnail: bool = True,
             probability: float = 1.0) -> NewItem:
    """A review item for a made-up content ``seed``, with a thumbnail of random pixels."""
    sha = hashlib.sha256(f"content {seed}".encode()).hexdigest()
    d = decision(sha, probabilities)
    pixels = np.random.default_rng(seed).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    return NewItem(sha256=sha, policy=POLICY, encoder_id=ENCODER, action=d["action"], decision=d,
                   probability=probability, origin="serve", source=f"upload-{seed}.jpg",
                   thumbnail=thumbnail_jpeg(pixels) if thumbnail else None)


#: Three items a test queue holds, oldest first: a block (nudity), a flag (violence), an allow without a thumbnail.
ITEMS = ((1, {"nudity": 0.93, "violence": 0.12}, True), (2, {"nudity": 0.2, "violence": 0.7}, True),
         (3, {"nudity": 0.05, "violence": 0.1}, False))


def fill(store) -> list[int]:
    """ITEMS in the store, in this order (one add each: the store orders one batch its own way)."""
    ids = [store.add([new_item(seed, probs, thumbnail=thumb)])[0] for seed, probs, thumb in ITEMS]
    assert all(i is not None for i in ids)
    return ids  # type: ignore[return-value]


class Client:
    """httpx's ASGI transport driven from a synchronous test (one event loop for the test's requests)."""

    def __init__(self, app: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1")

    def request(self, method: str, url: str, **kw: Any) -> Any:
        return self.loop.run_until_complete(self.http.request(method, url, **kw))

    def get(self, url: str, **kw: Any) -> Any:
        return self.request("GET", url, **kw)

    def post(self, url: str, **kw: Any) -> Any:
        return self.request("POST", url, **kw)

    def close(self) -> None:
        self.loop.run_until_complete(self.http.aclose())
        self.loop.close()


@pytest.fixture(scope="module")
def moderator(tiny_model, cache_dir) -> Moderator:
    return Moderator(model=tiny_model, device="cpu", cache_dir=cache_dir, max_wait_ms=5)


@pytest.fixture
def store(tmp_path):
    with open_store(tmp_path / "r.db", policy="default") as s:
        yield s


@pytest.fixture
def client(moderator, store):
    c = Client(create_app(moderator, token=TOKEN, warm_up=False, review=store))
    yield c
    c.close()


def one_line_error(r: Any, status: int) -> dict[str, str]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert error["message"] and "\n" not in error["message"]
    return error


def verdict(client: Client, item_id: int, action: str, reviewer: str = "alice", **extra: Any) -> Any:
    return client.post(f"/v1/review/{item_id}/verdict", headers=AUTH,
                       json={"action": action, "reviewer": reviewer, **extra})


# ---------------------------------------------------------------------------------------------- routes
def test_without_a_store_the_review_routes_do_not_exist(moderator):
    c = Client(create_app(moderator, token=TOKEN, warm_up=False))
    try:
        for path in ("/v1/review/next?reviewer=alice", "/v1/review/1", "/v1/review/1/thumbnail", "/review"):
            assert c.get(path, headers=AUTH).status_code == 404, path
        assert c.post("/v1/review/1/verdict", headers=AUTH, json={"action": "allow", "reviewer": "a"}).status_code \
            == 404
    finally:
        c.close()


def test_every_review_route_wants_the_bearer_token(client, store):
    (first, *_) = fill(store)
    calls = [("GET", "/v1/review/next?reviewer=alice", None), ("GET", f"/v1/review/{first}", None),
             ("GET", f"/v1/review/{first}/thumbnail", None),
             ("POST", f"/v1/review/{first}/verdict", {"action": "block", "reviewer": "alice"})]
    for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": f"Basic {TOKEN}"}):
        for method, path, body in calls:
            r = client.request(method, path, headers=headers, json=body)
            assert one_line_error(r, 401)["type"] == "Unauthorized", path
            assert r.headers["www-authenticate"].startswith("Bearer")
    assert store.get(first).verdicts == () and store.get(first).claimed_by is None  # nothing was done


def test_next_claims_the_oldest_item_and_answers_204_once_the_queue_is_empty(client, store):
    assert client.get("/v1/review/next?reviewer=alice", headers=AUTH).status_code == 204
    ids = fill(store)
    r = client.get("/v1/review/next?reviewer=alice", headers=AUTH)
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    body = r.json()
    assert body["id"] == ids[0] and body["claimed_by"] == "alice" and body["action"] == "block"
    assert body["decision"] == dict(new_item(*ITEMS[0][:2]).decision)
    assert body["decision"]["categories"]["nudity"]["probability"] == 0.93
    assert body == json.loads(json.dumps(store.get(ids[0]).to_dict()))
    # Another reviewer does not get the item alice holds; alice gets hers again.
    assert client.get("/v1/review/next?reviewer=bob", headers=AUTH).json()["id"] == ids[1]
    assert client.get("/v1/review/next?reviewer=alice", headers=AUTH).json()["id"] == ids[0]
    for i in ids:
        assert verdict(client, i, "allow").status_code == 201
    assert client.get("/v1/review/next?reviewer=alice", headers=AUTH).status_code == 204


def test_an_item_and_its_thumbnail(client, store):
    ids = fill(store)
    r = client.get(f"/v1/review/{ids[1]}", headers=AUTH)
    assert r.status_code == 200 and r.json()["sha256"] == new_item(*ITEMS[1][:2]).sha256
    thumb = client.get(f"/v1/review/{ids[1]}/thumbnail", headers=AUTH)
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert thumb.content == store.thumbnail(ids[1]) and thumb.content[:3] == b"\xff\xd8\xff"
    assert thumb.headers["cache-control"] == "no-store"
    assert one_line_error(client.get(f"/v1/review/{ids[2]}/thumbnail", headers=AUTH), 404)["type"] == "NotFound"


def test_verdicts_are_recorded_with_reviewer_and_time_and_a_disagreement_is_kept(client, store):
    ids = fill(store)
    before = time.time()
    r = verdict(client, ids[0], "block", "alice", category="nudity", note="clearly explicit")
    assert r.status_code == 201
    v = r.json()
    assert (v["item_id"], v["reviewer"], v["action"], v["category"], v["note"]) == \
        (ids[0], "alice", "block", "nudity", "clearly explicit")
    assert before - 1 <= v["created_at"] <= time.time() + 1
    r2 = verdict(client, ids[0], "allow", "bob", note="", category="")  # empty fields from a form: none
    assert r2.status_code == 201 and (r2.json()["category"], r2.json()["note"]) == (None, None)
    kept = store.get(ids[0]).verdicts
    assert [(k.reviewer, k.action, k.category, k.note) for k in kept] == \
        [("alice", "block", "nudity", "clearly explicit"), ("bob", "allow", None, None)]
    assert [k.to_dict() for k in kept] == [v, r2.json()]
    assert [x["reviewer"] for x in client.get(f"/v1/review/{ids[0]}", headers=AUTH).json()["verdicts"]] == \
        ["alice", "bob"]


@pytest.mark.parametrize("body, kind, words", [
    ({"action": "delete", "reviewer": "alice"}, "InvalidVerdict", "allow, flag, block"),
    ({"action": "block", "reviewer": "alice", "category": "spam"}, "InvalidVerdict", "'spam' is not one of"),
    ({"action": "block", "reviewer": "alice", "category": "x" * 5000}, "InvalidVerdict", "xxx... is not one of"),
    ({"action": "x" * 5000, "reviewer": "alice"}, "InvalidVerdict", "allow, flag, block"),
    ({"action": "block", "reviewer": "  "}, "InvalidVerdict", "reviewer"),
    ({"action": "block"}, "InvalidVerdict", "reviewer"),
    ({"action": "block", "reviewer": "alice", "note": 5}, "InvalidVerdict", "note"),
    ({"action": "block", "reviewer": "alice", "verdict": "x"}, "InvalidVerdict", "'verdict'"),
    (["block"], "MalformedBody", "JSON object"),
])
def test_an_invalid_verdict_is_answered_400_in_one_line_and_nothing_is_recorded(client, store, body, kind, words):
    ids = fill(store)
    error = one_line_error(client.post(f"/v1/review/{ids[0]}/verdict", headers=AUTH, json=body), 400)
    assert error["type"] == kind and words in error["message"]
    assert str(store.location) not in error["message"]  # where the store lives is not the client's business
    assert len(error["message"]) < 300  # a value quoted from the body is cut short
    assert store.get(ids[0]).verdicts == ()


def test_a_malformed_or_oversized_verdict_body_and_a_missing_reviewer_are_refused(client, store):
    ids = fill(store)
    r = client.post(f"/v1/review/{ids[0]}/verdict", headers={**AUTH, "Content-Type": "application/json"},
                    content=b"{not json")
    assert one_line_error(r, 400)["type"] == "MalformedBody"
    big = json.dumps({"action": "flag", "reviewer": "alice", "note": "x" * 100_000}).encode()
    assert one_line_error(client.post(f"/v1/review/{ids[0]}/verdict", headers=AUTH, content=big), 413)
    error = one_line_error(client.get("/v1/review/next", headers=AUTH), 400)
    assert "reviewer" in error["message"]
    assert store.get(ids[0]).verdicts == () and store.get(ids[0]).claimed_by is None


def test_an_unknown_item_is_404(client, store):
    fill(store)
    for r in (client.get("/v1/review/999", headers=AUTH), client.get("/v1/review/999/thumbnail", headers=AUTH),
              verdict(client, 999, "block")):
        error = one_line_error(r, 404)
        assert error["type"] == "NotFound" and error["message"] == "there is no review item 999"
    assert client.get("/v1/review/abc", headers=AUTH).status_code == 404


class DownStore:
    """A store whose database cannot be reached: every call fails as a store that lost its server does."""

    def __getattr__(self, name: str) -> Any:
        def fail(*args: Any, **kwargs: Any) -> Any:
            raise ReviewStoreUnavailableError("the review store postgresql://review@db/queue cannot be reached "
                                              "(connection refused); retry when it is back")
        return fail


def test_a_store_that_is_down_is_503_with_one_line_and_check_still_decides(moderator):
    c = Client(create_app(moderator, token=TOKEN, warm_up=False, review=DownStore()))  # type: ignore[arg-type]
    try:
        for r in (c.get("/v1/review/next?reviewer=alice", headers=AUTH), c.get("/v1/review/1", headers=AUTH),
                  c.get("/v1/review/1/thumbnail", headers=AUTH),
                  c.post("/v1/review/1/verdict", headers=AUTH, json={"action": "flag", "reviewer": "alice"})):
            error = one_line_error(r, 503)
            assert error["type"] == "ReviewStoreUnavailableError" and "cannot be reached" in error["message"]
            assert r.headers["retry-after"].isdigit()
        img = png_bytes(7)
        r = c.post("/v1/check", headers=AUTH, content=img)
        assert r.status_code == 200 and r.json()["sha256"] == hashlib.sha256(img).hexdigest()
    finally:
        c.close()


def test_store_calls_run_off_the_event_loop(moderator, store):
    ids = fill(store)
    threads: list[int] = []

    class Recording:
        def __getattr__(self, name: str) -> Any:
            method = getattr(store, name)

            def call(*args: Any, **kwargs: Any) -> Any:
                threads.append(threading.get_ident())
                return method(*args, **kwargs)
            return call

    c = Client(create_app(moderator, token=TOKEN, warm_up=False, review=Recording()))  # type: ignore[arg-type]
    try:
        assert c.get("/v1/review/next?reviewer=alice", headers=AUTH).status_code == 200
        assert c.get(f"/v1/review/{ids[0]}/thumbnail", headers=AUTH).status_code == 200
        assert verdict(c, ids[0], "flag").status_code == 201
    finally:
        c.close()
    assert threads and threading.get_ident() not in threads  # the loop ran in this thread


# ---------------------------------------------------------------------------------------------- the page
def test_the_review_page_is_self_contained_under_a_strict_content_security_policy(client):
    r = client.get("/review")  # the page itself holds no data: it asks for the token
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    csp = dict(part.strip().split(" ", 1) for part in r.headers["content-security-policy"].split(";"))
    assert csp["default-src"] == "'none'" and csp["connect-src"] == "'self'" and csp["img-src"] == "blob:"
    assert csp["frame-ancestors"] == "'none'" and "unsafe" not in r.headers["content-security-policy"]
    assert r.headers["x-content-type-options"] == "nosniff" and r.headers["cache-control"] == "no-store"
    # Exactly one inline script and one inline style, allowed by their hashes; nothing loaded from elsewhere.
    for tag, directive in (("script", "script-src"), ("style", "style-src")):
        (source,) = re.findall(rf"<{tag}>(.*?)</{tag}>", page, re.S)
        digest = base64.b64encode(hashlib.sha256(source.encode()).digest()).decode()
        assert csp[directive] == f"'sha256-{digest}'"
    assert not re.search(r"\b(?:src|href)\s*=\s*[\"']|https?://", page)
    assert "innerHTML" not in page and "insertAdjacentHTML" not in page and "document.write" not in page


# ---------------------------------------------------------------------------------------------- safeclip serve
@pytest.mark.parametrize("kind", ["corrupt sqlite", "postgresql down"])
def test_serve_refuses_a_store_it_cannot_open_before_loading_the_model(tmp_path, kind):
    if kind == "corrupt sqlite":
        bad = tmp_path / "review.db"
        bad.write_bytes(b"this is not a review store\n" * 100)
        store, named = str(bad), str(bad)
    else:
        pytest.importorskip("psycopg")
        with socket.socket() as s:  # a port nothing listens on
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        store, named = f"postgresql://review:secret@127.0.0.1:{port}/queue", "cannot be reached"
    env = {**os.environ, "SAFECLIP_DEVICE": "cpu", "SAFECLIP_OFFLINE": "1"}
    env.pop("SAFECLIP_SERVE_TOKEN", None)
    r = subprocess.run([sys.executable, "-m", "safeclip", "serve", "--port", "0", "--review", store,
                        "--model", f"local-dir:{tmp_path / 'no-such-model'}"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("safeclip: error: review store") and named in line  # the store, not the missing model
    assert "secret" not in line
    if kind == "corrupt sqlite":
        assert bad.read_bytes() == b"this is not a review store\n" * 100


@pytest.mark.slow  # a real server process: CI runs it; -m 'not slow' skips it
def test_serve_review_writes_the_served_decisions_in_the_policy_sample_to_the_store(tiny_model, cache_dir,
                                                                                   tmp_path, photos):
    """``safeclip serve --review``: an upload flagged by a policy whose flag threshold is 0 (flags everything, known
    by construction) is in the store once the server has drained, with origin ``serve``."""
    import signal

    from audit_helpers import ALL_FLAG_POLICY
    from test_server import _start_serve

    policy = tmp_path / "flag-all.yaml"
    policy.write_text(ALL_FLAG_POLICY)
    db = tmp_path / "served.db"
    env = {**os.environ, "SAFECLIP_CACHE_DIR": str(cache_dir), "SAFECLIP_DEVICE": "cpu", "SAFECLIP_SERVE_TOKEN": "t"}
    proc, port = _start_serve(["--model", tiny_model, "--policy", str(policy), "--review", str(db),
                               "--review-spool", str(tmp_path / "spool.jsonl")], env)
    try:
        body = photos[0].read_bytes()
        r = httpx.post(f"http://127.0.0.1:{port}/v1/check", content=body, headers={"Authorization": "Bearer t"},
                       timeout=60)
        assert r.status_code == 200 and r.json()["action"] == "flag"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    with open_store(db) as store:
        items = list(store.items())
    assert len(items) == 1, [(i.id, i.sha256, i.origin, i.source) for i in items]
    (item,) = items
    assert (item.sha256, item.origin, item.action, item.policy) == (r.json()["sha256"], "serve", "flag", "all-flag@1")
    assert item.has_embedding and item.has_thumbnail


def test_metrics_show_what_the_review_hook_could_not_write(tiny_model, cache_dir, tmp_path, photos, monkeypatch):
    """A store that fails shows on /metrics (and in the log), never as a failed /v1/check."""
    from audit_helpers import ALL_FLAG_POLICY

    from safeclip.review import ReviewQueue

    policy = tmp_path / "all-flag.yaml"
    policy.write_text(ALL_FLAG_POLICY)
    with open_store(tmp_path / "r.db", policy="all-flag") as s:
        queue = ReviewQueue(s)
        m = Moderator(str(policy), model=tiny_model, device="cpu", cache_dir=cache_dir, review=queue)
        monkeypatch.setattr(s, "add", lambda items: (_ for _ in ()).throw(ReviewStoreUnavailableError("down")))
        c = Client(create_app(m, token=TOKEN, warm_up=False, review=s))
        try:
            r = c.post("/v1/check", headers=AUTH, content=photos[0].read_bytes())
            assert r.status_code == 200 and r.json()["action"] == "flag"
            assert queue.flush()
            text = c.get("/metrics", headers=AUTH).text
        finally:
            c.close()
    assert 'safeclip_review_items{state="sampled"} 1.0' in text
    assert 'safeclip_review_items{state="failed"} 1.0' in text
    assert 'safeclip_review_items{state="written"} 0.0' in text


def test_a_skipped_item_goes_to_the_back_of_the_queue(client, store):
    ids = fill(store)
    assert client.get("/v1/review/next?reviewer=alice", headers=AUTH).json()["id"] == ids[0]
    r = client.post(f"/v1/review/{ids[0]}/skip?reviewer=alice", headers=AUTH)
    assert r.status_code == 200 and r.json() == {"skipped": True} and r.headers["Cache-Control"] == "no-store"
    assert client.get("/v1/review/next?reviewer=alice", headers=AUTH).json()["id"] == ids[1]
    assert client.get("/v1/review/next?reviewer=bob", headers=AUTH).json()["id"] == ids[2]
    assert client.get("/v1/review/next?reviewer=carol", headers=AUTH).json()["id"] == ids[0]
    r = client.post(f"/v1/review/{ids[0]}/skip?reviewer=alice", headers=AUTH)  # carol holds it now
    assert r.status_code == 200 and r.json() == {"skipped": False}
    assert store.get(ids[0]).claimed_by == "carol"
    assert one_line_error(client.post("/v1/review/999/skip?reviewer=alice", headers=AUTH), 404)["type"] == "NotFound"
    assert "reviewer" in one_line_error(client.post(f"/v1/review/{ids[0]}/skip", headers=AUTH), 400)["message"]
    assert client.post(f"/v1/review/{ids[0]}/skip?reviewer=carol").status_code == 401
    assert store.get(ids[0]).claimed_by == "carol"
