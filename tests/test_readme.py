"""The README's examples stay true: its policy example passes ``policy lint``."""

from __future__ import annotations

import re
from pathlib import Path

from safeclip.compiled import lint_policy

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_policy_example_lints(tmp_path):
    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if b.startswith("name: my-site"))
    f = tmp_path / "my-site.yaml"
    f.write_text(example)
    policy = lint_policy(f)
    assert policy.id == "my-site@3" and "gambling" in policy.category_names and "weapons" not in policy.category_names


def test_the_bank_example_lints(tmp_path):
    """The banks section's policy fragment, under a policy that extends the default, with the two banks it names."""
    from safeclip.banks import Bank
    from safeclip.embed import known_encoder_id

    block = next(b for b in re.findall(r"```yaml\n(.*?)```", README.read_text(), flags=re.S)
                 if "known_incident" in b)
    Bank.create(tmp_path / "banks" / "incidents", "pdq")
    Bank.create(tmp_path / "banks" / "reviewed-allow", "embedding", dim=512,
                encoder_id=known_encoder_id("ViT-B-32", "laion2b_s34b_b79k"))
    f = tmp_path / "uploads.yaml"
    f.write_text('name: uploads\nversion: "1"\nextends: default\n' + block)
    policy = lint_policy(f)
    assert [b.effect for b in policy.category("known_incident").banks] == ["deny"]
    assert [b.effect for b in policy.category("sexual").banks] == ["allow"]
