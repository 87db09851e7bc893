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
    assert {"default", "strict", "lenient", "laion-nsfw-b32", "laion-nsfw-l14"} <= set(list_policies())
    for name in list_policies():
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
    """The shipped policies are the package data of ``safeclip.policies`` (whatever folder the checkout is in)."""
    import safeclip.policies

    assert (builtin_policy_dir() / "default.yaml").is_file()
    assert builtin_policy_dir().resolve() == Path(safeclip.policies.__file__).resolve().parent


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


# ------------------------------------------------------------------------------ hostile policy files (issue 9)
BILLION_LAUGHS = "a: &a ['lol','lol','lol','lol','lol','lol','lol','lol','lol']\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))


def test_yaml_alias_bomb_is_refused_without_expanding(tmp_path):
    f = write(tmp_path, "bomb.yaml", BILLION_LAUGHS)
    with pytest.raises(PolicyError) as e:
        load_policy(f)
    assert "aliases" in str(e.value) and len(str(e.value)) < 600


def test_oversized_policy_is_refused_before_parsing(tmp_path):
    f = write(tmp_path, "big.yaml", "name: big\ndescription: '" + "x" * (2 << 20) + "'\n")
    with pytest.raises(PolicyError, match="larger than"):
        load_policy(f)


@pytest.mark.parametrize("ref", ["/etc/passwd", "../../secret.conf", "../outside.yaml"])
def test_extends_stays_in_the_policy_folder_and_echoes_no_foreign_content(tmp_path, ref):
    (tmp_path / "secret.conf").write_text("password: hunter2\n")
    (tmp_path / "outside.yaml").write_text("name: outside\nsecret: hunter2\n")
    inner = tmp_path / "a" / "b"
    inner.mkdir(parents=True)
    f = write(inner, "p.yaml", {"name": "p", "extends": ref})
    with pytest.raises(PolicyError) as e:
        load_policy(f)
    msg = str(e.value)
    assert "extends" in msg and "hunter2" not in msg and "root:" not in msg


def test_allow_outside_lets_extends_reach_a_sibling_folder(tmp_path):
    (tmp_path / "base").mkdir()
    write(tmp_path / "base", "parent.yaml", {"name": "parent", "version": "7", "extends": "default"})
    (tmp_path / "tuned").mkdir()
    f = write(tmp_path / "tuned", "p.yaml", {"name": "child", "extends": "../base/parent.yaml"})
    with pytest.raises(PolicyError, match="outside the policy's folder"):
        load_policy(f)
    assert load_policy(f, allow_outside=True).id == "child@7"  # the version is inherited


def test_foreign_file_reached_by_extends_is_not_quoted(tmp_path):
    (tmp_path / "notes.yaml").write_text("- hunter2\n- [unclosed\n")
    f = write(tmp_path, "p.yaml", {"name": "p", "extends": "notes.yaml"})
    with pytest.raises(PolicyError) as e:
        load_policy(f)
    assert "hunter2" not in str(e.value) and "unclosed" not in str(e.value)


def test_a_local_file_named_like_a_shipped_policy_does_not_shadow_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "default", {"name": "default", "version": "1.0", "categories": {}})
    p = load_policy("default")
    assert Path(p.source).resolve() == (builtin_policy_dir() / "default.yaml").resolve()
    with pytest.raises(PolicyError, match=r"pass \./strictish"):
        write(tmp_path, "strictish", {"name": "x"})
        load_policy("strictish")


def test_a_file_may_not_claim_a_shipped_policy_id(tmp_path):
    f = write(tmp_path, "mine.yaml", {"name": "default", "version": "1.0", "extends": "default",
                                      "categories": {"drugs": {"thresholds": {"flag": 0.2}}}})
    with pytest.raises(PolicyError, match="id of a shipped policy"):
        load_policy(f)
    # A copy that decides exactly as the shipped policy (what `policy show` prints) keeps its id.
    same = write(tmp_path, "same.yaml", {"name": "default", "version": "1.0", "extends": "default"})
    assert load_policy(same).id == "default@1.0"
    assert load_policy(write(tmp_path, "ok.yaml", {"name": "default", "version": "1.0+mine",
                                                    "extends": "default"})).id == "default@1.0+mine"


def test_non_utf8_policy_is_one_policy_error(tmp_path):
    f = tmp_path / "latin1.yaml"
    f.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(PolicyError, match="not UTF-8"):
        load_policy(f)


def test_a_1000_deep_extends_chain_is_a_policy_error(tmp_path):
    for i in range(1000):
        write(tmp_path, f"p{i}.yaml", {"name": f"p{i}", "extends": f"p{i + 1}.yaml" if i < 999 else "default"})
    with pytest.raises(PolicyError, match="chain of more than"):
        load_policy(tmp_path / "p0.yaml")


@pytest.mark.parametrize("text,where", [
    ("name: a\nname: b\n", "duplicate key 'name'"),
    ("name: a\nextends: default\ncategories:\n  drugs:\n    thresholds: {flag: 0.1, flag: 0.9}\n",
     "duplicate key 'flag'"),
])
def test_duplicate_keys_are_errors(tmp_path, text, where):
    with pytest.raises(PolicyError, match=where):
        load_policy(write(tmp_path, "dup.yaml", text))


def test_enabled_must_be_a_boolean(tmp_path):
    f = write(tmp_path, "e.yaml", "name: e\nextends: default\ncategories:\n  drugs:\n    enabled: 'no'\n")
    with pytest.raises(PolicyError, match="enabled: must be true or false"):
        load_policy(f)


def test_control_characters_in_names_never_reach_the_terminal(tmp_path):
    f = write(tmp_path, "esc.yaml", {"name": "evil\x1b[2Jname", "extends": "default"})
    with pytest.raises(PolicyError) as e:
        load_policy(f)
    assert "\x1b" not in str(e.value) and "\\x1b" in str(e.value)


def test_template_with_other_fields_is_refused_at_load(tmp_path):
    f = write(tmp_path, "t.yaml", {"name": "t", "extends": "default", "scoring": {"templates": ["{} {x}"]}})
    with pytest.raises(PolicyError, match="no other braces"):
        load_policy(f)


def test_yaml_syntax_error_keeps_line_column_and_the_line(tmp_path):
    f = write(tmp_path, "syn.yaml", "name: s\nversion: '1'\ncategories: [unclosed\n")
    with pytest.raises(PolicyError) as e:
        load_policy(f)
    msg = str(e.value)
    assert "syn.yaml:3:" in msg or "syn.yaml:4:" in msg
    assert "invalid YAML" in msg and "^" in msg


def test_unknown_names_get_did_you_mean_and_say_where_they_came_from(tmp_path, monkeypatch):
    f = write(tmp_path, "x.yaml", {"name": "x", "extends": "defualt"})
    with pytest.raises(PolicyError) as e:
        load_policy(f)
    assert "x.yaml: extends" in str(e.value) and "did you mean 'default'" in str(e.value)
    with pytest.raises(PolicyError, match="did you mean 'strict'"):
        load_policy("stirct")
    monkeypatch.setenv("SAFECLIP_POLICY", "lenint")
    with pytest.raises(PolicyError, match=r"\$SAFECLIP_POLICY.*did you mean 'lenient'"):
        load_policy()


@pytest.mark.parametrize("ref, missing", [("defualt", "did you mean 'default'"), ("base.yaml", "no such policy file")])
def test_a_missing_parent_does_not_hide_the_files_other_problems(tmp_path, ref, missing):
    """Regression (issue 21): a misspelled `extends` raised alone; fixed, the file then failed again on problems
    of its own. Both come in one PolicyError, and nothing the missing parent may hold (scoring, prompts, a
    category's thresholds) is claimed missing."""
    f = write(tmp_path, "x.yaml", {
        "name": "x", "extends": ref, "colour": "red",
        "scoring": {"templates": ["no placeholder"]},
        "categories": {"drugs": {"thresholds": {"flag": 2}}, "weapons": None,
                       "violence": {"prompts": ["a fight"], "contrast": ["a fight"]},
                       "gambling": {"probe": {"path": "nope.json", "sha256": "0" * 64}}},
    })
    with pytest.raises(PolicyError) as e:
        load_policy(f)
    problems = e.value.problems
    assert missing in problems[0] and "x.yaml: extends" in problems[0]
    text = "\n".join(problems)
    for expected in ["colour: unknown key", "scoring.templates[0]", "categories.drugs.thresholds.flag",
                     "categories.violence: prompts and contrast share", "categories.gambling.probe.path: no such file"]:
        assert expected in text, expected
    assert len(problems) == 6, problems
    # A parent that exists but names a missing parent of its own: both files' problems, each under its file.
    g = write(tmp_path, "y.yaml", {"name": "y", "extends": "parent.yaml",
                                   "categories": {"drugs": {"thresholds": {"flag": 2}}}})
    write(tmp_path, "parent.yaml", {"name": "parent", "extends": "stirct", "scoring": {"top_prompts": -1}})
    with pytest.raises(PolicyError) as e:
        load_policy(g)
    text = "\n".join(e.value.problems)
    assert "parent.yaml: extends" in text and "did you mean 'strict'" in text
    assert "scoring.top_prompts" in text and "categories.drugs.thresholds.flag" in text
    assert len(e.value.problems) == 3, e.value.problems


def test_unknown_category_is_a_policy_error_and_a_key_error():
    with pytest.raises(PolicyError, match="no category 'nope'"):
        load_policy("default").category("nope")


def _with_artifact(tmp: Path, entry: str) -> Path:
    return write(tmp, "p.yaml", "name: a\nversion: '1'\nextends: default\ncategories:\n  sexual:\n"
                                f"    head: {entry}\n")


@pytest.mark.parametrize("entry, match", [
    ("{sha256: " + "0" * 64 + "}", "exactly one of 'path'"),
    ("{path: h.json, url: 'https://e.invalid/h.json', sha256: " + "0" * 64 + "}", "exactly one of 'path'"),
    ("{url: 'ftp://e.invalid/h.json', sha256: " + "0" * 64 + "}", "https:// or http://"),
    ("{url: 'https://e.invalid/h.json', sha256: abc}", "64 hex digits"),
    ("{url: 'https://e.invalid/h.json', sha256: " + "0" * 64 + ", size: 3}", "unknown keys"),
])
def test_artifact_entries_name_a_path_or_a_url_with_a_pin(tmp_path, entry, match):
    with pytest.raises(PolicyError, match=match):
        load_policy(_with_artifact(tmp_path, entry))


def test_a_url_artifact_is_not_fetched_by_loading_the_policy(tmp_path, monkeypatch):
    import socket

    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("policy loading fetched"))
    p = load_policy(_with_artifact(tmp_path, "{url: 'https://e.invalid/x/h.json', sha256: " + "A" * 64 + "}"))
    ref = p.category("sexual").head
    assert (ref.path, ref.url, ref.sha256) == (None, "https://e.invalid/x/h.json", "a" * 64)
    assert str(ref) == "https://e.invalid/x/h.json"
