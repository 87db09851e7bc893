"""The local engine's decode pool: a worker that dies or hangs is replaced and its file reported, nothing else lost."""

from __future__ import annotations

import json
import os

import pytest
from audit_helpers import HOOK, read, run_audit, sample  # noqa: F401


@pytest.mark.slow
def test_a_worker_that_dies_or_hangs_is_replaced_and_the_file_reported(sample, tiny_encoder, tmp_path,
                                                                       monkeypatch):
    names = [os.path.basename(p) for p in sample]
    hook = {"crash": [names[1]], "abort": [names[4]], "hang": [names[7]]}
    monkeypatch.setenv(HOOK, json.dumps(hook))
    s = run_audit(sample, tmp_path / "c.parquet", tmp_path / "cache", tiny_encoder, task_timeout=3)
    rows = {os.path.basename(r["path"]): r for r in read(tmp_path / "c.parquet").to_pylist()}
    assert len(rows) == len(sample)
    assert "WorkerCrash" in rows[names[1]]["error"] and "exit code 70" in rows[names[1]]["error"]
    assert "WorkerCrash" in rows[names[4]]["error"] and "SIGABRT" in rows[names[4]]["error"]
    assert "WorkerTimeout" in rows[names[7]]["error"]
    others = [r for n, r in rows.items() if n not in {names[1], names[4], names[7]}]
    assert all(r["error"] is None and r["action"] for r in others)
    assert s.errors == 3 and s.worker_restarts == 5  # crash and abort retried once each, the hang killed once
