#!/usr/bin/env python3
"""Print ``safeclip/embed/known_weights.json``: the published checkpoint files safeclip recognises by content.

Only files whose full sha256 is a public fact are listed: OpenAI's CLIP checkpoints, whose openaipublic URL has the
file's sha256 as its folder name (``clip._download`` in OpenAI's CLIP and open_clip's ``download_pretrained_from_url``
check the download against exactly that). Every (architecture, tag) of the installed open_clip that points at such a
URL is an entry; several architectures that load the same file (``ViT-B-32`` and ``ViT-B-32-quickgelu``) share it.

An entry also names the Hugging Face hub repository open_clip's config gives for the same tag (``hf_hub``, e.g.
``timm/vit_base_patch32_clip_224.openai``: open_clip downloads the tag from there when huggingface_hub is installed)
and the file names open_clip reads in it (``hf_hub_files``: the safetensors alternative first, as
``download_pretrained_from_hf`` tries them). Those files' sha256 are not in open_clip's configs; safeclip recognises
them through the hub cache's own record of them instead (see ``safeclip/embed/_identity.py``).

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


def _hub_files(hf_hub: str) -> tuple[str, list[str]]:
    """The repository and the file names ``open_clip.pretrained.download_pretrained_from_hf`` reads for ``hf_hub``
    (``org/name/`` or ``org/name/file``): the safetensors alternative it tries first, then the file itself."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    repo, filename = hf_hub.rstrip("/"), HF_WEIGHTS_NAME
    if not hf_hub.endswith("/"):
        repo, _, filename = hf_hub.rpartition("/")
    if filename == HF_WEIGHTS_NAME:
        return repo, [HF_SAFE_WEIGHTS_NAME, filename]
    if filename.endswith((".bin", ".pth")):
        return repo, [filename[:-4] + ".safetensors", filename]
    return repo, [filename]


def table() -> dict[str, dict[str, Any]]:
    """``{sha256: {"model", "other_models", "pretrained", "source", "hf_hub", "hf_hub_files"}}`` from the installed
    open_clip's configs."""
    import open_clip

    found: dict[str, dict[str, Any]] = {}
    for model, tag in open_clip.list_pretrained():
        cfg = open_clip.get_pretrained_cfg(model, tag)
        url = cfg.get("url", "")
        m = _OPENAI_URL.fullmatch(url)
        if m is None:
            continue
        repo, files = _hub_files(cfg["hf_hub"]) if cfg.get("hf_hub") else ("", [])
        entry = found.setdefault(m.group(1), {"model": model, "other_models": [], "pretrained": tag, "source": url,
                                              "hf_hub": repo, "hf_hub_files": files})
        if (entry["pretrained"], entry["source"], entry["hf_hub"], entry["hf_hub_files"]) != (tag, url, repo, files):
            raise SystemExit(f"{m.group(1)} is both {entry['model']}/{entry['pretrained']} and {model}/{tag}, or "
                             "their hub copies differ")
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
