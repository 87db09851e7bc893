"""The audit's options, validated once: :class:`AuditPlan` is what :func:`~safeclip.audit.audit` hands an engine.

Everything that can be checked before a model loads or a process starts is checked here, so an engine never
re-validates and a wrong option fails in milliseconds: the inputs (collected, at least one), the output (not a
folder), the policy (loaded), the encoder to use (the caller's, else the policy's ``encoder:``, else the default:
:func:`safeclip.embed.resolve_encoder_args`), the engine and its options, the numbers.

>>> plan = AuditPlan.create(["a.jpg"], out="a.parquet", model="ViT-B-32", pretrained="/models/b32.bin")
>>> plan.inputs, plan.engine, plan.encoder_chosen_by
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
from typing import TYPE_CHECKING, Any

from ..decode import DecodeLimits
from ..embed import PRECISIONS, RUNTIMES, default_cache_dir, resolve_encoder_args
from ..errors import ConfigError, NoInputsError, OutputError
from ..policy import Policy, load_policy
from .reader import gather_inputs

if TYPE_CHECKING:  # pragma: no cover
    from ..embed import Encoder

__all__ = ["ENGINES", "AuditPlan", "RayOptions", "cpu_count", "encoder_kwargs"]

ENGINES: tuple[str, ...] = ("local", "ray")


def cpu_count() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def encoder_kwargs(plan: AuditPlan, device: str | None = None) -> dict[str, Any]:
    """The :class:`~safeclip.embed.Encoder` options of ``plan`` that both engines pass on.

    On a CPU ``device`` the model's forward takes every core unless told otherwise (the decode workers run niced and
    fill the gaps); the Encoder's ``threads`` knob sets ONNX Runtime's threads or torch's, so the ONNX path never
    imports torch to set them.
    """
    threads = plan.threads or plan.torch_threads
    if threads is None and device is not None and not device.startswith(("cuda", "mps")):
        threads = cpu_count()
    return {"runtime": plan.runtime, "precision": plan.precision, "threads": threads}


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
class AuditPlan:
    """The validated options of one audit (see :func:`safeclip.audit.audit` for what each one means).

    ``inputs`` are collected (folders walked, manifests read); ``policy`` is loaded; ``model``/``pretrained`` are
    the weights to load, resolved from the caller, the policy's ``encoder:`` and the default, and
    ``encoder_chosen_by`` says which of the three chose them (``"caller"`` when an ``encoder`` was passed in);
    ``task_timeout`` and ``progress`` have their defaults applied; ``skipped`` counts the files of the folders left
    out, by reason (:class:`~safeclip.audit.reader.Inputs`); ``runtime``/``precision``/``threads`` go to the
    :class:`~safeclip.embed.Encoder`; ``started_at`` is ``time.monotonic()`` at the call. Build one with
    :meth:`create`.
    """

    inputs: tuple[str, ...]
    out: Path
    policy: Policy
    model: str | None
    pretrained: str | None
    encoder_chosen_by: str
    cache_dir: Path
    decode_limits: DecodeLimits
    task_timeout: float
    encoder: Encoder | None = field(default=None, compare=False, repr=False)
    device: str | None = None
    runtime: str | None = None
    precision: str = "auto"
    threads: int | None = None
    include_all: bool = False
    overwrite: bool = False
    skipped: Mapping[str, int] = field(default_factory=dict)
    use_cache: bool = True
    workers: int | None = None
    batch_size: int | None = None
    save_embeddings: bool = False
    fast_decode: bool = True
    part_rows: int = 2048
    part_seconds: float = 60.0
    torch_threads: int | None = None
    worker_nice: int = 10
    progress: bool = False
    verbose: bool = True
    engine: str = "local"
    address: str | None = None
    ray: RayOptions = field(default_factory=RayOptions)
    started_at: float = field(default_factory=time.monotonic, compare=False)

    @property
    def categories(self) -> tuple[str, ...]:
        return self.policy.category_names

    @classmethod
    def create(
        cls,
        paths: Iterable[str | os.PathLike[str]] = (),
        *,
        out: str | os.PathLike[str],
        manifests: Iterable[str | os.PathLike[str]] = (),
        policy: str | os.PathLike[str] | Policy | None = None,
        model: str | None = None,
        pretrained: str | None = None,
        encoder: Encoder | None = None,
        cache: str | os.PathLike[str] | None = None,
        decode_limits: DecodeLimits | None = None,
        task_timeout: float | None = None,
        progress: bool | None = None,
        ray_options: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> AuditPlan:
        """Validate the arguments of :func:`~safeclip.audit.audit` (the same names) into a plan.

        Raises :class:`~safeclip.errors.NoInputsError`, :class:`~safeclip.errors.OutputError`,
        :class:`~safeclip.errors.PolicyError`, :class:`~safeclip.errors.ManifestError`, or
        :class:`~safeclip.errors.ConfigError` for an option out of range or options that do not go together.
        """
        started_at = time.monotonic()
        engine = options.get("engine", "local")
        if engine not in ENGINES:
            raise ConfigError(f"engine must be 'local' or 'ray', not {engine!r}")
        if engine != "ray" and (options.get("address") is not None or ray_options):
            raise ConfigError("address and ray_options are for engine='ray' "
                             "(on the command line: --address needs --engine ray)")
        ray = RayOptions.create(ray_options)
        for name in ("part_rows", "workers", "batch_size", "torch_threads", "threads"):
            value = options.get(name)
            if value is not None and int(value) < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if options.get("runtime") is not None and options["runtime"] not in RUNTIMES:
            raise ConfigError(f"runtime must be one of {', '.join(RUNTIMES)}, not {options['runtime']!r}")
        if options.get("precision", "auto") not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, not {options['precision']!r}")
        if task_timeout is not None and not task_timeout > 0:
            raise ConfigError(f"task_timeout must be > 0, got {task_timeout!r}")
        out = Path(out)
        if out.is_dir():
            raise OutputError(f"--out {out} is a folder; give the path of the Parquet file to write")
        gathered = gather_inputs(paths, list(manifests), include_all=bool(options.get("include_all", False)))
        inputs = gathered.paths
        if not inputs:
            skipped = gathered.skipped_line()
            raise NoInputsError("no inputs: give image files, folders with image files, or a manifest"
                                + (f" ({skipped})" if skipped else ""))
        from .writer import check_output, check_writable  # here: importing the package stays light

        check_output(out, inputs, overwrite=bool(options.get("overwrite", False)))
        check_writable(out, (Path(cache) if cache is not None else default_cache_dir())
                       if options.get("use_cache", True) else None)
        pol = load_policy(policy)
        if encoder is not None:
            model, pretrained, chosen_by = encoder.model_name, encoder.pretrained, "caller"
        else:
            model, pretrained, chosen_by = resolve_encoder_args(model, pretrained, pol.encoder)
        limits = decode_limits or DecodeLimits()
        verbose = bool(options.get("verbose", True))
        return cls(
            inputs=inputs, out=out, policy=pol, model=model, pretrained=pretrained, encoder_chosen_by=chosen_by,
            cache_dir=Path(cache) if cache is not None else default_cache_dir(), decode_limits=limits,
            task_timeout=float(task_timeout or max(60.0, 6 * float(limits.timeout_s))), encoder=encoder,
            progress=bool(progress) if progress is not None else (verbose and sys.stderr.isatty()),
            skipped=gathered.skipped, ray=ray, started_at=started_at, **options)
