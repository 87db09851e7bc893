"""Audits and re-scores match the banks a policy names: PDQ hashes travel from decode (or the cache) to the decision,
rows report them and their matches, and files audited before an entry was added are found again without decoding."""

from __future__ import annotations

import json
import shutil
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pytest
from audit_helpers import file_sha, read, run_audit
from PIL import Image

from safeclip.audit import rescore
from safeclip.banks import Bank, NewEntry
from safeclip.cache import EmbeddingCache
from safeclip.pdq import hamming, pdq_hash

SCORING = """
scoring:
  logit_scale: 100.0
  templates: ["a photo of {}."]
  neutral: ["a landscape"]
"""
PLAIN = """
name: plain
version: "1"
""" + SCORING + """
categories:
  test_cat:
    prompts: ["a red ball"]
    contrast: ["a blue cube"]
    thresholds: {flag: 0.5, block: null}
"""
BANKED = PLAIN.replace("name: plain", "name: banked") + """
  known:
    banks:
      - path: incidents
        effect: deny
        max_distance: 31
"""


@pytest.fixture(scope="module")
def files(photos) -> list[str]:
    small = sorted((p for p in photos if p.suffix.lower() in (".jpg", ".jpeg")), key=lambda p: p.stat().st_size)
    return [str(p) for p in small[:4]]


def _policies(folder: Path, bank_hashes: list[bytes]) -> tuple[Path, Path]:
    """The plain policy and the banked one (a PDQ deny bank ``incidents`` beside it holding ``bank_hashes``)."""
    folder.mkdir(parents=True, exist_ok=True)
    bank = Bank.create(folder / "incidents", "pdq")
    if bank_hashes:
        rows = np.frombuffer(b"".join(bank_hashes), np.uint8).reshape(-1, 32)
        bank.add(rows, [NewEntry(f"e{i}", label="known incident") for i in range(len(bank_hashes))])
    bank.close()
    (folder / "plain.yaml").write_text(PLAIN)
    (folder / "banked.yaml").write_text(BANKED)
    return folder / "plain.yaml", folder / "banked.yaml"


def _file_hash(path: str) -> bytes:
    with Image.open(path) as im:
        return pdq_hash(im.convert("RGB")).bits


@pytest.fixture(scope="module")
def plain_audit(files, tiny_encoder, tmp_path_factory):
    """``files`` audited under a policy without banks (its cache keeps the PDQ hashes)."""
    d = tmp_path_factory.mktemp("plain_audit")
    plain, _ = _policies(d / "pol", [])
    s = run_audit(files, d / "plain.parquet", d / "cache", tiny_encoder, policy=plain)
    assert s.errors == 0
    return d


def _matches(row: dict) -> list[dict]:
    return json.loads(row["matches"])


def test_rows_report_the_deciding_views_pdq_hash_and_no_matches(plain_audit, files):
    rows = read(plain_audit / "plain.parquet").to_pylist()
    assert [r["path"] for r in rows] == files
    for r in rows:
        assert len(r["pdq"]) == 64 and int(r["pdq"], 16) >= 0
        assert 0 <= r["pdq_quality"] <= 100
        assert _matches(r) == []
        # The hash of the decoded frame (before the model's resize) is PDQ's of the file, up to decode details.
        assert hamming(bytes.fromhex(r["pdq"]), _file_hash(r["path"])) <= 31


def test_a_file_in_a_deny_bank_before_the_audit_is_blocked_with_its_match(files, tiny_encoder, tmp_path):
    _, banked = _policies(tmp_path / "pol", [_file_hash(files[1])])
    s = run_audit(files, tmp_path / "b.parquet", tmp_path / "cache", tiny_encoder, policy=banked)
    assert s.errors == 0
    rows = read(tmp_path / "b.parquet").to_pylist()
    assert rows[1]["action"] == "block"
    (m,) = _matches(rows[1])
    assert (m["entry"], m["label"], m["kind"], m["effect"], m["action"], m["category"]) == (
        "e0", "known incident", "pdq", "deny", "block", "known")
    assert m["distance"] <= 31
    assert all(_matches(r) == [] and r["action"] != "block" for k, r in enumerate(rows) if k != 1)


def _no_decode_no_model(monkeypatch) -> None:
    def refuse(*a, **k):
        raise AssertionError("re-scoring must neither decode nor load the model")

    import safeclip.embed._prepare

    monkeypatch.setattr(sys.modules["safeclip.decode"], "decode", refuse)  # (safeclip.decode: the function)
    monkeypatch.setattr(safeclip.embed._prepare, "decode", refuse)
    monkeypatch.setattr(sys.modules["safeclip.embed"], "prepare", refuse)
    monkeypatch.setattr(sys.modules["safeclip.embed"].Encoder, "__init__", refuse)


def test_rescore_finds_past_files_that_match_an_entry_added_today(plain_audit, files, tmp_path, monkeypatch):
    _, banked = _policies(tmp_path / "pol", [_file_hash(files[2])])  # added after the audit
    _no_decode_no_model(monkeypatch)
    rescore(out=tmp_path / "re.parquet", policy=banked, cache=plain_audit / "cache",
            from_audit=plain_audit / "plain.parquet", verbose=False)
    rows = read(tmp_path / "re.parquet").to_pylist()
    assert [r["action"] for r in rows].count("block") == 1 and rows[2]["action"] == "block"
    (m,) = _matches(rows[2])
    assert m["entry"] == "e0" and m["label"] == "known incident" and m["action"] == "block"
    before = read(plain_audit / "plain.parquet").to_pylist()
    assert [r["pdq"] for r in rows] == [r["pdq"] for r in before]

    # The whole cache, without the audit's rows: the same file, found by its sha256.
    rescore(out=tmp_path / "all.parquet", policy=banked, cache=plain_audit / "cache", verbose=False)
    by_sha = {r["sha256"]: r for r in read(tmp_path / "all.parquet").to_pylist()}
    assert len(by_sha) == len(files)
    hit = by_sha[file_sha(files[2])]
    assert hit["action"] == "block" and _matches(hit)[0]["entry"] == "e0"
    assert sum(r["action"] == "block" for r in by_sha.values()) == 1


def test_a_cache_entry_without_pdq_is_decoded_again_under_a_pdq_bank_policy(plain_audit, files, tiny_encoder,
                                                                             tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(plain_audit / "cache", cache)
    db = EmbeddingCache(cache, tiny_encoder.encoder_id).path
    con = sqlite3.connect(db)  # as a cache written before hashes were kept
    con.execute("UPDATE images SET pdq = NULL, pdq_quality = NULL")
    con.commit()
    con.close()
    plain, banked = _policies(tmp_path / "pol", [_file_hash(files[0])])

    # Without PDQ banks the entry is a hit as it is (no hash to report).
    s = run_audit(files, tmp_path / "p.parquet", cache, tiny_encoder, policy=plain)
    assert s.decoded == 0 and s.cache_hits == len(files)
    assert all(r["pdq"] is None and r["action"] != "error" for r in read(tmp_path / "p.parquet").to_pylist())

    # A policy that matches PDQ banks decodes those files again (never decides them without their hash) and
    # completes their cache entries; the model is not needed for their embeddings.
    s = run_audit(files, tmp_path / "b.parquet", cache, tiny_encoder, policy=banked)
    assert s.decoded == len(files) and s.embedded == 0 and s.errors == 0
    rows = read(tmp_path / "b.parquet").to_pylist()
    assert rows[0]["action"] == "block" and _matches(rows[0])[0]["entry"] == "e0"
    assert all(len(r["pdq"]) == 64 for r in rows)
    with EmbeddingCache(cache, tiny_encoder.encoder_id, readonly=True) as ro:
        assert all(e.pdq is not None for e in ro.get_many([file_sha(f) for f in files]).values())
    s = run_audit(files, tmp_path / "b2.parquet", cache, tiny_encoder, policy=banked)
    assert s.decoded == 0 and s.cache_hits == len(files)


def test_rescore_fails_closed_where_no_hash_was_recorded(plain_audit, files, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(plain_audit / "cache", cache)
    con = sqlite3.connect(next((cache / "embeddings").glob("*.sqlite")))
    con.execute("UPDATE images SET pdq = NULL, pdq_quality = NULL")
    con.commit()
    con.close()
    _, banked = _policies(tmp_path / "pol", [_file_hash(files[0])])
    rescore(out=tmp_path / "re.parquet", policy=banked, cache=cache, from_audit=plain_audit / "plain.parquet",
            verbose=False)
    rows = read(tmp_path / "re.parquet").to_pylist()
    assert all(r["action"] == "error" and r["error"].startswith("NoHash") for r in rows)
