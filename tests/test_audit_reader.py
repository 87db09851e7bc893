"""The audit's inputs: folders walked in order, manifests (text, CSV, Parquet) read, each input once."""

from __future__ import annotations

import os
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
    for name in ("c.mp4", "d.MOV", "e.webm", "f.mkv", "g.m4v"):  # videos are taken by extension too (issue 24)
        (nested / name).write_bytes(b"")
    assert collect_inputs([nested]) == [str(nested / n) for n in ("c.mp4", "d.MOV", "e.webm", "f.mkv", "g.m4v",
                                                                  "z.JPG")]


def test_a_folder_is_walked_by_content_and_what_is_left_out_is_counted(sample, tmp_path):
    """10.3: extensionless, hash-named uploads are images by their first bytes; the rest is counted, by reason."""
    from safeclip.audit.reader import gather_inputs

    up = tmp_path / "uploads"
    (up / "ab").mkdir(parents=True)
    shutil.copyfile(sample[0], up / "ab" / "3f1c9a0e")            # JPEG bytes, no extension
    (up / "ab" / "9ab2").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(32))  # PNG magic (truncated: an error row)
    (up / "README").write_text("not an image")
    (up / "photo.jpg").write_text("an extension is taken at its word")
    os.mkfifo(up / "pipe")                                        # never opened
    got = gather_inputs([up])
    assert got.paths == (str(up / "photo.jpg"), str(up / "ab" / "3f1c9a0e"), str(up / "ab" / "9ab2"))
    assert got.skipped == {"not an image": 1, "not a regular file": 1}
    assert "skipped 2 file(s)" in got.skipped_line() and "--all-files" in got.skipped_line()
    every = gather_inputs([up], include_all=True)
    assert every.paths == (str(up / "README"), *got.paths) and every.skipped == {"not a regular file": 1}


def test_the_bad_corpus_is_walked_by_content(corpus):
    from safeclip.audit.reader import gather_inputs

    folder = corpus / "bad"
    regular = [p for p in folder.rglob("*") if p.is_file()]
    got = gather_inputs([folder])
    assert len(got.paths) + sum(got.skipped.values()) == len(regular)  # every file is a row or counted
    assert len(gather_inputs([folder], include_all=True).paths) == len(regular)


def test_manifest_names_are_exact_and_errors_say_what_is_wrong(tmp_path):
    """9.12: only the line terminator is removed; 10.11: a missing manifest says "no such file"."""
    txt = tmp_path / "list.txt"
    txt.write_bytes(b"# comment\n trailing space.jpg \ncrlf.jpg\r\n\nraw\xff.jpg\nlast.jpg")
    assert read_manifest(txt) == [" trailing space.jpg ", "crlf.jpg", os.fsdecode(b"raw\xff.jpg"), "last.jpg"]
    for name in ("nope.parquet", "nope.csv", "nope.txt"):
        with pytest.raises(SafeclipError, match=r"cannot read manifest .*nope\.\w+: no such file$"):
            read_manifest(tmp_path / name)
    with pytest.raises(SafeclipError, match="is a folder"):
        read_manifest(tmp_path)


def test_path_text_and_bytes_are_lossless():
    from safeclip.audit.reader import path_bytes, path_text

    for raw in (b"plain.jpg", "caf\u00e9.jpg".encode(), b"bad\xff\xfe.jpg", b"\x80", b"a\\xff"):
        p = os.fsdecode(raw)
        text, blob = path_text(p), path_bytes(p)
        text.encode("utf-8")  # always storable as a Parquet string
        assert (blob if blob is not None else text.encode()) == raw
