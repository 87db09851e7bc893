"""The ONNX Runtime image tower in use (safeclip.embed._onnx / _encoder): a warm start without torch, the text tower
only on a prompt-cache miss, the threads knob, forked children, the runtime/precision/device rules."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import safeclip
from safeclip.embed import Encoder
from safeclip.errors import ModelLoadError


@pytest.fixture(scope="module")
def warm_cache(tiny_model, tmp_path_factory):
    """A cache holding the export and the default policy's prompts: what a second start finds."""
    cache = tmp_path_factory.mktemp("warm-cache")
    safeclip.Moderator(model=tiny_model, cache_dir=cache, device="cpu")
    return cache


def run_py(code: str, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, **env}
    return subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, env=full,
                          timeout=300)


HEAVY = ("torch", "open_clip", "torchvision")


def test_a_warm_start_imports_neither_torch_nor_open_clip(tiny_model, warm_cache, photos):
    code = (
        "import json, sys, safeclip\n"
        f"m = safeclip.Moderator(model={tiny_model!r}, cache_dir={str(warm_cache)!r})\n"
        f"d = m.check({str(photos[0])!r})\n"
        f"print(json.dumps([m.encoder.runtime, d.action, sorted(x for x in {HEAVY!r} if x in sys.modules)]))\n"
    )
    out = run_py(code)
    assert out.returncode == 0, out.stderr
    runtime, action, heavy = json.loads(out.stdout.strip().splitlines()[-1])
    assert runtime == "onnx" and action in safeclip.ACTIONS and heavy == []


@pytest.mark.slow
def test_the_check_command_on_a_warm_cache_imports_no_torch(tiny_model, warm_cache, photos):
    code = (
        "import sys\n"
        "from safeclip.cli import main\n"
        f"rc = main(['check', {str(photos[0])!r}, {str(photos[1])!r}, '--model', {tiny_model!r}])\n"
        f"print(rc, sorted(x for x in {HEAVY!r} if x in sys.modules))\n"
    )
    out = run_py(code, SAFECLIP_CACHE_DIR=str(warm_cache))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "0 []"
    assert out.stdout.count("\t") >= 2  # one result line per file


def test_the_text_tower_is_loaded_on_a_miss_and_released(tiny_model, warm_cache):
    enc = Encoder(tiny_model, cache_dir=warm_cache)
    assert enc.runtime == "onnx" and enc._torch is None
    ref = Encoder(tiny_model, cache_dir=warm_cache, runtime="torch")
    texts = ["a prompt no policy has", "another new one"]
    assert enc.prompt_cache.missing(texts) == texts
    got = enc.embed_texts(texts)
    assert enc._torch is None  # released again
    np.testing.assert_allclose(got, ref.embed_texts(texts, use_cache=False), atol=1e-5)
    assert enc.prompt_cache.missing(texts) == []


def test_check_decides_like_the_torch_runtime(tiny_model, warm_cache, photos):
    onnx = safeclip.Moderator(model=tiny_model, cache_dir=warm_cache, fast_decode=False)
    torch_m = safeclip.Moderator(model=tiny_model, cache_dir=warm_cache, runtime="torch", fast_decode=False)
    assert (onnx.encoder.runtime, torch_m.encoder.runtime) == ("onnx", "torch")
    for a, b in zip(onnx.check_many(photos[:6]), torch_m.check_many(photos[:6])):
        assert a.encoder_id == b.encoder_id
        for name in a.categories:
            assert abs(a.categories[name].probability - b.categories[name].probability) < 1e-4


def test_one_threads_knob_for_both_runtimes(tiny_model, warm_cache, monkeypatch):
    enc = Encoder(tiny_model, cache_dir=warm_cache, threads=1)
    assert enc._onnx._session.get_session_options().intra_op_num_threads == 1
    monkeypatch.setenv("SAFECLIP_THREADS", "2")
    enc = Encoder(tiny_model, cache_dir=warm_cache)
    assert enc.threads == 2 and enc._onnx._session.get_session_options().intra_op_num_threads == 2
    import torch

    before = torch.get_num_threads()
    try:
        Encoder(tiny_model, cache_dir=warm_cache, runtime="torch", threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    monkeypatch.setenv("SAFECLIP_THREADS", "many")
    with pytest.raises(ModelLoadError, match="SAFECLIP_THREADS"):
        Encoder(tiny_model, cache_dir=warm_cache)


def test_runtime_rules(tiny_model, warm_cache, monkeypatch):
    with pytest.raises(ModelLoadError, match="runs on the CPU or CUDA"):
        Encoder(tiny_model, cache_dir=warm_cache, runtime="onnx", device="mps")
    with pytest.raises(ModelLoadError, match="runtime must be one of"):
        Encoder(tiny_model, cache_dir=warm_cache, runtime="tensorrt")
    with pytest.raises(ModelLoadError, match="autocast"):
        Encoder(tiny_model, cache_dir=warm_cache, runtime="onnx", precision="fp16")
    monkeypatch.setenv("SAFECLIP_RUNTIME", "torch")
    assert Encoder(tiny_model, cache_dir=warm_cache).runtime == "torch"
    assert Encoder(tiny_model, cache_dir=warm_cache, runtime="onnx").runtime == "onnx"  # the argument wins


FORKING_SERVER = """
import json, os, sys, time
import safeclip
m = safeclip.Moderator(model=sys.argv[1], cache_dir=sys.argv[2], threads=2)
m.embed_text(["a prompt that loads the text tower in this process"])  # torch has run here too
expected = m.check(sys.argv[3]).to_dict()  # the parent has run ORT's thread pool
kids = {}
for _ in range(2):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        d = m.check(sys.argv[3]).to_dict()
        threads = m.encoder._onnx._session.get_session_options().intra_op_num_threads
        os.write(w, json.dumps([d == expected, threads]).encode())
        os.close(w)
        sys.exit(7)  # a worker that ends normally: the interpreter's full exit, not os._exit
    os.close(w)
    kids[pid] = r
out = []
for pid, r in kids.items():
    with os.fdopen(r, "rb") as f:
        same, threads = json.loads(f.read() or b"[null, null]")
    out.append([same, threads, os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])])
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_children_of_an_onnx_moderator_neither_hang_nor_hang_at_exit(tiny_model, warm_cache, photos):
    """gunicorn --preload: the parent ran ORT's thread pool (and torch), then forks. Each child makes its own
    one-thread session (the parent's pool does not survive fork, and destroying the inherited session hangs), and
    exits with its own status (onnxruntime's native teardown would wait for ever on a thread of the parent)."""
    proc = subprocess.Popen([sys.executable, "-W", "ignore", "-c", FORKING_SERVER, tiny_model, str(warm_cache),
                             str(photos[0])], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the server and its hung children
        proc.communicate()
        pytest.fail("a forked worker hung (in its first forward or at exit)")
    assert proc.returncode == 0, err
    assert json.loads(out.strip().splitlines()[-1]) == [[True, 1, 7], [True, 1, 7]]


def test_spinning_is_a_session_option_the_audit_turns_off(tiny_model, warm_cache):
    """Issue 23 item 2: beside decode workers, ONNX Runtime's idle threads must not spin."""
    enc = Encoder(tiny_model, cache_dir=warm_cache, spin_wait=False)
    opts = enc._onnx._session.get_session_options()
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    enc = Encoder(tiny_model, cache_dir=warm_cache)
    assert enc._onnx._session.get_session_options().get_session_config_entry(
        "session.intra_op.allow_spinning") == "1"


def test_an_images_embedding_is_the_same_bits_in_any_batch(tiny_model, warm_cache):
    """Issue 23 item 3: on ONNX Runtime an image's embedding does not depend on the batch it rides in (scores do not
    either: tests/test_score.py), so a re-run or resumed audit compares exactly."""
    enc = Encoder(tiny_model, cache_dir=warm_cache, batch_size=16)
    px = np.random.default_rng(0).integers(0, 256, (40, 64, 64, 3), dtype=np.uint8)
    whole = enc.embed_pixels(px)
    for n, at in [(1, 5), (3, 4), (16, 0), (7, 20), (17, 23)]:
        assert np.array_equal(enc.embed_pixels(px[at:at + n]), whole[at:at + n]), (n, at)


def test_torch_with_fixed_shapes_gives_the_same_bits_in_any_batch(tiny_model, warm_cache):
    """What CUDA runs by default (fixed batch shapes, issue 23 item 3), checked on the CPU: padded to one shape, an
    image's torch embedding does not depend on the batch it rides in."""
    enc = Encoder(tiny_model, cache_dir=warm_cache, runtime="torch", batch_size=8)
    px = np.random.default_rng(1).integers(0, 256, (20, 64, 64, 3), dtype=np.uint8)
    whole = np.empty((20, enc.dim), np.float32)
    enc._torch.embed_pixels(px, 8, whole, fixed_shape=True)
    for n, at in [(1, 3), (2, 9), (8, 0), (5, 15)]:
        part = np.empty((n, enc.dim), np.float32)
        enc._torch.embed_pixels(px[at:at + n], 8, part, fixed_shape=True)
        assert np.array_equal(part, whole[at:at + n]), (n, at)
