"""The local engine on the tiny random-weight checkpoint: complete rows in input order, parity with ``Moderator``,
a warm cache, and the encoder a policy names.

Random weights are never a moderation result: these tests check that rows are complete, computed once, equal to
what ``Moderator`` gives for the same file, and that re-runs reuse what was committed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from audit_helpers import ALL_FLAG_POLICY, bad_files, file_sha, read, run_audit, sample  # noqa: F401
from conftest import assert_same_rows
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safeclip.audit import audit
from safeclip.audit.writer import read_meta


def test_rows_schema_order_and_parity_with_moderator(sample, tiny_encoder, tmp_path):
    from safeclip.moderator import Moderator

    out = tmp_path / "a.parquet"
    s = run_audit(sample, out, tmp_path / "cache", tiny_encoder, batch_size=5)
    t = read(out)
    pol_cats = Moderator(policy="default", encoder=tiny_encoder).policy.category_names
    assert t.column_names == ["path", "path_bytes", "sha256", "bytes", "width", "height", "frames", "background",
                              "action",
                              *[f"p_{c}" for c in pol_cats], "error", "encoder_id", "policy", "pdq", "pdq_quality",
                              "matches", "frames_scored", "time_s", "duration_s", "sampling", "segments"]
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


def test_warm_cache_rerun_decodes_and_embeds_nothing(sample, bad_files, tiny_encoder, tmp_path):
    cache = tmp_path / "cache"
    inputs = sample + bad_files[:15]
    first = run_audit(inputs, tmp_path / "1.parquet", cache, tiny_encoder)
    assert first.embedded == len(sample) and first.errors == 15
    second = run_audit(inputs, tmp_path / "2.parquet", cache, tiny_encoder)
    # Hash, look up, and only decode misses: a warm cache opens no image, not even the hostile ones.
    assert (second.decoded, second.embedded, second.cache_hits) == (0, 0, len(sample))
    assert_same_rows(read(tmp_path / "1.parquet"), read(tmp_path / "2.parquet"))


def test_the_policys_encoder_is_used_when_the_caller_names_none(sample, tiny_model, tiny_encoder, monkeypatch,
                                                                 tmp_path):
    monkeypatch.delenv("SAFECLIP_MODEL", raising=False)
    monkeypatch.delenv("SAFECLIP_PRETRAINED", raising=False)
    pol = tmp_path / "tiny.yaml"
    pol.write_text(ALL_FLAG_POLICY + f"encoder: {{model: {tiny_model!r}}}\n")
    cache = tmp_path / "cache"
    s = audit(sample[:2], out=tmp_path / "a.parquet", policy=pol, cache=cache, workers=1, verbose=False)
    t = read(tmp_path / "a.parquet")
    assert s.encoder_id == tiny_encoder.encoder_id and set(t.column("encoder_id").to_pylist()) == {s.encoder_id}
    meta = read_meta(t.schema)
    assert meta["encoder_chosen_by"] == "policy" and meta["encoder_id"] == s.encoder_id
    # The caller's model wins over the policy's, and the metadata says so.
    pol.write_text(ALL_FLAG_POLICY + "encoder: {model: ViT-L-14, pretrained: openai}\n")
    s = audit(sample[:2], out=tmp_path / "b.parquet", policy=pol, model=tiny_model, cache=cache, workers=1,
              verbose=False)
    t = read(tmp_path / "b.parquet")
    assert s.encoder_id == tiny_encoder.encoder_id and read_meta(t.schema)["encoder_chosen_by"] == "caller"


_NAME = st.binary(min_size=1, max_size=40).filter(lambda b: b"/" not in b and b"\0" not in b
                                                  and b not in (b".", b".."))


@pytest.mark.slow
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.lists(_NAME, min_size=1, max_size=5, unique=True), data=st.data())
def test_any_file_name_the_filesystem_allows_becomes_exactly_one_row(names, data, sample, tiny_encoder, tmp_path):
    """9.4: random byte strings as file names (not UTF-8 among them): one row each, the raw name kept losslessly
    (``path_bytes``, else ``path``), and a rerun of the same audit works the same."""
    import shutil
    import tempfile

    from safeclip.audit.reader import path_text

    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    raw_dir = os.fsencode(folder)
    for i, name in enumerate(names):
        target = os.path.join(raw_dir, name)
        if data.draw(st.booleans(), label=f"image {i}"):
            shutil.copyfile(sample[i % len(sample)], target)
        else:
            with open(target, "wb") as f:
                f.write(b"junk")
    listed = [os.fsdecode(os.path.join(raw_dir, n)) for n in names]
    out = folder / "o.parquet"
    run_audit(listed, out, tmp_path / "cache", tiny_encoder, workers=1)
    rows = read(out).to_pylist()
    assert len(rows) == len(names)
    for r, name in zip(rows, names):
        raw = r["path_bytes"] if r["path_bytes"] is not None else r["path"].encode()
        assert raw == os.path.join(raw_dir, name)
        assert r["path"] == path_text(os.fsdecode(raw))
        assert (r["error"] is None) == (r["action"] in ("allow", "flag", "block"))
    run_audit([os.fsdecode(folder)], folder / "again.parquet", tmp_path / "cache", tiny_encoder, workers=1,
              include_all=True)  # the folder walk too (it also holds o.parquet)
    assert len(read(folder / "again.parquet")) == len(names) + 1


@pytest.mark.slow
def test_the_model_is_loaded_only_when_a_file_needs_it(sample, tiny_model, tmp_path):
    """10.15: "loading model" is said on stderr; a re-run whose inputs are all cache hits or errors never loads
    the model (nor imports torch); one new file loads it, and its row is embedded, still without torch (the ONNX
    runtime's export and the prompts are cached: issue 11's warm path). Run with ``python -c`` (10.1)."""
    import subprocess
    import sys

    cache = tmp_path / "cache"

    def run(paths, out):
        code = (f"import sys\nfrom safeclip.audit import audit\n"
                f"s = audit({paths!r}, out={str(tmp_path / out)!r}, model={tiny_model!r}, cache={str(cache)!r}, "
                f"workers=1, device='cpu', progress=False)\n"
                f"print('TORCH', 'torch' in sys.modules, s.embedded, s.cache_hits, s.errors, s.rows)\n")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                              cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout.strip().splitlines()[-1].split()[1:], proc.stderr

    missing = str(tmp_path / "missing.jpg")
    first, err = run(sample[:3] + [missing], "a.parquet")
    assert first == ["True", "3", "0", "1", "4"] and "loading model" in err
    again, err = run(sample[:3] + [missing], "b.parquet")
    assert again == ["False", "0", "3", "1", "4"] and "loading model" not in err
    more, err = run(sample[:4], "c.parquet")
    assert more == ["False", "1", "3", "0", "4"] and "loading model" in err
    assert_same_rows(read(tmp_path / "a.parquet").slice(0, 3), read(tmp_path / "b.parquet").slice(0, 3))


@pytest.mark.slow
def test_a_wrong_remembered_identity_is_caught_when_the_model_loads_late(sample, tiny_model, tmp_path):
    """The late-loaded model has the last word: a remembered identity that is wrong (its prompts cached too)
    restarts the run under the real one; nothing of the wrong guess reaches the output."""
    import hashlib
    import json
    import shutil

    from safeclip.audit.identity import MEMO_FILE

    cache = tmp_path / "cache"
    kw = {"model": tiny_model, "cache": cache, "workers": 1, "device": "cpu", "verbose": False}
    real = audit(sample[:1], out=tmp_path / "a.parquet", **kw).encoder_id
    memo = json.loads((cache / MEMO_FILE).read_text())
    (entry,) = memo.values()
    entry["encoder_id"] = "wrong|guess"
    (cache / MEMO_FILE).write_text(json.dumps(memo))

    def prompts(enc_id):
        return cache / "text" / f"{hashlib.sha256(enc_id.encode()).hexdigest()[:24]}.npz"

    shutil.copyfile(prompts(real), prompts("wrong|guess"))
    s = audit(sample[:3], out=tmp_path / "b.parquet", **kw)
    t = read(tmp_path / "b.parquet")
    assert s.encoder_id == real and set(t.column("encoder_id").to_pylist()) == {real}
    assert t.num_rows == 3 and t.column("error").null_count == 3
    assert json.loads((cache / MEMO_FILE).read_text())[next(iter(memo))]["encoder_id"] == real
