"""A local checkpoint file is named by its content: a published one (``known_weights.json``) is its tag's space.

The tiny random-weight checkpoint stands in for a published file by registering its sha256 through the test seam
(replacing ``_identity.known_weights``); the shipped table itself is checked against open_clip's own URLs.
"""

from __future__ import annotations

import hashlib
import json
import os
import runpy
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import TINY_CFG
from safeclip.embed import Encoder, PixelSpec, _identity
from safeclip.embed._identity import KnownWeights, encoder_id_for, known_weights, weights_identity
from safeclip.errors import ModelLoadError

ROOT = Path(__file__).resolve().parents[1]
ARCH = "safeclip-tiny-ident"  # the tiny config registered as an open_clip architecture (see `arch`)
VITB32_SHA = "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af"
VITL14_SHA = "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def register(monkeypatch: pytest.MonkeyPatch, *files: tuple[Path, str], pretrained: str = "openai",
             other_models: tuple[str, ...] = ()) -> None:
    """Make each ``(file, model)`` a published checkpoint of ``model`` with tag ``pretrained`` (the test seam)."""
    table = dict(known_weights())
    for path, model in files:
        digest = sha256(path)
        table[digest] = KnownWeights(digest, model, pretrained, f"https://example.invalid/{digest}/{path.name}",
                                     other_models)
    monkeypatch.setattr(_identity, "known_weights", lambda: table)


@pytest.fixture
def ckpt(tiny_model_dir: Path) -> Path:
    return tiny_model_dir / "open_clip_pytorch_model.bin"


# ------------------------------------------------------------------------------------------ weights_identity
def test_a_registered_file_is_named_by_its_tag(monkeypatch, ckpt, tmp_path):
    assert weights_identity("ViT-B-32", str(ckpt), tmp_path).startswith("sha256:")
    register(monkeypatch, (ckpt, "ViT-B-32"), other_models=("ViT-B-32-quickgelu",))
    assert weights_identity("ViT-B-32", str(ckpt), tmp_path) == "openai" == weights_identity("ViT-B-32", "openai")
    assert weights_identity("ViT-B-32-quickgelu", str(ckpt), tmp_path) == "openai"
    assert _identity.recognised_weights("ViT-B-32", str(ckpt)).model == "ViT-B-32"  # type: ignore[union-attr]
    assert _identity.recognised_weights("ViT-B-32", "openai") is None  # a tag is not a file


def test_the_identity_follows_the_content_not_the_name(monkeypatch, ckpt, tmp_path):
    register(monkeypatch, (ckpt, "ViT-B-32"))
    copy = tmp_path / "elsewhere" / "renamed.pt"
    copy.parent.mkdir()
    shutil.copy(ckpt, copy)
    assert weights_identity("ViT-B-32", str(copy), tmp_path) == "openai"


def test_a_file_with_one_weight_changed_is_not_the_tag(monkeypatch, ckpt, tmp_path):
    import torch

    register(monkeypatch, (ckpt, "ViT-B-32"))
    sd = torch.load(ckpt, map_location="cpu", weights_only=True)
    sd["logit_scale"] = sd["logit_scale"] + 1e-3
    changed = tmp_path / ckpt.name
    torch.save(sd, changed)
    got = weights_identity("ViT-B-32", str(changed), tmp_path)
    assert got == "sha256:" + sha256(changed)[:16]


def test_a_published_file_under_another_architecture_is_refused(monkeypatch, ckpt, tmp_path):
    register(monkeypatch, (ckpt, "ViT-L-14"))
    with pytest.raises(ModelLoadError, match=r"ViT-L-14 checkpoint .* but the model is ViT-B-32") as e:
        weights_identity("ViT-B-32", str(ckpt), tmp_path)
    assert "model='ViT-L-14'" in str(e.value) and e.value.cli_message.endswith("pass --model ViT-L-14")


def test_nothing_else_passes_as_a_tag(ckpt, tmp_path):
    """Neither a published file's name nor its folder makes a file the published one: only its sha256 does."""
    lookalike = tmp_path / VITB32_SHA / "ViT-B-32.pt"
    lookalike.parent.mkdir()
    shutil.copy(ckpt, lookalike)
    got = weights_identity("ViT-B-32", str(lookalike), tmp_path)
    assert got == "sha256:" + sha256(ckpt)[:16]
    spec = PixelSpec(size=224)
    assert encoder_id_for("ViT-B-32", got, spec, "fp32") != encoder_id_for("ViT-B-32", "openai", spec, "fp32")


# ------------------------------------------------------------------------------------------ the shipped table
def test_the_shipped_table_holds_openais_files_by_the_sha256_of_their_urls():
    import open_clip

    table = known_weights()
    for model, sha in (("ViT-B-32", VITB32_SHA), ("ViT-L-14", VITL14_SHA)):
        url = open_clip.get_pretrained_url(model, "openai")
        assert url.split("/")[-2] == sha
        assert (table[sha].model, table[sha].pretrained, table[sha].source) == (model, "openai", url)
        assert f"{model}-quickgelu" in table[sha].models
    assert all(len(sha) == 64 and e.source.split("/")[-2] == sha for sha, e in table.items())


def test_the_shipped_tables_are_what_the_script_computes_from_open_clip():
    script = runpy.run_path(str(ROOT / ".ci" / "known_weights.py"))
    for name, fn in (("known_weights.json", "table"), ("quickgelu_tags.json", "quickgelu_table")):
        shipped = json.loads((ROOT / "safeclip" / "embed" / name).read_text())
        assert shipped == script[fn](), name


def test_a_quickgelu_tag_is_named_by_the_model_it_really_is():
    """Regression: `ViT-B-32` + `openai` ran with GELU (open_clip 3.3 only warns) under the same encoder_id a
    QuickGELU run now has; naming the space by open_clip's -quickgelu architecture keeps old caches apart."""
    from safeclip.embed import PixelSpec
    from safeclip.embed._identity import encoder_id_for, space_arch

    spec = PixelSpec(224)
    assert space_arch("ViT-B-32", "openai") == "ViT-B-32-quickgelu"
    assert encoder_id_for("ViT-B-32", "openai", spec, "fp32") == encoder_id_for("ViT-B-32-quickgelu", "openai",
                                                                               spec, "fp32")
    assert space_arch("ViT-L-14", "laion400m_e32") == "ViT-L-14"  # open_clip's own config: no QuickGELU there
    assert space_arch("ViT-B-32", "laion2b_s34b_b79k") == "ViT-B-32"  # the default: unchanged
    assert space_arch("ViT-B-32", "sha256:0123456789abcdef") == "ViT-B-32"
    assert space_arch("local-dir:/x", "sha256:0123") == "local-dir"


# ------------------------------------------------------------------------------------------ loading
@pytest.fixture(scope="module")
def arch(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny config as a named open_clip architecture (in this process only)."""
    import open_clip

    folder = tmp_path_factory.mktemp("ident-configs")
    (folder / f"{ARCH}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(folder)
    return ARCH


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One QuickGELU model's weights as a state_dict file (what the tag loads) and as a TorchScript archive (as
    OpenAI publishes them)."""
    import open_clip
    import torch

    folder = tmp_path_factory.mktemp("published")
    torch.manual_seed(1)
    model = open_clip.CLIP(**TINY_CFG, quick_gelu=True).eval()
    torch.save(model.state_dict(), folder / "tag.bin")
    size = TINY_CFG["vision_cfg"]["image_size"]
    # OpenAI's archives hold the causal mask as a constant, and their input_resolution as a tensor open_clip drops.
    model.attn_mask = model._buffers.pop("attn_mask")
    model.register_buffer("input_resolution", torch.tensor(size))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (torch.zeros(1, 3, size, size), torch.zeros(1, 77, dtype=torch.long)),
                                 check_trace=False)
    traced.save(str(folder / "TINY.pt"))
    torch.nn.init.zeros_(model.visual.proj)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.jit.trace(model, (torch.zeros(1, 3, size, size), torch.zeros(1, 77, dtype=torch.long)),
                        check_trace=False).save(str(folder / "other.pt"))
    return {"state_dict": folder / "tag.bin", "jit": folder / "TINY.pt", "other_jit": folder / "other.pt"}


@pytest.fixture
def tag(monkeypatch, arch, published) -> str:
    """An ``openai`` tag for the tiny architecture, as open_clip defines OpenAI's: QuickGELU, its own mean/std."""
    import open_clip

    cfg = {"url": "", "hf_hub": "", "file": str(published["state_dict"]), "quick_gelu": True,
           "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3), "interpolation": "bicubic", "resize_mode": "shortest"}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, arch, {"openai": cfg})
    return "openai"


def _uses_quick_gelu(tm) -> bool:
    import open_clip

    return all(isinstance(b.mlp.gelu, open_clip.transformer.QuickGELU) for b in tm.model.visual.transformer.resblocks)


def test_a_tag_trained_with_quick_gelu_loads_with_it(arch, tag):
    """open_clip only warns about a tag's QuickGELU; the weights are loaded into the activation they were trained
    with."""
    from safeclip.embed._torch import TorchModel

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tm = TorchModel(arch, tag)
    assert _uses_quick_gelu(tm)


def test_a_registered_file_loads_as_its_tag(monkeypatch, arch, tag, published):
    """Both a TorchScript archive and a state_dict file: the tag's QuickGELU, preprocessing and weights."""
    from safeclip.embed._torch import TorchModel

    register(monkeypatch, (published["jit"], arch), (published["state_dict"], arch))
    ref = TorchModel(arch, tag)
    assert ref.pixel_spec.mean == (0.5, 0.4, 0.3)
    pixels = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    for path in (published["jit"], published["state_dict"]):
        tm = TorchModel(arch, str(path))
        assert tm.pixel_spec == ref.pixel_spec and _uses_quick_gelu(tm)
        np.testing.assert_allclose(tm.reference(pixels), ref.reference(pixels), rtol=0, atol=1e-6)
        np.testing.assert_allclose(tm.embed_texts(["a photo"]), ref.embed_texts(["a photo"]), rtol=0, atol=1e-6)


def test_an_unregistered_torchscript_archive_is_not_loaded(monkeypatch, arch, published):
    """Only a file whose sha256 is a published one is read with ``weights_only=False``: its bytes are hashed
    before that load, whatever hash is remembered for it."""
    from safeclip.embed._torch import TorchModel

    with pytest.raises(ModelLoadError, match="could not load"):
        TorchModel(arch, str(published["jit"]))
    register(monkeypatch, (published["jit"], arch))
    other = published["other_jit"]
    monkeypatch.setitem(_identity._memo, _identity._stat_key(other), sha256(published["jit"]))
    with pytest.raises(ModelLoadError, match="changed after it was recognised"):
        TorchModel(arch, str(other))


class Payload:
    """Unpickling this writes ``marker``: what a hostile pickle could do with ``weights_only=False``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def swap_after_hashing(monkeypatch: pytest.MonkeyPatch, module, target: Path, replacement: Path) -> None:
    """Every hash ``module`` takes (of a file or of bytes) replaces ``target`` with ``replacement`` once computed."""
    for name in ("sha256_file", "sha256_bytes"):
        real = getattr(module, name, None)
        if real is not None:
            def hashed(*a, _real=real, **k):
                digest = _real(*a, **k)
                shutil.copy(replacement, target)
                return digest

            monkeypatch.setattr(module, name, hashed)


def test_a_torchscript_file_swapped_after_its_hash_is_not_what_loads(monkeypatch, arch, tag, published, tmp_path):
    """Regression: a recognised TorchScript archive was hashed, then opened again by path with weights_only=False,
    so a file swapped in between ran its pickle. The bytes hashed are the bytes loaded."""
    import torch

    from safeclip.embed import _torch
    from safeclip.embed._torch import TorchModel

    target = tmp_path / "ViT.pt"
    shutil.copy(published["jit"], target)
    register(monkeypatch, (target, arch))
    marker, hostile = tmp_path / "payload-ran", tmp_path / "hostile.pt"
    torch.save({"visual.proj": Payload(marker)}, hostile)
    swap_after_hashing(monkeypatch, _torch, target, hostile)
    try:
        tm = TorchModel(arch, str(target))
    finally:
        assert not marker.exists(), "the swapped file's pickle ran"
    assert target.read_bytes() == hostile.read_bytes()  # the swap did happen
    pixels = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    np.testing.assert_allclose(tm.reference(pixels), TorchModel(arch, tag).reference(pixels), rtol=0, atol=1e-6)


def test_an_encoder_on_a_registered_file_is_in_its_tags_space(monkeypatch, arch, tag, published, cache_dir):
    """End to end (torch runtime: the tiny architecture exists only in this process, not in an export child)."""
    register(monkeypatch, (published["jit"], arch))
    ref = Encoder(arch, tag, device="cpu", cache_dir=cache_dir, runtime="torch")
    enc = Encoder(arch, str(published["jit"]), device="cpu", cache_dir=cache_dir, runtime="torch")
    assert enc.encoder_id == ref.encoder_id and enc.encoder_id.startswith(f"{arch}|openai|px:")
    img = Image.new("RGB", (80, 60), (200, 30, 30))
    np.testing.assert_allclose(enc.embed_images([img]), ref.embed_images([img]), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------ the hub's copies
# open_clip downloads the `openai` tag from the hub (timm/vit_base_patch32_clip_224.openai/open_clip_model.safetensors
# ...) when huggingface_hub is installed: a path into that cache is the tag's file, by the cache's own record.
HUB_REPO = "safeclip-test/tiny.openai"
HUB_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def register_hub(monkeypatch: pytest.MonkeyPatch, model: str, repo: str = HUB_REPO) -> None:
    """Make ``repo`` the hub's copy of a published ``model`` file with tag ``openai`` (the test seam; the published
    file's own sha256 is never seen here)."""
    table = dict(known_weights())
    sha = "f" * 64
    table[sha] = KnownWeights(sha, model, "openai", f"https://example.invalid/{sha}/TINY.pt", (), hf_hub=repo,
                              hf_hub_files=HUB_FILES)
    monkeypatch.setattr(_identity, "known_weights", lambda: table)


def hub_file(cache: Path, repo: str, name: str, data: bytes, *, blob: str | None = None,
             commit: str = "a" * 40) -> Path:
    """``data`` as huggingface_hub caches a download: ``blobs/<sha256>`` and a snapshot link to it."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    blob_path = folder / "blobs" / (blob or hashlib.sha256(data).hexdigest())
    blob_path.parent.mkdir(parents=True, exist_ok=True)
    blob_path.write_bytes(data)
    snap = folder / "snapshots" / commit / name
    snap.parent.mkdir(parents=True, exist_ok=True)
    snap.symlink_to(Path("..", "..", "blobs", blob_path.name))
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    return snap


@pytest.fixture(scope="module")
def hub_weights(published: dict[str, Path]) -> dict[str, bytes]:
    """The tiny QuickGELU model's weights as the hub serves the tag: a state_dict file and its safetensors form."""
    import torch
    from safetensors.torch import save

    sd = torch.load(published["state_dict"], map_location="cpu", weights_only=True)
    return {"open_clip_pytorch_model.bin": published["state_dict"].read_bytes(),
            "open_clip_model.safetensors": save({k: v.contiguous() for k, v in sd.items()})}


@pytest.mark.parametrize("name", HUB_FILES)
def test_a_file_in_the_hub_cache_of_a_tags_repo_is_named_by_the_tag(monkeypatch, hub_weights, tmp_path, name):
    """Regression: a path into huggingface_hub's cache of timm/..openai was its own `sha256:` space, although it is
    the very file `--pretrained openai` loads."""
    path = hub_file(tmp_path / "hub", HUB_REPO, name, hub_weights[name])
    register_hub(monkeypatch, "ViT-B-32")
    assert weights_identity("ViT-B-32", str(path), tmp_path) == "openai"
    known = _identity.recognised_weights("ViT-B-32", str(path), tmp_path)
    assert known is not None and known.sha256 == sha256(path) and HUB_REPO in known.source
    with pytest.raises(ModelLoadError, match="but the model is ViT-L-14"):
        weights_identity("ViT-L-14", str(path), tmp_path)


def test_only_the_hub_caches_own_record_makes_a_hub_copy(monkeypatch, hub_weights, tmp_path):
    """The snapshot must link to the blob named by the sha256 the hub declared, the bytes must have that sha256, and
    the repository and file name must be the tag's: anything else keeps its own `sha256:` space."""
    register_hub(monkeypatch, "ViT-B-32")
    data = hub_weights["open_clip_model.safetensors"]
    own = "sha256:" + hashlib.sha256(data).hexdigest()[:16]
    cases = {
        "another repository": hub_file(tmp_path / "a", "safeclip-test/tiny.laion", HUB_FILES[0], data),
        "another file name": hub_file(tmp_path / "b", HUB_REPO, "pytorch_model.bin", data),
        "bytes not the blob's": hub_file(tmp_path / "c", HUB_REPO, HUB_FILES[0], data, blob="0" * 64),
    }
    copied = tmp_path / "d" / ("models--" + HUB_REPO.replace("/", "--")) / "snapshots" / ("a" * 40) / HUB_FILES[0]
    copied.parent.mkdir(parents=True)
    copied.write_bytes(data)  # a plain file: no record of what the hub declared
    cases["a plain copy"] = copied
    outside = tmp_path / "e" / HUB_FILES[0]
    outside.parent.mkdir()
    outside.symlink_to(hub_file(tmp_path / "f", HUB_REPO, HUB_FILES[0], data).resolve())
    cases["a link to the blob from elsewhere"] = outside
    for what, path in cases.items():
        assert weights_identity("ViT-B-32", str(path), tmp_path) == own, what


def test_a_torchscript_archive_in_a_hub_cache_is_not_loaded(monkeypatch, arch, published, tmp_path):
    """The hub cache's record names a file; it is no published sha256, so it never grants `weights_only=False`."""
    from safeclip.embed._torch import TorchModel

    path = hub_file(tmp_path / "hub", HUB_REPO, "open_clip_pytorch_model.bin", published["jit"].read_bytes())
    register_hub(monkeypatch, arch)
    assert weights_identity(arch, str(path), tmp_path) == "openai"
    monkeypatch.setattr("torch.jit.load", lambda *a, **k: pytest.fail("a TorchScript archive was loaded"))
    with pytest.raises(ModelLoadError, match="TorchScript"):
        TorchModel(arch, str(path))


def test_the_tag_from_the_hub_and_a_path_into_its_cache_are_one_space(monkeypatch, arch, hub_weights, tmp_path,
                                                                     cache_dir):
    """`--pretrained openai` as open_clip downloads it (from the hub cache, offline here) and `--pretrained <that
    cached file>`: one encoder_id, the same embeddings."""
    import open_clip

    hub = tmp_path / "hub"
    paths = {name: hub_file(hub, HUB_REPO, name, data) for name, data in hub_weights.items()}
    cfg = {"url": "", "hf_hub": f"{HUB_REPO}/", "quick_gelu": True, "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3),
           "interpolation": "bicubic", "resize_mode": "shortest"}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, arch, {"openai": cfg})
    monkeypatch.setenv("SAFECLIP_WEIGHTS_DIR", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    register_hub(monkeypatch, arch)
    ref = Encoder(arch, "openai", device="cpu", cache_dir=cache_dir, runtime="torch")
    img = Image.new("RGB", (80, 60), (200, 30, 30))
    for path in paths.values():
        enc = Encoder(arch, str(path), device="cpu", cache_dir=cache_dir, runtime="torch")
        assert enc.encoder_id == ref.encoder_id and enc.encoder_id.startswith(f"{arch}|openai|px:")
        np.testing.assert_allclose(enc.embed_images([img]), ref.embed_images([img]), rtol=0, atol=1e-6)


def test_the_shipped_table_names_the_hub_repositories_open_clip_downloads_the_tags_from():
    import open_clip

    table = known_weights()
    entry = table[VITB32_SHA]
    assert (entry.hf_hub, entry.hf_hub_files) == ("timm/vit_base_patch32_clip_224.openai", HUB_FILES)
    for e in table.values():
        assert open_clip.get_pretrained_cfg(e.model, e.pretrained)["hf_hub"].rstrip("/") == e.hf_hub


# ------------------------------------------------------------------------------------------ the on-disk memo
@pytest.mark.parametrize("form", ["plain", "bad mac", "another entry's mac"])
def test_a_forged_checkpoint_hash_memo_is_ignored_and_the_file_hashed_again(monkeypatch, ckpt, tmp_path, form):
    """Anyone who can write the cache folder could claim that other weights are a published checkpoint: the memo
    is believed only with this user's MAC, so the file is hashed again and keeps its own identity."""
    published_file = tmp_path / "published.bin"
    published_file.write_bytes(b"the published checkpoint")
    register(monkeypatch, (published_file, "ViT-B-32"))
    cache = tmp_path / "cache"
    cache.mkdir()
    random_weights = tmp_path / "random.bin"
    shutil.copy(ckpt, random_weights)
    monkeypatch.setattr(_identity, "_memo", {})  # a fresh process: nothing remembered in memory
    key, claim = _identity._stat_key(random_weights), sha256(published_file)
    if form == "plain":  # the memo's earlier form: a bare digest
        entry: object = claim
    elif form == "bad mac":
        entry = {"sha256": claim, "mac": "0" * 64}
    else:  # a real MAC of this user's, for another file's entry
        weights_identity("ViT-B-32", str(published_file), cache)
        memo = json.loads((cache / _identity._MEMO_FILE).read_text())
        entry = dict(memo[_identity._stat_key(published_file)])
        monkeypatch.setattr(_identity, "_memo", {})
    (cache / _identity._MEMO_FILE).write_text(json.dumps({key: entry}))
    assert weights_identity("ViT-B-32", str(random_weights), cache) == "sha256:" + sha256(ckpt)[:16]
    monkeypatch.setattr(_identity, "_memo", {})
    stored = json.loads((cache / _identity._MEMO_FILE).read_text())[key]
    assert stored["sha256"] == sha256(ckpt)  # replaced by the real hash, signed: the next start only stats
    monkeypatch.setattr(_identity, "sha256_file", lambda p: pytest.fail("hashed again"))
    assert weights_identity("ViT-B-32", str(random_weights), cache) == "sha256:" + sha256(ckpt)[:16]


def test_rewriting_a_checkpoint_in_place_with_its_old_mtime_is_not_the_remembered_file(ckpt, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    f = tmp_path / "w.bin"
    shutil.copy(ckpt, f)
    before = weights_identity("ViT-B-32", str(f), cache)
    st = f.stat()
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    with open(f, "r+b") as out:  # same inode, same size
        out.write(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # the mtime set back: only the change time tells
    monkeypatch.setattr(_identity, "_memo", {})
    assert weights_identity("ViT-B-32", str(f), cache) == "sha256:" + hashlib.sha256(bytes(data)).hexdigest()[:16]
    assert before != weights_identity("ViT-B-32", str(f), cache)
