"""Banks on the request path: Moderator.check/check_many/check_async match each input's PDQ hashes and embedding
against the policy's banks, a long-lived Moderator picks up bank changes, Moderator.explain and ``safeclip explain``.

The tiny model's weights are random: nothing here is a moderation result. The bank logic is what is tested: an image
put in a bank (by its own PDQ hash or its own embedding) is matched, and what the match forces is what decides.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from safeclip import DataError, Moderator
from safeclip.banks import Bank, NewEntry
from safeclip.cli import main
from safeclip.embed import prepare
from safeclip.policy import UnknownCategoryError

SCORING = """
scoring:
  logit_scale: 100.0
  templates: ["a photo of {}."]
  neutral: ["a landscape", "a city street"]
"""


def image(seed: int) -> Image.Image:
    """A textured image (random 16x16 colours, upsampled): PDQ quality 100, a JPEG re-encode within a few bits."""
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).resize((384, 384), Image.BICUBIC)


def png(im: Image.Image) -> bytes:
    b = io.BytesIO()
    im.save(b, "PNG")
    return b.getvalue()


def jpeg(im: Image.Image, quality: int) -> bytes:
    b = io.BytesIO()
    im.save(b, "JPEG", quality=quality)
    return b.getvalue()


def write_policy(path: Path, categories: str) -> Path:
    path.write_text(f'name: banks-test\nversion: "1"\n{SCORING}categories:\n{categories}')
    return path


def pdq_of(moderator: Moderator, data: bytes) -> np.ndarray:
    return prepare(data, moderator.encoder.pixel_spec).pdq[:1]


@pytest.fixture(scope="module")
def pdq_setup(tmp_path_factory, tiny_model, cache_dir):
    """A deny PDQ bank (action block) named by a bank-only category, and a Moderator under that policy."""
    root = tmp_path_factory.mktemp("pdq-banks")
    bank = Bank.create(root / "incidents", "pdq")
    policy = write_policy(root / "policy.yaml", "  known:\n    banks:\n      - path: incidents\n"
                                                "        effect: deny\n        action: block\n")
    m = Moderator(policy=policy, model=tiny_model, device="cpu", cache_dir=cache_dir, allow_outside=True,
                  max_wait_ms=5)
    yield m, bank, policy
    bank.close()


def test_an_image_in_a_deny_pdq_bank_blocks_on_every_request_path(pdq_setup):
    m, bank, _ = pdq_setup
    bad, other = png(image(1)), png(image(2))
    bank.add(pdq_of(m, bad), [NewEntry("case-1", label="incident one")])
    time.sleep(1.1)  # the Moderator re-reads a bank at most every refresh_s (1 s)
    d = m.check(bad)
    assert d.action == "block"
    assert any("entry 'case-1' ('incident one') of bank 'incidents'" in r for r in d.reasons), d.reasons
    assert [x.entry for x in d.matches] == ["case-1"] and d.matches[0].distance == 0
    assert d.categories["known"].banks[0].entry == "case-1"
    assert d.to_dict()["matches"][0]["entry"] == "case-1" and json.loads(d.to_json())["matches"][0]["bank"] == \
        "incidents"
    # a JPEG re-encode is another file with the same picture: its PDQ hash is within a few bits
    again = m.check(jpeg(image(1), 70))
    assert again.action == "block" and again.sha256 != d.sha256 and again.matches[0].entry == "case-1"
    assert m.check(other).action == "allow" and m.check(other).matches == ()
    many = m.check_many([other, bad, jpeg(image(1), 85)])
    assert [x.action for x in many] == ["allow", "block", "block"]
    assert asyncio.run(m.check_async(bad)).matches[0].entry == "case-1"


def test_a_living_moderator_picks_up_added_disabled_and_removed_entries(pdq_setup):
    m, _, _ = pdq_setup
    im = png(image(3))
    assert m.check(im).action == "allow"
    writer = Bank.open(m.policy.categories[0].banks[0].path, writable=True)  # another handle, as another process
    try:
        writer.add(pdq_of(m, im), [NewEntry("live-1", label="added while serving")])
        time.sleep(1.1)
        d = m.check(im)
        assert d.action == "block" and d.matches[0].entry == "live-1"
        writer.disable(["live-1"])
        time.sleep(1.1)
        assert m.check(im).action == "allow"
        writer.enable(["live-1"])
        time.sleep(1.1)
        assert m.check(im).action == "block"
        writer.remove(["live-1"])
        time.sleep(1.1)
        assert m.check(im).action == "allow"
    finally:
        writer.close()


def test_decide_on_embeddings_alone_fails_closed_naming_the_missing_hash(pdq_setup, tiny_model, cache_dir):
    m, _, policy = pdq_setup
    emb = m.embed([png(image(4)), png(image(5))])
    with pytest.raises(DataError) as err:
        m.decide(emb)
    msg = str(err.value)
    assert "row 0 of the embeddings" in msg and "no PDQ hash" in msg and "\n" not in msg
    closed = Moderator(policy=policy, model=tiny_model, device="cpu", cache_dir=cache_dir, allow_outside=True,
                       on_error="block")
    out = closed.decide(emb)
    assert [d.action for d in out] == ["block", "block"]
    assert all(d.error and "no PDQ hash" in d.error and "\n" not in d.error for d in out)
    assert "row 1 of the embeddings" in out[1].error


def test_explain_names_the_matched_entry_else_the_nearest(pdq_setup):
    m, bank, _ = pdq_setup
    known, unknown = png(image(6)), png(image(7))
    bank.add(pdq_of(m, known), [NewEntry("case-6", label="six")])
    time.sleep(1.1)
    e = m.explain(known)
    assert e.decision.action == "block" and list(e.lines) == ["known"]
    assert e.lines["known"][0].startswith("blocked: it looks like entry 'case-6' ('six') of bank 'incidents'")
    assert e.nearest["known"][0].entry == "case-6" and e.nearest["known"][0].matched
    e = m.explain(unknown, category="known", k=2)
    assert e.decision.action == "allow" and len(e.nearest["known"]) == 2
    assert e.lines["known"][0].startswith("no bank entry within the threshold; nearest: entry ")
    assert all(not n.matched and n.distance > 31 for n in e.nearest["known"])
    assert e.to_dict()["categories"]["known"]["nearest"][0]["matched"] is False
    with pytest.raises(UnknownCategoryError):
        m.explain(unknown, category="nope")


def test_safeclip_explain_prints_the_entry(pdq_setup, tiny_model, cache_dir, tmp_path, capsys, monkeypatch):
    m, bank, policy = pdq_setup
    path = tmp_path / "known.png"
    path.write_bytes(png(image(8)))
    bank.add(pdq_of(m, path.read_bytes()), [NewEntry("case-8", label="eight")])
    monkeypatch.setenv("SAFECLIP_CACHE_DIR", str(cache_dir))
    args = ["explain", str(path), "--policy", str(policy), "--model", tiny_model, "--device", "cpu", "-k", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "\tblock" in out and "known: blocked: it looks like entry 'case-8' ('eight')" in out
    assert main([*args, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["decision"]["matches"][0]["entry"] == "case-8"
    assert doc["categories"]["known"]["nearest"][0]["entry"] == "case-8"


@pytest.fixture(scope="module")
def embedder(tiny_model, cache_dir) -> Moderator:
    """A Moderator whose own policy names no banks: it embeds the images the banks below are built from."""
    return Moderator(model=tiny_model, device="cpu", cache_dir=cache_dir)


def embedding_bank(moderator: Moderator, path: Path, images: list[bytes], ids: list[str]) -> Bank:
    bank = Bank.create(path, "embedding", dim=moderator.encoder.dim, encoder_id=moderator.encoder_id)
    bank.add(moderator.embed(images), [NewEntry(i, label=f"exemplar {i}") for i in ids])
    return bank


def test_an_allow_embedding_bank_overrides_a_category_that_fires(embedder, tmp_path):
    mine, other = png(image(10)), png(image(11))
    embedding_bank(embedder, tmp_path / "fine", [mine], ["fp-10"]).close()
    # flag: 0.0 fires for every image: only the allow bank can let one through
    policy = write_policy(tmp_path / "policy.yaml", """  everything:
    prompts: ["a thing"]
    thresholds: {flag: 0.0}
    banks:
      - path: fine
        effect: allow
        min_similarity: 0.9999
""")
    d = embedder.check(mine, policy=policy)
    assert d.action == "allow" and d.matches[0].entry == "fp-10" and d.matches[0].effect == "allow"
    assert any(r.startswith("everything: allowed by entry 'fp-10'") for r in d.reasons), d.reasons
    o = embedder.check(other, policy=policy)
    assert o.action == "flag" and o.matches == ()


def test_a_flooding_deny_entry_is_quarantined_until_confirmed(embedder, tmp_path):
    base = image(12)
    variants = [png(base), jpeg(base, 95), jpeg(base, 80), jpeg(base, 60)]
    emb = embedder.embed(variants)
    assert len({e.tobytes() for e in emb}) == 4 and float((emb @ emb[0]).min()) >= 0.9999  # distinct, near-equal
    bank = embedding_bank(embedder, tmp_path / "known", variants[:1], ["meme"])
    policy = write_policy(tmp_path / "policy.yaml", """  known:
    banks:
      - path: known
        effect: deny
        action: block
        min_similarity: 0.9999
        quarantine: {max_inputs: 2}
""")
    first = [embedder.check(v, policy=policy) for v in variants[:2]]
    assert [d.action for d in first] == ["block", "block"]
    assert embedder.check(variants[0], policy=policy).action == "block"  # the same input again counts once
    third = embedder.check(variants[2], policy=policy)
    assert third.action == "flag" and third.matches[0].quarantined and third.matches[0].flood_count == 3
    assert "flood quarantine" in third.reasons[0] and "'meme'" in third.reasons[0]
    bank.confirm(["meme"])
    d = embedder.check(variants[3], policy=policy)
    assert d.action == "block" and not d.matches[0].quarantined
    bank.close()
