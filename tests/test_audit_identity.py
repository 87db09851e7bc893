"""The encoder-identity memo: decoding starts on a remembered identity, and a wrong one is caught in time."""

from __future__ import annotations

import json

from audit_helpers import read, sample  # noqa: F401
from conftest import assert_same_rows

from safeclip.audit.identity import MEMO_FILE, EncoderIdentity
from safeclip.cli.audit import main as cli_main
from safeclip.embed import PixelSpec


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
    # A stale identity this user remembered (signed: a forged one is no guess at all, see below).
    stale = EncoderIdentity("something-else", PixelSpec.from_dict(dict(entry["spec"], size=32)), entry["dim"])
    stale.remember(cache, key)
    assert EncoderIdentity.recall(cache, key) == stale
    assert cli_main(["audit", *args, "--out", str(tmp_path / "b.parquet")]) == 0
    assert_same_rows(read(tmp_path / "a.parquet"), read(tmp_path / "b.parquet"))
    assert json.loads(memo_file.read_text())[key] == real
    assert cli_main(["audit", *args, "--out", str(tmp_path / "c.parquet")]) == 0  # the right guess
    assert_same_rows(read(tmp_path / "a.parquet"), read(tmp_path / "c.parquet"))


def test_a_forged_encoder_memo_entry_is_no_guess(tmp_path):
    """The memo is believed only with this user's MAC: an entry anyone else wrote (or edited) is ignored."""
    real = EncoderIdentity("tiny|sha256:0123456789abcdef|px:1", PixelSpec(64), 64)
    real.remember(tmp_path, "k")
    assert EncoderIdentity.recall(tmp_path, "k") == real
    memo = json.loads((tmp_path / MEMO_FILE).read_text())
    forged = dict(memo["k"], encoder_id="ViT-B-32-quickgelu|openai|px:1")  # the MAC kept, the claim changed
    for entry in (forged, {k: v for k, v in forged.items() if k != "mac"}, dict(memo["k"], mac="0" * 64)):
        (tmp_path / MEMO_FILE).write_text(json.dumps({"k": entry}))
        assert EncoderIdentity.recall(tmp_path, "k") is None
    (tmp_path / MEMO_FILE).write_text(json.dumps({"other": memo["k"]}))  # a signed entry moved to another key
    assert EncoderIdentity.recall(tmp_path, "other") is None
