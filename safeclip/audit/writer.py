"""The audit's output: its schema and rows, the committed Parquet parts of a run in progress, resume, and the
exactly-once merge into ``OUT.parquet``.

Exactly once, resumable
    Rows are committed as Parquet part files in ``OUT.parquet.parts/`` (each written whole, fsynced, renamed into
    place: :func:`safeclip.files.write_parquet_atomic`), always *after* the embeddings they use were committed to
    the cache. ``run.json`` beside them says which configuration (policy, encoder, columns) wrote them. A re-run of
    the same command skips every input that has a committed row, and finds the embeddings of the rest in the cache,
    so after ``kill -9`` at any moment nothing committed is computed again; parts of another configuration are
    dropped. A part deleted, or damaged anywhere (each part is read whole on resume), holds no done rows: it is
    removed and its inputs are computed again. At the end the parts are merged, in input order and one row per
    input, into ``OUT.parquet``, and the parts folder is removed. Both engines write this same layout, so each can
    resume the other's runs.

Changed inputs are redone
    A committed row is kept on resume only while its file is unchanged: each part row records the file's size and
    ``mtime_ns`` (a parts-only column, taken when the row is buffered; ``-1`` when the file's size then already
    differed from the bytes hashed). A row is redone when the file is gone or its size or mtime differs. When
    mtime cannot tell (the file was modified less than :data:`RACY_NS` before its row was committed: coarse
    timestamps could hide a later write of the same size), the file is hashed again and compared with ``sha256``.
    Parts written by the previous version (no ``mtime_ns``) are checked by size and against the part's own commit
    time: a file modified after its row was committed is redone. A redone row is written to a later part and the
    merge keeps the latest row of each input.

Columns: ``path, sha256, bytes, width, height, frames, background, action, p_<category>..., error, encoder_id,
policy, pdq, pdq_quality, matches`` (with ``save_embeddings`` also ``embedding``, a list of per-frame lists of D
floats: ``np.stack`` of one row gives ``(frames, D)``, ``embedding_backgrounds``, the background of each of those
rows, ``embedding_pdq`` / ``embedding_pdq_quality``, the PDQ hash (64 hex digits, null where none) and quality
of each, and ``embedding_times``, a clip's frame times, null for a still). ``pdq`` (64 hex digits) and
``pdq_quality`` are the deciding view's PDQ hash, null where none was
computed; ``matches`` is JSON, the bank entries the deciding view matched (a list of
:meth:`~safeclip.banks.BankMatch.to_dict`; ``[]`` for none, null for an error row). A video or animation decoded
with times also fills ``frames_scored``, ``time_s`` (the deciding frame's time), ``duration_s``, ``sampling`` and
``segments``: a list of structs ``{category, start_s, end_s, peak_probability, peak_s, action, frames}``, one per
run of sampled frames at or above a category's ``flag`` (:class:`~safeclip.decide.Segment`; ``[]`` for a clip
without any; null for a still or an error row). The per-segment table is that column flattened
(:func:`segments_table`: one row per segment with its file's ``path`` and ``sha256``); keeping it in the row of its
file makes it resume and merge exactly once with the row. Outputs written before these
columns existed stay readable: readers treat them as optional. ``action`` is
``allow``/``flag``/``block``, or ``error`` for an input that could not be decided (``error`` says why; no
probabilities). ``background`` is the colour (``#rrggbb``) of the view that decided a transparent image, null for
an opaque one. The run's metadata is the schema's ``safeclip`` key (JSON).

Not overwritten
    :func:`check_output`: ``OUT`` is never one of the inputs, never a file that is not a safeclip output, and an
    existing audit of other inputs is replaced only with ``overwrite=True``; the write errors of the output
    (unwritable folder, full disk) are :class:`~safeclip.errors.OutputError` s.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..files import fsync_dir, write_json_atomic, write_parquet_atomic
from ..cache import EmbeddingCache
from ..decide import ACTIONS
from ..errors import AuditError, AuditLockedError, CacheError, ConfigError, OutputError
from ..policy import Policy
from .identity import EncoderIdentity
from .reader import open_parquet, parquet_batches, path_bytes, path_text, text_column
from .summary import ERROR_ACTION
from .worker import FileResult

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa


__all__ = ["FORMAT_VERSION", "RACY_NS", "OutputOptions", "Parts", "Rows", "RunOutput", "check_output", "check_writable",
           "embedding_dir", "nested_embeddings", "output_error", "output_schema", "policy_fingerprint", "read_meta",
           "run_meta", "segment_type", "segments_table"]

FORMAT_VERSION = 1
_NOT_IDENTITY = ("encoder_chosen_by", "cwd", "thresholds")  # metadata that does not change a row: resuming ignores it
RACY_NS = 2_000_000_000
"""A file modified less than this before its row was committed is hashed again on resume (mtime may be coarse)."""


def output_error(e: OSError, out: os.PathLike[str] | str, doing: str = "write") -> OutputError:
    """One line for an OS error on the output (to raise ``from e``)."""
    why = e.strerror or str(e)
    if e.errno == errno.ENOSPC:
        fix = "free some space there, or give another --out"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "give an --out in a folder you can write to"
    elif e.errno == errno.EISDIR:
        fix = "give the path of a Parquet file, not a folder"
    else:
        fix = "give another --out"
    return OutputError(f"cannot {doing} {out}: {why}; {fix}")


def _real(p: str | os.PathLike[str]) -> str:
    try:
        return os.path.realpath(os.path.abspath(p))
    except ValueError:  # a NUL in the name: no file has it, so it stays as written
        return os.fspath(p)


def check_writable(out: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None) -> None:
    """Before the model loads: the output's folder and the cache folder (``None``: not used) can be written.
    :class:`OutputError` / :class:`~safeclip.errors.CacheError`, one line naming the fix."""
    out = Path(out)
    try:
        _probe(out.parent)
    except OSError as e:
        raise output_error(e, out) from e
    if cache_dir is None:
        return
    folder = Path(cache_dir) / "embeddings"
    try:
        _probe(folder)
        for db in folder.glob("*.sqlite"):
            if not os.access(db, os.W_OK):
                raise PermissionError(errno.EACCES, "Permission denied", str(db))
    except OSError as e:
        raise CacheError(f"cannot write to the cache {e.filename or folder}: {e.strerror or e}; give a --cache "
                         "folder you can write to, or --no-cache") from e


def _probe(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".safeclip-probe-")
    os.close(fd)
    os.unlink(tmp)


def check_output(out: str | os.PathLike[str], inputs: Sequence[str] = (), *, overwrite: bool = False,
                 what: str = "audit", rows: Sequence[str | None] | None = None) -> None:
    """Refuse an ``out`` that would destroy something: a folder, one of ``inputs``, an existing file that is not a
    safeclip output, or (without ``overwrite``) a safeclip output whose rows are not those of this run (``rows``:
    their paths, default ``inputs``). :class:`OutputError`, one line."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    if out.is_dir():
        raise OutputError(f"--out {out} is a folder; give the path of the Parquet file to write")
    real = _real(out)
    for p in inputs:
        if _real(p) == real:
            raise OutputError(f"--out {out} is one of the inputs; give another path for the output")
    if rows is None:
        rows = inputs
    if not os.path.lexists(out):
        return
    try:
        schema = pq.read_schema(out)
    except (OSError, pa.ArrowException, ValueError, TypeError):
        schema = None
    meta = read_meta(schema) if schema is not None else {}
    if meta.get("kind") not in ("audit", "rescore"):
        raise OutputError(f"--out {out} exists and is not a safeclip output; refusing to replace it: give another "
                          "path, or move it away")
    if overwrite:
        return
    old = _output_paths(out)
    if old is None or old != {_real(p) for p in rows if p is not None}:
        raise OutputError(f"--out {out} holds a safeclip {meta.get('kind')} of other inputs; refusing to replace it: "
                          f"give another --out, or pass --overwrite (overwrite=True) to replace it with this {what}")


def _output_paths(out: Path) -> set[str] | None:
    """The resolved paths of an existing output's rows, read a batch at a time; None when it has no text ``path``
    column or cannot be read (then it is not replaced without ``overwrite``)."""
    try:
        pf = open_parquet(out, OutputError, "--out")
        if "path" not in pf.schema_arrow.names or not text_column(pf.schema_arrow, "path"):
            return None
        return {_real(p) for batch in parquet_batches(pf, ["path"], f"--out {out}", OutputError)
                for p in batch.column(0).to_pylist() if p is not None}
    except OutputError:
        return None


def policy_fingerprint(policy: Policy) -> str:
    return hashlib.sha256(repr(policy).encode()).hexdigest()[:16]


def run_meta(ident: EncoderIdentity, policy: Policy, save_embeddings: bool, encoder_chosen_by: str,
             decoder: str = "pil") -> dict[str, Any]:
    """An audit's metadata: what its rows depend on (``run.json`` and the output schema's ``safeclip`` key);
    ``decoder``: :func:`~safeclip.decode.decoder_id` of the decode backend (another one can give other pixels)."""
    return {"format": FORMAT_VERSION, "kind": "audit", "encoder_id": ident.encoder_id, "decoder": decoder,
            "encoder_chosen_by": encoder_chosen_by, "policy": policy.id,
            "policy_fingerprint": policy_fingerprint(policy), "categories": list(policy.category_names),
            "dim": ident.dim, "save_embeddings": bool(save_embeddings), "cwd": os.getcwd(),
            "thresholds": policy_thresholds(policy)}


def policy_thresholds(policy: Policy) -> dict[str, list[float | None]]:
    """``{category: [flag, block]}`` of the policy's categories (what :func:`~safeclip.audit.diff` reads)."""
    return {c.name: [c.flag, c.block] for c in policy.categories}


def _same_run(a: Mapping[str, Any] | None, b: Mapping[str, Any]) -> bool:
    """Whether parts written under metadata ``a`` hold the rows a run under ``b`` would write."""
    if not isinstance(a, Mapping):
        return False

    def key(m: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in m.items() if k not in _NOT_IDENTITY}

    return key(a) == key(b)


def segment_type() -> pa.DataType:
    """The Arrow type of one segment in the ``segments`` column."""
    import pyarrow as pa

    return pa.struct([("category", pa.string()), ("start_s", pa.float64()), ("end_s", pa.float64()),
                      ("peak_probability", pa.float32()), ("peak_s", pa.float64()), ("action", pa.string()),
                      ("frames", pa.int32())])


def segments_table(output: pa.Table | str | os.PathLike[str]) -> pa.Table:
    """The per-segment table of an audit output (a table, or the path of ``OUT.parquet``): one row per segment,
    ``path, sha256, category, start_s, end_s, peak_probability, peak_s, action, frames``, in the output's row order.
    An output without a ``segments`` column (no videos, or written before videos) gives an empty table.

    >>> segments_table("audit.parquet").to_pandas()                     # doctest: +SKIP
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    t = output if isinstance(output, pa.Table) else pq.read_table(
        output, columns=[c for c in ("path", "sha256", "segments") if c in pq.read_schema(output).names])
    names = ("path", "sha256") + tuple(f.name for f in segment_type())
    if "segments" not in t.column_names:
        return pa.table({n: pa.array([], pa.string() if n in ("path", "sha256") else segment_type()[n].type)
                         for n in names})
    segs = t.column("segments").combine_chunks().cast(pa.list_(segment_type()))
    parent = pc.list_parent_indices(segs)
    flat = pc.list_flatten(segs)
    cols = {"path": t.column("path").take(parent), "sha256": t.column("sha256").take(parent)}
    for f in segment_type():
        cols[f.name] = flat.field(f.name)
    return pa.table(cols)


def output_schema(categories: Sequence[str], meta: Mapping[str, Any], save_embeddings: bool) -> pa.Schema:
    import pyarrow as pa

    fields = [
        pa.field("path", pa.string()),
        pa.field("path_bytes", pa.binary()),  # the raw name when it is not UTF-8 (safeclip.audit.reader)
        pa.field("sha256", pa.string()),
        pa.field("bytes", pa.int64()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("frames", pa.int32()),
        pa.field("background", pa.string()),
        pa.field("action", pa.string()),
        *[pa.field(f"p_{c}", pa.float32()) for c in categories],
        pa.field("error", pa.string()),
        pa.field("encoder_id", pa.string()),
        pa.field("policy", pa.string()),
        pa.field("pdq", pa.string()),
        pa.field("pdq_quality", pa.int16()),
        pa.field("matches", pa.string()),
        pa.field("frames_scored", pa.int32()),
        pa.field("time_s", pa.float64()),
        pa.field("duration_s", pa.float64()),
        pa.field("sampling", pa.string()),
        pa.field("segments", pa.list_(segment_type())),
    ]
    if save_embeddings:
        fields.append(pa.field("embedding", pa.list_(pa.list_(pa.float32()))))
        fields.append(pa.field("embedding_backgrounds", pa.list_(pa.string())))
        fields.append(pa.field("embedding_pdq", pa.list_(pa.string())))
        fields.append(pa.field("embedding_pdq_quality", pa.list_(pa.int16())))
        fields.append(pa.field("embedding_times", pa.list_(pa.float64())))
    return pa.schema(fields, metadata={b"safeclip": json.dumps(dict(meta), sort_keys=True).encode()})


def _parts_schema(schema: pa.Schema) -> pa.Schema:
    import pyarrow as pa

    return schema.append(pa.field("mtime_ns", pa.int64()))


def nested_embeddings(col: pa.ChunkedArray | pa.Array, dim: int) -> pa.Array:
    """An ``embedding`` column in the current layout (per-frame lists): the previous layout (one flat list of
    frames x ``dim`` floats per row) is split into frames; a row that does not divide into frames becomes null."""
    import pyarrow as pa

    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_list(arr.type) and pa.types.is_list(arr.type.value_type):
        return arr
    rows = []
    offsets = arr.offsets.to_numpy()
    values = arr.values.to_numpy(zero_copy_only=False)
    for i, ok in enumerate(arr.is_valid().to_numpy(zero_copy_only=False)):
        n = int(offsets[i + 1] - offsets[i])
        rows.append(values[offsets[i]:offsets[i + 1]].reshape(-1, dim).tolist() if ok and dim and n
                    and n % dim == 0 else None)
    return pa.array(rows, pa.list_(pa.list_(pa.float32())))


def read_meta(schema: pa.Schema) -> dict[str, Any]:
    """The ``safeclip`` metadata of an output's schema: a JSON object, else {} (absent, not JSON, not an object,
    nested too deep). Its fields are the writer's word only: readers check each one's type before using it."""
    raw = (schema.metadata or {}).get(b"safeclip")
    try:
        meta = json.loads(raw) if raw else {}
    except (ValueError, RecursionError):  # (UnicodeDecodeError is a ValueError)
        return {}
    return meta if isinstance(meta, dict) else {}


class Rows:
    """A columnar buffer of output rows."""

    def __init__(self, n_categories: int, save_embeddings: bool) -> None:
        self.c = n_categories
        self.save_embeddings = save_embeddings
        self.cols: dict[str, list[Any]] = {k: [] for k in (
            "path", "sha256", "bytes", "width", "height", "frames", "background", "action", "error", "pdq",
            "pdq_quality", "matches", "frames_scored", "time_s", "duration_s", "sampling", "segments")}
        self.probs: list[np.ndarray | None] = []
        self.emb: list[np.ndarray | None] = []
        self.emb_bg: list[Sequence[str | None] | None] = []
        self.emb_pdq: list[list[str | None] | None] = []
        self.emb_pdq_q: list[list[int] | None] = []
        self.emb_times: list[list[float] | None] = []
        self.mtime_ns: list[int | None] = []

    def __len__(self) -> int:
        return len(self.probs)

    def add(self, path: str | None, sha: str | None, nbytes: int | None, width: int | None, height: int | None,
            frames: int | None, action: str | None, probs: np.ndarray | None, error: str | None,
            emb: np.ndarray | None = None, *, background: str | None = None,
            emb_backgrounds: Sequence[str | None] | None = None, mtime_ns: int | None = None,
            pdq: np.ndarray | None = None, pdq_quality: np.ndarray | None = None, view: int | None = None,
            matches: str | None = None, frames_scored: int | None = None, time_s: float | None = None,
            duration_s: float | None = None, sampling: str | None = None, segments: str | None = None,
            emb_times: Sequence[float] = ()) -> None:
        """One row; an error row (``error`` set) always gets the action ``error``, no probabilities and no matches.
        ``pdq`` ``(F, 32)`` uint8 and ``pdq_quality`` ``(F,)``: each view's PDQ hash (or None); ``view``: the
        deciding one; ``matches``: its bank matches as JSON. A video's ``frames_scored``, ``time_s``,
        ``duration_s``, ``sampling`` and ``segments`` (JSON: a list of segment dicts) are kept for a decided row."""
        if error is not None or action is None:
            action, probs, background, matches = ERROR_ACTION, None, None, None
            frames_scored = time_s = segments = None
            error = error or "no decision"
        elif matches is None:
            matches = "[]"
        hexes = _pdq_hex(pdq, pdq_quality, len(emb) if emb is not None else None)
        chosen = hexes[view] if (hexes is not None and view is not None and 0 <= view < len(hexes)
                                 and error is None) else None
        c = self.cols
        c["path"].append(path)
        c["sha256"].append(sha)
        c["bytes"].append(nbytes)
        c["width"].append(width)
        c["height"].append(height)
        c["frames"].append(frames)
        c["background"].append(background)
        c["action"].append(action)
        c["error"].append(error)
        c["pdq"].append(chosen)
        c["pdq_quality"].append(None if chosen is None else int(pdq_quality[view]))  # type: ignore[index]
        c["matches"].append(matches)
        c["frames_scored"].append(frames_scored)
        c["time_s"].append(time_s)
        c["duration_s"].append(duration_s)
        c["sampling"].append(sampling)
        c["segments"].append(None if segments is None else json.loads(segments))
        self.probs.append(probs)
        self.mtime_ns.append(mtime_ns)
        if self.save_embeddings:
            self.emb.append(emb)
            self.emb_bg.append(None if emb is None else (list(emb_backgrounds or ()) or [None] * len(emb)))
            self.emb_pdq.append(None if emb is None or hexes is None else hexes)
            self.emb_pdq_q.append(None if emb is None or hexes is None
                                  else [int(q) for q in pdq_quality])  # type: ignore[union-attr]
            self.emb_times.append([float(t) for t in emb_times] if emb is not None and len(emb_times) == len(emb)
                                  and len(emb_times) else None)

    def extend(self, inputs: Sequence[str], results: Sequence[FileResult]) -> None:
        """One row per result: decided (``code`` set) or an error row; each records its file's mtime (see the
        module docstring)."""
        for r in results:
            path = inputs[r.tid]
            mtime = _stat_mark(path, r.nbytes)
            if r.code is None:
                self.add(path, r.sha256, r.nbytes, None, None, None, None, None, r.error_text, mtime_ns=mtime,
                         duration_s=r.duration_s, sampling=r.sampling)
            else:
                self.add(path, r.sha256, r.nbytes, r.width, r.height, r.n_frames, ACTIONS[r.code],
                         r.probs, None, r.embeddings, background=r.background, emb_backgrounds=r.backgrounds,
                         mtime_ns=mtime, pdq=r.pdq, pdq_quality=r.pdq_quality, view=r.view, matches=r.matches,
                         frames_scored=r.frames_scored, time_s=r.time_s, duration_s=r.duration_s,
                         sampling=r.sampling, segments=r.segments, emb_times=r.timestamps)

    def table(self, schema: pa.Schema, categories: Sequence[str], encoder_id: str, policy_id: str, *,
              parts: bool = False) -> pa.Table:
        """The rows as a table of ``schema`` (``parts``: with the parts-only ``mtime_ns`` column)."""
        import pyarrow as pa

        n = len(self)
        arrays: dict[str, Any] = dict(self.cols)
        # Any name the filesystem allows: text with \xNN escapes plus the raw bytes (see safeclip.audit.reader).
        arrays["path_bytes"] = [None if p is None else path_bytes(p) for p in arrays["path"]]
        arrays["path"] = [None if p is None else path_text(p) for p in arrays["path"]]
        arrays["error"] = [None if e is None else path_text(e) for e in arrays["error"]]  # may quote a name
        mat = np.full((n, self.c), np.nan, np.float32)
        valid = np.zeros(n, bool)
        for i, p in enumerate(self.probs):
            if p is not None:
                mat[i] = p
                valid[i] = True
        for j, name in enumerate(categories):
            arrays[f"p_{name}"] = pa.array(mat[:, j], pa.float32(), mask=~valid)
        arrays["encoder_id"] = [encoder_id] * n
        arrays["policy"] = [policy_id] * n
        if self.save_embeddings:
            arrays["embedding"] = [None if e is None else np.asarray(e, np.float32).reshape(len(e), -1).tolist()
                                   for e in self.emb]
            arrays["embedding_backgrounds"] = self.emb_bg
            arrays["embedding_pdq"] = self.emb_pdq
            arrays["embedding_pdq_quality"] = self.emb_pdq_q
            arrays["embedding_times"] = self.emb_times
        if parts:
            schema = _parts_schema(schema)
            arrays["mtime_ns"] = self.mtime_ns
        return pa.Table.from_arrays([pa.array(arrays[f.name], f.type) for f in schema], schema=schema)


def _pdq_hex(pdq: np.ndarray | None, quality: np.ndarray | None, rows: int | None) -> list[str | None] | None:
    """Each view's PDQ hash as 64 hex digits (None where none was computed), or None without hashes (or when they
    are not one per view)."""
    if pdq is None or quality is None or len(pdq) != len(quality) or (rows is not None and len(pdq) != rows):
        return None
    return [None if int(q) < 0 else bytes(h).hex() for h, q in zip(np.asarray(pdq, np.uint8), quality)]


def _stat_mark(path: str, nbytes: int | None) -> int | None:
    """The ``mtime_ns`` recorded for a row: -1 when the file's size already differs from what was hashed (it
    changed while it was read: redone on resume), None when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return -1 if nbytes is not None and st.st_size != nbytes else st.st_mtime_ns


def _unchanged(path: str, nbytes: int | None, sha: str | None, mtime_ns: int | None, committed_ns: int,
               has_mtime: bool) -> bool:
    """Whether a committed row still describes its file (the rules of the module docstring)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return nbytes is None  # an error row of a file that was not there: still not there
    if nbytes is None or st.st_size != nbytes:
        return False
    if has_mtime and mtime_ns != st.st_mtime_ns:
        return False
    if not has_mtime and st.st_mtime_ns > committed_ns:
        return False
    if st.st_mtime_ns < committed_ns - RACY_NS:
        return True
    if sha is None:
        return False
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError:
        return False
    return h.hexdigest() == sha


class Parts:
    """``OUT.parquet.parts/``: the committed rows of a run in progress (see the module docstring)."""

    def __init__(self, out: Path, run: Mapping[str, Any], schema: pa.Schema | None = None) -> None:
        self.out = out
        self.dir = out.with_name(out.name + ".parts")
        self.run = dict(run)
        self.schema = schema  # the output's: a part that cannot be merged into it is not resumed from
        self._lock_fd: int | None = None
        self._next = 0
        self.previous: Any = None

    def open(self) -> set[str]:
        """Lock the folder; return the paths that already have a committed row of this same run whose file is
        unchanged (see the module docstring). A part that cannot be read whole (or merged into the output's schema)
        is outside damage: it is removed and its rows are not done, so this run computes them again. Nothing else
        is deleted until :meth:`begin` (the run's identity may still be a prediction)."""
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            for stale in self.out.parent.glob(f"{self.dir.name}.done-*"):
                shutil.rmtree(stale, ignore_errors=True)
            self.dir.mkdir(exist_ok=True)
            self._lock()
        except OSError as e:
            raise output_error(e, self.out) from e
        for tmp in self.dir.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        try:
            self.previous = json.loads((self.dir / "run.json").read_text())
        except (OSError, ValueError, RecursionError):
            self.previous = None
        done: set[str] = set()
        if not _same_run(self.previous, self.run):
            return done
        for p in sorted(self.dir.glob("part-*.parquet")):
            got = self._readable(p)
            if got is None:
                continue
            t, committed_ns = got
            cols = [c for c in ("path", "path_bytes", "sha256", "bytes", "mtime_ns") if c in t.column_names]
            c = {k: t.column(k).to_pylist() if k in cols else [None] * t.num_rows
                 for k in ("path", "path_bytes", "sha256", "bytes", "mtime_ns")}
            for path, raw, sha, nbytes, mtime in zip(c["path"], c["path_bytes"], c["sha256"], c["bytes"],
                                                     c["mtime_ns"]):
                name = os.fsdecode(raw) if isinstance(raw, bytes) else path  # the file's exact name
                if path and _unchanged(name, nbytes, sha, mtime, committed_ns, "mtime_ns" in cols):
                    done.add(path)
                elif path:
                    done.discard(path)  # an earlier part's row of the same input is just as stale
            number = p.stem.split("-", 1)[1]
            if number.isdigit():  # (not one of ours otherwise: its name cannot collide with the next part's)
                self._next = max(self._next, int(number) + 1)
        return done

    def _readable(self, p: Path) -> tuple[pa.Table, int] | None:
        """A committed part's table and commit time, or None when it cannot be read whole: then it is removed
        (parts are renamed into place whole, so this is outside damage, and its rows are computed again)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            committed_ns = p.stat().st_mtime_ns
            t = pq.read_table(p)  # every page: damage anywhere in the part shows now, not at the merge
            if "path" not in t.column_names:
                raise ValueError("no path column")
            if self.schema is not None:  # its values as the output's types (a path of 5 would stat fd 5)
                typed = _conform(t, self.schema, int(self.run.get("dim") or 0))
                if "mtime_ns" in t.column_names:
                    typed = typed.append_column("mtime_ns", t.column("mtime_ns").cast(pa.int64()))
                t = typed
            return t, committed_ns
        except Exception:  # pyarrow raises OSError, ArrowException, ValueError, TypeError... on a damaged file
            try:
                p.unlink(missing_ok=True)
            except OSError as e:
                raise OutputError(f"{p} is damaged and cannot be removed: {e.strerror or e}; delete it, then run "
                                  "the same command again") from e
            return None

    def begin(self) -> None:
        """Make the folder this run's: parts of another configuration (policy, encoder) are dropped."""
        if _same_run(self.previous, self.run):
            return
        parts = sorted(self.dir.glob("part-*.parquet"))
        if parts:
            prev = self.previous if isinstance(self.previous, Mapping) else {}
            print(f"safeclip audit: {self.dir} holds rows of another configuration "
                  f"({prev.get('policy')}, {prev.get('encoder_id')}); starting over (the embedding cache still "
                  "saves the model work)", file=sys.stderr)
        try:
            for p in parts:
                p.unlink()
        except OSError as e:
            raise output_error(e, self.dir, "remove the parts of another configuration from") from e
        self._next = 0
        write_json_atomic(self.dir / "run.json", self.run, durable=True)
        self.previous = self.run

    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - no advisory locks on this platform
            return
        fd = os.open(self.dir / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            raise AuditLockedError(f"another audit is writing {self.out} (lock held on {self.dir / 'LOCK'}); wait "
                                   "for it to finish, or give another --out") from e
        self._lock_fd = fd

    def commit(self, table: pa.Table) -> None:
        if table.num_rows:
            try:
                write_parquet_atomic(table, self.dir / f"part-{self._next:06d}.parquet")
            except OSError as e:
                raise output_error(e, self.dir, "commit rows to") from e
            self._next += 1

    def merge(self, inputs: Sequence[str], schema: pa.Schema) -> pa.Table:
        """Merge the parts into ``OUT`` (input order, one row per input), then remove the parts folder."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        dim = int(self.run.get("dim") or 0)
        tables = []
        for p in sorted(self.dir.glob("part-*.parquet")):
            try:
                tables.append(_conform(pq.read_table(p), schema, dim))
            except Exception as e:  # damaged while this run went on: the next run's open() drops it
                raise AuditError(
                    f"{p} was damaged while the audit ran ({' '.join(str(e).split())[:200]}). Nothing was lost "
                    "from the embedding cache: run the same command again (it recomputes that part's rows)") from e
        table = pa.concat_tables(tables) if tables else schema.empty_table()
        idx = pc.index_in(table.column("path"), value_set=pa.array([path_text(p) for p in inputs], pa.string()))
        table = table.filter(pc.is_valid(idx))
        idx = pc.drop_null(idx).to_numpy()
        order = np.argsort(idx, kind="stable")
        idx = idx[order]
        keep = np.ones(len(idx), bool)
        keep[:-1] = idx[:-1] != idx[1:]  # exactly once; the latest part's row wins (a redone, changed input)
        table = table.take(pa.array(order[keep]))
        if table.num_rows != len(inputs):
            raise AuditError(
                f"{self.dir} holds rows for {table.num_rows} of the {len(inputs)} inputs after the run: its parts "
                "were changed while the audit ran. Nothing was lost from the embedding cache: run the same "
                "command again (it recomputes the missing rows), or delete the folder to start over")
        try:
            write_parquet_atomic(table.replace_schema_metadata(schema.metadata), self.out)
        except OSError as e:
            raise output_error(e, self.out) from e
        self.remove()
        return table

    def remove(self) -> None:
        gone = self.dir.with_name(f"{self.dir.name}.done-{os.getpid()}")
        with contextlib.suppress(OSError):
            os.replace(self.dir, gone)  # one atomic step: a kill now leaves only a folder to delete
            fsync_dir(self.dir.parent)
            shutil.rmtree(gone, ignore_errors=True)
        self.release()

    def release(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = None


def _conform(t: pa.Table, schema: pa.Schema, dim: int) -> pa.Table:
    """A part as a table of ``schema``: parts of the previous version lack ``background`` (null) and store error
    rows' action as null (now ``error``) and embeddings flat (now per frame); the parts-only column is dropped."""
    import pyarrow as pa
    import pyarrow.compute as pc

    cols = []
    for f in schema:
        if f.name not in t.column_names:
            cols.append(pa.nulls(t.num_rows, f.type))
        elif f.name == "embedding":
            cols.append(nested_embeddings(t.column(f.name), dim))
        elif f.name == "action":
            col = t.column("action")
            cols.append(pc.if_else(pc.is_valid(t.column("error")), ERROR_ACTION, col) if "error" in t.column_names
                        else col)
        else:
            cols.append(t.column(f.name))
    return pa.Table.from_arrays([c.cast(f.type) for c, f in zip(cols, schema)], schema=schema)


@dataclass(frozen=True)
class OutputOptions:
    """Where and how an audit writes: ``out`` (the Parquet file), ``overwrite`` (replace a safeclip output of other
    inputs), ``save_embeddings`` (an ``embedding`` column that :func:`~safeclip.audit.rescore` can use instead of
    the cache), and how often rows are committed as parts (every ``part_rows`` rows or ``part_seconds`` seconds).
    """

    out: Path
    overwrite: bool = False
    save_embeddings: bool = False
    part_rows: int = 2048
    part_seconds: float = 60.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        if isinstance(self.part_rows, bool) or not isinstance(self.part_rows, int) or self.part_rows < 1:
            raise ConfigError(f"part_rows must be >= 1, got {self.part_rows}")
        if not self.part_seconds > 0:
            raise ConfigError(f"part_seconds must be > 0, got {self.part_seconds}")


@contextlib.contextmanager
def embedding_dir(cache_dir: Path | None) -> Iterator[Path]:
    """The folder of the run's embedding cache: ``cache_dir``, or without one (``use_cache=False``) a private one,
    removed at the end (identical files are still embedded once within the run)."""
    if cache_dir is not None:
        yield cache_dir
        return
    scratch = tempfile.mkdtemp(prefix="safeclip-audit-")
    try:
        yield Path(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class RunOutput:
    """Where one run's results go, in the order exactly-once needs: the embedding cache of its space
    (:attr:`db`), then rows, buffered (:attr:`rows`) and committed as parts of the output (:meth:`commit`).

    Opening it locks the output (:class:`~safeclip.errors.AuditLockedError` if another audit holds it) and finds the
    inputs committed by an interrupted run of the same configuration (:attr:`done`); :meth:`begin`, once the
    encoder is known for sure, drops parts of another configuration.
    """

    def __init__(self, options: OutputOptions, inputs: Sequence[str], policy: Policy, ident: EncoderIdentity,
                 emb_dir: Path, *, fingerprint: str, encoder_chosen_by: str, decoder: str = "pil") -> None:
        self.options = options
        self.inputs = inputs
        self.policy = policy
        self.ident = ident
        self.meta = run_meta(ident, policy, options.save_embeddings, encoder_chosen_by, decoder)
        self.schema = output_schema(policy.category_names, self.meta, options.save_embeddings)
        self.fingerprint = fingerprint
        check_output(options.out, inputs, overwrite=options.overwrite)
        self.parts = Parts(options.out, self.meta, self.schema)
        self.done = self.parts.open()
        try:
            self.db = EmbeddingCache(emb_dir, ident.encoder_id)  # exists before the decoders open it read-only
        except BaseException:
            self.parts.release()
            raise
        self.rows = self._new_rows()

    def _new_rows(self) -> Rows:
        return Rows(len(self.policy.category_names), self.options.save_embeddings)

    def todo(self) -> list[tuple[int, str]]:
        """``(position, path)`` of the inputs without a committed row."""
        return [(i, p) for i, p in enumerate(self.inputs) if path_text(p) not in self.done]

    def begin(self) -> None:
        self.parts.begin()

    def commit(self) -> None:
        """Commit the buffered rows as one part (their embeddings are in the cache already: see
        :func:`safeclip.audit.mapper.store`)."""
        if len(self.rows):
            self.parts.commit(self.rows.table(self.schema, self.policy.category_names, self.ident.encoder_id,
                                              self.policy.id, parts=True))
            self.rows = self._new_rows()

    def merge(self) -> pa.Table:
        return self.parts.merge(list(self.inputs), self.schema)

    def release(self) -> None:
        """Unlock the output, fold the cache's write-ahead log in and close it (however the run ended)."""
        self.parts.release()
        self.db.checkpoint()
        self.db.close()
