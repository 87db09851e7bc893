"""The audit's inputs: folders walked for image files, manifests read, in order and each once.

What a folder holds is decided by content: a file with a known image or video extension (:data:`IMAGE_EXTENSIONS`,
:data:`VIDEO_EXTENSIONS`) is taken, any other regular file is taken when its first bytes are those of an allowed
format (:func:`sniff_image`: JPEG/MPO, PNG/APNG, GIF, WebP, BMP, TIFF, AVIF, HEIF; MP4/QuickTime, WebM/Matroska), so
extensionless, hash-named uploads are found. What is left
out is counted by reason (:class:`Inputs` ``skipped``: ``"not an image"``, ``"not a regular file"``,
``"unreadable"``) and reported; ``include_all=True`` (``--all-files``) takes every regular file (a non-image
becomes an error row). Files named explicitly, and the entries of a manifest, are taken as given (a missing one
becomes an error row).

File names are kept exactly, whatever bytes the filesystem allows. Inside the audit a path is a ``str`` as
:func:`os.fsdecode` gives it (bytes that are not UTF-8 become surrogate escapes, so the file can be opened). In
the output:

* ``path`` is :func:`path_text`: the name as UTF-8 text, each byte that is not part of valid UTF-8 written as
  ``\\xNN`` (two lower-case hex digits: Python's ``backslashreplace``). For a valid UTF-8 name it is the name itself.
* ``path_bytes`` is :func:`path_bytes`: null when the name is valid UTF-8 (``path`` is then exact), else the raw
  bytes of the name. The exact name of a row is therefore ``path_bytes if path_bytes is not None else
  path.encode()`` (``os.fsdecode`` of that opens the file).

Manifests keep names exactly too: a text manifest is read as UTF-8 with surrogate escapes (any byte string is a
name), one name per line, and only the line terminator (``\\n`` or ``\\r\\n``) is removed, so leading and trailing
spaces are part of the name; empty lines and lines starting with ``#`` are skipped (write ``./#name`` for a name
that starts with ``#``). A name containing a newline needs a CSV manifest (quote the field) or a Parquet one.
A manifest lists each name once (a repeated name is the same input).

Parquet files are read a record batch at a time (:func:`parquet_batches`), never whole: a few hundred KB of
run-length encoded rows can stand for millions of them. Their declared row count is checked first against
:func:`max_rows` (``$SAFECLIP_MAX_ROWS``, default :data:`DEFAULT_MAX_ROWS`); this holds for manifests and for the
audit and rescore outputs that ``rescore`` and ``diff`` read.

>>> collect_inputs(["a.jpg", "b.png", "a.jpg"])     # files are taken as given (a missing one becomes an error row)
['a.jpg', 'b.png']
>>> path_text(os.fsdecode(b"caf\\xe9.jpg")), path_bytes(os.fsdecode(b"caf\\xe9.jpg"))
('caf\\\\xe9.jpg', b'caf\\xe9.jpg')
>>> path_text("café.jpg"), path_bytes("café.jpg")
('café.jpg', None)
"""

from __future__ import annotations

import csv
import os
import stat
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, DataError, ManifestError, SafeclipError, one_line

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa
    import pyarrow.parquet as pq

__all__ = ["BATCH_ROWS", "DEFAULT_MAX_ROWS", "IMAGE_EXTENSIONS", "Inputs", "MAX_ROWS_ENV", "VIDEO_EXTENSIONS",
           "collect_inputs", "describe_skipped", "gather_inputs", "max_rows", "open_parquet", "parquet_batches", "path_bytes",
           "path_text", "read_manifest", "sniff_image", "text_column"]

MAX_ROWS_ENV = "SAFECLIP_MAX_ROWS"
DEFAULT_MAX_ROWS = 20_000_000
"""The most rows a Parquet manifest or output may declare (``$SAFECLIP_MAX_ROWS`` raises or lowers it)."""
BATCH_ROWS = 65_536
"""Rows per record batch read from a Parquet file."""

IMAGE_EXTENSIONS: frozenset[str] = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".webp", ".gif", ".bmp", ".dib", ".tif", ".tiff", ".mpo",
    ".avif", ".heic", ".heif",
})
"""File extensions (lower case) taken without reading when a folder is walked; other files are taken by content
(:func:`sniff_image`). Files named explicitly are audited whatever they hold (a non-image becomes an error row)."""

VIDEO_EXTENSIONS: frozenset[str] = frozenset({".mp4", ".m4v", ".mov", ".webm", ".mkv"})
"""Video file extensions (lower case) taken without reading when a folder is walked (one row per file: its sampled
frames decide, its segments are in the row)."""

_VIDEO_BRANDS = (b"isom", b"iso2", b"iso4", b"iso5", b"iso6", b"mp41", b"mp42", b"avc1", b"M4V ", b"M4VP", b"qt  ",
                 b"dash", b"3gp4", b"3gp5", b"3g2a")
_EBML = b"\x1a\x45\xdf\xa3"  # WebM / Matroska
_WALKED = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS

SNIFF_BYTES = 16
"""How many leading bytes :func:`sniff_image` needs."""

_ISOBMFF_BRANDS = (b"avif", b"avis", b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs",
                   b"mif1", b"msf1")

SKIP_NOT_IMAGE = "not an image"
SKIP_NOT_REGULAR = "not a regular file"
SKIP_UNREADABLE = "unreadable"


def sniff_image(head: bytes) -> bool:
    """Whether ``head`` (a file's first :data:`SNIFF_BYTES` bytes) starts like one of the formats the decoder
    allows.

    >>> sniff_image(b"\\x89PNG\\r\\n\\x1a\\n" + bytes(8)), sniff_image(b"%!PS-Adobe-3.0 EPSF")
    (True, False)
    """
    return (head.startswith((b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00",
                             b"MM\x00*", _EBML))
            or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")
            or (head[4:8] == b"ftyp" and head[8:12] in _ISOBMFF_BRANDS + _VIDEO_BRANDS))


def path_text(path: str) -> str:
    """The ``path`` column of an input: its name as text, bytes that are not UTF-8 written ``\\xNN`` (module doc)."""
    try:
        return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that no file name decodes to (e.g. from a Parquet manifest)
        return path.encode("utf-8", "backslashreplace").decode("utf-8")


def path_bytes(path: str) -> bytes | None:
    """The ``path_bytes`` column of an input: None when its name is valid UTF-8, else its raw bytes."""
    try:
        path.encode("utf-8")
        return None
    except UnicodeEncodeError:
        try:
            return os.fsencode(path)
        except UnicodeEncodeError:
            return path.encode("utf-8", "surrogatepass")


def describe_skipped(skipped: Mapping[str, int]) -> str:
    """What was left out of the folders, and how to include it, in words.

    >>> describe_skipped({"not an image": 3, "not a regular file": 1})[:71]
    'skipped 4 file(s) in the folders (1 not a regular file, 3 not an image)'
    """
    why = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()))
    return (f"skipped {sum(skipped.values())} file(s) in the folders ({why}); --all-files (include_all=True) "
            "makes every regular file a row")


@dataclass(frozen=True)
class Inputs:
    """The inputs of an audit (``paths``, in order, each once) and the files of its folders left out, counted by
    reason (``skipped``: see the module doc)."""

    paths: tuple[str, ...]
    skipped: Mapping[str, int] = field(default_factory=dict)

    def skipped_line(self) -> str | None:
        """One line saying what was left out and how to include it, or None."""
        return describe_skipped(self.skipped) if self.skipped else None


def _keep(path: str, name: str, include_all: bool) -> str | None:
    """None to keep ``path``, else why it is skipped."""
    try:
        st = os.stat(path)
    except OSError:
        return SKIP_UNREADABLE  # e.g. a dangling symlink
    if not stat.S_ISREG(st.st_mode):
        return SKIP_NOT_REGULAR  # FIFOs, sockets, devices: opening one may block
    if include_all or os.path.splitext(name)[1].lower() in _WALKED:
        return None
    try:
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
    except OSError:
        return SKIP_UNREADABLE
    return None if sniff_image(head) else SKIP_NOT_IMAGE


def _walk(folder: str, include_all: bool, skipped: Counter[str]) -> Iterator[str]:
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            why = _keep(path, name, include_all)
            if why is None:
                yield path
            else:
                skipped[why] += 1


def _lines(f: Iterable[str]) -> Iterator[str]:
    for line in f:
        name = line[:-1] if line.endswith("\n") else line
        if name.endswith("\r"):
            name = name[:-1]
        if name and not name.startswith("#"):
            yield name


def _why(e: BaseException) -> str:
    if isinstance(e, FileNotFoundError):
        return "no such file"
    if isinstance(e, IsADirectoryError):
        return "it is a folder, not a file"
    if isinstance(e, PermissionError):
        return "permission denied"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror[0].lower() + e.strerror[1:]
    return str(e) or type(e).__name__


def max_rows() -> int:
    """The row limit of the Parquet files read (:data:`MAX_ROWS_ENV`, else :data:`DEFAULT_MAX_ROWS`)."""
    raw = os.environ.get(MAX_ROWS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_ROWS
    try:
        n = int(raw.replace("_", ""))
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"${MAX_ROWS_ENV}={raw!r} is not a positive number of rows; set it to the most rows a "
                          f"Parquet file may have (default {DEFAULT_MAX_ROWS:_}), or unset it")
    return n


def open_parquet(path: str | os.PathLike[str], error: type[SafeclipError] = DataError,
                 what: str = "") -> pq.ParquetFile:
    """``path`` opened for :func:`parquet_batches`, its declared row count checked against :func:`max_rows`;
    ``error`` (one line naming ``what`` and ``path``) when it cannot be read or is too long."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = f"{what} {path}" if what else str(path)
    if not os.path.exists(path):
        raise error(f"cannot read {name}: no such file")
    if os.path.isdir(path):
        raise error(f"cannot read {name}: it is a folder, not a file")
    try:
        pf = pq.ParquetFile(path)
        n = pf.metadata.num_rows
        pf.schema_arrow  # noqa: B018 - a footer whose schema cannot be converted fails here, not later
    except (OSError, pa.ArrowException, ValueError, TypeError) as e:
        raise error(f"cannot read {name}: {one_line(e, 300)}") from e
    limit = max_rows()
    if n > limit:
        raise error(f"{name} has {n:_} rows, more than the limit of {limit:_}: set ${MAX_ROWS_ENV} to a larger "
                    "number to read it")
    return pf


def parquet_batches(pf: pq.ParquetFile, columns: list[str] | None, name: str,
                    error: type[SafeclipError] = DataError, batch_rows: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """The record batches of ``columns`` (None: all) of a file from :func:`open_parquet`; a page that cannot be
    read is ``error``, one line naming ``name``."""
    import pyarrow as pa

    try:
        yield from pf.iter_batches(batch_size=batch_rows, columns=columns)
    except (OSError, pa.ArrowException, ValueError, TypeError) as e:
        raise error(f"cannot read {name}: {one_line(e, 300)}") from e


def text_column(schema: pa.Schema, name: str, *, binary: bool = False) -> bool:
    """Whether ``schema``'s column ``name`` (one column of that name) holds text (or, with ``binary``, bytes), or
    only nulls."""
    import pyarrow as pa

    found = schema.get_all_field_indices(name)
    if len(found) != 1:
        return False
    typ = schema.field(found[0]).type
    if pa.types.is_dictionary(typ):
        typ = typ.value_type
    ok = pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_null(typ)
    if binary:
        ok = ok or pa.types.is_binary(typ) or pa.types.is_large_binary(typ)
    return ok


def check_output_columns(schema: pa.Schema, source: Any, required: Sequence[str], what: str) -> None:
    """:class:`~safeclip.errors.DataError` (one line naming ``source`` as not a safeclip ``what``) unless ``schema``
    has each ``required`` column once and as text, no column name twice, and ``path_bytes``, if any, as bytes."""
    names = schema.names
    missing = sorted(set(required) - set(names))
    if missing:
        raise DataError(f"{source} is not a safeclip {what} (missing columns {missing})")
    if len(set(names)) != len(names):
        raise DataError(f"{source} repeats a column name: not a safeclip {what}")
    for name in required:
        if not text_column(schema, name):
            raise DataError(f"{source}: column {name!r} is {schema.field(name).type}, not text: not a safeclip {what}")
    if "path_bytes" in names and not text_column(schema, "path_bytes", binary=True):
        raise DataError(f"{source}: column 'path_bytes' is {schema.field('path_bytes').type}, not bytes: not a "
                        f"safeclip {what}")


def read_manifest(path: str | os.PathLike[str]) -> list[str]:
    """The paths a manifest lists: a ``.csv`` or ``.parquet`` file with a ``path`` column, else a text file with one
    path per line (see the module doc: names are kept exactly, only the line terminator is removed; empty lines and
    lines starting with ``#`` are skipped). Paths are used as written (relative ones relative to the working
    directory). Raises :class:`~safeclip.errors.ManifestError`."""
    p = Path(path)
    suffix = p.suffix.lower()
    try:
        if not p.exists():
            raise FileNotFoundError(str(p))
        if p.is_dir():
            raise IsADirectoryError(str(p))
        if suffix == ".parquet":
            return _parquet_manifest(p)
        if suffix == ".csv":
            with open(p, newline="", encoding="utf-8", errors="surrogateescape") as f:
                reader = csv.DictReader(f)
                if reader.fieldnames is None or "path" not in reader.fieldnames:
                    raise ManifestError(f"manifest {p}: no 'path' column (header: {reader.fieldnames})")
                return list(dict.fromkeys(row["path"] for row in reader if row.get("path")))
        with open(p, newline="", encoding="utf-8", errors="surrogateescape") as f:
            return list(dict.fromkeys(_lines(f)))
    except SafeclipError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, csv.Error) as e:  # pyarrow's errors are OSError/ValueError
        raise ManifestError(f"cannot read manifest {p}: {_why(e)}") from e


def _parquet_manifest(p: Path) -> list[str]:
    """The ``path`` column of a Parquet manifest, read a batch at a time, each name once."""
    pf = open_parquet(p, ManifestError, "manifest")
    schema = pf.schema_arrow
    if "path" not in schema.names:
        raise ManifestError(f"manifest {p}: no 'path' column (columns: {schema.names[:20]})")
    if not text_column(schema, "path", binary=True):
        raise ManifestError(f"manifest {p}: column 'path' is {schema.field('path').type}, not text")
    names: dict[str, None] = {}
    for batch in parquet_batches(pf, ["path"], f"manifest {p}", ManifestError):
        for v in batch.column(0).unique().to_pylist():  # in order of first appearance
            if v:  # null and empty names are not inputs
                names.setdefault(os.fsdecode(v) if isinstance(v, bytes) else v)
    return list(names)


def gather_inputs(
    paths: Iterable[str | os.PathLike[str]] = (), manifests: Iterable[str | os.PathLike[str]] = (), *,
    include_all: bool = False,
) -> Inputs:
    """The inputs of an audit, in order, each once: files as given, folders walked recursively (sorted; image
    files by extension or content, every regular file with ``include_all``), then the paths of each manifest
    (:func:`read_manifest`); with the folders' files left out, counted by reason."""
    out: list[str] = []
    skipped: Counter[str] = Counter()
    for p in paths:
        s = os.fsdecode(p) if isinstance(p, bytes) else os.fspath(p)
        if os.path.isdir(s):
            out.extend(_walk(s, include_all, skipped))
        else:
            out.append(s)  # a missing file becomes an error row, not a crash
    for m in manifests:
        out.extend(read_manifest(m))
    return Inputs(tuple(dict.fromkeys(out)), dict(skipped))


def collect_inputs(
    paths: Iterable[str | os.PathLike[str]] = (), manifests: Iterable[str | os.PathLike[str]] = (), *,
    include_all: bool = False,
) -> list[str]:
    """The paths of :func:`gather_inputs`."""
    return list(gather_inputs(paths, manifests, include_all=include_all).paths)
