"""Diffing two outputs: the inputs whose action changed, with the category that moved most."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from audit_helpers import audited, bad_files, read, sample  # noqa: F401

from safeclip.audit import diff
from safeclip.errors import DataError
from safeclip.cli.audit import main as cli_main


def test_diff_lists_the_rows_whose_action_changed(audited, capsys):
    d, inputs = audited
    a, b = read(d / "default.parquet").to_pylist(), read(d / "strict.parquet").to_pylist()
    expected = {ra["path"] for ra, rb in zip(a, b) if ra["action"] != rb["action"]}
    t = diff(d / "default.parquet", d / "strict.parquet")
    assert set(t.column("key").to_pylist()) == expected
    by_path = {r["path"]: (ra, r) for ra, r in zip(a, b)}
    for r in t.to_pylist():
        ra, rb = by_path[r["key"]]
        assert (r["action_a"], r["action_b"]) == (ra["action"], rb["action"])
        deltas = {k[2:]: rb[k] - ra[k] for k in ra if k.startswith("p_") and k in rb}
        assert r["category"] == max(deltas, key=lambda k: abs(deltas[k]))
        assert r["delta"] == pytest.approx(deltas[r["category"]], abs=1e-6)
    assert diff(d / "default.parquet", d / "default.parquet").num_rows == 0
    assert cli_main(["diff", str(d / "default.parquet"), str(d / "strict.parquet")]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[0].startswith("path\taction_a\taction_b") and len(printed) == 1 + len(expected)


def test_a_file_that_is_not_an_output_is_a_data_error(audited, tmp_path):
    d, _ = audited
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"path": ["a"], "score": [1.0]}), other)
    with pytest.raises(DataError, match="not a safeclip audit or rescore output"):
        diff(d / "default.parquet", other)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="cannot read"):
        diff(tmp_path / "junk.parquet", d / "default.parquet")
