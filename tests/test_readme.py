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
