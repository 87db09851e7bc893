"""The local engine's decode pool: a worker that dies or hangs is replaced and its file reported, nothing else lost."""

from __future__ import annotations

import json
import os

import pytest
from audit_helpers import HOOK, bad_files, read, run_audit, sample  # noqa: F401


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


@pytest.mark.slow
@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_a_plain_script_without_a_main_guard_runs_once(method, sample, tiny_model, tmp_path):
    """The workers never re-import the caller's ``__main__`` (10.1): a script's top-level print comes out once."""
    import subprocess
    import sys

    script = tmp_path / "plain.py"
    script.write_text(
        "import multiprocessing\n"
        f"if {method!r} == 'spawn':  # what the engine falls back to where there is no forkserver\n"
        "    multiprocessing.get_all_start_methods = lambda: ['spawn']\n"
        "print('TOP-LEVEL', flush=True)\n"
        "from safeclip.audit import audit\n"
        f"s = audit({sample[:4]!r}, out={str(tmp_path / 'o.parquet')!r}, model={tiny_model!r},\n"
        f"          cache={str(tmp_path / 'cache')!r}, workers=2, device='cpu', verbose=False, progress=False)\n"
        "print('ROWS', s.rows, s.errors, flush=True)\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("TOP-LEVEL") == 1, proc.stdout[-2000:]
    assert "ROWS 4 0" in proc.stdout


def test_a_small_audit_decodes_in_threads_and_gives_the_same_rows(sample, bad_files, tiny_encoder, tmp_path,
                                                                  monkeypatch):
    """Issue 23 item 2: an audit of a few files starts no decode process (their start-up would be most of its
    time); its rows, hostile files included, are the ones the process pool gives, bit for bit."""
    from conftest import assert_same_rows

    from safeclip.audit import distributor, local
    from safeclip.audit.plan import SMALL_AUDIT_FILES

    few = sample[:3] + bad_files[:SMALL_AUDIT_FILES - 3]
    started: list[str] = []
    real_init = distributor.DecodePool.__init__

    def counting_init(self, *a, **k):
        started.append("processes")
        real_init(self, *a, **k)

    monkeypatch.setattr(distributor.DecodePool, "__init__", counting_init)
    run_audit(few, tmp_path / "threads.parquet", tmp_path / "c1", tiny_encoder)
    assert started == []
    monkeypatch.setattr(local, "SMALL_AUDIT_FILES", 0)  # the same files through worker processes
    run_audit(few, tmp_path / "processes.parquet", tmp_path / "c2", tiny_encoder)
    assert started == ["processes"]
    assert_same_rows(read(tmp_path / "threads.parquet"), read(tmp_path / "processes.parquet"))
    assert sum(r["error"] is not None for r in read(tmp_path / "threads.parquet").to_pylist()) >= len(few) - 3
