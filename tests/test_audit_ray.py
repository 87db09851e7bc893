"""The audit on Ray Data (``engine="ray"``), on a local Ray runtime: parity with the local engine, resumption,
failures, hostile files.

Random weights are never a moderation result: these tests check that the Ray engine writes the same rows (same
decisions, same probabilities, same error rows) as the local engine for the same files, exactly once, and resumes.
Every run has a stall timeout and every test a hard timeout, so a hang fails instead of blocking CI.
"""

from __future__ import annotations

import faulthandler
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import assert_same_rows as _assert_same_rows

from safeclip.audit import AuditSummary, audit, diff, rescore
from safeclip.cli.audit import main as cli_main
from safeclip.cache import EmbeddingCache
from safeclip.errors import EngineError, EngineUnavailableError, SafeclipError

REPO = Path(__file__).resolve().parents[1]
HOOK = "SAFECLIP_AUDIT_TEST_HOOK"
TEST_TIMEOUT_S = 240
STALL_S = 90  # Ray Data's no-progress timeout and the wait for the model, per run

pytestmark = [pytest.mark.ray, pytest.mark.slow]
if importlib.util.find_spec("pytest_timeout") is not None:
    pytestmark.append(pytest.mark.timeout(TEST_TIMEOUT_S))


@pytest.fixture(autouse=True)
def _hang_guard():
    """Without pytest-timeout too: a test stuck past its limit dumps every thread's stack and ends the run."""
    faulthandler.dump_traceback_later(TEST_TIMEOUT_S + 60, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def ray_runtime():
    """A local Ray runtime for this module: 4 logical CPUs on any box (the model actor takes half a CPU, so the
    decode tasks always have slots), a 256 MiB object store (Ray's default is 30% of RAM in /dev/shm), no
    dashboard. Ray 2.60 maps a loopback ``_node_ip_address`` back to the node's address and listens on every
    interface whatever one asks; its token authentication (on by default) guards those ports."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'safeclip[ray]')")
    pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'safeclip[ray]')")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, object_store_memory=256 * 2**20, include_dashboard=False, log_to_driver=False,
                 ignore_reinit_error=True, logging_level="warning")
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def files(photos, corpus) -> dict[str, list[str]]:
    """8 small real photos (JPEG, PNG, WebP), an animation, hostile files of several kinds, a missing file."""
    by_size = sorted(photos, key=lambda p: p.stat().st_size)
    good: list[Path] = []
    for exts, k in (({".jpg", ".jpeg"}, 4), ({".png"}, 2), ({".webp"}, 2)):
        good += [p for p in by_size if p.suffix.lower() in exts][:k]
    good.append(corpus / "tricky" / "iss634.gif")
    bad_dir = corpus / "bad"
    wanted = ["broken.png", "badwidth.bmp", "1_second_imagedata.eps", "chunk_no_fctl.png"]
    bad = [bad_dir / n for n in wanted if (bad_dir / n).is_file()]
    bad += sorted(p for p in bad_dir.iterdir() if p.is_file() and p not in bad)[: 4 - len(bad)]
    return {"good": [str(p) for p in good], "bad": [str(p) for p in bad],
            "missing": [str(corpus / "photos" / "no-such-photo.jpg")]}


def ray_audit(paths, out, cache, model, **kw) -> AuditSummary:
    opts = {"stall_timeout": STALL_S, **kw.pop("ray_options", {})}
    kw.setdefault("verbose", False)
    kw.setdefault("device", "cpu")
    return audit(paths, out=out, cache=cache, model=model, engine="ray", ray_options=opts, **kw)


def seeded_cache(src: Path, dst: Path) -> Path:
    """A fresh embedding cache that already knows the encoder and the policy's prompts (as after any first run),
    so that a run starts no model-probing actor; the actors still check the remembered identity."""
    dst.mkdir(parents=True)
    shutil.copy(src / "encoders.json", dst / "encoders.json")
    shutil.copytree(src / "text", dst / "text")
    return dst


def assert_same_rows(a: pa.Table, b: pa.Table) -> None:
    """Same columns, metadata and rows; probabilities equal up to float32 rounding of another batch layout."""
    _assert_same_rows(a, b, atol=1e-5, metadata=True)


def committed_paths(parts_dir: Path) -> list[str]:
    return [p for f in sorted(parts_dir.glob("part-*.parquet"))
            for p in pq.read_table(f, columns=["path"]).column("path").to_pylist()]


# ------------------------------------------------------------------------------------------------ parity
@pytest.fixture(scope="module")
def parity(ray_runtime, files, tiny_model, tiny_encoder, tmp_path_factory):
    """The same inputs through both engines; the Ray run starts from an empty cache (it probes the model)."""
    d = tmp_path_factory.mktemp("parity")
    inputs = files["good"] + files["bad"] + files["missing"]
    local = audit(inputs, out=d / "local.parquet", cache=d / "local-cache", encoder=tiny_encoder, workers=2,
                  save_embeddings=True, verbose=False)
    remote = ray_audit(inputs, d / "ray.parquet", d / "ray-cache", tiny_model, part_rows=4, batch_size=4,
                       save_embeddings=True, ray_options={"decode_batch": 3})
    return d, inputs, local, remote


def test_parity_with_the_local_engine(parity, files, tiny_encoder):
    d, inputs, local, remote = parity
    a, b = pq.read_table(d / "local.parquet"), pq.read_table(d / "ray.parquet")
    assert b.column("path").to_pylist() == inputs  # one row per input, input order
    assert_same_rows(a.drop_columns(["embedding"]), b.drop_columns(["embedding"]))
    for ea, eb in zip(a.column("embedding").to_pylist(), b.column("embedding").to_pylist()):
        assert (ea is None) == (eb is None)
        if ea is not None:
            np.testing.assert_allclose(ea, eb, rtol=0, atol=1e-5)
    n_good, n_err = len(files["good"]), len(files["bad"]) + len(files["missing"])
    for s in (local, remote):
        assert (s.rows, s.errors, s.processed, s.resumed) == (len(inputs), n_err, len(inputs), 0)
        assert s.embedded == n_good and s.cache_hits == 0 and sum(s.actions.values()) == n_good
    assert remote.actions == local.actions and remote.encoder_id == tiny_encoder.encoder_id
    assert max(b.column("frames").to_pylist(), key=lambda v: v or 0) > 1  # the animation's worst frame decided
    assert not (d / "ray.parquet.parts").exists()
    # The local engine's tools read it: no action differs, and a re-score from its cache equals the local one's.
    assert diff(d / "local.parquet", d / "ray.parquet").num_rows == 0
    rescore(out=d / "re-local.parquet", policy="strict", cache=d / "local-cache", from_audit=d / "local.parquet",
            verbose=False)
    s = rescore(out=d / "re-ray.parquet", policy="strict", cache=d / "ray-cache", from_audit=d / "ray.parquet",
                verbose=False)
    assert s.rows == len(inputs) and s.errors == n_err  # every embedding of the Ray run is in the cache
    assert_same_rows(pq.read_table(d / "re-local.parquet"), pq.read_table(d / "re-ray.parquet"))


def test_corrupt_and_missing_files_are_error_rows(parity, files):
    d, _, _, remote = parity
    rows = {r["path"]: r for r in pq.read_table(d / "ray.parquet").to_pylist()}
    local = {r["path"]: r for r in pq.read_table(d / "local.parquet").to_pylist()}
    for p in files["bad"] + files["missing"]:
        r = rows[p]
        assert r["action"] == "error" and r["embedding"] is None, p
        kind, _, reason = r["error"].partition(": ")
        assert kind.endswith("Error") and reason, r["error"]
        assert r["error"] == local[p]["error"]  # the same decode path, the same message
        assert all(r[k] is None for k in r if k.startswith("p_"))
    assert "file not found" in rows[files["missing"][0]]["error"]
    assert all(rows[p]["error"] is None and rows[p]["action"] for p in files["good"])
    assert remote.worker_restarts == 0


# ------------------------------------------------------------------------------------------------ resume
def test_resume_after_the_driver_dies_skips_committed_shards(parity, files, tiny_model, ray_runtime, tmp_path):
    """A separate driver joins this Ray runtime with --address and dies (os._exit, as kill -9) right after its
    second committed shard; the re-run decodes only the inputs of the other shards and writes each input once."""
    d, *_ = parity
    inputs = files["good"][:8]
    out, cache = tmp_path / "r.parquet", seeded_cache(d / "ray-cache", tmp_path / "cache")
    parts_dir = tmp_path / "r.parquet.parts"
    address = ray_runtime.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "safeclip.cli.audit", "audit", *inputs, "--out", str(out), "--model", tiny_model,
           "--device", "cpu", "--cache", str(cache), "--engine", "ray", "--address", address, "--part-rows", "2",
           "--batch-size", "2", "--no-progress"]
    env = dict(os.environ, **{HOOK: json.dumps({"driver_exit_after_shards": 2})})
    proc = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=TEST_TIMEOUT_S - 60)
    assert proc.returncode == 75, proc.stderr[-3000:]
    assert not out.exists()
    committed = pa.concat_tables([pq.read_table(f) for f in sorted(parts_dir.glob("part-*.parquet"))])
    done = committed.column("path").to_pylist()
    shards = {inputs.index(p) // 2 for p in done}
    assert len(shards) == 2 and sorted(done, key=inputs.index) == [p for p in inputs if inputs.index(p) // 2 in shards]
    (encoder_id,) = set(committed.column("encoder_id").to_pylist())
    with EmbeddingCache(cache, encoder_id) as db:  # rows are committed only after their embeddings
        assert set(committed.column("sha256").to_pylist()) <= set(db.get_many(committed.column("sha256").to_pylist()))

    record = tmp_path / "record"
    record.mkdir()
    os.environ[HOOK] = json.dumps({"record": str(record)})
    try:
        s = ray_audit(inputs, out, cache, tiny_model, part_rows=2, batch_size=2)
    finally:
        del os.environ[HOOK]
    todo = [p for p in inputs if p not in done]
    seen = [line for f in record.glob("*.txt") for line in f.read_text().splitlines()]
    assert sorted(seen) == sorted(todo)  # committed shards were not read, decoded or embedded again
    assert (s.resumed, s.processed, s.decoded + s.cache_hits) == (len(done), len(todo), len(todo))
    t = pq.read_table(out)
    assert t.column("path").to_pylist() == inputs and not parts_dir.exists()  # every input exactly once
    final = {r["path"]: r for r in t.to_pylist()}
    for r in committed.to_pylist():
        r.pop("mtime_ns", None)  # a parts-only column, for resuming
        assert final[r["path"]] == r  # committed rows kept as they were


def test_a_failing_task_stops_the_run_cleanly_and_the_rerun_completes(parity, files, tiny_model, monkeypatch,
                                                                      tmp_path):
    d, *_ = parity
    inputs = files["good"][:6]
    out, cache = tmp_path / "f.parquet", seeded_cache(d / "ray-cache", tmp_path / "cache")
    parts_dir = tmp_path / "f.parquet.parts"
    last = os.path.basename(inputs[-1])
    monkeypatch.setenv(HOOK, json.dumps({"fail": {"names": [last], "after_parts": [str(parts_dir), 1],
                                                  "wait_s": 60}}))
    with pytest.raises(EngineError, match="run the same command again to resume") as e:
        ray_audit(inputs, out, cache, tiny_model, part_rows=2, batch_size=2, ray_options={"decode_batch": 2})
    assert f"injected failure on {last}" in str(e.value)
    done = committed_paths(parts_dir)
    assert done and inputs[-1] not in done and len(done) == len(set(done))
    monkeypatch.delenv(HOOK)
    s = ray_audit(inputs, out, cache, tiny_model, part_rows=2, batch_size=2, ray_options={"decode_batch": 2})
    assert s.resumed == len(done) and s.processed == len(inputs) - len(done)
    assert pq.read_table(out).column("path").to_pylist() == inputs


# ------------------------------------------------------------------------------------------------ dying workers
def test_a_decode_worker_that_dies_is_retried_and_a_file_that_kills_or_hangs_it_is_an_error_row(
        parity, files, tiny_model, monkeypatch, tmp_path):
    d, *_ = parity
    inputs = files["good"]
    names = [os.path.basename(p) for p in inputs]
    hook = {"exit_once": {"names": [names[0]], "marker": str(tmp_path / "markers")}, "crash": [names[3]],
            "hang": [names[5]]}
    monkeypatch.setenv(HOOK, json.dumps(hook))
    s = ray_audit(inputs, tmp_path / "w.parquet", seeded_cache(d / "ray-cache", tmp_path / "cache"), tiny_model,
                  part_rows=3, task_timeout=3, ray_options={"decode_batch": 3})
    rows = pq.read_table(tmp_path / "w.parquet").to_pylist()
    assert [r["path"] for r in rows] == inputs
    by_name = dict(zip(names, rows))
    assert by_name[names[0]]["error"] is None and by_name[names[0]]["action"]  # died once, decoded on the retry
    assert by_name[names[3]]["error"].startswith("WorkerCrash: ") and "2 times" in by_name[names[3]]["error"]
    assert by_name[names[5]]["error"].startswith("WorkerTimeout: ")
    assert all(r["error"] is None for n, r in by_name.items() if n not in {names[3], names[5]})
    assert s.errors == 2 and s.worker_restarts == 4  # exit once, crash twice, hang once
    ref = {r["path"]: r for r in pq.read_table(d / "ray.parquet").to_pylist()}
    for r in rows:
        if r["error"] is None:
            assert r["action"] == ref[r["path"]]["action"] and r["sha256"] == ref[r["path"]]["sha256"]


# ------------------------------------------------------------------------------------------------ CLI, encoder memo
def test_cli_with_a_stale_encoder_memo(parity, files, tiny_model, tmp_path, capsys):
    """``--engine ray`` from the command line, remembering an identity that no longer matches the weights: the
    actors refuse it before any row is committed, and the audit learns the real one and starts over."""
    d, *_ = parity
    inputs = files["good"][:4]
    cache = seeded_cache(d / "ray-cache", tmp_path / "cache")
    import dataclasses

    from safeclip.audit.identity import EncoderIdentity

    memo_file = cache / "encoders.json"
    (key, real), = json.loads(memo_file.read_text()).items()
    remembered = EncoderIdentity.recall(cache, key)
    assert remembered is not None
    # A stale entry this user signed (weights changed since it was written): believed, then refused by the actors.
    stale = dataclasses.replace(remembered, spec=dataclasses.replace(remembered.spec, size=32))
    stale.remember(cache, key)
    assert EncoderIdentity.recall(cache, key) == stale
    args = [*inputs, "--model", tiny_model, "--device", "cpu", "--cache", str(cache), "--no-progress"]
    assert cli_main(["audit", *args, "--engine", "ray", "--out", str(tmp_path / "a.parquet")]) == 0
    assert "safeclip audit (ray): 4 rows" in capsys.readouterr().err
    assert json.loads(memo_file.read_text())[key] == real
    ref = pq.read_table(d / "ray.parquet").slice(0, 4).replace_schema_metadata(None)
    got = pq.read_table(tmp_path / "a.parquet")
    saved = ["embedding", "embedding_backgrounds", "embedding_pdq", "embedding_pdq_quality", "embedding_times"]
    assert_same_rows(ref.drop_columns(saved), got.replace_schema_metadata(None))
    # Usage errors exit 2.
    assert cli_main(["audit", *args, "--out", str(tmp_path / "c.parquet"), "--address", "auto"]) == 2
    assert "--address needs --engine ray" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli_main(["audit", *args, "--out", str(tmp_path / "c.parquet"), "--engine", "spark"])
    assert e.value.code == 2


def test_without_ray_the_error_says_how_to_install_it(monkeypatch, tmp_path):
    from safeclip.audit import ray as audit_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(EngineUnavailableError, match=r"pip install 'safeclip\[ray\]'"):
        audit_ray.import_ray()
    with pytest.raises(SafeclipError, match="engine must be 'local' or 'ray'"):
        audit([str(tmp_path / "x.jpg")], out=tmp_path / "x.parquet", engine="spark")
