"""Batch audits on the tiny random-weight checkpoint: plumbing, exactly-once, resume, cache, parity, rescore, diff.

Random weights are never a moderation result: these tests check that rows are complete, computed once, equal to
what ``Moderator`` gives for the same file, and that re-runs reuse what was committed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import assert_same_rows

from safeclip.audit import AuditSummary, audit, collect_inputs, diff, read_manifest, rescore
from safeclip.cli.audit import main as cli_main
from safeclip.cache import EmbeddingCache
from safeclip.errors import ModelLoadError, SafeclipError

REPO = Path(__file__).resolve().parents[1]
HOOK = "SAFECLIP_AUDIT_TEST_HOOK"

ALL_FLAG_POLICY = """
name: all-flag
version: "1"
scoring:
  logit_scale: 100.0
  templates: ["a photo of {}."]
  neutral: ["a landscape"]
categories:
  test_cat:
    prompts: ["a red ball"]
    contrast: ["a blue cube"]
    thresholds: {flag: 0.0, block: null}
"""


def file_sha(p: Path | str) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def sample(photos, corpus) -> list[str]:
    """Small photos of each format plus animations and an MPO: quick to decode, every code path."""
    by_size = sorted(photos, key=lambda p: p.stat().st_size)
    pick = []
    for exts, k in (({".jpg", ".jpeg"}, 8), ({".png"}, 3), ({".webp"}, 3)):
        pick += [p for p in by_size if p.suffix.lower() in exts][:k]
    tricky = corpus / "tricky"
    pick += [tricky / n for n in ("iss634.gif", "dispose_bgnd.gif", "iss634.webp", "frozenpond.mpo")]
    return [str(p) for p in pick]


@pytest.fixture(scope="module")
def bad_files(corpus) -> list[str]:
    return sorted(str(p) for p in (corpus / "bad").iterdir() if p.is_file())


def run_audit(paths, out, cache, encoder, **kw) -> AuditSummary:
    kw.setdefault("workers", 2)
    kw.setdefault("verbose", False)
    return audit(paths, out=out, cache=cache, encoder=encoder, **kw)


def read(path) -> pa.Table:
    return pq.read_table(path)


# ------------------------------------------------------------------------------------------------ basics
def test_rows_schema_order_and_parity_with_moderator(sample, tiny_encoder, tmp_path):
    from safeclip.moderator import Moderator

    out = tmp_path / "a.parquet"
    s = run_audit(sample, out, tmp_path / "cache", tiny_encoder, batch_size=5)
    t = read(out)
    pol_cats = Moderator(policy="default", encoder=tiny_encoder).policy.category_names
    assert t.column_names == ["path", "sha256", "bytes", "width", "height", "frames", "action",
                              *[f"p_{c}" for c in pol_cats], "error", "encoder_id", "policy"]
    assert t.column("path").to_pylist() == sample  # one row per input, input order
    assert s.rows == len(sample) and s.errors == 0 and s.processed == len(sample) and s.resumed == 0
    assert s.embedded == len(sample) and s.decoded == len(sample) and s.cache_hits == 0
    assert sum(s.actions.values()) == len(sample)
    assert set(t.column("encoder_id").to_pylist()) == {tiny_encoder.encoder_id}
    assert set(t.column("policy").to_pylist()) == {"default@1.0"}
    assert t.column("sha256").to_pylist() == [file_sha(p) for p in sample]
    assert t.column("bytes").to_pylist() == [os.path.getsize(p) for p in sample]
    rows = t.to_pylist()
    assert max(r["frames"] for r in rows) > 1  # animations are in the sample

    # The same file gives the same decision as Moderator.check_many (worst frame of animations included).
    decisions = Moderator(policy="default", encoder=tiny_encoder, on_error="flag").check_many(sample)
    for r, d in zip(rows, decisions):
        assert d.error is None and r["error"] is None
        assert r["action"] == d.action, r["path"]
        assert d.n_frames <= r["frames"]  # sampled frames <= frames in the file
        for c in pol_cats:
            assert r[f"p_{c}"] == pytest.approx(d.categories[c].probability, abs=1e-4)
        assert (r["width"], r["height"]) > (0, 0)


def test_workers_never_import_torch():
    code = ("import sys; import safeclip.audit, safeclip.decode, safeclip.embed; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_warm_cache_rerun_decodes_and_embeds_nothing(sample, bad_files, tiny_encoder, tmp_path):
    cache = tmp_path / "cache"
    inputs = sample + bad_files[:15]
    first = run_audit(inputs, tmp_path / "1.parquet", cache, tiny_encoder)
    assert first.embedded == len(sample) and first.errors == 15
    second = run_audit(inputs, tmp_path / "2.parquet", cache, tiny_encoder)
    # Hash, look up, and only decode misses: a warm cache opens no image, not even the hostile ones.
    assert (second.decoded, second.embedded, second.cache_hits) == (0, 0, len(sample))
    assert_same_rows(read(tmp_path / "1.parquet"), read(tmp_path / "2.parquet"))


def test_identical_files_are_embedded_once(sample, tiny_encoder, tmp_path):
    src = [p for p in sample if p.endswith((".jpg", ".png"))][:3]
    folder = tmp_path / "dups"
    folder.mkdir()
    paths = []
    for i in range(12):
        dst = folder / f"copy{i:02d}{Path(src[i % 3]).suffix}"
        shutil.copyfile(src[i % 3], dst)
        paths.append(str(dst))
    s = run_audit([folder], tmp_path / "d.parquet", tmp_path / "cache", tiny_encoder, batch_size=4)
    assert s.rows == 12 and s.embedded == 3 and s.duplicates + s.cache_hits == 9
    t = read(tmp_path / "d.parquet")
    assert t.column("path").to_pylist() == paths  # walked in sorted order
    by_sha: dict[str, set] = {}
    for r in t.to_pylist():
        by_sha.setdefault(r["sha256"], set()).add(tuple(v for k, v in r.items() if k.startswith("p_")))
    assert len(by_sha) == 3 and all(len(v) == 1 for v in by_sha.values())


def test_hostile_files_become_error_rows_and_the_cli_exits_0(bad_files, tiny_model, tiny_encoder, tmp_path, capsys):
    s = run_audit(bad_files, tmp_path / "bad.parquet", tmp_path / "cache", tiny_encoder)
    t = read(tmp_path / "bad.parquet")
    assert s.rows == len(bad_files) == t.num_rows and s.errors == len(bad_files)
    for r in t.to_pylist():
        assert r["action"] is None and r["error"], r["path"]
        kind, _, reason = r["error"].partition(": ")
        assert kind.endswith("Error") and reason, r["error"]  # e.g. "TruncatedImageError: PNG image is truncated"
    assert s.worker_restarts == 0
    # Through the command line: per-file failures are rows, the audit itself succeeded.
    code = cli_main(["audit", *bad_files[:10], "--out", str(tmp_path / "cli.parquet"), "--model", tiny_model,
                     "--cache", str(tmp_path / "cache"), "--no-progress"])
    assert code == 0
    assert "errors 10" in capsys.readouterr().err


def test_a_worker_that_dies_or_hangs_is_replaced_and_the_file_reported(sample, tiny_encoder, tmp_path,
                                                                       monkeypatch):
    names = [os.path.basename(p) for p in sample]
    hook = {"crash": [names[1]], "abort": [names[4]], "hang": [names[7]]}
    monkeypatch.setenv(HOOK, json.dumps(hook))
    s = run_audit(sample, tmp_path / "c.parquet", tmp_path / "cache", tiny_encoder, task_timeout=3)
    rows = {os.path.basename(r["path"]): r for r in read(tmp_path / "c.parquet").to_pylist()}
    assert len(rows) == len(sample)
    assert "WorkerCrash" in rows[names[1]]["error"] and "exit code 70" in rows[names[1]]["error"]
    assert "WorkerCrash" in rows[names[4]]["error"] and "SIGABRT" in rows[names[4]]["error"]
    assert "WorkerTimeout" in rows[names[7]]["error"]
    others = [r for n, r in rows.items() if n not in {names[1], names[4], names[7]}]
    assert all(r["error"] is None and r["action"] for r in others)
    assert s.errors == 3 and s.worker_restarts == 5  # crash and abort retried once each, the hang killed once


# ------------------------------------------------------------------------------------------------ inputs
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


# ------------------------------------------------------------------------------------------------ resume
def test_kill_9_mid_run_then_rerun_gives_every_input_once_without_recomputing(sample, photos, tiny_model,
                                                                              tiny_encoder, tmp_path):
    inputs = sample + [str(p) for p in sorted(photos, key=lambda p: p.stat().st_size)[14:40]]
    inputs = list(dict.fromkeys(inputs))
    out, cache = tmp_path / "r.parquet", tmp_path / "cache"
    parts_dir = tmp_path / "r.parquet.parts"
    cmd = [sys.executable, "-m", "safeclip.cli.audit", "audit", *inputs, "--out", str(out), "--model", tiny_model,
           "--cache", str(cache), "--workers", "1", "--batch-size", "2", "--part-rows", "2", "--no-progress"]
    env = dict(os.environ, **{HOOK: json.dumps({"delay": 0.15})})  # slow decoding down: the kill lands mid-run
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list(parts_dir.glob("part-*.parquet"))) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stderr.close()
    assert len(list(parts_dir.glob("part-*.parquet"))) >= 2, "no part was committed within 120 s"
    assert not out.exists()
    committed = pa.concat_tables([read(p) for p in sorted(parts_dir.glob("part-*.parquet"))])
    done = committed.column("path").to_pylist()
    assert 2 <= len(done) < len(inputs) and len(set(done)) == len(done)
    shas = {p: file_sha(p) for p in inputs}
    with EmbeddingCache(cache, tiny_encoder.encoder_id) as db:
        cached_before = set(db.get_many(shas.values()))
    assert {shas[p] for p in done} <= cached_before  # rows are committed only after their embeddings

    s = run_audit(inputs, out, cache, tiny_encoder, batch_size=2)
    todo = [p for p in inputs if p not in set(done)]
    expected_new = {shas[p] for p in todo} - cached_before
    assert s.resumed == len(done) and s.processed == len(todo)
    assert s.embedded == len(expected_new) and s.decoded == len(expected_new)
    assert s.cache_hits == len(todo) - len(expected_new)
    t = read(out)
    assert t.column("path").to_pylist() == inputs  # every input exactly once, in order
    assert not parts_dir.exists()
    final = {r["path"]: r for r in t.to_pylist()}
    for r in committed.to_pylist():  # committed rows were kept as they were
        assert final[r["path"]] == r

    # Re-running a finished audit starts a fresh one, served entirely by the cache.
    again = run_audit(inputs, out, cache, tiny_encoder)
    assert again.decoded == 0 and again.embedded == 0
    assert_same_rows(read(out), t)


def test_parts_of_another_policy_are_not_reused(sample, tiny_encoder, tmp_path):
    out, cache = tmp_path / "o.parquet", tmp_path / "cache"
    parts = tmp_path / "o.parquet.parts"
    parts.mkdir()
    (parts / "run.json").write_text(json.dumps({"policy": "something-else"}))
    pq.write_table(pa.table({"path": [sample[0]]}), parts / "part-000000.parquet")
    s = run_audit(sample[:3], out, cache, tiny_encoder)
    assert s.resumed == 0 and read(out).num_rows == 3


# ------------------------------------------------------------------------------------------------ rescore / diff
@pytest.fixture(scope="module")
def audited(sample, bad_files, tiny_encoder, tmp_path_factory):
    """One audit under the default policy (with saved embeddings), its cache, and a fresh audit under strict."""
    d = tmp_path_factory.mktemp("audited")
    inputs = sample + bad_files[:3]
    run_audit(inputs, d / "default.parquet", d / "cache", tiny_encoder, save_embeddings=True)
    s = run_audit(inputs, d / "strict.parquet", d / "cache", tiny_encoder, policy="strict")
    assert s.embedded == 0  # warm cache
    return d, inputs


def test_rescore_from_an_audit_equals_a_fresh_audit_under_the_new_policy(audited):
    d, inputs = audited
    s = rescore(out=d / "re.parquet", policy="strict", cache=d / "cache", from_audit=d / "default.parquet",
                verbose=False)
    fresh, re = read(d / "strict.parquet"), read(d / "re.parquet")
    assert s.rows == len(inputs) and s.errors == 3 and s.decoded == s.embedded == 0
    assert_same_rows(re, fresh)

    # From the embeddings saved in the audit output: no cache needed.
    s2 = rescore(out=d / "re2.parquet", policy="strict", cache=d / "cache", embeddings=d / "default.parquet",
                 verbose=False)
    assert s2.rows == len(inputs)
    assert_same_rows(read(d / "re2.parquet"), fresh, ignore=("embedding",))


def test_rescore_the_whole_cache(audited):
    d, inputs = audited
    fresh = {r["sha256"]: r for r in read(d / "strict.parquet").to_pylist() if r["error"] is None}
    s = rescore(out=d / "all.parquet", policy="strict", cache=d / "cache", verbose=False)
    rows = read(d / "all.parquet").to_pylist()
    assert s.rows == len(rows) == len(fresh)
    assert all(r["path"] is None for r in rows)
    mine = pa.Table.from_pylist(rows).drop_columns(["path"])
    theirs = pa.Table.from_pylist([fresh[r["sha256"]] for r in rows]).drop_columns(["path"])
    assert_same_rows(mine, theirs)


def test_rescore_with_uncached_prompts_needs_the_model(audited, tiny_model, tmp_path):
    d, _ = audited
    pol = tmp_path / "new.yaml"
    pol.write_text(ALL_FLAG_POLICY.replace("a red ball", "a never embedded prompt"))
    with pytest.raises(ModelLoadError, match="--model"):
        rescore(out=tmp_path / "x.parquet", policy=pol, cache=d / "cache", from_audit=d / "default.parquet",
                verbose=False)
    s = rescore(out=tmp_path / "x.parquet", policy=pol, cache=d / "cache", from_audit=d / "default.parquet",
                model=tiny_model, verbose=False)
    assert s.actions["flag"] == s.rows - s.errors
    # Embedded once: now it is cached and the model is not needed any more.
    rescore(out=tmp_path / "y.parquet", policy=pol, cache=d / "cache", from_audit=d / "default.parquet",
            verbose=False)
    assert_same_rows(read(tmp_path / "x.parquet"), read(tmp_path / "y.parquet"))


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


# ------------------------------------------------------------------------------------------------ exit codes
def test_fail_on_and_usage_exit_codes(sample, bad_files, tiny_model, tmp_path, capsys):
    pol = tmp_path / "all-flag.yaml"
    pol.write_text(ALL_FLAG_POLICY)
    base = ["--model", tiny_model, "--cache", str(tmp_path / "cache"), "--policy", str(pol), "--no-progress"]
    good = sample[:3]

    def run(*args: str) -> int:
        return cli_main(["audit", *args, *base])

    assert run(*good, "--out", str(tmp_path / "a.parquet")) == 0
    assert run(*good, "--out", str(tmp_path / "b.parquet"), "--fail-on", "flag") == 1
    assert run(*good, "--out", str(tmp_path / "c.parquet"), "--fail-on", "block") == 0
    assert run(*good, "--out", str(tmp_path / "d.parquet"), "--fail-on", "error") == 0
    assert run(*good, bad_files[0], "--out", str(tmp_path / "e.parquet"), "--fail-on", "error") == 1
    assert run(*good, bad_files[0], "--out", str(tmp_path / "f.parquet"), "--fail-on", "block") == 1  # fail closed
    # Usage and configuration errors: exit 2.
    assert run("--out", str(tmp_path / "g.parquet")) == 2  # no inputs
    assert cli_main(["audit", *good, "--out", str(tmp_path / "h.parquet"), "--policy",
                     str(tmp_path / "nope.yaml"), "--model", tiny_model]) == 2
    with pytest.raises(SystemExit) as e:
        cli_main(["audit", *good])  # --out is required
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        cli_main(["audit", *good, "--out", "x.parquet", "--fail-on", "sometimes"])
    assert e.value.code == 2
    capsys.readouterr()
    # rescore: the same --fail-on, and a cache without this encoder is a configuration error.
    assert cli_main(["rescore", "--from", str(tmp_path / "e.parquet"), "--cache", str(tmp_path / "cache"),
                     "--policy", str(pol), "--out", str(tmp_path / "r.parquet"), "--fail-on", "error"]) == 1
    assert cli_main(["rescore", "--cache", str(tmp_path / "nothing"), "--out", str(tmp_path / "r2.parquet")]) == 2


def test_summary_fail_levels():
    s = AuditSummary(out="x", rows=3, actions={"allow": 2, "flag": 1, "block": 0}, errors=0, processed=3,
                     resumed=0, decoded=3, embedded=3, cache_hits=0, duplicates=0, worker_restarts=0, seconds=1.0,
                     startup_seconds=0.5, images_per_s=3.0, encoder_id="e", policy="p")
    assert s.fails("flag") and not s.fails("block") and not s.fails("error") and not s.fails(None)
    with pytest.raises(ValueError):
        s.fails("allow")
    assert "flag 1" in s.format()


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
