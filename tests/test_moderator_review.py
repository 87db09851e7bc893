"""The Moderator's review hook (``Moderator(review=...)``, safeclip.review.ReviewQueue) on the tiny random-weight
checkpoint. Policies here decide by construction (a flag threshold of 0 flags everything, no thresholds allow
everything), so which decisions reach the store is known; nothing here is a moderation result."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import numpy as np
import pytest
from audit_helpers import ALL_FLAG_POLICY
from conftest import encode_clip
from PIL import Image

from safeclip import Moderator
from safeclip.errors import ReviewError, ReviewStoreUnavailableError
from safeclip.review import ReviewQueue, in_sample, open_store


def _policy(tmp_path, *, flag: str, allow: float) -> str:
    p = tmp_path / f"policy-{flag}-{allow}.yaml"
    p.write_text(ALL_FLAG_POLICY.replace("name: all-flag", "name: review-test").replace("flag: 0.0", f"flag: {flag}")
                 + f"review:\n  sample: {{block: 1.0, flag: 1.0, allow: {allow}}}\n")
    return str(p)


@pytest.fixture
def all_flag(tmp_path) -> str:
    return _policy(tmp_path, flag="0.0", allow=0.0)


def _moderator(tiny_model, cache_dir, policy, review, **kw) -> Moderator:
    return Moderator(policy, model=tiny_model, device="cpu", cache_dir=cache_dir, batch_size=4, review=review, **kw)


def test_a_flag_goes_to_review_with_its_decision_embedding_and_thumbnail(tiny_model, cache_dir, photos, tmp_path,
                                                                          all_flag):
    db = tmp_path / "review.db"
    m = _moderator(tiny_model, cache_dir, all_flag, str(db))
    d = m.check(str(photos[0]))
    assert d.action == "flag"
    assert m.review is not None and m.review.flush()
    with open_store(db) as store:
        (item,) = store.items()
        assert (item.sha256, item.action, item.probability, item.origin) == (d.sha256, "flag", 1.0, "check")
        assert item.policy == d.policy and item.encoder_id == d.encoder_id
        assert item.decision == json.loads(d.to_json())
        np.testing.assert_allclose(store.embeddings([item.id])[0], m.embed([str(photos[0])])[0], atol=1e-6)
        thumb = store.thumbnail(item.id)
        assert thumb is not None and Image.open(io.BytesIO(thumb)).format == "JPEG"
    assert m.review.stats.written == 1


def test_allows_are_sampled_at_the_policy_rate_the_same_way_every_time(tiny_model, cache_dir, photos, tmp_path):
    policy = _policy(tmp_path, flag="null", allow=0.5)
    db = tmp_path / "review.db"
    m = _moderator(tiny_model, cache_dir, policy, str(db))
    files = [str(p) for p in photos[:12]]
    decisions = m.check_many(files)
    assert {d.action for d in decisions} == {"allow"}
    assert m.review is not None and m.review.flush()
    expected = {d.sha256 for d in decisions if in_sample(d.sha256, d.policy, 0.5)}
    assert 0 < len(expected) < len({d.sha256 for d in decisions})  # the sample is a real subset here
    with open_store(db) as store:
        items = list(store.items())
        assert {i.sha256 for i in items} == expected
        assert {i.probability for i in items} == {0.5}
    m.check_many(files)  # the same decisions again: the store is idempotent, the sample deterministic
    assert m.review.flush()
    with open_store(db) as store:
        assert len(list(store.items())) == len(expected)
    assert m.review.stats.duplicates == len(expected)


def test_check_async_and_fail_closed_errors_reach_review(tiny_model, cache_dir, photos, tmp_path, all_flag):
    db = tmp_path / "review.db"
    m = _moderator(tiny_model, cache_dir, all_flag, str(db), on_error="flag")
    d = asyncio.run(m.check_async(str(photos[1])))
    bad = m.check(b"this is not an image")
    assert bad.action == "flag" and bad.error
    assert m.review is not None and m.review.flush()
    with open_store(db) as store:
        items = {i.sha256: i for i in store.items()}
    assert d.sha256 in items and items[d.sha256].has_embedding
    (failed,) = [i for i in items.values() if i.sha256 != d.sha256]
    assert failed.action == "flag" and failed.decision["error"] and not failed.has_embedding


def test_a_video_goes_to_review_once_with_its_deciding_frame(tiny_model, cache_dir, tmp_path, all_flag):
    rng = np.random.default_rng(0)
    clip = tmp_path / "clip.mp4"
    encode_clip([(None, rng.integers(0, 255, (48, 64, 3), np.uint8)) for _ in range(6)], codec="mpeg4", rate=2,
                size=(64, 48), path=clip)
    db = tmp_path / "review.db"
    m = _moderator(tiny_model, cache_dir, all_flag, str(db))
    d = m.check(str(clip), early_stop=False)
    assert d.frames_scored > 1
    assert m.review is not None and m.review.flush()
    with open_store(db) as store:
        (item,) = store.items()
        assert item.decision["frames_scored"] == d.frames_scored and item.has_thumbnail and item.has_embedding


def test_a_store_that_fails_never_fails_the_request_and_the_spool_keeps_the_items(
        tiny_model, cache_dir, photos, tmp_path, all_flag, monkeypatch, caplog):
    db = tmp_path / "review.db"
    spool = tmp_path / "spool.jsonl"
    store = open_store(db, policy="review-test")
    queue = ReviewQueue(store, spool=spool)
    m = _moderator(tiny_model, cache_dir, all_flag, queue)
    real_add = store.add

    def down(items):
        raise ReviewStoreUnavailableError(f"review store {store.location}: the database is down")

    monkeypatch.setattr(store, "add", down)
    caplog.set_level(logging.ERROR, logger="safeclip.review")
    first = m.check(str(photos[2]))  # answered although the store cannot be written
    assert first.action == "flag" and queue.flush()
    assert queue.stats.spooled == 1 and queue.stats.failed == 0
    assert any("could not write 1 item(s)" in r.getMessage() and str(spool) in r.getMessage()
               for r in caplog.records)
    assert spool.read_text().count("\n") == 1

    monkeypatch.setattr(store, "add", real_add)  # the database is back: the next write replays the spool
    second = m.check(str(photos[3]))
    assert queue.flush()
    assert {i.sha256 for i in store.items()} == {first.sha256, second.sha256}
    assert spool.read_text() == "" and queue.stats.replayed == 1
    store.close()


def test_without_a_spool_a_failed_write_is_counted_and_logged(tiny_model, cache_dir, photos, tmp_path, all_flag,
                                                             monkeypatch, caplog):
    store = open_store(tmp_path / "review.db", policy="review-test")
    queue = ReviewQueue(store)
    m = _moderator(tiny_model, cache_dir, all_flag, queue)
    monkeypatch.setattr(store, "add", lambda items: (_ for _ in ()).throw(ReviewError("disk full")))
    caplog.set_level(logging.ERROR, logger="safeclip.review")
    assert m.check(str(photos[0])).action == "flag"
    assert queue.flush() and queue.stats.failed == 1
    assert any("lost" in r.getMessage() and "disk full" in r.getMessage() for r in caplog.records)
    store.close()


def test_a_store_of_another_policy_is_refused_when_the_moderator_starts(tiny_model, cache_dir, tmp_path, all_flag):
    db = tmp_path / "review.db"
    open_store(db, policy="someone-else").close()
    with pytest.raises(ReviewError, match="someone-else"):
        _moderator(tiny_model, cache_dir, all_flag, str(db))


def test_a_verdict_never_changes_a_decision(tiny_model, cache_dir, photos, tmp_path, all_flag):
    """Only a new policy version (or an entry put into an allow bank on purpose) changes decisions: verdicts are
    stored, never read by the Moderator."""
    db = tmp_path / "review.db"
    m = _moderator(tiny_model, cache_dir, all_flag, str(db))
    before = m.check(str(photos[0]))
    assert m.review is not None and m.review.flush()
    with open_store(db) as store:
        (item,) = store.items()
        store.verdict(item.id, "allow", reviewer="alice", note="not a red ball")
        store.verdict(item.id, "allow", reviewer="bob")
    after = m.check(str(photos[0]))
    fresh = _moderator(tiny_model, cache_dir, all_flag, str(db)).check(str(photos[0]))
    assert json.loads(after.to_json()) == json.loads(before.to_json()) == json.loads(fresh.to_json())


def test_review_false_keeps_one_decision_out_of_the_queue(tiny_model, cache_dir, photos, tmp_path, all_flag):
    """What a server's warm-up uses: the full check (PDQ, banks, batcher), never offered to review."""
    db = tmp_path / "review.db"
    m = _moderator(tiny_model, cache_dir, all_flag, str(db))
    assert m.check(np.full((64, 64, 3), 127, np.uint8), review=False).action == "flag"
    assert asyncio.run(m.check_async(str(photos[1]), review=False)).action == "flag"
    kept = m.check(str(photos[0]))
    assert m.review is not None and m.review.flush()
    with open_store(db) as store:
        assert [i.sha256 for i in store.items()] == [kept.sha256]
    assert m.review.stats.offered == 1
