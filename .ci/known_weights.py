#!/usr/bin/env python3
"""Print ``safeclip/embed/known_weights.json``: the published checkpoint files safeclip recognises by content.

Only files whose full sha256 is a public fact are listed: OpenAI's CLIP checkpoints, whose openaipublic URL has the
file's sha256 as its folder name (``clip._download`` in OpenAI's CLIP and open_clip's ``download_pretrained_from_url``
check the download against exactly that). Every (architecture, tag) of the installed open_clip that points at such a
URL is an entry; several architectures that load the same file (``ViT-B-32`` and ``ViT-B-32-quickgelu``) share it.

    python .ci/known_weights.py > safeclip/embed/known_weights.json
    python .ci/known_weights.py --quickgelu > safeclip/embed/quickgelu_tags.json

``--quickgelu`` prints the other table: per architecture open_clip defines with GELU, the tags whose weights were
trained with QuickGELU (their pretrained config says ``quick_gelu``), which safeclip names by the ``-quickgelu``
variant of the architecture: the model they really are.
"""

from __future__ import annotations

import json
import re
from typing import Any

_OPENAI_URL = re.compile(r"https://openaipublic\.azureedge\.net/clip/models/([0-9a-f]{64})/[^/]+")


def table() -> dict[str, dict[str, Any]]:
    """``{sha256: {"model", "other_models", "pretrained", "source"}}`` from the installed open_clip's configs."""
    import open_clip

    found: dict[str, dict[str, Any]] = {}
    for model, tag in open_clip.list_pretrained():
        url = open_clip.get_pretrained_cfg(model, tag).get("url", "")
        m = _OPENAI_URL.fullmatch(url)
        if m is None:
            continue
        entry = found.setdefault(m.group(1), {"model": model, "other_models": [], "pretrained": tag, "source": url})
        if (entry["pretrained"], entry["source"]) != (tag, url):
            raise SystemExit(f"{m.group(1)} is both {entry['model']}/{entry['pretrained']} and {model}/{tag}")
        if model != entry["model"]:
            entry["other_models"].append(model)
    return dict(sorted(found.items(), key=lambda kv: (kv[1]["model"], kv[0])))


def quickgelu_table() -> dict[str, list[str]]:
    """``{architecture: [tags trained with QuickGELU]}`` for architectures open_clip defines with GELU."""
    import open_clip

    found: dict[str, list[str]] = {}
    for model, tag in open_clip.list_pretrained():
        if open_clip.get_pretrained_cfg(model, tag).get("quick_gelu") and not model.endswith("-quickgelu"):
            found.setdefault(model, []).append(tag)
    return {m: sorted(tags) for m, tags in sorted(found.items())}


if __name__ == "__main__":
    import sys

    print(json.dumps(quickgelu_table() if "--quickgelu" in sys.argv[1:] else table(), indent=2))
