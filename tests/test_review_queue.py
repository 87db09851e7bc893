"""The review spool (safeclip.review._queue): what a Moderator keeps while its store is down survives a crash of the
process writing it, and a torn line costs only its own items."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from safeclip.review import NewItem, read_spool, write_spool

CATS = {"nudity": {"probability": 0.9}, "violence": {"probability": 0.1}}


def new(i: int, thumb_bytes: int = 0) -> NewItem:
    return NewItem(f"{i:064x}", "default@1.0", "tiny", "flag", {"action": "flag", "categories": CATS}, 1.0, "serve",
                   embedding=np.full(16, i, np.float32), thumbnail=bytes(thumb_bytes) or None)


def shas(items: list[NewItem]) -> list[int]:
    return [int(i.sha256, 16) for i in items]


def test_a_line_torn_by_a_crash_costs_only_its_own_items(tmp_path: Path) -> None:
    spool = tmp_path / "spool.jsonl"
    write_spool(spool, [new(1), new(2)])
    data = spool.read_bytes()
    spool.write_bytes(data[: len(data) - 40])  # the process died halfway through the second line
    write_spool(spool, [new(3)])  # the next process appends after the torn line, not onto it
    items, bad = read_spool(spool)
    assert shas(items) == [1, 3] and bad == 1
    assert items[1].embedding is not None and items[1].embedding.tolist() == [3.0] * 16


KILLED_SPOOLER = r"""
import sys

import numpy as np

from safeclip.review import NewItem, write_spool

cats = {"nudity": {"probability": 0.9}, "violence": {"probability": 0.1}}
for i in range(1_000_000):  # until killed: each number is printed only once its write has returned
    write_spool(sys.argv[1], [NewItem(f"{i:064x}", "default@1.0", "tiny", "flag", {"action": "flag",
                              "categories": cats}, 1.0, "serve", thumbnail=np.random.default_rng(i).bytes(256 * 1024))])
    print(i, flush=True)
"""


def test_a_spool_writer_killed_mid_write_loses_nothing_it_was_told_was_written(tmp_path: Path) -> None:
    spool = tmp_path / "spool.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SPOOLER, str(spool)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    acked = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            acked.append(int(line))
            if len(acked) >= 20:
                break
        else:
            pytest.fail(f"the writer stopped early: {proc.stderr.read()[-2000:] if proc.stderr else ''}")
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -9
    write_spool(spool, [new(10**6)])  # the next process
    items, bad = read_spool(spool)
    got = shas(items)
    assert set(acked) <= set(got) and got[-1] == 10**6 and bad <= 1
    assert len(got) == len(set(got))
