"""The micro-batcher alone (a recording ``run``), then through a Moderator on the tiny random-weight checkpoint.

Nothing here is a moderation result: the weights are random. The tests check who shares a forward, who gets which
answer, and that a bad neighbour, a cancelled caller or a full queue stays contained.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import threading
import time
from concurrent.futures import CancelledError, ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from safeclip import DecodeError, Moderator, OverloadedError
from safeclip._batcher import MicroBatcher
from safeclip.errors import ConfigError

WAIT = 10.0  # seconds any single wait in these tests may take before it counts as a hang


class Recorder:
    """A ``run`` that records each batch and can hold the next forward until released."""

    def __init__(self, fail_on=None):
        self.batches: list[list] = []
        self.hold = threading.Event()
        self.hold.set()
        self.entered = threading.Event()
        self.fail_on = fail_on

    def __call__(self, items):
        self.batches.append(list(items))
        self.entered.set()
        assert self.hold.wait(WAIT)
        return [ValueError(f"bad {x}") if x == self.fail_on else x * 10 for x in items]


def hold_first_forward(batcher: MicroBatcher, rec: Recorder):
    """Submit item 0 and return once the worker is inside its forward (held)."""
    rec.hold.clear()
    ticket = batcher.admit()
    future = batcher.submit(ticket, 0)
    assert rec.entered.wait(WAIT)
    return future


def test_requests_queued_during_a_forward_share_the_next_one():
    rec = Recorder()
    b = MicroBatcher(rec, max_batch=16, max_wait_ms=5, max_queue=32)
    first = hold_first_forward(b, rec)
    futures = [b.submit(b.admit(), i) for i in range(1, 8)]
    rec.hold.set()
    assert first.result(WAIT) == 0
    assert [f.result(WAIT) for f in futures] == [i * 10 for i in range(1, 8)]  # each caller gets its own answer
    assert [len(x) for x in rec.batches] == [1, 7]
    assert b.in_flight == 0 and b.waiting == 0
    b.close(WAIT)


def test_a_forward_waits_for_admitted_requests_still_decoding_but_a_lone_one_does_not():
    rec = Recorder()
    b = MicroBatcher(rec, max_batch=16, max_wait_ms=9000, max_queue=8)
    lone = b.submit(b.admit(), 1)
    assert lone.result(WAIT / 2) == 10  # nobody else admitted: no 9 s wait
    decoding = b.admit()  # admitted, still "decoding"
    early = b.submit(b.admit(), 2)
    time.sleep(0.2)
    assert not early.done()  # held for the one still decoding
    late = b.submit(decoding, 3)
    assert (early.result(WAIT), late.result(WAIT)) == (20, 30)
    assert rec.batches[-1] == [2, 3]
    b.close(WAIT)


def test_a_decode_failure_releases_its_place_and_stops_the_wait():
    rec = Recorder()
    b = MicroBatcher(rec, max_batch=16, max_wait_ms=9000, max_queue=8)
    failing = b.admit()
    waiting = b.submit(b.admit(), 1)
    time.sleep(0.1)
    failing.release()  # its decode failed: it will never be submitted
    assert waiting.result(WAIT / 2) == 10
    b.close(WAIT)


def test_max_batch_counts_frames_and_a_large_item_runs_alone():
    rec = Recorder()
    b = MicroBatcher(rec, max_batch=8, max_wait_ms=5, max_queue=32)
    first = hold_first_forward(b, rec)
    sizes = {1: 3, 2: 3, 3: 3, 4: 20, 5: 1}
    futures = [b.submit(b.admit(), i, size) for i, size in sizes.items()]
    rec.hold.set()
    first.result(WAIT)
    [f.result(WAIT) for f in futures]
    assert rec.batches[1:] == [[1, 2], [3], [4], [5]]  # 3+3 <= 8 < 3+3+3; 20 frames alone


def test_the_queue_is_bounded():
    rec = Recorder()
    b = MicroBatcher(rec, max_batch=4, max_wait_ms=1, max_queue=2)
    first = hold_first_forward(b, rec)
    second = b.admit()
    with pytest.raises(OverloadedError, match="max_queue=2"):
        b.admit()
    second.release()
    third = b.admit()  # a place came free
    rec.hold.set()
    first.result(WAIT)
    assert b.submit(third, 5).result(WAIT) == 50
    b.close(WAIT)
    with pytest.raises(OverloadedError, match="shutting down"):
        b.admit()


def test_one_items_error_and_a_whole_batch_error_reach_only_their_callers():
    rec = Recorder(fail_on=2)
    b = MicroBatcher(rec, max_batch=16, max_wait_ms=5, max_queue=16)
    first = hold_first_forward(b, rec)
    futures = [b.submit(b.admit(), i) for i in (1, 2, 3)]
    rec.hold.set()
    first.result(WAIT)
    assert futures[0].result(WAIT) == 10 and futures[2].result(WAIT) == 30
    with pytest.raises(ValueError, match="bad 2"):
        futures[1].result(WAIT)

    def broken(items):
        raise RuntimeError("the model fell over")

    b2 = MicroBatcher(broken, max_batch=4, max_wait_ms=1, max_queue=4)
    with pytest.raises(RuntimeError, match="fell over"):
        b2.submit(b2.admit(), 1).result(WAIT)
    assert b2.in_flight == 0
    assert b.submit(b.admit(), 4).result(WAIT) == 40  # the worker survived


def test_a_cancelled_request_is_dropped_before_its_forward():
    rec = Recorder()
    b = MicroBatcher(rec, max_batch=16, max_wait_ms=5, max_queue=16)
    first = hold_first_forward(b, rec)
    tickets = [b.admit() for _ in range(3)]
    futures = [b.submit(t, i) for t, i in zip(tickets, (1, 2, 3))]
    tickets[1].cancel()
    assert b.in_flight == 3  # the held forward's and two queued: the cancelled one's place is free
    rec.hold.set()
    first.result(WAIT)
    assert futures[0].result(WAIT) == 10 and futures[2].result(WAIT) == 30
    assert futures[1].cancelled()
    assert rec.batches[1] == [1, 3]
    assert b.in_flight == 0


def test_a_request_cancelled_during_its_forward_is_answered_to_nobody_and_harms_nobody():
    rec = Recorder()
    b = MicroBatcher(rec, max_batch=16, max_wait_ms=5, max_queue=16)
    rec.hold.clear()
    gone, stays = b.admit(), b.admit()
    f_gone = b.submit(gone, 1)
    f_stays = b.submit(stays, 2)
    assert rec.entered.wait(WAIT)
    gone.cancel()
    rec.hold.set()
    assert f_stays.result(WAIT) in (20,)
    with pytest.raises(CancelledError):
        f_gone.result(WAIT)
    assert b.in_flight == 0


def test_an_idle_worker_exits_and_the_next_request_starts_one():
    rec = Recorder()
    b = MicroBatcher(rec, max_batch=4, max_wait_ms=1, max_queue=4, idle_s=0.05)
    assert b.submit(b.admit(), 1).result(WAIT) == 10
    deadline = time.monotonic() + WAIT
    while b._thread is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert b._thread is None
    assert b.submit(b.admit(), 2).result(WAIT) == 20


def test_close_runs_what_is_queued():
    rec = Recorder()
    b = MicroBatcher(rec, max_batch=2, max_wait_ms=1, max_queue=8)
    first = hold_first_forward(b, rec)
    futures = [b.submit(b.admit(), i) for i in (1, 2, 3)]
    threading.Timer(0.1, rec.hold.set).start()
    b.close(WAIT)
    assert first.result(0) == 0 and [f.result(0) for f in futures] == [10, 20, 30]


@pytest.mark.parametrize("kwargs", [{"max_batch": 0}, {"max_queue": -1}, {"max_wait_ms": -1}, {"max_batch": 1.5},
                                    {"max_wait_ms": float("nan")}])
def test_settings_are_checked(kwargs):
    with pytest.raises(ConfigError):
        MicroBatcher(lambda items: items, **{"max_batch": 4, "max_wait_ms": 1, "max_queue": 4, **kwargs})


# ---------------------------------------------------------------------------------------------- through a Moderator
def png_bytes(seed: int, size: int = 48) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture()
def moderator(tiny_model, cache_dir) -> Moderator:
    return Moderator(model=tiny_model, device="cpu", cache_dir=cache_dir, max_batch=16, max_wait_ms=20)


class Forwards:
    """Wraps ``encoder.embed_pixels``: records the batch sizes and can hold the next forward."""

    def __init__(self, moderator: Moderator, monkeypatch):
        self.real = moderator.encoder.embed_pixels
        self.sizes: list[int] = []
        self.hold = threading.Event()
        self.hold.set()
        self.entered = threading.Event()
        monkeypatch.setattr(moderator.encoder, "embed_pixels", self)

    def __call__(self, pixels):
        self.sizes.append(len(pixels))
        self.entered.set()
        assert self.hold.wait(WAIT)
        return self.real(pixels)


def test_blocking_checks_from_threads_share_forwards_and_get_their_own_decisions(moderator, monkeypatch):
    images = [png_bytes(i) for i in range(12)]
    sequential = [moderator.check(im) for im in images]
    fw = Forwards(moderator, monkeypatch)
    fw.hold.clear()
    with ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(moderator.check, im) for im in images]
        assert fw.entered.wait(WAIT)
        deadline = time.monotonic() + WAIT
        while moderator.batcher.in_flight < len(images) and time.monotonic() < deadline:  # the others queue
            time.sleep(0.01)
        time.sleep(0.2)  # let them finish decoding
        fw.hold.set()
        parallel = [f.result(WAIT) for f in futures]
    assert len(fw.sizes) < len(images) and max(fw.sizes) > 1
    for im, a, b in zip(images, parallel, sequential):
        assert a.sha256 == b.sha256 == hashlib.sha256(im).hexdigest()
        assert a.action == b.action
        for name in a.categories:
            assert abs(a.categories[name].probability - b.categories[name].probability) < 1e-4


def test_an_undecodable_neighbour_fails_alone(moderator, monkeypatch):
    good = [png_bytes(i) for i in range(4)]
    fw = Forwards(moderator, monkeypatch)
    fw.hold.clear()
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(moderator.check, good[0])
        assert fw.entered.wait(WAIT)
        others = [pool.submit(moderator.check, x) for x in (good[1], b"not an image", good[2], b"\x89PNG\r\n", good[3])]
        time.sleep(0.2)
        fw.hold.set()
        assert first.result(WAIT).sha256 == hashlib.sha256(good[0]).hexdigest()
        for f, x in zip(others, (good[1], b"not an image", good[2], b"\x89PNG\r\n", good[3])):
            if x in good:
                assert f.result(WAIT).sha256 == hashlib.sha256(x).hexdigest()
            else:
                with pytest.raises(DecodeError):
                    f.result(WAIT)
    assert moderator.batcher.in_flight == 0


def test_check_async_never_blocks_the_event_loop(moderator, monkeypatch):
    images = [png_bytes(i) for i in range(6)]
    expected = {hashlib.sha256(im).hexdigest() for im in images}
    real = moderator.encoder.embed_pixels

    def slow(pixels):  # a forward that takes a while, as a real model's does
        time.sleep(0.3)
        return real(pixels)

    monkeypatch.setattr(moderator.encoder, "embed_pixels", slow)

    async def main():
        ticks = 0
        stop = asyncio.Event()

        async def ticker():
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.005)

        t = asyncio.create_task(ticker())
        decisions = await asyncio.gather(*(moderator.check_async(im) for im in images))
        seen = ticks
        stop.set()
        await t
        return decisions, seen

    decisions, ticks = asyncio.run(main())
    assert {d.sha256 for d in decisions} == expected
    # At least one 0.3 s forward ran while the loop kept ticking every 5 ms; a blocked loop would tick ~once.
    assert ticks >= 10


def test_check_async_cancelled_before_its_forward_is_dropped(moderator, monkeypatch):
    fw = Forwards(moderator, monkeypatch)
    fw.hold.clear()
    a, b, c = png_bytes(1), png_bytes(2), png_bytes(3)

    async def main():
        first = asyncio.create_task(moderator.check_async(a))
        while not fw.entered.is_set():
            await asyncio.sleep(0.01)
        gone = asyncio.create_task(moderator.check_async(b))
        stays = asyncio.create_task(moderator.check_async(c))
        while moderator.batcher.waiting < 2:
            await asyncio.sleep(0.01)
        gone.cancel()
        await asyncio.sleep(0.05)
        fw.hold.set()
        d1, d3 = await asyncio.wait_for(asyncio.gather(first, stays), WAIT)
        with pytest.raises(asyncio.CancelledError):
            await gone
        return d1, d3

    d1, d3 = asyncio.run(main())
    assert d1.sha256 == hashlib.sha256(a).hexdigest() and d3.sha256 == hashlib.sha256(c).hexdigest()
    assert fw.sizes == [1, 1]  # the cancelled request never reached a forward
    assert moderator.batcher.in_flight == 0


def test_check_async_timeout_frees_the_place(moderator, monkeypatch):
    fw = Forwards(moderator, monkeypatch)
    fw.hold.clear()

    async def main():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(moderator.check_async(png_bytes(5)), 0.2)

    asyncio.run(main())
    fw.hold.set()
    deadline = time.monotonic() + WAIT
    while moderator.batcher.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert moderator.batcher.in_flight == 0
    assert moderator.check(png_bytes(6)).sha256 == hashlib.sha256(png_bytes(6)).hexdigest()


def test_a_full_moderator_raises_overloaded(tiny_model, cache_dir, monkeypatch):
    m = Moderator(model=tiny_model, device="cpu", cache_dir=cache_dir, max_queue=1)
    fw = Forwards(m, monkeypatch)
    fw.hold.clear()
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(m.check, png_bytes(1))
        assert fw.entered.wait(WAIT)
        with pytest.raises(OverloadedError):
            m.check(png_bytes(2))

        async def refused():
            with pytest.raises(OverloadedError):
                await m.check_async(png_bytes(3))

        asyncio.run(refused())
        fw.hold.set()
        assert busy.result(WAIT).sha256 == hashlib.sha256(png_bytes(1)).hexdigest()
    assert m.batcher.in_flight == 0


def test_check_many_keeps_its_own_full_batches(moderator, monkeypatch):
    fw = Forwards(moderator, monkeypatch)
    images = [png_bytes(i) for i in range(10)]
    out = moderator.check_many(images)
    assert [d.sha256 for d in out] == [hashlib.sha256(x).hexdigest() for x in images]
    assert sum(fw.sizes) == 10 and max(fw.sizes) > 1 and moderator.batcher.in_flight == 0
