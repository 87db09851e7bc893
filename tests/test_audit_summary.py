"""The summary: --fail-on levels and its one-line format."""

from __future__ import annotations

import pytest

from safeclip.audit import AuditSummary


def test_summary_fail_levels():
    s = AuditSummary(out="x", rows=3, actions={"allow": 2, "flag": 1, "block": 0}, errors=0, processed=3,
                     resumed=0, decoded=3, embedded=3, cache_hits=0, duplicates=0, worker_restarts=0, seconds=1.0,
                     startup_seconds=0.5, images_per_s=3.0, encoder_id="e", policy="p")
    assert s.fails("flag") and not s.fails("block") and not s.fails("error") and not s.fails(None)
    with pytest.raises(ValueError):
        s.fails("allow")
    assert "flag 1" in s.format()
