"""What the ``test_audit_*`` modules share: sample files from the corpus, a quiet audit runner, one audited folder.

Fixtures are session-scoped (import them into a test module to use them): the corpus is read-only and the audited
folder is only read by the tests that use it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from safeclip.audit import AuditSummary, audit

REPO = Path(__file__).resolve().parents[1]
HOOK = "SAFECLIP_AUDIT_TEST_HOOK"

ALL_FLAG_POLICY = """
name: all-flag
version: "1"
scoring:
  logit_scale: 100.0
  templates: ["a photo of {}."]
  neutral: ["a landscape"]
categories:
  test_cat:
    prompts: ["a red ball"]
    contrast: ["a blue cube"]
    thresholds: {flag: 0.0, block: null}
"""


def file_sha(p: Path | str) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def run_audit(paths, out, cache, encoder, **kw) -> AuditSummary:
    kw.setdefault("workers", 2)
    kw.setdefault("verbose", False)
    return audit(paths, out=out, cache=cache, encoder=encoder, **kw)


def read(path) -> pa.Table:
    return pq.read_table(path)


@pytest.fixture(scope="session")
def sample(photos, corpus) -> list[str]:
    """Small photos of each format plus animations and an MPO: quick to decode, every code path."""
    by_size = sorted(photos, key=lambda p: p.stat().st_size)
    pick = []
    for exts, k in (({".jpg", ".jpeg"}, 8), ({".png"}, 3), ({".webp"}, 3)):
        pick += [p for p in by_size if p.suffix.lower() in exts][:k]
    tricky = corpus / "tricky"
    pick += [tricky / n for n in ("iss634.gif", "dispose_bgnd.gif", "iss634.webp", "frozenpond.mpo")]
    return [str(p) for p in pick]


@pytest.fixture(scope="session")
def bad_files(corpus) -> list[str]:
    return sorted(str(p) for p in (corpus / "bad").iterdir() if p.is_file())


@pytest.fixture(scope="session")
def audited(sample, bad_files, tiny_encoder, tmp_path_factory):
    """One audit under the default policy (with saved embeddings), its cache, and a fresh audit under strict."""
    d = tmp_path_factory.mktemp("audited")
    inputs = sample + bad_files[:3]
    run_audit(inputs, d / "default.parquet", d / "cache", tiny_encoder, save_embeddings=True)
    s = run_audit(inputs, d / "strict.parquet", d / "cache", tiny_encoder, policy="strict")
    assert s.embedded == 0  # warm cache
    return d, inputs
