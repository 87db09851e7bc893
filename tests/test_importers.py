"""Importing LAION's NSFW heads and the violence vectors: equivalence with the publisher's formula, pins, offline.

LAION's files are read from ../shared (``laion_dir``), never copied into the repository.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from safeclip.cli import main
from safeclip.embed import tag_encoder_id
from safeclip.errors import ArtifactIntegrityError, ArtifactUnavailableError, EncoderMismatchError
from safeclip.heads import load_head
from safeclip.importers import PUBLISHED, import_laion_nsfw, load_published_head, published
from safeclip.policy import load_policy

from conftest import OrthoTexts, unit

N_VECTORS = 10_000


def _laion_reference(path: Path, x: np.ndarray) -> np.ndarray:
    """LAION's published model definition (Normalization, then linear_1..k with ReLU, then sigmoid), in torch,
    float64, with the state_dict loaded strictly: the formula the imported head must reproduce."""
    import torch

    sd = torch.load(path, map_location="cpu", weights_only=True)
    sizes = [sd["linear_1.weight"].shape[1]] + [sd[f"linear_{i}.weight"].shape[0]
                                                for i in range(1, 1 + sum(k.endswith(".weight") for k in sd))]

    class Normalization(torch.nn.Module):
        def __init__(self, d: int) -> None:
            super().__init__()
            self.register_buffer("mean", torch.zeros(d))
            self.register_buffer("variance", torch.ones(d))

        def forward(self, v):
            return (v - self.mean) / (torch.sqrt(self.variance) + 1e-10)

    class Head(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = Normalization(sizes[0])
            for i in range(1, len(sizes)):
                setattr(self, f"linear_{i}", torch.nn.Linear(sizes[i - 1], sizes[i]))

        def forward(self, v):
            v = self.norm(v)
            for i in range(1, len(sizes)):
                v = getattr(self, f"linear_{i}")(v)
                v = torch.relu(v) if i < len(sizes) - 1 else torch.sigmoid(v)
            return v[:, 0]

    model = Head().double()
    model.load_state_dict(sd, strict=True)
    with torch.inference_mode():
        return model(torch.from_numpy(x.astype(np.float64))).numpy()


def _unit_vectors(dim: int, seed: int = 0) -> np.ndarray:
    return unit(np.random.default_rng(seed).normal(size=(N_VECTORS, dim)))


@pytest.mark.parametrize("model", ["ViT-B-32", "ViT-L-14"])
def test_nsfw_head_equals_laions_formula(laion_dir, tmp_path, model) -> None:
    pub = published("laion-nsfw", model)
    done = import_laion_nsfw(model, tmp_path, source=laion_dir / pub.filename)
    head = load_head(done.path, done.sha256, tag_encoder_id(model, "openai"))
    x = _unit_vectors(head.dim)
    ours, ref = head.predict_proba(x), _laion_reference(laion_dir / pub.filename, x)
    diff = float(np.abs(ours - ref).max())
    print(f"\n{model}: punsafe on {N_VECTORS} random unit vectors: max |safeclip - LAION| = {diff:.2e} "
          f"(punsafe range {ref.min():.2e}..{ref.max():.3f}, {np.mean(ref >= 0.5):.2%} >= 0.5)")
    assert diff <= 1e-6
    assert head.output == "punsafe" and done.sha256 == pub.converted_sha256  # the pinned conversion


@pytest.mark.parametrize("model", ["ViT-B-32", "ViT-L-14"])
def test_violence_head_agrees_with_clip_retrievals_argmax(laion_dir, tmp_path, model) -> None:
    pub = published("laion-violence", model)
    done = main(["import", "laion-violence", "--model", model, "--from", str(laion_dir / pub.filename),
                 "--out", str(tmp_path)])
    assert done == 0
    path = tmp_path / f"laion-violence-{model}.json"
    from safeclip.artifacts import sha256_file

    head = load_head(path, sha256_file(path), tag_encoder_id(model, "openai"))
    vectors = np.load(laion_dir / pub.filename, allow_pickle=False)
    x = _unit_vectors(head.dim, seed=1)
    rule = np.argmax(x @ vectors.T, axis=1)  # clip-retrieval: 1 = violent
    ours = (head.predict_proba(x) >= 0.5).astype(int)  # the policy's flag threshold
    agree = int((ours == rule).sum())
    print(f"\n{model}: violence on {N_VECTORS} random unit vectors: argmax agreement {agree}/{N_VECTORS} "
          f"({rule.mean():.1%} violent by the rule)")
    assert agree == N_VECTORS


def test_import_writes_a_pinned_artifact_and_a_snippet_that_loads(mirror, tmp_path, capsys) -> None:
    out = tmp_path / "heads"
    assert main(["import", "laion-nsfw", "--model", "ViT-B-32", "--out", str(out)]) == 0  # from the mirror
    printed = capsys.readouterr().out
    assert tag_encoder_id("ViT-B-32", "openai") in printed
    snippet = (out / "laion-nsfw-ViT-B-32.snippet.yaml").read_text()
    assert "sexual:" in snippet and published("laion-nsfw", "ViT-B-32").converted_sha256 in snippet
    policy = out / "policy.yaml"
    policy.write_text("name: mine\nversion: '1'\nextends: laion-nsfw-b32\ncategories:\n"
                      + "\n".join("  " + line for line in snippet.splitlines() if not line.startswith("#")) + "\n")
    assert main(["policy", "lint", str(policy), "--encoder-id", tag_encoder_id("ViT-B-32", "openai")]) == 0


@pytest.mark.parametrize("signal, model", [("laion-nsfw", "ViT-B-32"), ("laion-violence", "ViT-L-14")])
def test_import_writes_a_complete_policy_that_lints(mirror, tmp_path, capsys, signal, model) -> None:
    """Regression: an import wrote only a snippet to paste. Its policy is the default one with the head deciding its
    category at the thresholds of the shipped LAION policy for that model, and the OpenAI weights as its encoder."""
    out = tmp_path / "heads"
    assert main(["import", signal, "--model", model, "--out", str(out)]) == 0
    path = out / f"{signal}-{model}.policy.yaml"
    assert f"wrote {path}: a complete policy" in capsys.readouterr().out
    space = tag_encoder_id(model, "openai")
    assert main(["policy", "lint", str(path), "--encoder-id", space]) == 0
    policy, default = load_policy(path), load_policy("default")
    shipped = load_policy({"ViT-B-32": "laion-nsfw-b32", "ViT-L-14": "laion-nsfw-l14"}[model])
    assert dict(policy.encoder) == {"model": model, "pretrained": "openai"}
    name = {"laion-nsfw": "sexual", "laion-violence": "violence"}[signal]
    cat = policy.category(name)
    assert (cat.flag, cat.block) == ((0.1, 0.5) if signal == "laion-nsfw" else (0.5, None))
    assert (cat.flag, cat.block) == (shipped.category(name).flag, shipped.category(name).block)
    artifact = out / f"{signal}-{model}.json"
    assert cat.head.local_path() == artifact and cat.head.sha256 == published(signal, model).converted_sha256
    assert load_head(artifact, cat.head.sha256, space).encoder_id == space
    assert cat.prompts == default.category(name).prompts  # the default policy's prompts stay beside the head
    others = [c.name for c in policy.categories if c.name != name]
    assert others == [c.name for c in default.categories if c.name != name]
    assert all(policy.category(n) == default.category(n) for n in others)


def test_import_refuses_files_that_are_not_the_published_one(laion_dir, tmp_path, capsys) -> None:
    l14 = laion_dir / published("laion-nsfw", "ViT-L-14").filename
    assert main(["import", "laion-nsfw", "--model", "ViT-B-32", "--from", str(l14), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "refusing to import it" in err and "ViT-L-14" in err
    other = tmp_path / "other.pth"
    data = bytearray((laion_dir / published("laion-nsfw", "ViT-B-32").filename).read_bytes())
    data[-100] ^= 1
    other.write_bytes(bytes(data))
    with pytest.raises(ArtifactIntegrityError, match="not that of the published"):
        import_laion_nsfw("ViT-B-32", tmp_path, source=other)
    assert not list(tmp_path.glob("*.json"))


class Payload:
    """Unpickling this writes ``marker``: what a hostile pickle would do if it were ever unpickled with code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


@pytest.mark.parametrize("signal, swapped_in", [("laion-nsfw", "other weights"), ("laion-nsfw", "a hostile pickle"),
                                                ("laion-violence", "other weights")])
def test_import_converts_the_bytes_it_checked(laion_dir, tmp_path, monkeypatch, signal, swapped_in) -> None:
    """Regression: `import --from FILE` hashed the file, then read it again by path, so a file swapped in between
    was converted and recorded as the published one. The bytes checked are the bytes converted."""
    import torch

    import safeclip.importers as importers

    pub = published(signal, "ViT-B-32")
    source = tmp_path / "src" / pub.filename
    source.parent.mkdir()
    source.write_bytes((laion_dir / pub.filename).read_bytes())
    other = tmp_path / "other" / pub.filename
    other.parent.mkdir()
    marker = tmp_path / "payload-ran"
    if swapped_in == "a hostile pickle":
        torch.save({"norm.mean": Payload(marker)}, other)
    elif signal == "laion-nsfw":  # a well-formed file of the same layout, other weights
        sd = torch.load(source, map_location="cpu", weights_only=True)
        sd["linear_1.bias"] = sd["linear_1.bias"] + 1.0
        torch.save(sd, other)
    else:
        np.save(other, np.load(source) * 2.0)
    for name in ("sha256_file", "sha256_bytes"):  # every hash the importer takes swaps the file once computed
        if hasattr(importers, name):
            monkeypatch.setattr(importers, name, _swapping(getattr(importers, name), source, other))
    done = importers.import_signal(signal, "ViT-B-32", tmp_path / "out", source=source)
    assert source.read_bytes() == other.read_bytes()  # the swap did happen
    assert done.sha256 == pub.converted_sha256  # the published file's conversion, not the swapped file's
    assert not marker.exists()


def _swapping(real, target: Path, replacement: Path):
    def hashed(*a, **k):
        digest = real(*a, **k)
        target.write_bytes(replacement.read_bytes())
        return digest
    return hashed


def test_offline_import_fails_at_once_with_one_line(offline, tmp_path, capsys) -> None:
    rc = main(["import", "laion-nsfw", "--model", "ViT-L-14", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    pub = published("laion-nsfw", "ViT-L-14")
    assert rc == 2 and len(err.splitlines()) == 1
    for part in (pub.filename, pub.sha256, "SAFECLIP_ARTIFACTS_DIR", pub.url):
        assert part in err
    print(f"\noffline message: {err}")


def test_retargeting_is_explicit_and_recorded(laion_dir, tmp_path, capsys) -> None:
    pub = published("laion-nsfw", "ViT-B-32")
    rc = main(["import", "laion-nsfw", "--model", "ViT-B-32", "--from", str(laion_dir / pub.filename),
               "--out", str(tmp_path), "--retarget-encoder-id", "local-dir|sha256:0123|px:abc"])
    assert rc == 0 and "retargeted" in capsys.readouterr().err
    path = tmp_path / "laion-nsfw-ViT-B-32-retargeted.json"
    from safeclip.artifacts import sha256_file

    head = load_head(path, sha256_file(path), "local-dir|sha256:0123|px:abc")
    assert "no moderation result" in head.metadata["retargeted"]
    assert not list(tmp_path.glob("*.policy.yaml"))  # no encoder: names the weights of that space
    assert head.metadata["trained_in"] == tag_encoder_id("ViT-B-32", "openai")
    with pytest.raises(EncoderMismatchError):  # and it no longer passes as the openai space
        load_head(path, sha256_file(path), tag_encoder_id("ViT-B-32", "openai"))


def test_published_file_converts_once_then_loads_without_torch(mirror, offline) -> None:
    pub = published("laion-nsfw", "ViT-B-32")
    src = mirror / pub.filename
    first = load_published_head(src, pub.sha256)
    violence = published("laion-violence", "ViT-B-32")
    load_published_head(mirror / violence.filename, violence.sha256)
    cached = offline / "cache" / "artifacts" / "imported" / f"{pub.converted_sha256}.json"
    assert cached.is_file()
    code = ("import sys; from safeclip.policy import load_policy; from safeclip.score import Scorer\n"
            "import numpy as np\n"
            "p = load_policy('laion-nsfw-b32')\n"
            "rng = np.random.default_rng(0)\n"
            "f = lambda texts: (lambda v: v / np.linalg.norm(v, axis=1, keepdims=True))(rng.normal(size=(len(texts), 512)))\n"
            f"s = Scorer(p, f, encoder_id={tag_encoder_id('ViT-B-32', 'openai')!r})\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "assert set(s.heads) == {'sexual', 'violence'}\n")
    env = {"SAFECLIP_CACHE_DIR": str(offline / "cache"), "SAFECLIP_ARTIFACTS_DIR": str(mirror),
           "SAFECLIP_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    import os

    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, **env})
    cached.write_text(cached.read_text().replace('"relu"', '"relu" '))  # a damaged cache entry: converted again
    again = load_published_head(src, pub.sha256)
    x = _unit_vectors(512)[:100]
    assert again.decision_function(x).tolist() == first.decision_function(x).tolist()


def test_tampered_published_file_is_refused(offline, tmp_path, laion_dir, monkeypatch) -> None:
    pub = published("laion-nsfw", "ViT-B-32")
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    data = bytearray((laion_dir / pub.filename).read_bytes())
    data[-200] ^= 0x01
    (mirror / pub.filename).write_bytes(bytes(data))
    monkeypatch.setenv("SAFECLIP_ARTIFACTS_DIR", str(mirror))
    from safeclip.policy import load_policy
    from safeclip.score import Scorer

    with pytest.raises(ArtifactIntegrityError, match=pub.sha256):
        Scorer(load_policy("laion-nsfw-b32"), OrthoTexts(512), encoder_id=tag_encoder_id("ViT-B-32", "openai"))
    with pytest.raises(ArtifactIntegrityError, match="pins"):
        load_published_head(mirror / pub.filename, pub.sha256)


def test_l14_head_is_refused_in_a_b32_policy(mirror, tmp_path) -> None:
    pub = published("laion-nsfw", "ViT-L-14")
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"name: wrong\nversion: '1'\nextends: laion-nsfw-b32\ncategories:\n  sexual:\n"
                      f"    head: {{url: {pub.url}, sha256: {pub.sha256}}}\n")
    from safeclip.policy import load_policy
    from safeclip.score import Scorer

    with pytest.raises(EncoderMismatchError, match="ViT-L-14"):
        Scorer(load_policy(policy), OrthoTexts(512), encoder_id=tag_encoder_id("ViT-B-32", "openai"))
    assert main(["policy", "lint", str(policy), "--encoder-id", tag_encoder_id("ViT-B-32", "openai")]) == 2


def test_the_pins_cover_every_published_file() -> None:
    assert {(p.signal, p.model) for p in PUBLISHED} == {(s, m) for s in ("laion-nsfw", "laion-violence")
                                                        for m in ("ViT-B-32", "ViT-L-14")}
    assert all(p.url.startswith("https://raw.githubusercontent.com/LAION-AI/CLIP-based-NSFW-Detector/")
               for p in PUBLISHED)
