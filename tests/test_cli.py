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


def _without_source(policy):
    import dataclasses

    return dataclasses.replace(policy, source=None)


@pytest.mark.parametrize("fmt", [[], ["--json"]])
def test_policy_show_prints_a_policy_that_loads_back_the_same(tmp_path, capsys, fmt):
    """Regression (issue 21): `policy show` flattened `scoring:` (and dropped top_prompts), added a `source:` key
    and wrote artifacts as bare paths: its output was not a policy. Shown, saved beside the policy and loaded, it is
    the same policy: categories, thresholds, scoring, artifacts."""
    import hashlib

    import yaml

    from safeclip.policy import load_policy

    probe = tmp_path / "probes" / "drugs.json"
    probe.parent.mkdir()
    probe.write_text('{"kind": "x"}')
    sha = hashlib.sha256(probe.read_bytes()).hexdigest()
    src = tmp_path / "mine.yaml"
    src.write_text(yaml.safe_dump({
        "name": "mine", "version": "2", "extends": "strict",
        "scoring": {"top_prompts": 5, "neutral": ["a landscape", "a car"]},
        "categories": {
            "drugs": {"probe": {"path": "probes/drugs.json", "sha256": sha}, "thresholds": {"block": None}},
            "weapons": {"templates": ["a drawing of {}."]},
            "self_harm": {"enabled": False},
        },
    }))
    for name, folder in ((str(src), tmp_path), ("strict", tmp_path / "elsewhere")):
        original = load_policy(name)
        assert main(["policy", "show", name, *fmt]) == 0
        folder.mkdir(exist_ok=True)
        shown = folder / "shown.yaml"
        shown.write_text(capsys.readouterr().out)
        again = load_policy(shown)
        assert _without_source(again) == _without_source(original), name
        assert again.id == original.id
    assert again.top_prompts == 3
    mine = load_policy(tmp_path / "shown.yaml")
    assert mine.top_prompts == 5 and mine.category("drugs").probe.path == probe.resolve()
    assert mine.category("weapons").templates == ("a drawing of {}.",) and "self_harm" not in mine.category_names


def test_a_closed_pipe_ends_quietly_with_exit_0():
    """Regression (issue 10.9): `safeclip diff A B | head` died with a BrokenPipeError traceback and exit 1.

    The command prints far more than a pipe buffer holds, so the writer is still writing when `head` exits.
    """
    script = (
        "import argparse, sys\n"
        "from safeclip.cli._options import run\n"
        "p = argparse.ArgumentParser()\n"
        "p.set_defaults(func=lambda a: [print(f'row {i}' + 'x' * 100) for i in range(100000)] and 0)\n"
        "sys.exit(run(p, []))\n"
    )
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", f"{sys.executable} -c \"$SCRIPT\" | head -2"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "SCRIPT": script})
    assert proc.stdout.splitlines()[0].startswith("row 0")
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert proc.returncode == 0


def test_check_on_a_folder_points_at_audit_in_one_line(tmp_path, capsys):
    """Regression (issue 21): `safeclip check DIR` loaded the model, then failed on the folder as on a bad file.
    It now says in one line, before any model loads, that check takes files and how to audit the folder."""
    folder = tmp_path / "my uploads"
    folder.mkdir()
    (tmp_path / "a.jpg").write_bytes(b"not decoded: the folder is refused first")
    assert main(["check", str(tmp_path / "a.jpg"), str(folder), "--model", "local-dir:/nowhere"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and captured.out == "", captured
    assert "is a folder" in lines[0] and "takes image files" in lines[0]
    assert f"safeclip audit '{folder}' --out results.parquet" in lines[0]


def test_check_batch_size_zero_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["check", "x.jpg", "--batch-size", "0"])
    assert e.value.code == 2 and "positive integer" in capsys.readouterr().err
