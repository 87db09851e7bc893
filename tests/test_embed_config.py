"""Device, runtime and threads resolution (safeclip.embed._config): ``auto`` decides without importing torch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from safeclip.embed._config import _torch_build, resolve_runtime, resolve_threads
from safeclip.errors import ModelLoadError

GPU_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia/version", "/dev/dxg", "/dev/kfd")


def test_the_torch_build_is_read_without_importing_torch():
    import torch

    build = _torch_build()
    assert build["cuda"] == torch.version.cuda
    assert build["hip"] == getattr(torch.version, "hip", None)


@pytest.mark.skipif(any(os.path.exists(p) for p in GPU_NODES) or sys.platform == "darwin",
                    reason="a GPU may be present: auto must ask torch")
def test_auto_device_on_a_cpu_machine_imports_no_torch():
    code = ("import sys\nfrom safeclip.embed import resolve_device\n"
            "print(resolve_device('auto'), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["cpu", "False"]


def test_runtime_resolution(monkeypatch):
    monkeypatch.delenv("SAFECLIP_RUNTIME", raising=False)
    assert resolve_runtime(None, "cpu", "fp32") == "onnx"
    assert resolve_runtime("auto", "cuda", "fp16") == "torch"
    assert resolve_runtime("auto", "mps", "fp32") == "torch"
    assert resolve_runtime("auto", "cpu", "bf16") == "torch"  # autocast is torch's
    assert resolve_runtime("auto", "cpu", "int8") == "onnx"
    assert resolve_runtime("torch", "cpu", "fp32") == "torch"
    monkeypatch.setenv("SAFECLIP_RUNTIME", "torch")
    assert resolve_runtime(None, "cpu", "fp32") == "torch"
    for args in (("onnx", "cuda", "fp32"), ("torch", "cpu", "int8"), ("auto", "cuda", "int8"),
                 ("onnx", "cpu", "fp16"), ("jax", "cpu", "fp32")):
        with pytest.raises(ModelLoadError):
            resolve_runtime(*args)


def test_threads(monkeypatch):
    monkeypatch.delenv("SAFECLIP_THREADS", raising=False)
    assert resolve_threads(None) is None and resolve_threads(3) == 3
    monkeypatch.setenv("SAFECLIP_THREADS", "2")
    assert resolve_threads(None) == 2 and resolve_threads(1) == 1
    for bad in (0, -1, True, "2"):
        with pytest.raises(ModelLoadError):
            resolve_threads(bad)
