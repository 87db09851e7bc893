"""Batch audits: moderate many files into one Parquet table, keep the model busy, lose nothing, resume, re-score.

:func:`audit` chains the stages for a whole collection (the other place that does so is
:class:`~safeclip.moderator.Moderator`, for requests), with the same decode -> prepare -> embed -> score -> calibrate
-> decide path, so an audit row and ``Moderator.check`` agree on the same file. The package is the batch pipeline,
one module per step:

    plan.py         AuditPlan: the validated options of one audit (what an engine is handed)
    reader.py       the inputs: folders walked, manifests read
    worker.py       the per-file unit run by decode workers: read, sha256, cache lookup, decode, pixels
    distributor.py  the local engine's pool of decode processes
    mapper.py       THE batch unit: dedup by sha256 -> embed -> cache write -> score -> rows
    writer.py       the output: schema, rows, Parquet parts, resume, the exactly-once merge
    identity.py     the encoder's identity and its memo (encoders.json), so decoding starts before the model loads
    local.py        the local engine: decode processes and the model on this machine
    ray.py          the Ray engine: decode tasks and model actors on a Ray cluster (Ray imported only there)
    summary.py      AuditSummary
    rescore.py      re-deciding cached embeddings under another policy, without the model
    diff.py         the inputs whose action changed between two outputs

The two engines are siblings over the same worker, batch unit and writer: they write the same rows and the same
``OUT.parquet.parts/`` layout, so each resumes the other's runs. Importing this package loads neither torch,
pyarrow nor an engine, and starts no process.

>>> from safeclip.audit import audit                                             # doctest: +SKIP
>>> s = audit(["photos/"], out="audit.parquet", pretrained="/models/vit-b-32.pt") # doctest: +SKIP
>>> s.actions, s.errors                                                          # doctest: +SKIP
({'allow': 220, 'flag': 2, 'block': 0}, 0)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from .diff import diff
from .plan import AuditKeywords, AuditPlan, EngineOptions
from .reader import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, collect_inputs, read_manifest
from .rescore import rescore
from .summary import FAIL_LEVELS, AuditSummary
from .writer import OutputOptions, segments_table

if TYPE_CHECKING:  # pragma: no cover
    from typing_extensions import Unpack

    from ..embed import DecodeOptions, Encoder, EncoderSpec
    from ..policy import Policy

__all__ = [
    "AuditKeywords",
    "AuditPlan",
    "AuditSummary",
    "EngineOptions",
    "FAIL_LEVELS",
    "IMAGE_EXTENSIONS",
    "VIDEO_EXTENSIONS",
    "OutputOptions",
    "audit",
    "collect_inputs",
    "diff",
    "read_manifest",
    "rescore",
    "segments_table",
]


def audit(
    paths: Iterable[str | os.PathLike[str]] = (),
    *,
    out: str | os.PathLike[str] | None = None,
    manifests: Iterable[str | os.PathLike[str]] = (),
    policy: str | os.PathLike[str] | Policy | None = None,
    encoder: Encoder | EncoderSpec | None = None,
    decoding: DecodeOptions | None = None,
    output: OutputOptions | None = None,
    engine: str | EngineOptions = "local",
    cache: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    include_all: bool = False,
    progress: bool | None = None,
    verbose: bool = True,
    ray_options: Mapping[str, Any] | None = None,
    **keywords: Unpack[AuditKeywords],
) -> AuditSummary:
    """Moderate every input into ``out`` (Parquet, one row per input, input order); resumable.

    The options come in groups, each a value object handed only to the component that uses it: ``encoder`` (an
    :class:`~safeclip.embed.EncoderSpec`, or a loaded :class:`~safeclip.embed.Encoder`), ``decoding``
    (:class:`~safeclip.embed.DecodeOptions`), ``output`` (:class:`~safeclip.audit.writer.OutputOptions`) and
    ``engine`` (``"local"``, ``"ray"`` or an :class:`~safeclip.audit.plan.EngineOptions`). Every field also has a
    keyword of its own (:class:`~safeclip.audit.plan.AuditKeywords`), described below.

    ``paths``: files and folders (walked recursively for image files, by extension or content; ``include_all``:
    every regular file; what is left out is counted in the summary's ``skipped``: see :mod:`~safeclip.audit.reader`);
    ``manifests``: text / CSV / Parquet lists of paths (:func:`read_manifest`). ``policy``: a shipped name, a YAML
    path or a :class:`~safeclip.policy.Policy`. ``model``/``pretrained``: the weights (default: the policy's ``encoder:``,
    else the default encoder; the output's metadata records ``encoder_chosen_by``); ``runtime``, ``precision``,
    ``threads``: as for :class:`~safeclip.embed.Encoder`. ``cache``: the cache folder
    (embeddings and prompt embeddings; default :func:`~safeclip.embed.default_cache_dir`); ``use_cache=False``
    neither reads nor writes embeddings. ``workers``: decode processes (default: one per core); ``batch_size``:
    images per model forward (default: the encoder's). ``encoder``: an already loaded
    :class:`~safeclip.embed.Encoder` (then ``model``/``pretrained``/``device`` are unused). ``save_embeddings`` adds
    an ``embedding`` column (frames x D, flattened) that :func:`rescore` can use instead of the cache.
    ``part_rows``/``part_seconds``: how often rows are committed. ``task_timeout``: seconds before a stuck decode
    worker is killed (default 1.5 x the decoder's wall-clock backstop, ``decode_limits.wall_budget_s``).
    ``torch_threads``: the model's intra-op threads
    (default: every core on CPU), restored afterwards. ``verbose``: print the summary to stderr; ``progress``: a
    progress bar on stderr (default: when it is a TTY). ``engine="ray"`` runs the same worker and batch unit on
    Ray Data (``pip install 'safeclip[ray]'``; ``address``: the cluster, else the running or a new local Ray
    runtime; ``ray_options``: see :class:`~safeclip.audit.plan.RayOptions`), writing the same ``out``; see
    :mod:`safeclip.audit.ray`.

    Columns: ``path, path_bytes, sha256, bytes, width, height, frames, background, action, p_<category>..., error,
    encoder_id, policy`` (``path_bytes``: the raw name when it is not valid UTF-8, see :mod:`~safeclip.audit.reader`).
    ``out`` is never one of the inputs nor a file that is not a safeclip output; an existing safeclip output of
    other inputs is replaced only with ``overwrite=True`` (:func:`~safeclip.audit.writer.check_output`).
    A file that cannot be read or decoded is a row with ``error`` set and ``action`` ``"error"``. Errors of the audit as a
    whole are :class:`~safeclip.errors.ConfigError` (an option out of range, options that do not go together),
    :class:`~safeclip.errors.AuditError` s (no inputs, unreadable manifest, output a folder or locked) and
    :class:`~safeclip.errors.EngineError` s (engine missing, stalled or failed; what was committed is kept).
    The decode workers never import the caller's ``__main__``: a plain script, a notebook and ``python -c`` can
    call this without an ``if __name__ == "__main__":`` guard.

    >>> import pandas as pd, tempfile, os
    >>> from safeclip.audit import audit
    >>> out = os.path.join(tempfile.mkdtemp(), "audit.parquet")
    >>> s = audit(["photos/"], out=out, pretrained="/models/vit-b-32.pt")   # doctest: +SKIP
    >>> s.rows == len(pd.read_parquet(out))                                  # doctest: +SKIP
    True
    """
    plan = AuditPlan.create(
        paths, out=out, manifests=manifests, policy=policy, encoder=encoder, decoding=decoding, output=output,
        engine=engine, cache=cache, use_cache=use_cache, include_all=include_all, progress=progress, verbose=verbose,
        ray_options=ray_options, **keywords)
    if plan.engine.name == "ray":
        from . import ray as engine_module
    else:
        from . import local as engine_module
    return engine_module.run(plan)
