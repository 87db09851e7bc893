#!/usr/bin/env python3
"""Print ``safeclip/embed/known_weights.json``: the published checkpoint files safeclip recognises by content.

Only files whose full sha256 is a public fact are listed: OpenAI's CLIP checkpoints, whose openaipublic URL has the
file's sha256 as its folder name (``clip._download`` in OpenAI's CLIP and open_clip's ``download_pretrained_from_url``
check the download against exactly that). Every (architecture, tag) of the installed open_clip that points at such a
URL is an entry; several architectures that load the same file (``ViT-B-32`` and ``ViT-B-32-quickgelu``) share it.

    python .ci/known_weights.py > safeclip/embed/known_weights.json
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


if __name__ == "__main__":
    print(json.dumps(table(), indent=2))
