"""Export of the image tower to ONNX (fp32, and dynamic int8 from it), verified against torch.

An export runs in a child process (``python -m safeclip.embed._export``): the server that asked for it never pays
the exporter's memory peak, never sees its output (a failing TorchScript export dumps the whole graph on stderr)
and survives a crash in it. The child holds the export folder's lock, re-checks whether another process finished
the export meanwhile, exports, runs the exported graph on a fixed batch against the torch forward (fp32: cosine >=
:data:`FP32_MIN_COSINE` at batch 1 and 4), and only then publishes the files and their manifest. Its last line on stdout is
a JSON verdict ``{"ok": ..., "kind": ..., "reason": ...}``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import _trust
from ..files import write_atomic
from ..artifacts import sha256_file
from ..errors import CacheError, ModelLoadError, one_line
from ._identity import encoder_id_for, weights_identity
from ._store import EXPORT_FORMAT, ExportStore, package_versions

__all__ = ["FP32_MIN_COSINE", "INT8_MIN_COSINE", "export_in_child", "main", "verification_batch"]

FP32_MIN_COSINE = 0.99999
"""An fp32 export must give the torch forward's embeddings: same ``encoder_id``, caches and calibrators."""

INT8_MIN_COSINE = 0.9
"""A floor that only catches a broken quantisation; what int8 costs on real images is measured by
``safeclip runtime verify`` on the user's own images."""


def verification_batch(size: int) -> np.ndarray:
    """A fixed ``(4, size, size, 3)`` uint8 batch: two noise images and two smooth ones (gradients, rings)."""
    rng = np.random.default_rng(20240601)
    noise = rng.integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(1, size - 1)
    grad = np.stack([xx, yy, 1.0 - xx * yy], -1)
    rings = 0.5 + 0.5 * np.stack([np.sin(12 * np.hypot(xx - .5, yy - .5) + k) for k in (0.0, 2.0, 4.0)], -1)
    smooth = (np.stack([grad, rings]) * 255).round().astype(np.uint8)
    return np.concatenate([noise, smooth])


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {one_line(e, 300)}"


def _to_onnx(tm: Any, opset: int) -> bytes:
    import torch

    size = tm.pixel_spec.size
    dummy = torch.zeros(2, size, size, 3, dtype=torch.uint8)  # batch 2: nothing may specialise on batch 1
    kwargs: dict[str, Any] = dict(opset_version=opset, input_names=["pixels"], output_names=["embeddings"],
                                  dynamic_axes={"pixels": {0: "batch"}, "embeddings": {0: "batch"}},
                                  do_constant_folding=True)
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False  # the TorchScript exporter: needs onnx, not onnxscript
    mha = getattr(torch.backends, "mha", None)
    fastpath = mha.get_fastpath_enabled() if mha is not None else None
    buf = io.BytesIO()
    try:
        if mha is not None:
            mha.set_fastpath_enabled(False)  # the fused attention kernel has no ONNX form
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(tm.image, (dummy,), buf, **kwargs)
    finally:
        if mha is not None:
            mha.set_fastpath_enabled(fastpath)
    return buf.getvalue()


def _cosines(model: bytes | str, pixels: np.ndarray, ref: np.ndarray) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    one = session.run(None, {"pixels": pixels[:1]})[0]
    many = session.run(None, {"pixels": pixels})[0]
    cos = np.concatenate([(one * ref[:1]).sum(1), (many * ref).sum(1)])
    return float(cos.min()) if np.isfinite(cos).all() else float("nan")


def _export(store: ExportStore, model: str, pretrained: str | None, holder: dict[str, Any]) -> dict[str, Any]:
    """Export into ``store`` unless a valid export is there; the torch model is loaded once into ``holder``."""
    from ._torch import TorchModel

    with store.lock():
        if store.valid_manifest() is not None:
            return {"ok": True, "reused": True}
        for stale in store.dir.glob(".export-*"):  # left by an exporter that was killed; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        if "tm" not in holder:
            holder["tm"] = TorchModel(model, pretrained, device="cpu", precision="fp32")
            print(STARTED, flush=True)  # the weights loaded: the parent may say that the export is under way
        tm = holder["tm"]
        pixels = verification_batch(tm.pixel_spec.size)
        if "ref" not in holder:
            holder["ref"] = tm.reference(pixels)
        ref = holder["ref"]
        with tempfile.TemporaryDirectory(dir=store.dir, prefix=".export-") as tmp:
            staged = Path(tmp) / store.model_path.name
            stage = "export" if store.precision == "fp32" else "quantize"
            try:
                if store.precision == "fp32":
                    _save_split(_to_onnx(tm, store.opset), staged)
                    floor = FP32_MIN_COSINE
                else:
                    fp32 = store.sibling("fp32")
                    verdict = _export(fp32, model, pretrained, holder)
                    if not verdict["ok"]:
                        return verdict
                    _quantize(fp32.dir / fp32.read_manifest()["file"], staged)  # type: ignore[index]
                    floor = INT8_MIN_COSINE
                stage = "verify"
                cosine = _cosines(str(staged), pixels, ref)  # the very files that will be published
            except Exception as e:  # an architecture the exporter cannot express, or a graph ORT refuses
                reason = _one_line(e)
                store.write_failure(stage, reason)
                return {"ok": False, "kind": stage, "reason": reason}
            if not cosine >= floor:
                reason = (f"the exported graph's embeddings differ from torch's on the verification batch: min "
                          f"cosine {cosine:.7f} < {floor}")
                store.write_failure("verify", reason, cosine=cosine)
                return {"ok": False, "kind": "verify", "reason": reason, "cosine": cosine}
            files = {}
            weights = staged.with_name(staged.name + ".data")
            for src in ([weights] if weights.exists() else []) + [staged]:  # the weights first, the graph last
                with open(src, "rb") as f:
                    write_atomic(store.dir / src.name, lambda out, f=f: shutil.copyfileobj(f, out, 1 << 22),
                                 durable=True)
                files[src.name] = {"sha256": sha256_file(store.dir / src.name), "bytes": src.stat().st_size}
        store.write_manifest({
            "format": EXPORT_FORMAT, "encoder_id": encoder_id_for(model, store.weights_id, tm.pixel_spec,
                                                                  store.precision),
            "model": model, "weights": store.weights_id, "pixel_spec": dataclasses.asdict(tm.pixel_spec),
            "dim": int(ref.shape[1]), "logit_scale": float(tm.logit_scale), "opset": store.opset,
            "precision": store.precision, "file": store.model_path.name, "files": files,
            "verified": {"min_cosine": cosine, "floor": floor, "batch": len(pixels)}, "versions": package_versions(),
        })
        return {"ok": True, "reused": False, "cosine": cosine}


def _save_split(model: Any, path: Path) -> None:
    """Save an ONNX model (bytes or ModelProto) as a small graph file plus its weights in ``<name>.data``.

    ONNX Runtime maps external weights from the file instead of parsing them out of one protobuf: the session
    starts about twice as fast, and the weights are not held twice while it starts."""
    import onnx

    proto = onnx.load_model_from_string(model) if isinstance(model, bytes) else model
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)


def _quantize(fp32_graph: Path, out: Path) -> None:
    """Dynamic int8 (weights int8 per tensor, activations quantised at run time) of the fp32 export."""
    import logging

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(logging.ERROR)  # the quantiser's advice on pre-processing, in this child only
    single = out.with_name("quantized.onnx")
    quantize_dynamic(fp32_graph, single, weight_type=QuantType.QInt8)
    _save_split(onnx.load_model(str(single)), out)


STARTED = "safeclip-export-started"
"""The line the export child prints on stdout once the weights have loaded and the export itself begins."""


def export_in_child(store: ExportStore, model: str, pretrained: str | None, threads: int | None,
                    on_started: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run the export in a child process; its verdict (``{"ok": False, ...}`` when it failed or crashed).
    ``on_started`` is called once the child has loaded the weights (weights that cannot load never call it)."""
    cmd = [sys.executable, "-m", "safeclip.embed._export", "--model", model, "--cache", str(store.cache_dir),
           "--precision", store.precision, "--opset", str(store.opset)]
    if pretrained is not None:
        cmd += ["--pretrained", pretrained]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    try:
        with tempfile.TemporaryFile(mode="w+") as errors:
            # The child signs the manifest with this process's cache key, handed over on stdin (never in argv).
            proc = subprocess.Popen(cmd + ["--key-on-stdin"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=errors, text=True)
            assert proc.stdin is not None and proc.stdout is not None
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.write(_trust.current_key().hex() + "\n")
                proc.stdin.close()
            lines = []
            for line in proc.stdout:
                if line.strip() == STARTED:
                    if on_started is not None:
                        on_started()
                    continue
                lines.append(line.strip())
            proc.wait()
            errors.seek(0)
            stderr = errors.read()
    except OSError as e:
        return {"ok": False, "kind": "export", "reason": f"could not start the export process: {_one_line(e)}"}
    lines = [ln for ln in lines if ln]
    with contextlib.suppress(ValueError, IndexError):
        verdict = json.loads(lines[-1])
        if isinstance(verdict, dict) and "ok" in verdict:
            return verdict
    err = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    why = err[-1].strip()[:300] if err else f"exit status {proc.returncode}"
    return {"ok": False, "kind": "export", "reason": f"the export process failed: {why}"}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m safeclip.embed._export")
    ap.add_argument("--model", required=True)
    ap.add_argument("--pretrained")
    ap.add_argument("--cache", required=True)
    ap.add_argument("--precision", choices=("fp32", "int8"), required=True)
    ap.add_argument("--opset", type=int, required=True)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--key-on-stdin", action="store_true", help="read the cache key (hex) from stdin")
    args = ap.parse_args(argv)
    if args.key_on_stdin:
        try:
            _trust.use_key(bytes.fromhex(sys.stdin.readline().strip()))
        except (ValueError, CacheError) as e:
            print(json.dumps({"ok": False, "kind": "load", "reason": f"no cache key on stdin ({e})"}), flush=True)
            return 3
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        weights_id = weights_identity(args.model, args.pretrained, Path(args.cache))
        store = ExportStore(args.cache, args.model, weights_id, args.precision, args.opset)
        verdict = _export(store, args.model, args.pretrained, {})
    except ModelLoadError as e:  # the parent raises it as it is (with its command-line form)
        verdict = {"ok": False, "kind": "load", "reason": _one_line(e),
                   "error": {"message": str(e), "cli_message": e.cli_message}}
    except Exception as e:  # the cache is not writable...: the parent says so
        verdict = {"ok": False, "kind": "load", "reason": _one_line(e)}
    print(json.dumps(verdict), flush=True)
    return 0 if verdict["ok"] else 3


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
