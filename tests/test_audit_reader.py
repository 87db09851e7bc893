"""The audit's inputs: folders walked in order, manifests (text, CSV, Parquet) read, each input once."""

from __future__ import annotations

import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from audit_helpers import read, run_audit, sample  # noqa: F401

from safeclip.audit import collect_inputs, read_manifest
from safeclip.errors import SafeclipError


def test_manifests_and_folders(sample, tiny_encoder, tmp_path):
    files = sample[:4]
    txt = tmp_path / "list.txt"
    txt.write_text("# a comment\n" + "\n".join(files[:2]) + "\n\n")
    csv_ = tmp_path / "list.csv"
    csv_.write_text("id,path\n" + "".join(f"{i},{p}\n" for i, p in enumerate(files[1:3])))
    parq = tmp_path / "list.parquet"
    pq.write_table(pa.table({"path": [files[3], str(tmp_path / "missing.jpg")]}), parq)
    assert read_manifest(txt) == files[:2]
    assert read_manifest(csv_) == files[1:3]
    inputs = collect_inputs([], [txt, csv_, parq])
    assert inputs == files + [str(tmp_path / "missing.jpg")]  # in order, each once
    s = run_audit([], tmp_path / "m.parquet", tmp_path / "cache", tiny_encoder, manifests=[txt, csv_, parq])
    t = read(tmp_path / "m.parquet")
    assert t.column("path").to_pylist() == inputs and s.errors == 1
    assert "file not found" in t.column("error").to_pylist()[-1]

    bad = tmp_path / "nopath.csv"
    bad.write_text("file\na.jpg\n")
    with pytest.raises(SafeclipError, match="no 'path' column"):
        read_manifest(bad)
    with pytest.raises(SafeclipError, match="no inputs"):
        run_audit([], tmp_path / "x.parquet", tmp_path / "cache", tiny_encoder)

    nested = tmp_path / "tree" / "b"
    nested.mkdir(parents=True)
    shutil.copyfile(sample[0], nested / "z.JPG")
    shutil.copyfile(sample[0], tmp_path / "tree" / "a.jpg")
    (tmp_path / "tree" / "notes.txt").write_text("not an image")
    assert collect_inputs([tmp_path / "tree"]) == [str(tmp_path / "tree" / "a.jpg"), str(nested / "z.JPG")]
