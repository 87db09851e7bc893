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
