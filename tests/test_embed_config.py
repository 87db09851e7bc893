"""Device, runtime and threads resolution (safeclip.embed._config): ``auto`` decides without importing torch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from safeclip.embed._config import _torch_build, onnx_providers, resolve_runtime, resolve_threads
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
    assert resolve_runtime("onnx", "cuda:1", "fp32") == "onnx"  # ONNX Runtime's CUDA provider (issue 23)
    for args in (("onnx", "mps", "fp32"), ("torch", "cpu", "int8"), ("auto", "cuda", "int8"),
                 ("onnx", "cpu", "fp16"), ("onnx", "cuda", "fp16"), ("jax", "cpu", "fp32")):
        with pytest.raises(ModelLoadError):
            resolve_runtime(*args)


def test_onnx_providers_for_cpu_and_cuda():
    """The CUDA path of the ONNX runtime (issue 23 item 4), checked without a GPU: which providers a session gets,
    and the one-line error naming onnxruntime-gpu where the CUDA provider is missing (as on this CPU build)."""
    both = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert onnx_providers("cpu", both) == ["CPUExecutionProvider"]
    assert onnx_providers("cuda", both) == [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    assert onnx_providers("cuda:3", both)[0] == ("CUDAExecutionProvider", {"device_id": 3})
    with pytest.raises(ModelLoadError, match="pip install onnxruntime-gpu"):
        onnx_providers("cuda", ["CPUExecutionProvider"])
    with pytest.raises(ModelLoadError):
        onnx_providers("mps", both)
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        from safeclip.embed._onnx import OnnxImageTower

        tower = OnnxImageTower.__new__(OnnxImageTower)  # only the provider choice runs: it comes before any file
        tower.device, tower.store, tower.manifest = "cuda", None, None
        with pytest.raises(ModelLoadError, match="onnxruntime-gpu"):
            tower._open()


def test_threads(monkeypatch):
    monkeypatch.delenv("SAFECLIP_THREADS", raising=False)
    assert resolve_threads(None) is None and resolve_threads(3) == 3
    monkeypatch.setenv("SAFECLIP_THREADS", "2")
    assert resolve_threads(None) == 2 and resolve_threads(1) == 1
    for bad in (0, -1, True, "2"):
        with pytest.raises(ModelLoadError):
            resolve_threads(bad)


def _check_cli(tmp_path, *args: str) -> subprocess.CompletedProcess[str]:
    from PIL import Image

    img = tmp_path / "img.jpg"
    Image.new("RGB", (32, 32), (90, 120, 200)).save(img)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAFECLIP_")}
    env.update(SAFECLIP_CACHE_DIR=str(tmp_path / "sc"), HF_HUB_OFFLINE="1")  # nothing may be downloaded
    return subprocess.run([sys.executable, "-m", "safeclip", "check", str(img), *args], capture_output=True,
                          text=True, env=env, timeout=120, stdin=subprocess.DEVNULL)


def _one_error_line(p: subprocess.CompletedProcess[str]) -> str:
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("safeclip: error: "), p.stderr
    assert "weights" not in lines[0] and len(lines[0]) < 240, lines[0]
    return lines[0]


def test_an_unknown_device_lists_the_valid_ones(tmp_path, tiny_model):
    line = _one_error_line(_check_cli(tmp_path, "--model", tiny_model, "--device", "gpu"))
    assert "unknown device 'gpu': use one of cpu, cuda, cuda:N, mps, auto" in line


@pytest.mark.skipif(any(os.path.exists(p) for p in GPU_NODES) or sys.platform == "darwin",
                    reason="a GPU may be present")
@pytest.mark.parametrize("device", ["cuda", "cuda:1", "mps"])
def test_an_unavailable_device_says_so(tmp_path, tiny_model, device):
    line = _one_error_line(_check_cli(tmp_path, "--model", tiny_model, "--device", device))
    assert f"device {device!r} is not available here" in line and "--device cpu" in line


def test_a_device_error_comes_before_the_weights():
    from safeclip.embed import Encoder
    from safeclip.errors import DeviceError

    with pytest.raises(DeviceError, match="unknown device 'gpu'"):  # this checkpoint does not exist: not reached
        Encoder("ViT-B-32", "/nonexistent/weights.bin", device="gpu")
    assert not issubclass(DeviceError, ModelLoadError)


def test_an_unknown_model_gets_close_names(tmp_path):
    for args in (["--model", "ViT-B-23"], ["--model", "ViT-B-23", "--pretrained", "openai"]):
        line = _one_error_line(_check_cli(tmp_path, *args))
        assert "unknown open_clip model 'ViT-B-23': did you mean ViT-B-32" in line
        assert "local-dir:/path/to/folder" in line and "RN50" not in line


def test_model_names_are_read_without_importing_open_clip():
    code = ("import sys\nfrom safeclip.embed._config import _open_clip_models\n"
            "names = _open_clip_models()\nprint(len(names), 'open_clip' in sys.modules, 'torch' in sys.modules)\n"
            "import open_clip\nprint(set(names) == set(open_clip.list_models()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    first, second = out.stdout.splitlines()
    assert int(first.split()[0]) > 50 and first.split()[1:] == ["False", "False"] and second == "True"
