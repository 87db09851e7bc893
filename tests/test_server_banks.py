"""``safeclip serve`` with a policy that names a bank: the answer carries the matches, and bank changes made while it
runs (by another process's handle) are picked up without a restart. Random weights: no moderation result here."""

from __future__ import annotations

import io
import os
import time

import numpy as np
import pytest
from PIL import Image

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")

from safeclip.banks import Bank, NewEntry  # noqa: E402
from safeclip.pdq import pdq_hash  # noqa: E402
from test_server import _start_serve, _stop_serve  # noqa: E402

POLICY = """name: served-banks
version: "1"
scoring:
  logit_scale: 100.0
  templates: ["a photo of {}."]
  neutral: ["a landscape"]
categories:
  known:
    banks:
      - path: incidents
        effect: deny
        action: block
"""


def png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    im = Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).resize((384, 384), Image.BICUBIC)
    b = io.BytesIO()
    im.save(b, "PNG")
    return b.getvalue()


def answer_until(client, body: bytes, action: str, within_s: float) -> dict:
    deadline = time.monotonic() + within_s
    while True:
        r = client.post("/v1/check", content=body)
        assert r.status_code == 200, r.text
        doc = r.json()
        if doc["action"] == action or time.monotonic() > deadline:
            return doc
        time.sleep(0.1)


def test_safeclip_serve_picks_up_bank_changes_and_answers_the_matches(tiny_model, cache_dir, tmp_path):
    bank = Bank.create(tmp_path / "incidents", "pdq")
    (tmp_path / "policy.yaml").write_text(POLICY)
    env = {**os.environ, "SAFECLIP_CACHE_DIR": str(cache_dir), "SAFECLIP_DEVICE": "cpu"}
    env.pop("SAFECLIP_SERVE_TOKEN", None)
    proc, port = _start_serve(["--model", tiny_model, "--policy", str(tmp_path / "policy.yaml"),
                               "--max-wait-ms", "5"], env)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while httpx.get(f"{base}/readyz", timeout=5).status_code != 200:
            assert time.monotonic() < deadline and proc.poll() is None, "".join(proc.stderr_lines[-20:])
            time.sleep(0.1)
        body, other = png(1), png(2)
        with httpx.Client(base_url=base, timeout=30) as c:
            first = c.post("/v1/check", content=body).json()
            assert first["action"] == "allow" and first["matches"] == []
            bank.add(np.frombuffer(pdq_hash(Image.open(io.BytesIO(body))).bits, np.uint8)[None],
                     [NewEntry("served-1", label="added while serving")])
            doc = answer_until(c, body, "block", 10.0)
            assert doc["action"] == "block", doc
            assert doc["matches"][0]["entry"] == "served-1" and doc["matches"][0]["bank"] == "incidents"
            assert "entry 'served-1'" in doc["reasons"][0]
            assert c.post("/v1/check", content=other).json()["action"] == "allow"
            bank.disable(["served-1"])
            assert answer_until(c, body, "allow", 10.0)["action"] == "allow"
    finally:
        bank.close()
        _stop_serve(proc)
