"""The audit's inputs: folders walked for image files, manifests read, in order and each once.

>>> collect_inputs(["a.jpg", "b.png", "a.jpg"])     # files are taken as given (a missing one becomes an error row)
['a.jpg', 'b.png']
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import ManifestError

__all__ = ["IMAGE_EXTENSIONS", "collect_inputs", "read_manifest"]

IMAGE_EXTENSIONS: frozenset[str] = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".webp", ".gif", ".bmp", ".dib", ".tif", ".tiff", ".mpo",
    ".avif", ".heic", ".heif",
})
"""File extensions (lower case) collected when a folder is walked. Files named explicitly are audited whatever
their extension (a non-image becomes an error row)."""


def _walk(folder: str) -> Iterator[str]:
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                yield os.path.join(root, name)


def read_manifest(path: str | os.PathLike[str]) -> list[str]:
    """The paths a manifest lists: a ``.csv`` or ``.parquet`` file with a ``path`` column, else a text file with one
    path per line (blank lines and lines starting with ``#`` are skipped). Paths are used as written (relative ones
    relative to the working directory). Raises :class:`~safeclip.errors.ManifestError`."""
    p = Path(path)
    suffix = p.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            schema = pq.read_schema(p)
            if "path" not in schema.names:
                raise ManifestError(f"manifest {p}: no 'path' column (columns: {schema.names})")
            col = pq.read_table(p, columns=["path"]).column("path")
            return [str(v) for v in col.to_pylist() if v is not None and str(v) != ""]
        if suffix == ".csv":
            with open(p, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                if reader.fieldnames is None or "path" not in reader.fieldnames:
                    raise ManifestError(f"manifest {p}: no 'path' column (header: {reader.fieldnames})")
                return [row["path"] for row in reader if row.get("path")]
        with open(p, encoding="utf-8") as f:
            return [s for s in (line.strip() for line in f) if s and not s.startswith("#")]
    except ManifestError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, csv.Error) as e:  # pyarrow's errors are OSError/ValueError
        raise ManifestError(f"cannot read manifest {p}: {e}") from e


def collect_inputs(
    paths: Iterable[str | os.PathLike[str]] = (), manifests: Iterable[str | os.PathLike[str]] = ()
) -> list[str]:
    """The inputs of an audit, in order, each once: files as given, folders walked recursively (sorted, image
    extensions only, see :data:`IMAGE_EXTENSIONS`), then the paths of each manifest (:func:`read_manifest`)."""
    out: list[str] = []
    for p in paths:
        s = os.fspath(p)
        if os.path.isdir(s):
            out.extend(_walk(s))
        else:
            out.append(s)  # a missing file becomes an error row, not a crash
    for m in manifests:
        out.extend(read_manifest(m))
    return list(dict.fromkeys(out))
