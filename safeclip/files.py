"""One atomic writer for every file safeclip writes (artifacts, policies, caches, Parquet parts, run state).

Each write goes to a temporary name in the target's folder and is renamed over the target, so a reader never sees
half a file. ``durable=True`` also fsyncs the file before the rename and the folder after it: the write survives a
power cut, which the audit's exactly-once promise and the cache's run state rely on. Without it the rename is still
atomic, only not flushed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["fsync_dir", "locked_file", "write_atomic", "write_bytes_atomic", "write_json_atomic", "write_parquet_atomic",
           "json_bytes"]


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (a rename inside it) to disk; a no-op where folders cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def locked_file(path: str | os.PathLike[str], mode: str = "a+b", *, encoding: str | None = None) -> Iterator[IO[Any]]:
    """``path`` opened (``mode``) and held under an exclusive ``fcntl.flock``: writers in other processes, and other
    open files of it in this one, wait; the kernel releases it if the process dies."""
    import fcntl

    with open(path, mode, encoding=encoding) as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield f
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def write_atomic(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None], *, durable: bool = False) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, then rename it over ``path``.

    The temporary file is removed when ``write`` fails; ``path`` is then untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    if durable:
        fsync_dir(path.parent)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, *, durable: bool = False) -> str:
    """Write ``data`` atomically; return its sha256.

    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "a.bin")
    >>> write_bytes_atomic(p, b"abc")[:12]
    'ba7816bf8f01'
    """
    write_atomic(path, lambda f: f.write(data), durable=durable)
    return hashlib.sha256(data).hexdigest()


def json_bytes(obj: Any) -> bytes:
    """The canonical JSON bytes safeclip writes (sorted keys, one space indent, trailing newline)."""
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, durable: bool = False) -> str:
    """Write ``obj`` as canonical JSON atomically; return the sha256 of the bytes written."""
    return write_bytes_atomic(path, json_bytes(obj), durable=durable)


def write_parquet_atomic(table: Any, path: str | os.PathLike[str], *, durable: bool = True,
                         compression: str = "zstd") -> None:
    """Write a pyarrow Table as Parquet atomically (durable by default: audits promise their committed rows)."""
    import pyarrow.parquet as pq

    write_atomic(path, lambda f: pq.write_table(table, f, compression=compression), durable=durable)
