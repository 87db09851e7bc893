"""The batch unit: identical bytes are embedded once, every row is scored, the output half writes the cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from audit_helpers import ALL_FLAG_POLICY, read, run_audit, sample  # noqa: F401
from conftest import OrthoTexts, unit

from safeclip.audit.mapper import BatchUnit, store
from safeclip.compiled import Views
from safeclip.audit.summary import Tally
from safeclip.audit.worker import FileResult
from safeclip.audit.writer import Rows
from safeclip.cache import CachedImage, EmbeddingCache


def test_identical_files_are_embedded_once(sample, tiny_encoder, tmp_path):
    src = [p for p in sample if p.endswith((".jpg", ".png"))][:3]
    folder = tmp_path / "dups"
    folder.mkdir()
    paths = []
    for i in range(12):
        dst = folder / f"copy{i:02d}{Path(src[i % 3]).suffix}"
        shutil.copyfile(src[i % 3], dst)
        paths.append(str(dst))
    s = run_audit([folder], tmp_path / "d.parquet", tmp_path / "cache", tiny_encoder, batch_size=4)
    assert s.rows == 12 and s.embedded == 3 and s.duplicates + s.cache_hits == 9
    t = read(tmp_path / "d.parquet")
    assert t.column("path").to_pylist() == paths  # walked in sorted order
    by_sha: dict[str, set] = {}
    for r in t.to_pylist():
        by_sha.setdefault(r["sha256"], set()).add(tuple(v for k, v in r.items() if k.startswith("p_")))
    assert len(by_sha) == 3 and all(len(v) == 1 for v in by_sha.values())


def _fake_results(dim: int) -> list[FileResult]:
    px = np.zeros((1, 4, 4, 3), np.uint8)
    hit_emb = unit(np.ones((1, dim)))
    return [
        FileResult(0, "pixels", sha256="a" * 64, nbytes=10, width=4, height=4, n_frames=1, frame_indices=(0,),
                   format="PNG", pixels=px + 1, decoded=True),
        FileResult(1, "pixels", sha256="a" * 64, nbytes=10, width=4, height=4, n_frames=1, frame_indices=(0,),
                   format="PNG", pixels=px + 1, decoded=True),  # the same bytes under another name
        FileResult(2, "pixels", sha256="b" * 64, nbytes=11, width=4, height=4, n_frames=2, frame_indices=(0, 1),
                   format="GIF", pixels=np.concatenate([px + 2, px + 3]), decoded=True),
        FileResult(3, "pixels", sha256="c" * 64, nbytes=12, width=4, height=4, n_frames=1, frame_indices=(0,),
                   format="PNG", pixels=px + 4, decoded=True),  # embedded since its worker looked
        FileResult(4, "hit", sha256="d" * 64, nbytes=13, width=8, height=8, n_frames=1, frame_indices=(0,),
                   format="JPEG", embeddings=hit_emb),
        FileResult(5, "error", sha256="e" * 64, nbytes=14, error="PNG image is truncated",
                   error_kind="TruncatedImageError", cacheable_error=True),
    ]


def test_the_batch_unit_embeds_each_distinct_image_once_and_decides_every_row(tmp_path):
    from types import SimpleNamespace

    from safeclip.compiled import CompiledPolicy
    from safeclip.policy import load_policy

    dim = 8
    pol_file = tmp_path / "p.yaml"
    pol_file.write_text(ALL_FLAG_POLICY)
    comp = CompiledPolicy.build(load_policy(pol_file), OrthoTexts(dim), "enc")
    calls: list[int] = []

    def embed_pixels(pixels: np.ndarray) -> np.ndarray:
        calls.append(len(pixels))
        return unit(np.stack([np.arange(dim) + float(p.mean()) for p in pixels]))

    known_emb = unit(np.arange(dim, dtype=np.float32)[None] + 100)
    looked_up: list[list[str]] = []

    def known(shas: list[str]) -> dict[str, CachedImage]:
        looked_up.append(shas)
        return {s: CachedImage(s, known_emb, (0,), 4, 4, 1, 12, "PNG") for s in shas if s == "c" * 64}

    results = _fake_results(dim)
    BatchUnit(embed_pixels, comp).map(results, known=known)
    assert calls == [3]  # a (1 frame) and b (2 frames) in one forward; the copy of a and the known c not embedded
    assert looked_up == [["a" * 64, "b" * 64, "c" * 64]]
    assert [(r.new, r.duplicate) for r in results] == [(True, False), (False, True), (True, False), (False, True),
                                                       (False, False), (False, False)]
    np.testing.assert_array_equal(results[1].embeddings, results[0].embeddings)
    np.testing.assert_array_equal(results[3].embeddings, known_emb)
    assert results[2].embeddings.shape == (2, dim) and all(r.pixels is None for r in results)
    v = comp.decide(Views.of([r.embeddings for r in results[:5]], comp.scorer.dim))
    codes, probs = v.actions, v.probabilities
    assert [r.code for r in results[:5]] == codes.tolist() == [1] * 5  # this policy flags everything
    for r, p in zip(results, probs):
        np.testing.assert_array_equal(r.probs, p)
    assert results[5].code is None and results[5].probs is None

    # The output half: only the new embeddings and the deterministic failure go to the cache, then one row each.
    db = EmbeddingCache(tmp_path / "cache", "enc")
    output = SimpleNamespace(db=db, rows=Rows(1, False), fingerprint="fp",
                             inputs=[f"f{i}" for i in range(6)])
    tally = Tally()
    store(results, output, tally)
    assert sorted(db.get_many([c * 64 for c in "abcde"])) == ["a" * 64, "b" * 64]
    np.testing.assert_array_equal(db.get("b" * 64).embeddings, results[2].embeddings)
    assert db.get_decode_errors(["e" * 64], "fp") == {"e" * 64: ("TruncatedImageError", "PNG image is truncated")}
    rows = output.rows.cols
    assert rows["path"] == [f"f{i}" for i in range(6)] and rows["action"] == ["flag"] * 5 + ["error"]
    assert rows["error"] == [None] * 5 + ["TruncatedImageError: PNG image is truncated"]
    assert (tally.decoded, tally.embedded, tally.cache_hits, tally.duplicates) == (4, 2, 1, 2)
    db.close()


def _comp(tmp_path, dim: int = 8):
    from safeclip.compiled import CompiledPolicy
    from safeclip.policy import load_policy

    pol_file = tmp_path / "p.yaml"
    pol_file.write_text(ALL_FLAG_POLICY.replace("flag: 0.0, block: null", "flag: 0.999, block: null"))
    return CompiledPolicy.build(load_policy(pol_file), OrthoTexts(dim), "enc")


def test_unusable_embeddings_are_error_rows_never_allow_and_leave_the_cache(tmp_path):
    from types import SimpleNamespace

    dim = 8
    comp = _comp(tmp_path, dim)
    good = unit(np.arange(dim, dtype=np.float32)[None] + 1)
    cases = {"a": good.copy(), "b": np.full((1, dim), np.nan, np.float32), "c": good * 1000,
             "d": np.concatenate([good, np.full((1, dim), np.inf, np.float32)]), "e": good.astype(np.int64)}
    db = EmbeddingCache(tmp_path / "cache", "enc")
    db.put_many([CachedImage(s * 64, np.asarray(e, np.float32), tuple(range(len(e))), 4, 4, len(e), 1, "PNG")
                 for s, e in cases.items() if s != "e"])  # a damaged entry reads back as such
    results = [FileResult(i, "hit", sha256=s * 64, nbytes=1, width=4, height=4, n_frames=len(e), embeddings=e)
               for i, (s, e) in enumerate(cases.items())]
    BatchUnit(lambda px: px, comp).map(results)
    assert results[0].code == 0 and results[0].error is None
    for r in results[1:]:
        assert r.code is None and r.probs is None and r.error_kind == "InvalidEmbedding"
    assert "NaN or infinity" in results[1].error and "not L2-normalised" in results[2].error
    assert "row 1" in results[3].error and "dtype int64" in results[4].error
    output = SimpleNamespace(db=db, rows=Rows(1, False), fingerprint="fp",
                             inputs=[f"f{i}" for i in range(5)])
    store(results, output, Tally())
    assert output.rows.cols["action"] == ["allow"] + ["error"] * 4
    assert all(p is None for p in output.rows.probs[1:])
    assert set(db.get_many(s * 64 for s in "abcd")) == {"a" * 64}  # the bad entries are embedded again next time
    db.close()


def test_the_worst_background_decides_and_is_reported(tmp_path):
    dim = 8
    comp = _comp(tmp_path, dim)
    prompt = comp.scorer.prompt_matrix[:, 0] if comp.scorer.prompt_matrix.shape[1] else None
    rng = np.random.default_rng(0)
    bland = unit(rng.normal(size=(1, dim)))
    emb = np.concatenate([bland, unit(prompt[None])]) if prompt is not None else np.concatenate([bland, bland])
    r = FileResult(0, "hit", sha256="a" * 64, nbytes=1, width=4, height=4, n_frames=1, frame_indices=(0, 0),
                   backgrounds=("#ffffff", "#000000"), embeddings=emb)
    opaque = FileResult(1, "hit", sha256="b" * 64, nbytes=1, width=4, height=4, n_frames=1, embeddings=bland)
    BatchUnit(lambda px: px, comp).map([r, opaque])
    v = comp.decide(Views.of([emb[:1], emb[1:]], comp.scorer.dim))
    codes, probs = v.actions, v.probabilities
    worst = int(np.argmax(codes * 2.0 + probs.max(axis=1)))
    assert r.background == ("#ffffff", "#000000")[worst] and opaque.background is None
    np.testing.assert_array_equal(r.probs, probs[worst])


def test_a_cache_failing_under_a_worker_stops_the_audit_and_never_blames_the_image(tmp_path):
    from types import SimpleNamespace

    import pytest

    from safeclip.errors import CacheError

    db = EmbeddingCache(tmp_path / "cache", "enc")
    path = db.path
    output = SimpleNamespace(db=db, rows=Rows(1, False), fingerprint="fp", inputs=["f0"])
    bad = FileResult(0, "error", sha256="a" * 64, nbytes=1, error_kind="CacheError",
                     error=f"unexpected error while decoding: the embedding cache {path} is damaged (database disk "
                           "image is malformed); move it aside")
    with pytest.raises(CacheError, match="audit stopped: the embedding cache .* is damaged.*moved aside to .*run the "
                                         "same command again"):
        store([bad], output, Tally())
    assert len(output.rows) == 0 and not path.exists()
    assert list(path.parent.glob(path.name + ".corrupt-*"))


@pytest.mark.slow
def test_a_damaged_cache_stops_the_audit_and_the_next_run_rebuilds_it(sample, tiny_model, tiny_encoder, tmp_path):
    import sqlite3
    import subprocess
    import sys

    from audit_helpers import REPO

    cache = tmp_path / "cache"
    run_audit(sample[:4], tmp_path / "first.parquet", cache, tiny_encoder)
    db = EmbeddingCache(cache, tiny_encoder.encoder_id)
    path = db.path
    db.checkpoint()
    db.close()
    con = sqlite3.connect(path)
    root = con.execute("SELECT rootpage FROM sqlite_master WHERE name = 'images'").fetchone()[0]
    page = con.execute("PRAGMA page_size").fetchone()[0]
    con.close()
    raw = bytearray(path.read_bytes())
    raw[(root - 1) * page:(root - 1) * page + 100] = b"\xff" * 100  # the images table, not the meta table
    path.write_bytes(bytes(raw))
    cmd = [sys.executable, "-m", "safeclip", "audit", *sample[:4], "--out", str(tmp_path / "o.parquet"), "--model",
           tiny_model, "--cache", str(cache), "--workers", "1", "--no-progress"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    progress = ("safeclip audit: loading", "exporting the image tower")  # what the wait is for; not errors
    err = [ln for ln in p.stderr.strip().splitlines() if not ln.startswith(progress)]
    assert p.returncode == 2 and len(err) == 1 and "damaged" in err[0] and "moved aside" in err[0], p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "o.parquet").exists()
    assert list(path.parent.glob(path.name + ".corrupt-*"))
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert p.returncode == 0, p.stderr
    t = read(tmp_path / "o.parquet")
    assert t.column("error").null_count == t.num_rows  # no good image was blamed
    assert t.column("action").to_pylist() == read(tmp_path / "first.parquet").column("action").to_pylist()
