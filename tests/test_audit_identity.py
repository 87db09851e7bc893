"""The encoder-identity memo: decoding starts on a remembered identity, and a wrong one is caught in time."""

from __future__ import annotations

import json

from audit_helpers import read, sample  # noqa: F401
from conftest import assert_same_rows

from safeclip.cli.audit import main as cli_main


def test_a_wrong_encoder_memo_is_caught_before_anything_is_committed(sample, tiny_model, tmp_path):
    # The second run of a model starts decoding before the model has loaded, on the identity remembered from the
    # first run; the loaded model has the last word.
    cache = tmp_path / "cache"
    args = [*sample[:4], "--model", tiny_model, "--cache", str(cache), "--no-progress"]
    assert cli_main(["audit", *args, "--out", str(tmp_path / "a.parquet")]) == 0
    memo_file = cache / "encoders.json"
    memo = json.loads(memo_file.read_text())
    (key, entry), = memo.items()
    real = dict(entry, spec=dict(entry["spec"]))
    entry["encoder_id"] = "something-else"
    entry["spec"]["size"] = 32
    memo_file.write_text(json.dumps(memo))
    assert cli_main(["audit", *args, "--out", str(tmp_path / "b.parquet")]) == 0
    assert_same_rows(read(tmp_path / "a.parquet"), read(tmp_path / "b.parquet"))
    assert json.loads(memo_file.read_text())[key] == real
    assert cli_main(["audit", *args, "--out", str(tmp_path / "c.parquet")]) == 0  # the right guess
    assert_same_rows(read(tmp_path / "a.parquet"), read(tmp_path / "c.parquet"))
