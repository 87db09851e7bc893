"""calibrate_policy / evaluate_policy called from Python (calibration.workflow), on known-answer embeddings in the
tiny model's space (calibration_known.sample). The command line is tested on top of these in
test_calibration_cli.py; here: the result objects, what they say matches what was written, and the policy folder
stays loadable wherever its parent lives.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from calibration_known import one_blas_thread, policy_file, synth, work  # noqa: F401 (fixtures)

from safeclip import Moderator, load_policy
from safeclip.artifacts import sha256_file
from safeclip.calibration import (
    CalibrationResult,
    LabeledData,
    ThresholdWarning,
    calibrate_policy,
    evaluate_policy,
)
from safeclip.errors import SafeclipError


@pytest.fixture(scope="module")
def data(synth, tiny_encoder) -> LabeledData:
    """2000 rows: 1000 labelled for weapons, 1000 for drugs, in memory (no file)."""
    xw, yw = synth("weapons", 1000, 10)
    xd, yd = synth("drugs", 1000, 11)
    none = np.full(1000, -1, np.int8)
    return LabeledData(np.concatenate([xw, xd]), {"weapons": np.r_[yw, none], "drugs": np.r_[none, yd]},
                       tiny_encoder.encoder_id, embed_texts=tiny_encoder.embed_texts)


@pytest.fixture(scope="module")
def result(policy_file: Path, data: LabeledData, work: Path) -> CalibrationResult:
    return calibrate_policy(policy_file, data, ["weapons", "drugs"], out=work / "py-out", block_precision=0.8,
                            flag_recall=0.8, seed=1)


def test_result_describes_what_was_written(result: CalibrationResult, data: LabeledData, policy_file: Path,
                                           tiny_encoder) -> None:
    out = result.out
    assert result.policy_path == out / "policy.yaml" and result.load_policy().id == result.policy_id
    assert result.parent_id == "synth@1" and result.encoder_id == tiny_encoder.encoder_id
    assert dict(result.summary) == json.loads((out / "calibration.json").read_text())
    assert result.summary["data"] == {"file": None, "sha256": data.sha256, "rows": 2000, "embedded_rows": 2000}
    assert list(result.fits) == ["weapons", "drugs"] and result.warnings == ()
    m = Moderator(policy=result.policy_path, encoder=tiny_encoder)
    for name, fit in result.fits.items():
        labelled = data.labelled(name)
        assert sorted(np.concatenate(list(fit.split.values())).tolist()) == labelled.tolist()
        assert {k: v["n"] for k, v in fit.rows.items()} == {k: len(v) for k, v in fit.split.items()}
        assert fit.probe_sha256 == sha256_file(out / "probes" / f"{name}.json")
        assert fit.calibrator_sha256 == sha256_file(out / "calibrators" / f"{name}.json")
        j = m.policy.category_names.index(name)
        p = m.calibrate(m.score(data.embeddings[fit.split["holdout"]]))[0][:, j]
        np.testing.assert_allclose(p, fit.p_holdout, atol=1e-4)  # what was evaluated is what runs
        assert fit.report.n == len(fit.split["holdout"]) and fit.thresholds.n == fit.report.n
        assert f"{name}: 1000 labelled rows" in result.format()
    assert load_policy(out / "policy.yaml").category("gambling") == load_policy(policy_file).category("gambling")


def test_evaluating_the_held_out_rows_reproduces_the_report(result: CalibrationResult, data: LabeledData) -> None:
    for name, fit in result.fits.items():
        ev = evaluate_policy(result.policy_path, data.take(fit.split["holdout"]), [name], confidence=0.9)
        e = ev.categories[name]
        assert e.calibrated and ev.policy_id == result.policy_id and ev.rows == len(fit.split["holdout"])
        assert e.report.roc_auc == pytest.approx(fit.report.roc_auc, abs=1e-3)
        assert e.report.n == fit.report.n and e.report.n_pos == fit.report.n_pos
        assert e.block["threshold"] == fit.thresholds.block and e.flag["threshold"] == fit.thresholds.flag
        # The realised precision at block is the one the thresholds recorded on these rows.
        assert e.block["precision"] == pytest.approx(fit.thresholds.block_precision, abs=0.02)
        assert e.block["precision_lower_bound"] < e.block["precision"]
        d = ev.to_dict()
        assert d["data"] is None and d["categories"][name]["n"] == fit.report.n and d["confidence"] == 0.9
        assert f"{name}: {fit.report.n} labelled rows" in ev.format() and "in-memory data" in ev.format()


def test_a_parent_outside_the_folder_is_copied_in_with_its_artifacts(result: CalibrationResult, synth,
                                                                     tiny_encoder, tmp_path: Path) -> None:
    """A policy extends only shipped policies and files in its own folder: calibrating the calibrated policy again
    into another folder copies it, and its drugs artifacts, in (same pins)."""
    assert "extends" not in yaml.safe_load(result.policy_path.read_text())  # its parent lies outside too
    x, y = synth("weapons", 400, 12)
    data = LabeledData(x, {"weapons": y}, tiny_encoder.encoder_id, embed_texts=tiny_encoder.embed_texts)
    again = calibrate_policy(result.policy_path, data, ["weapons"], out=tmp_path / "again", probe=False,
                             block_precision=None, flag_recall=0.7)
    pol = again.load_policy()
    drugs, before = pol.category("drugs"), result.load_policy().category("drugs")
    assert drugs.calibrator.path == (tmp_path / "again" / "calibrators" / "drugs.json").resolve()
    assert (drugs.calibrator.sha256, drugs.probe.sha256) == (before.calibrator.sha256, before.probe.sha256)
    assert pol.category("weapons").probe is None and pol.category("weapons").block is None
    d = Moderator(policy=again.policy_path, encoder=tiny_encoder).decide(x[:2])[0]
    assert d.categories["drugs"].calibrated and d.categories["weapons"].calibrated


def test_a_parent_in_the_folder_is_extended_and_an_edited_one_copied(policy_file: Path, synth, tiny_encoder,
                                                                      tmp_path: Path) -> None:
    x, y = synth("drugs", 300, 13)
    data = LabeledData(x, {"drugs": y}, tiny_encoder.encoder_id, embed_texts=tiny_encoder.embed_texts)
    (tmp_path / "base.yaml").write_text(policy_file.read_text())
    kw = {"probe": False, "block_precision": None, "flag_recall": 0.7}
    beside = calibrate_policy(tmp_path / "base.yaml", data, ["drugs"], out=tmp_path, **kw)
    assert yaml.safe_load(beside.policy_path.read_text())["extends"] == "base.yaml"
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "base.yaml").write_text(policy_file.read_text())
    edited = load_policy(tmp_path / "e" / "base.yaml").with_thresholds("gambling", flag=0.1, block=None)
    copied = calibrate_policy(edited, data, ["drugs"], out=tmp_path / "e", **kw)  # extending would lose the edit
    assert "extends" not in yaml.safe_load(copied.policy_path.read_text())
    assert copied.load_policy().category("gambling").flag == 0.1  # the in-memory edit is what was written


def test_warnings_name_the_category_and_are_kept(policy_file: Path, synth, tiny_encoder, tmp_path: Path) -> None:
    x, y = synth("weapons", 40, 14)
    data = LabeledData(x, {"weapons": y}, tiny_encoder.encoder_id, embed_texts=tiny_encoder.embed_texts)
    with pytest.warns(ThresholdWarning, match=r"^weapons: no threshold supports precision >= 0.999") as rec:
        res = calibrate_policy(policy_file, data, ["weapons"], out=tmp_path, probe=False, block_precision=0.999,
                               flag_recall=None, allow_disabled=True)
    assert len(rec) == 1 and res.warnings == (str(rec[0].message),)
    assert res.fits["weapons"].warnings == (str(rec[0].message).removeprefix("weapons: "),)
    assert res.summary["categories"]["weapons"]["warnings"] == list(res.fits["weapons"].warnings)
    assert res.fits["weapons"].thresholds.block is None


def test_a_category_left_without_thresholds_is_refused_unless_allowed(policy_file: Path, synth, tiny_encoder,
                                                                        tmp_path: Path) -> None:
    """Regression (issue 10.5): calibrate wrote `flag: null, block: null` (the category never fires) and exited 0."""
    from safeclip.errors import DataError

    x, y = synth("weapons", 40, 14)
    data = LabeledData(x, {"weapons": y}, tiny_encoder.encoder_id, embed_texts=tiny_encoder.embed_texts)
    with pytest.warns(ThresholdWarning), pytest.raises(DataError, match="turn moderation off for weapons"):
        calibrate_policy(policy_file, data, ["weapons"], out=tmp_path / "out", probe=False, block_precision=0.999,
                         flag_recall=None)
    assert not (tmp_path / "out" / "policy.yaml").exists()


def test_requests_are_checked_before_any_data_is_read(policy_file: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such.parquet"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for cats, kw, match in (([], {}, "name the categories"), (["nudity"], {}, r"no category \['nudity'\]"),
                                (["drugs"], {"block_precision": None, "flag_recall": None}, "nothing to choose")):
            with pytest.raises(SafeclipError, match=match):
                calibrate_policy(policy_file, missing, cats, out=tmp_path / "o", **kw)
        with pytest.raises(ValueError, match="holdout"):
            calibrate_policy(policy_file, missing, ["drugs"], out=tmp_path / "o", holdout=1.0)
    assert not (tmp_path / "o").exists()


def test_a_stacked_calibrator_sharpens_a_head_the_policy_already_has(policy_file: Path, synth, tiny_encoder,
                                                                     tmp_path: Path) -> None:
    """A category with a head (as laion-nsfw-b32's sexual has LAION's) gets a calibrator over (prompt, head): the
    head here sees the direction only a trained model can (see calibration_known.sample), through a ReLU pair."""
    from calibration_known import directions

    from safeclip.heads import MLPHead

    pol = load_policy(policy_file)
    _, h = directions(pol, tiny_encoder.embed_texts, "weapons")
    head = MLPHead([(np.stack([h, -h]) * 10, np.zeros(2)), (np.array([[1.0, -1.0]]), np.zeros(1))],
                   encoder_id=tiny_encoder.encoder_id)
    folder = tmp_path / "pol"
    folder.mkdir()
    sha = head.save(folder / "weapons-head.json")
    with_head = folder / "policy.yaml"
    with_head.write_text(policy_file.read_text().replace("name: synth", "name: synth-head").replace(
        '    contrast: ["a toy water pistol"]\n',
        f'    contrast: ["a toy water pistol"]\n    head: {{path: weapons-head.json, sha256: {sha}}}\n'))
    x, y = synth("weapons", 2000, 21)
    data = LabeledData(x, {"weapons": y}, tiny_encoder.encoder_id, embed_texts=tiny_encoder.embed_texts)

    res = calibrate_policy(with_head, data, ["weapons"], out=tmp_path / "out", probe=False, block_precision=0.8,
                           flag_recall=0.8, seed=2)
    fit = res.fits["weapons"]
    assert fit.calibrator.inputs == ("prompt", "head") and fit.probe is None
    assert fit.report.roc_auc > fit.prompt_roc_auc + 0.05  # the head adds what the prompt cannot see
    written = load_policy(res.policy_path).category("weapons")
    assert written.head is not None and written.head.sha256 == sha
    m = Moderator(policy=res.policy_path, encoder=tiny_encoder)
    j = m.policy.category_names.index("weapons")
    p = m.calibrate(m.score(data.embeddings[fit.split["holdout"]]))[0][:, j]
    np.testing.assert_allclose(p, fit.p_holdout, atol=1e-4)

    alone = calibrate_policy(with_head, data, ["weapons"], out=tmp_path / "out2", probe=False, head=False,
                             block_precision=0.8, flag_recall=0.8, seed=2)
    assert alone.fits["weapons"].calibrator.inputs == ("prompt",)


@pytest.mark.parametrize("model, pretrained", [("ViT-B-32", "laion2b_s34b_b79k"), ("ViT-B-32", "openai"), (None, None)])
def test_the_written_policy_names_the_encoder_of_its_data(tmp_path: Path, model, pretrained) -> None:
    """Regression (issue 21): calibrate wrote the data's encoder only in a comment, so the policy it wrote ran in its
    parent's encoder: (or the default) and refused its own probes and calibrators. It now writes the encoder:
    that embeds into the data's space (ViT-B-32 + openai is the -quickgelu space), and lint finds every artifact
    runnable there; an encoder known only by a hash gets no encoder:, and the header says so."""
    from conftest import OrthoTexts

    from calibration_known import POLICY
    from safeclip.compiled import lint_policy
    from safeclip.embed import tag_encoder_id

    space = tag_encoder_id(model, pretrained) if model else "local-dir|sha256:0123456789abcdef+cfg:01234567|px:0"
    rng = np.random.default_rng(3)
    y = (rng.random(900) < 0.3).astype(np.int8)
    direction = rng.normal(size=512)
    x = rng.normal(size=(900, 512)) + np.outer(2.0 * y - 1.0, direction / np.linalg.norm(direction) * 4.0)
    data = LabeledData((x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), {"weapons": y}, space,
                       embed_texts=OrthoTexts(512))
    (tmp_path / "base.yaml").write_text(POLICY)  # no encoder: of its own
    res = calibrate_policy(tmp_path / "base.yaml", data, ["weapons"], out=tmp_path, block_precision=0.8,
                           flag_recall=0.8, allow_disabled=True)
    written = load_policy(res.policy_path)
    if model:
        assert dict(written.encoder) == {"model": model, "pretrained": pretrained}
        assert lint_policy(res.policy_path).id == res.policy_id
    else:
        assert dict(written.encoder) == {} and "# No encoder: is written" in res.policy_path.read_text()
