"""The image tower on ONNX Runtime: one CPU session over a verified export, no torch."""

from __future__ import annotations

import ctypes
import threading
from typing import Any

import numpy as np

from ..errors import ArtifactIntegrityError, ModelLoadError
from ._config import available_cpus, onnx_providers
from ._store import ExportStore

__all__ = ["OnnxImageTower", "exit_without_native_teardown", "import_onnxruntime"]

_inherited_sessions: list[Any] = []  # sessions a forked child inherited: never deallocated (see after_fork)


def _capture(into: list[BaseException], fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except BaseException as e:  # handed to the thread that waits for this one
        into.append(e)


def exit_without_native_teardown() -> None:
    """In a forked child of a process that imported onnxruntime: end the process right after Python's own
    finalisation, with its exit status, skipping C-level exit handlers.

    onnxruntime starts a native thread when it is imported; a forked child inherits the state of its condition
    variable but not the thread, and onnxruntime's static destructor then waits for it for ever at exit (a
    pre-forking server's worker that returns or calls ``sys.exit`` would hang). glibc's ``on_exit`` handlers run
    in reverse order of registration and receive the status, so registering ``_exit`` itself, here, ends the
    process before that destructor runs. A no-op where ``on_exit`` does not exist."""
    try:
        libc = ctypes.CDLL(None)
        on_exit, _exit = libc.on_exit, libc._exit
    except (OSError, AttributeError):  # not glibc
        return
    on_exit(ctypes.cast(_exit, ctypes.c_void_p), None)


def import_onnxruntime() -> Any:
    """``onnxruntime``, or :class:`ModelLoadError` saying how to get it."""
    try:
        import onnxruntime
    except ImportError as e:
        raise ModelLoadError(f"onnxruntime is not importable ({e}): pip install onnxruntime, or use "
                             "runtime='torch' (--runtime torch, SAFECLIP_RUNTIME=torch)") from e
    return onnxruntime


class OnnxImageTower:
    """A session over the export a manifest vouches for. The file's sha256 is checked before every session is
    made, including the one a forked child makes for itself."""

    def __init__(self, store: ExportStore, manifest: dict[str, Any], threads: int | None, *,
                 spin_wait: bool = True, device: str = "cpu") -> None:
        self.store = store
        self.manifest = manifest
        self.spin_wait = spin_wait
        self.device = device
        self.dim = int(manifest["dim"])
        self.threads = threads
        self._session: Any = None
        self._open()

    def _open(self) -> None:
        ort = import_onnxruntime()
        providers = onnx_providers(self.device, ort.get_available_providers())  # before any file is read
        path = self.store.check_sizes(self.manifest)  # a truncated file is refused before anything reads it
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads or available_cpus()
        so.inter_op_num_threads = 1
        # Idle intra-op threads spin for the next piece of work: a lone model gains latency, but beside decode
        # processes on the same cores the spinning takes their CPU (the audit turns it off).
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spin_wait else "0")
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        # The sha256 check runs beside the session's construction (each takes a core for a few hundred ms); the
        # session is used only once the check passed, and dropped unrun when it fails.
        problem: list[BaseException] = []
        hasher = threading.Thread(target=_capture, args=(problem, self.store.check_hashes, self.manifest),
                                  name="safeclip-export-check")
        hasher.start()
        try:
            session = ort.InferenceSession(str(path), so, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for a graph it cannot run
            hasher.join()
            if problem:
                raise problem[0] from None
            raise ArtifactIntegrityError(f"{path}: ONNX Runtime cannot load the export: {type(e).__name__}: {e}") from e
        hasher.join()
        if problem:
            del session
            raise problem[0]
        inputs, outputs = session.get_inputs(), session.get_outputs()
        width = outputs[0].shape[-1] if outputs else None
        if [i.name for i in inputs] != ["pixels"] or [o.name for o in outputs] != ["embeddings"] or (
                isinstance(width, int) and width != self.dim):
            raise ArtifactIntegrityError(f"{path}: the export's inputs/outputs are not pixels -> embeddings "
                                         f"(dimension {self.dim})")
        self._session = session

    def after_fork(self) -> None:
        """In a forked child: the parent's session (its thread pool) is not usable; make a fresh one on first use,
        on one thread like the torch runtime's children. The parent's session is kept, never destroyed: its
        destructor waits on threads that do not exist in the child, and hangs."""
        if self._session is not None:
            # One reference that nothing ever drops, not even the interpreter's exit (a worker's sys.exit).
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(self._session))
            _inherited_sessions.append(self._session)
        self._session = None
        self.threads = 1

    def embed_pixels(self, pixels: np.ndarray, batch_size: int, out: np.ndarray) -> None:
        if self._session is None:
            self._open()
        for i in range(0, len(pixels), batch_size):
            chunk = np.ascontiguousarray(pixels[i:i + batch_size])
            out[i:i + len(chunk)] = self._session.run(None, {"pixels": chunk})[0]
