"""Signals users already trust, imported as safeclip heads: LAION's NSFW heads and clip-retrieval's violence vectors.

LAION's CLIP-based NSFW Detector (MIT licence, github.com/LAION-AI/CLIP-based-NSFW-Detector) publishes small MLP
heads on OpenAI CLIP ViT-B/32 and ViT-L/14 image embeddings; their output is the ``punsafe`` LAION-5B was filtered
on. The same repository publishes the two-vector violence detector clip-retrieval uses (row 0 benign, row 1
violent; the larger cosine decides). An import reads the published file, checks its sha256 against the pin below,
and writes an :class:`~safeclip.heads.MLPHead` JSON artifact that records its embedding space, a snippet that pins
it, and a complete policy around it (the default policy, the OpenAI weights as its ``encoder:``, LAION's thresholds
as the shipped ``laion-nsfw-b32`` / ``-l14`` policies set them):

- NSFW: ``(x - norm.mean) / (sqrt(norm.variance) + 1e-10)``, then ``linear_1``, ReLU, ..., ``linear_k`` to one
  logit; ``sigmoid(logit)`` is LAION's ``punsafe`` (the ``output`` name decisions report it under).
- violence: one linear layer ``VIOLENCE_LOGIT_SCALE * (v_violent - v_benign)``, so ``sigmoid(logit)`` is the
  two-way softmax of the vectors' cosines at CLIP's temperature and ``logit > 0`` is exactly clip-retrieval's
  argmax rule (a threshold of 0.5 reproduces it).

``.pth`` files are read only with ``torch.load(weights_only=True)`` and ``.npy`` files with ``allow_pickle=False``.
The conversion is deterministic, so the artifact a published file converts to has a known sha256 (pinned in
:data:`PUBLISHED`): :func:`load_published_head`, which the score stage calls for a policy that names the published
file, converts once, caches, and checks that pin on every load.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .files import json_bytes, write_bytes_atomic
from .artifacts import read_pinned_json, sha256_bytes
from .errors import ArtifactIntegrityError, ConfigError
from .heads import MLPHead

__all__ = ["ImportedHead", "PUBLISHED", "Published", "SIGNALS", "VIOLENCE_LOGIT_SCALE", "import_laion_nsfw",
           "import_laion_violence", "import_signal", "load_published_head", "published"]

SIGNALS = ("laion-nsfw", "laion-violence")
VIOLENCE_LOGIT_SCALE = 100.0
"""CLIP's softmax temperature (OpenAI's learned logit scale): turns the violence vectors' cosine gap into a logit."""

_REPO = "https://raw.githubusercontent.com/LAION-AI/CLIP-based-NSFW-Detector"
_COMMIT = "d499e9c87c68f1abf5418caef823c7b609714ca3"
_LICENCE = "MIT, LAION-AI/CLIP-based-NSFW-Detector"
_EPSILON = 1e-10  # LAION's: (x - mean) / (sqrt(variance) + 1e-10)


@dataclass(frozen=True)
class Published:
    """One published file safeclip can import: where it lives, its sha256, and the sha256 of what it converts to."""

    signal: str
    model: str
    url: str
    sha256: str
    converted_sha256: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


PUBLISHED: tuple[Published, ...] = (
    Published("laion-nsfw", "ViT-B-32", f"{_REPO}/{_COMMIT}/models/clip_ViT-B-32_openai_binary_nsfw_head.pth",
              "615f35e1364b40b14c30e770544345b82d8e558240692ad72eb8eafa466ef25c",
              "e1cb6a1285041a75535782bd5f57e06ace88b8e4ac0a831ebedc9815379ed71c"),
    Published("laion-nsfw", "ViT-L-14", f"{_REPO}/{_COMMIT}/models/clip_ViT-L-14_openai_binary_nsfw_head.pth",
              "fc4d70d2eea4e948d13bc27bf7114f5e8d3bd317eb01a4b49b35dcf1a3d672c6",
              "c11e67be6c12a968bfceeb8018841496318142d67272fe40b6ad12d650d5a3c7"),
    Published("laion-violence", "ViT-B-32", f"{_REPO}/main/violence_detection_vit_b_32.npy",
              "76909cca3e77abbbb21313895756773a9c6fb26c9cc743f3ef0625f025741982",
              "6117ae9f9baa6cf0189e926b3e4940b6ce08844322af128dc38dfa16b7056132"),
    Published("laion-violence", "ViT-L-14", f"{_REPO}/main/violence_detection_vit_l_14.npy",
              "cc08f81ef50b1ef71452ddc87285fe6fbbc01b6fe8f8b8c24482c386ef2ab7e1",
              "fb74e15659f496c2005b7d10e08d75b0355dc0674d7be73b09e051ddf462bfdf"),
)
"""The published files, pinned. A ``main``-branch URL can move; its pin cannot, so a changed file is refused."""

_BY_SHA = {p.sha256: p for p in PUBLISHED}
_CATEGORY = {"laion-nsfw": "sexual", "laion-violence": "violence"}
_SHIPPED_POLICY = {"ViT-B-32": "laion-nsfw-b32", "ViT-L-14": "laion-nsfw-l14"}
"""The shipped policy that uses each model's published files: the imported policy takes its thresholds and encoder."""


def published(signal: str, model: str) -> Published:
    """The pinned published file for ``signal`` (``laion-nsfw`` / ``laion-violence``) on ``model``."""
    if signal not in SIGNALS:
        raise ConfigError(f"unknown signal {signal!r}: safeclip imports {', '.join(SIGNALS)}")
    for p in PUBLISHED:
        if p.signal == signal and p.model == model:
            return p
    models = sorted({p.model for p in PUBLISHED if p.signal == signal})
    raise ConfigError(f"{signal} is published for {', '.join(models)}, not {model!r}")


def _openai_space(model: str) -> str:
    from .embed import tag_encoder_id

    return tag_encoder_id(model, "openai")


def _nsfw_head(path: Path, data: bytes, pub: Published, encoder_id: str, meta: dict) -> MLPHead:
    from .embed import read_state_dict

    sd = read_state_dict(path, data)
    n_linear = sum(1 for k in sd if k.startswith("linear_") and k.endswith(".weight"))
    need = {"norm.mean", "norm.variance"} | {f"linear_{i}.{p}" for i in range(1, n_linear + 1)
                                             for p in ("weight", "bias")}
    if n_linear < 1 or set(sd) - {"norm.count"} != need:
        raise ArtifactIntegrityError(f"{path}: not LAION's NSFW head layout (norm.mean, norm.variance, "
                                     f"linear_1..k); it holds {sorted(sd)}")
    layers = [(sd[f"linear_{i}.weight"], sd[f"linear_{i}.bias"]) for i in range(1, n_linear + 1)]
    std = {"mean": sd["norm.mean"], "variance": sd["norm.variance"], "epsilon": _EPSILON}
    meta["formula"] = ("punsafe = sigmoid(MLP((x - norm.mean) / (sqrt(norm.variance) + 1e-10))), x the "
                       "L2-normalised CLIP image embedding; ReLU between linear layers")
    return MLPHead(layers, encoder_id=encoder_id, standardize=std, output="punsafe", metadata=meta)


def _violence_head(path: Path, data: bytes, pub: Published, encoder_id: str, meta: dict) -> MLPHead:
    try:
        v = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ArtifactIntegrityError(f"{path}: not a numpy array file: {e}") from e
    if v.ndim != 2 or v.shape[0] != 2 or not np.issubdtype(v.dtype, np.floating) or not np.isfinite(v).all():
        raise ArtifactIntegrityError(f"{path}: expected a finite (2, D) float array, got {v.shape} {v.dtype}")
    v = v.astype(np.float32)
    w = (np.float32(VIOLENCE_LOGIT_SCALE) * (v[1] - v[0]))[None, :]
    meta["formula"] = (f"logit = {VIOLENCE_LOGIT_SCALE:g} * x . (v[1] - v[0]); logit > 0 <=> argmax(x @ v.T) == 1 "
                       "(clip-retrieval's rule); sigmoid(logit) = softmax of the two cosines at CLIP's temperature")
    return MLPHead([(w, np.zeros(1, np.float32))], encoder_id=encoder_id, output="p_violence", metadata=meta)


def _convert(path: Path, data: bytes, pub: Published, encoder_id: str | None) -> MLPHead:
    """The head the published file's ``data`` (checked against ``pub``; ``path`` only names it) converts to."""
    space = _openai_space(pub.model)
    meta: dict = {"signal": pub.signal, "model": pub.model, "source_url": pub.url, "source_sha256": pub.sha256,
                  "licence": _LICENCE, "trained_in": space}
    if encoder_id is not None and encoder_id != space:
        meta["retargeted"] = (f"recorded in {encoder_id!r} by an explicit import option; trained in {space!r}, "
                              "so its output there is no moderation result")
    build = _nsfw_head if pub.signal == "laion-nsfw" else _violence_head
    return build(path, data, pub, encoder_id or space, meta)


def _read_once(path: Path) -> tuple[bytes, str]:
    """``path``'s bytes, read once (what is hashed is what is converted), and their sha256."""
    data = path.read_bytes()
    return data, sha256_bytes(data)


def _verified_source(pub: Published, source: str | os.PathLike[str] | None, cache_dir: str | os.PathLike[str] | None,
                     ) -> tuple[Path, bytes]:
    """The published file and its bytes, checked against its pin: the bytes are what is converted, so a file swapped
    after the check is never what is imported."""
    if source is None:
        from .fetch import fetch_artifact

        path = fetch_artifact(pub.url, pub.sha256, cache_dir=cache_dir)
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise ConfigError(f"--from {source}: no such file (the published file is {pub.filename}, from {pub.url})")
    data, actual = _read_once(path)
    if actual != pub.sha256:
        other = _BY_SHA.get(actual)
        hint = f": it is the published {other.signal} file for {other.model}" if other else ""
        raise ArtifactIntegrityError(f"{path} has sha256 {actual}, not that of the published {pub.filename} "
                                     f"({pub.sha256}); refusing to import it{hint}")
    return path, data


def _policy_text(pub: Published, artifact: Path, sha: str) -> bytes:
    """A complete policy around the imported head: the default policy with the head deciding its category, at the
    thresholds and with the encoder of the shipped policy that uses the same published file (one source for both)."""
    import yaml

    from .policy import load_policy

    shipped = load_policy(_SHIPPED_POLICY[pub.model])
    cat = shipped.category(_CATEGORY[pub.signal])
    if cat.head is None or cat.head.sha256 != pub.sha256:
        raise ConfigError(f"the shipped policy {shipped.name} does not use {pub.filename} for {cat.name} (a bug: "
                          "please report it)")
    body = {
        "name": artifact.stem,
        "version": "1.0",
        "description": f"The default policy with the published {pub.signal} head ({pub.filename}) deciding "
                       f"`{cat.name}` at the thresholds of the shipped {shipped.name} policy, on OpenAI CLIP "
                       f"{pub.model}.",
        "extends": "default",
        "encoder": dict(shipped.encoder),
        "categories": {cat.name: {
            **({"description": cat.description} if cat.description else {}),
            "head": {"path": artifact.name, "sha256": sha},
            "thresholds": {"flag": cat.flag, "block": cat.block},
        }},
    }
    return (
        f"# {pub.signal} head for {pub.model}, imported from {pub.url} (sha256 {pub.sha256}; {_LICENCE}).\n"
        f"# Thresholds and encoder as in the shipped policy {shipped.name} (see it for where they come from).\n"
        f"# The head lives in the OpenAI weights' embedding space: run with `--pretrained openai` (the encoder\n"
        f"# here) or a local copy of OpenAI's published checkpoint file, which safeclip recognises.\n"
        + yaml.safe_dump(body, sort_keys=False, width=110, allow_unicode=True)
    ).encode()


@dataclass(frozen=True)
class ImportedHead:
    """What an import wrote: the head artifact, its sha256, a policy snippet that pins it, and a complete policy
    around it (None for a retargeted head, whose weights no ``encoder:`` can name)."""

    signal: str
    model: str
    path: Path
    sha256: str
    snippet: Path
    encoder_id: str
    source_sha256: str
    retargeted: bool
    policy: Path | None = None


def import_signal(
    signal: str,
    model: str,
    out_dir: str | os.PathLike[str],
    *,
    source: str | os.PathLike[str] | None = None,
    encoder_id: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> ImportedHead:
    """Import a published signal into ``out_dir``: ``<signal>-<model>.json``, ``<signal>-<model>.snippet.yaml`` and
    ``<signal>-<model>.policy.yaml`` (a complete policy: ``safeclip check IMAGE --policy`` it).

    ``source`` is the published file (checked against its pinned sha256); without it the file is fetched from its
    public location (or ``$SAFECLIP_ARTIFACTS_DIR``). ``encoder_id`` records the head in another embedding space
    than the OpenAI weights it was trained on: for testing mechanics behind other weights only (the artifact says
    so; its output there means nothing).

    >>> import_laion_nsfw("ViT-B-32", "heads/", source="clip_ViT-B-32_openai_binary_nsfw_head.pth")  # doctest: +SKIP
    """
    pub = published(signal, model)
    path, raw = _verified_source(pub, source, cache_dir)
    head = _convert(path, raw, pub, encoder_id)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot create the folder: {e.strerror or e}") from e
    stem = f"{signal}-{model}"
    if encoder_id is not None and encoder_id != head.metadata["trained_in"]:
        stem += "-retargeted"
    artifact = out / f"{stem}.json"
    data = json_bytes(head.to_dict())
    write_bytes_atomic(artifact, data)
    sha = sha256_bytes(data)
    category = _CATEGORY[signal]
    snippet = out / f"{stem}.snippet.yaml"
    note = "  # RETARGETED: mechanics only, not a moderation signal\n" if "retargeted" in head.metadata else ""
    write_bytes_atomic(snippet, (
        f"# {signal} head for {model}, imported from {pub.url} (sha256 {pub.sha256}; {_LICENCE}).\n"
        f"# Paste under `categories:` of a policy in {out}; the path is relative to that policy.\n"
        f"{category}:\n{note}  head: {{path: {artifact.name}, sha256: {sha}}}\n").encode())
    retargeted = "retargeted" in head.metadata
    policy = None
    if not retargeted:
        policy = out / f"{stem}.policy.yaml"
        write_bytes_atomic(policy, _policy_text(pub, artifact, sha))
    return ImportedHead(signal, model, artifact, sha, snippet, head.encoder_id, pub.sha256, retargeted, policy)


def import_laion_nsfw(model: str, out_dir: str | os.PathLike[str], **kwargs: object) -> ImportedHead:
    """:func:`import_signal` for LAION's NSFW head (``punsafe``) on ``ViT-B-32`` or ``ViT-L-14``."""
    return import_signal("laion-nsfw", model, out_dir, **kwargs)  # type: ignore[arg-type]


def import_laion_violence(model: str, out_dir: str | os.PathLike[str], **kwargs: object) -> ImportedHead:
    """:func:`import_signal` for the violence vectors on ``ViT-B-32`` or ``ViT-L-14``."""
    return import_signal("laion-violence", model, out_dir, **kwargs)  # type: ignore[arg-type]


def load_published_head(
    path: str | os.PathLike[str], sha256: str, *, cache_dir: str | os.PathLike[str] | None = None
) -> MLPHead:
    """The head a published file (named in a policy by its pinned sha256) converts to, cached after the first time.

    The published file's bytes are checked against ``sha256`` on every load, and the converted artifact against
    the sha256 the conversion is known to give.
    """
    pub = _BY_SHA.get(sha256.lower())
    if pub is None:
        raise ArtifactIntegrityError(f"{os.fspath(path)!r} is not a safeclip JSON head, and sha256 {sha256} is not "
                                     "a published file safeclip imports (see safeclip.importers.PUBLISHED)")
    raw, actual = _read_once(Path(path))
    if actual != pub.sha256:
        raise ArtifactIntegrityError(f"artifact {os.fspath(path)!r} has sha256 {actual}, but the policy pins "
                                     f"{pub.sha256}; refusing to load it")
    from .fetch import artifacts_cache_dir

    converted = artifacts_cache_dir(cache_dir) / "imported" / f"{pub.converted_sha256}.json"
    if converted.is_file():
        try:
            return MLPHead.from_dict(read_pinned_json(converted, pub.converted_sha256))
        except ArtifactIntegrityError:
            converted.unlink(missing_ok=True)  # our own cache entry: convert again
    head = _convert(Path(path), raw, pub, None)
    data = json_bytes(head.to_dict())
    if sha256_bytes(data) != pub.converted_sha256:
        raise ArtifactIntegrityError(f"importing {pub.filename} gave sha256 {sha256_bytes(data)}, not the pinned "
                                     f"{pub.converted_sha256}: this safeclip converts differently than the one that "
                                     "pinned it (a bug: please report it)")
    try:
        write_bytes_atomic(converted, data)
    except OSError:
        pass  # a read-only cache: convert again next time
    return head
