"""Which encoder, on which device and runtime, with how many threads: resolved from arguments and ``SAFECLIP_*``.

Nothing here imports torch unless a GPU may actually be present (see :func:`accelerator_possible`).
"""

from __future__ import annotations

import importlib.util
import os
import platform
import re
import sys
from collections.abc import Mapping
from pathlib import Path

from ..errors import ModelLoadError

__all__ = ["DEFAULT_MODEL", "DEFAULT_PRETRAINED", "IDENTITY_VERSION", "PRECISIONS", "RUNTIMES",
           "accelerator_possible", "available_cpus", "default_cache_dir", "resolve_device", "resolve_encoder_args",
           "resolve_runtime", "resolve_threads"]

# ViT-B-32 at 224 px is ~4.4 GFLOPs per image: the best accuracy per CPU-second among the LAION-trained CLIPs,
# and laion2b_s34b_b79k is its strongest public checkpoint (66.6% ImageNet zero-shot).
DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"

IDENTITY_VERSION = 1
"""Bump when the way an ``encoder_id`` is derived from (model, weights, preprocessing) changes: audits remember the
identity of a loaded encoder by its arguments and this version, so a bump makes them load the model to learn it."""

RUNTIMES = ("auto", "torch", "onnx")
"""``auto``: ONNX Runtime on a CPU, torch on CUDA/MPS. ``onnx``: ONNX Runtime (CPU). ``torch``: open_clip eager."""

PRECISIONS = ("auto", "fp32", "fp16", "bf16", "int8")
"""``auto``: fp16 autocast on a GPU, fp32 on a CPU. ``int8``: ONNX Runtime dynamic int8, an opt-in with its own
``encoder_id``. fp16/bf16 are torch autocast."""


def default_cache_dir() -> Path:
    """``$SAFECLIP_CACHE_DIR``, else ``$XDG_CACHE_HOME/safeclip``, else ``~/.cache/safeclip``."""
    env = os.environ.get("SAFECLIP_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "safeclip"


def resolve_encoder_args(
    model: str | None, pretrained: str | None, policy_encoder: Mapping[str, str] | None = None
) -> tuple[str, str | None, str]:
    """Which weights to load: ``(model, pretrained, chosen_by)``, ``chosen_by`` one of caller / policy / default.

    The caller's choice (the arguments, else ``$SAFECLIP_MODEL`` / ``$SAFECLIP_PRETRAINED``) wins; without one the
    policy's ``encoder:`` is used; without that, :data:`DEFAULT_MODEL` with :data:`DEFAULT_PRETRAINED`. A caller who
    names only the weights (``pretrained=/models/vit-b-32.bin``) gets the policy's architecture with them.

    >>> resolve_encoder_args(None, None, {"model": "ViT-L-14", "pretrained": "openai"})[2]  # doctest: +SKIP
    'policy'
    """
    pol = dict(policy_encoder or {})
    model = model or os.environ.get("SAFECLIP_MODEL") or None
    pretrained = pretrained or os.environ.get("SAFECLIP_PRETRAINED") or None
    if model is None and pol.get("model"):
        if pretrained is None:
            return pol["model"], pol.get("pretrained"), "policy"
        return pol["model"], pretrained, "caller"
    if model is None:
        model = DEFAULT_MODEL
        chosen = "caller" if pretrained is not None else "default"
    else:
        chosen = "caller"
    if pretrained is None and not model.startswith(("local-dir:", "hf-hub:")):
        if pol.get("model") == model and pol.get("pretrained"):
            pretrained = pol["pretrained"]
        elif model == DEFAULT_MODEL:
            pretrained = DEFAULT_PRETRAINED
    return model, pretrained, chosen


def _torch_build() -> dict[str, str | None]:
    """``{"cuda": ..., "hip": ...}`` of the installed torch, read from its ``version.py`` without importing torch."""
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return {"cuda": None, "hip": None}
    try:
        text = (Path(list(spec.submodule_search_locations)[0]) / "version.py").read_text()
    except OSError:  # an unusual layout: assume the worst, let torch answer
        return {"cuda": "unknown", "hip": "unknown"}
    found: dict[str, str | None] = {}
    for key in ("cuda", "hip"):
        m = re.search(rf"^{key}\s*(?::[^=]*)?=\s*(.+)$", text, re.M)
        value = m.group(1).strip().strip("'\"") if m else "None"
        found[key] = None if value == "None" else value
    return found


def accelerator_possible() -> bool:
    """Whether asking torch for CUDA/MPS can say yes; ``False`` is certain and costs no ``import torch``.

    An Apple-silicon Mac may have MPS. Elsewhere a GPU needs a torch built for CUDA (or ROCm), read from torch's
    ``version.py`` without importing it, *and* the driver's device nodes (``/dev/nvidiactl``, WSL's ``/dev/dxg``,
    ROCm's ``/dev/kfd``); ``CUDA_VISIBLE_DEVICES=""`` or ``-1`` hides CUDA devices as it does from torch.
    """
    if "torch" in sys.modules:
        return True  # asking costs nothing any more
    if sys.platform == "darwin":
        return platform.machine() == "arm64"
    build = _torch_build()
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES", "x").strip() in {"", "-1"}
    cuda = build["cuda"] is not None and not hidden and any(
        os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia/version", "/dev/dxg"))
    hip = build["hip"] is not None and os.path.exists("/dev/kfd")
    return cuda or hip


def resolve_device(device: str | None = None) -> str:
    """``"auto"``/None -> cuda, then mps, then cpu; anything else is returned as given.

    ``auto`` imports torch only when :func:`accelerator_possible` says a GPU may be there.

    >>> resolve_device("cpu")
    'cpu'
    """
    device = device or os.environ.get("SAFECLIP_DEVICE") or "auto"
    if device != "auto":
        return device
    if not accelerator_possible():
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def resolve_runtime(runtime: str | None, device: str, precision: str) -> str:
    """The runtime that will run the image tower: ``"onnx"`` or ``"torch"`` (``runtime`` None: ``$SAFECLIP_RUNTIME``).

    ``auto`` is ONNX Runtime on a CPU and torch on CUDA/MPS (and for fp16/bf16 autocast, which only torch runs).
    """
    runtime = runtime or os.environ.get("SAFECLIP_RUNTIME") or "auto"
    if runtime not in RUNTIMES:
        raise ModelLoadError(f"runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r} "
                             "(check runtime= / --runtime / $SAFECLIP_RUNTIME)")
    on_cpu = device == "cpu"
    if runtime == "onnx" and not on_cpu:
        raise ModelLoadError(f"runtime 'onnx' runs on the CPU, not on {device!r}: use runtime='torch' there, "
                             "or device='cpu'")
    if precision == "int8" and (runtime == "torch" or not on_cpu):
        raise ModelLoadError("precision 'int8' runs on ONNX Runtime on the CPU: use runtime='onnx' (or 'auto') "
                             "with device='cpu'")
    if precision in {"fp16", "bf16"}:
        if runtime == "onnx":
            raise ModelLoadError(f"precision {precision!r} is torch autocast: use runtime='torch', or precision "
                                 "'fp32' / 'int8' with runtime 'onnx'")
        return "torch"
    if runtime == "auto":
        return "onnx" if on_cpu else "torch"
    return runtime


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the platform has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def resolve_threads(threads: int | None) -> int | None:
    """``threads``, else ``$SAFECLIP_THREADS``, else None (the runtime's default: every available core)."""
    if threads is None:
        env = os.environ.get("SAFECLIP_THREADS", "").strip()
        if not env:
            return None
        try:
            threads = int(env)
        except ValueError:
            raise ModelLoadError(f"SAFECLIP_THREADS must be a positive integer, not {env!r}") from None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ModelLoadError(f"threads must be a positive integer, not {threads!r}")
    return threads
