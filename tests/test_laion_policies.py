"""The shipped LAION policies, and LAION's heads end to end behind a random-weight checkpoint (mechanics only).

Behind random weights a head's output is no moderation result: these tests check that the signal flows (fetched,
pinned, scored, reported as ``punsafe``, re-scored without the model), never what it says about an image.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from safeclip.cli import main
from safeclip.embed import Encoder, tag_encoder_id
from safeclip.errors import EncoderMismatchError
from safeclip.importers import import_laion_nsfw, import_laion_violence, published
from safeclip.policy import load_policy

from conftest import OrthoTexts


@pytest.fixture(scope="session")
def space512(tiny512_model, cache_dir) -> str:
    return Encoder(tiny512_model, cache_dir=cache_dir, device="cpu").encoder_id


@pytest.fixture
def retargeted(tmp_path, laion_dir, space512):
    """A policy beside LAION's B/32 heads imported into the tiny 512-d model's space (the explicit option)."""
    out = tmp_path / "pol"
    nsfw = import_laion_nsfw("ViT-B-32", out, source=laion_dir / published("laion-nsfw", "ViT-B-32").filename,
                             encoder_id=space512)
    vio = import_laion_violence("ViT-B-32", out, source=laion_dir / published("laion-violence", "ViT-B-32").filename,
                                encoder_id=space512)
    return out, nsfw, vio


def _write_policy(folder, heads: dict[str, str]) -> str:
    path = folder / "policy.yaml"
    path.write_text("name: laion-retargeted\nversion: '1'\nextends: laion-nsfw-b32\ncategories:\n"
                    + "".join(f"  {cat}:\n    head: {ref}\n" for cat, ref in heads.items()))
    return str(path)


@pytest.mark.parametrize("name, model", [("laion-nsfw-b32", "ViT-B-32"), ("laion-nsfw-l14", "ViT-L-14")])
def test_shipped_policies_pin_laions_files_and_lint_through_the_mirror(mirror, capsys, name, model):
    p = load_policy(name)
    assert dict(p.encoder) == {"model": model, "pretrained": "openai"}
    sexual, violence = p.category("sexual"), p.category("violence")
    assert (sexual.head.sha256, violence.head.sha256) == (published("laion-nsfw", model).sha256,
                                                          published("laion-violence", model).sha256)
    assert (sexual.flag, sexual.block, violence.flag, violence.block) == (0.1, 0.5, 0.5, None)
    assert sexual.prompts == load_policy("default").category("sexual").prompts  # prompts beside the head
    assert main(["policy", "lint", name, "--encoder-id", tag_encoder_id(model, "openai")]) == 0
    assert "ok" in capsys.readouterr().out


def test_check_reports_the_head_signal_as_punsafe(tmp_path, retargeted, tiny512_model, photos, cache_dir, capsys,
                                                   monkeypatch):
    monkeypatch.setenv("SAFECLIP_CACHE_DIR", str(cache_dir))
    out, nsfw, vio = retargeted
    policy = _write_policy(out, {"sexual": f"{{path: {nsfw.path.name}, sha256: {nsfw.sha256}}}",
                                 "violence": f"{{path: {vio.path.name}, sha256: {vio.sha256}}}"})
    rc = main(["check", str(photos[0]), "--policy", policy, "--model", tiny512_model, "--device", "cpu", "--json"])
    assert rc in (0, 1)
    decision = json.loads(capsys.readouterr().out.splitlines()[0])["decision"]
    sexual = decision["categories"]["sexual"]
    assert sexual["basis"] == "head" and set(sexual["signals"]) == {"prompt", "head", "punsafe"}
    assert sexual["signals"]["punsafe"] == pytest.approx(1 / (1 + np.exp(-sexual["signals"]["head"])), abs=1e-6)
    assert sexual["probability"] == pytest.approx(sexual["signals"]["punsafe"], abs=1e-6)
    violence = decision["categories"]["violence"]
    assert violence["basis"] == "head" and "p_violence" in violence["signals"]
    assert decision["categories"]["nudity"]["basis"] == "prompt"


def test_check_with_heads_fetched_through_an_offline_mirror(offline, tmp_path, retargeted, tiny512_model, photos,
                                                            monkeypatch, capsys):
    out, nsfw, vio = retargeted
    monkeypatch.setenv("SAFECLIP_ARTIFACTS_DIR", str(out))
    policy_dir = tmp_path / "elsewhere"
    policy_dir.mkdir()
    # example.invalid never resolves: the artifacts can only come from the mirror.
    policy = _write_policy(policy_dir, {
        "sexual": f"{{url: 'https://example.invalid/heads/{nsfw.path.name}', sha256: {nsfw.sha256}}}",
        "violence": f"{{url: 'https://example.invalid/heads/{vio.path.name}', sha256: {vio.sha256}}}"})
    rc = main(["check", str(photos[1]), "--policy", policy, "--model", tiny512_model, "--device", "cpu", "--json"])
    assert rc in (0, 1)
    sexual = json.loads(capsys.readouterr().out.splitlines()[0])["decision"]["categories"]["sexual"]
    assert "punsafe" in sexual["signals"]

    (out / nsfw.path.name).write_bytes((out / nsfw.path.name).read_bytes().replace(b'"relu"', b'"relu" '))
    assert main(["check", str(photos[1]), "--policy", policy, "--model", tiny512_model, "--device", "cpu"
                 ]) == 2
    err = capsys.readouterr().err.strip()
    assert nsfw.sha256 in err and "pinned" in err and len(err.splitlines()) == 1
    from safeclip.errors import ArtifactIntegrityError
    from safeclip.score import Scorer

    with pytest.raises(ArtifactIntegrityError, match=nsfw.sha256):
        Scorer(load_policy(policy), OrthoTexts(512), encoder_id=nsfw.encoder_id)


def test_the_shipped_policy_refuses_other_weights(mirror, tiny512_model, photos, cache_dir, capsys):
    """Random weights are not OpenAI's: the LAION heads refuse them rather than score in the wrong space."""
    rc = main(["check", str(photos[0]), "--policy", "laion-nsfw-b32", "--model", tiny512_model, "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and tag_encoder_id("ViT-B-32", "openai") in err and len(err.strip().splitlines()) == 1
    with pytest.raises(EncoderMismatchError):
        from safeclip.moderator import Moderator

        Moderator("laion-nsfw-b32", model=tiny512_model, device="cpu", cache_dir=cache_dir)


def test_rescore_under_a_laion_policy_needs_no_model(tmp_path, retargeted, tiny512_model, photos, monkeypatch):
    from safeclip.audit import audit, rescore
    from safeclip.heads import load_head

    out, nsfw, vio = retargeted
    cache = tmp_path / "cache"
    audit(photos[:4], out=tmp_path / "a.parquet", policy="default", model=tiny512_model, device="cpu", cache=cache,
          save_embeddings=True, verbose=False)
    policy = _write_policy(out, {"sexual": f"{{path: {nsfw.path.name}, sha256: {nsfw.sha256}}}",
                                 "violence": f"{{path: {vio.path.name}, sha256: {vio.sha256}}}"})

    def no_model(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("safeclip.embed.Encoder.__init__", no_model)
    s = rescore(out=tmp_path / "r.parquet", policy=policy, cache=cache, from_audit=tmp_path / "a.parquet",
                verbose=False)
    assert s.rows == 4
    rows = pq.read_table(tmp_path / "r.parquet").to_pylist()
    saved = {r["path"]: r["embedding"] for r in pq.read_table(tmp_path / "a.parquet").to_pylist()}
    head = load_head(nsfw.path, nsfw.sha256)
    for r in rows:
        emb = np.asarray(saved[r["path"]], np.float32)  # (frames, D): one frame each here
        assert r["p_sexual"] == pytest.approx(float(head.predict_proba(emb)[0]), abs=1e-6)


@pytest.fixture(scope="module")
def random_b32(tmp_path_factory) -> str:
    """A ViT-B-32 checkpoint file with random weights (as OpenAI's QuickGELU model): the real architecture's cost."""
    import open_clip
    import torch

    ckpt = tmp_path_factory.mktemp("random-b32") / "ViT-B-32-random.bin"
    torch.manual_seed(0)
    torch.save(open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=True).half().state_dict(), ckpt)
    return str(ckpt)


def _check_json(capsys, *args: str) -> dict:
    rc = main(["check", *args, "--device", "cpu", "--runtime", "torch", "--json"])
    assert rc in (0, 1)
    return json.loads(capsys.readouterr().out.splitlines()[0])["decision"]


@pytest.mark.slow
def test_laion_b32_heads_behind_a_random_vit_b32_file_through_the_import_option(mirror, random_b32, tmp_path, photos,
                                                                                 capsys):
    """`check --model ViT-B-32 --pretrained <local file>` with LAION's B/32 heads: the shipped policy refuses random
    weights; imported into that file's space with the explicit option, the heads run (mechanics only)."""
    args = ["--model", "ViT-B-32", "--pretrained", random_b32]
    assert main(["check", str(photos[0]), "--policy", "laion-nsfw-b32", *args, "--device", "cpu",
                 "--runtime", "torch"]) == 2
    assert tag_encoder_id("ViT-B-32", "openai") in capsys.readouterr().err

    space = Encoder("ViT-B-32", random_b32, device="cpu", runtime="torch").encoder_id
    out = tmp_path / "pol"
    for signal in ("laion-nsfw", "laion-violence"):
        assert main(["import", signal, "--model", "ViT-B-32", "--out", str(out), "--retarget-encoder-id", space]) == 0
    capsys.readouterr()
    snippets = "".join(f.read_text() for f in sorted(out.glob("*.snippet.yaml")))
    policy = out / "policy.yaml"
    policy.write_text("name: laion-retargeted\nversion: '1'\nextends: laion-nsfw-b32\ncategories:\n" + "".join(
        f"  {line}\n" for line in snippets.splitlines() if not line.startswith("#")))
    decision = _check_json(capsys, str(photos[0]), "--policy", str(policy), *args)
    assert decision["encoder_id"] == space
    sexual = decision["categories"]["sexual"]
    assert sexual["basis"] == "head" and set(sexual["signals"]) == {"prompt", "head", "punsafe"}


@pytest.mark.slow
def test_the_shipped_b32_policy_behind_a_local_copy_recognised_as_openai(mirror, random_b32, monkeypatch, photos,
                                                                          capsys):
    """`check --policy laion-nsfw-b32 --model ViT-B-32 --pretrained <local file>` runs LAION's own head when the file
    is recognised as OpenAI's weights. OpenAI's file cannot be downloaded here, so the identity table's test seam
    registers the random file as it: this tests the recognition, not the head (random weights)."""
    import hashlib

    from safeclip.embed import _identity

    digest = hashlib.sha256(open(random_b32, "rb").read()).hexdigest()
    table = dict(_identity.known_weights())
    table[digest] = _identity.KnownWeights(digest, "ViT-B-32", "openai", "https://example.invalid/test", ())
    monkeypatch.setattr(_identity, "known_weights", lambda: table)
    decision = _check_json(capsys, str(photos[0]), "--policy", "laion-nsfw-b32", "--model", "ViT-B-32",
                           "--pretrained", random_b32)
    assert decision["encoder_id"] == tag_encoder_id("ViT-B-32", "openai")
    sexual = decision["categories"]["sexual"]
    assert sexual["basis"] == "head" and "punsafe" in sexual["signals"]


@pytest.mark.slow
def test_the_policy_an_import_writes_runs_with_check(mirror, random_b32, monkeypatch, tmp_path, photos, capsys):
    """`safeclip import laion-nsfw` writes a policy that `safeclip check --policy` runs as it is: its encoder is the
    OpenAI weights (here a random file registered as them through the identity table's test seam: this tests the
    mechanics, not the head)."""
    import hashlib

    from safeclip.embed import _identity

    out = tmp_path / "heads"
    assert main(["import", "laion-nsfw", "--model", "ViT-B-32", "--out", str(out)]) == 0
    policy = out / "laion-nsfw-ViT-B-32.policy.yaml"
    digest = hashlib.sha256(open(random_b32, "rb").read()).hexdigest()
    table = dict(_identity.known_weights())
    table[digest] = _identity.KnownWeights(digest, "ViT-B-32", "openai", "https://example.invalid/test", ())
    monkeypatch.setattr(_identity, "known_weights", lambda: table)
    capsys.readouterr()
    decision = _check_json(capsys, str(photos[0]), "--policy", str(policy), "--pretrained", random_b32)
    assert decision["policy"] == "laion-nsfw-ViT-B-32@1.0"
    assert decision["encoder_id"] == tag_encoder_id("ViT-B-32", "openai")  # the policy's model, the file's weights
    sexual = decision["categories"]["sexual"]
    assert sexual["basis"] == "head" and "punsafe" in sexual["signals"]
    assert (sexual["flag_threshold"], sexual["block_threshold"]) == (0.1, 0.5)  # LAION's, not the default's
