"""``safeclip audit`` / ``rescore`` on the command line: exit codes for --fail-on, usage and configuration errors."""

from __future__ import annotations

import pytest
from audit_helpers import ALL_FLAG_POLICY, bad_files, sample  # noqa: F401

from safeclip.cli.audit import main as cli_main


def test_fail_on_and_usage_exit_codes(sample, bad_files, tiny_model, tmp_path, capsys):
    pol = tmp_path / "all-flag.yaml"
    pol.write_text(ALL_FLAG_POLICY)
    base = ["--model", tiny_model, "--cache", str(tmp_path / "cache"), "--policy", str(pol), "--no-progress"]
    good = sample[:3]

    def run(*args: str) -> int:
        return cli_main(["audit", *args, *base])

    assert run(*good, "--out", str(tmp_path / "a.parquet")) == 0
    assert run(*good, "--out", str(tmp_path / "b.parquet"), "--fail-on", "flag") == 1
    assert run(*good, "--out", str(tmp_path / "c.parquet"), "--fail-on", "block") == 0
    assert run(*good, "--out", str(tmp_path / "d.parquet"), "--fail-on", "error") == 0
    assert run(*good, bad_files[0], "--out", str(tmp_path / "e.parquet"), "--fail-on", "error") == 1
    assert run(*good, bad_files[0], "--out", str(tmp_path / "f.parquet"), "--fail-on", "block") == 1  # fail closed
    # Usage and configuration errors: exit 2.
    assert run("--out", str(tmp_path / "g.parquet")) == 2  # no inputs
    assert cli_main(["audit", *good, "--out", str(tmp_path / "h.parquet"), "--policy",
                     str(tmp_path / "nope.yaml"), "--model", tiny_model]) == 2
    with pytest.raises(SystemExit) as e:
        cli_main(["audit", *good])  # --out is required
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        cli_main(["audit", *good, "--out", "x.parquet", "--fail-on", "sometimes"])
    assert e.value.code == 2
    capsys.readouterr()
    # rescore: the same --fail-on, and a cache without this encoder is a configuration error.
    assert cli_main(["rescore", "--from", str(tmp_path / "e.parquet"), "--cache", str(tmp_path / "cache"),
                     "--policy", str(pol), "--out", str(tmp_path / "r.parquet"), "--fail-on", "error"]) == 1
    assert cli_main(["rescore", "--cache", str(tmp_path / "nothing"), "--out", str(tmp_path / "r2.parquet")]) == 2


def test_a_path_that_does_not_exist_is_a_usage_error_before_the_model_loads(tmp_path):
    """10.2: exit 2, one line naming the path, no output written, no model loaded (the model named does not
    exist either: loading it would be a different error)."""
    import subprocess
    import sys

    out = tmp_path / "x.parquet"
    proc = subprocess.run([sys.executable, "-m", "safeclip", "audit", str(tmp_path / "MISSPELLED"), "--out", str(out),
                           "--model", "local-dir:/nonexistent", "--cache", str(tmp_path / "cache")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(tmp_path / "MISSPELLED") in lines[0] and "no such file" in lines[0]
    assert not out.exists()


def test_runtime_flags_and_all_files_reach_the_audit(tmp_path, monkeypatch):
    import sys

    audit_pkg = sys.modules["safeclip.audit"]  # the package (safeclip.audit is also the function's name)
    seen = {}

    class Done:
        def fails(self, level):
            return False

    monkeypatch.setattr(audit_pkg, "audit", lambda paths, **kw: seen.update(kw, paths=paths) or Done())
    (tmp_path / "a.jpg").write_bytes(b"")
    assert cli_main(["audit", str(tmp_path), "--out", str(tmp_path / "o.parquet"), "--runtime", "onnx",
                     "--precision", "int8", "--threads", "3", "--all-files"]) == 0
    spec = seen["encoder"]  # the CLI builds the option groups once (issue 20)
    assert (spec.runtime, spec.precision, spec.threads, seen["include_all"]) == ("onnx", "int8", 3, True)


def test_ctrl_c_says_how_to_resume(tmp_path, monkeypatch, capsys):
    """Issue 21 (first hour): Ctrl-C during an audit gave no resume hint."""
    import safeclip.cli.audit as cli_audit

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_audit, "_run_audit", interrupted)
    (tmp_path / "a.jpg").write_bytes(b"")
    code = cli_main(["audit", str(tmp_path), "--out", str(tmp_path / "o.parquet")])
    err = capsys.readouterr().err
    assert code == 130 and "run the same command again to resume" in err


@pytest.mark.slow
def test_skipped_files_are_reported_and_all_files_includes_them(sample, tiny_model, tmp_path):
    """10.3 through the CLI: the summary line counts what the folder walk left out; --all-files makes it rows."""
    import shutil
    import subprocess
    import sys

    import pyarrow.parquet as pq

    up = tmp_path / "up"
    up.mkdir()
    shutil.copyfile(sample[0], up / "0a1b2c")
    (up / "notes").write_text("hello")
    base = [sys.executable, "-m", "safeclip", "audit", str(up), "--model", tiny_model, "--cache",
            str(tmp_path / "cache"), "--no-progress", "--workers", "1"]
    proc = subprocess.run([*base, "--out", str(tmp_path / "a.parquet")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "skipped 1 file(s) in the folders (1 not an image)" in proc.stderr
    assert pq.read_table(tmp_path / "a.parquet").column("path").to_pylist() == [str(up / "0a1b2c")]
    proc = subprocess.run([*base, "--all-files", "--out", str(tmp_path / "b.parquet")], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    t = pq.read_table(tmp_path / "b.parquet")
    assert t.column("path").to_pylist() == [str(up / "0a1b2c"), str(up / "notes")]
    assert t.column("error").to_pylist()[1] is not None and "in the folders" not in proc.stderr
