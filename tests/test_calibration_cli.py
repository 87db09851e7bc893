"""``safeclip calibrate`` / ``safeclip eval`` on known-answer data, and on real files through the tiny checkpoint.

The labelled embeddings come from calibration_known.sample (the prompt signal alone is informative but weak, a probe
plus the prompt is strong, and a fresh sample tells whether the chosen thresholds keep their promise). The photos run
through the tiny random-weight checkpoint only to exercise the embedding path and the cache: nothing they produce is
a moderation result. The workflow under the commands is tested from Python in test_calibration_workflow.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from calibration_known import (  # noqa: F401 (fixtures: one_blas_thread, policy_file, synth, train_file, work)
    N_TRAIN,
    TARGET_PRECISION,
    TARGET_RECALL,
    one_blas_thread,
    policy_file,
    sample,
    synth,
    train_file,
    work,
    write_parquet,
)
from sklearn.metrics import roc_auc_score

from safeclip import Moderator, load_policy
from safeclip.artifacts import sha256_file
from safeclip.cache import EmbeddingCache
from safeclip.cli import main
from safeclip.errors import ArtifactIntegrityError


def run(*argv: str) -> tuple[int, str, str]:
    """``safeclip ARGV`` in this process: (exit code, stdout, stderr); argparse exits count as exit codes."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(argv))
        except SystemExit as e:
            rc = int(e.code or 0)
    return rc, out.getvalue(), err.getvalue()



# ------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def calibrated(work: Path, policy_file: Path, train_file: Path, cache_dir: Path) -> dict:
    out = work / "out"
    rc, stdout, stderr = run("calibrate", "--policy", str(policy_file), "--data", str(train_file),
                             "--category", "weapons", "--category", "drugs", "--block-precision",
                             str(TARGET_PRECISION), "--flag-recall", str(TARGET_RECALL), "--cache", str(cache_dir),
                             "--out", str(out))
    assert rc == 0, stderr
    return {"out": out, "stdout": stdout, "stderr": stderr,
            "summary": json.loads((out / "calibration.json").read_text())}



# ---------------------------------------------------------------------------------------------------- tests
def test_calibrate_then_eval_on_a_small_file(policy_file: Path, synth, tiny_encoder, tmp_path: Path,
                                             cache_dir: Path) -> None:
    """The light end-to-end case (the heavier ones are slow): the library's warnings become prefixed stderr lines,
    the summary goes to stdout, and eval reads what calibrate wrote."""
    x, y = synth("weapons", 500, 21)
    data = write_parquet(tmp_path / "d.parquet", np.concatenate([x, x[:1]]), {"label": [*map(int, y), 1]},
                         tiny_encoder.encoder_id)
    table = pq.read_table(data)
    pq.write_table(table.set_column(0, "embedding", pa.array([*map(list, x), None], pa.list_(pa.float32()))), data)
    out = tmp_path / "out"
    rc, stdout, err = run("calibrate", "--policy", str(policy_file), "--data", str(data), "--category", "weapons",
                          "--no-probe", "--block-precision", "0.7", "--flag-recall", "0.7", "--cache",
                          str(cache_dir), "--out", str(out))
    assert rc == 0, err
    assert "safeclip calibrate: warning: 1 of 501 row(s) have no embedding and are left out (first: row 500)" in err
    assert stdout.startswith("weapons: 500 labelled rows") and f"wrote {out / 'policy.yaml'}" in stdout
    rc, stdout, err = run("eval", "--policy", str(out / "policy.yaml"), "--data", str(data), "--category", "weapons",
                          "--cache", str(cache_dir), "--json")
    assert rc == 0, err
    res = json.loads(stdout)
    assert res["categories"]["weapons"]["calibrated"] is True and res["rows"] == 500
    assert res["policy"] == load_policy(out / "policy.yaml").id


@pytest.mark.slow
def test_calibrated_policy_loads_pins_verify_and_decides_calibrated(calibrated, tiny_encoder, synth) -> None:
    out = calibrated["out"]
    pol = load_policy(out / "policy.yaml")
    parent = load_policy(out.parent / "policies" / "synth.yaml")
    summary = calibrated["summary"]
    assert pol.id == summary["policy"] and pol.id.startswith("synth@1+cal.")
    for name in ("weapons", "drugs"):
        cat = pol.category(name)
        s = summary["categories"][name]
        assert cat.probe is not None and cat.calibrator is not None
        assert cat.probe.path == (out / "probes" / f"{name}.json").resolve()
        assert cat.calibrator.path == (out / "calibrators" / f"{name}.json").resolve()
        assert cat.probe.sha256 == sha256_file(cat.probe.path) == s["probe"]["sha256"]
        assert cat.calibrator.sha256 == sha256_file(cat.calibrator.path) == s["calibrator"]["sha256"]
        assert (cat.flag, cat.block) == (s["thresholds"]["flag"], s["thresholds"]["block"])
        assert cat.flag is not None and cat.block is not None and cat.flag <= cat.block
        assert cat.flag != parent.category(name).flag  # the new thresholds, not the inherited ones
        assert s["inputs"] == ["prompt", "probe"]
        assert (out / "reports" / name / "report.json").is_file()
        assert (out / "reports" / name / "pr_curve.png").is_file()
        # Every labelled row is used exactly once across the three roles; the probe and calibrator saw theirs.
        rows = s["rows"]
        assert sum(r["n"] for r in rows.values()) == N_TRAIN
        probe_art = json.loads(cat.probe.path.read_text())
        cal_art = json.loads(cat.calibrator.path.read_text())
        assert probe_art["metadata"]["n"] == rows["probe"]["n"]
        assert cal_art["n_samples"] == rows["calibrator"]["n"]
        assert cal_art["encoder_id"] == probe_art["encoder_id"] == tiny_encoder.encoder_id
    # The category not asked for is inherited untouched, and stays on the uncalibrated fallback.
    assert pol.category("gambling") == parent.category("gambling")

    m = Moderator(policy=out / "policy.yaml", encoder=tiny_encoder)
    x, _ = synth("weapons", 5, 123)
    for d in m.decide(x):
        assert d.policy == pol.id
        assert d.categories["weapons"].calibrated and d.categories["drugs"].calibrated
        assert not d.categories["gambling"].calibrated
        assert set(d.categories["weapons"].signals) == {"prompt", "probe"}


@pytest.mark.slow
def test_roles_are_disjoint_and_each_model_saw_only_its_rows(calibrated, train_file, tiny_encoder) -> None:
    """From ``split.parquet``: the probe trained on the probe rows (its data hash), the calibrator was fitted on the
    calibrator rows (refitting there gives its coefficients), thresholds and report come from the held-out rows."""
    from safeclip.calibrate import Calibrator
    from safeclip.heads import LinearProbe

    out = calibrated["out"]
    table = pq.read_table(train_file)
    x = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    parent = Moderator(policy=out.parent / "policies" / "synth.yaml", encoder=tiny_encoder)
    tuned = Moderator(policy=out / "policy.yaml", encoder=tiny_encoder)
    for name in ("weapons", "drugs"):
        labels = np.asarray(table.column(name).to_pylist(), dtype=object)
        split = pq.read_table(out / "reports" / name / "split.parquet").to_pydict()
        rows, roles = np.asarray(split["row"]), np.asarray(split["role"])
        assert sorted(rows.tolist()) == [i for i, v in enumerate(labels) if v is not None]  # each labelled row once
        assert np.array_equal(np.asarray(split["label"]), labels[rows].astype(int))
        part = {r: np.sort(rows[roles == r]) for r in ("probe", "calibrator", "holdout")}
        y = labels.astype(float)
        cat = tuned.policy.category(name)

        probe = LinearProbe.load(cat.probe.path, cat.probe.sha256)
        xp, yp = x[part["probe"]], y[part["probe"]].astype(np.uint8)
        assert probe.metadata["data_sha256"] == hashlib.sha256(xp.tobytes() + yp.tobytes()).hexdigest()

        cal = Calibrator.load(cat.calibrator.path, cat.calibrator.sha256)
        j = parent.policy.category_names.index(name)
        prompt = parent.score(x).prompt[:, j]
        sig = np.column_stack([prompt, probe.decision_function(x)]).astype(np.float32)
        refit = Calibrator(cal.method_, cal.inputs).fit(sig[part["calibrator"]], y[part["calibrator"]])
        np.testing.assert_allclose(refit.coef_, cal.coef_, rtol=1e-6)
        assert refit.intercept_ == pytest.approx(cal.intercept_, rel=1e-6)

        th = calibrated["summary"]["categories"][name]["thresholds"]
        report = json.loads((out / "reports" / name / "report.json").read_text())
        assert th["n"] == report["n"] == len(part["holdout"])
        p = tuned.calibrate(tuned.score(x[part["holdout"]]))[0][:, j]
        assert report["roc_auc"] == pytest.approx(roc_auc_score(y[part["holdout"]], p), abs=2e-4)


@pytest.mark.slow
def test_summary_reports_thresholds_and_aucs(calibrated) -> None:
    text = calibrated["stdout"]
    for name in ("weapons", "drugs"):
        s = calibrated["summary"]["categories"][name]
        th = s["thresholds"]
        assert f"block >= {th['block']:.4g}: precision {th['block_precision']:.3f}" in text
        assert f"flag  >= {th['flag']:.4g}: recall {th['flag_recall']:.3f}" in text
        assert th["block_bound"] >= TARGET_PRECISION and th["flag_bound"] >= TARGET_RECALL
        assert f"ROC AUC {s['holdout']['roc_auc']:.3f}" in text
        # Known answer: the probe sees a direction the prompts cannot, so stacking beats the prompt alone.
        assert s["holdout"]["roc_auc"] > s["holdout"]["prompt_only_roc_auc"] + 0.03
    assert "warning" not in calibrated["stderr"]
    assert f"wrote {calibrated['out'] / 'policy.yaml'}" in text


@pytest.mark.slow
@pytest.mark.parametrize("name", ["weapons", "drugs"])
def test_thresholds_keep_their_promise_on_a_fresh_sample(calibrated, tiny_encoder, synth, name) -> None:
    m = Moderator(policy=calibrated["out"] / "policy.yaml", encoder=tiny_encoder)
    x, y = synth(name, 20_000, 1000 + len(name))
    probs, calibrated_mask = m.calibrate(m.score(x))
    j = m.policy.category_names.index(name)
    p = probs[:, j]
    assert calibrated_mask[j]
    cat = m.policy.category(name)
    blocked, flagged = p >= cat.block, p >= cat.flag
    precision = y[blocked].mean()
    recall = flagged[y == 1].mean()
    assert precision >= TARGET_PRECISION, precision
    assert recall >= TARGET_RECALL, recall
    # Calibrated: the mean probability matches the positive rate within bins (loosely, on 20k rows).
    assert abs(p.mean() - y.mean()) < 0.03
    assert roc_auc_score(y, p) > roc_auc_score(y, m.score(x).prompt[:, j]) + 0.03


@pytest.mark.slow
def test_tampered_artifact_is_refused(calibrated, tiny_encoder, tmp_path, synth, cache_dir) -> None:
    out = tmp_path / "copy"
    shutil.copytree(calibrated["out"], out)
    shutil.copytree(calibrated["out"].parent / "policies", tmp_path / "policies")  # the parent (copied into out too)
    m = Moderator(policy=out / "policy.yaml", encoder=tiny_encoder)  # the copy is intact: loads
    assert m.policy.category("drugs").calibrator is not None
    art = out / "calibrators" / "drugs.json"
    data = bytearray(art.read_bytes())
    i = data.index(b'"intercept": ') + len(b'"intercept": ')
    data[i] = ord("9") if data[i] != ord("9") else ord("8")  # still valid JSON, another number
    art.write_bytes(bytes(data))
    with pytest.raises(ArtifactIntegrityError, match="sha256"):
        Moderator(policy=out / "policy.yaml", encoder=tiny_encoder)
    x, y = synth("drugs", 50, 7)
    data_file = write_parquet(tmp_path / "d.parquet", x, {"drugs": y}, tiny_encoder.encoder_id)
    rc, _, err = run("eval", "--policy", str(out / "policy.yaml"), "--data", str(data_file), "--cache", str(cache_dir))
    assert rc == 2 and "sha256" in err and "Traceback" not in err


@pytest.mark.slow
def test_eval_numbers_match_a_direct_computation(calibrated, tiny_encoder, synth, tmp_path, cache_dir) -> None:
    x, y = synth("weapons", 3000, 55)
    labels = np.where(y == 1, "weapons", "none").astype(object)
    labels[:3] = "gambling"  # a named category counts as a negative for the others (single-label rows)
    y[:3] = 0
    data_file = write_parquet(tmp_path / "fresh.parquet", x, {"label": labels}, tiny_encoder.encoder_id)
    policy = calibrated["out"] / "policy.yaml"
    rc, stdout, err = run("eval", "--policy", str(policy), "--data", str(data_file), "--category", "weapons",
                          "--cache", str(cache_dir), "--json")
    assert rc == 0, err
    res = json.loads(stdout)
    r = res["categories"]["weapons"]
    m = Moderator(policy=policy, encoder=tiny_encoder)
    p = m.calibrate(m.score(x))[0][:, m.policy.category_names.index("weapons")].astype(np.float64)
    cat = m.policy.category("weapons")
    assert res["policy"] == m.policy.id and res["rows"] == 3000
    assert r["calibrated"] is True and r["n"] == 3000 and r["n_pos"] == int(y.sum())
    assert r["roc_auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-9)
    assert r["brier"] == pytest.approx(np.mean((p - y) ** 2), abs=1e-9)
    bins = np.minimum((p * 15).astype(int), 14)
    ece = sum(abs(p[bins == b].sum() - y[bins == b].sum()) for b in range(15)) / len(p)
    assert r["ece"] == pytest.approx(ece, abs=1e-9)
    for kind, t in (("flag", cat.flag), ("block", cat.block)):
        acted = p >= t
        assert r[kind]["threshold"] == t
        assert r[kind]["tp"] == int(np.sum(acted & (y == 1))) and r[kind]["fp"] == int(np.sum(acted & (y == 0)))
        assert r[kind]["precision"] == pytest.approx(y[acted].mean(), abs=1e-12)
        assert r[kind]["recall"] == pytest.approx(acted[y == 1].mean(), abs=1e-12)
        assert r[kind]["precision_lower_bound"] < r[kind]["precision"]

    # Text output, and the parent policy: the same data, uncalibrated, with its own thresholds.
    rc, text, _ = run("eval", "--policy", str(calibrated["out"].parent / "policies" / "synth.yaml"), "--data",
                      str(data_file), "--cache", str(cache_dir), "--reports", str(tmp_path / "reports"))
    assert rc == 0
    saved = json.loads((tmp_path / "reports" / "weapons" / "report.json").read_text())
    assert saved["n"] == 3000 and saved["confusion"]["block"]["threshold"] == 0.9
    assert "weapons: 3000 labelled rows" in text and "uncalibrated" in text
    assert "gambling: 3000 labelled rows (3 positive)" in text  # named in the label column: evaluated too
    assert "drugs" not in text  # never named: no labels for it
    assert "flag  >= 0.5:" in text and "block >= 0.9:" in text


@pytest.mark.slow
def test_csv_input_label_names_no_probe_and_lazy_model(tiny_encoder, tiny_model, synth, policy_file, tmp_path,
                                                       ) -> None:
    """CSV with both embedding spellings and a label column of names; a fresh cache, so the model embeds the
    prompts (loaded only for that)."""
    xw, yw = synth("weapons", 700, 3)
    xd, yd = synth("drugs", 700, 4)
    x = np.concatenate([xw, xd])
    labels = [*np.where(yw == 1, "weapons", "none"), *np.where(yd == 1, "drugs", "none")]
    lines = ["embedding,label,encoder_id"]
    for i, (v, lab) in enumerate(zip(x, labels)):
        emb = json.dumps([float(a) for a in v]) if i % 2 else " ".join(repr(float(a)) for a in v)
        lines.append(f"\"{emb}\",{lab},{tiny_encoder.encoder_id}")
    lines.append(f",weapons,{tiny_encoder.encoder_id}")  # no embedding (e.g. an image that failed): left out
    data = tmp_path / "labels.csv"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    args = ["calibrate", "--policy", str(policy_file), "--data", str(data), "--category", "weapons", "--category",
            "drugs", "--no-probe", "--block-precision", "0.8", "--out", str(out), "--cache", str(tmp_path / "c")]
    rc, _, err = run(*args)
    assert rc == 2 and "--model" in err  # no prompt embeddings in a fresh cache, and no model named
    rc, stdout, err = run(*args, "--model", tiny_model, "--device", "cpu")
    assert rc == 0, err
    assert "1 of 1401 row(s) have no embedding and are left out (first: row 1400)" in err
    pol = load_policy(out / "policy.yaml")
    summary = json.loads((out / "calibration.json").read_text())
    for name in ("weapons", "drugs"):
        assert pol.category(name).probe is None and pol.category(name).calibrator is not None
        s = summary["categories"][name]
        assert s["inputs"] == ["prompt"] and set(s["rows"]) == {"calibrator", "holdout"}
        # Label names: a 'drugs' row is a negative for weapons, so every row is labelled for both.
        assert sum(r["n"] for r in s["rows"].values()) == 1400
        assert sum(r["n_pos"] for r in s["rows"].values()) == int((yw if name == "weapons" else yd).sum())
    d = Moderator(policy=out / "policy.yaml", encoder=tiny_encoder).decide(x[:2])[0]
    assert d.categories["weapons"].calibrated and set(d.categories["weapons"].signals) == {"prompt"}


@pytest.mark.slow
def test_path_column_is_embedded_through_the_cache(photos, policy_file, tiny_model, tiny_encoder, tmp_path) -> None:
    small = sorted(photos, key=lambda p: p.stat().st_size)[:12]
    folder = tmp_path / "imgs"
    folder.mkdir()
    rows = ["path,weapons"]
    for i, p in enumerate(small):
        shutil.copy(p, folder / p.name)
        rows.append(f"imgs/{p.name},{i % 2}")  # relative to the labels file; labels are arbitrary stand-ins
    rows.append("imgs/missing.jpg,1")
    data = tmp_path / "labels.csv"
    data.write_text("\n".join(rows) + "\n")
    cache = tmp_path / "cache"
    args = ["calibrate", "--policy", str(policy_file), "--data", str(data), "--category", "weapons", "--no-probe",
            "--model", tiny_model, "--device", "cpu", "--cache", str(cache)]
    # Regression (issue 10.5): a category left with no threshold never fires again; that is no silent outcome.
    own_cache = [str(tmp_path / "cache0") if a == str(cache) else a for a in args]  # keep `cache` cold for below
    rc, _, err0 = run(*own_cache, "--out", str(tmp_path / "refused"))
    assert rc == 2 and "would turn moderation off for weapons" in err0 and "--allow-disabled" in err0
    assert not (tmp_path / "refused" / "policy.yaml").exists()
    args.append("--allow-disabled")
    rc, _, err1 = run(*args, "--out", str(tmp_path / "a"))
    assert rc == 0, err1
    assert "13 image(s) through the embedding cache: 0 cache hit(s), 12 embedded, 1 error(s)" in err1
    assert "1 of 13 row(s) have no embedding" in err1 and "missing.jpg" in err1
    # 12 labelled rows cannot support the targets: both warnings surface, and the thresholds are null.
    assert "warning: weapons: no threshold supports precision" in err1
    assert "warning: weapons: no threshold supports recall" in err1
    cat = load_policy(tmp_path / "a" / "policy.yaml").category("weapons")
    assert cat.flag is None and cat.block is None and cat.calibrator is not None
    with EmbeddingCache(cache, tiny_encoder.encoder_id, readonly=True) as db:
        assert len(db) == 12

    rc, _, err2 = run(*args, "--out", str(tmp_path / "b"))
    assert rc == 0, err2
    assert "12 cache hit(s), 0 embedded" in err2
    same = [sha256_file(tmp_path / d / "calibrators" / "weapons.json") for d in ("a", "b")]
    assert same[0] == same[1]  # same cached embeddings, same seed: the same calibrator


@pytest.mark.parametrize("case", ["unknown-category", "no-out", "binary-label-two-categories", "not-normalised",
                                  "no-embedding-or-path", "too-few-for-probe", "bad-label", "no-encoder-id",
                                  "bad-target", "out-overwrites-policy"])
def test_usage_and_configuration_errors_exit_2(case, policy_file, tiny_encoder, synth, tmp_path, cache_dir) -> None:
    x, y = synth("weapons", 60, 9)
    enc = tiny_encoder.encoder_id
    data = write_parquet(tmp_path / "d.parquet", x, {"label": y}, enc)
    base = ["calibrate", "--policy", str(policy_file), "--cache", str(cache_dir), "--out", str(tmp_path / "o")]
    argv = {
        "unknown-category": [*base, "--data", str(data), "--category", "nudity"],
        "no-out": ["calibrate", "--policy", str(policy_file), "--data", str(data), "--category", "weapons"],
        "binary-label-two-categories": [*base, "--data", str(data), "--category", "weapons", "--category", "drugs"],
        "not-normalised": [*base, "--data", str(write_parquet(tmp_path / "n.parquet", x * 2, {"label": y}, enc)),
                           "--category", "weapons"],
        "no-embedding-or-path": [*base, "--data", str(_table(tmp_path / "e.parquet", {"label": y})),
                                 "--category", "weapons"],
        "too-few-for-probe": [*base, "--data", str(write_parquet(tmp_path / "f.parquet", x[:8],
                                                                 {"label": np.r_[1, 1, 0, 0, 0, 0, 0, 0]}, enc)),
                              "--category", "weapons"],
        "bad-label": [*base, "--data", str(write_parquet(tmp_path / "b.parquet", x, {
            "label": np.where(y == 1, "weapon", "none")}, enc)), "--category", "weapons"],
        "no-encoder-id": [*base, "--data", str(write_parquet(tmp_path / "i.parquet", x, {"label": y})),
                          "--category", "weapons"],
        "bad-target": [*base, "--data", str(data), "--category", "weapons", "--block-precision", "1.5"],
        "out-overwrites-policy": ["calibrate", "--policy", str(tmp_path / "o" / "policy.yaml"), "--data", str(data),
                                  "--category", "weapons", "--cache", str(cache_dir), "--out", str(tmp_path / "o")],
    }[case]
    if case == "out-overwrites-policy":
        (tmp_path / "o").mkdir()
        shutil.copy(policy_file, tmp_path / "o" / "policy.yaml")
    rc, stdout, err = run(*argv)
    assert rc == 2, (stdout, err)
    assert "Traceback" not in err
    expected = {
        "unknown-category": "no category ['nudity']", "no-out": "--out", "binary-label-two-categories": "0/1 labels",
        "not-normalised": "not L2-normalised", "no-embedding-or-path": "'embedding' or a 'path' column",
        "too-few-for-probe": "--no-probe", "bad-label": "['weapon']", "no-encoder-id": "--encoder-id",
        "bad-target": "--block-precision", "out-overwrites-policy": "overwrite the input policy",
    }[case]
    assert expected in err
    assert not (tmp_path / "o" / "calibration.json").exists()  # nothing written


def _table(path: Path, cols: dict) -> Path:
    pq.write_table(pa.table(cols), path)
    return path



def test_module_imports_no_torch() -> None:
    code = ("import sys, safeclip.cli, safeclip.cli.calibration; "
            "print(sorted(m for m in ('torch', 'open_clip', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_shipped_parent_is_extended_by_name(tiny_encoder, tiny_model, tmp_path, cache_dir) -> None:
    parent = load_policy("default")
    x, y = sample(parent, tiny_encoder.embed_texts, "drugs", 600, np.random.default_rng(5))
    data = write_parquet(tmp_path / "d.parquet", x, {"label": y}, tiny_encoder.encoder_id)
    out = tmp_path / "out"
    rc, _, err = run("calibrate", "--policy", "default", "--data", str(data), "--category", "drugs", "--no-probe",
                     "--block-precision", "none", "--out", str(out), "--cache", str(cache_dir), "--model", tiny_model,
                     "--device", "cpu", "--name", "my-site")
    assert rc == 0, err
    assert "\nextends: default\n" in (out / "policy.yaml").read_text()
    pol = load_policy(out / "policy.yaml")
    assert pol.name == "my-site" and pol.category_names == parent.category_names
    assert pol.category("drugs").block is None and pol.category("drugs").flag is not None  # 'none': never block
    assert pol.category("violence") == parent.category("violence")
