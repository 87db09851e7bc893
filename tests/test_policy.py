from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from safeclip.errors import PolicyError
from safeclip.policy import builtin_policy_dir, list_policies, load_policy

REQUIRED = {"sexual", "nudity", "violence", "weapons", "drugs", "hate_symbols", "self_harm"}


def write(tmp: Path, name: str, data: dict | str) -> Path:
    p = tmp / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def test_shipped_policies_are_valid_and_cover_required_categories():
    assert {"default", "strict", "lenient"} <= set(list_policies())
    for name in ("default", "strict", "lenient"):
        p = load_policy(name)
        assert REQUIRED <= set(p.category_names), name
        for c in p.categories:
            assert c.prompts and c.contrast, (name, c.name)
            assert len(c.templates) >= 3
            assert c.flag is not None


def test_strict_is_stricter_and_lenient_more_lenient_than_default():
    d, s, l = (load_policy(n) for n in ("default", "strict", "lenient"))
    inf = float("inf")
    for c in d.categories:
        for key in ("flag", "block"):
            dv = getattr(c, key) if getattr(c, key) is not None else inf
            sv = getattr(s.category(c.name), key)
            lv = getattr(l.category(c.name), key)
            assert (sv if sv is not None else inf) <= dv <= (lv if lv is not None else inf), (c.name, key)
    # inheritance keeps the parent's prompts
    assert s.category("violence").prompts == d.category("violence").prompts


def test_policies_ship_inside_the_package():
    assert (builtin_policy_dir() / "default.yaml").is_file()
    assert builtin_policy_dir().parent.name in {"safeclip", "main"} or "safeclip" in str(builtin_policy_dir())


def test_every_problem_is_reported_with_file_and_field(tmp_path):
    f = write(tmp_path, "bad.yaml", {
        "name": "bad",
        "scoring": {"logit_scale": -1, "templates": ["no placeholder"], "neutral": ["x"], "colour": 1},
        "categories": {
            "Violence": {"prompts": ["a"], "thresholds": {"flag": 0.5}},
            "drugs": {"prompts": [], "thresholds": {"flag": 0.9, "block": 0.2}, "typo": 1},
            "weapons": {"prompts": ["gun", "gun"], "contrast": ["gun"], "thresholds": {"flag": 2}},
            "hate": {"prompts": ["x"], "thresholds": {"block": 0.5},
                     "probe": {"path": "nope.json", "sha256": "abc"}},
        },
    })
    with pytest.raises(PolicyError) as ei:
        load_policy(f)
    text = "\n".join(ei.value.problems)
    for expected in [
        "scoring.logit_scale", "scoring.templates[0]", "scoring.colour: unknown key", "categories.Violence",
        "categories.drugs.prompts", "categories.drugs.thresholds: flag (0.9) must not exceed block (0.2)",
        "categories.drugs.typo: unknown key", "categories.weapons.prompts: duplicate",
        "categories.weapons: prompts and contrast share", "categories.weapons.thresholds.flag",
        "categories.hate.probe.sha256",
    ]:
        assert expected in text, expected
    assert all(p.startswith(str(f.resolve())) for p in ei.value.problems)


def test_invalid_yaml_and_non_mapping(tmp_path):
    with pytest.raises(PolicyError, match="invalid YAML"):
        load_policy(write(tmp_path, "a.yaml", "name: [unclosed"))
    with pytest.raises(PolicyError, match="must be a YAML mapping"):
        load_policy(write(tmp_path, "b.yaml", "- a\n- b\n"))
    with pytest.raises(PolicyError, match="no such policy"):
        load_policy("does-not-exist")


def test_yaml_is_loaded_safely(tmp_path):
    evil = "name: !!python/object/apply:os.system ['echo pwned']\n"
    with pytest.raises(PolicyError):
        load_policy(write(tmp_path, "evil.yaml", evil))


def test_extends_overrides_thresholds_and_removes_categories(tmp_path):
    f = write(tmp_path, "child.yaml", {
        "name": "child", "version": "2", "extends": "default",
        "categories": {"weapons": None, "drugs": {"thresholds": {"block": 0.99}},
                       "gambling": {"prompts": ["a casino slot machine"], "contrast": ["a board game"],
                                    "thresholds": {"flag": 0.5, "block": None}}},
    })
    p = load_policy(f)
    assert p.id == "child@2"
    assert "weapons" not in p.category_names and "gambling" in p.category_names
    assert p.category("drugs").block == 0.99
    assert p.category("drugs").flag == load_policy("default").category("drugs").flag
    assert p.neutral == load_policy("default").neutral


def test_extends_cycle_is_an_error(tmp_path):
    write(tmp_path, "a.yaml", {"name": "a", "extends": "b.yaml"})
    write(tmp_path, "b.yaml", {"name": "b", "extends": "a.yaml"})
    with pytest.raises(PolicyError, match="cycle"):
        load_policy(tmp_path / "a.yaml")


def _artifact(tmp: Path, rel: str) -> tuple[str, str]:
    path = tmp / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps({"kind": "x"}).encode()
    path.write_bytes(data)
    return rel, hashlib.sha256(data).hexdigest()


def test_artifact_paths_resolve_relative_to_policy_and_may_not_escape(tmp_path):
    pol_dir = tmp_path / "pol"
    pol_dir.mkdir()
    rel, sha = _artifact(pol_dir, "cal/drugs.json")
    f = write(pol_dir, "p.yaml", {"extends": "default", "name": "p",
                                  "categories": {"drugs": {"calibrator": {"path": rel, "sha256": sha}}}})
    assert load_policy(f).category("drugs").calibrator.path == (pol_dir / rel).resolve()

    outside, sha2 = _artifact(tmp_path, "outside.json")
    g = write(pol_dir, "q.yaml", {"extends": "default", "name": "q",
                                  "categories": {"drugs": {"calibrator": {"path": "../outside.json", "sha256": sha2}}}})
    with pytest.raises(PolicyError, match="escapes the policy directory"):
        load_policy(g)
    assert load_policy(g, allow_outside=True).category("drugs").calibrator.sha256 == sha2


def test_with_thresholds_returns_a_validated_copy():
    p = load_policy("default")
    q = p.with_thresholds("drugs", flag=0.1, block=0.2)
    assert q.category("drugs").block == 0.2 and p.category("drugs").block is None
    with pytest.raises(PolicyError):
        p.with_thresholds("drugs", flag=0.5, block=0.1)
    with pytest.raises(KeyError):
        p.with_thresholds("nope", flag=0.1, block=0.2)
