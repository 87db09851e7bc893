"""``safeclip policy record | history | rollback`` on the command line."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from safeclip.cli import main
from safeclip.policy import builtin_policy_dir
from safeclip.versions import HISTORY_DIR


def _policy(folder: Path, version: str, flag: float) -> Path:
    doc = yaml.safe_load((builtin_policy_dir() / "default.yaml").read_text())
    doc.update(name="mine", version=version)
    doc["categories"]["drugs"]["thresholds"] = {"flag": flag, "block": 0.9}
    path = folder / "policy.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_record_history_rollback(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("USER", "ada")
    pol = _policy(tmp_path, "1.0", 0.5)
    v1 = pol.read_bytes()
    assert main(["policy", "history", str(pol)]) == 0
    assert "no versions recorded" in capsys.readouterr().err
    assert main(["policy", "record", str(pol), "--reason", "hand-tuned drugs"]) == 0
    assert "recorded #1 (mine@1.0, 1 file)" in capsys.readouterr().out
    assert main(["policy", "record", str(pol), "--reason", "again"]) == 0
    assert "unchanged since #1" in capsys.readouterr().out
    _policy(tmp_path, "1.1", 0.3)
    assert main(["policy", "record", str(pol), "--reason", "lower flag", "--author", "bob"]) == 0
    capsys.readouterr()

    assert main(["policy", "history", str(pol)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[:2] + line.split("\t")[3:] for line in lines] == [
        ["#1", "1.0", "ada", "hand-tuned drugs"], ["#2", "1.1", "bob", "lower flag"]]
    assert lines[0].split("\t")[2].endswith(" UTC")

    assert main(["policy", "rollback", str(pol), "1.0"]) == 0
    out = capsys.readouterr().out
    assert "rolled back policy.yaml to 1.0 (#1), now #3" in out and "restored  policy.yaml" in out
    assert pol.read_bytes() == v1

    assert main(["policy", "history", str(pol), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["seq"], r["version"], r["reason"], r["author"]) for r in rows][-1] == (3, "1.0", "rollback to 1.0 (#1)",
                                                                                     "ada")
    assert rows[0]["files"] == rows[2]["files"] and rows[0]["policy"] == "mine@1.0"


def test_unknown_versions_and_tampered_objects_exit_2_with_one_line(tmp_path, capsys):
    pol = _policy(tmp_path, "1.0", 0.5)
    assert main(["policy", "record", str(pol), "--reason", "first"]) == 0
    _policy(tmp_path, "2.0", 0.3)
    assert main(["policy", "record", str(pol), "--reason", "second"]) == 0
    capsys.readouterr()
    assert main(["policy", "rollback", str(pol), "3.0"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "no recorded version '3.0'; recorded: #1 1.0, #2 2.0" in err
    for obj in (tmp_path / HISTORY_DIR / "objects").iterdir():
        obj.write_bytes(obj.read_bytes() + b"# tampered\n")
    now = pol.read_bytes()
    assert main(["policy", "rollback", str(pol), "#1"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "was altered" in err
    assert pol.read_bytes() == now
    assert main(["policy", "record", "default", "--reason", "x"]) == 2
    assert "shipped policy has no history" in capsys.readouterr().err
