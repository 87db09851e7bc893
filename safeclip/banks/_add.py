"""Adding images to a bank: from image files (:func:`add_files`) or from an audit's Parquet output, reusing the hashes
and embeddings the audit already computed (:func:`add_from_parquet`), and the PDQ hashes of a file
(:func:`hash_file`, what ``safeclip bank hash`` and ``bank match`` print).

PDQ hashes are taken on the decoded frames as :func:`safeclip.embed.prepare` takes them for checks and audits
(:func:`safeclip.pdq.frame_hashes`), one per view (an animation's sampled frames, a transparent image on each
background); views too flat to hash reliably (quality below :data:`~safeclip.pdq.MIN_QUALITY`) are left out, and a
file with no other view is refused. A dihedral bank holds the 8 turns and flips of each view
(:func:`~safeclip.pdq.pdq_hash_dihedral`). Embedding banks hold one embedding per image file, made by a
:class:`~safeclip.Moderator` (:meth:`~safeclip.Moderator.embed`: the deciding view of an animation or a transparent
image) whose ``encoder_id`` must be the bank's; from an audit's rows, every cached view of the file.

An entry's id is the first 16 hex digits of the file's sha256 unless given; its source is the file's path.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError, DataError, DecodeError, EncoderMismatchError, one_line
from ..pdq import MIN_QUALITY
from ._store import Bank, NewEntry

if TYPE_CHECKING:  # pragma: no cover
    from ..decode import DecodeLimits
    from ..moderator import Moderator

__all__ = ["FileHashes", "add_files", "add_from_parquet", "expand_paths", "hash_file"]

ID_HEX = 16
"""Hex digits of a file's sha256 that make its default entry id."""

_IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".webp", ".gif", ".bmp", ".dib",
                               ".tif", ".tiff", ".mpo", ".avif", ".heic", ".heif"})


@dataclass(frozen=True)
class FileHashes:
    """The PDQ hashes of one file: ``codes`` ``(V, 32)`` uint8 and ``quality`` ``(V,)``, one per view (with
    ``dihedral``: ``(8V, 32)``, each view's 8 turns in :data:`~safeclip.pdq.DIHEDRAL_NAMES` order), and its
    ``sha256``."""

    path: str
    sha256: str
    codes: np.ndarray
    quality: np.ndarray

    def usable(self) -> np.ndarray:
        """Rows of quality >= :data:`~safeclip.pdq.MIN_QUALITY`."""
        return np.flatnonzero(self.quality >= MIN_QUALITY)

    def too_flat(self) -> str:
        return (f"{self.path}: too flat to hash reliably (PDQ quality {int(self.quality.max(initial=0))} < "
                f"{MIN_QUALITY}): a plain or near-blank image would match unrelated ones; it was not added")


def hash_file(path: str | os.PathLike[str], *, dihedral: bool = False,
              limits: DecodeLimits | None = None) -> FileHashes:
    """The PDQ hashes of an image file's views (module doc); raises :class:`~safeclip.errors.DecodeError`."""
    from ..decode import decode
    from ..pdq import DECODE_SIDE, frame_hashes

    dec = decode(path, limits=limits, target_size=DECODE_SIDE)
    codes, quality = frame_hashes(dec.frames, dihedral=dihedral)
    return FileHashes(os.fspath(path), dec.sha256, codes, quality)


def expand_paths(paths: Iterable[str | os.PathLike[str]]) -> list[str]:
    """Files as given, folders walked recursively for image files (by extension; sorted), each path once."""
    out: list[str] = []
    for p in paths:
        s = os.fspath(p)
        if os.path.isdir(s):
            for root, dirs, files in os.walk(s):
                dirs.sort()
                out.extend(os.path.join(root, n) for n in sorted(files)
                           if os.path.splitext(n)[1].lower() in _IMAGE_EXTENSIONS)
        else:
            out.append(s)
    return list(dict.fromkeys(out))


def add_files(bank: Bank, paths: Sequence[str | os.PathLike[str]], *, label: str = "", entry_id: str | None = None,
              source: str | None = None, moderator: Moderator | None = None, limits: DecodeLimits | None = None,
              replace: bool = False, errors: list[str] | None = None) -> list[str]:
    """Add image files (folders: their image files, recursively) to ``bank``, one entry per file; returns the ids
    added, in order.

    ``entry_id``: the id of the one file given (default: its sha256's first 16 hex digits); ``label`` for every
    entry; ``source`` (default: the file's path). ``moderator`` makes embeddings (embedding banks; its
    ``encoder_id`` must be the bank's); ``limits`` bound decoding (PDQ banks; a Moderator's own limits otherwise).
    A file that cannot be added (unreadable, too flat for PDQ, already in the bank): with ``errors`` a list, one
    line naming it is appended there and the other files are added; without, :class:`~safeclip.errors.DataError`
    and nothing is added. ``replace``: an id already in the bank is replaced.
    """
    files = expand_paths(paths)
    if entry_id is not None and len(files) != 1:
        raise ConfigError(f"an entry id names one file, but {len(files)} were given; leave the id out (each file's "
                          "sha256 names it)")
    if bank.kind == "embedding":
        if moderator is None:
            raise ConfigError(f"{bank.path} is an embedding bank of {bank.encoder_id!r}: adding images needs that "
                              "model (give --model/--pretrained)")
        if moderator.encoder_id != bank.encoder_id:
            raise EncoderMismatchError(f"{bank.path} holds embeddings of {bank.encoder_id!r}, but the model given "
                                       f"is {moderator.encoder_id!r}: give the bank's model, or create a bank for "
                                       "this one")
    problems: list[str] = []
    rows: list[np.ndarray] = []
    entries: list[NewEntry] = []
    seen: set[str] = set()

    def take(path: str, sha: str, data: np.ndarray, quality: int | None) -> None:
        eid = entry_id or sha[:ID_HEX]
        if eid in seen:
            problems.append(f"{path}: the same image as an earlier file (entry {eid!r}); added once")
            return
        if not replace and bank.entry(eid) is not None:
            problems.append(f"{path}: already in the bank as entry {eid!r} (remove it first to add it again)")
            return
        seen.add(eid)
        rows.append(data)
        entries.append(NewEntry(eid, label=label, source=source if source is not None else path, quality=quality,
                                sha256=sha, nrows=len(data)))

    if bank.kind == "pdq":
        for path in files:
            try:
                h = hash_file(path, dihedral=bank.dihedral, limits=limits)
            except DecodeError as e:
                problems.append(_one_line(e, path))
                continue
            ok = h.usable()
            if not len(ok):
                problems.append(h.too_flat())
                continue
            take(path, h.sha256, h.codes[ok], int(h.quality[ok].min()))
    else:
        assert moderator is not None
        _embed_files(moderator, files, take, problems)
    return _commit(bank, rows, entries, problems, errors, replace)


def _commit(bank: Bank, rows: list[np.ndarray], entries: list[NewEntry], problems: list[str],
            errors: list[str] | None, replace: bool) -> list[str]:
    """Add what was gathered: all of it, reporting problems into ``errors``; or, without ``errors``, nothing when
    anything went wrong (the first problem raised)."""
    if problems and errors is None:
        raise DataError(problems[0] + (f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""))
    if errors is not None:
        errors.extend(problems)
    if not entries:
        return []
    return bank.add(np.concatenate(rows), entries, replace=replace)


def _embed_files(moderator: Moderator, files: list[str], take: Any, problems: list[str], chunk: int = 64) -> None:
    """One embedding per file through the Moderator's public :meth:`~safeclip.Moderator.embed` (for an animation or
    a transparent image, its deciding view), a chunk at a time; a chunk with a bad file is embedded file by file."""
    for i in range(0, len(files), chunk):
        part = files[i:i + chunk]
        try:
            done = list(zip(part, moderator.embed(part)))
        except DecodeError:
            done = []
            for path in part:
                try:
                    done.append((path, moderator.embed([path])[0]))
                except DecodeError as e:
                    problems.append(_one_line(e, path))
        for path, emb in done:
            with open(path, "rb") as f:
                sha = hashlib.file_digest(f, "sha256").hexdigest()
            take(path, sha, np.asarray(emb, np.float32)[None, :], None)


def add_from_parquet(bank: Bank, parquet: str | os.PathLike[str], *, where_action: str | Sequence[str] | None = None,
                     label: str = "", cache_dir: str | os.PathLike[str] | None = None, replace: bool = False,
                     errors: list[str] | None = None) -> list[str]:
    """Add the rows of an audit's Parquet output to ``bank`` without decoding a file or loading a model: PDQ banks
    take each row's ``pdq`` column (hex; rows of ``pdq_quality`` below :data:`~safeclip.pdq.MIN_QUALITY` are
    refused), embedding banks the embeddings cached for the row's ``sha256`` under ``cache_dir`` (default: the
    default cache) for the bank's ``encoder_id``. ``where_action``: only rows whose ``action`` is this (or one of
    these). Rows with an ``error``, and a sha256 seen before, are skipped. Ids are the sha256's first 16 hex digits,
    sources the ``path``. Problems as in :func:`add_files` (``errors``)."""
    import pyarrow.compute as pc

    p = Path(parquet)
    table = _read_parquet(p, bank.kind, where_action is not None)
    if where_action is not None:
        wanted = [where_action] if isinstance(where_action, str) else list(where_action)
        table = table.filter(pc.is_in(table.column("action"), value_set=_string_array(wanted)))
    if "error" in table.column_names:
        table = table.filter(pc.is_null(table.column("error")))
    paths = [os.fsdecode(x) if isinstance(x, bytes) else (x or "") for x in table.column("path").to_pylist()]
    shas = [str(x or "").lower() for x in table.column("sha256").to_pylist()]
    problems: list[str] = []
    rows: list[np.ndarray] = []
    entries: list[NewEntry] = []
    seen: set[str] = set()
    keep: list[int] = []
    for i, sha in enumerate(shas):
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            problems.append(f"{p}: row {i} ({paths[i]}): sha256 {sha[:70]!r} is not 64 hex digits")
        elif sha not in seen:
            seen.add(sha)
            keep.append(i)
    taken = set()
    for i in keep:
        eid = shas[i][:ID_HEX]
        if not replace and bank.entry(eid) is not None:
            problems.append(f"{paths[i]}: already in the bank as entry {eid!r}")
        else:
            taken.add(i)
    keep = [i for i in keep if i in taken]
    if bank.kind == "pdq":
        hexes = table.column("pdq").to_pylist()
        quality = (table.column("pdq_quality").to_pylist() if "pdq_quality" in table.column_names
                   else [None] * len(hexes))
        for i in keep:
            code = _code(hexes[i])
            q = quality[i]
            if code is None:
                problems.append(f"{paths[i]}: row {i} of {p} has no PDQ hash (pdq {str(hexes[i])[:70]!r})")
            elif q is not None and int(q) < MIN_QUALITY:
                problems.append(f"{paths[i]}: too flat to hash reliably (PDQ quality {int(q)} < {MIN_QUALITY}): "
                                "not added")
            else:
                rows.append(code[None, :])
                entries.append(NewEntry(shas[i][:ID_HEX], label=label, source=paths[i],
                                        quality=None if q is None else int(q), sha256=shas[i]))
    else:
        from .._dirs import default_cache_dir
        from ..cache import EmbeddingCache

        assert bank.encoder_id is not None
        folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        cache = EmbeddingCache(folder, bank.encoder_id, readonly=True, create=False)
        try:
            found = cache.get_many(shas[i] for i in keep)
        finally:
            cache.close()
        for i in keep:
            hit = found.get(shas[i])
            if hit is None:
                problems.append(f"{paths[i]}: no embedding of {bank.encoder_id!r} cached for it in {folder} "
                                "(re-run the audit with that model and its cache, or add the file itself)")
                continue
            rows.append(np.asarray(hit.embeddings, np.float32))
            entries.append(NewEntry(shas[i][:ID_HEX], label=label, source=paths[i], sha256=shas[i],
                                    nrows=len(hit.embeddings)))
    return _commit(bank, rows, entries, problems, errors, replace)


def _read_parquet(p: Path, kind: str, need_action: bool) -> Any:
    """The columns :func:`add_from_parquet` needs, read whole (an audit's output of one bank's worth of rows)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not p.is_file():
        raise DataError(f"cannot read {p}: " + ("it is a folder, not a file" if p.is_dir() else "no such file"))
    try:
        names = pq.ParquetFile(p).schema_arrow.names
    except (OSError, pa.ArrowException, ValueError, TypeError) as e:
        raise DataError(f"cannot read {p}: {' '.join(str(e).split())[:300]}") from e
    need = ["path", "sha256"] + (["action"] if need_action else [])
    missing = [c for c in need if c not in names]
    if missing:
        raise DataError(f"{p} is not a safeclip audit output (missing columns {missing})")
    if kind == "pdq" and "pdq" not in names:
        raise DataError(f"{p} has no 'pdq' column: it was written before audits recorded PDQ hashes; re-run the "
                        "audit with this safeclip to record hashes")
    cols = need + [c for c in ("error", "pdq", "pdq_quality") if c in names and (kind == "pdq" or c == "error")]
    try:
        return pq.read_table(p, columns=cols)
    except (OSError, pa.ArrowException, ValueError, TypeError) as e:
        raise DataError(f"cannot read {p}: {' '.join(str(e).split())[:300]}") from e


def _string_array(values: list[str]) -> Any:
    import pyarrow as pa

    return pa.array(values, pa.string())


def _code(value: Any) -> np.ndarray | None:
    """A ``pdq`` cell (64 hex digits, or 32 bytes) as ``(32,)`` uint8; None when it holds no hash."""
    if isinstance(value, (bytes, bytearray)) and len(value) == 32:
        return np.frombuffer(bytes(value), np.uint8).copy()
    if isinstance(value, str) and len(value.strip()) == 64:
        try:
            return np.frombuffer(bytes.fromhex(value.strip()), np.uint8).copy()
        except ValueError:
            return None
    return None


def _one_line(e: BaseException, path: str) -> str:
    msg = one_line(e)
    return msg if path in msg else f"{path}: {msg}"

