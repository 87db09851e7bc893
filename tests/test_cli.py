from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from safeclip.cli import main


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "safeclip.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


@pytest.fixture(scope="module")
def model_args(tiny_model, cache_dir) -> list[str]:
    os.environ.setdefault("SAFECLIP_CACHE_DIR", str(cache_dir))
    return ["--model", tiny_model, "--device", "cpu"]


def test_check_prints_one_line_per_input_in_order(model_args, photos, capsys):
    files = [str(p) for p in photos[:3]]
    assert main(["check", *files, *model_args]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split("\t")[0] for ln in lines] == files
    assert all(ln.split("\t")[1] in {"allow", "flag", "block"} for ln in lines)


def test_check_json_and_exit_1_on_a_bad_file(model_args, photos, corpus, capsys):
    bad = str(corpus / "bad" / "2422.flc")
    files = [str(photos[0]), bad, str(photos[1])]
    assert main(["check", "--json", *files, *model_args]) == 1
    rows = [json.loads(ln) for ln in capsys.readouterr().out.strip().splitlines()]
    assert [r["path"] for r in rows] == files
    assert "decision" in rows[0] and rows[0]["decision"]["action"] in {"allow", "flag", "block"}
    assert "error" in rows[1] and "2422.flc" in rows[1]["error"] and "decision" not in rows[1]
    assert "\n" not in rows[1]["error"]


def test_bad_file_error_is_one_line_without_traceback(model_args, corpus):
    proc = run_cli("check", str(corpus / "bad" / "2422.flc"), *model_args)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "2422.flc" in proc.stderr


def test_usage_and_configuration_errors_exit_2(model_args, photos, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["check"])
    assert e.value.code == 2
    assert main(["check", str(photos[0]), "--policy", "no-such-policy", *model_args]) == 2
    assert main(["check", str(photos[0]), "--model", "ViT-B-32", "--pretrained", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert "no such policy" in err and "does not exist" in err


def test_policy_lint_show_list(tmp_path, capsys):
    assert main(["policy", "lint", "default"]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nscoring: {logit_scale: 100, templates: ['{}'], neutral: [x]}\n"
                   "categories: {drugs: {prompts: [], thresholds: {flag: 2}}}\n")
    assert main(["policy", "lint", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "categories.drugs.prompts" in err and "categories.drugs.thresholds.flag" in err
    assert main(["policy", "show", "strict", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["categories"]["sexual"]["thresholds"] == {"flag": 0.3, "block": 0.6}
    assert main(["policy", "list"]) == 0
    assert {ln.split("\t")[0] for ln in capsys.readouterr().out.splitlines()} >= {"default", "strict", "lenient"}
