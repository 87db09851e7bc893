"""Which encoder, on which device and runtime, with how many threads: resolved from arguments and ``SAFECLIP_*``.

Nothing here imports torch unless a GPU may actually be present (see :func:`accelerator_possible`).
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import platform
import re
import sys
from typing import Any
from collections.abc import Mapping
from pathlib import Path

from .._dirs import default_cache_dir
from ..errors import DeviceError, ModelLoadError

__all__ = ["DEFAULT_MODEL", "DEFAULT_PRETRAINED", "DEVICES", "IDENTITY_VERSION", "PRECISIONS", "RUNTIMES",
           "accelerator_possible", "available_cpus", "check_device_name", "check_model_name", "default_cache_dir",
           "onnx_providers", "resolve_device", "resolve_encoder_args", "resolve_runtime", "resolve_threads"]

# ViT-B-32 at 224 px is ~4.4 GFLOPs per image: the best accuracy per CPU-second among the LAION-trained CLIPs,
# and laion2b_s34b_b79k is its strongest public checkpoint (66.6% ImageNet zero-shot).
DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"

IDENTITY_VERSION = 3
"""Bump when the way an ``encoder_id`` is derived from (model, weights, preprocessing) changes: audits remember the
identity of a loaded encoder by its arguments and this version, so a bump makes them load the model to learn it.
2: a published checkpoint file (``known_weights.json``) is named by its pretrained tag, not by its hash.
3: so is a file in the hub cache of the repository open_clip downloads that tag from (``timm/..openai``)."""

RUNTIMES = ("auto", "torch", "onnx")
"""``auto``: ONNX Runtime on a CPU, torch on CUDA/MPS. ``onnx``: ONNX Runtime (CPU). ``torch``: open_clip eager."""

PRECISIONS = ("auto", "fp32", "fp16", "bf16", "int8")
"""``auto``: fp16 autocast on a GPU, fp32 on a CPU. ``int8``: ONNX Runtime dynamic int8, an opt-in with its own
``encoder_id``. fp16/bf16 are torch autocast."""


DEVICES = ("cpu", "cuda", "cuda:N", "mps", "auto")
"""The device names an :class:`~safeclip.embed.Encoder` takes (``cuda:N``: the N-th CUDA GPU)."""

_DEVICE_RE = re.compile(r"cpu|cuda(:\d+)?|mps|auto")


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
    """``"auto"``/None -> cuda, then mps, then cpu; a named device is returned as given once it is known available.

    ``auto`` imports torch only when :func:`accelerator_possible` says a GPU may be there. An unknown name or an
    unavailable device is a :class:`~safeclip.errors.DeviceError`, raised before any weights load.

    >>> resolve_device("cpu")
    'cpu'
    """
    from_env = not device and bool(os.environ.get("SAFECLIP_DEVICE"))
    device = device or os.environ.get("SAFECLIP_DEVICE") or "auto"
    where = " (from $SAFECLIP_DEVICE)" if from_env else ""
    check_device_name(device, where)
    if device != "auto":
        _check_available(device, where)
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


def check_device_name(device: str, where: str = "") -> None:
    """Raise :class:`DeviceError` unless ``device`` is one of :data:`DEVICES` (``where``: said after the name)."""
    if not _DEVICE_RE.fullmatch(device):
        raise DeviceError(f"unknown device {device!r}{where}: use one of {', '.join(DEVICES)}")


def _check_available(device: str, where: str) -> None:
    """Raise :class:`DeviceError` unless ``device`` (cpu, cuda, cuda:N or mps) exists on this machine."""
    if device == "cpu":
        return
    missing = None
    if device == "mps":
        if sys.platform != "darwin" or not accelerator_possible():
            missing = "MPS needs an Apple-silicon Mac"
        else:
            import torch

            mps = getattr(torch.backends, "mps", None)
            if mps is None or not mps.is_available():
                missing = "torch reports MPS unavailable"
    elif not accelerator_possible():
        missing = "no CUDA GPU is visible (no driver, a CPU-only torch, or CUDA_VISIBLE_DEVICES hides it)"
    else:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device.partition(":")[2] or 0)
        if index >= count:
            missing = f"torch sees {count or 'no'} CUDA GPU{'s' if count > 1 else ''}"
    if missing:
        raise DeviceError(f"device {device!r}{where} is not available here: {missing}; use --device cpu "
                          "(device='cpu') or auto")


def check_model_name(model: str) -> None:
    """Raise :class:`ModelLoadError` with close names unless ``model`` is an open_clip architecture (or a
    ``local-dir:`` / ``hf-hub:`` name). Reads open_clip's model configs without importing it (and torch)."""
    if model.startswith(("local-dir:", "hf-hub:")):
        return
    names = _open_clip_models()
    if not names or model in names:
        return
    folded = {n.lower(): n for n in names}  # case-folded, so that vit-b-32 finds ViT-B-32 first
    close = [folded[n] for n in difflib.get_close_matches(model.lower(), list(folded), n=4, cutoff=0.6)]
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ModelLoadError(f"unknown open_clip model {model!r}: {hint}(open_clip.list_models() lists all {len(names)}; "
                         "a local open_clip folder is local-dir:/path/to/folder)")


def _open_clip_models() -> list[str]:
    """``open_clip.list_models()``; read from its ``model_configs`` folder while open_clip is not imported."""
    oc = sys.modules.get("open_clip")
    if oc is not None:
        return list(oc.list_models())
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    folder = Path(list(spec.submodule_search_locations)[0]) / "model_configs"
    return sorted(p.stem for p in folder.glob("*.json"))


def resolve_runtime(runtime: str | None, device: str, precision: str) -> str:
    """The runtime that will run the image tower: ``"onnx"`` or ``"torch"`` (``runtime`` None: ``$SAFECLIP_RUNTIME``).

    ``auto`` is ONNX Runtime on a CPU and torch on CUDA/MPS (and for fp16/bf16 autocast, which only torch runs).
    ``onnx`` also runs on CUDA, through ONNX Runtime's CUDA provider (``onnxruntime-gpu``), in fp32.
    """
    runtime = runtime or os.environ.get("SAFECLIP_RUNTIME") or "auto"
    if runtime not in RUNTIMES:
        raise ModelLoadError(f"runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r} "
                             "(check runtime= / --runtime / $SAFECLIP_RUNTIME)")
    on_cpu = device == "cpu"
    if runtime == "onnx" and not (on_cpu or device.startswith("cuda")):
        raise ModelLoadError(f"runtime 'onnx' runs on the CPU or CUDA, not on {device!r}: use runtime='torch' "
                             "there, or device='cpu'")
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


def onnx_providers(device: str, available: list[str]) -> list[Any]:
    """ONNX Runtime's execution providers for ``device`` (``available``: ``onnxruntime.get_available_providers()``):
    the CPU provider, or CUDA's on the device's ordinal with the CPU's behind it for what CUDA does not run.

    >>> onnx_providers("cuda:1", ["CUDAExecutionProvider", "CPUExecutionProvider"])
    [('CUDAExecutionProvider', {'device_id': 1}), 'CPUExecutionProvider']
    """
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if not device.startswith("cuda"):
        raise ModelLoadError(f"runtime 'onnx' runs on the CPU or CUDA, not on {device!r}")
    if "CUDAExecutionProvider" not in available:
        raise ModelLoadError(f"runtime 'onnx' on {device!r} needs ONNX Runtime's CUDA provider, which this "
                             f"onnxruntime lacks (it has {', '.join(available) or 'none'}): pip install "
                             "onnxruntime-gpu, or use runtime='torch' on the GPU")
    ordinal = int(device.split(":", 1)[1]) if ":" in device else 0
    return [("CUDAExecutionProvider", {"device_id": ordinal}), "CPUExecutionProvider"]


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
