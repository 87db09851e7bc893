"""The ONNX export of the image tower (safeclip.embed._export / _store): manifest, verification, integrity, locking,
and the fall-backs to torch. Tiny random-weight checkpoint: these test the machinery, never a moderation result."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from safeclip.embed import Encoder, RuntimeFallbackWarning
from safeclip.embed._export import verification_batch
from safeclip.embed._store import ExportStore
from safeclip.errors import ArtifactIntegrityError, ModelLoadError


def store_of(enc: Encoder) -> ExportStore:
    return enc._onnx.store


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    """A cache with the tiny model exported (fp32), and the torch encoder of the same weights."""
    cache = tmp_path_factory.mktemp("export-cache")
    return Encoder(tiny_model, cache_dir=cache, device="cpu"), Encoder(tiny_model, cache_dir=cache, runtime="torch")


def test_export_round_trip_matches_torch_and_shares_its_space(exported):
    onnx, torch_enc = exported
    assert onnx.runtime == "onnx" and torch_enc.runtime == "torch"
    assert onnx.encoder_id == torch_enc.encoder_id  # same space: caches and calibrators carry over
    assert (onnx.pixel_spec, onnx.dim) == (torch_enc.pixel_spec, torch_enc.dim)
    assert onnx.logit_scale == pytest.approx(torch_enc.logit_scale)
    rng = np.random.default_rng(3)
    for n in (1, 5, 17):  # below, at and above the batch size
        px = rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)
        a, b = onnx.embed_pixels(px), torch_enc.embed_pixels(px)
        assert a.shape == (n, onnx.dim) and a.dtype == np.float32
        assert (a * b).sum(1).min() >= 0.99999
    m = store_of(onnx).read_manifest()
    path = store_of(onnx).dir / m["file"]
    assert path.parent.parent == Path(onnx.cache_dir) / "onnx"
    assert sorted(m["files"]) == [path.name, path.name + ".data"]  # the graph, and its weights beside it
    for name, f in m["files"].items():
        assert f["bytes"] == (path.parent / name).stat().st_size
        assert f["sha256"] == hashlib.sha256((path.parent / name).read_bytes()).hexdigest()
    assert m["verified"]["min_cosine"] >= 0.99999 and m["verified"]["floor"] == 0.99999
    assert m["opset"] == 17 and m["versions"]["onnxruntime"] and m["dim"] == onnx.dim


def test_verification_batch_is_fixed():
    a, b = verification_batch(32), verification_batch(32)
    assert a.shape == (4, 32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["flip", "truncate", "graph"])
def test_a_tampered_export_is_refused_and_exported_again(exported, tiny_model, damage, caplog, monkeypatch):
    onnx, torch_enc = exported
    store = store_of(onnx)
    m = store.read_manifest()
    weights = store.dir / (m["file"] + ".data")
    target = store.dir / m["file"] if damage == "graph" else weights
    data = bytearray(target.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 3]
    else:
        data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(ArtifactIntegrityError):
        store.checked_model(m)
    # Every session made, with the weights' digest when it was made; every run, with its session's digest.
    import onnxruntime

    made, runs = [], []
    real = onnxruntime.InferenceSession

    class Recording:
        def __init__(self, path, *args, **kwargs):
            self.digest = hashlib.sha256(weights.read_bytes() + Path(path).read_bytes()).hexdigest()
            self._s = real(path, *args, **kwargs)
            made.append(self.digest)

        def run(self, *args, **kwargs):
            runs.append(self.digest)
            return self._s.run(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self._s, name)

    monkeypatch.setattr(onnxruntime, "InferenceSession", Recording)
    with caplog.at_level(logging.WARNING, logger="safeclip"):
        again = Encoder(tiny_model, cache_dir=onnx.cache_dir, device="cpu")
    assert any("refusing the ONNX export" in r.getMessage() for r in caplog.records)
    assert again.runtime == "onnx" and store.valid_manifest() is not None
    px = np.random.default_rng(4).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    assert (again.embed_pixels(px) * torch_enc.embed_pixels(px)).sum(1).min() >= 0.99999
    good = hashlib.sha256(weights.read_bytes() + (store.dir / m["file"]).read_bytes()).hexdigest()
    assert runs and set(runs) == {good}  # whatever was loaded from the damaged files never ran
    assert damage != "truncate" or made == [good]  # a wrong size is refused before anything reads the file


@pytest.mark.slow
def test_two_exporters_at_once_export_once(tiny_model, tmp_path):
    """Two processes exporting into one cache: one exports, the other waits on the lock and reuses it."""
    cmd = [sys.executable, "-m", "safeclip.embed._export", "--model", tiny_model, "--cache", str(tmp_path),
           "--precision", "fp32", "--opset", "17"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    verdicts = [json.loads(p.communicate(timeout=300)[0].strip().splitlines()[-1]) for p in procs]
    assert all(v["ok"] for v in verdicts), verdicts
    assert sorted(v["reused"] for v in verdicts) == [False, True]
    enc = Encoder(tiny_model, cache_dir=tmp_path, device="cpu")
    assert enc.runtime == "onnx" and store_of(enc).valid_manifest() is not None
    assert not [p for p in store_of(enc).dir.iterdir() if p.name.endswith(".tmp")]


def _shadow(tmp_path: Path, files: dict[str, str]) -> str:
    """A folder put first on the export child's PYTHONPATH (the parent process is not affected)."""
    d = tmp_path / "shadow"
    for name, text in files.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(textwrap.dedent(text))
    return os.pathsep.join([str(d), os.environ.get("PYTHONPATH", "")])


@pytest.mark.slow
def test_an_export_that_fails_falls_back_to_torch_with_one_log_line(tiny_model, tmp_path, monkeypatch, caplog):
    # The TorchScript exporter needs the onnx package: without it the export fails as an unexportable tower does.
    monkeypatch.setenv("PYTHONPATH", _shadow(tmp_path, {"onnx/__init__.py": "raise ImportError('no onnx here')"}))
    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="safeclip"):
        enc = Encoder(tiny_model, cache_dir=cache, device="cpu")
    assert enc.runtime == "torch"
    lines = [r.getMessage() for r in caplog.records if r.name == "safeclip"]
    assert lines[0].startswith("exporting the image tower")  # what the wait is for, then why it failed
    assert len(lines) == 2 and "runs on torch" in lines[1] and "onnx" in lines[1], lines
    # The failure is recorded: the next start falls back at once, without another export attempt ...
    from safeclip.embed import _export

    monkeypatch.setattr(_export, "export_in_child", lambda *a, **k: pytest.fail("exported again"))
    assert Encoder(tiny_model, cache_dir=cache, device="cpu").runtime == "torch"
    # ... and asking for onnx explicitly is an error that says why.
    with pytest.raises(ModelLoadError, match="runtime='torch'"):
        Encoder(tiny_model, cache_dir=cache, runtime="onnx")


@pytest.mark.slow
def test_an_export_that_does_not_reproduce_torch_falls_back_with_a_warning(tiny_model, tmp_path, monkeypatch):
    # In the export child only, ONNX Runtime returns the embeddings' components reversed.
    monkeypatch.setenv("PYTHONPATH", _shadow(tmp_path, {"sitecustomize.py": """
        import onnxruntime
        _run = onnxruntime.InferenceSession.run
        def run(self, *args, **kwargs):
            return [o[:, ::-1].copy() for o in _run(self, *args, **kwargs)]
        onnxruntime.InferenceSession.run = run
        """}))
    with pytest.warns(RuntimeFallbackWarning, match="min cosine"):
        enc = Encoder(tiny_model, cache_dir=tmp_path / "cache", device="cpu")
    assert enc.runtime == "torch"
    assert store_of_failure(tmp_path / "cache")["kind"] == "verify"


def store_of_failure(cache: Path) -> dict:
    (failed,) = (cache / "onnx").glob("*/failed.json")
    return json.loads(failed.read_text())


def test_without_onnxruntime_auto_runs_torch_and_onnx_is_an_error(tiny_model, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with caplog.at_level(logging.WARNING, logger="safeclip"):
        enc = Encoder(tiny_model, cache_dir=tmp_path, device="cpu")
    assert enc.runtime == "torch"
    assert [r.getMessage() for r in caplog.records if "onnxruntime is not installed" in r.getMessage()]
    with pytest.raises(ModelLoadError, match="pip install onnxruntime"):
        Encoder(tiny_model, cache_dir=tmp_path, runtime="onnx")
    assert not (tmp_path / "onnx").exists()


@pytest.mark.slow
def test_int8_is_its_own_space(exported, tiny_model):
    onnx, torch_enc = exported
    int8 = Encoder(tiny_model, cache_dir=onnx.cache_dir, precision="int8")
    assert int8.runtime == "onnx" and int8.precision == "int8"
    assert int8.encoder_id == onnx.encoder_id + "|int8"
    assert int8.prompt_cache.path != onnx.prompt_cache.path  # caches never mix
    px = np.random.default_rng(5).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    cos = (int8.embed_pixels(px) * torch_enc.embed_pixels(px)).sum(1)
    assert cos.min() > 0.9 and not np.allclose(cos, 1.0, atol=1e-7)  # close, but not the fp32 embeddings
    with pytest.raises(ModelLoadError, match="int8"):
        Encoder(tiny_model, cache_dir=onnx.cache_dir, precision="int8", runtime="torch")


# ------------------------------------------------------------------------------------------ trust
def _blind_graph(path: Path, dim: int) -> None:
    """An ONNX graph with the export's contract (pixels -> embeddings) that ignores the pixels: every image gets
    the same unit vector."""
    import onnx
    from onnx import TensorProto, helper

    const = np.zeros((1, dim), np.float32)
    const[0, 0] = 1.0
    nodes = [
        helper.make_node("Shape", ["pixels"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
        helper.make_node("Concat", ["batch", "width"], ["out_shape"], axis=0),
        helper.make_node("Expand", ["row", "out_shape"], ["embeddings"]),
    ]
    graph = helper.make_graph(
        nodes, "blind",
        [helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["batch", 64, 64, 3])],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", dim])],
        [helper.make_tensor("zero", TensorProto.INT64, [1], [0]),
         helper.make_tensor("width", TensorProto.INT64, [1], [dim]),
         onnx.numpy_helper.from_array(const, "row")])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _forge(store: ExportStore) -> bytes:
    """Replace the export's graph with a blind one and rewrite the manifest to match, as anyone who can write the
    cache folder could; returns the forged graph's bytes."""
    m = json.loads(store.manifest_path.read_text())
    graph = store.dir / m["file"]
    _blind_graph(graph, m["dim"])
    data = graph.read_bytes()
    m["files"] = {m["file"]: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}}
    store.manifest_path.write_text(json.dumps(m))  # its MAC (if any) no longer matches; the forger has no key
    return data


@pytest.mark.slow
@pytest.mark.parametrize("mac", ["kept", "dropped"])
def test_a_replaced_graph_with_a_matching_manifest_is_never_loaded(tiny_model, tmp_path, mac):
    cache = tmp_path / "cache"
    torch_enc = Encoder(tiny_model, cache_dir=cache, runtime="torch")
    store = store_of(Encoder(tiny_model, cache_dir=cache, device="cpu"))
    forged = _forge(store)
    if mac == "dropped":
        m = json.loads(store.manifest_path.read_text())
        m.pop("mac", None)
        store.manifest_path.write_text(json.dumps(m))
    px = np.random.default_rng(6).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    again = Encoder(tiny_model, cache_dir=cache, device="cpu")  # re-exported: the forged manifest is not signed
    assert again.runtime == "onnx" and store_of(again).dir == store.dir
    assert (again.embed_pixels(px) * torch_enc.embed_pixels(px)).sum(1).min() >= 0.99999
    assert (store.dir / store.read_manifest()["file"]).read_bytes() != forged


@pytest.mark.slow
def test_an_export_folder_others_can_write_is_never_read(tiny_model, tmp_path, monkeypatch, caplog):
    cache, own = tmp_path / "cache", tmp_path / "own"
    monkeypatch.setenv("SAFECLIP_CACHE_DIR", str(own))  # the user's own cache folder: where the export moves
    store = store_of(Encoder(tiny_model, cache_dir=cache, device="cpu"))
    os.chmod(store.dir, 0o777)  # anyone could now swap the graph between its check and its load
    with caplog.at_level(logging.WARNING, logger="safeclip"):
        enc = Encoder(tiny_model, cache_dir=cache, device="cpu")
    assert enc.runtime == "onnx" and store_of(enc).cache_dir == own
    lines = [r.getMessage() for r in caplog.records if "cannot be kept in" in r.getMessage()]
    assert len(lines) == 1 and str(store.dir) in lines[0] and "every user" in lines[0] and "chmod go-w" in lines[0]
    with pytest.raises(ArtifactIntegrityError, match="every user"):  # and never run from there, even if asked
        store.check_sizes(store.read_manifest())


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nobody can write into, the running user included (root: the immutable attribute)."""
    d = tmp_path / "read-only-cache"
    d.mkdir(mode=0o700)
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode != 0:
            pytest.skip("cannot make a folder read-only for root here (chattr +i)")
        try:
            yield d
        finally:
            subprocess.run(["chattr", "-i", str(d)], capture_output=True)
    else:
        os.chmod(d, 0o500)
        try:
            yield d
        finally:
            os.chmod(d, 0o700)


@pytest.mark.slow
def test_a_read_only_cache_exports_once_to_a_folder_of_the_users_own(tiny_model, read_only_dir, tmp_path,
                                                                   monkeypatch, caplog):
    from safeclip import _trust
    from safeclip.embed import _export

    own = tmp_path / "own"
    monkeypatch.setenv("SAFECLIP_CACHE_DIR", str(own))
    monkeypatch.setattr(_trust, "_said", set())  # a fresh process
    with caplog.at_level(logging.INFO, logger="safeclip"):
        enc = Encoder(tiny_model, cache_dir=read_only_dir, device="cpu")
    lines = [r.getMessage() for r in caplog.records if r.name == "safeclip"]
    assert enc.runtime == "onnx" and store_of(enc).cache_dir == own
    moved = [ln for ln in lines if "cannot be kept in" in ln]
    assert len(moved) == 1 and str(read_only_dir) in moved[0] and str(own) in moved[0] and "--cache" in moved[0]
    exporting = [ln for ln in lines if ln.startswith("exporting the image tower")]
    assert len(exporting) == 1 and f"later starts load it from {own}" in exporting[0]
    assert not list(read_only_dir.iterdir())
    # The next start loads that export: no export child, no line about exporting.
    caplog.clear()
    monkeypatch.setattr(_trust, "_said", set())
    monkeypatch.setattr(_export, "export_in_child", lambda *a, **k: pytest.fail("exported again"))
    with caplog.at_level(logging.INFO, logger="safeclip"):
        again = Encoder(tiny_model, cache_dir=read_only_dir, device="cpu")
    assert again.runtime == "onnx" and store_of(again).dir == store_of(enc).dir
    assert not [r for r in caplog.records if r.getMessage().startswith("exporting")]


@pytest.mark.slow
def test_the_first_start_says_it_is_exporting_and_where_later_starts_load_it(tiny_model, tmp_path, caplog):
    cache = tmp_path / "cache"
    with caplog.at_level(logging.WARNING, logger="safeclip"):
        enc = Encoder(tiny_model, cache_dir=cache, device="cpu")
        Encoder(tiny_model, cache_dir=cache, device="cpu")
    lines = [r.getMessage() for r in caplog.records if r.name == "safeclip"]
    assert enc.runtime == "onnx" and len(lines) == 1, lines  # the first start only
    assert lines[0].startswith("exporting the image tower of ") and f"later starts load it from {cache}" in lines[0]


def test_prompt_embeddings_others_could_write_are_not_read(exported, tiny_model, tmp_path, monkeypatch, caplog):
    from safeclip import _trust

    onnx, _ = exported
    onnx.embed_texts(["a photo of a cat"])
    text = onnx.prompt_cache.path.parent
    own = tmp_path / "own"
    monkeypatch.setenv("SAFECLIP_CACHE_DIR", str(own))
    monkeypatch.setattr(_trust, "_said", set())
    os.chmod(text, 0o777)
    try:
        with caplog.at_level(logging.WARNING, logger="safeclip"):
            enc = Encoder(tiny_model, cache_dir=onnx.cache_dir, device="cpu")
    finally:
        os.chmod(text, 0o700)
    assert enc.prompt_cache.path.is_relative_to(own) and store_of(enc).dir == store_of(onnx).dir
    lines = [r.getMessage() for r in caplog.records if "not using the cache folder" in r.getMessage()]
    assert len(lines) == 1 and "prompt embeddings" in lines[0] and "every user" in lines[0]
    assert enc.prompt_cache.missing(["a photo of a cat"]) == ["a photo of a cat"]  # not read from there
