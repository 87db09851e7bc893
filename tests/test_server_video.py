"""``POST /v1/check`` with a video body (issue 24): video content types may be as large as ``max_video_bytes``,
others stay under ``max_body_bytes``; the answer is the clip's Decision with its segments. The decoder and model are
the known-answer stubs of ``test_moderator_video``."""

from __future__ import annotations

import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")

from starlette.testclient import TestClient
from test_moderator_video import CALM, HIT, MID, Chunks, known  # noqa: F401

import safeclip.moderator as moderator_module
from safeclip.server import VIDEO_TYPES, create_app


@pytest.mark.parametrize("ctype", VIDEO_TYPES)
def test_a_video_body_may_be_larger_than_an_image_body(known, monkeypatch, ctype):  # noqa: F811
    m, _enc = known
    app = create_app(m, warm_up=False, max_body_bytes=1000, max_video_bytes=5000)
    body = b"\0" * 3000
    with TestClient(app) as client:
        monkeypatch.setattr(moderator_module, "prepare_chunks", Chunks([CALM, MID], [HIT], [CALM]))
        r = client.post("/v1/check", content=body, headers={"Content-Type": ctype})
        assert r.status_code == 200, r.text
        d = r.json()
        assert d["action"] == "block" and d["stopped_early"] and d["frames_scored"] == 3
        assert any(s["start_s"] == 1.0 and s["end_s"] == 2.0 for s in d["segments"])
        assert client.post("/v1/check", content=body, headers={"Content-Type": "image/png"}).status_code == 413
        big = b"\0" * 6000
        assert client.post("/v1/check", content=big, headers={"Content-Type": ctype}).status_code == 413


def test_a_multipart_video_part_may_be_larger_than_an_image_part(known, monkeypatch):  # noqa: F811
    m, _enc = known
    app = create_app(m, warm_up=False, max_body_bytes=1000, max_video_bytes=5000)
    with TestClient(app) as client:
        monkeypatch.setattr(moderator_module, "prepare_chunks", Chunks([CALM], [CALM]))
        r = client.post("/v1/check", files={"image": ("clip.mp4", b"\0" * 3000, "video/mp4")})
        assert r.status_code == 200 and r.json()["action"] == "allow" and r.json()["frames_scored"] == 2
        r = client.post("/v1/check", files={"image": ("x.png", b"\0" * 3000, "image/png")})
        assert r.status_code == 413 and "video Content-Type" in r.json()["error"]["message"]
