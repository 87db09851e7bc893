"""The embed stage against open_clip's own pipeline, on a tiny random-weight checkpoint loaded like a user would."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import TINY_CFG
from safeclip.embed import Encoder, PixelSpec, PromptCache, prepare_pixels
from safeclip.errors import ModelLoadError


def reference_embeddings(model_str: str, paths) -> np.ndarray:
    """What open_clip itself gives: encode_image(preprocess(PIL image)), L2-normalised."""
    import open_clip
    import torch

    model, _, preprocess = open_clip.create_model_and_transforms(model_str)
    model.eval()
    with torch.inference_mode():
        x = torch.stack([preprocess(Image.open(p)) for p in paths])
        return torch.nn.functional.normalize(model.encode_image(x), dim=-1).numpy()


@pytest.fixture(scope="module")
def sample(photos):
    # JPEGs of several sizes (draft decoding applies to them) plus PNG and WebP.
    jpgs = [p for p in photos if p.suffix.lower() == ".jpg"][:6]
    others = [p for p in photos if p.suffix.lower() in {".png", ".webp"}][:2]
    return jpgs + others


def test_pixels_match_open_clip_transform_exactly(tiny_model, sample):
    import open_clip

    _, _, preprocess = open_clip.create_model_and_transforms(tiny_model)
    spec = PixelSpec(size=64)
    for p in sample[:4]:
        ref = preprocess(Image.open(p)).numpy()
        ours = prepare_pixels(Image.open(p).convert("RGB"), spec).astype(np.float32) / 255.0
        ours = (ours - np.array(spec.mean)) / np.array(spec.std)
        np.testing.assert_allclose(ours.transpose(2, 0, 1), ref, atol=1e-5)


@pytest.mark.parametrize("batch_size", [1, 2, 3, 8])
def test_moderator_embed_equals_open_clip_at_every_batch_size(tiny_model, cache_dir, sample, batch_size):
    from safeclip import Moderator

    ref = reference_embeddings(tiny_model, sample)
    exact = Moderator(model=tiny_model, device="cpu", batch_size=batch_size, fast_decode=False, cache_dir=cache_dir)
    emb = exact.embed(sample)
    assert emb.shape == ref.shape and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert (emb * ref).sum(1).min() >= 0.9999
    fast = Moderator(model=tiny_model, device="cpu", batch_size=batch_size, cache_dir=cache_dir)
    assert (fast.embed(sample) * ref).sum(1).min() >= 0.999


def test_checkpoint_file_with_registered_architecture(tmp_path, tiny_model_dir, cache_dir):
    """`model=<arch name>, pretrained=<checkpoint path>`: the other local path a user takes."""
    import open_clip

    cfg_dir = tmp_path / "configs"
    cfg_dir.mkdir()
    (cfg_dir / "safeclip-tiny-test.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(cfg_dir)
    ckpt = tiny_model_dir / "open_clip_pytorch_model.bin"
    # An architecture registered at run time exists only in this process, not in an export child: torch runtime.
    enc = Encoder("safeclip-tiny-test", str(ckpt), device="cpu", cache_dir=cache_dir, runtime="torch")
    ref = Encoder(f"local-dir:{tiny_model_dir}", device="cpu", cache_dir=cache_dir)
    img = Image.new("RGB", (80, 60), (200, 30, 30))
    np.testing.assert_allclose(enc.embed_images([img]), ref.embed_images([img]), atol=1e-6)
    assert "sha256:" in enc.encoder_id and enc.encoder_id != ref.encoder_id


def test_checkpoint_lookup_in_a_folder_matches_open_clip(tmp_path):
    """The weights identity of a local-dir: model hashes the file open_clip will load, found without open_clip."""
    from open_clip.factory import _find_checkpoint_in_dir

    from safeclip.embed._identity import find_checkpoint_in_dir

    for i, names in enumerate((["b.bin", "a.pth"], ["pytorch_model.bin", "model.safetensors", "x.safetensors"],
                  ["z.bin", "open_clip_pytorch_model.bin", "open_clip_model.safetensors"], ["q.pth"])):
        folder = tmp_path / f"case{i}"
        folder.mkdir()
        for n in names:
            (folder / n).write_bytes(b"x")
        assert str(find_checkpoint_in_dir(folder)) == _find_checkpoint_in_dir(folder)
    (tmp_path / "empty").mkdir()
    assert find_checkpoint_in_dir(tmp_path / "empty") is None


def test_checkpoint_hash_is_remembered_on_disk(tiny_model_dir, tmp_path, monkeypatch):
    """A warm start only stats the checkpoint; a changed file is hashed again."""
    import shutil

    from safeclip.embed import _identity

    ckpt = tmp_path / "w.bin"
    shutil.copy(tiny_model_dir / "open_clip_pytorch_model.bin", ckpt)
    first = _identity.weights_identity("ViT-B-32", str(ckpt), tmp_path)
    monkeypatch.setattr(_identity, "_memo", {})  # a new process
    monkeypatch.setattr(_identity, "sha256_file", lambda p: pytest.fail("hashed again"))
    assert _identity.weights_identity("ViT-B-32", str(ckpt), tmp_path) == first
    monkeypatch.undo()
    with open(ckpt, "ab") as f:
        f.write(b"more")
    assert _identity.weights_identity("ViT-B-32", str(ckpt), tmp_path) != first


def test_missing_weights_raise_model_load_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="does not exist"):
        Encoder("ViT-B-32", str(tmp_path / "missing.pt"), device="cpu")
    with pytest.raises(ModelLoadError, match="local checkpoint"):
        Encoder("ViT-B-32", "no-such-tag", device="cpu")
    with pytest.raises(ModelLoadError, match="never moderates with random weights"):
        Encoder("ViT-B-16", None, device="cpu")
    with pytest.raises(ModelLoadError):
        Encoder(f"local-dir:{tmp_path}", device="cpu")


def test_trimmed_text_encoding_equals_full_context(tiny_model, tiny_encoder):
    import torch

    from safeclip.embed._torch import TorchModel

    tm = TorchModel(tiny_model)
    texts = ["a photo of a cat.", "x", "a long prompt " + "with many words " * 8]
    with torch.inference_mode():
        full = torch.nn.functional.normalize(tm.model.encode_text(tm.tokenizer(texts)), dim=-1).numpy()
    np.testing.assert_allclose(tm.embed_texts(texts), full, atol=1e-5)
    np.testing.assert_allclose(tiny_encoder.embed_texts(texts, use_cache=False), full, atol=1e-5)


@pytest.mark.slow
def test_prompt_cache_is_reused_across_encoders(tiny_model, tmp_path, monkeypatch):
    first = Encoder(tiny_model, device="cpu", cache_dir=tmp_path)
    a = first.embed_texts(["a red apple", "a blue car"])
    second = Encoder(tiny_model, device="cpu", cache_dir=tmp_path)
    calls = []
    monkeypatch.setattr(second, "_compute_texts", lambda t: calls.append(t) or first._compute_texts(t))
    np.testing.assert_array_equal(second.embed_texts(["a red apple", "a blue car"]), a)
    assert calls == []
    second.embed_texts(["a red apple", "something new"])
    assert calls == [["something new"]]
    # the cache serves prompts without any model
    np.testing.assert_array_equal(PromptCache(first.encoder_id, tmp_path).get(["a blue car"])[0], a[1])


@pytest.mark.slow
def test_corrupt_prompt_cache_is_only_a_cache(tiny_model, tmp_path):
    enc = Encoder(tiny_model, device="cpu", cache_dir=tmp_path)
    enc.embed_texts(["a dog"])
    enc.prompt_cache.path.write_bytes(b"not a zip")
    again = Encoder(tiny_model, device="cpu", cache_dir=tmp_path)
    assert again.embed_texts(["a dog"]).shape == (1, again.dim)


def test_prepare_pixels_handles_small_and_odd_images():
    spec = PixelSpec(size=32)
    for size in [(1, 1), (5, 300), (300, 5), (32, 32), (33, 31)]:
        assert prepare_pixels(Image.new("RGB", size), spec).shape == (32, 32, 3)
    assert prepare_pixels(Image.new("L", (40, 50)), spec).shape == (32, 32, 3)
