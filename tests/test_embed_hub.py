"""Weights from the Hugging Face hub (safeclip.embed._hub): offline is one line in seconds, a cached model still loads.

The hub is made unreachable on purpose (``HF_ENDPOINT`` at a closed local port) and the hub cache is a fresh folder,
so these tests mean the same on a connected machine: nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from safeclip.embed import Encoder
from safeclip.embed._hub import hub_offline_reason, local_weights_error
from safeclip.errors import ModelLoadError

VITB32_SHA = "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af"
UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused at once


@pytest.fixture
def offline_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """This process's environment with an unreachable hub and empty caches (also returned, for subprocesses)."""
    for k in list(os.environ):
        if k.startswith(("SAFECLIP_", "HF_")) or k == "TRANSFORMERS_OFFLINE":
            monkeypatch.delenv(k)
    monkeypatch.setenv("HF_ENDPOINT", UNREACHABLE)
    monkeypatch.setenv("SAFECLIP_WEIGHTS_DIR", str(tmp_path / "hub"))  # open_clip's cache_dir= for the hub
    monkeypatch.setenv("SAFECLIP_CACHE_DIR", str(tmp_path / "sc"))
    return dict(os.environ)


def _check(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    img = tmp_path / "img.jpg"
    Image.new("RGB", (32, 32), (90, 120, 200)).save(img)
    # the timeout is a hang guard, not a benchmark: open_clip's own retries took about a minute
    return subprocess.run([sys.executable, "-m", "safeclip", "check", str(img), *args], capture_output=True,
                          text=True, env=env, timeout=20, stdin=subprocess.DEVNULL)


@pytest.mark.slow
@pytest.mark.parametrize("offline", ["unreachable", "HF_HUB_OFFLINE"])
def test_default_weights_offline_is_one_cli_line(tmp_path, offline_env, offline):
    if offline == "HF_HUB_OFFLINE":
        offline_env["HF_HUB_OFFLINE"] = "1"
    p = _check(tmp_path, offline_env)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    line = lines[0]
    assert line.startswith("safeclip: error: cannot download the CLIP weights ViT-B-32 laion2b_s34b_b79k")
    assert ("HF_HUB_OFFLINE is set" if offline == "HF_HUB_OFFLINE" else "127.0.0.1) cannot be reached") in line
    assert "--model ViT-B-32 --pretrained /path/to/open_clip_pytorch_model.bin" in line
    assert "pretrained='" not in line and "WARNING" not in p.stderr and "ERROR:root" not in p.stderr
    assert len(line) < 320


def test_the_python_api_gets_python_syntax(offline_env, tmp_path):
    with pytest.raises(ModelLoadError) as ei:
        Encoder(cache_dir=tmp_path / "sc", runtime="torch", device="cpu")
    e = ei.value
    assert "pretrained='/path/to/open_clip_pytorch_model.bin'" in str(e) and "--pretrained" not in str(e)
    assert "--pretrained /path/to/open_clip_pytorch_model.bin" in e.cli_message


def test_an_openai_tag_offline_names_openais_file(offline_env, tmp_path):
    """Regression: the hint named the hub's open_clip_pytorch_model.bin, whose copy is its own `sha256:` space, so
    artifacts made for the `openai` space (LAION's heads) refused it. It names OpenAI's published file, which safeclip
    recognises as the tag."""
    with pytest.raises(ModelLoadError) as ei:
        Encoder("ViT-B-32", "openai", cache_dir=tmp_path / "sc", runtime="torch", device="cpu")
    e = ei.value
    url = "https://openaipublic.azureedge.net/clip/models/" + VITB32_SHA + "/ViT-B-32.pt"
    assert "pretrained='/path/to/ViT-B-32.pt'" in str(e) and url in str(e)
    assert "--pretrained /path/to/ViT-B-32.pt" in e.cli_message and url in e.cli_message
    assert "open_clip_pytorch_model.bin" not in str(e) + e.cli_message


def test_a_model_in_the_hub_cache_loads_offline(tiny_model_dir, offline_env, tmp_path):
    """Unreachable hub, weights in the local hub cache: they load, as huggingface_hub's offline mode would."""
    commit = "0" * 40
    repo = Path(offline_env["SAFECLIP_WEIGHTS_DIR"]) / "models--safeclip-test--tiny"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for name in ("open_clip_config.json", "open_clip_pytorch_model.bin"):
        shutil.copy(tiny_model_dir / name, snap / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    enc = Encoder("hf-hub:safeclip-test/tiny", cache_dir=tmp_path / "sc", runtime="torch", device="cpu")
    assert enc.embed_texts(["a photo"], use_cache=False).shape == (1, enc.dim)
    import huggingface_hub.constants

    assert huggingface_hub.constants.HF_HUB_OFFLINE is False  # the offline mode was for the load only


def test_probe(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", UNREACHABLE)
    assert hub_offline_reason(timeout=1.0) == "the Hugging Face hub (127.0.0.1) cannot be reached"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_offline_reason() == "HF_HUB_OFFLINE is set"


def test_local_weights_error_forms():
    e = local_weights_error("cannot download", "ViT-L-14-quickgelu", "openai")
    assert "model='ViT-L-14-quickgelu', pretrained='/path/to/ViT-L-14.pt'" in str(e)
    assert "--model ViT-L-14-quickgelu --pretrained /path/to/ViT-L-14.pt" in e.cli_message
    e = local_weights_error("cannot download", "ViT-L-14", "laion2b_s32b_b82k")  # no published file: the generic one
    assert "pretrained='/path/to/open_clip_pytorch_model.bin'" in str(e)
    e = local_weights_error("cannot download", "hf-hub:org/repo")
    assert str(e).endswith("model='ViT-B-32', pretrained='/path/to/open_clip_pytorch_model.bin' "
                           "(or model='local-dir:/path/to/folder')")
    assert e.cli_message.endswith("--model ViT-B-32 --pretrained /path/to/open_clip_pytorch_model.bin "
                                  "(or --model local-dir:/path/to/folder)")
