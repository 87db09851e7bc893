"""The audit's options, validated once: :class:`AuditPlan` is what :func:`~safeclip.audit.audit` hands an engine.

Everything that can be checked before a model loads or a process starts is checked here, so an engine never
re-validates and a wrong option fails in milliseconds: the inputs (collected, at least one), the output (not a
folder), the policy (loaded), the encoder to use (the caller's, else the policy's ``encoder:``, else the default:
:func:`safeclip.embed.resolve_encoder_args`), the engine and its options, the numbers.

The options travel as value objects, each handed only to the component that uses it: :class:`EncoderSpec` (the
model), :class:`DecodeOptions` (decode limits, fast decode, decode workers), :class:`OutputOptions` (the output
file, overwrite, parts, saved embeddings; the writer's) and :class:`EngineOptions` (which engine and its options).

>>> plan = AuditPlan.create(["a.jpg"], out="a.parquet", model="ViT-B-32", pretrained="/models/b32.bin")
>>> plan.inputs, plan.engine.name, plan.encoder_chosen_by
(('a.jpg',), 'local', 'caller')
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from .._keywords import apply_keywords
from ..decode import DecodeLimits
from ..embed import DecodeOptions, EncoderSpec
from ..errors import ConfigError, NoInputsError, OutputError
from ..policy import Policy, load_policy
from .reader import gather_inputs
from .writer import OutputOptions

if TYPE_CHECKING:  # pragma: no cover
    from typing_extensions import Unpack

    import pyarrow as pa

    from ..embed import Encoder
    from .identity import EncoderIdentity
    from .summary import AuditSummary, Tally
    from .writer import RunOutput

__all__ = ["ENGINES", "SMALL_AUDIT_FILES", "AuditKeywords", "AuditPlan", "EngineOptions", "RayOptions", "cpu_count",
           "encoder_kwargs"]

ENGINES: tuple[str, ...] = ("local", "ray")


def cpu_count() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


SMALL_AUDIT_FILES = 8
"""An audit of at most this many inputs decodes in threads of its own process (as ``Moderator`` does) instead of
starting decode processes: their start-up would be most of its time."""


def encoder_kwargs(spec: EncoderSpec, device: str | None = None) -> dict[str, Any]:
    """The :class:`~safeclip.embed.Encoder` options of ``spec`` that both engines pass on.

    On a CPU ``device`` the model's forward takes every core unless told otherwise (the decode workers run niced and
    fill the gaps); the Encoder's ``threads`` knob sets ONNX Runtime's threads or torch's, so the ONNX path never
    imports torch to set them. ONNX Runtime's idle threads do not spin there (``spin_wait=False``): the decode
    workers need those cycles, and an audit of photos is decode-bound.
    """
    threads = spec.threads
    on_cpu = device is not None and not device.startswith(("cuda", "mps"))
    if threads is None and on_cpu:
        threads = cpu_count()
    return {"runtime": spec.runtime, "precision": spec.precision, "threads": threads, "spin_wait": not on_cpu}


@dataclass(frozen=True)
class RayOptions:
    """Options of the Ray engine only (``audit(..., ray_options={...})``).

    ``actors``: model actors (default one per GPU, or one per node on CPU clusters); ``actor_gpus`` /
    ``actor_cpus``: resources per actor (default 1 GPU + 1 CPU, or 0.5 CPU without GPUs); ``decode_batch``: files
    per decode task; ``stall_timeout``: seconds without progress, or waiting for the model, before the run fails
    with :class:`~safeclip.errors.EngineStalledError` instead of hanging.
    """

    actors: int | None = None
    actor_gpus: float | None = None
    actor_cpus: float | None = None
    decode_batch: int = 32
    stall_timeout: float = 900.0

    @classmethod
    def create(cls, options: Mapping[str, Any] | None) -> RayOptions:
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"unknown ray_options {unknown}; known: {sorted(known)}")
        opts = cls(**options)
        if opts.decode_batch < 1 or (opts.actors is not None and opts.actors < 1):
            raise ConfigError("ray_options: decode_batch and actors must be >= 1")
        if not opts.stall_timeout > 0:
            raise ConfigError(f"ray_options: stall_timeout must be > 0, got {opts.stall_timeout!r}")
        return opts


@dataclass(frozen=True)
class EngineOptions:
    """Which engine runs the audit and how: ``name`` (``"local"`` or ``"ray"``), ``address`` (the Ray cluster),
    ``ray`` (:class:`RayOptions`), ``task_timeout`` (seconds before a stuck decode worker is killed; ``None``: 1.5
    times the decoder's wall-clock backstop, ``DecodeLimits.wall_budget_s``) and ``worker_nice`` (the decode processes' niceness)."""

    name: str = "local"
    address: str | None = None
    ray: RayOptions = field(default_factory=RayOptions)
    task_timeout: float | None = None
    worker_nice: int = 10

    def __post_init__(self) -> None:
        if self.name not in ENGINES:
            raise ConfigError(f"engine must be 'local' or 'ray', not {self.name!r}")
        if self.name != "ray" and (self.address is not None or self.ray != RayOptions()):
            raise ConfigError("address and ray_options are for engine='ray' "
                              "(on the command line: --address needs --engine ray)")
        if self.task_timeout is not None and not self.task_timeout > 0:
            raise ConfigError(f"task_timeout must be > 0, got {self.task_timeout!r}")


class AuditKeywords(TypedDict, total=False):
    """The keyword form of :func:`~safeclip.audit.audit`'s option groups (each maps onto one field: ``_KEYWORDS``)."""

    model: str | None
    pretrained: str | None
    device: str | None
    runtime: str | None
    precision: str
    threads: int | None
    torch_threads: int | None
    batch_size: int | None
    workers: int | None
    decode_limits: DecodeLimits
    fast_decode: bool
    overwrite: bool
    save_embeddings: bool
    part_rows: int
    part_seconds: float
    address: str | None
    task_timeout: float | None
    worker_nice: int


_KEYWORDS: dict[str, tuple[str, str]] = {
    "model": ("encoder", "model"), "pretrained": ("encoder", "pretrained"), "device": ("encoder", "device"),
    "runtime": ("encoder", "runtime"), "precision": ("encoder", "precision"), "threads": ("encoder", "threads"),
    "torch_threads": ("encoder", "threads"), "batch_size": ("encoder", "batch_size"),
    "workers": ("decoding", "workers"), "decode_limits": ("decoding", "limits"), "fast_decode": ("decoding", "fast"),
    "overwrite": ("output", "overwrite"), "save_embeddings": ("output", "save_embeddings"),
    "part_rows": ("output", "part_rows"), "part_seconds": ("output", "part_seconds"),
    "address": ("engine", "address"), "task_timeout": ("engine", "task_timeout"),
    "worker_nice": ("engine", "worker_nice"),
}


@dataclass(frozen=True)
class AuditPlan:
    """The validated options of one audit (see :func:`safeclip.audit.audit` for what each one means).

    ``inputs`` are collected (folders walked, manifests read; ``skipped`` counts the files left out, by reason);
    ``policy`` is loaded; ``encoder`` is the :class:`EncoderSpec` with the weights resolved from the caller, the
    policy's ``encoder:`` and the default, and ``encoder_chosen_by`` says which of the three chose them
    (``"caller"`` when a loaded ``encoder`` was passed in: ``loaded_encoder``); ``decoding``, ``output`` and
    ``engine`` are the other option groups, defaults applied; ``started_at`` is ``time.monotonic()`` at the call.
    Build one with :meth:`create`.
    """

    inputs: tuple[str, ...]
    policy: Policy
    encoder: EncoderSpec
    encoder_chosen_by: str
    decoding: DecodeOptions
    output: OutputOptions
    engine: EngineOptions
    use_cache: bool = True
    progress: bool = False
    verbose: bool = True
    skipped: Mapping[str, int] = field(default_factory=dict)
    loaded_encoder: Encoder | None = field(default=None, compare=False, repr=False)
    started_at: float = field(default_factory=time.monotonic, compare=False)

    @property
    def categories(self) -> tuple[str, ...]:
        return self.policy.category_names

    @property
    def cache_dir(self) -> Path:
        """The cache folder (embeddings, prompt embeddings, exports)."""
        return self.encoder.cache_path

    @property
    def task_timeout(self) -> float:
        """Seconds before a stuck decode worker is killed."""
        t = self.engine.task_timeout
        # Past the decoder's own wall-clock backstop, so a slow decode on a busy machine ends as the decoder's own
        # typed error (or a result), and only a decoder hung inside C is killed.
        return float(t) if t is not None else max(60.0, 1.5 * self.decoding.limits.wall_budget_s)

    @classmethod
    def create(
        cls,
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
    ) -> AuditPlan:
        """Validate the arguments of :func:`~safeclip.audit.audit` (the same names) into a plan.

        Raises :class:`~safeclip.errors.NoInputsError`, :class:`~safeclip.errors.OutputError`,
        :class:`~safeclip.errors.PolicyError`, :class:`~safeclip.errors.ManifestError`, or
        :class:`~safeclip.errors.ConfigError` for an option out of range or options that do not go together.
        """
        started_at = time.monotonic()
        loaded = None if encoder is None or isinstance(encoder, EncoderSpec) else encoder
        if isinstance(engine, str):
            engine = EngineOptions(name=engine, ray=RayOptions.create(ray_options))  # validated there
        elif ray_options:
            raise ConfigError("give ray_options inside EngineOptions(ray=...) when engine is an EngineOptions")
        if output is None:
            if out is None:
                raise ConfigError("audit needs out= (the Parquet file to write) or output=OutputOptions(...)")
            output = OutputOptions(out=Path(out))
        elif out is not None:
            output = dataclasses.replace(output, out=Path(out))
        spec = encoder if isinstance(encoder, EncoderSpec) else EncoderSpec()
        if cache is not None:
            spec = dataclasses.replace(spec, cache_dir=cache)
        try:
            groups = apply_keywords("audit", keywords, _KEYWORDS, {
                "encoder": spec, "decoding": decoding or DecodeOptions(), "output": output, "engine": engine})
        except TypeError as e:
            raise ConfigError(str(e)) from e
        spec, decoding, output, engine = groups["encoder"], groups["decoding"], groups["output"], groups["engine"]
        if output.out.is_dir():
            raise OutputError(f"--out {output.out} is a folder; give the path of the Parquet file to write")
        gathered = gather_inputs(paths, list(manifests), include_all=include_all)
        inputs = gathered.paths
        if not inputs:
            skipped = gathered.skipped_line()
            raise NoInputsError("no inputs: give image files, folders with image files, or a manifest"
                                + (f" ({skipped})" if skipped else ""))
        from .writer import check_output, check_writable  # here: importing the package stays light

        check_output(output.out, inputs, overwrite=output.overwrite)
        check_writable(output.out, spec.cache_path if use_cache else None)
        pol = load_policy(policy)
        if loaded is not None:
            spec = dataclasses.replace(spec, model=loaded.model_name, pretrained=loaded.pretrained)
            chosen_by = "caller"
        else:
            spec, chosen_by = spec.resolve(pol.encoder)
        return cls(
            inputs=inputs, policy=pol, encoder=spec, encoder_chosen_by=chosen_by, decoding=decoding, output=output,
            engine=engine, use_cache=use_cache,
            progress=bool(progress) if progress is not None else (verbose and sys.stderr.isatty()),
            verbose=verbose, skipped=gathered.skipped, loaded_encoder=loaded, started_at=started_at)

    def open_output(self, ident: EncoderIdentity, emb_dir: Path) -> RunOutput:
        """The run's :class:`~safeclip.audit.writer.RunOutput`, handed only the groups it needs."""
        from ..decode import decoder_id
        from .worker import decoder_fingerprint
        from .writer import RunOutput

        fingerprint = decoder_fingerprint(self.decoding.limits, ident.spec.size if self.decoding.fast else None,
                                          self.decoding.backend)
        return RunOutput(self.output, self.inputs, self.policy, ident, emb_dir, fingerprint=fingerprint,
                         encoder_chosen_by=self.encoder_chosen_by, decoder=decoder_id(self.decoding.backend))

    def summarize(self, table: pa.Table, tally: Tally, *, processed: int, startup_seconds: float, encoder_id: str,
                  label: str) -> AuditSummary:
        """The summary of an engine's run of this plan that wrote ``table`` (printed when verbose)."""
        from .summary import run_summary

        return run_summary(table, tally, out=str(self.output.out), inputs=len(self.inputs), skipped=self.skipped,
                           policy=self.policy.id, started_at=self.started_at, processed=processed,
                           startup_seconds=startup_seconds, encoder_id=encoder_id, label=label,
                           verbose=self.verbose)
