"""``safeclip review add | list | next | verdict | stats`` on a real SQLite store, with an audit of real photos by
the tiny random-weight checkpoint under a policy whose flag threshold of 0 flags everything (known by construction;
not a moderation result)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from audit_helpers import ALL_FLAG_POLICY

from safeclip import Moderator
from safeclip.banks import Bank
from safeclip.cli import main as cli_main
from safeclip.review import NewItem, open_store, write_spool

# Flags everything (threshold 0), with an allow bank the review loop can add to.
POLICY = ALL_FLAG_POLICY.replace("name: all-flag", "name: review-cli") + """    banks:
      - path: allowed
        effect: allow
        min_similarity: 0.9999
"""


@pytest.fixture(scope="module")
def audit_dir(tmp_path_factory, photos, tiny_model, tiny_encoder):
    """One audit of three photos under the flag-everything policy (with its allow bank), shared by the tests."""
    d = tmp_path_factory.mktemp("review-cli")
    Bank.create(d / "allowed", "embedding", dim=tiny_encoder.dim, encoder_id=tiny_encoder.encoder_id).close()
    (d / "policy.yaml").write_text(POLICY)
    files = [str(p) for p in photos[:3]]
    assert cli_main(["audit", *files, "--policy", str(d / "policy.yaml"), "--model", tiny_model, "--cache",
                     str(d / "cache"), "--out", str(d / "audit.parquet"), "--no-progress"]) == 0
    return d, files


@pytest.fixture
def audited(audit_dir, tmp_path, capsys):
    """The shared audit, and this test's own copy of the bank (it adds to it) and a fresh store folder."""
    import shutil

    d, files = audit_dir
    shutil.copytree(d / "allowed", tmp_path / "allowed")
    (tmp_path / "policy.yaml").write_text(POLICY)  # names ./allowed: this test's copy
    shutil.copy(d / "audit.parquet", tmp_path / "audit.parquet")
    capsys.readouterr()
    return tmp_path, tmp_path / "policy.yaml", d / "cache", files


def _run(capsys, *args: str) -> tuple[int, str, str]:
    code = cli_main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_the_review_loop_on_the_command_line(audited, capsys, tiny_model, cache_dir):
    tmp_path, policy, cache, files = audited
    store = str(tmp_path / "review.db")
    add = ["review", "add", store, "--from", str(tmp_path / "audit.parquet"), "--action", "flag", "--policy",
           str(policy), "--cache", str(cache)]
    code, out, _ = _run(capsys, *add)
    assert code == 0 and "3 rows selected: 3 added, 0 already in the store" in out
    code, out, _ = _run(capsys, *add)  # idempotent by sha256 + policy version
    assert code == 0 and "0 added, 3 already in the store" in out

    code, out, _ = _run(capsys, "review", "list", store, "--json")
    items = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and sorted(i["source"] for i in items) == sorted(files)
    assert all(i["action"] == "flag" and i["probability"] == 1.0 and i["has_embedding"] and i["has_thumbnail"]
               and i["decision"]["categories"]["test_cat"]["probability"] is not None for i in items)

    code, out, _ = _run(capsys, "review", "next", store, "--reviewer", "alice", "--json",
                        "--thumbnail", str(tmp_path / "t.jpg"))
    first = json.loads(out)
    assert code == 0 and first["id"] == items[0]["id"] and (tmp_path / "t.jpg").read_bytes()[:2] == b"\xff\xd8"
    code, out, _ = _run(capsys, "review", "next", store, "--reviewer", "bob", "--json")
    assert json.loads(out)["id"] == items[1]["id"]  # alice holds the first one
    code, out, _ = _run(capsys, "review", "skip", store, str(items[1]["id"]), "--reviewer", "bob")
    assert code == 0 and "at the back of the queue" in out
    code, _, err = _run(capsys, "review", "skip", store, str(items[1]["id"]), "--reviewer", "bob")
    assert code == 1 and "was not skipped: bob does not hold it" in err  # no longer his
    code, out, _ = _run(capsys, "review", "next", store, "--reviewer", "bob", "--json")
    assert json.loads(out)["id"] == items[2]["id"]  # the skipped one went behind the third
    code, out, _ = _run(capsys, "review", "next", store, "--reviewer", "carol")  # the text form, for a person
    assert code == 0 and out.startswith(f"item {items[1]['id']}: flag under review-cli@1 (audit, sampled with "
                                        "probability 1")
    assert "  test_cat: flag, p=" in out and "(flag at 0.0, block at None)" in out

    # alice: a false positive, straight into the allow bank; bob disagrees later: both verdicts are kept.
    code, out, _ = _run(capsys, "review", "verdict", store, str(first["id"]), "allow", "--reviewer", "alice",
                        "--note", "a toy", "--to-bank", str(tmp_path / "allowed"))
    assert code == 0 and "allow by alice" in out and "added entry" in out
    code, _, _ = _run(capsys, "review", "verdict", store, str(first["id"]), "flag", "--category", "test_cat",
                      "--reviewer", "bob")
    assert code == 0
    with open_store(store) as s:
        verdicts = s.get(first["id"]).verdicts
    assert [(v.reviewer, v.action, v.category, v.note) for v in verdicts] == [
        ("alice", "allow", None, "a toy"), ("bob", "flag", "test_cat", None)]

    with Bank.open(tmp_path / "allowed") as bank:
        (entry,) = list(bank.entries())
    assert "alice" in entry.label and entry.sha256 == first["sha256"]
    m = Moderator(str(policy), model=tiny_model, device="cpu", cache_dir=cache_dir)
    d = m.check(first["source"])  # the bank (named by the policy) now allows that image; the others stay flagged
    assert d.action == "allow" and d.matches and d.matches[0].bank.endswith("allowed")
    assert m.check(next(f for f in files if f != first["source"])).action == "flag"

    code, out, _ = _run(capsys, "review", "stats", store, "--json")
    assert json.loads(out) == [{"policy": "review-cli@1", "action": "flag", "items": 3, "reviewed": 1}]
    code, out, _ = _run(capsys, "review", "list", store, "--pending")
    assert code == 0 and len(out.splitlines()) == 2


def test_mistakes_are_one_line_errors(audited, capsys):
    tmp_path, policy, cache, _ = audited
    store = str(tmp_path / "review.db")
    assert _run(capsys, "review", "add", store, "--from", str(tmp_path / "audit.parquet"), "--action", "flag",
                "--policy", str(policy), "--cache", str(cache))[0] == 0
    for args, needle in [
        (("review", "verdict", store, "999", "allow", "--reviewer", "a"), "999"),
        (("review", "verdict", store, "1", "block", "--to-bank", str(tmp_path / "allowed")), "--to-bank"),
        (("review", "verdict", store, "1", "flag", "--category", "nope", "--reviewer", "a"), "nope"),
        (("review", "list", str(tmp_path / "missing.db")), "missing.db"),
        (("review", "add", store, "--from", str(tmp_path / "audit.parquet"), "--policy", "strict"), "review-cli"),
    ]:
        code, _, err = _run(capsys, *args)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and needle in lines[0], (args, err)


def test_a_spool_is_replayed_into_the_store(tmp_path, capsys):
    spool = tmp_path / "spool.jsonl"
    store_path = tmp_path / "review.db"
    decision = {"action": "flag", "reasons": ["x"], "policy": "p@1", "encoder_id": "e", "sha256": "ab" * 32,
                "source": None, "error": None, "categories": {"c": {"probability": 0.7, "flag": 0.5, "block": None}}}
    item = NewItem(sha256="ab" * 32, policy="p@1", encoder_id="e", action="flag", decision=decision,
                   probability=1.0, origin="check", embedding=np.ones(4, np.float32) / 2, thumbnail=b"\xff\xd8")
    write_spool(spool, [item])  # what a ReviewQueue does while its store is down
    code, out, _ = _run(capsys, "review", "add", str(store_path), "--from-spool", str(spool))
    assert code == 0 and "1 spooled item(s)" in out and spool.read_text() == ""
    with open_store(store_path) as store:
        (got,) = store.items()
        assert got.decision == decision and store.thumbnail(got.id) == b"\xff\xd8"
        np.testing.assert_array_equal(store.embeddings([got.id])[0], np.ones(4, np.float32) / 2)
