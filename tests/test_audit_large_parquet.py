"""Parquet files that are small on disk and huge in rows (issue 21.1): manifests, rescore and diff read them a batch
at a time, each input once, and refuse more rows than the limit before reading any."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from audit_helpers import REPO, audited, bad_files, read, sample  # noqa: F401
from conftest import assert_same_rows

from safeclip.audit import diff, read_manifest, rescore
from safeclip.errors import ConfigError, DataError, ManifestError


def _copies_of_one_row(src, dst, n):
    """``n`` copies of the first decided row of the audit output ``src`` (its metadata kept): a few KB on disk."""
    t = read(src)
    ok = t.column("error").to_pylist().index(None)
    pq.write_table(t.take(pa.array([ok] * n)), dst, compression="zstd")
    return t.column("path")[ok].as_py()


def test_more_rows_than_the_limit_is_one_line_before_anything_is_read(audited, tmp_path, monkeypatch):
    d, _ = audited
    MAX_ROWS_ENV = "SAFECLIP_MAX_ROWS"
    big = tmp_path / "big.parquet"
    _copies_of_one_row(d / "default.parquet", big, 5000)
    assert big.stat().st_size < 100_000
    monkeypatch.setenv(MAX_ROWS_ENV, "1000")
    limit = r"has 5_000 rows, more than the limit of 1_000: set \$SAFECLIP_MAX_ROWS"
    with pytest.raises(ManifestError, match="manifest .*" + limit):
        read_manifest(big)
    with pytest.raises(DataError, match=limit):
        diff(big, d / "default.parquet")
    with pytest.raises(DataError, match=limit):
        diff(d / "default.parquet", big)
    for source in ("from_audit", "embeddings"):
        with pytest.raises(DataError, match=limit):
            rescore(out=tmp_path / "o.parquet", policy="strict", cache=d / "cache", verbose=False, **{source: big})
    assert not (tmp_path / "o.parquet").exists()
    monkeypatch.setenv(MAX_ROWS_ENV, "5000")
    assert read_manifest(big)
    from safeclip.audit.reader import DEFAULT_MAX_ROWS, max_rows

    assert max_rows() == 5000
    for bad in ("0", "-3", "many"):
        monkeypatch.setenv(MAX_ROWS_ENV, bad)
        with pytest.raises(ConfigError, match=MAX_ROWS_ENV):
            max_rows()
    monkeypatch.delenv(MAX_ROWS_ENV)
    assert max_rows() == DEFAULT_MAX_ROWS


def test_copies_of_one_row_are_one_input_and_not_an_audit_output(audited, tmp_path):
    d, _ = audited
    big = tmp_path / "big.parquet"
    path = _copies_of_one_row(d / "default.parquet", big, 200_000)
    assert read_manifest(big) == [path]  # a manifest names each input once
    for source in ("from_audit", "embeddings"):
        with pytest.raises(DataError, match="row 1 repeats the path .* of an earlier row: an audit output holds one"):
            rescore(out=tmp_path / "o.parquet", policy="strict", cache=d / "cache", verbose=False, **{source: big})
    t = diff(big, d / "default.parquet")  # diff keeps the first row of each input
    assert int(t.schema.metadata[b"safeclip.shared"]) == 1
    assert diff(big, big).num_rows == 0


def test_rescore_reads_its_source_a_batch_at_a_time(audited, tmp_path):
    d, inputs = audited
    for source in ("from_audit", "embeddings"):
        rescore(out=tmp_path / "one.parquet", policy="strict", cache=d / "cache", verbose=False,
                **{source: d / "default.parquet"})
        rescore(out=tmp_path / "small.parquet", policy="strict", cache=d / "cache", verbose=False, chunk_rows=3,
                **{source: d / "default.parquet"})
        assert read(tmp_path / "small.parquet").num_rows == len(inputs)
        assert_same_rows(read(tmp_path / "small.parquet"), read(tmp_path / "one.parquet"))


_PEAK = """
import json, sys
from safeclip.audit import diff, read_manifest, rescore
from safeclip.errors import DataError
big, cache, out = sys.argv[1:4]
read_manifest(big)
diff(big, big)
try:
    rescore(out=out, policy="strict", cache=cache, from_audit=big, verbose=False)
except DataError:
    pass
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent (pytest, which built the file) across exec
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
print(json.dumps(int(hwm.split()[1]) / 1024))
"""


@pytest.mark.slow
def test_a_million_copies_of_one_row_stay_small_in_memory(audited, tmp_path):
    d, _ = audited
    big = tmp_path / "big.parquet"
    _copies_of_one_row(d / "default.parquet", big, 1_000_000)
    p = subprocess.run([sys.executable, "-c", _PEAK, str(big), str(d / "cache"), str(tmp_path / "o.parquet")],
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert p.returncode == 0, p.stderr[-2000:]
    peak_mib = json.loads(p.stdout.strip().splitlines()[-1])
    assert peak_mib < 600, f"peak RSS {peak_mib:.0f} MiB for a {big.stat().st_size} B file"  # was ~1.1 GB diffing
