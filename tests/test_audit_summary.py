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


def test_error_rows_count_as_errors_not_as_an_action():
    import pyarrow as pa

    from safeclip.audit.summary import ERROR_ACTION, Tally, summarize

    t = pa.table({"action": ["allow", ERROR_ACTION, "block", None],
                  "error": [None, "DecodeError: x", None, "DecodeError: y"]})  # None: an output of the old version
    s = summarize(t, Tally(), out="o", processed=4, resumed=0, started_at=0.0, startup_seconds=0.0, encoder_id="e",
                  policy="p")
    assert dict(s.actions) == {"allow": 1, "flag": 0, "block": 1} and s.errors == 2
    assert s.fails("error") and "errors 2" in s.format()
