"""Policy versions: recorded, listed and rolled back byte for byte (policy file, artifacts, extends chain).

The decision-level check (rollback gives back the same audit rows on the photo corpus) is
``test_rollback_restores_byte_identical_decisions_on_the_photo_corpus`` below.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml

from safeclip.calibrate import Calibrator
from safeclip.errors import ArtifactIntegrityError, ConfigError, PolicyError
from safeclip.policy import builtin_policy_dir, load_policy
from safeclip.versions import HISTORY_DIR, history, record, rollback

BASE = """
name: mine-base
version: "1"
scoring:
  logit_scale: 100.0
  templates: ["a photo of {}."]
  neutral: ["a landscape"]
categories:
  red:
    prompts: ["a red ball"]
    contrast: ["a blue cube"]
    thresholds: {flag: 0.5, block: 0.9}
    calibrator: {path: calibrators/red.json, sha256: RED}
"""

CHILD = """# hand-written
name: mine
version: "VERSION"
extends: base.yaml
categories:
  green:
    prompts: ["a green leaf"]
    contrast: ["a brown stone"]
    thresholds: {flag: FLAG, block: 0.95}
    calibrator: {path: calibrators/green.json, sha256: GREEN}
"""


def _calibrator(path: Path, seed: int) -> str:
    """A fitted calibrator artifact on synthetic signals (its bytes differ per seed); returns its sha256."""
    rng = np.random.default_rng(seed)
    y = (rng.random(200) < 0.4).astype(int)
    s = rng.normal(size=200) + (1.0 + seed) * y
    return Calibrator("sigmoid", ("prompt",)).fit(s, y).save(path)


def _write(folder: Path, *, version: str, flag: float, seed: int, base_seed: int = 0) -> None:
    red = _calibrator(folder / "calibrators" / "red.json", base_seed)
    green = _calibrator(folder / "calibrators" / "green.json", seed)
    (folder / "base.yaml").write_text(BASE.replace("RED", red))
    (folder / "policy.yaml").write_text(
        CHILD.replace("VERSION", version).replace("FLAG", str(flag)).replace("GREEN", green))


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and HISTORY_DIR not in p.parts}


def test_record_and_rollback_round_trip_byte_for_byte_with_artifacts_and_extends(tmp_path):
    pol = tmp_path / "policy.yaml"
    _write(tmp_path, version="1.0", flag=0.5, seed=1)
    v1 = record(pol, reason="first", author="ada")
    snap1 = _files(tmp_path)
    assert (v1.seq, v1.policy_id, v1.version, v1.author, v1.reason) == (1, "mine@1.0", "1.0", "ada", "first")
    assert set(v1.files) == {"policy.yaml", "base.yaml", "calibrators/red.json", "calibrators/green.json"}

    _write(tmp_path, version="1.0+rev2", flag=0.2, seed=2, base_seed=3)  # every file changes
    extra = tmp_path / "probes" / "new.json"  # a file v1 does not have
    extra.parent.mkdir()
    extra.write_text("{}")
    v2 = record(pol, reason="retuned", author="bob")
    snap2 = _files(tmp_path)
    assert v2.seq == 2 and all(v2.files[k] != v1.files[k] for k in v1.files)
    assert load_policy(pol).category("green").flag == 0.2

    r = rollback(pol, "1.0", author="cy")
    assert _files(tmp_path) == {**snap1, "probes/new.json": b"{}"}  # byte for byte; the extra file left alone
    assert r.target == v1 and r.before is None and sorted(r.restored) == sorted(v1.files) and r.unchanged == ()
    assert (r.version.seq, r.version.version, r.version.author) == (3, "1.0", "cy")
    assert r.version.reason == "rollback to 1.0 (#1)" and dict(r.version.files) == dict(v1.files)
    assert dict(r.replaced) == dict(v2.files)  # the replaced bytes stay in the history
    assert load_policy(pol).category("green").flag == 0.5
    assert "restored  policy.yaml" in r.format()

    r = rollback(pol, "#2")
    assert _files(tmp_path) == snap2 and r.version.seq == 4 and r.version.version == "1.0+rev2"
    assert [v.reason for v in history(pol)] == ["first", "retuned", "rollback to 1.0 (#1)", "rollback to 1.0+rev2 (#2)"]


def test_a_file_of_the_version_that_is_not_in_the_target_is_left_alone_and_named(tmp_path):
    pol = tmp_path / "policy.yaml"
    _write(tmp_path, version="1", flag=0.5, seed=1)
    text = pol.read_text()
    pol.write_text("\n".join(line for line in text.splitlines() if "green.json" not in line))
    record(pol, reason="no green calibrator")
    pol.write_text(text.replace('version: "1"', 'version: "2"'))
    record(pol, reason="with it")
    r = rollback(pol, "1")
    assert r.left_alone == ("calibrators/green.json",) and (tmp_path / "calibrators" / "green.json").is_file()
    assert "left alone (not in #1) calibrators/green.json" in r.format()


def test_identical_content_is_not_recorded_again(tmp_path):
    pol = tmp_path / "policy.yaml"
    _write(tmp_path, version="1.0", flag=0.5, seed=1)
    v = record(pol, reason="first")
    assert record(pol, reason="again") == v
    assert len(history(pol)) == 1
    assert len((tmp_path / HISTORY_DIR / "log.jsonl").read_bytes().splitlines()) == 1
    rolled = rollback(pol, "1.0")  # already there: nothing to restore, nothing to record
    assert rolled.version == v and rolled.restored == () and len(history(pol)) == 1


def test_an_unrecorded_edit_is_recorded_before_a_rollback_replaces_it(tmp_path):
    pol = tmp_path / "policy.yaml"
    _write(tmp_path, version="1.0", flag=0.5, seed=1)
    record(pol, reason="first")
    pol.write_text(pol.read_text().replace("flag: 0.5", "flag: 0.3").replace('"1.0"', '"1.1"'))
    edited = pol.read_bytes()
    r = rollback(pol, "1.0")
    assert r.before is not None and r.before.version == "1.1" and r.before.reason == "before rollback to 1.0 (#1)"
    assert [v.seq for v in history(pol)] == [1, 2, 3]
    rollback(pol, "1.1")
    assert pol.read_bytes() == edited


def test_a_broken_policy_on_disk_is_replaced_and_its_bytes_kept(tmp_path):
    pol = tmp_path / "policy.yaml"
    _write(tmp_path, version="1.0", flag=0.5, seed=1)
    good = pol.read_bytes()
    record(pol, reason="first")
    pol.write_text("name: [broken")
    r = rollback(pol, "#1")
    assert pol.read_bytes() == good and r.before is None and r.restored == ("policy.yaml",)
    kept = tmp_path / HISTORY_DIR / "objects" / r.replaced["policy.yaml"]
    assert kept.read_text() == "name: [broken"
    pol.unlink()  # a deleted policy file comes back too
    rollback(pol, "1.0")
    assert pol.read_bytes() == good


@pytest.mark.parametrize("damage", ["tamper", "remove"])
def test_a_tampered_or_missing_object_is_refused_before_anything_is_written(tmp_path, damage):
    pol = tmp_path / "policy.yaml"
    _write(tmp_path, version="1.0", flag=0.5, seed=1)
    v1 = record(pol, reason="first")
    _write(tmp_path, version="2.0", flag=0.2, seed=2)
    record(pol, reason="second")
    now = _files(tmp_path)
    obj = tmp_path / HISTORY_DIR / "objects" / v1.files["calibrators/green.json"]
    if damage == "tamper":
        obj.write_bytes(obj.read_bytes().replace(b"sigmoid", b"isotonic"))
    else:
        obj.unlink()
    word = "was altered" if damage == "tamper" else "is missing"
    with pytest.raises(ArtifactIntegrityError, match=f"{obj.name}.*calibrators/green.json of #1.*{word}"):
        rollback(pol, "1.0")
    assert _files(tmp_path) == now
    assert len(history(pol)) == 2


def test_a_torn_last_log_line_is_ignored_and_repaired_by_the_next_append(tmp_path):
    pol = tmp_path / "policy.yaml"
    _write(tmp_path, version="1.0", flag=0.5, seed=1)
    record(pol, reason="first")
    log = tmp_path / HISTORY_DIR / "log.jsonl"
    whole = log.read_bytes()
    with open(log, "ab") as f:  # what kill -9 in the middle of an append leaves
        f.write(whole[: len(whole) // 2].replace(b'"seq":1', b'"seq":2'))
    assert [v.seq for v in history(pol)] == [1]
    _write(tmp_path, version="2.0", flag=0.2, seed=2)
    record(pol, reason="second")
    lines = log.read_bytes().splitlines()
    assert [json.loads(x)["reason"] for x in lines] == ["first", "second"]
    assert log.read_bytes().endswith(b"\n")


def test_a_damaged_log_line_in_the_middle_is_refused(tmp_path):
    pol = tmp_path / "policy.yaml"
    _write(tmp_path, version="1.0", flag=0.5, seed=1)
    record(pol, reason="first")
    log = tmp_path / HISTORY_DIR / "log.jsonl"
    good = log.read_bytes()
    for bad in (b"garbage\n", good.replace(b'"policy.yaml":"', b'"../escape.yaml":"')):
        log.write_bytes(bad + good)
        with pytest.raises(ArtifactIntegrityError, match=r"log.jsonl:1: not a policy version record"):
            history(pol)


def test_an_unknown_version_lists_the_recorded_ones(tmp_path):
    pol = tmp_path / "policy.yaml"
    _write(tmp_path, version="1.0", flag=0.5, seed=1)
    record(pol, reason="first")
    _write(tmp_path, version="1.1", flag=0.2, seed=2)
    record(pol, reason="second")
    with pytest.raises(ConfigError, match=r"no recorded version '9.9'; recorded: #1 1.0, #2 1.1"):
        rollback(pol, "9.9")
    with pytest.raises(ConfigError, match="no recorded version '#7'"):
        rollback(pol, "#7")
    assert rollback(pol, 1).target.version == "1.0"  # a number is a sequence number


def test_a_version_string_recorded_with_different_files_must_be_picked_by_number(tmp_path):
    pol = tmp_path / "policy.yaml"
    _write(tmp_path, version="1.0", flag=0.5, seed=1)
    record(pol, reason="first")
    _write(tmp_path, version="1.0", flag=0.2, seed=2)  # edited without a new version string
    record(pol, reason="second")
    with pytest.raises(ConfigError, match="different files.*#1, #2.*pick one by its number"):
        rollback(pol, "1.0")
    assert rollback(pol, "#1").target.seq == 1


def test_what_cannot_be_recorded_says_why(tmp_path):
    with pytest.raises(ConfigError, match="shipped policy has no history"):
        record("default", reason="x")
    with pytest.raises(ConfigError, match="shipped policy"):
        record(builtin_policy_dir() / "strict.yaml", reason="x")
    pol = tmp_path / "policy.yaml"
    _write(tmp_path, version="1.0", flag=0.5, seed=1)
    with pytest.raises(ConfigError, match="reason: must be one line"):
        record(pol, reason="two\nlines")
    with pytest.raises(ConfigError, match="no versions recorded"):
        rollback(pol, "1.0")
    assert history(pol) == []
    (tmp_path / "calibrators" / "green.json").write_text("{}")
    with pytest.raises(ArtifactIntegrityError, match="green.json has sha256 .* but the policy pins"):
        record(pol, reason="x")
    (tmp_path / "policy.yaml").write_text("name: [")
    with pytest.raises(PolicyError):
        record(pol, reason="x")


_RECORDER = """
import sys
from pathlib import Path
from safeclip.versions import record
pol, n = Path(sys.argv[1]), int(sys.argv[2])
text = pol.read_text()
for i in range(n):
    pol.write_text(text.replace('version: "0"', f'version: "{i}"'))
    assert record(pol, reason=f"step {i}").version == str(i)
"""


def test_two_processes_recording_at_once_both_land(tmp_path):
    """Two policy files in one folder share its history log; every version of both lands, none interleaved."""
    _write(tmp_path, version="0", flag=0.5, seed=1)
    text = (tmp_path / "policy.yaml").read_text()
    (tmp_path / "other.yaml").write_text(text.replace("name: mine", "name: other"))
    n = 15
    procs = [subprocess.Popen([sys.executable, "-c", _RECORDER, str(tmp_path / f), str(n)])
             for f in ("policy.yaml", "other.yaml")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    for f in ("policy.yaml", "other.yaml"):
        assert [(v.seq, v.version) for v in history(tmp_path / f)] == [(i + 1, str(i)) for i in range(n)]
    lines = (tmp_path / HISTORY_DIR / "log.jsonl").read_bytes().splitlines()
    assert len(lines) == 2 * n and all(json.loads(x)["format"] == 1 for x in lines)


def test_calibrate_policy_records_the_policy_it_replaces_and_the_one_it_writes(tmp_path):
    from safeclip.calibration import LabeledData, calibrate_policy

    def texts(batch):
        v = np.stack([np.random.default_rng(zlib.crc32(t.encode())).normal(size=16) for t in batch])
        return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)

    rng = np.random.default_rng(0)
    y = (rng.random(800) < 0.3).astype(int)
    x = rng.normal(size=(800, 16)) + 3.0 * y[:, None] * np.eye(16)[0]
    data = LabeledData(x / np.linalg.norm(x, axis=1, keepdims=True), {"drugs": y}, "demo", embed_texts=texts)
    out = tmp_path / "tuned"
    out.mkdir()
    doc = yaml.safe_load((builtin_policy_dir() / "default.yaml").read_text())
    doc["version"] = "0.9-hand"
    (out / "policy.yaml").write_text(yaml.safe_dump(doc))
    hand = (out / "policy.yaml").read_bytes()
    result = calibrate_policy("default", data, ["drugs"], out=out, block_precision=0.8)
    versions = history(out / "policy.yaml")
    assert [v.reason for v in versions] == ["before safeclip calibrate", f"safeclip calibrate on {data.name}"]
    assert versions[1].policy_id == result.policy_id
    assert set(versions[1].files) == {"policy.yaml", "probes/drugs.json", "calibrators/drugs.json"}
    calibrated = _files(out)
    rollback(out / "policy.yaml", "0.9-hand")
    assert (out / "policy.yaml").read_bytes() == hand
    rollback(out / "policy.yaml", result.policy_id.split("@")[1])
    assert {k: _files(out)[k] for k in versions[1].files} == {k: calibrated[k] for k in versions[1].files}


# ------------------------------------------------------------------------------------------------ the photo corpus
def _photo_policy(folder: Path, *, version: str, violence: tuple[float, float | None], seed: int) -> None:
    """A copy of the shipped default policy under its own name, deciding by violence alone (the other categories'
    thresholds null: random weights saturate them), with a fitted violence calibrator beside it."""
    cal = _calibrator(folder / "calibrators" / "violence.json", seed)
    doc = yaml.safe_load((builtin_policy_dir() / "default.yaml").read_text())
    doc.update(name="photos-test", version=version)
    for cat in doc["categories"].values():
        cat["thresholds"] = {"flag": None, "block": None}
    doc["categories"]["violence"].update(thresholds={"flag": violence[0], "block": violence[1]},
                                         calibrator={"path": "calibrators/violence.json", "sha256": cal})
    (folder / "policy.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


def _rollback_on_photos(files: list[str], encoder, tmp_path: Path) -> None:
    from audit_helpers import read, run_audit
    from conftest import assert_same_rows

    from safeclip.audit import rescore

    folder = tmp_path / "pol"
    pol = folder / "policy.yaml"
    _photo_policy(folder, version="1.0", violence=(0.5, None), seed=0)
    v1_files = _files(folder)
    run_audit(files, tmp_path / "v1.parquet", tmp_path / "cache", encoder, policy=pol)
    record(pol, reason="v1")
    rescore(out=tmp_path / "r1.parquet", policy=pol, cache=tmp_path / "cache", from_audit=tmp_path / "v1.parquet",
            verbose=False)

    _photo_policy(folder, version="1.0+rev2", violence=(0.0, 0.0), seed=5)
    record(pol, reason="v2")
    rescore(out=tmp_path / "r2.parquet", policy=pol, cache=tmp_path / "cache", from_audit=tmp_path / "v1.parquet",
            verbose=False)
    v1, r1, r2 = read(tmp_path / "v1.parquet"), read(tmp_path / "r1.parquet"), read(tmp_path / "r2.parquet")
    assert_same_rows(r1, v1)
    assert "block" not in v1.column("action").to_pylist()
    assert {a for a in r2.column("action").to_pylist() if a != "error"} == {"block"}
    assert r2.column("p_violence").to_pylist() != v1.column("p_violence").to_pylist()
    assert set(r2.column("policy").to_pylist()) == {"photos-test@1.0+rev2"}

    rollback(pol, "1.0")
    assert _files(folder) == v1_files
    rescore(out=tmp_path / "r3.parquet", policy=pol, cache=tmp_path / "cache", from_audit=tmp_path / "v1.parquet",
            verbose=False)
    assert_same_rows(read(tmp_path / "r3.parquet"), v1)  # every column, probabilities bit for bit


def test_rollback_restores_byte_identical_decisions_on_the_photo_corpus(photos, tiny_encoder, tmp_path):
    """Audit 40 real photos under policy v1 (a calibrator artifact beside it), record it; record v2 (other
    thresholds, another calibrator) and rescore: the decisions differ; roll back to v1 and rescore: the rows equal
    v1's exactly, and the policy and its artifact are v1's bytes. The model has random weights: these decisions are
    mechanics, not moderation results."""
    _rollback_on_photos([str(p) for p in photos[::max(1, len(photos) // 40)][:40]], tiny_encoder, tmp_path)


@pytest.mark.slow
def test_rollback_restores_byte_identical_decisions_on_the_whole_photo_corpus(photos, tiny_encoder, tmp_path):
    """As above on every photo of the corpus (random weights: mechanics, not moderation results)."""
    _rollback_on_photos([str(p) for p in photos], tiny_encoder, tmp_path)
