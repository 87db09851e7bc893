"""Diffing two outputs: the inputs whose action changed, with the category that moved most."""

from __future__ import annotations

import numpy as np
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


def _retarget(src, dst, paths, **meta_changes):
    """``src`` with other paths (and metadata changes) written to ``dst``."""
    import json

    from safeclip.audit.writer import read_meta

    t = read(src)
    meta = {**read_meta(t.schema), **meta_changes}
    t = t.set_column(t.column_names.index("path"), "path", pa.array(paths, pa.string()))
    pq.write_table(t.replace_schema_metadata({b"safeclip": json.dumps(meta).encode()}), dst)


def test_relative_and_absolute_paths_of_the_same_files_match(audited, tmp_path, capsys):
    import os

    d, inputs = audited
    base = os.path.dirname(os.path.commonpath(inputs))
    rel = [os.path.relpath(p, base) for p in inputs]
    _retarget(d / "strict.parquet", tmp_path / "rel.parquet", rel, cwd=base)
    t = diff(d / "default.parquet", tmp_path / "rel.parquet")
    assert int(t.schema.metadata[b"safeclip.shared"]) == len(inputs)
    assert "missing" not in t.column("action_a").to_pylist() + t.column("action_b").to_pylist()
    assert t.num_rows == diff(d / "default.parquet", d / "strict.parquet").num_rows
    assert set(t.column("key").to_pylist()) <= set(inputs)


def test_moved_files_match_by_content_and_no_shared_inputs_is_said(audited, tmp_path, capsys):
    d, inputs = audited
    _retarget(d / "strict.parquet", tmp_path / "moved.parquet", [f"/elsewhere/{i}.img" for i in range(len(inputs))])
    t = diff(d / "default.parquet", tmp_path / "moved.parquet")
    assert t.schema.metadata[b"safeclip.key"] == b"sha256"
    assert "missing" not in t.column("action_b").to_pylist()
    other = read(d / "strict.parquet").slice(0, 2)
    other = other.set_column(other.column_names.index("sha256"), "sha256", pa.array(["0" * 64, "1" * 64]))
    other = other.set_column(other.column_names.index("path"), "path", pa.array(["/x/a.jpg", "/x/b.jpg"]))
    pq.write_table(other, tmp_path / "other.parquet")
    assert cli_main(["diff", str(d / "default.parquet"), str(tmp_path / "other.parquet")]) == 0
    err = capsys.readouterr().err
    assert "share no inputs" in err


def _output(path, rows, thresholds):
    from safeclip.audit.writer import Rows, output_schema

    meta = {"kind": "audit", "format": 1, "thresholds": thresholds, "categories": ["a", "b"]}
    schema = output_schema(["a", "b"], meta, False)
    r = Rows(2, False)
    for name, action, probs in rows:
        r.add(name, None, 1, 1, 1, 1, action, np.array(probs, np.float32), None)
    pq.write_table(r.table(schema, ["a", "b"], "e", "p"), path)


def test_the_change_named_is_the_category_whose_action_changed(tmp_path):
    _output(tmp_path / "a.parquet", [("/x/1", "allow", [0.4, 0.1]), ("/x/2", "allow", [0.2, 0.2])],
            {"a": [0.5, 0.9], "b": [0.5, 0.9]})
    # Under B, "a" flags at 0.3: its probability did not move, "b"'s did without crossing anything.
    _output(tmp_path / "b.parquet", [("/x/1", "flag", [0.4, 0.2]), ("/x/2", "flag", [0.2, 0.2])],
            {"a": [0.3, 0.9], "b": [0.5, 0.9]})
    rows = {r["key"]: r for r in diff(tmp_path / "a.parquet", tmp_path / "b.parquet").to_pylist()}
    assert rows["/x/1"]["category"] == "a" and rows["/x/1"]["delta"] == 0
    assert rows["/x/2"]["category"] is None  # no category's action or probability changed: none is named


def test_a_change_of_thresholds_is_printed_and_an_unmoved_probability_is_not(tmp_path, capsys):
    _output(tmp_path / "a.parquet", [("/x/1", "allow", [0.4, 0.1]), ("/x/2", "allow", [0.2, 0.2]),
                                     ("/x/3", "allow", [0.1, 0.3]), ("/x/4", "allow", [0.2999999, 0.1])],
            {"a": [0.5, 0.9], "b": [0.5, None]})
    # Under B: "a" flags at 0.3 (only its threshold moved for /x/1), /x/3's "b" rose past "b"'s new block, and
    # /x/4's "a" crossed 0.3 by a hair.
    _output(tmp_path / "b.parquet", [("/x/1", "flag", [0.4, 0.1]), ("/x/2", "allow", [0.2, 0.2]),
                                     ("/x/3", "block", [0.1, 0.8]), ("/x/4", "flag", [0.3000001, 0.1])],
            {"a": [0.3, 0.9], "b": [0.5, 0.7]})
    assert cli_main(["diff", str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")]) == 0
    lines = dict(line.split("\t")[0::3] for line in capsys.readouterr().out.strip().splitlines()[1:])
    assert lines == {"/x/1": "a 0.400, flag 0.500 -> 0.300",
                     "/x/3": "b 0.300 -> 0.800 (+0.500), block off -> 0.700",
                     "/x/4": "a 0.2999999 -> 0.3000001 (+0.0000002), flag 0.500 -> 0.300"}
    rows = {r["key"]: r for r in diff(tmp_path / "a.parquet", tmp_path / "b.parquet").to_pylist()}
    assert rows["/x/1"]["change"] == lines["/x/1"] and rows["/x/1"]["delta"] == 0


def test_wrongly_typed_columns_are_one_line_exit_2(audited, tmp_path):
    import subprocess
    import sys

    d, _ = audited
    t = read(d / "default.parquet")
    t = t.set_column(t.column_names.index("action"), "action", pa.array(range(t.num_rows), pa.int64()))
    pq.write_table(t, tmp_path / "typed.parquet")
    with pytest.raises(DataError, match="column 'action' is int64, not text"):
        diff(d / "default.parquet", tmp_path / "typed.parquet")
    p = subprocess.run([sys.executable, "-m", "safeclip", "diff", str(d / "default.parquet"),
                        str(tmp_path / "typed.parquet")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "not text" in p.stderr
