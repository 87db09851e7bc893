"""The per-file worker: what decode workers import, and hostile files becoming error rows (never a crash)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from audit_helpers import REPO, bad_files, file_sha, read, run_audit, sample  # noqa: F401

from safeclip.audit.worker import WorkerConfig, process_file, results_from_arrow, results_to_arrow
from safeclip.cli.audit import main as cli_main


def test_workers_never_import_torch():
    code = ("import sys; import safeclip.audit, safeclip.decode, safeclip.embed; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_hostile_files_become_error_rows_and_the_cli_exits_0(bad_files, tiny_model, tiny_encoder, tmp_path, capsys):
    s = run_audit(bad_files, tmp_path / "bad.parquet", tmp_path / "cache", tiny_encoder)
    t = read(tmp_path / "bad.parquet")
    assert s.rows == len(bad_files) == t.num_rows and s.errors == len(bad_files)
    for r in t.to_pylist():
        assert r["action"] == "error" and r["error"], r["path"]  # error rows have the action "error"
        kind, _, reason = r["error"].partition(": ")
        assert kind.endswith("Error") and reason, r["error"]  # e.g. "TruncatedImageError: PNG image is truncated"
    assert s.worker_restarts == 0
    # Through the command line: per-file failures are rows, the audit itself succeeded.
    code = cli_main(["audit", *bad_files[:10], "--out", str(tmp_path / "cli.parquet"), "--model", tiny_model,
                     "--cache", str(tmp_path / "cache"), "--no-progress"])
    assert code == 0
    assert "errors 10" in capsys.readouterr().err


def test_importing_the_audit_package_loads_no_engine():
    # The package's public surface is importable anywhere (safeclip imports it): no torch, no pyarrow, no process
    # machinery until an audit runs; a decode worker's imports stay free of torch too.
    code = ("import sys; import safeclip.audit; "
            "heavy = ('torch', 'pyarrow', 'multiprocessing', 'ray', 'safeclip.audit.local', 'safeclip.audit.ray'); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or m in heavy)); "
            "import safeclip.audit.worker, safeclip.audit.distributor; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["[]", "[]"]


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's on the hostile files
def test_one_file_becomes_one_result_whatever_it_holds(sample, bad_files, tmp_path):
    from safeclip.decode import DecodeLimits
    from safeclip.embed import PixelSpec

    cfg = WorkerConfig(None, "enc", PixelSpec(size=32), DecodeLimits(), "fp", 0, None)
    ok = process_file(3, sample[0], cfg, None, {})
    assert (ok.tid, ok.kind, ok.decoded) == (3, "pixels", True) and ok.pixels.shape[1:] == (32, 32, 3)
    assert ok.sha256 == file_sha(sample[0]) and ok.width and ok.height and ok.error is None
    missing = process_file(4, str(tmp_path / "gone.jpg"), cfg, None, {})
    assert missing.kind == "error" and missing.sha256 is None and "file not found" in missing.error
    bad = [process_file(i, p, cfg, None, {}) for i, p in enumerate(bad_files)]
    assert all(r.kind == "error" and r.error_text.split(": ")[0] == r.error_kind for r in bad)
    assert any(r.cacheable_error for r in bad)  # deterministic failures are remembered by the cache
    # The Arrow form the Ray engine ships results in gives them back as they were.
    back = results_from_arrow(results_to_arrow([ok, missing, *bad]), 32, 64)
    assert [(r.tid, r.kind, r.sha256, r.error, r.cacheable_error) for r in back] == [
        (r.tid, r.kind, r.sha256, r.error, r.cacheable_error) for r in [ok, missing, *bad]]
    np.testing.assert_array_equal(back[0].pixels, ok.pixels)
    assert back[0].frame_indices == ok.frame_indices and back[0].embeddings is None
